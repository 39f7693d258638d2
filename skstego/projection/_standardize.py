"""Per-channel standardisation of tokens or feature maps, optionally per batch.

The study that took STEGO apart (Koenig, Schambach and Otterbach, CVPR 2023
workshop; ``src/mxm_dimred.py`` of ``merantix-momentum/stego-studies``)
standardises DINO tokens before PCA, random projection and h-NNE: the
reducer is fitted on tokens standardised with the training statistics, but
every forward batch is standardised with that batch's own per-channel mean
and (ddof=0) standard deviation. :class:`TokenStandardScaler` does both.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    OneToOneFeatureMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from .._device import (
    TorchEstimatorMixin,
    as_tensor,
    check_features,
    is_torch,
    iter_slices,
    resolve_device,
    rows_per_batch,
)

__all__ = ["TokenStandardScaler"]


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    """Axes a channel statistic is taken over: all but the channel axis."""
    return (0, 2, 3) if ndim == 4 else (0,)


def _channel_shape(ndim: int, n: int) -> tuple[int, ...]:
    return (1, n, 1, 1) if ndim == 4 else (1, n)


def _scale(var: torch.Tensor, mean: torch.Tensor, n: int) -> torch.Tensor:
    """StandardScaler's ``scale_``: sqrt of the (ddof=0) variance, 1 if constant.

    Near-constant channels are found with scikit-learn's float64 error bound
    (``_is_constant_feature``), so constant channels are centred, not blown up.
    """
    eps = float(np.finfo(np.float64).eps)
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return torch.where(constant, torch.ones_like(var), var.sqrt())


def _batch_standardize(t: torch.Tensor) -> torch.Tensor:
    """``t`` standardised with its own per-channel statistics (float64 in)."""
    dims = _reduce_dims(t.ndim)
    n = t.numel() // t.shape[1]
    mean = t.mean(dim=dims, keepdim=True)
    var = (t - mean).square().mean(dim=dims, keepdim=True)
    return (t - mean) / _scale(var, mean, n)


class TokenStandardScaler(
    OneToOneFeatureMixin, TransformerMixin, TorchEstimatorMixin, BaseEstimator
):
    """Standardise every channel of tokens or feature maps.

    With ``batch_size=None`` this is scikit-learn's
    :class:`~sklearn.preprocessing.StandardScaler` for 2-D tokens and 4-D
    maps alike (channels on axis 1): ``transform`` subtracts the training
    mean and divides by the training standard deviation. With an integer
    ``batch_size``, ``transform`` instead cuts its input into consecutive
    batches of ``batch_size`` samples (images for maps, rows for tokens) and
    standardises each batch with **its own** per-channel mean and standard
    deviation, over all the batch's tokens; the fitted statistics are then
    not used. That is what the forward pass of the STEGO study does for
    PCA, random projection and h-NNE (``StandardScaler().fit_transform`` or
    its torch equivalent on each forward batch of 8 validation images).

    Parameters
    ----------
    batch_size : int or None, default=None
        None: standardise with the statistics learned in :term:`fit`. An
        integer: standardise each consecutive batch of that many samples
        with the batch's own statistics (the last batch may be smaller).
    device : str, torch.device or None, default="auto"
        Where statistics and outputs are computed: "auto" (CUDA when
        available), "cpu", "cuda", "cuda:1" or a :class:`torch.device`;
        resolved in :term:`fit`.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features_in_,), float64
        Per-channel mean of the training tokens.
    var_ : ndarray of shape (n_features_in_,), float64
        Per-channel variance (ddof=0) of the training tokens.
    scale_ : ndarray of shape (n_features_in_,), float64
        ``sqrt(var_)``, 1 for (near-)constant channels, as in scikit-learn.
    n_samples_seen_ : int
        Number of training tokens (rows, or images x h x w for maps).
    n_features_in_ : int
        Number of features (channels, axis 1) seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sklearn.preprocessing.StandardScaler : NumPy standardisation of 2-D data.
    TorchPCA : PCA with ``standardize=True`` standardises with training
        statistics inside the estimator.

    Notes
    -----
    Statistics are accumulated in float64; the output is float32, NumPy for
    NumPy input and torch (on the estimator's device) for torch input.
    Standard deviations use ddof=0, like ``StandardScaler`` and the study's
    ``std(unbiased=False)``. With ``batch_size`` set, ``transform`` of one
    sample depends on the samples batched with it, so the output depends on
    the order of the input; ``fit_transform`` equals ``fit().transform()``.

    References
    ----------
    .. [1] A. Koenig, M. Schambach and J. Otterbach, 2023, "Uncovering the
           Inner Workings of STEGO for Safe Unsupervised Semantic
           Segmentation", CVPR 2023 workshops. https://arxiv.org/abs/2304.07314

    Examples
    --------
    >>> import numpy as np
    >>> from skstego import TokenStandardScaler
    >>> rng = np.random.RandomState(0)
    >>> maps = rng.rand(16, 5, 4, 4).astype(np.float32) * 3 + 1
    >>> scaler = TokenStandardScaler(device="cpu").fit(maps)
    >>> z = scaler.transform(maps)
    >>> z.shape, abs(float(z.mean())) < 1e-6, round(float(z.std()), 4)
    ((16, 5, 4, 4), True, 1.0)

    Per batch of 8 images, each batch gets zero mean and unit variance:

    >>> z = TokenStandardScaler(8, device="cpu").fit(maps).transform(maps)
    >>> bool(np.allclose(z[8:].mean(axis=(0, 2, 3)), 0, atol=1e-6))
    True
    """

    _parameter_constraints: ClassVar[dict] = {
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str, torch.device, None],
    }

    def __init__(
        self,
        batch_size: int | None = None,
        *,
        device: str | torch.device | None = "auto",
    ) -> None:
        self.batch_size = batch_size
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> TokenStandardScaler:
        """Learn the per-channel mean and standard deviation of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps; on-disk arrays are read in slices.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : TokenStandardScaler
            Fitted estimator.
        """
        X = check_features(self, X, reset=True, lazy=True)
        device = resolve_device(self.device)
        self._device = device
        n_feat = int(X.shape[1])
        per_row = int(np.prod(X.shape[1:]))
        n_tot, mean, m2 = 0, None, None
        dims = _reduce_dims(len(X.shape))
        for sl in iter_slices(int(X.shape[0]), rows_per_batch(per_row)):
            t = as_tensor(X[sl], device, torch.float64)
            n_b = t.numel() // n_feat
            mean_b = t.mean(dim=dims)
            m2_b = (t - mean_b.reshape(_channel_shape(t.ndim, n_feat))).square()
            m2_b = m2_b.sum(dim=dims)
            if mean is None:
                n_tot, mean, m2 = n_b, mean_b, m2_b
                continue
            n_new = n_tot + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n_new)
            m2 = m2 + m2_b + delta.square() * (n_tot * n_b / n_new)
            n_tot = n_new
        var = m2 / n_tot
        self.mean_ = mean.cpu().numpy()
        self.var_ = var.cpu().numpy()
        self.scale_ = _scale(var, mean, n_tot).cpu().numpy()
        self.n_samples_seen_ = int(n_tot)
        return self

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Standardise ``X`` with the training or each batch's statistics.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps. Never modified.

        Returns
        -------
        X_new : ndarray or torch.Tensor, same shape as ``X``, float32
            NumPy for NumPy input; a tensor on the estimator's device for
            tensor input.
        """
        check_is_fitted(self)
        X = check_features(self, X, reset=False, lazy=True)
        device = self._resolved_device()
        n = int(X.shape[0])
        n_feat = int(X.shape[1])
        shape = _channel_shape(len(X.shape), n_feat)
        if self.batch_size is None:
            mean = self._tensor("mean_", device, torch.float64).reshape(shape)
            scale = self._tensor("scale_", device, torch.float64).reshape(shape)
            step = rows_per_batch(int(np.prod(X.shape[1:])))
        else:
            step = int(self.batch_size)
        out = None
        for sl in iter_slices(n, step):
            t = as_tensor(X[sl], device, torch.float64)
            if self.batch_size is None:
                z = ((t - mean) / scale).to(torch.float32)
            else:
                z = _batch_standardize(t).to(torch.float32)
            if out is None:
                out = torch.empty((n, *t.shape[1:]), dtype=torch.float32, device=device)
            out[sl] = z
        if is_torch(X):
            return out
        return out.cpu().numpy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
