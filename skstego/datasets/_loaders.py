"""Loaders for the dataset layouts of STEGO (COCO-Stuff-27, Cityscapes-27,
Potsdam-3) and for any image folder.

Each loader returns an :class:`~skstego.datasets.ImageCollection` whose label
maps are already the coarse classes (``-1`` = ignore), with ``classes`` (names)
and ``palette`` (colours) set. Nothing is read but directory listings and split
lists: images and labels are read when indexed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._collection import ImageCollection

__all__ = [
    "CITYSCAPES27_CLASSES",
    "COCOSTUFF27_CLASSES",
    "COCOSTUFF27_FINE_TO_COARSE",
    "COCOSTUFF27_LISTS",
    "POTSDAM3_CLASSES",
    "LabelRemap",
    "load_cityscapes27",
    "load_cocostuff27",
    "load_image_folder",
    "load_potsdam3",
]

_IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".mat",
)


# --------------------------------------------------------------------------
# label remapping
# --------------------------------------------------------------------------
class LabelRemap:
    """Picklable lookup table from stored label values to classes.

    Values ``v`` with ``0 <= v < len(table)`` become ``table[v]``; every other
    value becomes ``-1`` (ignore).

    Parameters
    ----------
    table : array-like of int
        Class of each stored value, ``-1`` for ignored values.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.datasets import LabelRemap
    >>> LabelRemap([5, -1, 7])(np.array([[0, 1], [2, 255]]))
    array([[ 5, -1],
           [ 7, -1]])
    """

    def __init__(self, table: Sequence[int]) -> None:
        self.table = np.asarray(table, dtype=np.int64)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.dtype.kind == "f":
            raw = np.rint(np.nan_to_num(raw, nan=-1.0))
        raw = raw.astype(np.int64)
        valid = (raw >= 0) & (raw < len(self.table))
        out = np.full(raw.shape, -1, dtype=np.int64)
        out[valid] = self.table[raw[valid]]
        return out

    def __repr__(self) -> str:
        return f"LabelRemap(<{len(self.table)} values>)"


def _table(groups: Sequence[Sequence[int]], size: int) -> np.ndarray:
    """Lookup table: value ``v`` in ``groups[c]`` maps to class ``c``."""
    table = np.full(size, -1, dtype=np.int64)
    for c, values in enumerate(groups):
        for v in values:
            if table[v] != -1:
                raise AssertionError(f"value {v} in two groups")  # pragma: no cover
            table[v] = c
    return table


def _r(a: int, b: int) -> list[int]:
    return list(range(a, b + 1))


# COCO-Stuff-27 (the COCO-Stuff hierarchy; src/data.py of mhamilton723/STEGO):
# coarse class -> (name, fine COCO-Stuff ids)
_COCOSTUFF27 = (
    ("electronic", _r(71, 76)),
    ("appliance", _r(77, 82)),
    ("food (thing)", _r(51, 60)),
    ("furniture (thing)", _r(61, 70)),
    ("indoor", _r(83, 90)),
    ("kitchen", _r(43, 50)),
    ("accessory", _r(25, 32)),
    ("animal", _r(15, 24)),
    ("outdoor", _r(9, 14)),
    ("person", [0]),
    ("sports", _r(33, 42)),
    ("vehicle", _r(1, 8)),
    ("ceiling", [101, 102]),
    ("floor", [100, *_r(113, 117)]),
    ("food (stuff)", [120, 121, 152, 169]),
    (
        "furniture (stuff)",
        [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164],
    ),
    ("rawmaterial", [99, 131, 138, 142]),
    ("textile", [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167]),
    ("wall", _r(170, 176)),
    ("window", [179, 180]),
    ("building", [94, 95, 127, 150, 157, 165]),
    ("ground", [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158]),
    ("plant", [93, 96, 118, 123, 128, 133, 141, 162, 168]),
    ("sky", [105, 156]),
    ("solid", [126, 134, 149, 159, 161, 181]),
    ("structural", [98, 112, 137, 145, 163]),
    ("water", [119, 147, 154, 177, 178]),
)
#: Names of the 27 coarse COCO-Stuff classes, in class-id order.
COCOSTUFF27_CLASSES: list[str] = [name for name, _ in _COCOSTUFF27]

#: The reference's curated image list of each split (``src/data.py`` of
#: mhamilton723/STEGO: the full list for training, the IIC subset ``_7``
#: for evaluation).
COCOSTUFF27_LISTS: dict[str, str] = {
    "train": "Coco164kFull_Stuff_Coarse.txt",
    "val": "Coco164kFull_Stuff_Coarse_7.txt",
}
#: Coarse class of each fine COCO-Stuff id 0-181 (index = fine id).
COCOSTUFF27_FINE_TO_COARSE: np.ndarray = _table([ids for _, ids in _COCOSTUFF27], 182)
COCOSTUFF27_FINE_TO_COARSE.flags.writeable = False

#: Names of the 27 Cityscapes classes (labelIds 7 to 33), in class-id order.
CITYSCAPES27_CLASSES: list[str] = [
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
]
# the official Cityscapes colours of labelIds 7..33
_CITYSCAPES27_PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (250, 170, 160),
        (230, 150, 140),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (180, 165, 180),
        (150, 100, 100),
        (150, 120, 90),
        (153, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 0, 90),
        (0, 0, 110),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=np.uint8,
)
# labelId - 7 for labelIds 7..33, else ignore
_CITYSCAPES27_TABLE = np.array([-1] * 7 + list(range(27)), dtype=np.int64)

#: Names of the 3 Potsdam classes, in class-id order.
POTSDAM3_CLASSES: list[str] = [
    "roads and cars",
    "buildings and clutter",
    "trees and vegetation",
]
_POTSDAM3_TABLE = _table([[0, 4], [1, 5], [2, 3]], 6)
_POTSDAM3_PALETTE = np.array(
    [(128, 128, 128), (0, 0, 255), (0, 160, 0)], dtype=np.uint8
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Expected the {what} directory {path!r}; not found.")


def _check_root(root: Any) -> str:
    root = os.fspath(root)
    if os.path.isfile(root):
        raise NotADirectoryError(
            f"Dataset root {root!r} is a file, not a directory; pass the "
            "dataset's folder "
            "(the one holding its image folders)."
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Dataset root {root!r} is not a directory: it does not exist; "
            "check the path (it is "
            f"resolved from {os.getcwd()!r} when relative)."
        )
    return root


def _read_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _images_in(folder: str) -> list[str]:
    names = sorted(
        n
        for n in os.listdir(folder)
        if n.lower().endswith(_IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, n))
    )
    return [os.path.join(folder, n) for n in names]


def _collection(
    images: list[str],
    labels: list[str] | None,
    *,
    where: str,
    label_fn: Any,
    classes: list[str],
    palette: Any,
    kwargs: dict[str, Any],
) -> ImageCollection:
    if not images:
        raise FileNotFoundError(_no_images(where))
    for key in ("label_fn", "classes", "palette"):
        if key in kwargs:
            raise TypeError(f"This loader sets {key} itself; do not pass it.")
    return ImageCollection(
        images, labels, label_fn=label_fn, classes=classes, palette=palette, **kwargs
    )


# --------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------
def load_cocostuff27(
    root: str | os.PathLike,
    split: str = "val",
    *,
    curated: bool | str = "auto",
    curated_list: str | os.PathLike | None = None,
    **collection_kwargs: Any,
) -> ImageCollection:
    """COCO-Stuff-27: COCO-Stuff images with 27 coarse classes.

    Layout (as STEGO's)::

        root/images/{train2017,val2017}/ID.jpg
        root/annotations/{train2017,val2017}/ID.png      fine ids 0-181, 255
        root/curated/train2017/Coco164kFull_Stuff_Coarse.txt
        root/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt

    The image lists are those of the reference implementation
    (``src/data.py`` of mhamilton723/STEGO): it trains on the full curated
    list ``Coco164kFull_Stuff_Coarse.txt`` and evaluates on the IIC subset
    ``Coco164kFull_Stuff_Coarse_7.txt`` of ``val2017``, the image set of every
    COCO-Stuff-27 number in the STEGO paper.

    The 182 fine COCO-Stuff ids map to 27 coarse classes by the COCO-Stuff
    category hierarchy (:data:`COCOSTUFF27_FINE_TO_COARSE`); 255 (unlabeled)
    and any value above 181 are ignored (``-1``).

    Parameters
    ----------
    root : str or path-like
        The ``cocostuff`` directory.
    split : {"val", "train"}, default="val"
        Which ``{split}2017`` folders to read.
    curated : bool or "auto", default="auto"
        Use the reference's curated image list of the split (one ID a line):
        ``Coco164kFull_Stuff_Coarse_7.txt`` for ``"val"``,
        ``Coco164kFull_Stuff_Coarse.txt`` for ``"train"``. ``"auto"`` uses it
        when it exists and otherwise lists every image of the split with a
        warning (such scores are not comparable with STEGO's); ``True``
        requires it; ``False`` lists every image of the split.
    curated_list : str or path-like, optional
        Another list: a file name in ``root/curated/{split}2017`` (e.g.
        ``"Coco164kFull_Stuff_Coarse.txt"``, the full curated validation list)
        or a path. Implies ``curated=True``.
    **collection_kwargs
        ``resolution``, ``crop``, ``interpolation``, ``five_crop``, ``crop_ratio`` of
        :class:`ImageCollection`.

    Returns
    -------
    ImageCollection
        Images with label maps in ``[0, 27)`` or ``-1``, ``classes`` (27
        names) and ``palette``. Labels are ``None`` when the annotation
        directory is absent.

    Examples
    --------
    >>> from skstego.datasets import COCOSTUFF27_CLASSES, COCOSTUFF27_FINE_TO_COARSE
    >>> len(COCOSTUFF27_CLASSES), COCOSTUFF27_CLASSES[9]
    (27, 'person')
    >>> int(COCOSTUFF27_FINE_TO_COARSE[0]), int(COCOSTUFF27_FINE_TO_COARSE[156])
    (9, 23)
    """
    root = _check_root(root)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    folder = f"{split}2017"
    img_dir = os.path.join(root, "images", folder)
    _require_dir(img_dir, f"COCO-Stuff {split} image")
    ann_dir = os.path.join(root, "annotations", folder)
    if curated_list is not None:
        curated = True
        name = os.fspath(curated_list)
        list_path = (
            name
            if os.path.dirname(name)
            else os.path.join(root, "curated", folder, name)
        )
    else:
        list_path = os.path.join(root, "curated", folder, COCOSTUFF27_LISTS[split])
    if curated not in (True, False, "auto"):
        raise ValueError(f"curated must be True, False or 'auto', got {curated!r}.")
    use_list = curated is True or (curated == "auto" and os.path.isfile(list_path))
    if curated == "auto" and not use_list:
        warnings.warn(
            f"COCO-Stuff-27: the reference image list {list_path!r} is missing, "
            f"so every image of {img_dir!r} is used; STEGO's {split} numbers are "
            "on that list (download the curated lists, or pass curated=False "
            "to silence this warning).",
            UserWarning,
            stacklevel=2,
        )
    if use_list:
        if not os.path.isfile(list_path):
            raise FileNotFoundError(
                f"Curated image list {list_path!r} not found; pass curated=False "
                "to use every image of the split."
            )
        ids = _read_list(list_path)
        images = [os.path.join(img_dir, f"{i}.jpg") for i in ids]
    else:
        images = _images_in(img_dir)
        ids = [os.path.splitext(os.path.basename(p))[0] for p in images]
    labels = (
        [os.path.join(ann_dir, f"{i}.png") for i in ids]
        if os.path.isdir(ann_dir)
        else None
    )
    return _collection(
        images,
        labels,
        where=list_path if use_list else img_dir,
        label_fn=LabelRemap(COCOSTUFF27_FINE_TO_COARSE),
        classes=COCOSTUFF27_CLASSES,
        palette=None,
        kwargs=collection_kwargs,
    )


def load_cityscapes27(
    root: str | os.PathLike, split: str = "val", **collection_kwargs: Any
) -> ImageCollection:
    """Cityscapes-27: Cityscapes with the 27 classes of labelIds 7..33.

    Layout (the official one)::

        root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png
        root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png

    Class ``labelId - 7`` for labelIds 7..33; every other labelId (void
    classes, license plate) is ignored (``-1``).

    Parameters
    ----------
    root : str or path-like
        The ``cityscapes`` directory.
    split : str, default="val"
        ``"train"``, ``"val"`` or ``"test"`` (a folder of ``leftImg8bit``).
    **collection_kwargs
        ``resolution``, ``crop``, ``interpolation``, ``five_crop``, ``crop_ratio`` of
        :class:`ImageCollection`.

    Returns
    -------
    ImageCollection
        Images sorted by city and name, label maps in ``[0, 27)`` or ``-1``
        (``None`` when ``gtFine/{split}`` is absent), ``classes`` and the
        official Cityscapes ``palette``.

    Examples
    --------
    >>> from skstego.datasets import CITYSCAPES27_CLASSES
    >>> CITYSCAPES27_CLASSES[0], CITYSCAPES27_CLASSES[-1]
    ('road', 'bicycle')
    """
    root = _check_root(root)
    img_root = os.path.join(root, "leftImg8bit", split)
    _require_dir(img_root, f"Cityscapes {split} image")
    gt_root = os.path.join(root, "gtFine", split)
    has_gt = os.path.isdir(gt_root)
    suffix = "_leftImg8bit.png"
    images, labels = [], []
    for city in sorted(os.listdir(img_root)):
        city_dir = os.path.join(img_root, city)
        if not os.path.isdir(city_dir):
            continue
        for name in sorted(os.listdir(city_dir)):
            if not name.endswith(suffix):
                continue
            images.append(os.path.join(city_dir, name))
            stem = name[: -len(suffix)]
            labels.append(os.path.join(gt_root, city, f"{stem}_gtFine_labelIds.png"))
    return _collection(
        images,
        labels if has_gt else None,
        where=img_root,
        label_fn=LabelRemap(_CITYSCAPES27_TABLE),
        classes=CITYSCAPES27_CLASSES,
        palette=_CITYSCAPES27_PALETTE,
        kwargs=collection_kwargs,
    )


def load_potsdam3(
    root: str | os.PathLike, split: str = "labelled_test", **collection_kwargs: Any
) -> ImageCollection:
    """Potsdam-3: ISPRS Potsdam tiles with 3 coarse classes, as STEGO uses.

    Layout::

        root/imgs/ID.mat        key "img", (H, W, 4): RGB + infrared
        root/gt/ID.mat          key "gt", (H, W): fine classes 0-5, 255
        root/{split}.txt        one ID a line

    The infrared channel is dropped. Fine classes 0, 4 -> 0 ("roads and
    cars"); 1, 5 -> 1 ("buildings and clutter"); 2, 3 -> 2 ("trees and
    vegetation"); 255 and any other value -> ``-1``.

    Parameters
    ----------
    root : str or path-like
        The ``potsdam`` directory.
    split : str, default="labelled_test"
        Name of the split list: ``"labelled_train"``, ``"labelled_test"``,
        ``"unlabelled_train"``, ``"all"``. STEGO's ``"train"`` is
        ``"labelled_train"`` and its ``"val"`` ``"labelled_test"``.
    **collection_kwargs
        ``resolution``, ``crop``, ``interpolation``, ``five_crop``, ``crop_ratio`` of
        :class:`ImageCollection`.

    Returns
    -------
    ImageCollection
        Images (3 channels) with label maps in ``[0, 3)`` or ``-1``;
        labels are ``None`` when some tile of the split has no ``gt`` file
        (unlabelled splits). ``classes`` and ``palette`` set.

    Examples
    --------
    >>> from skstego.datasets import POTSDAM3_CLASSES
    >>> POTSDAM3_CLASSES
    ['roads and cars', 'buildings and clutter', 'trees and vegetation']
    """
    root = _check_root(root)
    img_dir = os.path.join(root, "imgs")
    _require_dir(img_dir, "Potsdam image (.mat)")
    list_path = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(list_path):
        found = sorted(n[:-4] for n in os.listdir(root) if n.endswith(".txt"))
        raise FileNotFoundError(
            f"Split list {list_path!r} not found (splits in {root!r}: {found})."
        )
    ids = _read_list(list_path)
    ids = [i[:-4] if i.endswith(".mat") else i for i in ids]
    images = [os.path.join(img_dir, f"{i}.mat") for i in ids]
    labels = [os.path.join(root, "gt", f"{i}.mat") for i in ids]
    has_gt = bool(labels) and all(os.path.isfile(p) for p in labels)
    return _collection(
        images,
        labels if has_gt else None,
        where=list_path,
        label_fn=LabelRemap(_POTSDAM3_TABLE),
        classes=POTSDAM3_CLASSES,
        palette=_POTSDAM3_PALETTE,
        kwargs=collection_kwargs,
    )


def load_image_folder(
    root: str | os.PathLike,
    split: str = "val",
    *,
    classes: Sequence[str] | None = None,
    palette: Any = None,
    **collection_kwargs: Any,
) -> ImageCollection:
    """Any image folder: ``imgs/{split}`` and optional ``labels/{split}``.

    Layout (STEGO's "directory" dataset)::

        root/imgs/{split}/NAME.jpg           any image format PIL reads, or .mat
        root/labels/{split}/NAME.png         optional, same stem as the image

    Label values are kept as stored, except 255 (and negative values in
    ``.mat`` labels), which mean ignore (``-1``).

    Parameters
    ----------
    root : str or path-like
        The dataset directory.
    split : str, default="val"
        Sub-folder of ``imgs`` (and ``labels``).
    classes : list of str, optional
        Class names, class ``c`` in position ``c``.
    palette : array-like of shape (n_classes, 3), optional
        Class colours; a default palette when ``classes`` is given.
    **collection_kwargs
        ``resolution``, ``crop``, ``interpolation``, ``five_crop``, ``crop_ratio`` of
        :class:`ImageCollection`.

    Returns
    -------
    ImageCollection
        Images sorted by file name, with label maps when ``labels/{split}``
        exists (then every image needs its label file).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skstego.datasets import load_image_folder
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(root, "imgs", "val"))
    >>> os.makedirs(os.path.join(root, "labels", "val"))
    >>> Image.new("RGB", (8, 6)).save(os.path.join(root, "imgs", "val", "a.jpg"))
    >>> label = np.array([[0, 1, 255]], dtype=np.uint8).repeat(6, 0).repeat(3, 1)
    >>> Image.fromarray(label).save(os.path.join(root, "labels", "val", "a.png"))
    >>> coll = load_image_folder(root, classes=["ground", "sky"])
    >>> coll[0].shape, coll.labels[0][0]
    ((6, 8, 3), array([ 0,  0,  0,  1,  1,  1, -1, -1, -1]))
    """
    root = _check_root(root)
    img_dir = os.path.join(root, "imgs", split)
    _require_dir(img_dir, f"image ({split!r} split)")
    images = _images_in(img_dir)
    label_dir = os.path.join(root, "labels", split)
    labels = None
    if os.path.isdir(label_dir):
        labels = []
        for p in images:
            stem = os.path.splitext(os.path.basename(p))[0]
            path = os.path.join(label_dir, f"{stem}.png")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Label file {path!r} of image {p!r} not found."
                )
            labels.append(path)
    return ImageCollection(
        _nonempty(images, img_dir),
        labels,
        label_fn=_KeepBut255(),
        classes=classes,
        palette=palette,
        **collection_kwargs,
    )


class _KeepBut255:
    """Label values as stored; 255 and negative values -> -1 (picklable)."""

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.dtype.kind == "f":
            raw = np.rint(raw)
        out = raw.astype(np.int64)
        out[(out == 255) | (out < 0)] = -1
        return out


def _nonempty(images: list[str], where: str) -> list[str]:
    if not images:
        raise FileNotFoundError(_no_images(where))
    return images


def _no_images(where: str) -> str:
    """Why a folder that exists gave no images: empty, or other files only."""
    if os.path.isfile(where):
        return (
            f"No images: the image list {where!r} is empty; restore "
            "it from the dataset's download."
        )
    try:
        entries = os.listdir(where) if os.path.isdir(where) else []
    except OSError:
        entries = []
    if not entries:
        return (
            f"No images in {where!r}: the folder exists but is empty; put "
            "the dataset's images there (or pass the split that holds them)."
        )
    shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    return (
        f"No images found in {where!r}: it holds {len(entries)} entries "
        f"({shown}) but no image files ({', '.join(_IMAGE_EXTENSIONS)})."
    )
