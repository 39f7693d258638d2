"""KMeansProbe: Lloyd k-means (spherical or Euclidean) as a cluster probe.

The STEGO cluster probe assigns every token to the centroid of highest cosine
similarity. The reference trains those centroids by gradient descent; here they
are fitted properly, by Lloyd's algorithm on the unit sphere (spherical
k-means), or by ordinary Euclidean k-means, which matches
:class:`sklearn.cluster.KMeans`. Clusters are mapped to classes with the
Hungarian algorithm, on the training labels (``fit(X, y)``) or on the
evaluation data itself (``score``, the unsupervised protocol).
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Iterator
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from tqdm.auto import tqdm

from .._dask import gather_tokens, is_dask, kmeans_lloyd, label_tokens, map_method
from .._device import (
    DEFAULT_BATCH_ELEMENTS,
    LazyFeatures,
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    dask_source,
    is_torch,
    iter_slices,
    make_generator,
    maps_to_tokens,
    resolve_device,
    rows_per_batch,
)
from .._weights import check_weights, token_weights
from ._base import check_targets
from ._centroid import (
    CentroidProbeMixin,
    _normalize_rows,
    _overflow_scale,
    _similarity,
)

__all__ = ["KMeansProbe"]

#: Elements of one token chunk (rows x max(k, n_features)) in the Lloyd loop.
#: On the CPU, 2**22 (60k rows of 70 features) was measured as fast as smaller
#: cache-sized chunks on an idle core and several times faster on a shared,
#: oversubscribed machine: every chunk costs three OpenMP barriers. On a GPU
#: one big block keeps the device busy.
_CPU_BLOCK_ELEMENTS = 1 << 22
_GPU_BLOCK_ELEMENTS = DEFAULT_BATCH_ELEMENTS
#: Values read at a time from on-disk input (a FeatureStore, zarr, dask or
#: memmap) when its tokens are gathered onto the device, and per batch when
#: every token is labelled after a subsampled fit.
_STREAM_ELEMENTS = DEFAULT_BATCH_ELEMENTS
#: The same on the CPU, where reads allocate a fresh buffer per slice: kept
#: below glibc's largest mmap threshold (32 MiB), slice buffers are recycled
#: from the heap instead of being mapped and page-faulted afresh each time
#: (streamed k-means passes measured 1.5-1.8x faster than with 256 MiB).
_CPU_STREAM_ELEMENTS = 4 * 1024 * 1024


def _stream_elements(device: torch.device) -> int:
    """Values per slice of streamed input on ``device``."""
    if device.type == "cpu":
        return min(_STREAM_ELEMENTS, _CPU_STREAM_ELEMENTS)
    return _STREAM_ELEMENTS


# --------------------------------------------------------------------------
# torch kernels (inputs trusted: float32 tokens on one device)
# --------------------------------------------------------------------------


def _chunk_rows(device: torch.device, k: int, n_features: int) -> int:
    budget = _GPU_BLOCK_ELEMENTS if device.type == "cuda" else _CPU_BLOCK_ELEMENTS
    return rows_per_batch(max(k, n_features), budget)


def _assign(
    X: torch.Tensor,
    centers: torch.Tensor,
    cosine: bool,
    chunk: int,
    labels: torch.Tensor,
    best: torch.Tensor,
    sums: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
) -> None:
    """E-step in chunks: ``labels``/``best`` (best score) filled in place.

    ``w`` (float64 weight per token, or None) weights the sums.

    When ``sums`` is given, the M-step sums are accumulated on the way, while the
    chunk is still in cache: with ``index_add_`` on the CPU (measured faster
    there), with a one-hot GEMM on a GPU (``index_add_`` would funnel every
    token into ``k`` rows of atomics).
    """
    neg_c_sq = None if cosine else -(centers * centers).sum(dim=1)
    onehot_update = sums is not None and _use_onehot_update(X.device)
    for sl in iter_slices(X.shape[0], chunk):
        xb = X[sl]
        sim = _similarity(xb, centers, neg_c_sq)
        torch.max(sim, dim=1, out=(best[sl], labels[sl]))
        if sums is None:
            continue
        if w is None:
            if onehot_update:
                onehot = torch.zeros_like(sim).scatter_(1, labels[sl, None], 1.0)
                sums.addmm_(onehot.T, xb)
            else:
                sums.index_add_(0, labels[sl], xb)
            continue
        wb = w[sl].to(xb.dtype)
        if onehot_update:
            onehot = torch.zeros_like(sim).scatter_(1, labels[sl, None], wb[:, None])
            sums.addmm_(onehot.T, xb)
        else:
            sums.index_add_(0, labels[sl], xb * wb[:, None])


def _use_onehot_update(device: torch.device) -> bool:
    return device.type == "cuda"


def _sq_distances(best: torch.Tensor, x_sq: torch.Tensor | None) -> torch.Tensor:
    """Squared distance to the assigned centroid from the best score."""
    if x_sq is None:  # unit vectors: |x - c|^2 = 2 - 2 cos
        return (2.0 - 2.0 * best).clamp_min_(0.0)
    return (x_sq - best).clamp_min_(0.0)


def _row_sq_norms(X: torch.Tensor) -> torch.Tensor:
    """``|x|^2`` per row, in chunks (no full-size temporary)."""
    out = torch.empty(X.shape[0], dtype=X.dtype, device=X.device)
    for sl in iter_slices(X.shape[0], _chunk_rows(X.device, 1, X.shape[1])):
        xb = X[sl]
        torch.sum(xb * xb, dim=1, out=out[sl])
    return out


def _prepare_tokens(
    X: torch.Tensor, cosine: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens as the distance kernels take them: unit rows for cosine (no
    norms needed), else the rows with their squared norms."""
    if cosine:
        return _normalize_rows(X), None
    return X, _row_sq_norms(X)


