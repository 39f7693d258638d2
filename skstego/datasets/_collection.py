"""Lazy, indexable collections of image files with optional label maps.

An :class:`ImageCollection` holds file paths, never pixels: ``coll[i]`` reads
one file, and indexing with a slice, an integer array, a boolean mask or a
list returns a new collection over the subset. Hence a dataset of any size can
go through scikit-learn's cross-validation splitters (``_safe_indexing`` keeps
the subset lazy) and into :class:`~skstego.features.DinoFeaturizer`, which
accepts any sequence of ``(H, W, 3)`` uint8 arrays.

Images and their label maps go through the same geometry (optional five-crop,
short side resized to ``resolution``, centre crop), so they stay aligned.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["ImageCollection", "LabelCollection", "default_palette"]

_CROPS = ("center", "none")


# --------------------------------------------------------------------------
# readers (module-level so that tests can count calls)
# --------------------------------------------------------------------------
def _load_mat(path: str, keys: tuple[str, ...]) -> np.ndarray:
    from scipy.io import loadmat

    data = loadmat(path)
    for key in keys:
        if key in data:
            return np.asarray(data[key])
    arrays = [k for k in data if not k.startswith("__")]
    if len(arrays) == 1:
        return np.asarray(data[arrays[0]])
    raise KeyError(f"none of the keys {list(keys)} in {arrays}")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Image values to uint8.

    Floats are taken in [0, 1] (scaled by 255) unless their maximum exceeds 1
    (then in [0, 255]); values are rounded and clipped to [0, 255].
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.rint(np.nan_to_num(arr))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _read_image(path: str) -> np.ndarray:
    """Read one image file as an (H, W, 3) uint8 RGB array.

    PIL formats are converted to RGB (grayscale, RGBA, palette; 16-bit
    grayscale divided by 257; float images as :func:`_to_uint8`).
    ``.mat`` files (scipy.io) are read from the key ``img`` (or their only
    array): 2-D arrays are repeated to 3 channels, channels beyond the third
    (e.g. Potsdam's infrared) are dropped, floats are scaled to uint8.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}")
    try:
        if path.lower().endswith(".mat"):
            arr = _load_mat(path, ("img",))
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if arr.ndim != 3 or arr.shape[2] < 1:
                raise ValueError(f"expected an (H, W, C) array, got {arr.shape}")
            arr = _to_uint8(arr)
            if arr.shape[2] < 3:
                arr = np.repeat(arr[:, :, :1], 3, axis=2)
            return np.ascontiguousarray(arr[:, :, :3])
        from PIL import Image

        with Image.open(path) as img:
            if img.mode.startswith("I"):
                # 16- or 32-bit grayscale: 16-bit range to 8 bits
                arr = np.asarray(img).astype(np.float64)
                if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
                    arr = arr / 257.0
                arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
                return np.repeat(arr[:, :, None], 3, axis=2)
            if img.mode == "F":
                arr = _to_uint8(np.asarray(img))
                return np.repeat(arr[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise OSError(
            f"Cannot read image file {path!r}: {exc} (not an image, or a "
            "truncated download: replace or remove the file)"
        ) from exc


def _read_label(path: str) -> np.ndarray:
    """Read one label map as stored, an (H, W) integer array.

    PNG and other PIL formats give their stored values (palette PNGs their
    indices); ``.mat`` files are read from the key ``gt`` (or their only
    array).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Label file not found: {path!r}")
    try:
        if path.lower().endswith(".mat"):
            arr = _load_mat(path, ("gt",))
        else:
            from PIL import Image

            with Image.open(path) as img:
                arr = np.asarray(img)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2:
            raise ValueError(
                f"expected a single-channel label map, got shape {arr.shape}"
            )
        return arr
    except Exception as exc:
        raise OSError(f"Cannot read label file {path!r}: {exc}") from exc


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------
def _five_box(h: int, w: int, ratio: float, k: int) -> tuple[int, int, int, int]:
    """Box (top, left, height, width) of crop ``k`` of torchvision's five_crop.

    ``k``: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, 4 centre.
    """
    ch, cw = max(int(h * ratio), 1), max(int(w * ratio), 1)
    if k == 0:
        return 0, 0, ch, cw
    if k == 1:
        return 0, w - cw, ch, cw
    if k == 2:
        return h - ch, 0, ch, cw
    if k == 3:
        return h - ch, w - cw, ch, cw
    return round((h - ch) / 2.0), round((w - cw) / 2.0), ch, cw


def _resized_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """Short side to ``resolution``, long side scaled (torchvision's rule)."""
    if h <= w:
        return resolution, max(int(resolution * w / h), 1)
    return max(int(resolution * h / w), 1), resolution


def _center_box(h: int, w: int, size: int) -> tuple[int, int]:
    return round((h - size) / 2.0), round((w - size) / 2.0)


_INTERPOLATIONS = ("bilinear", "nearest")


def _resize_image(
    img: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear"
) -> np.ndarray:
    from PIL import Image

    if img.shape[:2] == size:
        return img
    resample = (
        Image.Resampling.NEAREST
        if interpolation == "nearest"
        else Image.Resampling.BILINEAR
    )
    pil = Image.fromarray(img).resize((size[1], size[0]), resample)
    return np.asarray(pil)


def _resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with PIL's sampling (exact for integers).

    PIL (and torchvision's ``Resize(NEAREST)`` on PIL images, the STEGO
    reference's label transform) picks source pixels with its own rounding at
    pixel centres; resizing an int32 image reproduces it value for value.
    """
    from PIL import Image

    h, w = label.shape
    if (h, w) == size:
        return label
    info = np.iinfo(np.int32)
    if label.size and (label.min() < info.min or label.max() > info.max):
        raise ValueError("label values must fit in int32 to be resized")
    pil = Image.fromarray(np.ascontiguousarray(label, dtype=np.int32))
    out = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.NEAREST))
    return out.astype(label.dtype, copy=False)


def default_palette(n_colors: int) -> np.ndarray:
    """A fixed palette of distinct colours (the PASCAL VOC colour map, no black).

    Parameters
    ----------
    n_colors : int
        Number of colours.

    Returns
    -------
    palette : ndarray of shape (n_colors, 3), uint8
        RGB colour of class ``c`` in row ``c``.

    Examples
    --------
    >>> from skstego.datasets import default_palette
    >>> default_palette(3)
    array([[128,   0,   0],
           [  0, 128,   0],
           [128, 128,   0]], dtype=uint8)
    """
    out = np.zeros((n_colors, 3), dtype=np.uint8)
    for c in range(n_colors):
        idx, rgb = c + 1, [0, 0, 0]
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((idx >> ch) & 1) << shift
            idx >>= 3
        out[c] = rgb
    return out


def _as_paths(items: Any, name: str) -> tuple[str, ...]:
    if isinstance(items, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be a sequence of file paths, not a single path {items!r}."
        )
    out = []
    for p in items:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"{name} must hold file paths, got {type(p).__name__}.")
        out.append(os.fspath(p))
    return tuple(out)


def _normalise_key(key: Any) -> Any:
    # ``_safe_indexing`` indexes objects with a ``shape`` as ``X[key, ...]``
    if isinstance(key, tuple):
        if len(key) == 2 and key[1] is Ellipsis:
            return key[0]
        if len(key) == 1:
            return key[0]
        raise IndexError(f"Only one index is supported, got {key!r}.")
    return key


# --------------------------------------------------------------------------
# collections
# --------------------------------------------------------------------------
class ImageCollection(Sequence):
    """Lazy, indexable sequence of images read from files, with label maps.

    Holds file paths only. ``coll[i]`` reads image ``i`` from disk and returns
    an ``(H, W, 3)`` uint8 RGB array; indexing with a slice, an integer array,
    a boolean mask or a list returns a new collection over those items, so
    scikit-learn's cross-validation splitters (through ``_safe_indexing``)
    and :class:`~skstego.features.DinoFeaturizer` take it as they take a list
    of images, without ever holding the whole dataset in memory.

    Images and label maps go through the same geometry, in this order:

    1. with ``five_crop=True``, crop ``k = i % 5`` of file ``i // 5``: the
       top-left, top-right, bottom-left, bottom-right and centre crops of
       ``int(crop_ratio * H) x int(crop_ratio * W)`` pixels (torchvision's
       ``five_crop``, as STEGO's training crops);
    2. with ``resolution`` set, the short side resized to ``resolution``
       (``interpolation`` for images, nearest for labels; the long side
       scaled as torchvision does), then with ``crop="center"`` the centre
       ``resolution x resolution`` square.

    Parameters
    ----------
    images : sequence of str or path-like
        Image files: any format PIL reads (grayscale, RGBA and palette images
        are converted to RGB) or ``.mat`` files with the key ``img``
        (``(H, W, C)``; channels beyond 3 dropped, floats in [0, 1] scaled to
        uint8).
    labels : sequence of str or path-like, optional
        One label file per image, same size as its image: a single-channel
        PIL image (values as stored, palette PNGs give their indices) or a
        ``.mat`` file with the key ``gt``.
    resolution : int, optional
        Side of the output square (or of the short side with
        ``crop="none"``). ``None`` keeps the file's size.
    crop : {"center", "none"}, default="center"
        With ``resolution`` set: keep the centre square, or the whole resized
        image.
    five_crop : bool, default=False
        Five crops per file: the collection is 5 times longer, item ``i``
        being crop ``i % 5`` of file ``i // 5``.
    interpolation : {"bilinear", "nearest"}, default="bilinear"
        How images are resized (PIL's filters). ``"nearest"`` is the STEGO
        reference's evaluation transform (``get_transform`` in its
        ``src/utils.py``: ``Resize(res, NEAREST)`` then ``CenterCrop(res)``)
        and, with ``crop="center"``, reproduces its input pixels exactly.
    crop_ratio : float, default=0.5
        Side of the five crops, as a fraction of each side of the image.
    label_fn : callable, optional
        Applied to every raw label map as read (before the geometry); returns
        the class map with ``-1`` for ignored pixels. ``None`` keeps the stored
        values. Must be picklable for parallel cross-validation (a function or
        a class instance, not a lambda).
    classes : list of str, optional
        Class names, class ``c`` in position ``c``.
    palette : array-like of shape (n_classes, 3), optional
        RGB colour of each class; default :func:`default_palette` when
        ``classes`` is given.

    Attributes
    ----------
    paths : list of str
        Image file of each item (repeated five times with ``five_crop``).
    label_paths : list of str or None
        Label file of each item.
    labels : LabelCollection or None
        Label maps of the items, a lazy sequence indexed like the collection;
        ``np.asarray(coll.labels)`` or ``coll.labels.stack()`` gives an
        ``(N, H, W)`` int64 array when all maps have one size.
    classes : list of str or None
        Class names.
    palette : ndarray of shape (n_classes, 3), uint8, or None
        Class colours.
    n_classes : int or None
        ``len(classes)``.
    shape : tuple of int
        ``(len(coll),)``: the number of samples for scikit-learn, which then
        indexes the collection as an array (lazily) instead of listing its
        items.

    See Also
    --------
    load_image_folder, load_cocostuff27, load_cityscapes27, load_potsdam3

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skstego.datasets import ImageCollection
    >>> tmp = tempfile.mkdtemp()
    >>> paths = []
    >>> for i in range(3):
    ...     paths.append(os.path.join(tmp, f"{i}.png"))
    ...     Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(paths[-1])
    >>> coll = ImageCollection(paths, resolution=16)
    >>> len(coll), coll[0].shape, coll[0].dtype
    (3, (16, 16, 3), dtype('uint8'))
    >>> sub = coll[np.array([2, 0])]
    >>> type(sub).__name__, [os.path.basename(p) for p in sub.paths]
    ('ImageCollection', ['2.png', '0.png'])
    >>> len(ImageCollection(paths, five_crop=True))
    15
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike],
        labels: Sequence[str | os.PathLike] | None = None,
        *,
        resolution: int | None = None,
        crop: str = "center",
        interpolation: str = "bilinear",
        five_crop: bool = False,
        crop_ratio: float = 0.5,
        label_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        classes: Sequence[str] | None = None,
        palette: Any = None,
    ) -> None:
        self._images = _as_paths(images, "images")
        if labels is not None:
            labels = _as_paths(labels, "labels")
            if len(labels) != len(self._images):
                raise ValueError(
                    f"Got {len(self._images)} images but {len(labels)} label files."
                )
        self._labels = labels
        if resolution is not None:
            if isinstance(resolution, bool) or not isinstance(
                resolution, numbers.Integral
            ):
                raise TypeError(
                    f"resolution must be an int or None, got {resolution!r}."
                )
            if resolution < 1:
                raise ValueError(f"resolution must be >= 1, got {resolution}.")
            resolution = int(resolution)
        if crop not in _CROPS:
            raise ValueError(f"crop must be one of {_CROPS}, got {crop!r}.")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {_INTERPOLATIONS}, got "
                f"{interpolation!r}."
            )
        if not isinstance(crop_ratio, numbers.Real) or not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}.")
        if label_fn is not None and not callable(label_fn):
            raise TypeError(f"label_fn must be callable, got {label_fn!r}.")
        self.resolution = resolution
        self.crop = crop
        self.interpolation = interpolation
        self.five_crop = bool(five_crop)
        self.crop_ratio = float(crop_ratio)
        self.label_fn = label_fn
        self.classes = None if classes is None else [str(c) for c in classes]
        if palette is None and self.classes is not None:
            palette = default_palette(len(self.classes))
        if palette is not None:
            palette = np.asarray(palette, dtype=np.uint8)
            if palette.ndim != 2 or palette.shape[1] != 3:
                raise ValueError(
                    f"palette must have shape (n_classes, 3), got {palette.shape}."
                )
        self.palette = palette
        per_file = 5 if self.five_crop else 1
        self._index = np.arange(len(self._images) * per_file, dtype=np.int64)

    # -- subsets -----------------------------------------------------------
    def _subset(self, index: np.ndarray) -> ImageCollection:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._index = index
        return new

    def _select(self, key: Any) -> np.ndarray | int:
        """Positions into ``self._index``: an int, or an int array for a subset."""
        key = _normalise_key(key)
        n = len(self._index)
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} items.")
            return i % n if n else i
        if isinstance(key, slice):
            return np.arange(n)[key]
        arr = np.asarray(key)
        if arr.ndim == 0 and arr.dtype.kind in "iu":
            return self._select(int(arr))
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(
                    f"boolean mask of shape {arr.shape} does not match {n} items."
                )
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise IndexError(
                "index must be an int, a slice, a 1-D integer array or list, or a "
                f"boolean mask; got {key!r}."
            )
        if arr.min() < -n or arr.max() >= n:
            raise IndexError(f"index out of range for {n} items: {key!r}.")
        return arr.astype(np.int64) % n

    def __len__(self) -> int:
        return len(self._index)

    @property
    def shape(self) -> tuple[int]:
        return (len(self._index),)

    def __getitem__(self, key: Any) -> Any:
        sel = self._select(key)
        if isinstance(sel, int):
            return self._load_image(int(self._index[sel]))
        return self._subset(self._index[sel])

    def __iter__(self) -> Iterator[np.ndarray]:
        for item in self._index.tolist():
            yield self._load_image(item)

    # -- geometry ----------------------------------------------------------
    def _file(self, item: int) -> tuple[int, int]:
        return (item // 5, item % 5) if self.five_crop else (item, -1)

    def _geometry(self, arr: np.ndarray, k: int, resize: Callable) -> np.ndarray:
        if k >= 0:
            top, left, ch, cw = _five_box(
                arr.shape[0], arr.shape[1], self.crop_ratio, k
            )
            arr = arr[top : top + ch, left : left + cw]
        if self.resolution is not None:
            h, w = _resized_size(arr.shape[0], arr.shape[1], self.resolution)
            arr = resize(np.ascontiguousarray(arr), (h, w))
            if self.crop == "center":
                r = self.resolution
                top, left = _center_box(h, w, r)
                arr = arr[top : top + r, left : left + r]
        return np.ascontiguousarray(arr)

    def _load_image(self, item: int) -> np.ndarray:
        f, k = self._file(item)
        return self._geometry(
            _read_image(self._images[f]),
            k,
            lambda img, size: _resize_image(
                img, size, getattr(self, "interpolation", "bilinear")
            ),
        )

    def _load_label(self, item: int) -> np.ndarray:
        f, k = self._file(item)
        path = self._labels[f]
        raw = _read_label(path)
        if self.label_fn is not None:
            raw = self.label_fn(raw)
        label = np.asarray(raw)
        if label.ndim != 2 or label.dtype.kind not in "iub":
            raise ValueError(
                f"label_fn must return a 2-D integer map; got dtype {label.dtype}, "
                f"shape {label.shape} for {path!r}."
            )
        return self._geometry(label.astype(np.int64, copy=False), k, _resize_label)

    # -- public helpers ----------------------------------------------------
    @property
    def paths(self) -> list[str]:
        return [self._images[self._file(i)[0]] for i in self._index.tolist()]

    @property
    def label_paths(self) -> list[str] | None:
        if self._labels is None:
            return None
        return [self._labels[self._file(i)[0]] for i in self._index.tolist()]

    @property
    def labels(self) -> LabelCollection | None:
        return None if self._labels is None else LabelCollection(self)

    @property
    def n_classes(self) -> int | None:
        """Number of classes (``len(classes)``), or None."""
        return None if self.classes is None else len(self.classes)

    def __repr__(self) -> str:
        parts = [f"{len(self)} images"]
        if self._labels is not None:
            parts.append("with labels")
        if self.classes is not None:
            parts.append(f"{len(self.classes)} classes")
        if self.resolution is not None:
            parts.append(f"resolution={self.resolution}")
            parts.append(f"crop={self.crop!r}")
            if self.interpolation != "bilinear":
                parts.append(f"interpolation={self.interpolation!r}")
        if self.five_crop:
            parts.append(f"five_crop (ratio {self.crop_ratio:g})")
        return f"ImageCollection({', '.join(parts)})"


class LabelCollection(Sequence):
    """Lazy label maps of an :class:`ImageCollection`, indexed like it.

    Obtained as ``coll.labels``. ``labels[i]`` reads label map ``i`` as an
    ``(H, W)`` int64 array (classes after ``label_fn``, ``-1`` = ignore), with
    the geometry of image ``i``; slices, integer arrays, boolean masks and
    lists give a new :class:`LabelCollection`. ``np.asarray(labels)`` and
    :meth:`stack` read all maps into one ``(N, H, W)`` array.

    Parameters
    ----------
    images : ImageCollection
        The collection whose label maps to expose; must have label files.

    Attributes
    ----------
    images : ImageCollection
        The collection.
    shape : tuple of int
        ``(len(labels),)``, the number of samples for scikit-learn.
    """

    def __init__(self, images: ImageCollection) -> None:
        if images._labels is None:
            raise ValueError("This ImageCollection has no label files.")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int]:
        return (len(self.images),)

    def __getitem__(self, key: Any) -> Any:
        coll = self.images
        sel = coll._select(key)
        if isinstance(sel, int):
            return coll._load_label(int(coll._index[sel]))
        return LabelCollection(coll._subset(coll._index[sel]))

    def __iter__(self) -> Iterator[np.ndarray]:
        for item in self.images._index.tolist():
            yield self.images._load_label(item)

    @property
    def paths(self) -> list[str]:
        return self.images.label_paths

    def stack(self) -> np.ndarray:
        """Read all label maps into one array.

        Returns
        -------
        labels : ndarray of shape (N, H, W), int64
            The maps, ``-1`` for ignored pixels.

        Raises
        ------
        ValueError
            When the maps differ in size (set ``resolution`` on the
            collection to give them one size).
        """
        maps = list(self)
        if not maps:
            raise ValueError("No label maps to stack (empty collection).")
        sizes = {m.shape for m in maps}
        if len(sizes) > 1:
            first = maps[0].shape
            j = next(j for j, m in enumerate(maps) if m.shape != first)
            paths = self.paths
            raise ValueError(
                f"Label maps differ in size ({sorted(sizes)}): {paths[0]!r} is "
                f"{first}, {paths[j]!r} is {maps[j].shape}. Set resolution= on "
                "the collection to give them one size, or index them one by one."
            )
        return np.stack(maps)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.stack()
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"LabelCollection({len(self)} label maps)"
