"""A chunked on-disk store of feature maps (zarr), written resumably, read lazily.

:meth:`DinoFeaturizer.transform_to_store` writes ``(N, C, h, w)`` feature maps
into a zarr group, chunk of images by chunk of images, marking each chunk done
once written, so that a rerun after an interruption computes only the chunks
not yet done. With ``client=`` (a ``distributed.Client``) the unfinished
chunks are tasks on the Dask cluster's workers (:func:`write_chunk` in each),
which write straight into the shared store: a zarr chunk is the unit of work,
so writes never overlap. :class:`FeatureStore` opens such a store read-only; the
reducers and probes that stream (``TorchPCA.fit`` / ``partial_fit``,
``KMeansProbe.fit``) read it chunk by chunk, never as a whole.

Layout of the group: the array ``features`` (N, C, h, w), float16 or float32,
chunked ``(chunk_images, C, h, w)``; the array ``done`` (n_chunks,) of bool,
one marker per chunk (each in its own storage object, written after the
chunk's features); attributes ``skstego_feature_store`` (format version),
``featurizer`` (the featurizer's JSON-able parameters), ``images`` (file paths
when the source has them, else None), ``n_images``, ``chunk_images``,
``dtype``, and ``complete``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FeatureStore"]

#: Version of the store layout written by :func:`write_store`.
STORE_VERSION = 1

#: Featurizer parameters that change the features (a rerun must match them).
_IDENTITY_PARAMS = (
    "model",
    "pretrained",
    "weights",
    "resolution",
    "crop",
    "layer",
    "precision",
    "interpolation",
    "mean",
    "std",
)

#: Values of identity parameters that stores written before them mean.
_IDENTITY_DEFAULTS = {"interpolation": "bilinear", "mean": None, "std": None}


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Feature stores need the zarr package (version 3 or later): "
            "pip install skstego[store]"
        ) from exc
    return zarr


class FeatureStore:
    """Feature maps in a chunked zarr store on disk, opened read-only, lazily.

    Written by :meth:`DinoFeaturizer.transform_to_store
    <skstego.features.DinoFeaturizer.transform_to_store>`. Nothing is read
    until it is indexed: ``store[a:b]`` (or an int, or an array of image
    indices) reads those images' maps and returns them as float32 NumPy,
    whatever the storage dtype. :class:`~skstego.projection.TorchPCA`
    (``fit``, ``partial_fit``) and :class:`~skstego.probes.KMeansProbe`
    (``fit``) accept a store wherever they accept an array and read it chunk
    by chunk, with the next chunk prefetched in a background thread; other
    estimators load it as a whole (through ``np.asarray``, with a warning).

    Parameters
    ----------
    path : str or path-like
        Directory of the store.

    Attributes
    ----------
    shape : tuple of int
        ``(N, C, h, w)``.
    dtype : numpy.dtype
        float32: the dtype of what indexing returns.
    storage_dtype : numpy.dtype
        float16 or float32: the dtype on disk.
    ndim : int
        4.
    chunks : tuple of int
        ``(chunk_images, C, h, w)``: the storage chunks, read whole by the
        estimators that stream the store.
    attrs : dict
        The store's metadata: ``featurizer`` (parameters), ``images`` (paths
        or None), ``n_images``, ``chunk_images``, ``dtype``, ``complete``.
    path : pathlib.Path
        The store's directory.

    Raises
    ------
    FileNotFoundError
        If ``path`` holds no feature store.
    ValueError
        If the store is incomplete (an interrupted write: rerun
        ``transform_to_store`` with the same arguments to finish it).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> import timm
    >>> from skstego import DinoFeaturizer
    >>> from skstego.features import FeatureStore
    >>> vit = timm.models.VisionTransformer(
    ...     img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    ... )
    >>> images = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    >>> featurizer = DinoFeaturizer(vit, resolution=32, device="cpu")
    >>> path = tempfile.mkdtemp() + "/features.zarr"
    >>> store = featurizer.transform_to_store(images, path, chunk_images=2)
    >>> store = FeatureStore(path)
    >>> store.shape, store.storage_dtype, store[1:3].dtype
    ((5, 16, 4, 4), dtype('float16'), dtype('float32'))
    """

    _skstego_lazy = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        group = _open_group(self.path, mode="r")
        if group is None or "features" not in group:
            raise FileNotFoundError(
                f"{str(path)!r} holds no skstego feature store; write one with "
                "DinoFeaturizer(...).transform_to_store(images, path)."
            )
        attrs = dict(group.attrs)
        if not attrs.get("complete", False):
            done = int(np.asarray(group["done"][:]).sum())
            raise ValueError(
                f"The feature store {str(path)!r} is incomplete ({done} of "
                f"{group['done'].shape[0]} chunks written): its write was "
                "interrupted. Rerun transform_to_store with the same images and "
                "featurizer to finish it (finished chunks are not recomputed)."
            )
        self._array = group["features"]
        self.attrs = attrs
        self.shape = tuple(int(s) for s in self._array.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)
        self.storage_dtype = np.dtype(str(attrs["dtype"]))
        #: Storage chunks, as zarr says: ``(chunk_images, C, h, w)``.
        self.chunks = (int(attrs["chunk_images"]), *self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, shape={self.shape}, "
            f"storage_dtype={self.storage_dtype})"
        )

    def __getitem__(self, key: Any) -> np.ndarray:
        """Read images' maps: an int, a slice, or an int array/list of indices."""
        if isinstance(key, tuple):
            first, rest = key[0], key[1:]
        else:
            first, rest = key, ()
        if isinstance(first, (slice, int, np.integer)):
            data = self._array[(first, *rest)]
        else:
            idx = np.asarray(first)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            if idx.ndim != 1 or idx.dtype.kind not in "iu":
                raise IndexError(
                    "FeatureStore indices must be an int, a slice, or a 1-D array "
                    f"of ints or bools; got {first!r}."
                )
            idx = np.where(idx < 0, idx + self.shape[0], idx)
            if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
                raise IndexError(
                    f"index out of range for a store of {self.shape[0]} images."
                )
            order = np.argsort(idx, kind="stable")
            uniq, inverse = np.unique(idx[order], return_inverse=True)
            read = self._array.get_orthogonal_selection(
                (uniq, *[slice(None)] * (self.ndim - 1))
            )
            data = np.empty((len(idx), *read.shape[1:]), dtype=read.dtype)
            data[order] = read[inverse]
            if rest:
                data = data[(slice(None), *rest)]
        return np.asarray(data, dtype=np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Load the whole store into memory (warns: use slices to stream)."""
        warnings.warn(
            f"Loading the whole feature store {str(self.path)!r} "
            f"({np.prod(self.shape) * 4 / 2**20:.0f} MiB as float32) into memory; "
            "index it by slices, or pass the store itself to TorchPCA / "
            "KMeansProbe.fit, to read it chunk by chunk.",
            stacklevel=2,
        )
        data = self[:]
        return data if dtype is None else data.astype(dtype, copy=False)

    def to_dask(self) -> Any:
        """The store as a lazy dask array (float32), one block per zarr chunk.

        Returns
        -------
        dask.array.Array

        Raises
        ------
        ImportError
            If dask is not installed (``pip install skstego[store]``).
        """
        try:
            import dask.array as da
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "FeatureStore.to_dask needs dask: pip install skstego[store]"
            ) from exc
        chunks = (int(self.attrs["chunk_images"]), *self.shape[1:])
        return da.from_array(
            self, chunks=chunks, asarray=False, meta=np.empty((0,) * 4, np.float32)
        )


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _open_group(path: Path, mode: str) -> Any:
    zarr = _zarr()
    if not path.exists():
        return None
    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    except Exception as exc:  # zarr's own "no group here" errors
        if type(exc).__name__ in ("GroupNotFoundError", "NodeTypeValidationError"):
            return None
        raise


def featurizer_record(featurizer: Any) -> dict:
    """The featurizer's parameters as JSON (a module ``model`` by class name)."""
    record = {}
    for name, value in featurizer.get_params(deep=False).items():
        if name == "model" and not isinstance(value, str):
            value = f"<module {type(value).__module__}.{type(value).__qualname__}>"
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, (tuple, list)):
            value = [float(v) for v in value]  # mean / std
        elif not isinstance(value, (str, int, float, bool, type(None))):
            value = str(value)  # e.g. a torch.device
        record[name] = value
    return record


