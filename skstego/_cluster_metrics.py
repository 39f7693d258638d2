"""Cluster-quality and seed-stability metrics on torch.

Silhouette, Davies-Bouldin and Calinski-Harabasz scores give scikit-learn's
results (:mod:`sklearn.metrics`) on any device, for 2-D tokens or 4-D maps:

* ``X`` of shape (n, C) with labels (n,): every label value is a cluster, as
  in scikit-learn (a -1 from DBSCAN is a cluster too);
* ``X`` of shape (N, C, h, w) with label maps (N, h, w): tokens are read
  channel-last (image, row, column order) and **pixels with a negative label
  are ignored**, as everywhere in skstego.

The silhouette needs every pairwise distance: it computes them a chunk of rows
at a time (memory O(chunk_size x n), never n x n), visits each pair once (the
upper triangle; each block adds its row sums and its column sums), and sums
distances per cluster with a matrix product against the one-hot labels into
float64 accumulators. Davies-Bouldin and Calinski-Harabasz stream the tokens
twice in slices (per-cluster sums of the tokens sorted by cluster, then each
token's distance to its centroid), accumulating in float64, so a NumPy array
or memory map never has to fit on the device at once. float64 input is
computed in float64, everything else in float32.

:func:`clustering_stability` compares the clusterings of several seeds with
the adjusted Rand index. The expected calibration error lives in
:mod:`skstego._calibration`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.spatial.distance import cdist
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from ._device import (
    as_tensor,
    batch_elements,
    check_features,
    is_torch,
    iter_slices,
    maps_to_tokens,
    resolve_device,
    rows_per_batch,
    to_output,
)
from ._validation import dense_codes, integer_labels, label_codes

__all__ = [
    "calinski_harabasz_score",
    "clustering_stability",
    "davies_bouldin_score",
    "silhouette_samples",
    "silhouette_score",
]


class _MetricInput(BaseEstimator):
    """Stand-in estimator for :func:`check_features` (functions fit nothing)."""


class _Clusters(NamedTuple):
    """Labels encoded as 0..n_labels-1 on the device; -1 marks ignored pixels."""

    codes: torch.Tensor
    n_labels: int
    counts: torch.Tensor
    n_samples: int


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------
def _check_X(X: Any) -> np.ndarray | torch.Tensor:
    try:
        return check_features(_MetricInput(), X, reset=True, min_samples=1)
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        if "NaN" in first or "infinity" in first:
            raise ValueError(
                f"{first} Remove or impute those tokens before computing cluster "
                "metrics."
            ) from None
        raise


def _compute_dtype(X: np.ndarray | torch.Tensor) -> torch.dtype:
    """float64 input is computed in float64 (as scikit-learn), all else float32."""
    is64 = X.dtype == torch.float64 if is_torch(X) else X.dtype == np.float64
    return torch.float64 if is64 else torch.float32


def _check_number_of_labels(n_labels: int, n_samples: int) -> None:
    # scikit-learn's wording (sklearn.metrics.cluster._unsupervised)
    if not 1 < n_labels < n_samples:
        raise ValueError(
            f"Number of labels is {n_labels}. Valid values are 2 to n_samples - 1 "
            f"(inclusive); got {n_samples} labelled sample(s)."
        )


def _encode_labels(labels: Any, X: Any, device: torch.device) -> _Clusters:
    """Check ``labels`` against ``X`` and encode them on ``device``."""
    shape = tuple(labels.shape) if hasattr(labels, "shape") else np.shape(labels)
    if X.ndim == 2:
        if shape != (X.shape[0],):
            raise ValueError(
                f"labels must have shape ({X.shape[0]},), one label per row of X "
                f"{tuple(X.shape)}; got shape {shape}."
            )
        codes = label_codes(labels, "labels", device)
    else:
        expected = (X.shape[0], X.shape[2], X.shape[3])
        if shape != expected:
            raise ValueError(
                f"labels must be label maps of shape {expected} for maps X "
                f"{tuple(X.shape)} (N, C, h, w); got shape {shape}. Resize the "
                "labels to the feature size first."
            )
        raw = integer_labels(labels, "labels")
        raw = raw if is_torch(raw) else torch.from_numpy(np.ascontiguousarray(raw))
        raw = raw.to(device).reshape(-1)
        valid = raw >= 0
        codes = torch.full_like(raw, -1)
        codes[valid] = dense_codes(raw[valid])
    valid_codes = codes[codes >= 0] if X.ndim == 4 else codes
    counts = _bincount(valid_codes)
    return _Clusters(codes, counts.numel(), counts, int(valid_codes.numel()))


def _bincount(codes: torch.Tensor, minlength: int = 0) -> torch.Tensor:
    """``torch.bincount`` where ``codes`` live; NumPy's on the CPU (one thread,
    measured 15-25x faster than torch's on two busy cores)."""
    if codes.device.type == "cpu":
        return torch.from_numpy(np.bincount(codes.numpy(), minlength=minlength))
    return torch.bincount(codes, minlength=minlength)