def _mean_variance(X: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """Mean over features of the (biased) variance, two-pass in chunks.

    With token weights ``w``, the weighted variance: that of the data with
    every token repeated its (integer) weight times.
    """
    if w is None:
        mean = X.mean(dim=0)
    else:
        mean = (w.to(X.dtype) @ X) / w.sum().to(X.dtype)
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    for sl in iter_slices(X.shape[0], _chunk_rows(X.device, 1, X.shape[1])):
        xb = X[sl] - mean
        if w is None:
            total += (xb * xb).sum(dtype=torch.float64)
        else:
            total += (xb * xb).sum(dim=1, dtype=torch.float64) @ w[sl]
    if w is None:
        return float(total) / X.numel()  # one read, after every chunk
    return float(total / w.sum()) / X.shape[1]


def _kmeans_plusplus(
    X: torch.Tensor,
    x_sq: torch.Tensor,
    k: int,
    gen: torch.Generator,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn's ``_kmeans_plusplus``).

    Every choice stays on the device (one-element index tensors, no
    ``.item()``), so on CUDA seeding queues its kernels without waiting.
    With token weights ``w`` (float64), tokens are drawn with probability
    proportional to weight times squared distance, and candidates compared
    by weighted potential, as scikit-learn does with ``sample_weight``.
    """
    n = X.shape[0]
    n_trials = 2 + int(math.log(k))
    if w is None:
        first = torch.randint(n, (1,), generator=gen, device=gen.device)
    else:
        cum_w = torch.cumsum(w, 0)
        u = torch.rand(1, generator=gen, device=gen.device, dtype=torch.float64)
        first = torch.searchsorted(cum_w, u.to(X.device) * cum_w[-1]).clamp_(max=n - 1)
    first = first.to(X.device)
    chosen = [first]
    closest = torch.addmv(x_sq + x_sq[first], X, X[first][0], alpha=-2.0)
    closest.clamp_min_(0.0)
    if w is None:
        pot = closest.sum(dtype=torch.float64)
    else:
        pot = closest.double() @ w
    for _ in range(1, k):
        rand = torch.rand(
            n_trials, generator=gen, device=gen.device, dtype=torch.float64
        )
        if w is None:
            cum = torch.cumsum(closest, 0, dtype=torch.float64)
        else:
            cum = torch.cumsum(closest.double() * w, 0)
        cand = torch.searchsorted(cum, rand.to(X.device) * pot).clamp_(max=n - 1)
        # (n_trials, n) distances: rows are contiguous for the reductions.
        cx = X[cand]
        d = torch.addmm(x_sq[cand][:, None], cx, X.T, alpha=-2.0)
        d.add_(x_sq).clamp_min_(0.0)
        torch.minimum(d, closest, out=d)
        if w is None:
            pots = d.sum(dim=1).double()  # float64 reductions are slow on CPU
        else:
            pots = d.double() @ w
        b = torch.argmin(pots).reshape(1)
        closest = d.index_select(0, b)[0]
        pot = pots.index_select(0, b)[0]
        chosen.append(cand.index_select(0, b))
    return X[torch.cat(chosen)]


def _init_centers(
    X: torch.Tensor,
    x_sq: torch.Tensor,
    k: int,
    init: Any,
    gen: torch.Generator,
    cosine: bool,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    if isinstance(init, str) and init == "k-means++":
        centers = _kmeans_plusplus(X, x_sq, k, gen, w)
    elif isinstance(init, str) and init == "random":
        if w is None:
            perm = torch.randperm(X.shape[0], generator=gen, device=gen.device)[:k]
        else:  # k distinct tokens, drawn with probability proportional to weight
            perm = torch.multinomial(w.to(gen.device), k, generator=gen)
        centers = X[perm.to(X.device)].clone()
    else:
        centers = as_tensor(init, X.device).clone()
    return _normalize_rows(centers) if cosine else centers


def _counts(
    labels: torch.Tensor,
    k: int,
    dtype: torch.dtype = torch.int64,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens per cluster, shape (k,).

    ``index_add_`` of ones rather than ``torch.bincount``: CUDA's bincount
    reads ``max(labels)`` back to the host to size its output, a
    synchronisation per call (exact here in int64, or in float64 below
    2**53). With token weights ``w``, the weight per cluster.
    """
    if w is None:
        ones = torch.ones(labels.shape[0], dtype=dtype, device=labels.device)
    else:
        ones = w.to(dtype)
    return torch.zeros(k, dtype=dtype, device=labels.device).index_add_(0, labels, ones)


def _relocate_empty(
    X: torch.Tensor,
    x_sq: torch.Tensor | None,
    labels: torch.Tensor,
    best: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    w: torch.Tensor | None = None,
) -> None:
    """Re-seed empty clusters with the points farthest from their centroid.

    With token weights ``w``, a cluster of zero weight is empty (as in
    scikit-learn) and moved tokens carry their weight.
    """
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return
    far = torch.topk(_sq_distances(best, x_sq), empty.numel()).indices
    old = labels[far]
    if w is None:
        sums.index_add_(0, old, X[far], alpha=-1.0)
        counts.index_add_(0, old, torch.full_like(old, -1))
        sums[empty] = X[far]
        counts[empty] = 1
    else:
        wf = w[far]
        xf = X[far] * wf.to(X.dtype)[:, None]
        sums.index_add_(0, old, xf, alpha=-1.0)
        counts.index_add_(0, old, -wf.to(counts.dtype))
        sums[empty] = xf
        counts[empty] = wf.to(counts.dtype)
    labels[far] = empty


def _lloyd(
    X: torch.Tensor,
    x_sq: torch.Tensor | None,
    centers: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    cosine: bool,
    verbose: bool,
    desc: str,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, int, np.ndarray]:
    """Lloyd iterations as scikit-learn's ``_kmeans_single_lloyd``.

    Stops when the labels no longer change (strict convergence) or when the
    squared centroid shift is at most ``tol`` (already scaled). Returns
    centroids, labels consistent with them, inertia, iterations run and the
    inertia curve: entry ``i`` is the inertia of the centroids reached after
    ``i + 1`` iterations (each E-step measures the previous M-step's
    centroids, so the curve costs one sum per iteration; the last entry is
    the returned inertia).

    Host reads: **one per iteration**, a 3-element copy of the stopping
    flags (labels changed, a cluster empty, previous shift at most ``tol``),
    plus two in an iteration where a cluster is empty (re-seeding it reads
    which clusters are empty, and the label comparison is redone), and one
    at the end (the inertia curve). The shift test of an M-step is read
    after the next E-step, which is the E-step scikit-learn runs after its
    loop anyway: when the test stops the loop, that E-step's labels are the
    final labels, so nothing is computed twice and the results are those of
    a loop that tests at once.

    With token weights ``w`` (float64, or None), the weighted Lloyd of
    scikit-learn's ``KMeans(sample_weight=...)``: centroids are weighted
    means (renormalised for cosine: the weighted spherical mean), a cluster
    of zero weight is empty and the inertia is weighted. No extra host
    reads.
    """
    n, d = X.shape
    k = centers.shape[0]
    chunk = _chunk_rows(X.device, k, d)
    labels = torch.empty(n, dtype=torch.int64, device=X.device)
    labels_old = torch.full((n,), -1, dtype=torch.int64, device=X.device)
    best = torch.empty(n, dtype=X.dtype, device=X.device)
    sums = torch.empty(k, d, dtype=X.dtype, device=X.device)
    # squared shift of the last M-step; none yet
    shift = torch.full((), math.inf, dtype=torch.float64, device=X.device)
    strict = False
    n_iter = 0  # M-steps run
    measured = []  # inertia of each E-step: centroids after 0, 1, ... M-steps
    bar = tqdm(total=max_iter, desc=desc, disable=not verbose, leave=False)
    while True:
        sums.zero_()
        _assign(X, centers, cosine, chunk, labels, best, sums, w)
        if w is None:
            measured.append(_sq_distances(best, x_sq).sum(dtype=torch.float64))
            counts = _counts(labels, k)
        else:
            measured.append(_sq_distances(best, x_sq).double() @ w)
            counts = _counts(labels, k, torch.float64, w)
        flags = torch.stack(
            [(labels != labels_old).any(), (counts == 0).any(), shift <= tol]
        )
        changed, has_empty, settled = flags.tolist()  # the iteration's one read
        if settled or n_iter == max_iter:
            break  # labels and best are those of the final centroids
        if has_empty:
            _relocate_empty(X, x_sq, labels, best, sums, counts, w)
            changed = not torch.equal(labels, labels_old)
        kept = counts == 0  # still empty: fewer distinct tokens than clusters
        new = sums / counts.masked_fill(kept, 1).to(sums.dtype)[:, None]
        if cosine:
            new = _normalize_rows(new)
        new = torch.where(kept[:, None], centers, new)
        n_iter += 1
        bar.update()
        if not changed:
            strict = True
            centers = new
            break
        shift = ((new - centers) ** 2).sum().double()
        centers = new
        labels, labels_old = labels_old, labels
    bar.close()
    values = torch.stack(measured).cpu().numpy()
    # values[0] is the initial centroids' inertia; the rest follow M-steps.
    # On strict convergence the labels (and inertia) are those of the last
    # E-step, before the final M-step, which moved no label.
    curve = np.append(values[1:], values[-1]) if strict else values[1:]
    return centers, labels, float(values[-1]), n_iter, curve


def _minibatch_step(
    xb: torch.Tensor,
    centers: torch.Tensor,
    counts: torch.Tensor,
    cosine: bool,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One mini-batch k-means update, as scikit-learn's ``MiniBatchKMeans``.

    Every token of ``xb`` (trusted, unit rows for cosine) goes to its nearest
    centroid; a centroid ``j`` given ``n_j`` tokens of sum ``s_j`` moves to
    ``(c_j * N_j + s_j) / (N_j + n_j)`` -- a step of learning rate
    ``1 / count`` per token -- and ``N_j`` grows by ``n_j`` (``counts`` is
    float64 so that it stays exact beyond 2**24 tokens). Spherical k-means
    (``cosine``) projects the moved centroids back onto the sphere. Returns
    the new centroids and counts. With token weights ``w``, counts and sums
    are weighted (``N_j`` is the weight received), as scikit-learn's
    ``MiniBatchKMeans`` with ``sample_weight``.
    """
    k = centers.shape[0]
    neg_c_sq = None if cosine else -(centers * centers).sum(dim=1)
    labels = _similarity(xb, centers, neg_c_sq).argmax(dim=1)
    batch_counts = _counts(labels, k, counts.dtype, w)  # no read-back (bincount)
    if w is not None:
        xb = xb * w.to(xb.dtype)[:, None]
    sums = torch.zeros_like(centers).index_add_(0, labels, xb)
    new_counts = counts + batch_counts
    denom = new_counts.clamp_min(1.0)
    keep = (counts / denom).to(centers.dtype)[:, None]
    step = (1.0 / denom).to(centers.dtype)[:, None]
    moved = centers * keep + sums * step
    if cosine:
        moved = _normalize_rows(moved)
    new = torch.where((batch_counts > 0)[:, None], moved, centers)
    return new, new_counts


def _token_batches(
    X: Any, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``batch_size`` tokens of ``X`` on ``device``.

    ``X`` (2-D tokens or 4-D maps; in memory, a tensor or on-disk
    :class:`LazyFeatures`) is read in slices of about
    :func:`_stream_elements` values; tokens left over at the end of a slice
    open the next batch, so the batches do not depend on the slice size
    (only the last one may be smaller).
    """
    rows = rows_per_batch(int(np.prod(X.shape[1:])), _stream_elements(device))
    carry = None
    for sl in iter_slices(X.shape[0], rows):
        xb = as_tensor(X[sl], device)
        if xb.ndim == 4:
            xb = maps_to_tokens(xb)
        if carry is not None:
            xb = torch.cat([carry, xb])
        n_full = xb.shape[0] - xb.shape[0] % batch_size
        for start in range(0, n_full, batch_size):
            yield xb[start : start + batch_size]
        carry = xb[n_full:] if n_full < xb.shape[0] else None
    if carry is not None:
        yield carry


def _evaluate(
    X: torch.Tensor,
    x_sq: torch.Tensor | None,
    centers: torch.Tensor,
    cosine: bool,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Labels and inertia (weighted by ``w``) of (trusted, normalised for
    cosine) tokens."""
    n, d = X.shape
    labels = torch.empty(n, dtype=torch.int64, device=X.device)
    best = torch.empty(n, dtype=X.dtype, device=X.device)
    _assign(
        X, centers, cosine, _chunk_rows(X.device, centers.shape[0], d), labels, best
    )
    if w is None:
        return labels, float(_sq_distances(best, x_sq).sum(dtype=torch.float64))
    return labels, float(_sq_distances(best, x_sq).double() @ w)


def _import_faiss():
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:  # pragma: no cover - faiss is installed in CI
        raise ImportError(
            "KMeansProbe(backend='faiss') needs the faiss package "
            "(pip install faiss-cpu, or faiss-gpu for CUDA); or use "
            "backend='torch'."
        ) from exc


def _faiss_available() -> bool:
    try:
        importlib.import_module("faiss")
    except ImportError:  # pragma: no cover
        return False
    return True


#: Temporary GPU memory faiss may reserve for its distance tiles. faiss's
#: own default (``StandardGpuResources``) is a fraction of the card's total
#: memory, taken on top of what torch's caching allocator already holds.
_FAISS_GPU_TEMP_BYTES = 256 * 1024 * 1024


def _faiss_index(faiss: Any, d: int, cosine: bool, device: torch.device) -> tuple:
    """faiss's flat index for Lloyd's E-step, and its GPU resources.

    On the CPU for a CPU ``device`` (or when faiss sees no GPU). For a CUDA
    ``device``, on that one GPU (``cuda:N`` is GPU ``N``; ``cuda`` the current
    one) with at most :data:`_FAISS_GPU_TEMP_BYTES` of temporary memory, after
    torch's cached, unused blocks are released for it.
    ``faiss.Kmeans(gpu=True)`` instead replicates the index on every visible
    GPU, ignores ``cuda:N`` and reserves a share of each card. The resources
    (None on the CPU) must outlive the index.
    """
    index = faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)
    if device.type != "cuda" or faiss.get_num_gpus() == 0:
        return index, None
    gpu = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.empty_cache()  # give torch's unused cached blocks to faiss
    res = faiss.StandardGpuResources()
    res.setTempMemory(_FAISS_GPU_TEMP_BYTES)
    return faiss.index_cpu_to_gpu(res, gpu, index), res


def _faiss_centers(
    X: torch.Tensor,
    centers: torch.Tensor,
    *,
    max_iter: int,
    cosine: bool,
    seed: int,
    verbose: bool,
) -> tuple[torch.Tensor, np.ndarray]:
    """``max_iter`` Lloyd iterations of faiss from our initial centroids.

    ``faiss.Clustering`` with the index of :func:`_faiss_index` (on the GPU
    of ``X``'s device when it is CUDA), as ``faiss.Kmeans.train`` runs it.
    Also returns faiss's inertia after the first ``max_iter - 1`` iterations
    (the last is measured by the caller).
    """
    faiss = _import_faiss()
    n, d = X.shape
    k = centers.shape[0]
    cp = faiss.ClusteringParameters()
    cp.niter = max_iter
    cp.nredo = 1
    cp.spherical = cosine
    cp.seed = seed
    cp.verbose = bool(verbose)
    # faiss subsamples to 256 points per centroid by default; skstego has
    # already subsampled (max_samples), so train on everything given.
    cp.min_points_per_centroid = 1
    cp.max_points_per_centroid = max(1, -(-n // k))
    x_np = np.ascontiguousarray(X.detach().cpu().numpy(), dtype=np.float32)
    c_np = np.ascontiguousarray(centers.detach().cpu().numpy(), dtype=np.float32)
    clus = faiss.Clustering(d, k, cp)
    faiss.copy_array_to_vector(c_np.ravel(), clus.centroids)
    index, _resources = _faiss_index(faiss, d, cosine, X.device)
    clus.train(x_np, index)
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    # obj[i]: objective of the centroids after i updates (obj[0] the initial
    # ones); the sum of squared distances, or for spherical k-means (an
    # inner-product index) the sum of cosines, i.e. inertia n - obj / 2.
    stats = clus.iteration_stats
    obj = np.array([stats.at(i).obj for i in range(stats.size())], np.float64)
    if obj.size != max_iter:  # pragma: no cover - a faiss without the stats
        obj = np.full(max_iter, np.nan)
    elif cosine:
        obj = 2.0 * (n - obj)
    del index, _resources
    centroids = np.asarray(centroids, dtype=np.float32)
    return torch.from_numpy(centroids).to(X.device), obj[1:]


def _choose_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend="auto"``: torch, on every device (CUDA included).

    Measured on the 2-core CPU of the development machine (1M x 70 float32
    tokens, k=27, same k-means++ start; the machine was shared, so only
    same-run comparisons count):

    * one thread, CPU time per Lloyd iteration: torch 0.18-0.24 s, faiss
      0.16-0.20 s (sklearn 0.13-0.32 s): a tie within the noise;
    * two threads on the busy machine, best of 4 alternated runs: torch 1.9 s,
      faiss 3.7 s per iteration (sklearn 0.55 s): torch degraded less under
      contention;
    * torch honours ``tol`` and stops when the labels settle, where faiss always
      runs ``max_iter`` iterations (100 by default): on real data the torch
      backend does far fewer iterations at the default settings;
    * on a GPU the torch loop keeps the tokens on the device, where faiss takes
      host arrays (a device-to-host copy of all tokens first), and allocates
      through torch's caching allocator, where faiss-GPU needs memory of its
      own beside it (its temporary memory, the tokens it pages in, the
      index), which torch's cache may already hold.

    So "auto" is torch; faiss stays available as ``backend="faiss"``, which
    on CUDA runs on the estimator's GPU only, with bounded temporary memory
    (:func:`_faiss_index`).
    """
    if backend != "auto":
        return backend
    return "torch"


# --------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------


class KMeansProbe(
    CentroidProbeMixin,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """K-means cluster probe: spherical (STEGO) or Euclidean Lloyd k-means.

    Fits ``k`` centroids by Lloyd's algorithm on 2-D tokens ``(n, C)`` or on
    4-D feature maps ``(N, C, h, w)`` (every pixel is a token), on a GPU when
    one is available. With ``metric="cosine"`` (the default) tokens and
    centroids are L2-normalised and tokens go to the centroid of highest cosine
    similarity: spherical k-means, the STEGO cluster probe. With
    ``metric="euclidean"`` it is ordinary k-means, as
    :class:`sklearn.cluster.KMeans`.

    Clusters are mapped to classes by the Hungarian algorithm, which maximises
    the number of matched pixels: on the training labels when ``fit`` is given
    ``y`` (then :meth:`predict` returns classes), and on the evaluation data
    itself in :meth:`score` (the unsupervised segmentation protocol), over a
    fixed number of classes (``n_classes``). With more clusters than classes
    the extra clusters stay unmatched: they map to class -1 and by default
    **their pixels count as errors**. The STEGO reference code instead drops
    every pixel predicted as a cluster id ``>= n_classes`` before matching;
    ``score(..., extra_clusters="reference")`` reproduces that exactly (see
    :mod:`skstego.metrics`).

    :meth:`from_centroids` wraps centroids trained elsewhere (a STEGO
    checkpoint's ``cluster_probe.clusters``) as a fitted probe.

    Parameters
    ----------
    k : int, default=8
        Number of clusters. STEGO uses the number of classes (27 for
        COCO-Stuff) plus optional extra clusters.

    n_classes : int or None, default=None
        Number of classes the scores count (27 for COCO-Stuff), whatever
        classes the evaluated labels happen to contain: a class absent from
        them still takes part in the Hungarian matching and its IoU (0 when a
        cluster is matched to it) in the mean, as in the STEGO protocol.
        Labels must be below it. None: ``n_classes_`` when ``fit`` got ``y``,
        else the largest evaluated label + 1 (which forgets absent trailing
        classes). ``score(..., n_classes=...)`` overrides it. Does not affect
        the clustering.

    metric : {"cosine", "euclidean"}, default="cosine"
        ``"cosine"``: spherical k-means; inertia is then the sum of squared
        Euclidean distances between unit tokens and unit centroids,
        ``2 * sum(1 - cos)``. ``"euclidean"``: ordinary k-means.

    n_init : int, default=1
        Number of runs from different seeds; the run of lowest inertia wins.
        Ignored (one run) when ``init`` is an array.

    max_iter : int, default=100
        Most Lloyd iterations per run.

    tol : float, default=1e-4
        Relative tolerance on the squared centroid shift between two
        iterations, scaled by the mean feature variance of the (normalised,
        for cosine) training tokens, as in scikit-learn. A run also stops when
        no label changes. ``tol=0`` runs ``max_iter`` iterations unless the
        labels stop changing. The faiss backend always runs ``max_iter``
        iterations.

    init : {"k-means++", "random"} or array-like of shape (k, n_features), \
            default="k-means++"
        Initial centroids: greedy k-means++ seeding (as scikit-learn), ``k``
        distinct random tokens, or given centroids. Both backends start from
        these centroids.

    max_samples : int or None, default=1_000_000
        Fit on a random subsample of at most this many tokens (drawn from
        ``random_state``), then label every token. None uses all tokens.
        Up to ``max_samples`` tokens are gathered on ``device`` and iterated
        on there. With None, on-disk input (a FeatureStore, a zarr array, a
        memmap) and dask arrays are not gathered: each Lloyd iteration is
        one pass of per-chunk statistics (read slice by slice here, or
        computed on the dask workers), exact and in memory flat in the
        number of tokens; seeding uses at most 262,144 of the tokens and
        the torch backend runs whatever ``backend`` says.

    algorithm : {"lloyd", "minibatch"}, default="lloyd"
        ``"lloyd"``: exact Lloyd iterations on all tokens (or ``max_samples``
        of them), gathered on ``device`` or, for on-disk and dask input with
        ``max_samples=None``, streamed chunk by chunk at every iteration.
        ``"minibatch"``: mini-batch k-means
        (as :class:`sklearn.cluster.MiniBatchKMeans`, without its
        reassignment of small clusters): ``fit`` initialises on a random
        sample of ``max(3 * batch_size, 3 * k)`` tokens, then makes up to
        ``max_iter`` passes over all tokens, in order, by batches of
        ``batch_size``; each batch moves every centroid it touches with a
        learning rate of 1 / (tokens the centroid has received so far).
        Passes stop when the squared centroid shift over a whole pass is at
        most ``tol`` (scaled as for Lloyd). Memory is one batch, whatever the
        number of tokens: the mode for on-disk input too large to gather.
        ``max_samples``, ``backend`` and ``n_init`` beyond the initial sample
        do not apply. :meth:`partial_fit` always makes mini-batch steps.

    batch_size : int, default=1024
        Tokens per mini-batch step of ``algorithm="minibatch"``.

    compute_labels : bool, default=True
        Label every training token after ``fit`` (``labels_``, ``inertia_``),
        one streamed pass. With False and more tokens than were fitted
        (``max_samples`` or ``"minibatch"``), that pass and the O(n_tokens)
        ``labels_`` array are skipped: ``labels_`` and ``inertia_`` are then
        not set, and ``fit`` refuses ``y``.

    backend : {"auto", "torch", "faiss"}, default="auto"
        Lloyd implementation. ``"torch"``: chunked fused distance/argmax and
        ``index_add_`` (CPU) or one-hot GEMM (GPU) updates, memory bounded,
        any device. ``"faiss"``: faiss's Lloyd (``faiss.Clustering``, as
        :class:`faiss.Kmeans` runs it) from the same initial centroids;
        needs the ``faiss`` package; always runs ``max_iter`` iterations. On
        a CUDA ``device`` (and a faiss that sees GPUs) its index lives on
        that one GPU (``cuda:N`` is honoured, unlike
        ``faiss.Kmeans(gpu=True)``, which takes every GPU), with at most
        256 MiB of faiss temporary memory, after torch's unused cached
        blocks are released. ``"auto"`` picks torch, on the CPU and on CUDA:
        as fast as faiss on the CPU, it honours ``tol``, keeps the tokens on
        the GPU and allocates through torch's caching allocator, where
        faiss-GPU needs memory beside it.

    temperature : float, default=0.5
        Softness of :meth:`predict_proba`: a softmax of the cosine
        similarities (``metric="cosine"``) or of the negative squared
        distances (``"euclidean"``) to the centroids, divided by
        ``temperature``. The STEGO reference scales similarities by 2,
        i.e. ``temperature=0.5``. Does not affect fitting or
        :meth:`predict`.

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where to compute; ``"auto"`` is CUDA when available, else the CPU.
        Resolved in :meth:`fit`.

    random_state : int, RandomState instance or None, default=None
        Seeds the subsampling and the initialisation (through a
        :class:`torch.Generator` on ``device``). Pass an int for
        reproducible results on a given device type; random streams are
        device-dependent (see Notes).

    verbose : bool, default=False
        Show a tqdm progress bar over the Lloyd iterations of each run (faiss
        prints its own log instead), over the batches of each
        ``"minibatch"`` pass, and over the chunks labelled after a subsampled
        or mini-batch fit.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (k, n_features), float32
        Centroids; unit vectors for ``metric="cosine"``.

    labels_ : ndarray of int64, shape (n_samples,) or (N, h, w)
        Cluster of every token of the training data, in its layout.

    inertia_ : float
        Sum of squared distances of all training tokens to their centroid
        (normalised tokens and centroids for cosine).

    counts_ : ndarray of shape (k,), float64
        Tokens each centroid has been fitted on: the cluster sizes of the
        fitted tokens after a Lloyd fit, the tokens received by mini-batch
        steps otherwise. :meth:`partial_fit` continues from them.

    n_steps_ : int
        Mini-batch steps made (0 after a Lloyd fit).

    n_iter_ : int
        Lloyd iterations of the best run (``max_iter`` for faiss).

    inertia_curve_ : ndarray of shape (n_iter_,), float64
        Inertia of the best run after each Lloyd iteration (the centroids
        reached after iteration ``i + 1``, each token at its nearest one),
        on the tokens k-means was fitted on: non-increasing, and its last
        value is ``inertia_`` unless ``max_samples`` subsampled the tokens
        (``inertia_`` then covers every token). For the faiss backend, from
        faiss's per-iteration objective (``Kmeans.obj``; NaN where a faiss
        version lacks it), the last value measured as ``inertia_``.

    n_features_in_ : int
        Number of features (channels) seen during :meth:`fit`.

    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during :meth:`fit`, for 2-D input with string
        column names only.

    mapping_ : ndarray of shape (k,), int64
        Only when ``fit`` got ``y``: class of every cluster by the Hungarian
        assignment on the training confusion matrix; -1 for unmatched clusters.

    n_classes_ : int
        Only when ``fit`` got ``y``: the ``n_classes`` parameter, or without
        it the largest valid label + 1.

    See Also
    --------
    sklearn.cluster.KMeans : Euclidean k-means on the CPU.
    skstego.LinearProbe : Supervised probe on the same codes.
    skstego.metrics.segmentation_report : mIoU and accuracy of a segmentation.

    Notes
    -----
    Computation is in float32. The Euclidean distances use
    ``|x|^2 - 2 x.c + |c|^2`` in chunks with a fused argmax, and centroid sums
    use ``index_add_`` on the CPU and a one-hot matrix product on a GPU; empty
    clusters are re-seeded with the tokens farthest from their centroid, as
    scikit-learn does. Memory beyond the (sub)sampled tokens is O(n) plus one
    chunk. ``init`` and the input may be any float dtype (bfloat16 and
    float16 included); they are cast to float32.

    Random streams are device-dependent: the generator lives on ``device``,
    and CPU and CUDA generators give different numbers for one seed, so the
    ``max_samples`` subsample, the k-means++ / ``"random"`` seeding and the
    ``"minibatch"`` initial sample differ between a CPU and a CUDA fit with
    the same ``random_state`` (each is reproducible on its device type).
    Even from the same initial centroids, CUDA sums tokens in another order
    (a one-hot matrix product; ``index_add_`` with atomics elsewhere), so a
    token almost equidistant from two centroids may be labelled differently
    and the two fits can then drift apart by a few tokens: compare CPU and
    CUDA results by inertia, scores or agreement of labels, not by exact
    equality.

    On CUDA, fitting waits for the GPU once per Lloyd iteration (to test
    convergence; twice more in an iteration that re-seeds an empty
    cluster) and once per ``"minibatch"`` pass, never per mini-batch step.

    ``mapping_`` comes from the confusion matrix of ``labels_`` against ``y``
    over all training tokens (for label maps of another size, from scores
    upsampled to the label size). :meth:`score` ignores ``mapping_`` and
    matches clusters to classes on the data it is given.

    For 4-D maps, :meth:`predict` with ``size`` and :meth:`score` against label
    maps of another size (but the same aspect ratio) upsample the per-cluster
    scores bilinearly before the argmax; ``upsample="codes"`` upsamples the
    feature maps instead, then scores every pixel, as the STEGO reference
    does. For Euclidean k-means the score ``2 x.c - |c|^2`` is affine in
    ``x``, so both agree up to float rounding; for cosine similarities they
    differ near cluster boundaries (each upsampled code is normalised first).

    References
    ----------
    .. [1] Arthur, D. and Vassilvitskii, S. "k-means++: the advantages of careful
       seeding". SODA 2007.
    .. [2] Dhillon, I. S. and Modha, D. S. "Concept decompositions for large
       sparse text data using clustering". Machine Learning 42, 2001.
    .. [3] Hamilton, M. et al. "Unsupervised Semantic Segmentation by
       Distilling Feature Correspondences". ICLR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego import KMeansProbe
    >>> rng = np.random.default_rng(0)
    >>> X = np.concatenate([rng.normal(5, 1, (50, 4)), rng.normal(-5, 1, (50, 4))])
    >>> y = np.repeat([0, 1], 50)
    >>> probe = KMeansProbe(k=2, metric="euclidean", device="cpu", random_state=0)
    >>> probe.fit(X, y).cluster_centers_.shape
    (2, 4)
    >>> probe.score(X, y)
    1.0
    >>> maps = rng.normal(size=(3, 4, 6, 6)).astype(np.float32)
    >>> KMeansProbe(k=3, random_state=0).fit(maps).labels_.shape
    (3, 6, 6)
    """

    _parameter_constraints: ClassVar[dict] = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "n_classes": [Interval(Integral, 1, None, closed="left"), None],
        "metric": [StrOptions({"cosine", "euclidean"})],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "init": [StrOptions({"k-means++", "random"}), "array-like"],
        "max_samples": [Interval(Integral, 1, None, closed="left"), None],
        "algorithm": [StrOptions({"lloyd", "minibatch"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "compute_labels": ["boolean"],
        "backend": [StrOptions({"auto", "torch", "faiss"})],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        k: int = 8,
        *,
        n_classes: int | None = None,
        metric: str = "cosine",
        n_init: int = 1,
        max_iter: int = 100,
        tol: float = 1e-4,
        init: Any = "k-means++",
        max_samples: int | None = 1_000_000,
        algorithm: str = "lloyd",
        batch_size: int = 1024,
        compute_labels: bool = True,
        backend: str = "auto",
        temperature: float = 0.5,
        device: str | torch.device | None = "auto",
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.k = k
        self.n_classes = n_classes
        self.metric = metric
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.max_samples = max_samples
        self.algorithm = algorithm
        self.batch_size = batch_size
        self.compute_labels = compute_labels
        self.backend = backend
        self.temperature = temperature
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # --------------------------------------------------------- constructors

    @classmethod
    def from_centroids(
        cls,
        centroids: Any,
        *,
        metric: str = "cosine",
        n_classes: int | None = None,
        temperature: float = 0.5,
        device: str | torch.device | None = "auto",
    ) -> KMeansProbe:
        """A fitted probe from given centroids, without fitting.

        For centroids trained elsewhere, e.g. the ``cluster_probe.clusters``
        of a STEGO checkpoint (the reference's ``ClusterLookup``, k = 27 +
        extra clusters): :meth:`predict` is then the argmax of the cosine
        similarity between normalised codes and normalised centroids, as
        ``ClusterLookup.forward`` computes, and :meth:`predict_log_proba` at
        the default ``temperature=0.5`` is its ``log_softmax(inner * 2)``.
        The probe has no ``mapping_``: :meth:`predict` returns cluster ids and
        :meth:`score` matches clusters to classes on the evaluated data, as
        the reference evaluation does (pass ``n_classes``).

        Parameters
        ----------
        centroids : array-like or torch.Tensor of shape (k, n_features)
            The centroids. For ``metric="cosine"`` they are L2-normalised
            (``cluster_centers_`` holds unit vectors), as the reference
            normalises its clusters at every call.
        metric : {"cosine", "euclidean"}, default="cosine"
            Assignment rule: highest cosine similarity, or nearest centroid.
        n_classes : int or None, default=None
            Number of classes the scores count, see the class parameters.
        temperature : float, default=0.5
            Softness of :meth:`predict_proba` (0.5 is the reference's alpha 2).
        device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, \
                default="auto"
            Where to compute.

        Returns
        -------
        probe : KMeansProbe
            Fitted: ``cluster_centers_``, ``n_features_in_``, ``counts_``
            (zeros: :meth:`partial_fit` starts from the centroids with a
            learning rate of 1), ``n_iter_ = n_steps_ = 0`` and an empty
            ``inertia_curve_``; no ``labels_`` nor ``inertia_``. ``k`` is the
            number of centroids and ``init`` the (normalised) centroids, so
            that a clone refits from them.

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import KMeansProbe
        >>> probe = KMeansProbe.from_centroids([[2.0, 0.0], [0.0, 0.5]])
        >>> probe.cluster_centers_
        array([[1., 0.],
               [0., 1.]], dtype=float32)
        >>> probe.predict(np.array([[3.0, 1.0], [0.1, 1.0]]))
        array([0, 1])
        """
        c = _as_float32(centroids)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(
                f"centroids must be a non-empty 2-D array (k, n_features), got "
                f"shape {c.shape}."
            )
        if not np.all(np.isfinite(c)):
            raise ValueError("centroids contain NaN or infinity.")
        if metric == "cosine":
            c = _normalize_rows(torch.from_numpy(c)).numpy()
        probe = cls(
            k=c.shape[0],
            n_classes=n_classes,
            metric=metric,
            init=c.copy(),
            temperature=temperature,
            device=device,
        )
        probe._validate_params()
        probe.cluster_centers_ = c
        probe.n_features_in_ = int(c.shape[1])
        probe.counts_ = np.zeros(c.shape[0], dtype=np.float64)
        probe.n_iter_ = 0
        probe.n_steps_ = 0
        probe.inertia_curve_ = np.empty(0, dtype=np.float64)
        return probe

    # ---------------------------------------------------------------- fit

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> KMeansProbe:
        """Fit the centroids (and, given ``y``, the cluster-to-class mapping).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps. Not modified. On-disk input (a
            :class:`~skstego.features.FeatureStore`, a zarr or dask array, a
            NumPy memmap) is read chunk by chunk: only the tokens the Lloyd
            loop runs on (all, or ``max_samples`` of them) are gathered on
            ``device``, never a host copy of the whole input.
        y : array-like or torch.Tensor of int, default=None
            Optional labels, (n_samples,) for tokens or label maps (N, H, W)
            for maps (any H, W of the maps' aspect ratio; scores are
            upsampled bilinearly to it); -1 is ignored. When given,
            ``mapping_`` and ``n_classes_`` are fitted.
        sample_weight : array-like of shape (n_samples,), (N,) or (N, h, w), \
                default=None
            Non-negative, finite weight of every token (2-D input), of every
            image (4-D maps: each of its pixels gets it) or of every pixel of
            the feature maps (N, h, w). None weighs all tokens alike. The
            Lloyd centroids are weighted means (cosine: the weighted
            spherical mean), k-means++ and ``"random"`` seeding draw tokens
            in proportion to their weight, ``tol`` is relative to the
            weighted variance, mini-batch steps and ``counts_`` count weight,
            and ``inertia_`` is weighted, so an integer weight equals
            repeating the token. Needs in-memory input or, for on-disk input,
            a fit that gathers its tokens (``max_samples`` below the number
            of tokens, or ``algorithm="minibatch"``); dask arrays,
            streamed Lloyd passes and ``backend="faiss"`` raise a ValueError.

        Returns
        -------
        self : KMeansProbe
            Fitted estimator.
        """
        X = check_features(self, X, reset=True, lazy=True)
        if is_torch(X):
            X = X.detach()  # no autograd graph through the Lloyd loop
        if y is not None:
            y = check_targets(X, y)
        device = resolve_device(self.device)
        backend = _choose_backend(self.backend, device)
        if backend == "faiss":
            if sample_weight is not None:
                raise ValueError(
                    "backend='faiss' does not take sample_weight; use "
                    "backend='torch' (or 'auto')."
                )
            _import_faiss()
        cosine = self.metric == "cosine"
        gen = make_generator(self.random_state, device)

        n_total = X.shape[0] if X.ndim == 2 else X.shape[0] * X.shape[2] * X.shape[3]
        subsample = self.max_samples is not None and n_total > self.max_samples
        n_fit = self.max_samples if subsample else n_total
        if n_fit < self.k:
            raise ValueError(
                f"n_samples={n_fit} should be >= k={self.k}: k-means needs at "
                f"least as many (sub)sampled tokens as clusters."
            )
        init = self.init
        if not isinstance(init, str):
            init_arr = _as_float32(init)
            if init_arr.shape != (self.k, self.n_features_in_):
                raise ValueError(
                    f"init has shape {init_arr.shape}; expected (k, n_features) = "
                    f"({self.k}, {self.n_features_in_})."
                )
            if not np.all(np.isfinite(init_arr)):
                raise ValueError("init contains NaN or infinity.")
            init = init_arr
        if y is not None and not self.compute_labels:
            raise ValueError(
                "fit(X, y) maps clusters to classes through labels_: pass "
                "compute_labels=True, or fit without y."
            )
        chunked = dask_source(X)
        if chunked is None and self.max_samples is None:
            chunked = X if isinstance(X, LazyFeatures) else None
        wt = self._token_weights(
            X,
            sample_weight,
            device,
            streamed=chunked is not None
            and not subsample
            and self.algorithm == "lloyd",
        )
        if self.algorithm == "minibatch":
            return self._fit_minibatch(X, y, init, n_total, device, gen, wt)
        if not subsample and chunked is not None:
            # Exact Lloyd passes of per-chunk statistics: computed by dask on
            # its workers, or slice by slice from on-disk input here.
            fitted = kmeans_lloyd(self, chunked, init, gen, n_total)
            centers, labels, inertia, n_iter, curve, counts = fitted
            if labels is not None:
                labels = labels.to(device)
            self.n_steps_ = 0
            return self._set_fitted(
                X, y, centers.to(device), counts, labels, inertia, n_iter, curve
            )

        if subsample:
            idx = _sample_indices(n_total, self.max_samples, gen)
            Xs = _gather_tokens(X, idx, device)
            ws = None if wt is None else wt[idx.to(device)]
        else:
            Xs = _all_tokens(X, device)
            ws = wt
        if ws is not None:
            _check_positive(ws, self.k)
        scale = 1.0
        if cosine:
            Xs = _normalize_rows(Xs)
            x_sq = None
            x_sq_init = torch.ones(Xs.shape[0], dtype=Xs.dtype, device=device)
        else:
            # values >= ~1e19 overflow float32 squared norms: fit on X / 2^p
            scale = _overflow_scale(Xs)
            if scale != 1.0:
                Xs = Xs / scale
                if not isinstance(init, str):
                    init = init / scale
            x_sq = x_sq_init = _row_sq_norms(Xs)
        # As scikit-learn: tol relative to the mean feature variance.
        tol = _mean_variance(Xs, ws) * self.tol if self.tol > 0 else 0.0

        n_init = self.n_init if isinstance(init, str) else 1
        best = None
        for run in range(n_init):
            centers = _init_centers(Xs, x_sq_init, self.k, init, gen, cosine, ws)
            desc = f"k-means run {run + 1}/{n_init}"
            if backend == "faiss":
                seed = int(
                    torch.randint(2**31 - 1, (1,), generator=gen, device=gen.device)
                )
                centers, curve = _faiss_centers(
                    Xs,
                    centers,
                    max_iter=self.max_iter,
                    cosine=cosine,
                    seed=seed,
                    verbose=self.verbose,
                )
                labels, inertia = _evaluate(Xs, x_sq, centers, cosine)
                n_iter = self.max_iter
                curve = np.append(curve, inertia)
            else:
                centers, labels, inertia, n_iter, curve = _lloyd(
                    Xs,
                    x_sq,
                    centers,
                    max_iter=self.max_iter,
                    tol=tol,
                    cosine=cosine,
                    verbose=self.verbose,
                    desc=desc,
                    w=ws,
                )
            if best is None or inertia < best[2]:
                best = (centers, labels, inertia, n_iter, curve)
        centers, labels, inertia, n_iter, curve = best
        del Xs, x_sq, x_sq_init
        counts = _counts(labels, self.k, torch.float64, ws)
        _warn_if_degenerate(labels, self.k)
        if scale != 1.0:
            centers, inertia, curve = (
                centers * scale,
                inertia * scale**2,
                curve * scale**2,
            )
        if subsample and not self.compute_labels:
            labels = None
        elif subsample:
            labels, inertia = self._label_all(X, centers, cosine, device, wt)
        self.n_steps_ = 0
        return self._set_fitted(X, y, centers, counts, labels, inertia, n_iter, curve)

    def _token_weights(
        self,
        X: Any,
        sample_weight: Any,
        device: torch.device,
        streamed: bool = False,
    ) -> torch.Tensor | None:
        """Checked ``sample_weight`` as one float64 weight per token of ``X``
        on ``device`` (None without weights)."""
        if sample_weight is None:
            return None
        if dask_source(X) is not None or streamed:
            raise ValueError(
                "sample_weight needs in-memory input or gathered tokens: "
                "dask arrays and streamed Lloyd passes (on-disk input with "
                "max_samples=None) do not take it. Load the features in "
                "memory, set max_samples, or use algorithm='minibatch'."
            )
        pixel_shape = (X.shape[0], *X.shape[2:]) if X.ndim == 4 else None
        w = check_weights(sample_weight, X.shape[0], pixel_shape)
        if not np.any(w > 0):
            raise ValueError(
                "Sample weights must contain at least one non-zero number."
            )
        return token_weights(w, tuple(X.shape), device)

    def _set_fitted(
        self,
        X: Any,
        y: Any,
        centers: torch.Tensor,
        counts: torch.Tensor,
        labels: torch.Tensor | None,
        inertia: float,
        n_iter: int,
        curve: np.ndarray,
    ) -> KMeansProbe:
        """Store the fitted attributes (and, given ``y``, the class mapping)."""
        device = centers.device
        self.cluster_centers_ = centers.detach().cpu().numpy().astype(np.float32)
        self.counts_ = counts.detach().cpu().numpy().astype(np.float64)
        self.n_iter_ = int(n_iter)
        self.inertia_curve_ = np.asarray(curve, dtype=np.float64)
        for name in ("mapping_", "n_classes_", "labels_", "inertia_"):
            self.__dict__.pop(name, None)
        if labels is None:
            return self
        if X.ndim == 4:
            labels = labels.reshape(X.shape[0], X.shape[2], X.shape[3])
        self.labels_ = labels.cpu().numpy()
        self.inertia_ = float(inertia)
        if y is not None:
            self._fit_mapping(X, y, labels, device)
        return self

    def _fit_minibatch(
        self,
        X: Any,
        y: Any,
        init: Any,
        n_total: int,
        device: torch.device,
        gen: torch.Generator,
        wt: torch.Tensor | None = None,
    ) -> KMeansProbe:
        """``fit`` with ``algorithm="minibatch"``: passes of mini-batch steps."""
        cosine = self.metric == "cosine"
        n_init_tokens = min(n_total, max(3 * self.batch_size, 3 * self.k))
        idx = _sample_indices(n_total, n_init_tokens, gen)
        Xi = _gather_tokens(X, idx, device)
        wi = None if wt is None else wt[idx.to(device)]
        if wt is not None:
            _check_positive(wt, self.k)
            if not bool((wi > 0).any()):
                wi = None  # no weight in the sample: seed unweighted
        centers = self._minibatch_init(Xi, init, gen, wi)
        tol = _mean_variance(Xi, wi) * self.tol if self.tol > 0 else 0.0
        del Xi
        counts = torch.zeros(self.k, dtype=torch.float64, device=device)
        n_steps = n_iter = 0
        n_batches = -(-n_total // self.batch_size)
        for n_iter in range(1, self.max_iter + 1):
            before = centers
            offset = 0
            for xb in tqdm(
                _token_batches(X, self.batch_size, device),
                total=n_batches,
                desc=f"mini-batch k-means pass {n_iter}",
                disable=not self.verbose,
                leave=False,
            ):
                if cosine:
                    xb = _normalize_rows(xb)
                wb = None if wt is None else wt[offset : offset + xb.shape[0]]
                offset += xb.shape[0]
                centers, counts = _minibatch_step(xb, centers, counts, cosine, wb)
                n_steps += 1
            if float(((centers - before) ** 2).sum()) <= tol:
                break
        labels, inertia = None, float("nan")
        if self.compute_labels:
            labels, inertia = self._label_all(X, centers, cosine, device, wt)
            _warn_if_degenerate(labels, self.k)
        self.n_steps_ = n_steps
        curve = np.asarray([inertia]) if labels is not None else np.empty(0)
        return self._set_fitted(X, y, centers, counts, labels, inertia, n_iter, curve)

    def _minibatch_init(
        self,
        Xi: torch.Tensor,
        init: Any,
        gen: torch.Generator,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial centroids from tokens ``Xi``: best of ``n_init`` seedings."""
        cosine = self.metric == "cosine"
        if cosine:
            Xi = _normalize_rows(Xi)
            x_sq = None
            x_sq_init = torch.ones(Xi.shape[0], dtype=Xi.dtype, device=Xi.device)
        else:
            x_sq = x_sq_init = _row_sq_norms(Xi)
        best = None
        for _ in range(self.n_init if isinstance(init, str) else 1):
            centers = _init_centers(Xi, x_sq_init, self.k, init, gen, cosine, w)
            inertia = _evaluate(Xi, x_sq, centers, cosine, w)[1]
            if best is None or inertia < best[1]:
                best = (centers, inertia)
        return best[0]

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(
        self, X: Any, y: Any = None, sample_weight: Any = None
    ) -> KMeansProbe:
        """One mini-batch k-means step on the tokens of ``X``.

        The first call (on an unfitted probe) initialises the centroids from
        ``X`` (``init``, best of ``n_init`` by inertia on ``X``); every call
        then moves each centroid to the running mean of the tokens it has
        received, as :meth:`sklearn.cluster.MiniBatchKMeans.partial_fit`:
        ``c <- (c * N + sum) / (N + n)`` over the ``n`` tokens of ``X``
        nearest to it, ``N`` its count so far (``counts_``), renormalised for
        ``metric="cosine"``. After a ``fit`` it continues from the fitted
        centroids and counts.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            One batch of tokens or feature maps (all of it is one step; on-disk
            input is gathered on ``device``). Not modified.
        y : None
            Ignored; present for API consistency. ``mapping_`` is dropped.
        sample_weight : array-like of shape (n_samples,), (N,) or (N, h, w), \
                default=None
            Weight of every token, image or feature-map pixel, as in
            :meth:`fit`: each centroid moves to the weighted running mean
            and ``counts_`` adds up weight (as ``MiniBatchKMeans``). Not
            for dask input.

        Returns
        -------
        self : KMeansProbe
            The updated estimator; ``labels_`` and ``inertia_`` (when
            ``compute_labels``) are those of this batch under the updated
            centroids.

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import KMeansProbe
        >>> rng = np.random.default_rng(0)
        >>> probe = KMeansProbe(k=2, metric="euclidean", device="cpu", random_state=0)
        >>> for _ in range(5):
        ...     batch = np.concatenate([rng.normal(5, 1, (20, 3)),
        ...                             rng.normal(-5, 1, (20, 3))])
        ...     probe = probe.partial_fit(batch)
        >>> probe.counts_.tolist(), probe.n_steps_
        ([100.0, 100.0], 5)
        """
        first = not hasattr(self, "counts_")
        X = check_features(self, X, reset=first, lazy=True)
        if is_torch(X):
            X = X.detach()
        device = self._resolved_device()
        cosine = self.metric == "cosine"
        wt = self._token_weights(X, sample_weight, device)
        tokens = _all_tokens(X, device)
        if first and wt is not None:
            _check_positive(wt, self.k)
        if first:
            if tokens.shape[0] < self.k:
                raise ValueError(
                    f"The first partial_fit batch has {tokens.shape[0]} tokens; "
                    f"it should have >= k={self.k} to initialise the centroids."
                )
            init = self.init
            if not isinstance(init, str):
                init = _as_float32(init)
                if init.shape != (self.k, self.n_features_in_):
                    raise ValueError(
                        f"init has shape {init.shape}; expected (k, n_features) "
                        f"= ({self.k}, {self.n_features_in_})."
                    )
            gen = make_generator(self.random_state, device)
            centers = self._minibatch_init(tokens, init, gen, wt)
            counts = torch.zeros(self.k, dtype=torch.float64, device=device)
            n_steps = 0
        else:
            centers = as_tensor(self.cluster_centers_, device)
            counts = torch.as_tensor(self.counts_, dtype=torch.float64).to(device)
            n_steps = getattr(self, "n_steps_", 0)
        if cosine:
            tokens = _normalize_rows(tokens)
        centers, counts = _minibatch_step(tokens, centers, counts, cosine, wt)
        labels, inertia = None, float("nan")
        if self.compute_labels:
            x_sq = None if cosine else _row_sq_norms(tokens)
            labels, inertia = _evaluate(tokens, x_sq, centers, cosine, wt)
        self.n_steps_ = n_steps + 1
        curve = np.asarray([inertia]) if labels is not None else np.empty(0)
        return self._set_fitted(X, None, centers, counts, labels, inertia, 1, curve)

    def _label_all(
        self,
        X: Any,
        centers: torch.Tensor,
        cosine: bool,
        device: torch.device,
        wt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Labels and inertia (weighted by token weights ``wt``) of every
        token of ``X``, batch by batch.

        On dask input every chunk is labelled on its worker.
        """
        if dask_source(X) is not None:
            labels, inertia, _ = label_tokens(
                dask_source(X), centers.cpu().numpy(), cosine, self.device
            )
            return torch.from_numpy(labels).to(device), inertia
        per_row = int(np.prod(X.shape[1:])) * 2 + self.k * (
            int(np.prod(X.shape[2:])) if X.ndim == 4 else 1
        )
        out, inertia = [], 0.0
        per_image = int(np.prod(X.shape[2:])) if X.ndim == 4 else 1
        with torch.no_grad():
            rows = rows_per_batch(per_row, _stream_elements(device))
            for sl in tqdm(
                iter_slices(X.shape[0], rows),
                total=-(-X.shape[0] // rows),
                desc="k-means labels",
                disable=not self.verbose,
                leave=False,
            ):
                xb = as_tensor(X[sl], device)
                if xb.ndim == 4:
                    xb = maps_to_tokens(xb)
                scale = 1.0 if cosine else _overflow_scale(centers)
                xb, x_sq = _prepare_tokens(xb / scale if scale != 1.0 else xb, cosine)
                wb = (
                    None
                    if wt is None
                    else wt[sl.start * per_image : sl.stop * per_image]
                )
                lab, part = _evaluate(xb, x_sq, centers / scale, cosine, wb)
                inertia += part * scale**2
                out.append(lab)
        return torch.cat(out), inertia

    # ------------------------------------------------------------ scoring fns

    # ------------------------------------------------------------ inference

    def transform(self, X: Any) -> Any:
        """Similarities (cosine) or distances (Euclidean) to every centroid.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps.

        Returns
        -------
        X_new : ndarray or torch.Tensor of float32, shape (n_samples, k) or \
                (N, k, h, w)
            Cosine similarities for ``metric="cosine"``, Euclidean distances for
            ``metric="euclidean"``.
        """
        if is_dask(X):
            return map_method(self, "transform", X, self.k)
        X = self._check_X(X)
        device = self._resolved_device()
        centers = self._tensor("cluster_centers_", device)
        if self.metric == "cosine":

            def fn(xb: torch.Tensor) -> torch.Tensor:
                return _normalize_rows(xb) @ centers.T

        else:
            c_sq = (centers * centers).sum(dim=1)

            def fn(xb: torch.Tensor) -> torch.Tensor:
                d = torch.addmm(c_sq, xb, centers.T, alpha=-2.0)
                return d.add_((xb * xb).sum(dim=1, keepdim=True)).clamp_min_(0).sqrt_()

        return apply_tokenwise(fn, X, device=device, out_features=self.k)

    # --------------------------------------------------------------- misc

    @property
    def _n_features_out(self) -> int:
        return self.cluster_centers_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _warn_if_degenerate(labels: torch.Tensor, k: int) -> None:
    """Warn as :class:`sklearn.cluster.KMeans` does when fewer than ``k``
    clusters hold tokens (duplicate or too few distinct tokens)."""
    distinct = int((_counts(labels, k) > 0).sum())
    if distinct < k:
        warnings.warn(
            f"Number of distinct clusters ({distinct}) found smaller than "
            f"k ({k}). Possibly due to duplicate points in X.",
            ConvergenceWarning,
            stacklevel=4,
        )


def _check_positive(w: torch.Tensor, k: int) -> None:
    """Raise unless at least ``k`` tokens have a positive weight."""
    n_pos = int((w > 0).sum())
    if n_pos < k:
        raise ValueError(
            f"sample_weight has {n_pos} positive weights among the fitted "
            f"tokens; k-means needs at least k={k}."
        )


def _as_float32(a: Any) -> np.ndarray:
    """An array-like or tensor of any float dtype (bf16 and fp16 included) as
    float32 NumPy: NumPy has no bfloat16, so tensors are cast by torch."""
    if is_torch(a):
        return a.detach().to("cpu", torch.float32).numpy()
    return np.asarray(a, dtype=np.float32)


def _sample_indices(n_total: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` distinct token numbers below ``n_total``, sorted, drawn from ``gen``.

    Memory is O(m), not O(n_total): NumPy's ``Generator.choice`` without
    replacement uses a hash set (Floyd's algorithm) when ``m`` is a small
    fraction of ``n_total``, so a billion-token store costs no index array
    of its size.
    """
    seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    idx = np.random.default_rng(seed).choice(n_total, size=m, replace=False)
    return torch.from_numpy(np.sort(idx))


def _all_tokens(X: Any, device: torch.device) -> torch.Tensor:
    """All tokens of ``X`` as one (n, C) float32 tensor on ``device``."""
    if isinstance(X, LazyFeatures):
        return _gather_lazy(X, None, device)
    Xt = as_tensor(X, device)
    return maps_to_tokens(Xt) if Xt.ndim == 4 else Xt


def _gather_lazy(
    X: LazyFeatures, idx: np.ndarray | None, device: torch.device
) -> torch.Tensor:
    """Tokens ``idx`` (sorted; None for all) of on-disk ``X``, read by chunks.

    The (len(idx), C) float32 result is filled on ``device`` chunk by chunk;
    the host never holds more than a chunk (and its prefetched successor).
    """
    per_image = int(np.prod(X.shape[2:])) if X.ndim == 4 else 1
    n_tokens = X.shape[0] * per_image
    out = torch.empty(n_tokens if idx is None else len(idx), X.shape[1], device=device)
    rows = rows_per_batch(int(np.prod(X.shape[1:])), _stream_elements(device))
    filled = 0
    for sl in iter_slices(X.shape[0], rows):
        lo, hi = sl.start * per_image, sl.stop * per_image
        if idx is not None:
            a, b = np.searchsorted(idx, [lo, hi])
            if a == b:
                continue
            local = idx[a:b] - lo
        xb = X[sl]
        if X.ndim == 4:
            xb = xb.reshape(xb.shape[0], xb.shape[1], per_image)
            xb = xb.transpose(0, 2, 1).reshape(-1, X.shape[1])
        if idx is not None:
            xb = xb[local]
        out[filled : filled + xb.shape[0]] = as_tensor(xb, device)
        filled += xb.shape[0]
    return out


def _gather_tokens(X: Any, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Tokens number ``idx`` (image-major, row-major for maps) of ``X``."""
    if dask_source(X) is not None:
        return as_tensor(gather_tokens(dask_source(X), idx.cpu().numpy()), device)
    if isinstance(X, LazyFeatures):
        return _gather_lazy(X, idx.cpu().numpy(), device)
    if is_torch(X):
        idx = idx.to(X.device)
        if X.ndim == 2:
            sub = X[idx]
        else:
            n, c, h, w = X.shape
            sub = X.reshape(n, c, h * w)[idx // (h * w), :, idx % (h * w)]
        return as_tensor(sub, device)
    idx_np = idx.cpu().numpy()
    if X.ndim == 2:
        sub = X[idx_np]
    else:
        n, c, h, w = X.shape
        sub = X.reshape(n, c, h * w)[idx_np // (h * w), :, idx_np % (h * w)]
    return as_tensor(sub, device)
