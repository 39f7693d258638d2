"""Random projection of tokens or feature maps, drawn and applied on the device.

A data-independent baseline reducer: a Gaussian or (very) sparse random matrix,
generated from ``random_state`` with a :class:`torch.Generator` on the device,
applied token by token. The distributions and all checks follow scikit-learn's
:mod:`sklearn.random_projection`.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import DataDimensionalityWarning
from sklearn.random_projection import johnson_lindenstrauss_min_dim
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._dask import lazy_output
from .._device import (
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    is_dask,
    is_lazy,
    is_torch,
    iter_slices,
    make_generator,
    rows_per_batch,
    to_output,
)
from .._validation import check_codes

__all__ = ["RandomProjection"]


class RandomProjection(
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """Reduce dimensionality with a Gaussian or sparse random projection.

    The data are multiplied by a random matrix ``components_`` of shape
    ``(dim, n_features)``: ``X_new = X @ components_.T``. Nothing is learnt
    from the data (no centring either); ``fit`` only uses the shape of ``X``
    to size the matrix. The matrix is drawn on the device and the projection
    runs there, batch by batch, on 2-D tokens or on 4-D feature maps.

    With ``kind="gaussian"`` the entries are drawn from ``N(0, 1 / dim)`` as in
    :class:`sklearn.random_projection.GaussianRandomProjection`. With
    ``kind="sparse"``, writing ``s = 1 / density``, the entries are

    .. code-block:: text

      -sqrt(s) / sqrt(dim)   with probability 1 / 2s
       0                     with probability 1 - 1 / s
      +sqrt(s) / sqrt(dim)   with probability 1 / 2s

    as in :class:`sklearn.random_projection.SparseRandomProjection`
    (Achlioptas for ``density=1/3``, Li et al. for lower densities).

    Parameters
    ----------
    dim : int or "auto", default="auto"
        Dimensionality of the target projection space. ``"auto"`` picks the
        smallest dimension that the Johnson-Lindenstrauss lemma guarantees
        to preserve pairwise distances within a factor ``1 +- eps``, from the
        number of tokens seen in ``fit`` (``N * h * w`` for maps), with
        :func:`sklearn.random_projection.johnson_lindenstrauss_min_dim`. The
        bound is conservative and grows with the number of tokens; fitting
        raises a ValueError when it exceeds ``n_features``.

    kind : {"gaussian", "sparse"}, default="gaussian"
        Distribution of the matrix entries (see above).

    density : float in (0, 1] or "auto", default="auto"
        Fraction of non-zero entries when ``kind="sparse"``; ``"auto"`` is
        ``1 / sqrt(n_features)`` as recommended by Li et al. Use ``1 / 3`` for
        Achlioptas' matrix. Ignored when ``kind="gaussian"``.

    eps : float, default=0.1
        Maximum distortion of squared distances allowed when ``dim="auto"``
        (must then lie in (0, 1)); smaller values give larger dimensions.

    compute_inverse_components : bool, default=False
        Compute the pseudo-inverse of ``components_`` during ``fit`` and keep
        it as ``inverse_components_``, as scikit-learn's random projections
        do. Otherwise :meth:`inverse_transform` computes it at its first
        call (and caches it on the device, outside the estimator's state).

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the matrix is drawn and the projection computed. ``"auto"`` is
        CUDA when available, else the CPU; resolved at ``fit`` and again at
        each call, so an estimator fitted on a GPU runs on the CPU after
        unpickling on a machine without one.

    random_state : int, RandomState instance or None, default=None
        Seeds the :class:`torch.Generator` that draws the matrix. An int gives
        the same matrix at every fit on a given device type. The matrix comes
        from torch's random stream, so it differs from the one scikit-learn
        draws for the same seed (the distribution is the same), and a CUDA
        stream differs from the CPU one.

    Attributes
    ----------
    components_ : ndarray of shape (n_components_, n_features_in_), dtype float32
        The random matrix, dense, also for ``kind="sparse"``.

    n_components_ : int
        Target dimension used (resolved from ``dim="auto"``).

    inverse_components_ : ndarray of shape (n_features_in_, n_components_), \
            dtype float32
        Moore-Penrose pseudo-inverse of ``components_`` (computed in
        float64). Only set when ``compute_inverse_components=True``.

    density_ : float
        Density used, in (0, 1] (resolved from ``density="auto"``). Only set
        when ``kind="sparse"``.

    n_features_in_ : int
        Number of features (channels, axis 1) seen during :term:`fit`.

    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sklearn.random_projection.GaussianRandomProjection : NumPy Gaussian
        random projection.
    sklearn.random_projection.SparseRandomProjection : NumPy sparse random
        projection.
    TorchPCA : Data-dependent linear reduction.

    Notes
    -----
    ``components_`` is kept dense even for ``kind="sparse"``: at the densities
    that matter here (a few percent of a few hundred channels) a dense matrix
    product is about twice as fast on the CPU as a sparse one (torch CSR or
    SciPy), and on a GPU the product is bound by reading the data, not by
    the arithmetic. So the sparse kind changes the distribution, not the
    speed. Output is float32; NumPy input gives NumPy output, torch input
    gives torch output on the estimator's device. Feature maps are projected
    in their own layout, without a token-major copy.

    References
    ----------
    .. [1] Ping Li, T. Hastie and K. W. Church, 2006, "Very Sparse Random
           Projections". https://web.stanford.edu/~hastie/Papers/Ping/KDD06_rp.pdf

    .. [2] D. Achlioptas, 2001, "Database-friendly random projections",
           https://cgi.di.uoa.gr/~optas/papers/jl.pdf

    .. [3] S. Dasgupta and A. Gupta, 1999, "An elementary proof of the
           Johnson-Lindenstrauss Lemma."

    Examples
    --------
    >>> import numpy as np
    >>> from skstego import RandomProjection
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(1000, 384).astype(np.float32)
    >>> rp = RandomProjection(dim=70, device="cpu", random_state=0).fit(X)
    >>> rp.components_.shape
    (70, 384)
    >>> rp.transform(X).shape
    (1000, 70)

    Feature maps keep their layout, and a sparse matrix has about
    ``1 / sqrt(n_features)`` non-zero entries:

    >>> maps = rng.rand(2, 384, 7, 7).astype(np.float32)
    >>> rp = RandomProjection(dim=24, kind="sparse", device="cpu", random_state=0)
    >>> rp.fit_transform(maps).shape
    (2, 24, 7, 7)
    >>> round(float(rp.density_), 3)
    0.051
    """

    _parameter_constraints: ClassVar[dict] = {
        "dim": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "kind": [StrOptions({"gaussian", "sparse"})],
        "density": [Interval(Real, 0.0, 1.0, closed="right"), StrOptions({"auto"})],
        "eps": [Interval(Real, 0, None, closed="neither")],
        "compute_inverse_components": ["boolean"],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        dim: int | str = "auto",
        *,
        kind: str = "gaussian",
        density: float | str = "auto",
        eps: float = 0.1,
        compute_inverse_components: bool = False,
        device: str | torch.device | None = "auto",
        random_state: Any = None,
    ) -> None:
        self.dim = dim
        self.kind = kind
        self.density = density
        self.eps = eps
        self.compute_inverse_components = compute_inverse_components
        self.device = device
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> RandomProjection:
        """Draw the random matrix for data shaped like ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps. Only the shape is used: the number of
            features, and the number of tokens when ``dim="auto"``.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : RandomProjection
            Fitted estimator.
        """
        # data-independent: only the shape is read (lazy input stays lazy)
        X = check_features(self, X, reset=True, lazy=True)
        self._fit(X, stacklevel=4)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray | torch.Tensor:
        """Draw the random matrix and project ``X``, validating ``X`` once.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        X_new : ndarray or torch.Tensor of shape (n_samples, n_components_) \
                or (N, n_components_, h, w)
            Projected data, float32; NumPy for NumPy input, torch (on the
            estimator's device) for torch input.
        """
        if is_dask(X):
            return self.fit(X).transform(X)
        X = check_features(self, X, reset=True)
        # One more frame to the caller: the set_output wrapper.
        device = self._fit(X, stacklevel=5)
        return self._transform(X, device)

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Project ``X`` with the random matrix: ``X @ components_.T``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps.

        Returns
        -------
        X_new : ndarray or torch.Tensor of shape (n_samples, n_components_) \
                or (N, n_components_, h, w)
            Projected data, float32; NumPy for NumPy input, torch (on the
            estimator's device) for torch input.
        """
        check_is_fitted(self)
        out = lazy_output(self, "transform", X, self.n_components_)
        if out is not None:  # dask: mapped over the chunks, on the workers
            return out
        X = check_features(self, X, reset=False, lazy=True)
        return self._transform(X, self._resolved_device())

    def inverse_transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Map codes back to the feature space with the pseudo-inverse.

        Returns the least-squares ``X_original`` whose projection is ``X``
        (exact when ``n_components_ >= n_features_in_``), as scikit-learn's
        random projections do. The pseudo-inverse is computed (in float64)
        at the first call and cached on the device.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_components_) \
                or (N, n_components_, h, w)
            Codes, as returned by :meth:`transform`.

        Returns
        -------
        X_original : ndarray or torch.Tensor of shape (n_samples, n_features_in_) \
                or (N, n_features_in_, h, w)
            Reconstructed data, float32, same array type as ``X`` (a lazy
            dask array mapped over the chunks for dask input).
        """
        check_is_fitted(self)
        out = lazy_output(self, "inverse_transform", X, self.n_features_in_)
        if out is not None:
            return out
        X = self._check_codes(X)
        device = self._resolved_device()
        return _linear(self._inverse_components(device), X, device)

    def _fit(self, X: np.ndarray | torch.Tensor, stacklevel: int) -> torch.device:
        """Size and draw the matrix; ``X`` is already validated.

        ``stacklevel`` points the dimensionality warning at the user's call.
        """
        device = self._resolved_device()
        n_features = int(X.shape[1])
        n_samples = int(X.shape[0] * np.prod(X.shape[2:], dtype=np.int64))

        if self.dim == "auto":
            n_components = int(
                johnson_lindenstrauss_min_dim(n_samples=n_samples, eps=self.eps)
            )
            if n_components <= 0:
                raise ValueError(
                    f"eps={self.eps:f} and n_samples={n_samples} lead to a target "
                    f"dimension of {n_components} which is invalid"
                )
            if n_components > n_features:
                raise ValueError(
                    f"eps={self.eps:f} and n_samples={n_samples} lead to a target "
                    f"dimension of {n_components} which is larger than the "
                    f"original space with n_features={n_features}"
                )
        else:
            n_components = int(self.dim)
            if n_components > n_features:
                warnings.warn(
                    "The number of components is higher than the number of "
                    f"features: n_features < n_components ({n_features} < "
                    f"{n_components}). The dimensionality of the problem will not "
                    "be reduced.",
                    DataDimensionalityWarning,
                    stacklevel=stacklevel,
                )

        generator = make_generator(self.random_state, device)
        shape = (n_components, n_features)
        if self.kind == "gaussian":
            components = torch.randn(
                shape, generator=generator, device=device, dtype=torch.float32
            )
            components.mul_(float(1.0 / np.sqrt(n_components)))
            self.__dict__.pop("density_", None)
        else:
            density = (
                1.0 / np.sqrt(n_features)
                if self.density == "auto"
                else float(self.density)
            )
            # One uniform draw per entry: u < density/2 -> +v, density/2 <=
            # u < density -> -v, else 0. Each entry is non-zero independently
            # with probability ``density``, which is what scikit-learn's
            # binomial row counts + uniformly placed indices amount to.
            u = torch.rand(shape, generator=generator, device=device)
            value = float(np.sqrt(1.0 / density) / np.sqrt(n_components))
            components = torch.where(u < density / 2, value, -value)
            components = torch.where(u < density, components, 0.0)
            components = components.to(torch.float32)
            self.density_ = float(density)

        self.components_ = components.cpu().numpy()
        self.n_components_ = n_components
        if self.compute_inverse_components:
            self.inverse_components_ = np.linalg.pinv(
                self.components_.astype(np.float64)
            ).astype(np.float32)
        else:
            self.__dict__.pop("inverse_components_", None)
        self._n_features_out = n_components
        return device

    def _transform(
        self, X: np.ndarray | torch.Tensor, device: torch.device
    ) -> np.ndarray | torch.Tensor:
        """Project validated ``X`` on ``device``."""
        return _linear(self._tensor("components_", device), X, device)

    def _inverse_components(self, device: torch.device) -> torch.Tensor:
        """Pseudo-inverse of ``components_`` (n_features, dim), cached.

        ``inverse_components_`` when it was computed at fit time."""
        if getattr(self, "inverse_components_", None) is not None:
            return self._tensor("inverse_components_", device)
        return self._cached(
            ("inverse_components", str(device)),
            self.components_,
            lambda: torch.linalg.pinv(
                self._tensor("components_", device, torch.float64)
            ).to(torch.float32),
        )

    def _check_codes(self, X: Any) -> np.ndarray | torch.Tensor:
        """Validate codes for :meth:`inverse_transform`; never modifies X."""
        return check_codes(X, self.n_components_, type(self).__name__)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _linear(
    W: torch.Tensor, X: np.ndarray | torch.Tensor, device: torch.device
) -> np.ndarray | torch.Tensor:
    """``X @ W.T`` over the channel axis, for 2-D tokens or 4-D maps.

    Tokens go through :func:`apply_tokenwise` (in one piece on the CPU when
    no conversion is needed: the data are already in memory, and a single
    product writes the output without concatenating batches). On the CPU the
    token product uses NumPy's BLAS, the one scikit-learn uses: for this
    tall-and-skinny shape (n x C times C x dim, dim ~ 70) it was 20-30% faster
    here than torch's MKL ``mm``. Maps are multiplied in their own layout,
    ``W @ X[i].reshape(C, h*w)`` per image (one batched product), which yields
    (N, dim, h, w) directly: no permuted copy of the input nor of the output
    (4x faster than the token path on the CPU).
    """
    if X.ndim == 2:
        batch_size = None
        if device.type == "cpu":
            Wt = W.T.contiguous().numpy()

            def fn(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(x.detach().numpy() @ Wt)

            if _is_cpu_float32(X):
                batch_size = max(1, X.shape[0])
        else:

            def fn(x: torch.Tensor) -> torch.Tensor:
                return x @ W.T

        return apply_tokenwise(
            fn,
            X,
            device=device,
            out_features=W.shape[0],
            batch_size=batch_size,
        )

    n, c, h, w = X.shape
    d = W.shape[0]
    if device.type == "cpu" and _is_cpu_float32(X):
        batch_size = max(1, n)
    else:
        batch_size = rows_per_batch((c + d) * h * w)
    torch_in = is_torch(X)
    outputs = []
    with torch.no_grad():
        for sl in iter_slices(n, batch_size):
            xb = as_tensor(X[sl], device)
            yb = torch.matmul(W, xb.reshape(xb.shape[0], c, h * w))
            yb = yb.reshape(xb.shape[0], d, h, w)
            outputs.append(yb if torch_in else yb.cpu())
    Y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return to_output(Y, X)


def _is_cpu_float32(X: np.ndarray | torch.Tensor) -> bool:
    """True when ``X`` can be used on the CPU as float32 without any copy."""
    if is_lazy(X):  # read slice by slice, never whole
        return False
    if is_torch(X):
        return X.device.type == "cpu" and X.dtype == torch.float32
    return X.dtype == np.float32 and X.flags.c_contiguous
