"""Device resolution, array conversion, layouts, batching and pickling.

This is the one boundary every skstego estimator goes through:

* :func:`resolve_device` turns ``device="auto"`` (and friends) into a
  :class:`torch.device`;
* :func:`check_features` validates user input (NumPy or torch, 2-D tokens or
  4-D maps) without ever modifying it; with ``lazy=True`` on-disk input (a
  :class:`~skstego.features.FeatureStore`, a zarr or dask array, a NumPy
  memmap) is wrapped in :class:`LazyFeatures` and read chunk by chunk;
* :func:`apply_tokenwise` runs a token function over 2-D or 4-D input in
  batches on the estimator's device and returns the output type that came in
  (NumPy in -> NumPy out, torch in -> torch out on the device);
* :func:`make_generator` turns ``random_state`` into a :class:`torch.Generator`;
* :class:`TorchEstimatorMixin` keeps fitted NumPy attributes as device tensors
  on demand and pickles without any device state.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import validate_data
from tqdm.auto import tqdm

__all__ = [
    "LazyFeatures",
    "TorchEstimatorMixin",
    "apply_tokenwise",
    "as_tensor",
    "batch_elements",
    "check_features",
    "check_finite_tensor",
    "is_dask",
    "is_lazy",
    "is_torch",
    "iter_slices",
    "make_generator",
    "maps_to_tokens",
    "module_to_host",
    "resolve_device",
    "to_device",
    "to_host",
    "to_output",
    "tokens_to_maps",
]

#: Number of float32 values one batch of :func:`apply_tokenwise` may hold
#: (input plus output), about 256 MiB.
DEFAULT_BATCH_ELEMENTS = 64 * 1024 * 1024

#: The one streaming-memory policy: float32 values per block of work, by
#: purpose, on the CPU. Every estimator that walks its input in slices asks
#: :func:`batch_elements`; on a GPU every purpose gets
#: ``DEFAULT_BATCH_ELEMENTS`` (one big block keeps the device busy).
#:
#: - ``"read"``: slices read from on-disk or dask input. Kept below glibc's
#:   largest mmap threshold (32 MiB), slice buffers are recycled from the heap
#:   instead of being mapped and page-faulted afresh each time (streamed
#:   k-means passes measured 1.5-1.8x faster than with 256 MiB slices).
#: - ``"distances"``: token x centre blocks of the k-means assignment step.
#:   2**22 (60k rows of 70 features) was measured as fast as cache-sized
#:   blocks on an idle core and several times faster on a shared machine:
#:   every block costs three OpenMP barriers.
#: - ``"gram"``: token chunks of the PCA scatter (Gram) accumulation. On
#:   1M x 384, 16M values were 5-10% faster than 8M; smaller chunks slower.
#: - ``"compute"``: anything else (per-chunk objectives, metric passes).
CPU_BATCH_ELEMENTS = {
    "read": 4 * 1024 * 1024,
    "distances": 1 << 22,
    "gram": 16 * 1024 * 1024,
    "compute": DEFAULT_BATCH_ELEMENTS,
}


def batch_elements(device: torch.device, purpose: str = "read") -> int:
    """Float32 values one block of ``purpose`` may hold on ``device``.

    The single place that sizes streamed work; see ``CPU_BATCH_ELEMENTS``
    for the measured reason behind each CPU budget.
    """
    if purpose not in CPU_BATCH_ELEMENTS:
        raise ValueError(f"unknown purpose {purpose!r}")
    if device.type == "cpu":
        return CPU_BATCH_ELEMENTS[purpose]
    return DEFAULT_BATCH_ELEMENTS


#: Largest share of the device's free memory that a fit may fill by
#: gathering on-disk input it would otherwise stream pass by pass.
GATHER_FRACTION = 0.25


def free_memory(device: torch.device) -> int | None:
    """Bytes the process can still allocate on ``device`` without swapping
    (``MemAvailable`` on Linux, free pages elsewhere; free CUDA memory), or
    None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fit in :data:`GATHER_FRACTION` of the free memory
    of ``device`` (False where the free memory cannot be known)."""
    free = free_memory(device)
    return free is not None and nbytes <= GATHER_FRACTION * free


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a ``device`` parameter into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N"}, torch.device or None
        ``"auto"`` (or None) picks the current CUDA device when one is
        available and the CPU otherwise.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the string is not a device name, or names a CUDA device that this
        machine does not have.

    Examples
    --------
    >>> from skstego._device import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a device name; use 'auto', 'cpu', 'cuda' "
            "or 'cuda:N'."
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} asks for CUDA but torch sees no CUDA device on "
                "this machine; use device='auto' or device='cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
    return dev


def is_torch(X: Any) -> bool:
    """Return True when ``X`` is a torch tensor."""
    return isinstance(X, torch.Tensor)


#: Outputs of estimators' transform/predict (apply_tokenwise), by id: a weak
#: reference to the output and the step that made it ("TorchPCA.transform").
#: When the next step finds NaN in its input, the message names that step
#: rather than blaming the user's (finite) data.
_PRODUCERS: dict[int, tuple[Any, str]] = {}


def _record_producer(Y: Any, name: str | None) -> None:
    if name is None:
        return
    key = id(Y)
    try:
        ref = weakref.ref(Y, lambda _, key=key: _PRODUCERS.pop(key, None))
    except TypeError:
        return
    _PRODUCERS[key] = (ref, name)


def _producer(X: Any) -> str | None:
    """The estimator method that returned ``X`` (still alive), if any."""
    hit = _PRODUCERS.get(id(X))
    if hit is None or hit[0]() is not X:
        return None
    return hit[1]


def _calling_method() -> str | None:
    """``Estimator.method`` of the outermost call of one estimator on the stack.

    Looks a few frames up from the caller of :func:`apply_tokenwise` for a
    method of a skstego estimator (``self`` a :class:`TorchEstimatorMixin`)
    and returns its public entry (``transform`` rather than ``_transform``).
    """
    frame = sys._getframe(2)
    owner, name = None, None
    for _ in range(8):
        if frame is None:
            break
        obj = frame.f_locals.get("self")
        if isinstance(obj, TorchEstimatorMixin) and (owner is None or obj is owner):
            code = frame.f_code.co_name
            if name is None or (not code.startswith("_") and code != "wrapped"):
                owner, name = obj, code
        elif owner is not None:
            break
        frame = frame.f_back
    if owner is None:
        return None
    return f"{type(owner).__name__}.{name}"


def _non_finite_message(X: Any, name: str = "X", estimator: Any = None) -> str:
    """Why ``X`` holds NaN or infinity, naming the step that made it if known."""
    where = f" of {type(estimator).__name__}" if estimator is not None else ""
    producer = _producer(X)
    if producer is not None:
        hint = (
            " (a lower lr, or stabilize=True)"
            if producer.startswith("StegoProjector.")
            else ""
        )
        return (
            f"Input {name}{where} contains NaN or infinity, produced by "
            f"{producer} (the step before it, e.g. in a Pipeline) from finite "
            f"input: that step is at fault, not your data. Refit it{hint} or "
            "check its fitted attributes."
        )
    return (
        f"Input {name}{where} contains NaN or infinity; remove or impute those "
        "values before calling skstego (if it comes from your own "
        "preprocessing, check that step's output)."
    )


def check_finite_tensor(
    X: torch.Tensor, name: str = "X", estimator: Any = None
) -> None:
    """Raise a clear ValueError when a tensor holds NaN or infinity."""
    if X.is_floating_point() and X.numel() and not bool(torch.isfinite(X).all()):
        raise ValueError(_non_finite_message(X, name, estimator))


def check_features(
    estimator: Any,
    X: Any,
    *,
    reset: bool,
    allowed_ndim: tuple[int, ...] = (2, 4),
    min_samples: int = 1,
    lazy: bool = False,
) -> np.ndarray | torch.Tensor | LazyFeatures:
    """Validate features at an estimator's public boundary.

    NumPy-like input goes through scikit-learn's ``validate_data`` (so the
    usual checks and messages apply); torch tensors are checked here and stay
    where they are. ``n_features_in_`` is the channel axis (axis 1) in both
    layouts. The input is never modified.

    Parameters
    ----------
    estimator : estimator
        Its ``n_features_in_`` is set (``reset=True``) or checked.
    X : array-like or torch.Tensor of shape (n_samples, n_features) or (N, C, h, w)
    reset : bool
        True in ``fit``, False afterwards.
    allowed_ndim : tuple of int
        Layouts the caller accepts.
    min_samples : int
        Smallest number of samples (rows or images) accepted.
    lazy : bool
        When True (estimators that read their input in slices only), on-disk
        input -- a :class:`~skstego.features.FeatureStore`, a zarr or dask
        array, a NumPy memmap (see :func:`is_lazy`) -- is not loaded: its
        shape and dtype are checked here and it is returned wrapped in
        :class:`LazyFeatures`, whose slices are read (and checked for NaN)
        one at a time. When False, such input is loaded as a whole.

    Returns
    -------
    X : ndarray of float32/float64, torch.Tensor or LazyFeatures
        Validated input; tensors are returned as is (converted by
        :func:`as_tensor` later, batch by batch).
    """
    layouts = " or ".join(
        {2: "2-D tokens (n_samples, n_features)", 4: "4-D maps (N, C, h, w)"}[d]
        for d in allowed_ndim
    )
    if is_torch(X):
        if X.ndim not in allowed_ndim:
            raise ValueError(
                f"Expected {layouts}, got a tensor of shape {tuple(X.shape)}."
            )
        if X.is_complex() or X.dtype == torch.bool:
            raise ValueError(f"Expected a real-valued tensor, got dtype {X.dtype}.")
        check_finite_tensor(X, estimator=estimator)
        n_features = X.shape[1]
        _check_counts(X.shape[0], n_features, min_samples, tuple(X.shape))
        _check_n_features(estimator, n_features, reset)
        return X
    if lazy and is_lazy(X):
        shape = tuple(int(s) for s in X.shape)
        if len(shape) not in allowed_ndim:
            raise ValueError(f"Expected {layouts}, got an array of shape {shape}.")
        kind = np.dtype(X.dtype).kind
        if kind not in "fiu":
            raise ValueError(
                f"Expected real-valued features, got an array of dtype {X.dtype}."
            )
        _check_counts(shape[0], shape[1], min_samples, shape)
        _check_n_features(estimator, shape[1], reset)
        return X if isinstance(X, LazyFeatures) else LazyFeatures(X)
    ndim = np.ndim(X) if isinstance(X, np.ndarray) else None
    if ndim is not None and ndim not in allowed_ndim and ndim != 1:
        # before validate_data, whose sample count of a 5-D array misleads
        raise ValueError(f"Expected {layouts}, got an array of shape {X.shape}.")
    if isinstance(X, np.ndarray) and X.dtype.kind == "c":
        raise ValueError(
            f"Complex data not supported: expected real-valued features, got "
            f"dtype {X.dtype}; pass X.real or np.abs(X)."
        )
    source = X
    try:
        X = validate_data(
            estimator,
            X,
            reset=reset,
            allow_nd=True,
            dtype=[np.float32, np.float64],
            ensure_min_samples=min_samples,
        )
    except ValueError as exc:
        if str(exc).startswith("Input X contains"):
            raise ValueError(_non_finite_message(source, "X", estimator)) from None
        raise
    if X.ndim not in allowed_ndim:
        raise ValueError(f"Expected {layouts}, got an array of shape {X.shape}.")
    _check_counts(X.shape[0], X.shape[1], min_samples, X.shape)
    return X


def is_dask(X: Any) -> bool:
    """True for a :class:`dask.array.Array` (checked without importing dask).

    Estimators send such input to :mod:`skstego._dask`: fits from per-chunk
    statistics computed by dask, lazy ``transform``/``predict``.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from skstego._device import is_dask
    >>> is_dask(da.zeros((4, 2), chunks=2)), is_dask(np.zeros((4, 2)))
    (True, False)
    """
    module = type(X).__module__ or ""
    return type(X).__name__ == "Array" and module.split(".")[0] == "dask"


def dask_source(X: Any) -> Any:
    """The dask array behind a :class:`LazyFeatures` view, else None.

    Estimators validate on-disk input into :class:`LazyFeatures`; those
    backed by dask send their passes to :mod:`skstego._dask` instead.

    Examples
    --------
    >>> import dask.array as da
    >>> from skstego._device import LazyFeatures, dask_source
    >>> D = da.zeros((4, 2), chunks=2)
    >>> dask_source(LazyFeatures(D)) is D, dask_source(D)
    (True, None)
    """
    source = getattr(X, "source", None) if isinstance(X, LazyFeatures) else None
    return source if is_dask(source) else None


def is_lazy(X: Any) -> bool:
    """True for input read in slices rather than loaded: on disk or out of core.

    That is a :class:`~skstego.features.FeatureStore`, a NumPy memmap, a zarr
    array, a dask array, or any object that opts in with a true
    ``_skstego_lazy`` class attribute. That duck-typed protocol asks for
    ``shape`` and ``dtype`` attributes (``ndim`` optional) and
    ``__getitem__`` with a slice of rows (and, for estimators that draw
    batches, a 1-D integer array of rows) returning array-likes: e.g. tokens
    generated on the fly, as ``benchmarks/bench_streaming.py`` does.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from skstego._device import is_lazy
    >>> path = tempfile.mkdtemp() + "/x.dat"
    >>> is_lazy(np.zeros(3)), is_lazy(np.memmap(path, shape=3, mode="w+"))
    (False, True)
    >>> class Generated:  # rows made on demand, never stored
    ...     _skstego_lazy = True
    ...     shape, dtype = (10**9, 4), np.dtype("float32")
    ...     def __getitem__(self, rows):
    ...         n = len(range(*rows.indices(self.shape[0])))
    ...         return np.ones((n, 4), dtype=np.float32)
    >>> is_lazy(Generated())
    True
    """
    if isinstance(X, (np.memmap, LazyFeatures)) or getattr(X, "_skstego_lazy", False):
        return True
    module = type(X).__module__ or ""
    return type(X).__name__ == "Array" and module.split(".")[0] in ("zarr", "dask")


def source_chunk_rows(source: Any) -> int:
    """Rows per storage chunk along axis 0 of ``source`` (1 when unchunked).

    Read from a ``chunks`` attribute: a tuple of ints (zarr, h5py, a
    :class:`~skstego.features.FeatureStore`) or dask's tuple of tuples
    (regular chunks only: all but the last of the same size).

    Examples
    --------
    >>> import numpy as np
    >>> from skstego._device import source_chunk_rows
    >>> source_chunk_rows(np.zeros((10, 3)))
    1
    """
    chunks = getattr(source, "chunks", None)
    if not chunks:
        return 1
    first = chunks[0]
    if isinstance(first, tuple):  # dask: the sizes of the row chunks
        if len(set(first[:-1])) > 1 or (len(first) > 1 and first[-1] > first[0]):
            return 1
        first = first[0] if first else 1
    return max(1, int(first))


class LazyFeatures:
    """Read-only, chunk-by-chunk view of on-disk features.

    Indexing returns a C-contiguous NumPy array (float64 for float64 sources,
    float32 otherwise, e.g. for float16 stores), checked for NaN and infinity.
    Reads of consecutive slices (the way estimators stream) are prefetched:
    while the caller computes on one slice, a background thread reads the
    next one, so disk reads, decompression and the host-to-device copy
    overlap the computation. Sources stored in chunks along axis 0 (a
    FeatureStore, zarr, dask: see :func:`source_chunk_rows`) are read in
    whole chunks, and the rows of a chunk beyond the current slice are kept
    for the next one, so consecutive slices of any size decompress every
    storage chunk once. At most a slice, the rest of its last chunk and the
    next read are in memory at once.

    Parameters
    ----------
    source : array-like
        Anything with ``shape``, ``dtype`` and slicing: a FeatureStore, a
        zarr or dask array, a NumPy memmap.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego._device import LazyFeatures
    >>> X = LazyFeatures(np.arange(12, dtype=np.float16).reshape(6, 2))
    >>> X.shape, X.dtype
    ((6, 2), dtype('float32'))
    >>> X[0:2]  # the next slice, 2:4, is now being read in the background
    array([[0., 1.],
           [2., 3.]], dtype=float32)
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.shape = tuple(int(s) for s in source.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(
            np.float64 if np.dtype(source.dtype) == np.float64 else np.float32
        )
        self.chunk_rows = source_chunk_rows(source)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[tuple[int, int], Any] | None = None
        #: rows [start, start + len(rows)) read but not yet handed out
        self._rest: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, key: Any) -> np.ndarray:
        chunk = np.ascontiguousarray(np.asarray(self.source[key]), dtype=self.dtype)
        if not np.isfinite(chunk).all():
            where = (
                f"rows {key.start}:{key.stop}"
                if isinstance(key, slice)
                else "the rows read"
            )
            raise ValueError(
                f"Input X contains NaN or infinity (in {where}); remove or impute "
                "those values before calling skstego."
            )
        return chunk

    def _cover(self, start: int, stop: int) -> tuple[int, int]:
        """The whole storage chunks that hold rows ``start:stop``."""
        c = self.chunk_rows
        return start - start % c, min(self.shape[0], -(-stop // c) * c)

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (whole chunks): the prefetched read, or now."""
        if self._pending is not None:
            key, future = self._pending
            self._pending = None
            if key == (start, stop):
                return future.result()
            future.cancel()
        return self._read(slice(start, stop))

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            return self._read(key)
        start, stop, _ = key.indices(self.shape[0])
        if stop <= start:
            return self._read(slice(start, start))
        pieces, at = [], start
        rest, self._rest = self._rest, None
        if rest is not None and rest[0] == start:  # rows read with the last slice
            held = rest[1]
            pieces.append(held[: stop - start])
            at = start + held.shape[0]
            if at > stop:
                self._rest = (stop, held[stop - start :])
        if at < stop:
            lo, hi = self._cover(at, stop)
            block = self._read_rows(lo, hi)
            pieces.append(block[at - lo : stop - lo])
            if stop < lo + block.shape[0]:  # the rest of the last chunk
                self._rest = (stop, block[stop - lo :])
        chunk = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        self._prefetch(stop, stop - start)
        return chunk

    def _prefetch(self, stop: int, length: int) -> None:
        """Start reading the chunks of the likely next slice ``stop:stop+length``."""
        if length <= 0 or stop >= self.shape[0]:
            return
        at = stop if self._rest is None else self._rest[0] + self._rest[1].shape[0]
        end = min(self.shape[0], stop + length)
        if at >= end:  # the kept rows already hold it (or nothing is left)
            return
        lo, hi = self._cover(at, end)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = ((lo, hi), self._pool.submit(self._read, slice(lo, hi)))

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _check_counts(n_samples: int, n_features: int, min_samples: int, shape) -> None:
    if n_samples < min_samples:
        raise ValueError(
            f"Found array with {n_samples} sample(s) (shape={shape}) while a "
            f"minimum of {min_samples} is required."
        )
    if n_features < 1:
        raise ValueError(
            f"Found array with 0 feature(s) (shape={shape}) while a minimum of 1 "
            "is required."
        )


def _check_n_features(estimator: Any, n_features: int, reset: bool) -> None:
    if reset:
        estimator.n_features_in_ = int(n_features)
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
        return
    expected = getattr(estimator, "n_features_in_", None)
    if expected is not None and n_features != expected:
        raise ValueError(
            f"X has {n_features} features, but {type(estimator).__name__} is "
            f"expecting {expected} features as input."
        )


def as_tensor(
    X: np.ndarray | torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Return ``X`` as a tensor on ``device`` without modifying the original.

    A NumPy array is wrapped without a copy when possible and copied to the
    device; a tensor already of the right device and dtype is returned as is.
    Callers must treat the result as read-only.

    Every copy is synchronous: the result can be read at once (a
    device-to-host copy with ``non_blocking=True`` may be read before it has
    landed, and a host-to-device one from the caller's memory would race
    with the caller writing it). Nothing is pinned: pinning a whole array
    costs a host copy of it and page-locked memory that the process keeps.
    """
    if not is_torch(X):
        with warnings.catch_warnings():
            # read-only arrays (memory maps) are fine: the result is never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not")
            X = torch.from_numpy(np.ascontiguousarray(X))
    return X.to(device=device, dtype=dtype)


def to_device(
    x: torch.Tensor, device: torch.device, *, staged: bool = False
) -> torch.Tensor:
    """Move ``x`` to ``device``; asynchronously only from a pinned staging buffer.

    The one rule for ``non_blocking`` in skstego: a copy is asynchronous
    only host-to-device (CUDA), from pinned host memory that the caller
    owns and never writes again (``staged=True``: e.g. an image decoded and
    pinned by skstego itself; PyTorch's pinned allocator keeps such memory
    alive until the copy is done). Any other copy, device-to-host above all,
    is synchronous, so the result is valid when this returns.
    """
    non_blocking = (
        staged
        and device.type == "cuda"
        and x.device.type == "cpu"
        and bool(x.is_pinned())
    )
    return x.to(device, non_blocking=non_blocking)


def to_host(obj: Any) -> Any:
    """``obj`` with its tensors and modules on the CPU, for pickling.

    Tensors on another device are copied to the CPU (synchronously);
    modules with parameters or buffers on another device are replaced by a
    CPU copy (the original is never moved: see :func:`module_to_host`).
    Lists, tuples and dicts are walked; anything else is returned as is
    (the same object when nothing had to move).
    """
    if isinstance(obj, torch.nn.Module):
        return module_to_host(obj)
    if is_torch(obj):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        items = [to_host(v) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return type(obj)(items)
    if type(obj) is dict:
        moved = {k: to_host(v) for k, v in obj.items()}
        if all(moved[k] is v for k, v in obj.items()):
            return obj
        return moved
    return obj


def module_to_host(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when all its tensors are on the CPU, else a CPU copy.

    The copy is made without a second device copy (each parameter and buffer
    is copied straight to the host) and shares nothing with ``module``. A
    module pickled this way unpickles on any machine; whoever uses it moves
    it to the device it resolves there.
    """
    import copy

    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module
    memo: dict[int, Any] = {}
    for t in tensors:
        if id(t) in memo or t.device.type == "cpu":
            continue
        host = t.detach().cpu()
        if isinstance(t, torch.nn.Parameter):
            host = torch.nn.Parameter(host, requires_grad=t.requires_grad)
        memo[id(t)] = host
    return copy.deepcopy(module, memo)


def to_output(Y: torch.Tensor, like: Any) -> np.ndarray | torch.Tensor:
    """Return ``Y`` in the array type of ``like``: NumPy for NumPy, else torch."""
    if is_torch(like):
        return Y
    return Y.detach().cpu().numpy()


def maps_to_tokens(X: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) maps -> (N*h*w, C) tokens, image-major then row-major."""
    n, c, h, w = X.shape
    return X.permute(0, 2, 3, 1).reshape(n * h * w, c)


def tokens_to_maps(T: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*h*w, D) tokens -> (N, D, h, w) maps; inverse of :func:`maps_to_tokens`."""
    return T.reshape(n, h, w, T.shape[-1]).permute(0, 3, 1, 2).contiguous()


def iter_slices(
    n: int, batch_size: int, *, progress: str | None = None
) -> Iterator[slice]:
    """Yield consecutive slices of at most ``batch_size`` covering ``range(n)``.

    With ``progress`` (a description), a tqdm bar counts the slices.
    """
    batch_size = max(1, int(batch_size))
    starts = range(0, n, batch_size)
    if progress is not None:
        starts = tqdm(starts, desc=progress, leave=False)
    for start in starts:
        yield slice(start, min(start + batch_size, n))


def rows_per_batch(row_elements: int, budget: int = DEFAULT_BATCH_ELEMENTS) -> int:
    """Rows of ``row_elements`` values that fit in ``budget`` values (at least 1)."""
    return max(1, budget // max(1, row_elements))


def apply_tokenwise(
    fn: Callable[[torch.Tensor], torch.Tensor],
    X: np.ndarray | torch.Tensor,
    *,
    device: torch.device,
    out_features: int,
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    keep_maps: bool = True,
) -> np.ndarray | torch.Tensor:
    """Apply a token function to 2-D tokens or 4-D maps, in batches.

    Parameters
    ----------
    fn : callable
        Maps a (n, C) tensor on ``device`` to a (n, out_features) tensor, or to
        a (n,) tensor when ``out_features == 0`` (e.g. labels).
    X : ndarray or torch.Tensor, (n, C) or (N, C, h, w)
    device : torch.device
        Where ``fn`` runs.
    out_features : int
        Width of ``fn``'s output; 0 for one value per token.
    dtype : torch.dtype
        Compute dtype of the input handed to ``fn``.
    batch_size : int, optional
        Rows (2-D) or images (4-D) per batch; by default as many as fit in
        about 256 MiB of float32.
    keep_maps : bool
        For 4-D input, return maps (N, out_features, h, w) or (N, h, w);
        when False return tokens.

    Returns
    -------
    ndarray or torch.Tensor
        NumPy for NumPy input, torch on ``device`` for torch input.
    """
    torch_in = is_torch(X)
    producer = _calling_method()
    n = X.shape[0]
    per_row = int(np.prod(X.shape[1:])) + out_features * int(np.prod(X.shape[2:]))
    if batch_size is None:
        batch_size = rows_per_batch(per_row)
    outputs = []
    with torch.no_grad():
        for sl in iter_slices(n, batch_size):
            xb = as_tensor(X[sl], device, dtype)
            if xb.ndim == 4:
                nb, _, h, w = xb.shape
                yb = fn(maps_to_tokens(xb))
                if keep_maps:
                    yb = (
                        tokens_to_maps(yb, nb, h, w)
                        if out_features
                        else yb.reshape(nb, h, w)
                    )
            else:
                yb = fn(xb)
            outputs.append(yb if torch_in else yb.cpu())
    Y = torch.cat(outputs) if len(outputs) != 1 else outputs[0]
    Y = to_output(Y, X)
    _record_producer(Y, producer)
    return Y


def make_generator(random_state: Any, device: torch.device) -> torch.Generator:
    """Turn a ``random_state`` parameter into a seeded :class:`torch.Generator`.

    ``None`` draws a fresh seed from NumPy's global state (as scikit-learn
    does); an int or a ``numpy.random.RandomState`` gives a reproducible
    generator. The generator lives on ``device`` (CUDA generators for CUDA).
    """
    seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


#: Device copies of fitted attributes, per estimator. Kept outside the
#: estimators' ``__dict__`` so that computing never changes an estimator's
#: state (scikit-learn checks that) and so that pickles never hold device data.
_DEVICE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: Environment variable holding the base URL of the built documentation used
#: by the estimators' HTML repr link (e.g. "https://example.org/skstego/");
#: unset, links are relative to the documentation root.
DOC_URL_ENV = "SKSTEGO_DOC_URL"


def _doc_link_params(estimator: Any) -> dict:
    """URL parameters of the HTML repr's documentation link (see _DocLinkMixin)."""
    base = os.environ.get(DOC_URL_ENV, "")
    if base and not base.endswith("/"):
        base += "/"
    return {"base": base, "estimator_name": type(estimator).__name__}


class _DocLinkMixin:
    """Link the HTML repr (``_repr_html_``) to the estimator's API page.

    scikit-learn's ``BaseEstimator._get_doc_link`` (1.6 and later) formats
    ``_doc_link_template`` with ``_doc_link_url_param_generator()`` for
    classes of the ``_doc_link_module`` package. skstego's API pages are
    ``api/generated/skstego.<Name>.html`` (every estimator is exported at
    the package top level), relative to the documentation root, or to the
    base URL in the ``SKSTEGO_DOC_URL`` environment variable when set.
    Must come before ``BaseEstimator`` in the bases.
    """

    _doc_link_module = "skstego"
    _doc_link_template = "{base}api/generated/skstego.{estimator_name}.html"
    _doc_link_url_param_generator = _doc_link_params


class TorchEstimatorMixin(_DocLinkMixin):
    """Device handling shared by every skstego estimator.

    Fitted attributes are stored as NumPy arrays (as in scikit-learn, so they
    pickle, compare and print as users expect). :meth:`_tensor` returns a cached
    device copy for computation. The cache lives outside the estimator, so a
    model fitted on a GPU pickles without device state, reloads on a machine
    without CUDA and moves to the device resolved at its next call.
    """

    def __getstate__(self) -> dict:
        # Parameters may hold tensors or modules (``init=``, ``model=``) on a
        # GPU: they travel on the CPU, so that the pickle (a joblib cache, a
        # dask task) loads on any machine, and are moved to the device
        # resolved where the estimator next computes.
        state = super().__getstate__()
        if not isinstance(state, dict):
            return state
        return {name: to_host(value) for name, value in state.items()}

    def _resolved_device(self) -> torch.device:
        return resolve_device(getattr(self, "device", "auto"))

    def _tensor(
        self, name: str, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Device copy of the fitted attribute ``name``, refreshed when it changes."""
        value = getattr(self, name)
        return self._cached(
            (name, str(device), dtype),
            value,
            lambda: torch.as_tensor(np.asarray(value)).to(device, dtype),
        )

    def _cached(
        self, key: Any, source: Any, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """Cache ``compute()`` under ``key`` until the object ``source`` changes.

        ``source`` is the fitted attribute the value derives from; a refit
        replaces that object and so invalidates the entry.
        """
        cache = _DEVICE_COPIES.setdefault(self, {})
        hit = cache.get(key)
        if hit is None or hit[0] is not source:
            hit = (source, compute())
            cache[key] = hit
        return hit[1]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device (``cuda`` is the current one)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    if a.index is not None and b.index is not None:
        return a.index == b.index
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (
        current if b.index is None else b.index
    )
