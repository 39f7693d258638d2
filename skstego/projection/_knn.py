"""Nearest-neighbour positives of STEGO: image descriptors and a chunked k-NN.

STEGO pairs each training image with one of its nearest neighbours in a
global descriptor space (Hamilton et al., ICLR 2022; reference code
``src/precompute_knns.py``): the descriptor of an image is the spatial
mean of its feature map, L2-normalised, and each image keeps its top
``n_neighbors`` cosine neighbours, itself excluded.

* :func:`image_descriptors` computes the descriptors in batches, so a NumPy
  memory map of a whole dataset never has to fit in memory at once; with
  ``dropout`` it drops whole channels of each image first, as the reference
  script does (its featurizer's ``Dropout2d(0.1)`` stays in training mode);
* :func:`nearest_neighbors` searches them exactly, queries in chunks, with
  torch (``torch.topk`` per chunk) or faiss (``IndexFlatIP``). Memory is
  O(chunk x N), never N x N.

On CUDA, ``backend="auto"`` searches with torch, not faiss: torch's matrix
product and top-k run on the requested device (``cuda:N`` included), draw
from torch's caching allocator (faiss allocates with its own ``cudaMalloc``
and can run out of memory while torch's cache holds the GPU) and have no
limit on ``n_neighbors`` (faiss's GPU top-k stops at 2048). An explicit
``backend="faiss"`` on CUDA puts the index on the requested device with a
bounded scratch space (:data:`_FAISS_GPU_TEMP_MEMORY`) after releasing
torch's unused cached blocks, and falls back to torch above faiss's
GPU limit.

Both are private helpers of :class:`~skstego.StegoProjector`; they trust
their callers for the layout but still raise clear errors on bad values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._device import (
    as_tensor,
    check_finite_tensor,
    is_torch,
    iter_slices,
    resolve_device,
    rows_per_batch,
)

__all__ = ["image_descriptors", "nearest_neighbors"]

#: Similarity values one torch query chunk may hold (chunk x N), about 64 MiB.
_CHUNK_ELEMENTS = 16 * 1024 * 1024

#: Queries per faiss search: faiss blocks the similarities itself (4096 x 1024
#: at a time), so a chunk only holds its (chunk, k + 1) results. Small chunks
#: are slow (167 queries per search took over 6 min at 100k x 384, 16384: 61 s).
_FAISS_CHUNK = 16384

_BACKENDS = ("auto", "torch", "faiss")

#: faiss's GPU k-selection limit (``GPU_MAX_SELECTION_K``, faiss >= 1.7.3;
#: a search asks for ``n_neighbors + 1`` results, the query itself included).
_FAISS_GPU_MAX_K = 2048

#: Scratch memory faiss's GPU resources may reserve (its default is a share
#: of the device's memory, which torch's caching allocator may hold).
_FAISS_GPU_TEMP_MEMORY = 256 * 1024 * 1024


def image_descriptors(
    maps: np.ndarray | torch.Tensor,
    *,
    device: str | torch.device | None,
    batch_size: int | None = None,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Global descriptor of each image: spatial mean of its map, L2-normalised.

    Parameters
    ----------
    maps : ndarray, memmap or torch.Tensor of shape (N, C, h, w) or (n, C)
        Feature maps (one descriptor per image) or 2-D tokens (each token is
        its own descriptor). Read batch by batch: a NumPy memory map is never
        loaded whole.
    device : str, torch.device or None
        Where the means are computed and the result lives (``None`` and
        ``"auto"`` pick CUDA when available).
    batch_size : int, optional
        Images (or rows) per batch; by default as many as fit in about
        256 MiB of float32.
    dropout : float in [0, 1), default=0.0
        Channel dropout applied to each image before pooling: every channel
        of an image is zeroed with this probability (and the others scaled
        by ``1 / (1 - dropout)``), as :class:`torch.nn.Dropout2d` does to a
        map. A channel constant over the map commutes with the spatial
        mean, so this equals pooling the dropped map. The STEGO reference
        computes its neighbour lists this way (``Dropout2d(0.1)`` left in
        training mode in ``src/precompute_knns.py``). 0 gives the clean,
        deterministic descriptors.
    generator : torch.Generator, optional
        Source of the dropout masks (one (rows, C) draw per batch, in row
        order); must live on ``device``. Unused when ``dropout`` is 0. The
        masks depend on the device: a CUDA generator draws other numbers
        than a CPU one seeded alike.

    Returns
    -------
    descriptors : torch.Tensor of shape (N, C), float32, on ``device``
        Rows of unit L2 norm (a zero mean stays zero).

    Raises
    ------
    ValueError
        If ``maps`` is neither 2-D nor 4-D, or holds NaN or infinity.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.projection._knn import image_descriptors
    >>> maps = np.ones((2, 3, 4, 4), dtype=np.float32)
    >>> maps[1, 0] = 5.0
    >>> image_descriptors(maps, device="cpu").numpy().round(3)
    array([[0.577, 0.577, 0.577],
           [0.962, 0.192, 0.192]], dtype=float32)

    With channel dropout, each row keeps the clean direction on the
    channels it keeps:

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> d = image_descriptors(maps, device="cpu", dropout=0.5, generator=g)
    >>> d.shape
    torch.Size([2, 3])
    """
    if maps.ndim not in (2, 4):
        raise ValueError(
            "Expected 4-D maps (N, C, h, w) or 2-D tokens (n, C), got shape "
            f"{tuple(maps.shape)}."
        )
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    keep = 1.0 - dropout
    dev = resolve_device(device)
    n, c = maps.shape[0], maps.shape[1]
    if batch_size is None:
        batch_size = rows_per_batch(int(np.prod(maps.shape[1:])))
    out = torch.empty((n, c), dtype=torch.float32, device=dev)
    with torch.no_grad():
        for sl in iter_slices(n, batch_size):
            xb = as_tensor(maps[sl], dev)
            check_finite_tensor(xb, "maps")
            if xb.ndim == 4:
                xb = xb.mean(dim=(2, 3))
            if dropout > 0:
                u = torch.rand(xb.shape, generator=generator, device=dev)
                xb = xb * ((u < keep).to(xb.dtype) / keep)
            out[sl] = F.normalize(xb, dim=1)
    return out


