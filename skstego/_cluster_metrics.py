"""Cluster-quality, seed-stability and calibration metrics on torch.

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
twice (centroids, then distances to them), accumulating partial sums in
float64, so a NumPy array or memory map never has to fit on the device at
once. float64 input is computed in float64, everything else in float32.

:func:`clustering_stability` compares the clusterings of several seeds with
the adjusted Rand index; :func:`expected_calibration_error` measures how far
a classifier's confidence is from its accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from ._device import (
    DEFAULT_BATCH_ELEMENTS,
    as_tensor,
    check_features,
    is_torch,
    iter_slices,
    maps_to_tokens,
    resolve_device,
    rows_per_batch,
    to_output,
)

__all__ = [
    "calinski_harabasz_score",
    "clustering_stability",
    "davies_bouldin_score",
    "expected_calibration_error",
    "silhouette_samples",
    "silhouette_score",
]

#: Values a streaming chunk may hold (Davies-Bouldin, Calinski-Harabasz).
_STREAM_ELEMENTS = DEFAULT_BATCH_ELEMENTS // 4
#: Rows summed in the compute dtype before the float64 accumulation.
_PARTIAL_ROWS = 8192


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


def _dense_codes(t: torch.Tensor) -> torch.Tensor:
    """Integer labels -> codes 0..k-1 in sorted label order, where ``t`` lives.

    Labels spanning a short range are mapped through a table of the values
    present (O(n), no sort); others go through :func:`torch.unique`.
    """
    t = t.reshape(-1).long()
    if t.numel() == 0:
        return t
    lo, hi = int(t.min()), int(t.max())
    if hi - lo <= max(4 * t.numel(), 1024):
        present = torch.bincount(t - lo, minlength=hi - lo + 1) > 0
        return (present.cumsum(0) - 1)[t - lo]
    return torch.unique(t, return_inverse=True)[1]


def _encode_flat(labels: Any, name: str, device: torch.device) -> torch.Tensor:
    """Any 1-D labels -> int64 codes 0..k-1 (sorted label order) on ``device``."""
    if is_torch(labels):
        if labels.is_complex():
            raise ValueError(f"{name} must hold real labels, got dtype {labels.dtype}.")
        if labels.is_floating_point():
            if bool(torch.isnan(labels).any()):
                raise ValueError(f"{name} contains NaN; every sample needs a label.")
            return torch.unique(labels.to(device), return_inverse=True)[1].reshape(-1)
        return _dense_codes(labels.to(device))
    arr = np.asarray(labels)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; every sample needs a label.")
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} must hold real labels, got dtype {arr.dtype}.")
    try:
        inverse = np.unique(arr, return_inverse=True)[1]
    except TypeError as exc:
        raise ValueError(
            f"{name} mixes label types that cannot be sorted ({exc})."
        ) from None
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device)


def _encode_labels(labels: Any, X: Any, device: torch.device) -> _Clusters:
    """Check ``labels`` against ``X`` and encode them on ``device``."""
    shape = tuple(labels.shape) if hasattr(labels, "shape") else np.shape(labels)
    if X.ndim == 2:
        if shape != (X.shape[0],):
            raise ValueError(
                f"labels must have shape ({X.shape[0]},), one label per row of X "
                f"{tuple(X.shape)}; got shape {shape}."
            )
        codes = _encode_flat(labels, "labels", device)
    else:
        expected = (X.shape[0], X.shape[2], X.shape[3])
        if shape != expected:
            raise ValueError(
                f"labels must be label maps of shape {expected} for maps X "
                f"{tuple(X.shape)} (N, C, h, w); got shape {shape}. Resize the "
                "labels to the feature size first."
            )
        from .metrics import integer_labels  # metrics imports this module

        raw = integer_labels(labels, "labels")
        raw = raw if is_torch(raw) else torch.from_numpy(np.ascontiguousarray(raw))
        raw = raw.to(device).reshape(-1)
        valid = raw >= 0
        codes = torch.full_like(raw, -1)
        codes[valid] = _dense_codes(raw[valid])
    valid_codes = codes[codes >= 0] if X.ndim == 4 else codes
    counts = torch.bincount(valid_codes)
    return _Clusters(codes, counts.numel(), counts, int(valid_codes.numel()))


def _recount(codes: torch.Tensor) -> _Clusters:
    """Re-encode codes of a subsample (some clusters may be absent)."""
    codes = _dense_codes(codes)
    counts = torch.bincount(codes)
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
    parts = list(_iter_tokens(X, codes, device, dtype, DEFAULT_BATCH_ELEMENTS))
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
    rows = chunk_size or rows_per_batch(n, DEFAULT_BATCH_ELEMENTS)
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
def _centroid_stats(X: Any, labels: Any, device: Any) -> dict[str, torch.Tensor]:
    """Counts, centroids and per-cluster sums of |x - c| and |x - c|^2 (float64)."""
    X = _check_X(X)
    dev = resolve_device(device)
    clusters = _encode_labels(labels, X, dev)
    _check_number_of_labels(clusters.n_labels, clusters.n_samples)
    k, c = clusters.n_labels, X.shape[1]
    dtype, f64 = _compute_dtype(X), torch.float64
    sums = torch.zeros(k, c, dtype=f64, device=dev)
    dist = torch.zeros(k, dtype=f64, device=dev)
    sqdist = torch.zeros(k, dtype=f64, device=dev)
    with torch.no_grad():
        for xb, cb in _iter_tokens(X, clusters.codes, dev, dtype, _STREAM_ELEMENTS):
            # partial sums of 8192 rows in the compute dtype, accumulated in
            # float64: centroids within about an ulp of the data of float64
            # sums, several times faster than converting every token
            for sl in iter_slices(xb.shape[0], _PARTIAL_ROWS):
                part = torch.zeros(k, c, dtype=dtype, device=dev)
                sums += part.index_add_(0, cb[sl], xb[sl])
        counts = clusters.counts.to(f64)
        centroids = sums / counts[:, None]
        near = centroids.to(dtype)  # its rounding moves |x - c|^2 at second order
        for xb, cb in _iter_tokens(X, clusters.codes, dev, dtype, _STREAM_ELEMENTS):
            d = torch.linalg.vector_norm(xb - near[cb], dim=1).to(f64)
            dist.index_add_(0, cb, d)
            sqdist.index_add_(0, cb, d.square_())
    return {
        "counts": counts,
        "centroids": centroids,
        "mean": sums.sum(dim=0) / counts.sum(),
        "dist": dist,
        "sqdist": sqdist,
    }


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
    centroids = stats["centroids"]
    between = torch.cdist(
        centroids, centroids, compute_mode="donot_use_mm_for_euclid_dist"
    )
    zero = torch.zeros((), dtype=torch.float64, device=intra.device)
    if bool(torch.isclose(intra, zero).all()) or bool(
        torch.isclose(between, zero).all()
    ):
        return 0.0
    between[between == 0] = torch.inf
    scores = ((intra[:, None] + intra[None, :]) / between).max(dim=1).values
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
    n, k = float(counts.sum()), counts.numel()
    between = float(
        (counts * (stats["centroids"] - stats["mean"]).square().sum(1)).sum()
    )
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
        codes.append(_encode_flat(flat, f"labelings[{i}]", device))
    sizes = [int(c.numel()) for c in codes]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"Every labeling must label the same samples; got sizes {sizes}."
        )
    if sizes[0] == 0:
        raise ValueError("The labelings hold no samples.")
    m = len(codes)
    pairwise = np.eye(m)
    for i, j in combinations(range(m), 2):
        pairwise[i, j] = pairwise[j, i] = _adjusted_rand(codes[i], codes[j])
    upper = pairwise[np.triu_indices(m, k=1)]
    return {
        "mean": float(upper.mean()),
        "std": float(upper.std()),
        "pairwise": pairwise,
    }


# --------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------
def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return int(n_bins)


def _confidence_and_correct(
    y_true: Any, proba: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max probability (float64) and whether its class is right, labelled pixels.

    Accepts (n,) labels with (n, K) probabilities, or label maps (N, H, W)
    with (N, K, H, W) probabilities (NumPy or torch). Both results stay on
    the device of ``proba``. Negative labels are left out.
    """
    from .metrics import integer_labels  # metrics imports this module

    y = integer_labels(y_true, "y_true")
    p = proba if is_torch(proba) else torch.from_numpy(np.asarray(proba))
    y = y if is_torch(y) else torch.from_numpy(np.ascontiguousarray(y))
    y = y.to(p.device)
    if y.ndim not in (1, 3) or p.ndim != y.ndim + 1:
        raise ValueError(
            "Expected y_true (n,) with proba (n, K), or label maps (N, H, W) with "
            f"proba (N, K, H, W); got y_true {tuple(y.shape)} and proba "
            f"{tuple(p.shape)}."
        )
    if p.shape[0] != y.shape[0] or tuple(p.shape[2:]) != tuple(y.shape[1:]):
        raise ValueError(
            f"y_true {tuple(y.shape)} and proba {tuple(p.shape)} do not match: "
            "proba needs the class axis at position 1 and the same other sizes "
            "(resize the probabilities to the label size first)."
        )
    if not (p.is_floating_point() and p.shape[1] > 0):
        raise ValueError(
            f"proba must hold float probabilities for K >= 1 classes, got dtype "
            f"{p.dtype} and shape {tuple(p.shape)}."
        )
    if p.numel() and not bool(
        torch.isfinite(p).all() & (p >= 0).all() & (p <= 1).all()
    ):
        raise ValueError(
            "proba must hold probabilities in [0, 1] (e.g. predict_proba), not "
            "logits or NaN."
        )
    n_classes = p.shape[1]
    if y.numel() and int(y.max()) >= n_classes:
        raise ValueError(
            f"y_true holds label {int(y.max())} but proba has only {n_classes} classes."
        )
    with torch.no_grad():
        conf, pred = p.max(dim=1)
        valid = y >= 0
        conf, correct = conf[valid], pred[valid] == y[valid]
    if conf.numel() == 0:
        raise ValueError("y_true holds no labelled pixels (all negative).")
    return conf.to(torch.float64), correct