def image_record(images: Any) -> list[str] | None:
    """File paths of an image source when it has them, else None."""
    paths = getattr(images, "paths", None)
    if paths is not None and not callable(paths):
        try:
            if len(paths) == len(images):
                return [os.fspath(p) for p in paths]
        except TypeError:
            pass
    if isinstance(images, (list, tuple)) and all(
        isinstance(p, (str, os.PathLike)) for p in images
    ):
        return [os.fspath(p) for p in images]
    return None


class _Subset:
    """Images ``start:stop`` of a sequence, without reading any of them."""

    def __init__(self, images: Any, start: int, stop: int) -> None:
        self.images, self.start, self.stop = images, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.images[self.start + i]


def _check_matches(group: Any, expected: dict, path: Path) -> None:
    attrs = dict(group.attrs)
    problems = []
    old = attrs.get("featurizer", {})
    for name in _IDENTITY_PARAMS:
        there = old.get(name, _IDENTITY_DEFAULTS.get(name))
        if there != expected["featurizer"].get(name):
            problems.append(
                f"featurizer {name}={there!r} there, "
                f"{expected['featurizer'].get(name)!r} now"
            )
    for name in ("n_images", "images", "chunk_images", "dtype"):
        if attrs.get(name) != expected[name]:
            shown = (
                "a different image list"
                if name == "images"
                else f"{name}={attrs.get(name)!r} there, {expected[name]!r} now"
            )
            problems.append(shown)
    if problems:
        raise ValueError(
            f"The feature store {str(path)!r} was written with other settings "
            f"({'; '.join(problems)}). Pass overwrite=True to replace it, or "
            "another path."
        )


