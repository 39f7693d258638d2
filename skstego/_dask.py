"""Dask support: fits from per-chunk statistics, lazy transform and predict.

When an estimator is given a :class:`dask.array.Array`, the work is split
along its chunks and run by dask's current scheduler (the
:class:`distributed.Client` in use, when there is one), so the tokens are read
and reduced where they live and only small statistics come back:

* :func:`pca_statistics`: count, mean and scatter matrix of every chunk
  (TorchPCA's own chunk accumulation, run on the worker), merged on the
  client in float64 (Chan et al.) and finalised by TorchPCA itself;
* :func:`kmeans_lloyd`: each Lloyd iteration is one pass of per-chunk
  centroid sums, counts and inertia, reduced on the client. The passes run
  over :class:`DaskChunks` (dask tasks) or, for on-disk input that is not a
  dask array, :class:`LazyChunks` (slices read in turn in this process, the
  next one prefetched), so exact k-means streams stores and memmaps too;
* :func:`map_method`: ``transform`` / ``predict`` as a lazy dask array,
  mapped over the chunks (the fitted estimator, whose attributes are NumPy,
  is shipped to the workers and run on NumPy blocks there).

Layouts: 2-D tokens must be chunked along rows only and 4-D maps
``(N, C, h, w)`` along images only; other chunkings are rechunked first
(``X.rechunk({1: -1})`` and so on), which dask does lazily, chunk by chunk.
dask is an optional dependency (``pip install skstego[dask]``); this module
imports it only when given a dask array.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._device import (
    as_tensor,
    is_dask,
    iter_slices,
    maps_to_tokens,
    resolve_device,
    rows_per_batch,
    to_host,
)

__all__ = [
    "gather_tokens",
    "is_dask",
    "kmeans_lloyd",
    "label_tokens",
    "map_method",
    "merge_moments",
    "pca_statistics",
    "token_moments",
]

#: Most tokens drawn from a dask array for the k-means++ / random seeding.
SEED_SAMPLES = 1 << 18


def _by_rows(X: Any) -> Any:
    """``X`` chunked along its first axis only (tokens or whole images)."""
    if any(len(c) > 1 for c in X.chunks[1:]):
        X = X.rechunk({axis: -1 for axis in range(1, X.ndim)})
    return X


def _blocks(X: Any) -> list:
    """One delayed NumPy block per row chunk of ``X``."""
    return list(_by_rows(X).to_delayed().ravel())


def _checked(block: Any) -> np.ndarray:
    """A block as C-contiguous float32 (float64 kept), checked for NaN/inf."""
    dtype = np.float64 if np.dtype(block.dtype) == np.float64 else np.float32
    block = np.ascontiguousarray(np.asarray(block), dtype=dtype)
    if not np.isfinite(block).all():
        raise ValueError(
            "Input X contains NaN or infinity (in a dask chunk); remove or "
            "impute those values before calling skstego."
        )
    return block


def _tokens(block: Any, device: torch.device) -> torch.Tensor:
    """(n, C) float32 tokens of a 2-D or 4-D block, on ``device``."""
    x = as_tensor(_checked(block), device)
    return maps_to_tokens(x) if x.ndim == 4 else x


def _compute(tasks: list) -> list:
    import dask

    return list(dask.compute(*tasks))


# --------------------------------------------------------------------- PCA


def _block_scatter(block: Any, device: Any) -> tuple[int, np.ndarray, np.ndarray]:
    from .projection._pca import _scatter

    return _scatter(_checked(block), resolve_device(device), None)


def pca_statistics(X: Any, device: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, float64 mean and scatter matrix of a dask array, by chunks.

    Each chunk's statistics are computed on a worker with TorchPCA's own
    accumulation (``device`` is resolved there), then merged on the client
    with Chan et al.'s pairwise update, in float64.

    Parameters
    ----------
    X : dask.array.Array of shape (n, C) or (N, C, h, w)
    device : str or torch.device
        The estimator's ``device`` parameter, resolved on each worker.

    Returns
    -------
    n : int
    mean : ndarray of shape (C,), float64
    scatter : ndarray of shape (C, C), float64
    """
    import dask

    task = dask.delayed(_block_scatter, pure=True)
    parts = _compute([task(b, device) for b in _blocks(X)])
    n, mean, scatter = parts[0]
    for n_b, mean_b, scatter_b in parts[1:]:
        total = n + n_b
        delta = mean_b - mean
        scatter = scatter + scatter_b + np.outer(delta, delta) * (n * n_b / total)
        mean = mean + delta * (n_b / total)
        n = total
    return n, mean, scatter