def nearest_neighbors(
    descriptors: np.ndarray | torch.Tensor,
    n_neighbors: int = 30,
    *,
    backend: str = "auto",
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Indices of the top cosine neighbours of each row, itself excluded.

    An exact search: queries are taken in chunks and compared with all rows,
    so memory is O(chunk_size x N), never N x N. The query's own index is
    never returned, even when other rows duplicate it.

    Parameters
    ----------
    descriptors : ndarray or torch.Tensor of shape (N, C)
        One descriptor per image (see :func:`image_descriptors`). Rows are
        L2-normalised here, so any non-normalised input gives cosine
        neighbours too.
    n_neighbors : int, default=30
        Neighbours kept per row; capped at ``N - 1``.
    backend : {"auto", "torch", "faiss"}, default="auto"
        ``"torch"``: matrix product and :func:`torch.topk` per chunk.
        ``"faiss"``: a flat inner-product index, on the search device when
        it is CUDA and faiss has GPU support (with a 256 MiB scratch space;
        above 2047 neighbours, faiss's GPU limit, the search falls back to
        torch on that device), else on the CPU. ``"auto"``: on the CPU, faiss
        when it can be imported, else torch; on CUDA, torch (it shares
        torch's memory pool, honours ``cuda:N`` and has no limit on
        ``n_neighbors``). Every backend is exact; they can differ only in the
        order of tied neighbours.
    device : str, torch.device or None, default=None
        Where the search runs; ``None`` keeps tensors where they are and
        searches NumPy input on the CPU. ``"cuda"`` without an index means
        torch's current CUDA device.
    chunk_size : int, optional
        Queries per chunk. By default, for torch as many as keep a chunk's
        (chunk, N) similarity block within about 64 MiB of float32; for faiss
        16384 (faiss blocks the similarities itself, so a chunk only holds
        its results).

    Returns
    -------
    indices : ndarray of shape (N, min(n_neighbors, N - 1)), int64
        Row ``i`` lists the neighbours of ``i`` by decreasing similarity.

    Raises
    ------
    ValueError
        If there are fewer than 2 rows, ``n_neighbors < 1``, the backend is
        unknown, or the descriptors are not finite.
    ImportError
        If ``backend="faiss"`` and faiss is not installed.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.projection._knn import nearest_neighbors
    >>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> nearest_neighbors(X, n_neighbors=2, backend="torch")
    array([[1, 3],
           [0, 3],
           [3, 1],
           [2, 1]])
    """
    if descriptors.ndim != 2:
        raise ValueError(
            "Expected descriptors of shape (N, C), got shape "
            f"{tuple(descriptors.shape)}."
        )
    n = int(descriptors.shape[0])
    if n < 2:
        raise ValueError(
            f"Nearest neighbours need at least 2 descriptors, got {n}: an image "
            "cannot be its own positive partner."
        )
    if isinstance(n_neighbors, bool) or int(n_neighbors) != n_neighbors:
        raise ValueError(f"n_neighbors must be an integer, got {n_neighbors!r}.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
    k = min(int(n_neighbors), n - 1)

    if device is None:
        dev = descriptors.device if is_torch(descriptors) else torch.device("cpu")
    else:
        dev = resolve_device(device)
    D = F.normalize(as_tensor(descriptors, dev), dim=1)
    check_finite_tensor(D, "descriptors")
    backend = _choose_backend(backend, dev, k)
    if backend in ("faiss", "faiss-gpu"):
        if chunk_size is None:
            chunk_size = _FAISS_CHUNK
        gpu = _cuda_index(dev) if backend == "faiss-gpu" else None
        return _search_faiss(D, k, chunk_size, gpu_device=gpu)
    if chunk_size is None:
        chunk_size = rows_per_batch(n, _CHUNK_ELEMENTS)
    return _search_torch(D, k, chunk_size)


def _faiss() -> Any:
    """The faiss module, or None when it cannot be imported."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_has_gpu(faiss: Any) -> bool:
    """Whether this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device``; torch's current device for ``"cuda"``."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device()


def _choose_backend(backend: str, device: torch.device, k: int) -> str:
    """``"torch"``, ``"faiss"`` (CPU index) or ``"faiss-gpu"`` for a search.

    ``backend`` is the user's choice (``"auto"``, ``"torch"``, ``"faiss"``),
    ``device`` the search device and ``k`` the neighbours kept per row.
    """
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        if backend == "auto":
            # torch's matmul + topk on the GPU: the requested device, torch's
            # caching allocator, any k. An exact flat search is one matrix
            # product and a top-k either way: faiss-GPU brings no algorithmic
            # gain worth a second memory pool beside torch's.
            return "torch"
        faiss = _faiss()
        if faiss is not None and _faiss_has_gpu(faiss):
            # faiss's GPU top-k is limited; torch on the same device is exact
            return "faiss-gpu" if k + 1 <= _FAISS_GPU_MAX_K else "torch"
        return "faiss"  # the CPU index (or the ImportError of _search_faiss)
    if backend == "auto":
        # Measured at 100k x 384, k=30 on a shared 2-core CPU: faiss's flat
        # index (BLAS plus a fused top-k heap) took 61 s, torch's matmul +
        # topk 116 s, with identical neighbours. Both are exact, so faiss
        # wins when installed; torch is the fallback without it.
        return "faiss" if _faiss() is not None else "torch"
    return "faiss"


def _search_torch(D: torch.Tensor, k: int, chunk_size: int) -> np.ndarray:
    """Exact chunked search: one (chunk, N) similarity block at a time."""
    n = D.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    with torch.no_grad():
        for sl in iter_slices(n, chunk_size):
            sims = D[sl] @ D.T
            rows = torch.arange(sims.shape[0], device=D.device)
            # -inf on the query's own column: no other similarity is that low
            sims[rows, rows + sl.start] = -torch.inf
            idx = torch.topk(sims, k, dim=1, largest=True, sorted=True).indices
            out[sl] = idx.cpu().numpy()
    return out


def _search_faiss(
    D: torch.Tensor, k: int, chunk_size: int, gpu_device: int | None = None
) -> np.ndarray:
    """Exact chunked search with ``faiss.IndexFlatIP``, self removed by index.

    ``gpu_device``: the CUDA ordinal to put the index on (None: the CPU).
    The GPU index gets explicit resources: torch's unused cached blocks are
    released first (faiss allocates outside torch's caching allocator) and
    faiss's scratch space is capped at :data:`_FAISS_GPU_TEMP_MEMORY`.
    """
    faiss = _faiss()
    if faiss is None:
        raise ImportError(
            "backend='faiss' needs the faiss package (faiss-cpu or faiss-gpu); "
            "install it or use backend='torch'."
        )
    n, c = D.shape
    X = np.ascontiguousarray(D.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(c)
    res = None  # kept alive as long as the GPU index
    if gpu_device is not None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        res = faiss.StandardGpuResources()
        res.setTempMemory(_FAISS_GPU_TEMP_MEMORY)
        index = faiss.index_cpu_to_gpu(res, gpu_device, index)
    index.add(X)
    out = np.empty((n, k), dtype=np.int64)
    for sl in iter_slices(n, chunk_size):
        _, idx = index.search(X[sl], k + 1)
        idx = idx.astype(np.int64, copy=False)
        # Drop the query's own index wherever it landed (duplicates may rank
        # before it); where it fell beyond the k + 1 results, drop the last.
        drop = idx == np.arange(sl.start, sl.stop)[:, None]
        drop[~drop.any(axis=1), -1] = True
        out[sl] = idx[~drop].reshape(-1, k)
    return out