def _calibration_bins(
    confidence: Any, correct: Any, n_bins: int
) -> dict[str, np.ndarray]:
    """Equal-width bins of confidence: edges, counts, accuracy and confidence.

    Bin ``b`` holds confidences in ``(edges[b], edges[b + 1]]`` (the first bin
    also 0), as :func:`sklearn.calibration.calibration_curve`. Empty bins get
    NaN accuracy and confidence. Counting runs where ``confidence`` lives.
    """
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    hit = torch.as_tensor(correct, device=conf.device).to(torch.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    inner = torch.as_tensor(edges[1:-1], dtype=torch.float64, device=conf.device)
    ids = torch.bucketize(conf, inner, right=False)
    counts = torch.bincount(ids, minlength=n_bins).cpu().numpy()
    hits = torch.bincount(ids, weights=hit, minlength=n_bins).cpu().numpy()
    sums = torch.bincount(ids, weights=conf, minlength=n_bins).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(counts > 0, hits / counts, np.nan)
        mean_conf = np.where(counts > 0, sums / counts, np.nan)
    return {
        "edges": edges,
        "counts": counts,
        "accuracy": accuracy,
        "confidence": mean_conf,
    }


def _ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    """``sum_b (n_b / n) * |accuracy_b - confidence_b|`` over non-empty bins."""
    counts = bins["counts"]
    filled = counts > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


def expected_calibration_error(y_true: Any, proba: Any, *, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence, a fraction.

    Samples (or pixels) are grouped in ``n_bins`` equal-width bins of their
    maximum probability, bin ``b`` holding confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (the first also 0, as
    :func:`sklearn.calibration.calibration_curve`); then
    ``ECE = sum_b (n_b / n) * |acc_b - conf_b|`` (Guo et al., 2017), where
    ``acc_b`` is the fraction of bin ``b`` whose top class is right and
    ``conf_b`` its mean confidence. 0 is perfect calibration.

    Parameters
    ----------
    y_true : array-like or torch.Tensor of int, (n,) or (N, H, W)
        True classes; negative labels (-1) are ignored.
    proba : array-like or torch.Tensor, (n, K) or (N, K, H, W)
        Class probabilities in [0, 1], e.g. ``LinearProbe.predict_proba``
        resized to the label size. Counting runs on its device.
    n_bins : int, default=15
        Number of bins (1 compares the overall accuracy with the mean
        confidence).

    Returns
    -------
    float
        In [0, 1].

    See Also
    --------
    skstego.plotting.plot_reliability_diagram : The bins drawn.

    References
    ----------
    .. [1] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger (2017). "On
       calibration of modern neural networks". ICML.

    Examples
    --------
    >>> from skstego.metrics import expected_calibration_error
    >>> proba = [[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.42, 0.58]]
    >>> round(expected_calibration_error([0, 1, 1, 1], proba, n_bins=5), 4)
    0.23
    """
    n_bins = _check_n_bins(n_bins)
    conf, correct = _confidence_and_correct(y_true, proba)
    return _ece_from_bins(_calibration_bins(conf, correct, n_bins))