# ------------------------------------------------------------------ chunks


class DaskChunks:
    """The row chunks of a dask array; per-chunk functions run as dask tasks.

    ``map(fn, *args)`` computes ``fn(block, *args)`` for every chunk with
    dask's current scheduler (on the workers of a ``distributed.Client``)
    and returns the results in order (read them once: :class:`LazyChunks`
    yields them lazily); ``gather(idx)`` returns the tokens ``idx``
    (sorted), selected where the chunks live.
    """

    def __init__(self, X: Any) -> None:
        self.X = _by_rows(X)
        self.blocks = _blocks(self.X)

    def map(self, fn: Any, *args: Any) -> list:
        import dask

        task = dask.delayed(fn, pure=True)
        return _compute([task(block, *args) for block in self.blocks])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        return gather_tokens(self.X, idx)


class LazyChunks:
    """Slices of on-disk input, read one after the other in this process.

    The same ``map`` / ``gather`` as :class:`DaskChunks` for a
    :class:`~skstego._device.LazyFeatures` (a FeatureStore, a zarr array, a
    memmap, generated tokens): ``fn`` runs on each slice as it is read (the
    next one prefetched meanwhile), so memory holds about two slices
    whatever the size of the input.
    """

    def __init__(self, X: Any, rows: int, progress: str | None = None) -> None:
        self.X = X
        self.rows = int(rows)
        self.progress = progress

    def map(self, fn: Any, *args: Any) -> Iterator:
        """``fn(slice, *args)`` for every slice, lazily: read the results once.

        Callers fold each result into their running totals before the next
        slice is read: results kept across a pass, however small, would pin
        the heap pages that each slice's temporaries were freed from, and
        the process's memory would grow with the number of slices.
        """
        slices = iter_slices(self.X.shape[0], self.rows, progress=self.progress)
        return (fn(self.X[sl], *args) for sl in slices)

    def gather(self, idx: np.ndarray) -> np.ndarray:
        from .probes._kmeans import _gather_lazy

        return _gather_lazy(self.X, idx, torch.device("cpu")).numpy()


def chunks_of(
    X: Any, progress: str | None = None, device: Any = "auto"
) -> DaskChunks | LazyChunks:
    """:class:`DaskChunks` for a dask array, :class:`LazyChunks` otherwise.

    ``progress`` (a description) shows a bar over the slices of each pass
    of on-disk input; ``device`` (where the slices are computed on) sets
    their size.
    """
    if is_dask(X):
        return DaskChunks(X)
    from .probes._kmeans import _stream_elements

    elements = _stream_elements(resolve_device(device))
    return LazyChunks(X, rows_per_batch(int(np.prod(X.shape[1:])), elements), progress)


# ------------------------------------------------------------------ k-means