def _recount(codes: torch.Tensor) -> _Clusters:
    """Re-encode codes of a subsample (some clusters may be absent)."""
    codes = dense_codes(codes)
    counts = _bincount(codes)
    return _Clusters(codes, counts.numel(), counts, int(codes.numel()))


def _check_positive_int(value: Any, name: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


# --------------------------------------------------------------------------
# token access
# --------------------------------------------------------------------------
def _iter_tokens(
    X: np.ndarray | torch.Tensor,
    codes: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    budget: int,
):
    """Yield (tokens, codes) chunks on ``device``, ignored pixels left out."""
    pixels = 1 if X.ndim == 2 else X.shape[2] * X.shape[3]
    batch = rows_per_batch(int(np.prod(X.shape[1:])), budget)
    for sl in iter_slices(X.shape[0], batch):
        xb = as_tensor(X[sl], device, dtype)
        cb = codes[sl.start * pixels : sl.stop * pixels]
        if xb.ndim == 4:
            xb = maps_to_tokens(xb)
            keep = cb >= 0
            xb, cb = xb[keep], cb[keep]
        yield xb, cb


def _gather_tokens(X, codes, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All labelled tokens as one (n, C) tensor (read-only) and their codes."""
    if X.ndim == 2:
        return as_tensor(X, device, dtype), codes
    budget = batch_elements(device, "compute")
    parts = list(_iter_tokens(X, codes, device, dtype, budget))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# --------------------------------------------------------------------------
# silhouette
# --------------------------------------------------------------------------
def _silhouette_values(
    T: torch.Tensor, clusters: _Clusters, metric: str, chunk_size: int | None
) -> torch.Tensor:
    """Silhouette of every row of ``T`` (n, C); float64 on T's device."""
    n, k = T.shape[0], clusters.n_labels
    codes = clusters.codes
    if metric == "euclidean":
        # distances do not change under translation; centring first keeps the
        # |x|^2 + |y|^2 - 2 x.y expansion accurate in float32
        T = T - T.mean(dim=0, dtype=torch.float64).to(T.dtype)
        sq = torch.einsum("ij,ij->i", T, T)
    else:
        norms = torch.linalg.vector_norm(T, dim=1, keepdim=True)
        T = T / torch.where(norms == 0, torch.ones_like(norms), norms)
    onehot = torch.nn.functional.one_hot(codes, k).to(T.dtype)
    sums = torch.zeros(n, k, dtype=torch.float64, device=T.device)
    rows = chunk_size or rows_per_batch(n, batch_elements(T.device, "compute"))
    for sl in iter_slices(n, rows):
        s, e = sl.start, sl.stop
        D = T[s:e] @ T[s:].T  # the block's pairs (i, j >= s): upper triangle
        if metric == "euclidean":
            D.mul_(-2).add_(sq[s:e, None]).add_(sq[None, s:]).clamp_min_(0).sqrt_()
        else:
            D.neg_().add_(1).clamp_(0, 2)
        diag = torch.arange(e - s, device=T.device)
        D[diag, diag] = 0  # a point's distance to itself
        sums[s:e] += D @ onehot[s:]  # row sums per cluster
        if e < n:  # and the mirrored pairs: column sums of the rows' clusters
            sums[e:] += D[:, e - s :].T @ onehot[s:e]
    counts = clusters.counts.to(torch.float64)
    own = sums.gather(1, codes[:, None]).squeeze(1)
    sums.scatter_(1, codes[:, None], torch.inf)
    nearest = (sums / counts).min(dim=1).values
    intra = own / (counts[codes] - 1)  # 0 / 0 = NaN for singletons
    values = (nearest - intra) / torch.maximum(intra, nearest)
    return torch.nan_to_num(values, nan=0.0)  # singletons score 0, as sklearn


def _silhouette_input(X, labels, metric, device, chunk_size):
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
    _check_positive_int(chunk_size, "chunk_size")
    X = _check_X(X)
    dev = resolve_device(device)
    return X, _encode_labels(labels, X, dev), dev


def silhouette_samples(
    X: Any,
    labels: Any,
    *,
    metric: str = "euclidean",
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
) -> np.ndarray | torch.Tensor:
    """Silhouette coefficient of every sample, as scikit-learn's, on torch.

    ``s = (b - a) / max(a, b)`` where ``a`` is the mean distance from a sample
    to the other members of its cluster and ``b`` the mean distance to the
    members of the nearest other cluster; 0 for a sample alone in its cluster.
    Equal to :func:`sklearn.metrics.silhouette_samples` up to float rounding.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n, C) or (N, C, h, w)
        Tokens, or feature maps whose tokens are read channel-last.
    labels : array-like or torch.Tensor of shape (n,) or (N, h, w)
        Cluster of each token. Any values for (n,) labels (each is a cluster,
        as in scikit-learn); integer label maps for 4-D ``X``, where pixels
        with a negative label are ignored.
    metric : {"euclidean", "cosine"}, default="euclidean"
        Distance between tokens; cosine distance is ``1 - cos(x, y)`` (a zero
        vector is at distance 1 from everything, as in scikit-learn).
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the distances are computed.
    chunk_size : int, optional
        Rows of the distance matrix computed at once (memory
        ``chunk_size x n`` values); default about 64M values.

    Returns
    -------
    ndarray or torch.Tensor of shape (n,) or (N, h, w)
        Values in [-1, 1]; NaN at ignored pixels of label maps. NumPy for
        NumPy ``X``, torch on ``device`` for torch ``X``. float64 for float64
        ``X``, float32 otherwise.

    Raises
    ------
    ValueError
        With fewer than 2 clusters or as many clusters as labelled samples
        (scikit-learn's "Number of labels is ..."), NaN in ``X`` or ``labels``,
        or shapes that do not match.

    See Also
    --------
    silhouette_score : The mean over samples, optionally on a subsample.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.metrics import silhouette_samples
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [4.0, 0.0], [5.0, 0.0], [9.0, 0.0]])
    >>> silhouette_samples(X, [0, 0, 1, 1, 2], device="cpu").round(3)
    array([0.778, 0.783, 0.754, 0.75 , 0.   ])
    """
    X, clusters, dev = _silhouette_input(X, labels, metric, device, chunk_size)
    _check_number_of_labels(clusters.n_labels, clusters.n_samples)
    dtype = _compute_dtype(X)
    with torch.no_grad():
        T, codes = _gather_tokens(X, clusters.codes, dev, dtype)
        values = _silhouette_values(
            T, clusters._replace(codes=codes), metric, chunk_size
        )
    values = values.to(dtype)
    if X.ndim == 4:
        full = torch.full(clusters.codes.shape, torch.nan, dtype=dtype, device=dev)
        full[clusters.codes >= 0] = values
        values = full.reshape(X.shape[0], X.shape[2], X.shape[3])
    return to_output(values, X)


def silhouette_score(
    X: Any,
    labels: Any,
    *,
    metric: str = "euclidean",
    sample_size: int | None = None,
    random_state: Any = None,
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
) -> float:
    """Mean silhouette coefficient, as :func:`sklearn.metrics.silhouette_score`.

    The best value is 1, the worst -1; values near 0 mean overlapping
    clusters. See :func:`silhouette_samples` for the definition.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n, C) or (N, C, h, w)
        Tokens, or feature maps whose tokens are read channel-last.
    labels : array-like or torch.Tensor of shape (n,) or (N, h, w)
        Cluster of each token; negative values in label maps are ignored.
    metric : {"euclidean", "cosine"}, default="euclidean"
        Distance between tokens.
    sample_size : int, optional
        Score a random subset of this many tokens (all when None or larger
        than the number of tokens). Drawn as scikit-learn does:
        ``check_random_state(random_state).permutation(n)[:sample_size]``
        over the n labelled tokens, so an int ``random_state`` picks the same
        tokens as scikit-learn on the same 2-D data.
    random_state : int, RandomState instance or None, default=None
        Seed of the subsample; only used with ``sample_size``.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the distances are computed.
    chunk_size : int, optional
        Rows of the distance matrix computed at once; default about 64M values.

    Returns
    -------
    float

    See Also
    --------
    silhouette_samples : The value of every sample.
    davies_bouldin_score, calinski_harabasz_score : Centroid-based scores
        that need no pairwise distances.

    References
    ----------
    .. [1] P. J. Rousseeuw (1987). "Silhouettes: a graphical aid to the
       interpretation and validation of cluster analysis". Journal of
       Computational and Applied Mathematics 20: 53-65.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.metrics import silhouette_score
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [4.0, 0.0], [4.0, 1.0]])
    >>> round(silhouette_score(X, [0, 0, 1, 1], device="cpu"), 4)
    0.7538
    """
    X, clusters, dev = _silhouette_input(X, labels, metric, device, chunk_size)
    _check_positive_int(sample_size, "sample_size")
    dtype = _compute_dtype(X)
    if sample_size is None:
        _check_number_of_labels(clusters.n_labels, clusters.n_samples)
        T, codes = _gather_tokens(X, clusters.codes, dev, dtype)
    else:
        perm = check_random_state(random_state).permutation(clusters.n_samples)
        idx = perm[:sample_size]
        if X.ndim == 2:  # move only the subsample to the device
            rows = idx if not is_torch(X) else torch.from_numpy(idx).to(X.device)
            T = as_tensor(X[rows], dev, dtype)
            codes = clusters.codes[torch.from_numpy(idx).to(dev)]
        else:
            T, codes = _gather_tokens(X, clusters.codes, dev, dtype)
            sel = torch.from_numpy(idx).to(dev)
            T, codes = T[sel], codes[sel]
        clusters = _recount(codes)
        codes = clusters.codes
        _check_number_of_labels(clusters.n_labels, clusters.n_samples)
    with torch.no_grad():
        values = _silhouette_values(
            T, clusters._replace(codes=codes), metric, chunk_size
        )
    return float(values.mean())


# --------------------------------------------------------------------------
# centroid-based scores
# --------------------------------------------------------------------------
def _centroid_stats(X: Any, labels: Any, device: Any) -> dict[str, np.ndarray]:
    """Counts, centroids and per-cluster sums of |x - c| and |x - c|^2.

    All float64 NumPy arrays (a few values per cluster, brought to the host
    for the final formulas, as scikit-learn writes them).

    Two passes over the labelled tokens: per-cluster sums
    (:func:`_cluster_sums`), then each token's distance to its centroid
    (:func:`_distance_sums`). Both are memory-bound streams of slices with a
    few temporaries per slice, sized as reads (``batch_elements(device,
    "read")``): on the CPU those stay below glibc's mmap threshold and are
    recycled from the heap instead of being page-faulted afresh per slice.
    """
    X = _check_X(X)
    dev = resolve_device(device)
    clusters = _encode_labels(labels, X, dev)
    _check_number_of_labels(clusters.n_labels, clusters.n_samples)
    k, c = clusters.n_labels, X.shape[1]
    dtype, f64 = _compute_dtype(X), torch.float64
    budget = batch_elements(dev, "read")
    sums = torch.zeros(k, c, dtype=f64, device=dev)
    dist = torch.zeros(k, dtype=f64, device=dev)
    sqdist = torch.zeros(k, dtype=f64, device=dev)
    with torch.no_grad():
        for xb, cb in _iter_tokens(X, clusters.codes, dev, dtype, budget):
            sums += _cluster_sums(xb, cb, k)
        counts = clusters.counts.to(f64)
        centroids = sums / counts[:, None]
        near = centroids.to(dtype)  # its rounding moves |x - c|^2 at second order
        for xb, cb in _iter_tokens(X, clusters.codes, dev, dtype, budget):
            d, d2 = _distance_sums(xb, cb, near)
            dist += d
            sqdist += d2
    stats = {
        "counts": counts,
        "centroids": centroids,
        "mean": sums.sum(dim=0) / counts.sum(),
        "dist": dist,
        "sqdist": sqdist,
    }
    return {key: value.cpu().numpy() for key, value in stats.items()}


# On the CPU the two passes run in NumPy: a radix sort of the small cluster
# codes, one row gather, and contiguous per-cluster reductions, each on one
# thread. The same steps in torch open a parallel region per operation; on
# two cores shared with other work (load average 12) each region waits for a
# scheduler slice, and the torch steps measured 4-5x slower than these NumPy
# ones on 1M x 70 float32 tokens. The work is memory-bound: a second thread
# has little to gain. Other devices run the same steps in torch.
def _sort_keys(codes: np.ndarray, k: int) -> np.ndarray:
    """Cluster codes as the narrowest unsigned type (NumPy radix-sorts those)."""
    if k <= 1 << 8:
        return codes.astype(np.uint8)
    if k <= 1 << 16:
        return codes.astype(np.uint16)
    return codes


def _cluster_sums(
    tokens: torch.Tensor, codes: torch.Tensor, k: int, in_numpy: bool | None = None
) -> torch.Tensor:
    """Per-cluster sums of ``tokens`` (n, C) by ``codes`` (0..k-1), float64 (k, C).

    The rows are sorted by cluster (a copy), so that each cluster's sum is one
    contiguous reduction accumulated in float64. ``in_numpy`` (default: on
    the CPU) picks the NumPy steps over the torch ones.
    """
    if in_numpy is None:
        in_numpy = tokens.device.type == "cpu"
    if in_numpy:
        cb = codes.numpy()
        bounds = np.cumsum(np.bincount(cb, minlength=k)).tolist()
        order = np.argsort(_sort_keys(cb, k), kind="stable")
        rows, f64 = np.take(tokens.detach().numpy(), order, axis=0), np.float64
    else:
        bounds = _bincount(codes, minlength=k).cumsum(0).tolist()
        rows, f64 = tokens.index_select(0, torch.argsort(codes)), torch.float64
    pairs = itertools.pairwise([0, *bounds])
    parts = [rows[a:b].sum(0, dtype=f64) for a, b in pairs]
    if in_numpy:
        return torch.from_numpy(np.stack(parts))
    return torch.stack(parts)


def _distance_sums(
    tokens: torch.Tensor,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    in_numpy: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of |x - c| and of |x - c|^2 (float64, shape (k,)).

    Each token's squared distance to its centroid is computed directly (no
    |x|^2 - 2 x.c + |c|^2 expansion, which cancels for tokens far from the
    origin) in the dtype of ``tokens``, and summed per cluster in float64.
    ``in_numpy`` as in :func:`_cluster_sums`.
    """
    k = centroids.shape[0]
    if in_numpy is None:
        in_numpy = tokens.device.type == "cpu"
    if in_numpy:
        cb = codes.numpy()
        diff = np.take(centroids.numpy(), cb, axis=0)
        np.subtract(tokens.detach().numpy(), diff, out=diff)
        sq = np.einsum("ij,ij->i", diff, diff)
        dist = np.bincount(cb, weights=np.sqrt(sq), minlength=k)
        sqdist = np.bincount(cb, weights=sq, minlength=k)
        return torch.from_numpy(dist), torch.from_numpy(sqdist)
    diff = tokens - centroids.index_select(0, codes)
    sq = diff.mul_(diff).sum(1).double()
    dist = torch.bincount(codes, weights=sq.sqrt(), minlength=k)
    return dist, torch.bincount(codes, weights=sq, minlength=k)


def davies_bouldin_score(
    X: Any, labels: Any, *, device: str | torch.device = "auto"
) -> float:
    """Davies-Bouldin index, as :func:`sklearn.metrics.davies_bouldin_score`.

    The mean over clusters of ``max_j (s_i + s_j) / d(c_i, c_j)``, where
    ``s_i`` is the mean distance of cluster ``i``'s members to its centroid
    ``c_i``. Lower is better; 0 is the minimum.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n, C) or (N, C, h, w)
        Tokens, or feature maps whose tokens are read channel-last. NumPy
        input is streamed to the device in chunks.
    labels : array-like or torch.Tensor of shape (n,) or (N, h, w)
        Cluster of each token; negative values in label maps are ignored.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the sums are computed (in float64).

    Returns
    -------
    float

    See Also
    --------
    calinski_harabasz_score, silhouette_score

    References
    ----------
    .. [1] D. L. Davies and D. W. Bouldin (1979). "A cluster separation
       measure". IEEE TPAMI 1 (2): 224-227.

    Examples
    --------
    >>> from skstego.metrics import davies_bouldin_score
    >>> X = [[0, 1], [1, 1], [3, 4]]
    >>> round(davies_bouldin_score(X, [0, 0, 1], device="cpu"), 4)
    0.128
    """
    stats = _centroid_stats(X, labels, device)
    intra = stats["dist"] / stats["counts"]
    between = cdist(stats["centroids"], stats["centroids"])  # differences, float64
    if np.allclose(intra, 0) or np.allclose(between, 0):
        return 0.0
    between[between == 0] = np.inf
    scores = ((intra[:, None] + intra[None, :]) / between).max(axis=1)
    return float(scores.mean())


def calinski_harabasz_score(
    X: Any, labels: Any, *, device: str | torch.device = "auto"
) -> float:
    """Calinski-Harabasz index, as :func:`sklearn.metrics.calinski_harabasz_score`.

    The variance ratio ``[B / (k - 1)] / [W / (n - k)]`` of the between-cluster
    dispersion ``B = sum_k n_k |c_k - mean|^2`` and the within-cluster
    dispersion ``W = sum_i |x_i - c_(label i)|^2``; 1.0 when ``W`` is 0 (as
    scikit-learn). Higher is better.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n, C) or (N, C, h, w)
        Tokens, or feature maps whose tokens are read channel-last. NumPy
        input is streamed to the device in chunks.
    labels : array-like or torch.Tensor of shape (n,) or (N, h, w)
        Cluster of each token; negative values in label maps are ignored.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the sums are computed (in float64).

    Returns
    -------
    float

    See Also
    --------
    davies_bouldin_score, silhouette_score

    References
    ----------
    .. [1] T. Calinski and J. Harabasz (1974). "A dendrite method for cluster
       analysis". Communications in Statistics 3 (1): 1-27.

    Examples
    --------
    >>> from skstego.metrics import calinski_harabasz_score
    >>> X = [[0, 0], [0, 1], [4, 0], [4, 1]]
    >>> calinski_harabasz_score(X, [0, 0, 1, 1], device="cpu")
    32.0
    """
    stats = _centroid_stats(X, labels, device)
    counts = stats["counts"]
    n, k = float(counts.sum()), counts.size
    spread = np.square(stats["centroids"] - stats["mean"]).sum(axis=1)
    between = float(np.sum(counts * spread))
    within = float(stats["sqdist"].sum())
    if within == 0.0:
        return 1.0
    return between * (n - k) / (within * (k - 1.0))


# --------------------------------------------------------------------------
# seed stability
# --------------------------------------------------------------------------
def _adjusted_rand(a: torch.Tensor, b: torch.Tensor) -> float:
    """ARI of two code vectors (0..k-1), as sklearn.metrics.adjusted_rand_score."""
    n = a.numel()
    kb = int(b.max()) + 1
    table = torch.bincount(a * kb + b, minlength=(int(a.max()) + 1) * kb)
    table = table.reshape(-1, kb)
    rows, cols = table.sum(dim=1), table.sum(dim=0)
    # Pair counts as scikit-learn's pair_confusion_matrix, then Python ints.
    # Its (table @ cols).sum() is sum_ij n_ij c_j = sum_j c_j^2 (and likewise
    # for the rows): elementwise int64 sums, exact, and CUDA has no int64
    # matrix-vector product ("addmv_impl_cuda" not implemented for 'Long').
    ss = int(table.square().sum())
    fp = int(cols.square().sum()) - ss
    fn = int(rows.square().sum()) - ss
    tp = ss - n
    tn = n * n - fp - fn - ss
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def clustering_stability(labelings: Sequence[Any]) -> dict[str, Any]:
    """Seed stability: adjusted Rand index between every pair of clusterings.

    Cluster the same tokens with several seeds and pass the labelings: a
    stable method gives a mean ARI near 1. Each pair is scored as
    :func:`sklearn.metrics.adjusted_rand_score` (chance-adjusted, invariant to
    renaming clusters) from a contingency table counted with
    ``torch.bincount`` where the labels live.

    Parameters
    ----------
    labelings : sequence of array-like or torch.Tensor
        At least two labelings of the same samples: label vectors (n,) or
        label maps (N, H, W), all with the same number of elements (maps are
        flattened). Every value is a cluster id, negative ones included, as
        in :func:`~sklearn.metrics.adjusted_rand_score`. A 2-D array
        (n_seeds, n) is read as one labeling per row.

    Returns
    -------
    dict
        ``"mean"`` and ``"std"`` (population std) of the ARI over the
        ``m (m - 1) / 2`` pairs, and ``"pairwise"``, the symmetric (m, m)
        float64 ARI matrix with ones on the diagonal.

    Examples
    --------
    >>> from skstego.metrics import clustering_stability
    >>> seeds = [[0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2], [0, 0, 1, 1, 1, 2]]
    >>> result = clustering_stability(seeds)
    >>> result["pairwise"].round(3)
    array([[1.   , 1.   , 0.444],
           [1.   , 1.   , 0.444],
           [0.444, 0.444, 1.   ]])
    >>> round(result["mean"], 3), round(result["std"], 3)
    (0.63, 0.262)
    """
    if isinstance(labelings, (str, bytes)) or not hasattr(labelings, "__len__"):
        raise ValueError(
            "labelings must be a sequence of label arrays (one per seed), got "
            f"{type(labelings).__name__}."
        )
    items = list(labelings)
    if len(items) < 2:
        raise ValueError(
            f"clustering_stability needs at least 2 labelings, got {len(items)}."
        )
    device = next(
        (x.device for x in items if is_torch(x) and x.device.type != "cpu"),
        torch.device("cpu"),
    )
    codes = []
    for i, lab in enumerate(items):
        if not is_torch(lab):
            lab = np.asarray(lab)
        if lab.ndim == 0:
            raise ValueError(f"labelings[{i}] is a scalar, not an array of labels.")
        flat = lab.reshape(-1)
        codes.append(label_codes(flat, f"labelings[{i}]", device))
    sizes = [int(c.numel()) for c in codes]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"Every labeling must label the same samples; got sizes {sizes}."
        )
    if sizes[0] == 0:
        raise ValueError("The labelings hold no samples.")
    m = len(codes)
    pairwise = np.eye(m)
    for i, j in itertools.combinations(range(m), 2):
        pairwise[i, j] = pairwise[j, i] = _adjusted_rand(codes[i], codes[j])
    upper = pairwise[np.triu_indices(m, k=1)]
    return {
        "mean": float(upper.mean()),
        "std": float(upper.std()),
        "pairwise": pairwise,
    }
