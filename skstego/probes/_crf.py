"""A probe whose predictions are refined by a dense CRF on the images.

The last step of a segmentation pipeline sees codes, not images; the CRF needs
both. :class:`CRFProbe` wraps any probe with ``predict_proba`` and takes the
images as a keyword argument of ``predict`` / ``predict_proba`` / ``score``,
which :class:`sklearn.pipeline.Pipeline` passes on to its last step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin, _fit_context, clone
from sklearn.utils._param_validation import HasMethods
from sklearn.utils.validation import check_is_fitted

from .._device import is_torch

__all__ = ["CRFProbe"]


def _image_size(images: Any) -> tuple[int, int]:
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            "images must be a batch (N, H, W, 3) uint8 array or (N, 3, H, W) "
            f"tensor, got shape {shape}."
        )
    return (shape[2], shape[3]) if is_torch(images) else (shape[1], shape[2])


class CRFProbe(MetaEstimatorMixin, BaseEstimator):
    """A probe followed by STEGO's dense CRF, as the last step of a pipeline.

    ``fit`` fits a clone of ``probe`` on the codes. Given the images,
    :meth:`predict_proba` upsamples the probe's probabilities to the image
    size and refines them with ``crf`` (:class:`~skstego.DenseCRF`, the
    reference parameters by default); :meth:`predict` takes their argmax.
    Without images, predictions are the probe's own.

    ``Pipeline.predict(X, images=...)`` and ``predict_proba`` pass ``images``
    on to this last step; ``Pipeline.score`` drops keyword arguments (unless
    metadata routing is enabled), so score with
    ``pipe[-1].score(pipe[:-1].transform(X), y, images=images)``.

    Parameters
    ----------
    probe : estimator
        A probe with ``predict_proba(X, size=...)``: :class:`~skstego.KMeansProbe`,
        :class:`~skstego.LinearProbe` or :class:`~skstego.HNNEClusterProbe`.
    crf : DenseCRF, optional
        The CRF; default ``DenseCRF()`` (10 iterations, Gaussian sxy 1 compat
        3, bilateral sxy 67 srgb 3 compat 4).

    Attributes
    ----------
    probe_ : estimator
        The fitted clone of ``probe``.
    n_features_in_ : int
        Number of channels seen during :term:`fit`.

    See Also
    --------
    skstego.crf_refine : The CRF as a function.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import Pipeline
    >>> from skstego import CRFProbe, DenseCRF, KMeansProbe
    >>> from skstego.datasets import make_scenes
    >>> images, labels = make_scenes(2, size=32, n_classes=3, random_state=0)
    >>> codes = images.transpose(0, 3, 1, 2)[:, :, ::4, ::4] / 255.0  # (2, 3, 8, 8)
    >>> probe = CRFProbe(KMeansProbe(k=3, metric="euclidean", device="cpu",
    ...                              random_state=0),
    ...                  DenseCRF(n_iter=2, device="cpu"))
    >>> probe.fit(codes).predict(codes, images=images).shape
    (2, 32, 32)
    >>> probe.predict(codes).shape  # no images: the probe's own, per token
    (2, 8, 8)
    """

    _parameter_constraints: ClassVar[dict] = {
        "probe": [HasMethods(["fit", "predict", "predict_proba"])],
        "crf": [None, HasMethods(["refine"])],
    }

    def __init__(self, probe: Any, crf: Any = None) -> None:
        self.probe = probe
        self.crf = crf

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X: Any, y: Any = None, **fit_params: Any) -> CRFProbe:
        """Fit a clone of ``probe`` on ``(X, y)``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w) or (n, C)
            Codes (or tokens).
        y : array-like, optional
            Labels, as the probe takes them.
        **fit_params
            Passed to the probe's ``fit``.

        Returns
        -------
        self : CRFProbe
            Fitted estimator.
        """
        self.probe_ = clone(self.probe).fit(X, y, **fit_params)
        self.n_features_in_ = self.probe_.n_features_in_
        if hasattr(self.probe_, "feature_names_in_"):
            self.feature_names_in_ = self.probe_.feature_names_in_
        return self

    def _crf(self) -> Any:
        from ..postprocess import DenseCRF

        return DenseCRF() if self.crf is None else self.crf

    def predict_proba(self, X: Any, *, images: Any = None) -> Any:
        """Probabilities of the probe, CRF-refined at image size.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w)
            Codes.
        images : array-like or torch.Tensor, optional
            The images the codes came from, (N, H, W, 3) uint8 or
            (N, 3, H, W); without them, the probe's own probabilities.

        Returns
        -------
        proba : ndarray or torch.Tensor of shape (N, K, H, W)
            Columns as the probe's ``predict_proba``.
        """
        check_is_fitted(self)
        if images is None:
            return self.probe_.predict_proba(X)
        size = _image_size(images)
        if len(images) != len(X):
            raise ValueError(f"X has {len(X)} maps but images has {len(images)}.")
        proba = self.probe_.predict_proba(X, size=size)
        return self._crf().refine(images, proba)

    def _labels(self, ids: Any) -> Any:
        """Column index -> label, as the probe's predict numbers them."""
        probe = self.probe_
        if hasattr(probe, "mapping_"):  # classes, then unmatched clusters
            if is_torch(ids):
                return ids.masked_fill(ids >= probe.n_classes_, -1)
            return np.where(ids < probe.n_classes_, ids, -1)
        classes = getattr(probe, "classes_", None)
        if classes is None or np.array_equal(classes, np.arange(len(classes))):
            return ids
        if is_torch(ids):
            return ids.new_tensor(classes)[ids]
        return classes[ids]

    def predict(self, X: Any, *, images: Any = None) -> Any:
        """Labels of the CRF-refined probabilities at image size.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w)
            Codes.
        images : array-like or torch.Tensor, optional
            The images the codes came from; without them, the probe's own
            ``predict``.

        Returns
        -------
        labels : ndarray or torch.Tensor of int64, shape (N, H, W)
            Classes (or clusters, for a cluster probe fitted without labels;
            -1 for unmatched clusters), numbered as the probe's ``predict``.
        """
        check_is_fitted(self)
        if images is None:
            return self.probe_.predict(X)
        proba = self.predict_proba(X, images=images)
        return self._labels(proba.argmax(1))

    def score(
        self, X: Any, y: Any, *, images: Any = None, metric: str = "miou"
    ) -> float:
        """Mean IoU (or pixel accuracy) of the refined labels.

        Cluster probes fitted without labels are scored under Hungarian
        matching on ``(X, y)``, as :meth:`KMeansProbe.score`; other probes
        with their own classes.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w)
            Codes.
        y : array-like of shape (N, H, W)
            Label maps at image size; negative labels are ignored.
        images : array-like or torch.Tensor, optional
            The images; without them, the probe's own ``score``.
        metric : {"miou", "accuracy"}, default="miou"
            Score returned.

        Returns
        -------
        score : float
            In [0, 1].
        """
        from ..metrics import segmentation_report

        if metric not in ("miou", "accuracy"):
            raise ValueError(f"metric must be 'miou' or 'accuracy', got {metric!r}.")
        check_is_fitted(self)
        if images is None:
            return float(self.probe_.score(X, y, metric=metric))
        pred = self.predict(X, images=images)
        clusters = hasattr(self.probe_, "cluster_centers_") and not hasattr(
            self.probe_, "mapping_"
        )
        report = segmentation_report(
            y, pred, matching="hungarian" if clusters else "identity"
        )
        return float(report[metric])