def write_store(
    featurizer: Any,
    images: Any,
    path: str | os.PathLike,
    *,
    dtype: str,
    chunk_images: int,
    overwrite: bool,
    client: Any = None,
) -> FeatureStore:
    """Implementation of :meth:`DinoFeaturizer.transform_to_store`."""
    zarr = _zarr()
    if client is not None:
        _check_client(client)
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32'; got {dtype!r}.")
    if isinstance(chunk_images, bool) or not isinstance(
        chunk_images, (int, np.integer)
    ):
        raise TypeError(f"chunk_images must be an int; got {chunk_images!r}.")
    if chunk_images < 1:
        raise ValueError(f"chunk_images must be >= 1; got {chunk_images}.")
    if isinstance(images, (str, os.PathLike)) or not hasattr(images, "__len__"):
        raise ValueError(
            "Expected images as an (N, H, W, 3) uint8 array, an (N, 3, H, W) "
            "tensor or a sequence of images (paths, PIL images, arrays); got "
            f"{type(images).__name__}."
        )
    path = Path(path)
    n = len(images)
    if n == 0:
        raise ValueError("Found no images (an empty sequence).")
    featurizer._validate_params()
    chunk_images = int(chunk_images)
    expected = {
        "skstego_feature_store": STORE_VERSION,
        "featurizer": featurizer_record(featurizer),
        "images": image_record(images),
        "n_images": n,
        "chunk_images": chunk_images,
        "dtype": dtype,
    }
    n_chunks = -(-n // chunk_images)
    group = _open_group(path, mode="r+")
    if group is None and path.exists() and (path.is_file() or any(path.iterdir())):
        raise ValueError(
            f"{str(path)!r} exists and is not a feature store (nothing there is "
            "deleted); choose another path."
        )
    if group is not None and overwrite:
        group = None
    if group is not None:
        _check_matches(group, expected, path)
        done = np.asarray(group["done"][:], dtype=bool)
    else:
        group = zarr.open_group(str(path), mode="w")
        group.attrs.update({**expected, "complete": False})
        group.create_array(
            "done", shape=(n_chunks,), chunks=(1,), dtype="bool", fill_value=False
        )
        done = np.zeros(n_chunks, dtype=bool)
    if client is not None:
        _write_on_cluster(
            client,
            featurizer,
            images,
            path,
            done,
            n=n,
            chunk_images=chunk_images,
            dtype=dtype,
            features_exist="features" in group,
        )
        group.attrs["complete"] = True
        return FeatureStore(path)
    is_batch = _is_batch(images)
    for i in np.flatnonzero(~done):
        start, stop = i * chunk_images, min(n, (i + 1) * chunk_images)
        part = images[start:stop] if is_batch else _Subset(images, start, stop)
        write_chunk(featurizer, part, path, int(i), n, chunk_images, dtype, group)
    group.attrs["complete"] = True
    return FeatureStore(path)


def _is_batch(images: Any) -> bool:
    return isinstance(images, np.ndarray) or type(images).__module__ == "torch"


def write_chunk(
    featurizer: Any,
    part: Any,
    path: Path,
    i: int,
    n: int,
    chunk_images: int,
    dtype: str,
    group: Any = None,
) -> tuple[int, int]:
    """Featurize chunk ``i`` (images ``part``), write it, then mark it done.

    Runs in the calling process, or in a Dask worker on the cluster path
    (``group`` None: the store is opened there). Creates the ``features``
    array if the store has none yet (the cluster path runs that chunk alone).
    Returns ``(i, process id)``.
    """
    if group is None:
        group = _zarr().open_group(str(path), mode="r+")
    start, stop = i * chunk_images, min(n, (i + 1) * chunk_images)
    maps = featurizer.transform(part)
    maps = maps.detach().cpu().numpy() if hasattr(maps, "detach") else maps
    if "features" not in group:
        array = group.create_array(
            "features",
            shape=(n, *maps.shape[1:]),
            chunks=(chunk_images, *maps.shape[1:]),
            dtype=dtype,
            fill_value=0.0,
        )
    else:
        array = group["features"]
    if tuple(array.shape[1:]) != tuple(maps.shape[1:]):
        raise ValueError(
            f"Images {start}:{stop} give feature maps of shape "
            f"{tuple(maps.shape[1:])}, but the store holds maps of shape "
            f"{tuple(array.shape[1:])}; with crop='none' all images must give "
            "maps of one size."
        )
    array[start:stop] = maps.astype(dtype)
    group["done"][int(i)] = True
    return int(i), os.getpid()


def _cluster_chunk(
    featurizer: Any,
    images: Any,
    path: str,
    i: int,
    n: int,
    chunk_images: int,
    dtype: str,
) -> tuple[int, int]:
    """A Dask task: one chunk, written by the worker into the shared store.

    ``featurizer`` arrives once per worker (scattered with ``broadcast``), so
    its backbone is built once per worker process (the featurizer's
    module-level cache) and reused by every chunk the worker writes.
    ``images`` is either the chunk's own images or the whole (scattered)
    lazy source.
    """
    start, stop = i * chunk_images, min(n, (i + 1) * chunk_images)
    if isinstance(images, _Whole):
        images = images.source
        part = images[start:stop] if _is_batch(images) else _Subset(images, start, stop)
    else:
        part = images
    return write_chunk(featurizer, part, Path(path), i, n, chunk_images, dtype)


class _Whole:
    """Marks a lazy image source sent once to every worker (not one chunk)."""

    def __init__(self, source: Any) -> None:
        self.source = source


def _check_client(client: Any) -> None:
    if not all(hasattr(client, name) for name in ("submit", "scatter", "gather")):
        raise TypeError(
            "client must be a dask.distributed.Client (connected to the cluster "
            f"whose workers write the store); got {type(client).__name__}."
        )


def _write_on_cluster(
    client: Any,
    featurizer: Any,
    images: Any,
    path: Path,
    done: np.ndarray,
    *,
    n: int,
    chunk_images: int,
    dtype: str,
    features_exist: bool,
) -> None:
    """Featurize the unfinished chunks on the workers of a Dask ``client``.

    A zarr chunk is the unit of work, so no two tasks write one storage
    object. The featurizer (without progress bars) is scattered to every
    worker once; lists of paths are sent chunk by chunk, other lazy sources
    once per worker, array batches chunk by chunk. If the store has no
    ``features`` array yet, its first unfinished chunk runs first, alone, and
    creates it. Every task runs to its end even if another fails; then the
    first failure is raised (the chunks written stay done, for a rerun).
    """
    import uuid

    from sklearn.base import clone

    todo = [int(i) for i in np.flatnonzero(~done)]
    if not todo:
        return
    worker_featurizer = clone(featurizer).set_params(verbose=False)
    (featurizer_future,) = client.scatter(
        [worker_featurizer], broadcast=True, hash=False
    )
    is_list = isinstance(images, (list, tuple))
    if is_list or _is_batch(images):
        whole = None
    else:
        (whole,) = client.scatter([_Whole(images)], broadcast=True, hash=False)
    token = uuid.uuid4().hex[:8]
    where = str(path.resolve())
    progress = None
    if featurizer.verbose:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(todo), desc="featurize (chunks)", unit="chunk")

    def submit(i: int) -> Any:
        start, stop = i * chunk_images, min(n, (i + 1) * chunk_images)
        if whole is not None:
            part = whole
        elif is_list:
            part = list(images[start:stop])
        else:
            part = images[start:stop]
        return client.submit(
            _cluster_chunk,
            featurizer_future,
            part,
            where,
            i,
            n,
            chunk_images,
            dtype,
            key=f"skstego-chunk-{token}-{i}",
            pure=False,
        )

    errors: list[tuple[int, BaseException]] = []
    try:
        if not features_exist:  # the first chunk creates the array, alone
            first = todo.pop(0)
            _collect([submit(first)], errors, progress)
            if errors:
                todo = []
        _collect([submit(i) for i in todo], errors, progress)
    finally:
        if progress is not None:
            progress.close()
    if errors:
        i, exc = min(errors, key=lambda item: item[0])
        raise RuntimeError(
            f"{len(errors)} chunk(s) of the feature store {str(path)!r} failed on "
            f"the cluster (first: chunk {i}, images {i * chunk_images}:"
            f"{min(n, (i + 1) * chunk_images)}: {type(exc).__name__}: {exc}). "
            "The other chunks are written; fix the cause and rerun "
            "transform_to_store with the same arguments to finish the store."
        ) from exc


def _collect(futures: list, errors: list, progress: Any) -> None:
    """Wait for every future; record (chunk, exception) of those that failed."""
    from distributed import as_completed

    for future in as_completed(futures):
        if future.status == "error":
            exc = future.exception()
            errors.append((int(future.key.rsplit("-", 1)[1]), exc))
        elif progress is not None:
            progress.update(1)
        future.release()