def token_moments(x: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, float64 mean and sum of squared deviations of (n, C) tokens.

    The per-chunk statistics that :func:`merge_moments` merges (zeros for
    no tokens).
    """
    x = x.double()
    if x.shape[0] == 0:
        zeros = np.zeros(x.shape[1])
        return 0, zeros, zeros
    mean = x.mean(dim=0)
    return x.shape[0], mean.cpu().numpy(), ((x - mean) ** 2).sum(dim=0).cpu().numpy()


def _block_moments(block: Any, cosine: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, float64 mean and sum of squared deviations of a block's tokens."""
    from .probes._centroid import _normalize_rows

    x = _tokens(block, torch.device("cpu"))
    return token_moments(_normalize_rows(x) if cosine else x)


def merge_moments(parts: Iterable) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge per-chunk (count, mean, sum of squared deviations) (Chan et al.).

    Chunks of zero count are skipped (all zero: the first is returned).
    Float64 throughout. ``parts`` is read once, so it may be a generator.
    """
    merged = first = None
    for part in parts:
        first = part if first is None else first
        if part[0] == 0:
            continue
        if merged is None:
            merged = part
            continue
        (n, mean, m2), (n_b, mean_b, m2_b) = merged, part
        total = n + n_b
        delta = mean_b - mean
        m2 = m2 + m2_b + delta**2 * (n * n_b / total)
        mean = mean + delta * (n_b / total)
        merged = total, mean, m2
    return merged if merged is not None else first


def _mean_variance(chunks: Any, cosine: bool) -> float:
    """Mean over features of the biased variance of all tokens (Chan merge)."""
    n, mean, m2 = merge_moments(chunks.map(_block_moments, cosine))
    return float(m2.sum() / (n * mean.shape[0]))


def _block_estep(
    block: Any, centers: np.ndarray, cosine: bool, device: Any, far: int
) -> dict[str, Any]:
    """One chunk of a Lloyd iteration: sums, counts, inertia, farthest tokens."""
    from .probes._kmeans import _assign, _chunk_rows, _prepare_tokens, _sq_distances

    device = resolve_device(device)
    with torch.no_grad():
        x = _tokens(block, device)
        x, x_sq = _prepare_tokens(x, cosine)
        c = torch.as_tensor(centers, device=device)
        k, d = c.shape
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=device)
        best = torch.empty(x.shape[0], dtype=x.dtype, device=device)
        sums = torch.zeros(k, d, dtype=x.dtype, device=device)
        _assign(x, c, cosine, _chunk_rows(device, k, d), labels, best, sums)
        dist = _sq_distances(best, x_sq)
        top = torch.topk(dist, min(far, x.shape[0])).indices
        return {
            "sums": sums.double().cpu().numpy(),
            "counts": torch.bincount(labels, minlength=k).cpu().numpy(),
            "inertia": float(dist.sum(dtype=torch.float64)),
            "far_dist": dist[top].cpu().numpy(),
            "far_x": x[top].cpu().numpy(),
            "far_label": labels[top].cpu().numpy(),
        }


def _block_labels(
    block: Any, centers: np.ndarray, cosine: bool, device: Any, keep: bool
) -> tuple[np.ndarray | None, float, np.ndarray]:
    """Labels (None unless ``keep``), inertia and cluster counts of a chunk."""
    from .probes._kmeans import _evaluate, _prepare_tokens

    device = resolve_device(device)
    with torch.no_grad():
        x = _tokens(block, device)
        x, x_sq = _prepare_tokens(x, cosine)
        labels, inertia = _evaluate(
            x, x_sq, torch.as_tensor(centers, device=device), cosine
        )
        counts = torch.bincount(labels, minlength=centers.shape[0]).cpu().numpy()
        return (labels.cpu().numpy() if keep else None), inertia, counts


def _block_take(block: Any, local: np.ndarray) -> np.ndarray:
    """Tokens number ``local`` (sorted, image-major) of one block."""
    x = _checked(block)
    if x.ndim == 4:
        b, c = x.shape[:2]
        hw = x.shape[2] * x.shape[3]
        x = x.reshape(b, c, hw)[local // hw, :, local % hw]
    else:
        x = x[local]
    return np.ascontiguousarray(x)


def gather_tokens(X: Any, idx: np.ndarray) -> np.ndarray:
    """Tokens number ``idx`` (sorted) of a dask array, selected on the workers.

    Tokens are numbered image-major and row-major within an image for
    ``(N, C, h, w)`` maps, as in memory. Each chunk's task returns only its
    selected tokens, so the traffic is ``len(idx)`` tokens, not the array.

    Returns
    -------
    ndarray of shape (len(idx), C)
        float32 (float64 kept).
    """
    import dask

    X = _by_rows(X)
    per_image = int(np.prod(X.shape[2:])) if X.ndim == 4 else 1
    bounds = np.concatenate([[0], np.cumsum(X.chunks[0])]) * per_image
    cuts = np.searchsorted(idx, bounds)
    task = dask.delayed(_block_take, pure=True)
    tasks = [
        task(block, idx[cuts[i] : cuts[i + 1]] - bounds[i])
        for i, block in enumerate(_blocks(X))
        if cuts[i] < cuts[i + 1]
    ]
    parts = _compute(tasks)
    if not parts:
        return np.empty((0, X.shape[1]), dtype=np.float32)
    return np.concatenate(parts)


def label_tokens(
    X: Any, centers: np.ndarray, cosine: bool, device: Any
) -> tuple[np.ndarray, float, np.ndarray]:
    """Labels (n,), inertia and counts of every token of a dask array.

    Each chunk is labelled on its worker.
    """
    return _label_pass(DaskChunks(X), centers, cosine, device, keep=True)


def _label_pass(
    chunks: Any, centers: np.ndarray, cosine: bool, device: Any, keep: bool
) -> tuple[np.ndarray | None, float, np.ndarray]:
    """One pass: labels (None unless ``keep``), inertia and (k,) counts."""
    labels, inertia = [], 0.0
    counts = np.zeros(centers.shape[0], dtype=np.int64)
    for part_labels, part_inertia, part_counts in chunks.map(
        _block_labels, centers, cosine, device, keep
    ):
        if keep:
            labels.append(part_labels)
        inertia += part_inertia
        counts += part_counts
    return (np.concatenate(labels) if keep else None), inertia, counts


def _seed_tokens(chunks: Any, gen: torch.Generator, n_total: int) -> torch.Tensor:
    """All tokens (up to :data:`SEED_SAMPLES`), else a random subsample.

    The subsample is drawn in O(:data:`SEED_SAMPLES`) memory, as KMeansProbe
    draws ``max_samples`` (no permutation of all ``n_total`` tokens).
    """
    from .probes._kmeans import _sample_indices

    if n_total <= SEED_SAMPLES:
        return torch.from_numpy(chunks.gather(np.arange(n_total)))
    idx = _sample_indices(n_total, SEED_SAMPLES, gen).numpy()
    return torch.from_numpy(chunks.gather(idx))


_FAR_KEYS = ("far_dist", "far_x", "far_label")


def _farthest(kept: dict | None, part: dict, k: int) -> dict:
    """The ``k`` farthest tokens of ``kept`` and ``part`` (earlier first on ties).

    Folding every chunk's candidates this way selects what a stable sort of
    all of them would, while holding only ``k`` at a time.
    """
    if kept is None:
        return {key: part[key] for key in _FAR_KEYS}
    both = {key: np.concatenate([kept[key], part[key]]) for key in _FAR_KEYS}
    order = np.argsort(-both["far_dist"], kind="stable")[:k]
    return {key: value[order] for key, value in both.items()}


def _relocate(stats: dict, sums: np.ndarray, counts: np.ndarray) -> None:
    """Re-seed empty clusters with the farthest tokens (as ``_relocate_empty``)."""
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return
    order = np.argsort(-stats["far_dist"], kind="stable")[: empty.size]
    for cluster, i in zip(empty, order, strict=False):
        old = stats["far_label"][i]
        x = stats["far_x"][i].astype(np.float64)
        sums[old] -= x
        counts[old] -= 1
        sums[cluster] = x
        counts[cluster] = 1


def _lloyd(chunks, centers, *, max_iter, tol, cosine, device, verbose=False):
    """Lloyd iterations over chunks, reduced in float64 on the client.

    As the in-memory loop, it stops when the squared centroid shift is at
    most ``tol``; labels are not kept between passes, so a run whose labels
    have settled stops one iteration later (with the same centroids).
    """
    k = centers.shape[0]
    measured = []
    n_iter = 0
    for _ in tqdm(
        range(max_iter), desc="k-means passes", disable=not verbose, leave=False
    ):
        n_iter += 1
        sums = np.zeros(centers.shape, dtype=np.float64)
        counts = np.zeros(k, dtype=np.int64)
        inertia, far = 0.0, None
        for part in chunks.map(_block_estep, centers, cosine, device, k):
            sums += part["sums"]
            counts += part["counts"]
            inertia += part["inertia"]
            far = _farthest(far, part, k)
        measured.append(inertia)
        _relocate(far, sums, counts)
        new = sums / np.maximum(counts, 1)[:, None]
        if cosine:
            norms = np.linalg.norm(new, axis=1, keepdims=True)
            new = new / np.maximum(norms, 1e-12)
        new = np.where((counts == 0)[:, None], centers, new).astype(np.float32)
        shift = float(((new.astype(np.float64) - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    return centers, n_iter, measured


def kmeans_lloyd(
    estimator: Any, X: Any, init: Any, gen: torch.Generator, n_total: int
) -> tuple[torch.Tensor, torch.Tensor | None, float, int, np.ndarray, torch.Tensor]:
    """Fit a KMeansProbe's centroids on every token of chunked input.

    ``X`` is a dask array (each pass runs on the workers) or on-disk
    :class:`~skstego._device.LazyFeatures` (each pass reads it slice by
    slice here). Seeding as in memory (k-means++ or random on the tokens,
    or on :data:`SEED_SAMPLES` of them drawn with ``gen`` when there are
    more; or the ``init`` array), then Lloyd passes of per-chunk statistics
    reduced on the client, and a last pass for the labels (kept only with
    ``estimator.compute_labels``), inertia and counts; ``n_init`` runs,
    lowest inertia wins.

    Returns
    -------
    centers, labels, inertia, n_iter, inertia_curve, counts
        As the in-memory loop: (k, C) float32 centroids and (n,) int64 labels
        (CPU tensors; None without ``compute_labels``), float inertia, int
        iterations, float64 curve, (k,) float64 cluster sizes.
    """

    from .probes._centroid import _normalize_rows
    from .probes._kmeans import _init_centers, _row_sq_norms

    cosine = estimator.metric == "cosine"
    device = estimator.device
    keep = bool(estimator.compute_labels)
    progress = "k-means: chunks" if estimator.verbose else None
    chunks = chunks_of(X, progress, device)
    tol = _mean_variance(chunks, cosine) * estimator.tol if estimator.tol > 0 else 0.0
    n_init = estimator.n_init if isinstance(init, str) else 1
    seeds, seeds_sq = torch.empty(0, X.shape[1]), None
    if isinstance(init, str):
        seeds = _seed_tokens(chunks, gen, n_total)
        if cosine:
            seeds = _normalize_rows(seeds)
        seeds_sq = torch.ones(seeds.shape[0]) if cosine else _row_sq_norms(seeds)
    best = None
    for _ in range(n_init):
        start = _init_centers(
            seeds,
            seeds_sq,
            estimator.k,
            init,
            gen,
            cosine,
        )
        centers, n_iter, measured = _lloyd(
            chunks,
            start.cpu().numpy().astype(np.float32),
            max_iter=estimator.max_iter,
            tol=tol,
            cosine=cosine,
            device=device,
            verbose=estimator.verbose,
        )
        labels, inertia, counts = _label_pass(chunks, centers, cosine, device, keep)
        if best is None or inertia < best[2]:
            labels = None if labels is None else torch.from_numpy(labels)
            counts = torch.from_numpy(counts.astype(np.float64))
            curve = np.append(np.asarray(measured[1:], dtype=np.float64), inertia)
            best = (torch.from_numpy(centers), labels, inertia, n_iter, curve, counts)
    return best


# ------------------------------------------------------- transform / predict


def _call(block: np.ndarray, estimator: Any, method: str, kwargs: dict) -> np.ndarray:
    return np.asarray(getattr(estimator, method)(_checked(block), **kwargs))


def map_method(
    estimator: Any,
    method: str,
    X: Any,
    out_features: int,
    dtype: Any = np.float32,
    **kwargs: Any,
) -> Any:
    """``estimator.<method>(X)`` as a lazy dask array, mapped over row chunks.

    Parameters
    ----------
    estimator : fitted estimator
        Pickled to the workers (fitted attributes are NumPy) and called on
        each NumPy block.
    method : str
        "transform", "predict", ...
    X : dask.array.Array of shape (n, C) or (N, C, h, w)
    out_features : int
        Width of the output (axis 1); 0 when the method returns one value
        per token (labels), the channel axis then being dropped.
    dtype : dtype, default=np.float32
        dtype of the method's output (np.int64 for labels).
    **kwargs
        Passed to the method; ``size=(H, W)`` sets the output's map size.

    Returns
    -------
    dask.array.Array
        (n, out_features), (N, out_features, h, w), (n,) or (N, h, w).
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator)
    # tensors in the arguments travel on the CPU (the estimator's own
    # pickling moves its tensors and modules there too): a worker without
    # this process's device can load them
    kwargs = to_host(kwargs)
    X = _by_rows(X)
    spatial = tuple((s,) for s in kwargs.get("size") or X.shape[2:])
    dtype = np.dtype(dtype)
    if out_features:
        chunks = (X.chunks[0], (out_features,), *spatial)
        return X.map_blocks(
            _call,
            estimator,
            method,
            kwargs,
            dtype=dtype,
            chunks=chunks,
            meta=np.empty((0,) * len(chunks), dtype),
        )
    chunks = (X.chunks[0], *spatial)
    return X.map_blocks(
        _call,
        estimator,
        method,
        kwargs,
        dtype=dtype,
        drop_axis=1,
        chunks=chunks,
        meta=np.empty((0,) * len(chunks), dtype),
    )
