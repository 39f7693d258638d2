"""Principal component analysis on the device, exact or streamed.

:class:`TorchPCA` reproduces :class:`sklearn.decomposition.PCA` (same
attributes, same sign convention) for 2-D tokens and 4-D feature maps. Its
``"covariance_eigh"`` solver accumulates the mean and the scatter matrix in
float64, chunk by chunk, so that :meth:`TorchPCA.partial_fit` can stream any
number of tokens through a constant amount of memory.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from math import lgamma, log, pi
from numbers import Integral
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._available_if import available_if
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController

from .._dask import DaskChunks, lazy_output
from .._device import (
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    batch_elements,
    check_features,
    dask_source,
    is_torch,
    iter_slices,
    make_generator,
    maps_to_tokens,
    rows_per_batch,
)
from .._moments import merge_moments, merge_pair
from .._tokens import n_tokens
from .._validation import check_codes

__all__ = ["TorchPCA"]

#: Features from which the Gram product is computed by blocks (upper half).
_SPLIT_GRAM_FEATURES = 128

#: Tokens per block that each CPU thread shifts and multiplies while it sits
#: in cache: ``max(_GRAM_BLOCK_ROWS, _GRAM_BLOCK_ROWS_PER_FEATURE * d)``.
#: Every block also costs a ``d x d`` float64 addition, which outgrows the
#: cache with ``d``, hence more tokens for more features. Best of 3, 2
#: threads: 1M x 384, blocks of 768 / 1024 / 1536 / 2048 / 3072 tokens:
#: 1.16 / 1.02 / 1.06 / 1.09 / 1.19 s; 400k x 768: 1.82 / 1.84 / 1.66 /
#: 1.53 / 1.52 s; 300k x 1024: 2.38 / 2.24 / 2.13 / 2.02 / 1.97 s.
_GRAM_BLOCK_ROWS = 1024
_GRAM_BLOCK_ROWS_PER_FEATURE = 3

#: Held while the BLAS pools are limited to one thread (see _scatter_numpy).
_BLAS_LIMIT_LOCK = threading.Lock()


def _input_dtype(X: Any) -> torch.dtype:
    """float64 for float64 input (centred in float64), float32 otherwise."""
    dtype = X.dtype
    if dtype in (np.float64, torch.float64):
        return torch.float64
    return torch.float32


def _iter_chunks(
    X: Any, device: torch.device, dtype: torch.dtype, progress: str | None = None
) -> Iterator[torch.Tensor]:
    """Yield consecutive chunks of ``X`` (rows or whole images) on ``device``."""
    rows = rows_per_batch(int(np.prod(X.shape[1:])), batch_elements(device, "gram"))
    for sl in iter_slices(X.shape[0], rows, progress=progress):
        yield as_tensor(X[sl], device, dtype)


def _shifted_tokens(xb: torch.Tensor, shift: torch.Tensor, buf: torch.Tensor):
    """Write ``tokens(xb) - shift`` as float32 into ``buf``; return the view.

    One pass over the chunk: 4-D maps are read through a permuted view and
    written in token layout, float64 chunks are subtracted in float64 and
    rounded once. ``xb`` (possibly the user's own tensor) is only read.
    """
    if xb.ndim == 4:
        b, c, h, w = xb.shape
        m = b * h * w
        torch.sub(xb.permute(0, 2, 3, 1), shift, out=buf[:m].view(b, h, w, c))
    else:
        m = xb.shape[0]
        torch.sub(xb, shift, out=buf[:m])
    return buf[:m]


def _svd_flip_rows(Vt: np.ndarray) -> np.ndarray:
    """scikit-learn's ``svd_flip(u_based_decision=False)`` on the rows of ``Vt``.

    Each row is multiplied by the sign of its largest-magnitude entry (the
    first one on ties), so that entry is positive.
    """
    idx = np.abs(Vt).argmax(axis=1)
    signs = np.sign(Vt[np.arange(Vt.shape[0]), idx])
    signs[signs == 0] = 1
    return Vt * signs[:, None]


def _standard_scale(var: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    """StandardScaler's ``scale_``: sqrt of the (ddof=0) variance, 1 if constant.

    Near-constant features are detected with the same float64 error bound as
    scikit-learn's ``_is_constant_feature``.
    """
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return np.where(constant, 1.0, np.sqrt(var))


def _numpy_shift(first: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """The fixed shift of a batch: ``reference`` (the running mean), else the
    mean of the first chunk's first 4096 tokens.

    Any shift close to the mean serves (the exact centring comes later); it
    keeps the float32 Gram products of data far from the origin accurate.
    """
    if reference is not None:
        return np.asarray(reference).astype(first.dtype)
    if first.ndim == 4:
        first = first[: max(1, 4096 // (first.shape[2] * first.shape[3]))]
        first = first.transpose(0, 2, 3, 1).reshape(-1, first.shape[1])
    return first[:4096].mean(axis=0).astype(first.dtype)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """threadpoolctl's handle on the BLAS libraries loaded (found once)."""
    return ThreadpoolController().select(user_api="blas")


def _blas_threads() -> int:
    """The threads NumPy's BLAS may use now (the smallest BLAS pool, so that
    a user's ``threadpool_limits`` or ``OMP_NUM_THREADS`` is obeyed)."""
    pools = [lib.num_threads for lib in _blas_controller().lib_controllers]
    return max(1, min(pools, default=1))


def _accumulate_blocks(
    xb: np.ndarray, shift: np.ndarray, step: int, buf: np.ndarray, acc: np.ndarray
) -> None:
    """Add the Gram matrix of ``[tokens(xb) - shift, 1]`` to ``acc`` (float64).

    ``xb`` is walked ``step`` rows (or images) at a time: each block is
    shifted into ``buf`` (float32, its last column all ones, small enough
    to stay in the core's cache), whose float32 Gram product (BLAS
    ``syrk``) is added to ``acc`` at once. The last row of ``acc`` collects
    the column sums. float64 blocks are subtracted in float64 and rounded
    once; ``xb`` (possibly the user's own array) is only read.
    """
    d = shift.shape[0]
    gram = np.empty(acc.shape, np.float32)
    for start in range(0, xb.shape[0], step):
        block = xb[start : start + step]
        if block.ndim == 4:
            b, _, h, w = block.shape
            m = b * h * w
            out = buf[:m].reshape(b, h, w, d + 1)[..., :d]  # a view, always
            np.subtract(
                block.transpose(0, 2, 3, 1), shift, out=out, casting="same_kind"
            )
        else:
            m = block.shape[0]
            np.subtract(block, shift, out=buf[:m, :d], casting="same_kind")
        y = buf[:m]
        np.matmul(y.T, y, out=gram)
        acc += gram


def _scatter_numpy(X: Any, reference: np.ndarray | None, progress: str | None = None):
    """CPU backend of :func:`_scatter`: NumPy and its BLAS, no torch threads.

    NumPy's ``y.T @ y`` calls BLAS ``syrk``, which computes half of the
    symmetric Gram matrix (measured 1.8x faster than ``torch.mm`` for 384
    features; scikit-learn's covariance solver owes its speed to it). Each
    chunk is split evenly between one Python thread per BLAS thread, with
    BLAS limited to one thread meanwhile; each thread shifts and multiplies
    blocks that stay in its core's cache (:func:`_accumulate_blocks`), so
    the data are read from memory once and the shift costs no extra pass.
    On 1M x 384 float32 tokens (2 cores) this took 1.0 s, against 1.45 s
    for shifting whole 64 MiB chunks into a buffer and multiplying it with
    the 2-thread BLAS, and 1.12 s for the 2-thread ``syrk`` of the unshifted
    data alone. Without the one-thread limit, each thread's BLAS call
    starts threads of its own (measured 2x slower). The subtraction stays
    in NumPy: alternating torch's OpenMP pool with the BLAS pool chunk
    after chunk oversubscribes the cores (measured several times slower on
    a busy 2-core machine).
    """
    d = X.shape[1]
    per_row = int(np.prod(X.shape[1:]))
    pixels = per_row // d
    rows = rows_per_batch(per_row, batch_elements(torch.device("cpu"), "gram"))
    block = max(_GRAM_BLOCK_ROWS, _GRAM_BLOCK_ROWS_PER_FEATURE * d)
    step = max(1, block // pixels)  # tokens, or whole images, per block
    workers = min(_blas_threads(), -(-X.shape[0] // step))
    bufs = [np.empty((min(step, X.shape[0]) * pixels, d + 1), np.float32)]
    bufs += [np.empty_like(bufs[0]) for _ in range(workers - 1)]
    accs = [np.zeros((d + 1, d + 1)) for _ in range(workers)]
    for buf in bufs:
        buf[:, d] = 1.0
    n = 0
    shift = None
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # One thread count at a time: concurrent fits would otherwise
            # restore each other's limits in the wrong order.
            stack.enter_context(_BLAS_LIMIT_LOCK)
            stack.enter_context(_blas_controller().limit(limits=1))
            pool = stack.enter_context(ThreadPoolExecutor(workers))
        for sl in iter_slices(X.shape[0], rows, progress=progress):
            xb = X[sl]
            if is_torch(xb):
                xb = as_tensor(xb, torch.device("cpu"), _input_dtype(xb))
                xb = xb.detach().numpy()
            if shift is None:
                shift = _numpy_shift(xb, reference)
            if workers == 1:
                _accumulate_blocks(xb, shift, step, bufs[0], accs[0])
            else:
                ends = np.linspace(0, xb.shape[0], workers + 1).astype(int)
                parts = [xb[a:b] for a, b in itertools.pairwise(ends)]
                done = pool.map(
                    _accumulate_blocks,
                    parts,
                    [shift] * workers,
                    [step] * workers,
                    bufs,
                    accs,
                )
                list(done)  # waits, and raises what a thread raised
            n += xb.shape[0] * pixels
    acc = np.sum(accs, axis=0)
    return n, shift.astype(np.float64), acc[d, :d], acc[:d, :d]


def _scatter_torch(
    X: Any,
    device: torch.device,
    reference: np.ndarray | None,
    progress: str | None = None,
):
    """CUDA backend of :func:`_scatter`: float32 Gram products with torch.

    The symmetric Gram matrix is computed as its upper block row and its
    lower-right block (3/4 of the products of a full ``mm``).
    """
    dtype = _input_dtype(X)
    n_features = X.shape[1]
    per_row = int(np.prod(X.shape[1:]))
    rows = rows_per_batch(per_row, batch_elements(device, "gram"))
    buf = torch.empty(
        min(rows, X.shape[0]) * (per_row // n_features), n_features, device=device
    )
    h = n_features // 2 if n_features >= _SPLIT_GRAM_FEATURES else 0
    top = torch.empty(h or n_features, n_features, device=device)
    bottom = torch.empty(n_features - h, n_features - h, device=device)
    gram = torch.zeros(n_features, n_features, dtype=torch.float64, device=device)
    sums = torch.zeros(n_features, dtype=torch.float64, device=device)
    n = 0
    shift = None
    for xb in _iter_chunks(X, device, dtype, progress):
        if shift is None:
            if reference is not None:
                shift = torch.as_tensor(reference, device=device).to(dtype)
            else:
                shift = (maps_to_tokens(xb) if xb.ndim == 4 else xb).mean(dim=0)
        y = _shifted_tokens(xb, shift, buf)
        if h:
            torch.mm(y[:, :h].T, y, out=top)
            gram[:h] += top
            torch.mm(y[:, h:].T, y[:, h:], out=bottom)
            gram[h:, h:] += bottom
        else:
            torch.mm(y.T, y, out=top)
            gram += top
        sums += y.sum(dim=0)  # cascade summation, accurate in float32
        n += y.shape[0]
    if h:
        gram[h:, :h] = gram[:h, h:].T
    return n, *(t.double().cpu().numpy() for t in (shift, sums, gram))


def _scatter(
    X: Any,
    device: torch.device,
    reference: np.ndarray | None,
    progress: str | None = None,
):
    """Count, float64 mean and scatter matrix of ``X``, chunk by chunk.

    Each block of tokens is shifted by a fixed reference (``reference``,
    else the first chunk's mean) into a reusable float32 buffer -- never a
    centred copy of all the data -- whose Gram matrix and column sums are
    accumulated in float64. The shift keeps the float32 products accurate
    for data with a large offset; the exact centring is done at the end, in
    float64: ``scatter = G - s s^T / n`` with ``s`` the shifted column sums.

    Returns the count and float64 NumPy arrays: the final ``d x d`` algebra
    is done with NumPy on the host, on whatever device the sums were made.
    """
    with torch.no_grad():
        if device.type == "cpu":
            n, shift, sums, gram = _scatter_numpy(X, reference, progress)
        else:
            n, shift, sums, gram = _scatter_torch(X, device, reference, progress)
    mean = shift + sums / n
    scatter = gram - np.outer(sums, sums) / n
    return n, mean, (scatter + scatter.T) / 2


def _block_scatter(block: np.ndarray, device: torch.device):
    """:func:`_scatter` of one dask block (run on a worker)."""
    return _scatter(block, device, None)


def _is_fraction(dim: Any) -> bool:
    """Whether ``dim`` is a fraction of the explained variance (a float < 1)."""
    return isinstance(dim, float) and 0 < dim < 1


def _needs_spectrum(dim: Any) -> bool:
    """Whether ``dim`` is resolved from the full spectrum (a fraction or "mle")."""
    return _is_fraction(dim) or (isinstance(dim, str) and dim == "mle")


def _check_mle(dim: Any, n_samples: int, n_features: int) -> None:
    """Minka's MLE needs n_samples >= n_features, as in scikit-learn's PCA."""
    if isinstance(dim, str) and dim == "mle" and n_samples < n_features:
        raise ValueError(
            "dim='mle' is only supported if n_samples >= n_features (as "
            "scikit-learn's PCA(n_components='mle')); got "
            f"n_samples={n_samples}, n_features={n_features}."
        )


def _assess_dimension(spectrum: np.ndarray, rank: int, n_samples: int) -> float:
    """Log-likelihood of rank ``rank`` for the spectrum (T. P. Minka, 2000).

    A re-implementation of scikit-learn's ``_assess_dimension`` (same
    formula, same ``eps`` guards): the model is a rank-``rank`` signal in
    isotropic Gaussian noise, and ``rank`` must be in [1, n_features - 1].
    """
    n_features = spectrum.shape[0]
    eps = 1e-15
    if spectrum[rank - 1] < eps:
        # A negligible eigenvalue: the likelihood would be tiny anyway, and
        # its logarithms below ill-defined.
        return -np.inf
    pu = -rank * log(2.0)
    for i in range(1, rank + 1):
        pu += lgamma((n_features - i + 1) / 2.0) - log(pi) * (n_features - i + 1) / 2.0
    pl = -np.sum(np.log(spectrum[:rank])) * n_samples / 2.0
    v = max(eps, np.sum(spectrum[rank:]) / (n_features - rank))
    pv = -log(v) * n_samples * (n_features - rank) / 2.0
    m = n_features * rank - rank * (rank + 1.0) / 2.0
    pp = log(2.0 * pi) * (m + rank) / 2.0
    pa = 0.0
    spectrum_ = spectrum.copy()
    spectrum_[rank:n_features] = v
    for i in range(rank):
        for j in range(i + 1, n_features):
            term = (spectrum[i] - spectrum[j]) * (
                1.0 / spectrum_[j] - 1.0 / spectrum_[i]
            )
            if term <= 0:
                # Tied eigenvalues (rounding noise of a float32 spectrum near
                # zero, where scikit-learn's float64 SVD gives ~1e-30 and
                # skips the rank): the rank is not identifiable.
                return -np.inf
            pa += log(term) + log(n_samples)
    return float(pu + pl + pv + pp - pa / 2.0 - rank * log(n_samples) / 2.0)


def _infer_dimension(spectrum: np.ndarray, n_samples: int) -> int:
    """Minka's MLE of the dimension, as scikit-learn's ``_infer_dimension``.

    The rank in [1, n_features - 1] of largest :func:`_assess_dimension`
    (first one on ties), for the float64 explained variances of the full
    spectrum (``n_features`` of them).
    """
    spectrum = np.asarray(spectrum, dtype=np.float64)
    ll = np.empty_like(spectrum)
    ll[0] = -np.inf  # never 0 components
    for rank in range(1, spectrum.shape[0]):
        ll[rank] = _assess_dimension(spectrum, rank, n_samples)
    return int(np.argmax(ll))


def _resolve_fraction(
    n_components: Any, ratio: np.ndarray, spectrum: np.ndarray, n_samples: int
) -> int:
    """The number of components of a fractional or "mle" ``dim``, as sklearn.

    A fraction: the smallest number of components whose cumulative explained
    variance ratio exceeds it (``np.searchsorted(..., side="right") + 1`` on
    the float64 cumulative sum of the full spectrum), at most the size of the
    spectrum. ``"mle"``: :func:`_infer_dimension` of the explained variances
    ``spectrum`` (at least 1: 0 only happens for an all-zero spectrum, where
    scikit-learn would keep no component). Integers are returned unchanged.
    """
    if isinstance(n_components, str) and n_components == "mle":
        _check_mle(n_components, n_samples, spectrum.shape[0])
        return max(1, _infer_dimension(spectrum, n_samples))
    if not _is_fraction(n_components):
        return int(n_components)
    k = int(np.searchsorted(np.cumsum(ratio), n_components, side="right")) + 1
    return min(k, len(ratio))


def _streams_covariance(estimator: Any) -> bool:
    """Whether ``partial_fit`` applies: only the covariance solver streams."""
    if estimator.solver not in ("auto", "covariance_eigh"):
        raise AttributeError(
            "partial_fit streams the covariance and needs solver='auto' or "
            f"'covariance_eigh'; got solver={estimator.solver!r}."
        )
    return True


_RESCALE = (
    "their values are too large or too spread for float32 (e.g. near 1e37). "
    "Rescale them first, e.g. with standardize=True or by dividing by their "
    "largest magnitude, and fit again."
)


@contextlib.contextmanager
def _rescale_hint(estimator: Any) -> Iterator[None]:
    """Turn a decomposition that fails or overflows on extreme values into a
    clear error."""
    try:
        yield
    except (np.linalg.LinAlgError, torch.linalg.LinAlgError) as exc:
        raise ValueError(
            f"PCA did not converge on these features ({exc}): {_RESCALE}"
        ) from None
    for name in ("components_", "explained_variance_", "mean_"):
        value = getattr(estimator, name, None)
        if value is not None and not np.isfinite(value).all():
            raise ValueError(
                f"PCA overflowed on these features ({name} is not finite): {_RESCALE}"
            )


class TorchPCA(
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """Principal component analysis (PCA) on the GPU, exact or streamed.

    Linear dimensionality reduction of tokens (or of every pixel of feature
    maps) onto the principal axes of the training data, computed on
    ``device`` (PyTorch on CUDA; on the CPU the covariance is accumulated with
    NumPy's BLAS, which is faster there). It reproduces
    :class:`sklearn.decomposition.PCA` (the same fitted attributes and sign
    convention) and adds:

    * 4-D feature maps ``(N, C, h, w)`` as input: each pixel is a sample and
      the output keeps the layout, ``(N, dim, h, w)``;
    * :meth:`partial_fit`, which streams batches into float64 running
      statistics (count, mean and scatter matrix), so that hundreds of
      millions of tokens are fitted in constant memory;
    * ``standardize=True``, equivalent to ``StandardScaler`` followed by PCA,
      with the training statistics.

    Computation runs in float32 with float64 accumulators where the numerics
    need them; transformed data are **float32** whatever the input dtype
    (NumPy in, NumPy out; torch in, torch out on ``device``).

    Parameters
    ----------
    dim : int, float or "mle", default=None
        Number of components to keep. If None, ``fit`` keeps
        ``min(n_samples, n_features)`` components (like scikit-learn's
        ``n_components=None``), and :meth:`partial_fit` keeps ``n_features``.
        Samples are tokens: ``N * h * w`` for 4-D maps.

        A float in (0, 1) is a fraction of the explained variance, like
        scikit-learn's ``n_components=0.95``: the smallest number of
        components whose cumulative ``explained_variance_ratio_`` exceeds it
        is kept (``n_components_``). This needs the full spectrum, which the
        "covariance_eigh" and "full" solvers (and :meth:`partial_fit`)
        compute; ``solver="randomized"`` rejects it. "auto" never picks
        "randomized" for a fraction. With ``standardize=True`` the fraction
        is of the standardized variance.

        ``"mle"`` guesses the dimension with Minka's MLE, exactly as
        scikit-learn's ``n_components="mle"`` (the rank in
        ``[1, n_features - 1]`` of largest likelihood, computed from the full
        spectrum of ``explained_variance_``). It needs the full spectrum too
        (not ``solver="randomized"``) and ``n_samples >= n_features``
        (a ValueError otherwise; for :meth:`partial_fit`, the samples seen so
        far).

    whiten : bool, default=False
        When True, the projections are divided by the square root of
        ``explained_variance_``, so that every output has unit variance on
        the training data. :meth:`inverse_transform` undoes it.

    standardize : bool, default=False
        When True, each feature is centred and divided by its standard
        deviation on the training data (``scale_``, features of zero variance
        are scaled by 1) before the PCA, as
        ``make_pipeline(StandardScaler(), PCA())`` does.

    solver : {"auto", "covariance_eigh", "full", "randomized"}, default="auto"
        "covariance_eigh" :
            Accumulate the float64 covariance matrix chunk by chunk (with
            torch on CUDA; with NumPy's BLAS ``syrk`` on the CPU, the fastest
            there) without making a centred copy of the data, and
            eigendecompose it. Fast and memory-light when
            ``n_samples >> n_features``; the only solver of :meth:`partial_fit`.
        "full" :
            Exact SVD (:func:`torch.linalg.svd`) of the centred data, which
            must fit on the device as float32.
        "randomized" :
            Randomized truncated SVD (Halko et al.) of the centred data, with
            QR-normalised power iterations (7 when ``dim < 0.1 *
            min(n_samples, n_features)``, else 4) and 10 oversamples.
        "auto" :
            scikit-learn's rule: "covariance_eigh" if ``n_features <= 1000``
            and ``n_samples >= 10 * n_features``; else "full" if the data are
            at most 500 x 500 or ``dim`` is None or at least 80% of
            ``min(n_samples, n_features)``; else "randomized".
            :meth:`partial_fit` always uses the covariance.

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the computation runs; "auto" picks CUDA when available. It is
        resolved at each call, so a fitted model reloads on a machine without
        CUDA.

    random_state : int, RandomState instance or None, default=None
        Seeds the random matrix of the "randomized" solver. Pass an int for
        reproducible results.

    verbose : bool, default=False
        Show a tqdm progress bar over the chunks that the covariance solver
        streams (``fit`` and ``partial_fit``; e.g. the chunks of a feature
        store).

    Attributes
    ----------
    components_ : ndarray of shape (n_components_, n_features_in_), float32
        Principal axes (unit rows), sorted by decreasing
        ``explained_variance_``; each row's largest-magnitude entry is
        positive, as in scikit-learn. With ``standardize=True`` they live in
        the standardized space.

    explained_variance_ : ndarray of shape (n_components_,), float32
        Variance of the training data along each component (``n_samples - 1``
        degrees of freedom), i.e. the largest eigenvalues of the covariance.

    explained_variance_ratio_ : ndarray of shape (n_components_,), float32
        Fraction of the total variance explained by each component.

    singular_values_ : ndarray of shape (n_components_,), float32
        Singular values of the centred (and standardized) training data,
        ``sqrt(explained_variance_ * (n_samples_ - 1))``.

    mean_ : ndarray of shape (n_features_in_,), float32
        Per-feature mean of the training data (in the input space, also with
        ``standardize=True``).

    scale_ : ndarray of shape (n_features_in_,), float32, or None
        Per-feature standard deviation used by ``standardize=True`` (1 for
        near-constant features); None when ``standardize=False``.

    n_components_ : int
        Number of components kept.

    n_samples_ : int
        Number of samples (tokens) the model was fitted on.

    n_samples_seen_ : int
        Same as ``n_samples_``; the name scikit-learn's ``IncrementalPCA``
        uses for the running count of :meth:`partial_fit`.

    noise_variance_ : float
        Noise variance of the probabilistic PCA model (Tipping and Bishop,
        1999): the mean of the discarded eigenvalues, 0 when none is
        discarded.

    n_features_in_ : int
        Number of features (channels) seen during :term:`fit`.

    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sklearn.decomposition.PCA : The CPU reference this estimator reproduces.
    sklearn.decomposition.IncrementalPCA : Streaming PCA by batched SVD.
    RandomProjection : Data-independent linear reduction.

    Notes
    -----
    The "covariance_eigh" solver centres each chunk by a fixed reference (the
    first chunk's mean, or the running mean in :meth:`partial_fit`) before
    its float32 Gram product, and merges chunk statistics in float64 (Chan et
    al.), so data with a large offset relative to their spread lose no
    precision (on float32 data whose features lie 10 to 100 units from the
    origin with a spread of 0.2 to 2, scikit-learn's float32 ``X.T @ X`` errs
    by 1e-4 to 1e-1 in ``explained_variance_``; see
    ``benchmarks/bench_pca.py``). As in scikit-learn, it squares the
    condition number: prefer "full" for nearly rank-deficient data whose
    smallest components matter.

    Streaming: :meth:`fit` starts afresh; :meth:`partial_fit` adds a batch to
    the running statistics (those of an earlier ``partial_fit``, or of a
    ``fit`` that used the covariance solver) and recomputes the components
    from the covariance, an ``n_features x n_features`` eigendecomposition
    (on the host, with NumPy). A fit on the CPU and one on CUDA agree to
    float32 precision, not bit for bit.
    Memory therefore stays constant however many tokens are streamed.

    References
    ----------
    Tipping, M. E., and Bishop, C. M. (1999). "Probabilistic principal
    component analysis". Journal of the Royal Statistical Society: Series B,
    61(3), 611-622.

    Halko, N., Martinsson, P. G., and Tropp, J. A. (2011). "Finding structure
    with randomness: Probabilistic algorithms for constructing approximate
    matrix decompositions". SIAM Review, 53(2), 217-288.

    Chan, T. F., Golub, G. H., and LeVeque, R. J. (1979). "Updating formulae
    and a pairwise algorithm for computing sample variances". Technical
    Report STAN-CS-79-773, Stanford University.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego import TorchPCA
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    >>> pca = TorchPCA(dim=3, device="cpu").fit(X)
    >>> pca.components_.shape, pca.explained_variance_ratio_.dtype
    ((3, 8), dtype('float32'))
    >>> pca.transform(X).shape
    (500, 3)

    Feature maps keep their layout, and batches can be streamed:

    >>> maps = rng.normal(size=(4, 8, 6, 6)).astype(np.float32)
    >>> stream = TorchPCA(dim=3, device="cpu")
    >>> for batch in np.split(maps, 2):
    ...     stream = stream.partial_fit(batch)
    >>> stream.n_samples_seen_
    144
    >>> stream.transform(maps).shape
    (4, 3, 6, 6)
    """

    _parameter_constraints: ClassVar[dict] = {
        "dim": [
            Interval(Integral, 1, None, closed="left"),
            Interval(RealNotInt, 0, 1, closed="neither"),
            StrOptions({"mle"}),
            None,
        ],
        "whiten": ["boolean"],
        "standardize": ["boolean"],
        "solver": [StrOptions({"auto", "covariance_eigh", "full", "randomized"})],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        dim: int | None = None,
        *,
        whiten: bool = False,
        standardize: bool = False,
        solver: str = "auto",
        device: str | torch.device | None = "auto",
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.dim = dim
        self.whiten = whiten
        self.standardize = standardize
        self.solver = solver
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> TorchPCA:
        """Fit the model on ``X``, discarding any earlier fit.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Training tokens, or feature maps whose pixels are the samples.
            Never modified. On-disk input (a
            :class:`~skstego.features.FeatureStore`, a zarr or dask array, a
            NumPy memmap) is read chunk by chunk, never loaded as a whole.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        X = check_features(self, X, reset=True, lazy=True)
        n_samples, n_features = n_tokens(X), X.shape[1]
        if n_samples < 2:
            raise ValueError(
                f"TorchPCA needs at least 2 samples; got n_samples = {n_samples}."
            )
        n_components = min(n_samples, n_features) if self.dim is None else self.dim
        if _needs_spectrum(n_components) and self.solver == "randomized":
            kind = "'mle'" if n_components == "mle" else "a fraction of the variance"
            raise ValueError(
                f"dim={self.dim!r} ({kind}) needs the "
                "full spectrum: use solver='auto', 'covariance_eigh' or 'full', "
                "not 'randomized' (as scikit-learn's PCA)."
            )
        _check_mle(n_components, n_samples, n_features)
        if not _needs_spectrum(n_components) and n_components > min(
            n_samples, n_features
        ):
            raise ValueError(
                f"dim={self.dim} must be between 1 and min(n_samples, n_features)="
                f"{min(n_samples, n_features)} (n_samples={n_samples}, "
                f"n_features={n_features})."
            )
        device = self._resolved_device()
        solver = self._choose_solver(n_samples, n_features, n_components)
        self._fit_solver = solver
        for name in ("_stat_n", "_stat_mean", "_stat_scatter"):
            self.__dict__.pop(name, None)
        with _rescale_hint(self):
            if solver == "covariance_eigh":
                n, mean, scatter = self._statistics(X, device, None)
                self._store_statistics(n, mean, scatter)
                self._fit_from_statistics(n, mean, scatter, n_components)
            else:
                self._fit_svd(X, device, solver, n_samples, n_components)
        return self

    @available_if(_streams_covariance)
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: Any, y: Any = None) -> TorchPCA:
        """Add a batch to the running statistics and refit the components.

        The count, mean and scatter matrix are updated in float64 (constant
        memory), then the components are recomputed from the covariance. The
        result after any number of batches equals :meth:`fit` on all of them
        with the "covariance_eigh" solver.

        Only available with ``solver="auto"`` or ``"covariance_eigh"``
        (``hasattr(pca, "partial_fit")`` is False for the other solvers,
        which keep no covariance to update).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            One batch of tokens or feature maps. Never modified. On-disk
            input is read chunk by chunk, as in :meth:`fit`.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Updated estimator.
        """
        first = not hasattr(self, "_stat_n")
        if first and hasattr(self, "components_"):
            raise ValueError(
                f"partial_fit cannot continue a fit made with the "
                f"{self._fit_solver!r} solver (it keeps no covariance). Call fit "
                "with solver='covariance_eigh', or start partial_fit on a fresh "
                "estimator (sklearn.base.clone)."
            )
        X = check_features(self, X, reset=first, lazy=True)
        n_features = X.shape[1]
        n_components = n_features if self.dim is None else self.dim
        if not _needs_spectrum(n_components) and n_components > n_features:
            raise ValueError(
                f"dim={self.dim} must be between 1 and n_features={n_features}."
            )
        seen = 0 if first else self._stat_n
        if seen + n_tokens(X) < 2:
            raise ValueError(
                "TorchPCA needs at least 2 samples; the first batch given to "
                "partial_fit has n_samples = 1."
            )
        device = self._resolved_device()
        running = None if first else self._stat_mean
        batch = self._statistics(X, device, running)
        if first:
            n, mean, scatter = batch
        else:  # Chan et al.'s pairwise update, in float64
            seen = (self._stat_n, self._stat_mean, self._stat_scatter)
            n, mean, scatter = merge_pair(seen, batch)
        _check_mle(n_components, n, n_features)  # before any state changes
        self._fit_solver = "covariance_eigh"
        self._store_statistics(n, mean, scatter)
        with _rescale_hint(self):
            self._fit_from_statistics(n, mean, scatter, n_components)
        return self

    def _statistics(self, X, device, reference):
        """Count, mean and scatter of ``X``: per dask chunk on the workers
        (merged here in float64) for a dask array, else streamed here."""
        source = dask_source(X)
        if source is not None:
            return merge_moments(DaskChunks(source).map(_block_scatter, device))
        progress = "TorchPCA: chunks" if self.verbose else None
        return _scatter(X, device, reference, progress)

    def _choose_solver(self, n_samples: int, n_features: int, n_components: int):
        """scikit-learn's "auto" policy (PCA._fit in scikit-learn 1.5+)."""
        if self.solver != "auto":
            return self.solver
        if n_features <= 1_000 and n_samples >= 10 * n_features:
            return "covariance_eigh"
        if max(n_samples, n_features) <= 500:
            return "full"
        if _needs_spectrum(n_components):
            return "full"  # the full spectrum (as sklearn for a fraction, "mle")
        if 1 <= n_components < 0.8 * min(n_samples, n_features):
            return "randomized"
        return "full"

    def _store_statistics(self, n, mean, scatter):
        self._stat_n = int(n)
        self._stat_mean = mean
        self._stat_scatter = scatter

    def _fit_from_statistics(self, n, mean, scatter, n_components):
        """Eigendecompose the covariance and set the fitted attributes.

        NumPy (LAPACK) on the host: a ``d x d`` problem, and on the CPU it
        keeps to the BLAS pool the accumulation just used (switching to
        torch's OpenMP pool while BLAS threads still spin cost 3x here).
        """
        n_features = scatter.shape[0]
        cov = scatter / (n - 1)
        scale = None
        if self.standardize:
            scale = _standard_scale(np.diag(scatter) / n, mean, n)
            cov = cov / np.outer(scale, scale)
        evals, evecs = np.linalg.eigh(cov)
        evals = np.clip(evals[::-1], 0.0, None)
        Vt = _svd_flip_rows(evecs[:, ::-1].T)
        total_var = evals.sum()
        n_components = _resolve_fraction(n_components, evals / total_var, evals, n)
        if n_components < min(n_features, n):
            noise = float(evals[n_components:].mean())
        else:
            noise = 0.0
        self._set_attributes(
            n=n,
            mean=mean,
            scale=scale,
            components=Vt[:n_components],
            explained_variance=evals[:n_components],
            total_var=total_var,
            noise_variance=noise,
        )

    def _fit_svd(self, X, device, solver, n_samples, n_components):
        """Exact or randomized SVD of the centred data held on the device."""
        Xc, mean, scale, sumsq = self._centred_copy(X, device, n_samples)
        n_features = Xc.shape[1]
        with torch.no_grad():
            if solver == "full":
                _, S, Vt = torch.linalg.svd(Xc, full_matrices=False)
            else:
                S, Vt = self._randomized_svd(Xc, n_components, device)
        del Xc
        S = S.double().cpu().numpy()
        Vt = _svd_flip_rows(Vt.double().cpu().numpy())
        ev = S**2 / (n_samples - 1)
        if solver == "full":
            total_var = ev.sum()
            n_components = _resolve_fraction(
                n_components, ev / total_var, ev, n_samples
            )
            if n_components < min(n_features, n_samples):
                noise = float(ev[n_components:].mean())
            else:
                noise = 0.0
        else:
            total_var = sumsq.sum() / (n_samples - 1)
            kept = ev[:n_components].sum()
            if n_components < min(n_features, n_samples):
                noise = float(
                    (total_var - kept) / (min(n_features, n_samples) - n_components)
                )
            else:
                noise = 0.0
        self._set_attributes(
            n=n_samples,
            mean=mean,
            scale=scale,
            components=Vt[:n_components],
            explained_variance=ev[:n_components],
            total_var=total_var,
            noise_variance=noise,
        )

    def _centred_copy(self, X, device, n_samples):
        """(n_samples, n_features) float32 tensor of centred (scaled) tokens.

        Two chunked passes: a float64 mean, then the centred copy (centred in
        the input's precision) with float64 column sums of squares.
        """
        dtype = _input_dtype(X)
        n_features = X.shape[1]
        with torch.no_grad():
            sums = torch.zeros(n_features, dtype=torch.float64, device=device)
            for xb in _iter_chunks(X, device, dtype):
                tokens = maps_to_tokens(xb) if xb.ndim == 4 else xb
                sums += tokens.sum(dim=0, dtype=torch.float64)
            mean = sums / n_samples
            shift = mean.to(dtype)
            Xc = torch.empty(n_samples, n_features, device=device)
            sumsq = torch.zeros(n_features, dtype=torch.float64, device=device)
            start = 0
            for xb in _iter_chunks(X, device, dtype):
                y = _shifted_tokens(xb, shift, Xc[start:])
                sumsq += y.square().sum(dim=0, dtype=torch.float64)
                start += y.shape[0]
            mean, sumsq = mean.cpu().numpy(), sumsq.cpu().numpy()
            scale = None
            if self.standardize:
                scale = _standard_scale(sumsq / n_samples, mean, n_samples)
                Xc /= torch.as_tensor(scale, dtype=torch.float32, device=device)
                sumsq = sumsq / scale**2
        return Xc, mean, scale, sumsq

    def _randomized_svd(self, Xc, n_components, device):
        """Halko et al.'s randomized SVD, as scikit-learn's ``_randomized_svd``."""
        n_samples, n_features = Xc.shape
        n_iter = 7 if n_components < 0.1 * min(n_samples, n_features) else 4
        transpose = n_samples < n_features
        M = Xc.T if transpose else Xc
        n_random = min(n_components + 10, min(n_samples, n_features))
        gen = make_generator(self.random_state, device)
        Q = torch.randn(M.shape[1], n_random, generator=gen, device=device)
        for _ in range(n_iter):
            Q = torch.linalg.qr(M @ Q).Q
            Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
        Uhat, S, Vt = torch.linalg.svd(Q.T @ M, full_matrices=False)
        if transpose:
            # M = Xc.T = (Q Uhat) S Vt, so Xc's right singular vectors are Q Uhat.
            Vt = (Q @ Uhat).T
        return S[:n_components], Vt[:n_components]

    def _set_attributes(
        self,
        *,
        n,
        mean,
        scale,
        components,
        explained_variance,
        total_var,
        noise_variance,
    ):
        def f32(a):
            return np.ascontiguousarray(a, dtype=np.float32)

        self._mean64 = np.array(mean, dtype=np.float64)
        self.mean_ = f32(mean)
        self.scale_ = None if scale is None else f32(scale)
        self.components_ = f32(components)
        self.explained_variance_ = f32(explained_variance)
        self.explained_variance_ratio_ = f32(explained_variance / total_var)
        self.singular_values_ = f32(np.sqrt(explained_variance * (n - 1)))
        self.noise_variance_ = float(noise_variance)
        self.n_components_ = int(components.shape[0])
        self.n_samples_ = int(n)
        self.n_samples_seen_ = int(n)

    # ------------------------------------------------------------ transform

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Project ``X`` on the principal components.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps. Never modified.

        Returns
        -------
        X_new : ndarray, torch.Tensor or dask array of shape \
                (n_samples, n_components_) or (N, n_components_, h, w), float32
            NumPy for NumPy input; a tensor on ``device`` for tensor input; a
            lazy dask array mapped over the chunks for dask input.
        """
        check_is_fitted(self)
        out = lazy_output(self, "transform", X, self.n_components_)
        if out is not None:
            return out
        X = check_features(self, X, reset=False, lazy=True)
        device = self._resolved_device()
        dtype = _input_dtype(X)
        comps = self._tensor("components_", device)
        proj = comps.T
        if self.scale_ is not None:
            proj = proj / self._tensor("scale_", device)[:, None]
        if self.whiten:
            proj = proj / self._whiten_scale(device)
        proj = proj.contiguous()
        mean = self._tensor("_mean64", device, dtype)

        def fn(tokens: torch.Tensor) -> torch.Tensor:
            # Centre first, in the input's precision, then one float32 matmul.
            return torch.sub(tokens, mean).to(torch.float32) @ proj

        return apply_tokenwise(
            fn, X, device=device, out_features=self.n_components_, dtype=dtype
        )

    def inverse_transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Map projected data back to the input space.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_components_) \
                or (N, n_components_, h, w)
            Projected tokens or maps, as returned by :meth:`transform`.

        Returns
        -------
        X_original : ndarray or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w), float32
            ``X @ components_`` (undoing whitening and standardization) plus
            ``mean_``. NumPy for NumPy input; a tensor on ``device`` for
            tensor input; lazy for dask input.
        """
        check_is_fitted(self)
        out = lazy_output(self, "inverse_transform", X, self.n_features_in_)
        if out is not None:
            return out
        X = self._check_codes(X)
        device = self._resolved_device()
        back = self._tensor("components_", device)
        if self.whiten:
            back = back * self._whiten_scale(device, clip=False)[:, None]
        if self.scale_ is not None:
            back = back * self._tensor("scale_", device)[None, :]
        back = back.contiguous()
        mean = self._tensor("mean_", device)

        def fn(codes: torch.Tensor) -> torch.Tensor:
            return torch.addmm(mean, codes, back)

        return apply_tokenwise(fn, X, device=device, out_features=self.n_features_in_)

    # ----------------------------------------------- probabilistic PCA model

    def get_covariance(self) -> np.ndarray:
        """Data covariance under the probabilistic PCA model, as scikit-learn.

        ``components_.T @ diag(explained_variance_ - noise_variance_) @
        components_ + noise_variance_ * I`` (differences clipped at 0), in
        float64, from the fitted float32 attributes (Tipping and Bishop,
        1999).

        It models the data that the PCA was fitted on: with
        ``standardize=True``, the **standardized** features
        ``(X - mean_) / scale_``. It does not depend on ``whiten`` (the
        whitened model has the same data covariance); scikit-learn's
        ``PCA(whiten=True).get_covariance()`` instead rescales the components
        by ``sqrt(explained_variance_)``, so for ``whiten=True`` the result
        equals scikit-learn's ``PCA(whiten=False)``.

        Returns
        -------
        cov : ndarray of shape (n_features_in_, n_features_in_), float64
            Estimated covariance of the (standardized) data.
        """
        check_is_fitted(self)
        components, diff, noise = self._ppca_terms()
        cov = (components.T * diff) @ components
        cov.flat[:: len(cov) + 1] += noise
        return cov

    def get_precision(self) -> np.ndarray:
        """Inverse of :meth:`get_covariance`, by the matrix inversion lemma.

        Computed as scikit-learn's ``PCA.get_precision`` (an inverse of
        ``n_components_ x n_components_`` only, unless ``noise_variance_`` is
        0, when the covariance itself is inverted), in float64.

        Returns
        -------
        precision : ndarray of shape (n_features_in_, n_features_in_), float64
            Estimated precision of the (standardized) data.
        """
        check_is_fitted(self)
        components, diff, noise = self._ppca_terms()
        if noise == 0.0:
            return np.linalg.inv(self.get_covariance())
        inner = components @ components.T / noise
        with np.errstate(divide="ignore"):
            inner.flat[:: len(inner) + 1] += 1.0 / diff
        precision = components.T @ np.linalg.inv(inner) @ components
        precision /= -(noise**2)
        precision.flat[:: len(precision) + 1] += 1.0 / noise
        return precision

    def score_samples(self, X: Any) -> np.ndarray | torch.Tensor:
        """Log-likelihood of each sample under the probabilistic PCA model.

        As scikit-learn's ``PCA.score_samples``: the log-density of a
        Gaussian with mean ``mean_`` and covariance :meth:`get_covariance`.
        With ``standardize=True`` the model (and so the density) lives in
        the standardized space: it is the log-density of
        ``(X - mean_) / scale_``, without the Jacobian ``-sum(log(scale_))``,
        exactly what ``make_pipeline(StandardScaler(), PCA()).score_samples``
        returns.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps. Never modified.

        Returns
        -------
        ll : ndarray or torch.Tensor of shape (n_samples,) or (N, h, w), float64
            Log-likelihood of each token (of each pixel for maps). NumPy for
            NumPy input; a tensor on ``device`` for tensor input; lazy for dask
            input.
        """
        check_is_fitted(self)
        out = lazy_output(self, "score_samples", X, 0, dtype=np.float64)
        if out is not None:
            return out
        X = check_features(self, X, reset=False, lazy=True)
        device = self._resolved_device()
        precision_np = self.get_precision()
        _, logdet = np.linalg.slogdet(precision_np)
        n_features = self.n_features_in_
        const = -0.5 * (n_features * log(2.0 * pi) - logdet)
        precision = torch.as_tensor(precision_np, device=device)
        mean = torch.as_tensor(self._mean64, device=device)
        scale = None
        if self.scale_ is not None:
            scale = torch.as_tensor(self.scale_, dtype=torch.float64, device=device)

        def fn(tokens: torch.Tensor) -> torch.Tensor:
            xr = tokens - mean
            if scale is not None:
                xr = xr / scale
            return -0.5 * (xr * (xr @ precision)).sum(dim=1) + const

        return apply_tokenwise(
            fn, X, device=device, out_features=0, dtype=torch.float64
        )

    def score(self, X: Any, y: Any = None) -> float:
        """Average log-likelihood of the samples, as scikit-learn's ``PCA.score``.

        The mean of :meth:`score_samples` over every token (every pixel of
        4-D maps); in the standardized space with ``standardize=True``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps. Never modified.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        ll : float
            Average log-likelihood of the samples under the current model.
        """
        ll = self.score_samples(X)
        return float(ll.mean())

    def _ppca_terms(self):
        """float64 components, clipped variance excess and noise variance."""
        components = self.components_.astype(np.float64)
        exp_var = self.explained_variance_.astype(np.float64)
        noise = float(self.noise_variance_)
        diff = np.where(exp_var > noise, exp_var - noise, 0.0)
        return components, diff, noise

    def _whiten_scale(self, device, clip=True):
        """sqrt(explained_variance_), clipped below at float32 eps (as sklearn)."""
        scale = torch.sqrt(self._tensor("explained_variance_", device))
        if clip:
            scale = scale.clamp(min=torch.finfo(torch.float32).eps)
        return scale

    def _check_codes(self, X: Any) -> np.ndarray | torch.Tensor:
        """Validate codes for :meth:`inverse_transform`; never modifies X."""
        return check_codes(X, self.n_components_, type(self).__name__)

    @property
    def _n_features_out(self) -> int:
        """Number of transformed output features."""
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
