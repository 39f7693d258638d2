"""k-means kernels: assignment, the Lloyd loop, seeding, mini-batch steps.

Inputs are trusted (float32 tokens on one device, checked by the estimator).
One Lloyd loop serves every input: :func:`_lloyd_loop` runs E-steps through a
*pass* object and applies one M-step, one empty-cluster re-seeding and one
stopping rule (scikit-learn's: no label changed, or a squared centroid shift
at most ``tol``, ``tol`` being relative to the mean feature variance). The
passes differ only in where the tokens are:

* :class:`_MemoryPasses`: tokens on the device, assigned in row blocks
  (labels kept between iterations; one host read per iteration);
* :class:`_ChunkPasses`: chunks of a :class:`~skstego._tokens.SliceChunks`
  (slices of in-memory or on-disk input read here) or a
  :class:`~skstego._dask.DaskChunks` (blocks on the dask workers), each
  reduced to sums, counts and inertia by :func:`_chunk_estep` and merged in
  float64.

Euclidean k-means is safe for huge values: float32 squared norms of values
of 1e19 and more overflow, so tokens are divided by a power of two (exact;
the argmin is unchanged) where needed, and results are scaled back.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

from .._device import as_tensor, batch_elements, iter_slices, rows_per_batch
from .._moments import merge_moments, token_moments
from .._tokens import sample_indices, token_tensor

__all__: list[str] = []

#: Most tokens drawn from chunked input for the k-means++ / random seeding.
SEED_SAMPLES = 1 << 18

#: Squared norms from which float32 distance arithmetic is rescaled.
_SAFE_SQ_NORM = 1e30


# --------------------------------------------------------------------------
# scores and scales
# --------------------------------------------------------------------------


def _normalize_rows(X: torch.Tensor) -> torch.Tensor:
    """Unit rows; zero rows stay zero."""
    return torch.nn.functional.normalize(X, dim=1)


def _similarity(
    X: torch.Tensor, centers: torch.Tensor, neg_c_sq: torch.Tensor | None
) -> torch.Tensor:
    """Scores to maximise: ``x . c`` (cosine) or ``2 x . c - |c|^2`` (Euclidean).

    ``2 x . c - |c|^2 = |x|^2 - |x - c|^2``, so the argmax is the nearest centroid;
    being affine in ``x``, bilinear upsampling of the Euclidean scores equals
    scoring upsampled features (not so for cosine: ``x`` is normalised first).
    """
    if neg_c_sq is None:
        return X @ centers.T
    return torch.addmm(neg_c_sq, X, centers.T, alpha=2.0)


def _largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` (0-d, NaN if any value is NaN) in one pass, no temporary.

    ``x.abs().amax()`` allocates an ``|x|`` copy: a 16 MiB block was mapped
    and page-faulted afresh per mini-batch step (2 ms of a 20 ms step on the
    CPU); ``vector_norm(x, inf)`` is about 20x slower than ``aminmax`` here.
    """
    low, high = torch.aminmax(x)
    return torch.maximum(-low, high)


def _overflow_scale(X: torch.Tensor) -> float:
    """A power of two to divide ``X`` by so that float32 squared norms and
    ``2 x.c - |c|^2`` cannot overflow (1.0 for ordinary values).

    Values of 1e19 and more square past float32's largest value (3.4e38),
    which made every Euclidean score infinite and put every token in one
    cluster. Dividing by a power of two is exact and keeps every argmax.
    """
    if X.numel() == 0:
        return 1.0
    m = float(_largest_magnitude(X.detach()))
    if not math.isfinite(m) or m * m * X.shape[-1] < _SAFE_SQ_NORM:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(m)))


def _device_scale(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """A power of two ``s`` (a 0-d tensor, 1 for ordinary values) such that
    ``x / s`` and ``centers / s`` are safe as in :func:`_overflow_scale`,
    computed on the device without a host read (for loops that must not
    wait for it): the smallest ``2**p >= 1`` that brings the largest
    magnitude under ``sqrt(_SAFE_SQ_NORM / n_features)``."""
    m = torch.maximum(_largest_magnitude(x), _largest_magnitude(centers))
    limit = math.sqrt(_SAFE_SQ_NORM / x.shape[-1])
    return torch.exp2(torch.log2_(m / limit).ceil_().clamp_(min=0.0))


def _nearest(x: torch.Tensor, centers: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Label of the nearest centroid of every token (unit rows for cosine).

    Euclidean scores are ``(2 x.c - |c|^2) / s^2`` for a power of two ``s``
    (:func:`_device_scale`): only the centroids are rescaled, so any
    magnitude is safe at the cost of one read of ``x``, and nothing waits
    for the device.
    """
    if cosine:
        return (x @ centers.T).argmax(dim=1)
    s = _device_scale(x, centers)
    c = centers / s
    return _similarity(x, c / s, -(c * c).sum(dim=1)).argmax(dim=1)


# --------------------------------------------------------------------------
# assignment
# --------------------------------------------------------------------------


def _chunk_rows(device: torch.device, k: int, n_features: int) -> int:
    """Rows per block of the assignment step (the "distances" budget)."""
    return rows_per_batch(max(k, n_features), batch_elements(device, "distances"))


def _use_onehot_update(device: torch.device) -> bool:
    return device.type == "cuda"


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
    """E-step in row blocks: ``labels``/``best`` (best score) filled in place.

    ``w`` (float64 weight per token, or None) weights the sums.

    When ``sums`` is given, the M-step sums are accumulated on the way, while
    the block is still in cache: with ``index_add_`` on the CPU (measured
    faster there), with a one-hot GEMM on a GPU (``index_add_`` would funnel
    every token into ``k`` rows of atomics).
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


def _sq_distances(best: torch.Tensor, x_sq: torch.Tensor | None) -> torch.Tensor:
    """Squared distance to the assigned centroid from the best score."""
    if x_sq is None:  # unit vectors: |x - c|^2 = 2 - 2 cos
        return (2.0 - 2.0 * best).clamp_min_(0.0)
    return (x_sq - best).clamp_min_(0.0)


def _row_sq_norms(X: torch.Tensor) -> torch.Tensor:
    """``|x|^2`` per row, in blocks (no full-size temporary)."""
    out = torch.empty(X.shape[0], dtype=X.dtype, device=X.device)
    for sl in iter_slices(X.shape[0], _chunk_rows(X.device, 1, X.shape[1])):
        # the norm, squared: no (rows, C) temporary (``(x * x).sum(1)``
        # allocated one per block, measured up to 10x slower on the CPU)
        torch.linalg.vector_norm(X[sl], dim=1, out=out[sl])
    return out.square_()


def _prepare_tokens(
    X: torch.Tensor, cosine: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens as the distance kernels take them: unit rows for cosine (no
    norms needed), else the rows with their squared norms."""
    if cosine:
        return _normalize_rows(X), None
    return X, _row_sq_norms(X)


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


def _evaluate_scaled(
    X: torch.Tensor,
    centers: torch.Tensor,
    cosine: bool,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """:func:`_evaluate` for tokens of any magnitude (unit rows for cosine):
    huge values are divided by a power of two first, the inertia scaled back."""
    if cosine:
        return _evaluate(X, None, centers, True, w)
    s = max(_overflow_scale(X), _overflow_scale(centers))
    if s != 1.0:
        X, centers = X / s, centers / s
    labels, inertia = _evaluate(X, _row_sq_norms(X), centers, False, w)
    return labels, inertia * s * s


def _mean_variance(X: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """Mean over features of the (biased) variance, two-pass in blocks.

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
        return float(total) / X.numel()  # one read, after every block
    return float(total / w.sum()) / X.shape[1]


def _warn_if_degenerate(counts: torch.Tensor, k: int, stacklevel: int = 4) -> None:
    """Warn as :class:`sklearn.cluster.KMeans` does when fewer than ``k``
    clusters hold tokens (duplicate or too few distinct tokens)."""
    distinct = int((counts > 0).sum())
    if distinct < k:
        warnings.warn(
            f"Number of distinct clusters ({distinct}) found smaller than "
            f"k ({k}). Possibly due to duplicate points in X.",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )


# --------------------------------------------------------------------------
# seeding
# --------------------------------------------------------------------------


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
    """Initial centroids: k-means++, ``k`` random tokens, or the ``init`` array."""
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


# --------------------------------------------------------------------------
# the Lloyd step and loop
# --------------------------------------------------------------------------


class _EStep:
    """What one E-step over all tokens yields for the M-step.

    ``sums`` (k, C) and ``counts`` (k,) per cluster, ``inertia`` (0-d
    float64 tensor) and ``changed`` (0-d bool tensor: whether any label
    changed since the last E-step; None when the pass keeps no labels).
    A pass whose kernel also runs the M-step gives the next centroids as
    ``means`` (empty clusters already re-seeded) and no ``sums``.
    """

    def __init__(self, sums, counts, inertia, changed=None, means=None) -> None:
        self.sums, self.counts = sums, counts
        self.inertia, self.changed, self.means = inertia, changed, means


def _reseed_empty(
    sums: torch.Tensor,
    counts: torch.Tensor,
    empty: torch.Tensor,
    far_x: torch.Tensor,
    far_label: torch.Tensor,
    far_w: torch.Tensor | None = None,
) -> None:
    """Re-seed the ``empty`` clusters with the farthest tokens (as scikit-learn).

    ``far_x`` (at least ``len(empty)`` tokens, farthest from their centroid
    first) with their clusters ``far_label`` and weights ``far_w``: the
    i-th farthest token leaves its cluster's sums for the i-th empty
    cluster, taking its weight along (a cluster of zero weight is empty).
    As scikit-learn's ``_relocate_empty_clusters``, only the M-step's sums
    and counts change: labels stay those of the E-step, and so does the
    strict-convergence test (no label changed between two E-steps).
    """
    m = empty.numel()
    x, old = far_x[:m].to(sums.dtype), far_label[:m]
    if far_w is not None:
        wf = far_w[:m]
        x = x * wf.to(x.dtype)[:, None]
        moved = wf.to(counts.dtype)
    else:
        moved = torch.ones(m, dtype=counts.dtype, device=counts.device)
    sums.index_add_(0, old, x, alpha=-1.0)
    counts.index_add_(0, old, -moved)
    sums[empty] = x
    counts[empty] = moved


def _m_step(
    sums: torch.Tensor, counts: torch.Tensor, centers: torch.Tensor, cosine: bool
) -> torch.Tensor:
    """New centroids: cluster means (renormalised for cosine); a cluster that
    is still empty keeps its centroid."""
    kept = counts == 0  # still empty: fewer distinct tokens than clusters
    new = sums / counts.masked_fill(kept, 1).to(sums.dtype)[:, None]
    if cosine:
        new = _normalize_rows(new)
    return torch.where(kept[:, None], centers, new.to(centers.dtype))


def _lloyd_loop(
    passes: Any,
    centers: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None,
    cosine: bool,
    verbose: bool,
    desc: str,
) -> tuple[torch.Tensor, _EStep, float, int, np.ndarray]:
    """Lloyd iterations as scikit-learn's ``_kmeans_single_lloyd``.

    Stops when no label changes (strict convergence) or when the squared
    centroid shift (float64) is at most ``tol`` (already scaled; None: the
    ``tol`` attribute of ``passes`` after its first E-step), or after
    ``max_iter`` M-steps. ``passes`` runs the E-steps
    (:class:`_MemoryPasses` or :class:`_ChunkPasses`). A pass that keeps no
    labels reports no label change: its strict convergence shows as a shift
    of exactly zero one M-step later (equal labels give equal sums), which
    stops the loop after the same number of M-steps with the same centroids.

    Returns the centroids, the last E-step (labels, counts and inertia of
    the returned centroids), its inertia, the M-steps run and the inertia
    curve: entry ``i`` is the inertia of the centroids reached after ``i +
    1`` iterations (each E-step measures the previous M-step's centroids;
    the last entry is the returned inertia).

    Host reads: **one per iteration** for passes that keep their labels on
    the device, a 3-element copy of the stopping flags (labels changed, a
    cluster empty, previous shift at most ``tol``), plus one in an iteration
    where a cluster is empty (which clusters), and one at the end (the
    inertia curve). The shift test of
    an M-step is read after the next E-step, which is the E-step
    scikit-learn runs after its loop anyway: when the test stops the loop,
    that E-step's labels are the final labels. Passes over chunks
    (``passes.deferred`` false) read the shift first, so that they know
    when a pass is the last one (and keep its labels).
    """
    shift = torch.full((), math.inf, dtype=torch.float64, device=centers.device)
    strict = False
    n_iter = 0  # M-steps run
    measured = []  # inertia of each E-step: centroids after 0, 1, ... M-steps
    with tqdm(total=max_iter, desc=desc, disable=not verbose, leave=False) as bar:
        while True:
            final = not passes.deferred and (
                n_iter == max_iter or (tol is not None and float(shift) <= tol)
            )
            step = passes.estep(centers, final)
            if tol is None:  # measured by the first pass (shift is inf until now)
                tol = passes.tol
            measured.append(step.inertia)
            changed = step.changed
            if changed is None:
                changed = torch.ones((), dtype=torch.bool, device=centers.device)
            flags = torch.stack([changed, (step.counts == 0).any(), shift <= tol])
            changed, has_empty, settled = flags.tolist()  # the iteration's one read
            if settled or n_iter == max_iter:
                break  # the step's labels are those of the final centroids
            if step.means is not None:
                new = step.means  # the pass's kernel ran the M-step
            else:
                if has_empty:
                    passes.reseed(step, torch.nonzero(step.counts == 0).flatten())
                new = _m_step(step.sums, step.counts, centers, cosine)
            n_iter += 1
            bar.update()
            if not changed:
                strict = True
                centers = new
                break
            shift = ((new.double() - centers.double()) ** 2).sum()
            centers = new
            passes.advance()
    values = torch.stack(measured).cpu().numpy()
    # values[0] is the initial centroids' inertia; the rest follow M-steps.
    # On strict convergence the labels (and inertia) are those of the last
    # E-step, before the final M-step, which moved no label.
    curve = np.append(values[1:], values[-1]) if strict else values[1:]
    return centers, step, float(values[-1]), n_iter, curve


class _MemoryPasses:
    """E-steps over tokens held on the device, in row blocks; labels kept."""

    deferred = True

    def __init__(
        self,
        X: torch.Tensor,
        x_sq: torch.Tensor | None,
        k: int,
        cosine: bool,
        w: torch.Tensor | None = None,
    ) -> None:
        n, d = X.shape
        self.X, self.x_sq, self.k, self.cosine, self.w = X, x_sq, k, cosine, w
        self.chunk = _chunk_rows(X.device, k, d)
        self.labels = torch.empty(n, dtype=torch.int64, device=X.device)
        self.labels_old = torch.full((n,), -1, dtype=torch.int64, device=X.device)
        self.best = torch.empty(n, dtype=X.dtype, device=X.device)
        self.sums = torch.empty(k, d, dtype=X.dtype, device=X.device)

    def estep(self, centers: torch.Tensor, final: bool) -> _EStep:
        X, w, labels = self.X, self.w, self.labels
        self.sums.zero_()
        _assign(X, centers, self.cosine, self.chunk, labels, self.best, self.sums, w)
        dist = _sq_distances(self.best, self.x_sq)
        if w is None:
            inertia = dist.sum(dtype=torch.float64)
            counts = _counts(labels, self.k)
        else:
            inertia = dist.double() @ w
            counts = _counts(labels, self.k, torch.float64, w)
        changed = (labels != self.labels_old).any()
        return _EStep(self.sums, counts, inertia, changed)

    def reseed(self, step: _EStep, empty: torch.Tensor) -> None:
        far = torch.topk(_sq_distances(self.best, self.x_sq), empty.numel()).indices
        far_w = None if self.w is None else self.w[far]
        _reseed_empty(
            step.sums, step.counts, empty, self.X[far], self.labels[far], far_w
        )

    def advance(self) -> None:
        self.labels, self.labels_old = self.labels_old, self.labels


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
    """Lloyd's algorithm on tokens held on the device (see :func:`_lloyd_loop`).

    ``X`` are unit rows for cosine (``x_sq`` None), else rows with their
    squared norms. With token weights ``w`` (float64, or None), the weighted
    Lloyd of scikit-learn's ``KMeans(sample_weight=...)``: centroids are
    weighted means (renormalised for cosine), a cluster of zero weight is
    empty and the inertia is weighted, with no extra host reads.

    Returns centroids, labels, inertia, M-steps run and the inertia curve.
    """
    passes = _MemoryPasses(X, x_sq, centers.shape[0], cosine, w)
    centers, _, inertia, n_iter, curve = _lloyd_loop(
        passes,
        centers,
        max_iter=max_iter,
        tol=tol,
        cosine=cosine,
        verbose=verbose,
        desc=desc,
    )
    return centers, passes.labels, inertia, n_iter, curve


# --------------------------------------------------------------------------
# passes over chunks (slices read here, or dask blocks)
# --------------------------------------------------------------------------


def _scaled_tokens(
    x: torch.Tensor, centers: torch.Tensor, cosine: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
    """Tokens and centroids as the distance kernels take them, with the
    power of two ``s`` they were divided by (1.0 unless values are huge)."""
    if cosine:
        return _normalize_rows(x), None, centers, 1.0
    x_sq = _row_sq_norms(x)
    c_sq = (centers * centers).sum(dim=1)
    big = max(float(x_sq.max()) if x_sq.numel() else 0.0, float(c_sq.max()))
    if big < _SAFE_SQ_NORM:  # also False for inf
        return x, x_sq, centers, 1.0
    s = max(_overflow_scale(x), _overflow_scale(centers))
    x = x / s
    return x, _row_sq_norms(x), centers / s, s


def _chunk_estep(
    block: Any,
    centers: torch.Tensor,
    cosine: bool,
    device: torch.device,
    final: bool,
    keep: str,
    moments: bool = False,
) -> dict[str, Any]:
    """One chunk's part of an E-step (any magnitude: see :func:`_scaled_tokens`).

    Returns the chunk's ``counts`` per cluster and float64 ``inertia``;
    unless ``final``, its float64 ``sums`` per cluster and its ``k`` tokens
    farthest from their centroid (``far_dist`` in float64, decreasing;
    ``far_x``; ``far_label``); and, as ``keep`` says ("", "labels" or
    "labels+dist"), the labels and float64 squared distances of its tokens.
    All on ``device``. With ``moments``, also the ``(count, mean, m2)`` of
    the tokens the distances see (unit rows for cosine), for ``tol``.
    """
    with torch.no_grad():
        x = token_tensor(block, device)
        x, x_sq, c, s = _scaled_tokens(x, centers.to(device), cosine)
        k, d = c.shape
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=device)
        best = torch.empty(x.shape[0], dtype=x.dtype, device=device)
        sums = None if final else torch.zeros(k, d, dtype=x.dtype, device=device)
        _assign(x, c, cosine, _chunk_rows(device, k, d), labels, best, sums)
        dist = _sq_distances(best, x_sq)
        out = {
            "counts": _counts(labels, k),
            "inertia": dist.sum(dtype=torch.float64) * (s * s),
        }
        if not final:
            top = torch.topk(dist, min(k, x.shape[0])).indices
            out["sums"] = sums.double() * s
            out["far_dist"] = dist[top].double() * (s * s)
            out["far_x"] = x[top] * s
            out["far_label"] = labels[top]
        if keep:
            out["labels"] = labels
        if keep == "labels+dist":
            out["dist"] = dist.double() * (s * s)
        if moments:
            count, mean, m2 = token_moments(x)
            out["moments"] = (count, mean * s, m2 * (s * s))
        return out


_FAR_KEYS = ("far_dist", "far_x", "far_label")


def _farthest(kept: dict | None, part: dict, k: int) -> dict:
    """The ``k`` farthest tokens of ``kept`` and ``part`` (earlier first on ties).

    Folding every chunk's candidates this way selects what a stable sort of
    all of them would, while holding only ``k`` at a time.
    """
    if kept is None:
        return {key: part[key] for key in _FAR_KEYS}
    both = {key: torch.cat([kept[key], part[key]]) for key in _FAR_KEYS}
    order = torch.sort(both["far_dist"], descending=True, stable=True).indices[:k]
    return {key: value[order] for key, value in both.items()}


class _ChunkPasses:
    """E-steps over chunks (``chunks.map`` of :func:`_chunk_estep`), merged in
    float64 on ``device``; labels are kept in the last pass only.

    With ``tol_factor`` > 0, the first pass also measures the mean feature
    variance and sets ``tol`` to ``tol_factor`` times it (no separate pass
    over the data); else ``tol`` is 0.
    """

    deferred = False

    def __init__(
        self,
        chunks: Any,
        k: int,
        cosine: bool,
        device: torch.device,
        keep: str,
        tol_factor: float = 0.0,
    ) -> None:
        self.chunks, self.k, self.cosine = chunks, k, cosine
        self.device, self.keep = device, keep
        self.tol_factor = tol_factor
        self.tol: float | None = None if tol_factor > 0 else 0.0
        self.far: dict | None = None
        self.labels: torch.Tensor | None = None
        self.dist: torch.Tensor | None = None

    def estep(self, centers: torch.Tensor, final: bool) -> _EStep:
        k, dev = self.k, self.device
        sums = torch.zeros(k, centers.shape[1], dtype=torch.float64, device=dev)
        counts = torch.zeros(k, dtype=torch.int64, device=dev)
        inertia = torch.zeros((), dtype=torch.float64, device=dev)
        keep = self.keep if final else ""
        moments = self.tol is None
        labels, dists, far, parts = [], [], None, []
        for part in self.chunks.map(
            _chunk_estep, centers, self.cosine, dev, final, keep, moments
        ):
            if moments:
                parts.append(part.pop("moments"))
            part = {key: value.to(dev) for key, value in part.items()}
            counts += part["counts"]
            inertia += part["inertia"]
            if not final:
                sums += part["sums"]
                far = _farthest(far, part, k)
            if keep:
                labels.append(part["labels"])
            if keep == "labels+dist":
                dists.append(part["dist"])
        if moments:
            n, mean, m2 = merge_moments(parts)
            self.tol = float(m2.sum() / (n * mean.shape[0])) * self.tol_factor
        self.far = far
        self.labels = torch.cat(labels) if labels else None
        self.dist = torch.cat(dists) if dists else None
        return _EStep(sums, counts, inertia)

    def reseed(self, step: _EStep, empty: torch.Tensor) -> None:
        far = self.far
        _reseed_empty(step.sums, step.counts, empty, far["far_x"], far["far_label"])

    def advance(self) -> None:
        pass


def _label_pass(
    chunks: Any, centers: torch.Tensor, cosine: bool, device: torch.device, keep: str
) -> tuple[_EStep, torch.Tensor | None, torch.Tensor | None]:
    """One pass over every token of ``chunks`` with fixed ``centers``.

    Returns the E-step (counts, inertia), the labels (None unless ``keep``
    names them) and the squared distances (for ``keep="labels+dist"``).
    """
    passes = _ChunkPasses(chunks, centers.shape[0], cosine, device, keep)
    step = passes.estep(centers, final=True)
    return step, passes.labels, passes.dist


def _seed_tokens(
    chunks: Any,
    gen: torch.Generator,
    n_total: int,
    device: torch.device,
    size: int | None = None,
) -> torch.Tensor:
    """All tokens (up to :data:`SEED_SAMPLES`), else a random subsample of
    ``size`` (default :data:`SEED_SAMPLES`).

    The subsample is drawn in O(``size``) memory, as KMeansProbe draws
    ``max_samples`` (no permutation of all ``n_total`` tokens). Random
    seeding asks for only the tokens it can pick (``k`` per run): reading
    those costs a few slices, not a pass over all the data.
    """
    if n_total <= SEED_SAMPLES:
        return chunks.gather(np.arange(n_total), device)
    size = SEED_SAMPLES if size is None else size
    return chunks.gather(sample_indices(n_total, size, gen).numpy(), device)


def _chunked_lloyd(
    chunks: Any,
    init: Any,
    *,
    k: int,
    n_init: int,
    max_iter: int,
    tol: float,
    cosine: bool,
    device: torch.device,
    gen: torch.Generator,
    n_total: int,
    keep_labels: bool,
    verbose: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, float, int, np.ndarray, torch.Tensor]:
    """Exact Lloyd k-means on every token of ``chunks``, one pass per E-step.

    Seeding as in memory (k-means++ or random on the tokens; when there
    are more than :data:`SEED_SAMPLES`, k-means++ on that many drawn with
    ``gen`` and random seeding on ``k`` x ``n_init`` drawn tokens; or the
    ``init`` array), ``tol`` relative to the mean feature variance
    (measured by the first E-step's pass, not a pass of its own), then
    :func:`_lloyd_loop` over :class:`_ChunkPasses`, whose last pass gives the
    labels (kept with ``keep_labels``), inertia and counts; ``n_init`` runs,
    lowest inertia wins.

    Returns
    -------
    centers, labels, inertia, n_iter, inertia_curve, counts
        (k, C) float32 centroids and (n,) int64 labels (None without
        ``keep_labels``) on ``device``, float inertia, int iterations,
        float64 curve, (k,) int64 cluster sizes.
    """
    seeds, seeds_sq, scale = None, None, 1.0
    n_runs = n_init if isinstance(init, str) else 1
    if isinstance(init, str):
        # random seeding picks k tokens per run: draw only those (uniform
        # k-subsets either way), k-means++ needs the whole subsample
        size = min(SEED_SAMPLES, k * n_runs) if init == "random" else SEED_SAMPLES
        seeds = _seed_tokens(chunks, gen, n_total, device, size)
        if cosine:
            seeds = _normalize_rows(seeds)
            seeds_sq = torch.ones(seeds.shape[0], device=device)
        else:
            scale = _overflow_scale(seeds)
            seeds = seeds / scale if scale != 1.0 else seeds
            seeds_sq = _row_sq_norms(seeds)
    else:
        seeds = torch.empty(0, 1, device=device)
    best = None
    for run in range(n_runs):
        start = _init_centers(seeds, seeds_sq, k, init, gen, cosine) * scale
        keep = "labels" if keep_labels else ""
        # the first run's first pass measures the variance that scales tol
        factor = tol if run == 0 else 0.0
        passes = _ChunkPasses(chunks, k, cosine, device, keep, factor)
        centers, step, inertia, n_iter, curve = _lloyd_loop(
            passes,
            start,
            max_iter=max_iter,
            tol=passes.tol if run == 0 else tol,
            cosine=cosine,
            verbose=verbose,
            desc=f"k-means run {run + 1}/{n_runs}",
        )
        if run == 0:
            tol = passes.tol  # scaled, for the other runs
        if best is None or inertia < best[2]:
            best = (centers, passes.labels, inertia, n_iter, curve, step.counts)
    return best


# --------------------------------------------------------------------------
# mini-batch k-means
# --------------------------------------------------------------------------


def _minibatch_step(
    xb: torch.Tensor,
    centers: torch.Tensor,
    counts: torch.Tensor,
    cosine: bool,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One mini-batch k-means update, as scikit-learn's ``MiniBatchKMeans``.

    Every token of ``xb`` (trusted, unit rows for cosine) goes to its nearest
    centroid (any magnitude: :func:`_nearest`); a centroid ``j`` given
    ``n_j`` tokens of sum ``s_j`` moves to ``(c_j * N_j + s_j) / (N_j +
    n_j)`` -- a step of learning rate ``1 / count`` per token -- and ``N_j``
    grows by ``n_j`` (``counts`` is float64 so that it stays exact beyond
    2**24 tokens). Spherical k-means (``cosine``) projects the moved
    centroids back onto the sphere. Returns the new centroids and counts.
    With token weights ``w``, counts and sums are weighted (``N_j`` is the
    weight received), as ``MiniBatchKMeans`` with ``sample_weight``. No
    host reads.
    """
    k = centers.shape[0]
    labels = _nearest(xb, centers, cosine)
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


def _best_init(
    Xi: torch.Tensor,
    k: int,
    init: Any,
    n_init: int,
    gen: torch.Generator,
    cosine: bool,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Initial centroids from tokens ``Xi``: the best of ``n_init`` seedings
    by inertia on ``Xi`` (any magnitude: scaled as in memory)."""
    scale = 1.0
    if cosine:
        Xi = _normalize_rows(Xi)
        x_sq = None
        x_sq_init = torch.ones(Xi.shape[0], dtype=Xi.dtype, device=Xi.device)
    else:
        scale = _overflow_scale(Xi)
        if scale != 1.0:
            Xi = Xi / scale
            init = init if isinstance(init, str) else np.asarray(init) / scale
        x_sq = x_sq_init = _row_sq_norms(Xi)
    best = None
    for _ in range(n_init if isinstance(init, str) else 1):
        centers = _init_centers(Xi, x_sq_init, k, init, gen, cosine, w)
        inertia = _evaluate(Xi, x_sq, centers, cosine, w)[1]
        if best is None or inertia < best[1]:
            best = (centers, inertia)
    return best[0] * scale
