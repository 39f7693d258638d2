"""A probe whose predictions are refined by a dense CRF on the images.

The last step of a segmentation pipeline sees codes, not images; the CRF needs
both. :class:`CRFProbe` wraps any probe with ``predict_proba`` and takes the
images as a keyword argument of ``predict`` / ``predict_proba`` / ``score``,
which :class:`sklearn.pipeline.Pipeline` passes on to its last step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, MetaEstimatorMixin, _fit_context, clone
from sklearn.utils._metadata_requests import (
    MetadataRouter,
    MethodMapping,
    _routing_enabled,
    process_routing,
)
from sklearn.utils._param_validation import HasMethods
from sklearn.utils.validation import check_is_fitted

from .._device import _DocLinkMixin, is_torch
from .._weights import check_weights
from ..metrics import report_from_confusion, segmentation_report
from ..postprocess import DenseCRF

__all__ = ["CRFProbe"]


def _image_size(images: Any) -> tuple[int, int]:
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            "images must be a batch (N, H, W, 3) uint8 array or (N, 3, H, W) "
            f"tensor, got shape {shape}."
        )
    return (shape[2], shape[3]) if is_torch(images) else (shape[1], shape[2])


class CRFProbe(MetaEstimatorMixin, _DocLinkMixin, BaseEstimator):
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
            Passed to the probe's ``fit`` (e.g. ``sample_weight``). With
            metadata routing enabled
            (``sklearn.set_config(enable_metadata_routing=True)``), only the
            parameters the probe requests (``probe.set_fit_request(...)``)
            are passed on, and others raise.

        Returns
        -------
        self : CRFProbe
            Fitted estimator.
        """
        if _routing_enabled():
            fit_params = process_routing(self, "fit", **fit_params).probe.fit
        self.probe_ = clone(self.probe).fit(X, y, **fit_params)
        self.n_features_in_ = self.probe_.n_features_in_
        if hasattr(self.probe_, "feature_names_in_"):
            self.feature_names_in_ = self.probe_.feature_names_in_
        return self

    def get_metadata_routing(self) -> MetadataRouter:
        """How metadata is routed: ``fit`` parameters go to the probe's ``fit``.

        :meth:`score` consumes ``sample_weight`` (and ``images``) itself;
        request them with ``set_score_request`` (scikit-learn's metadata
        routing).

        Returns
        -------
        routing : sklearn.utils.metadata_routing.MetadataRouter
            The routing information.
        """
        return (
            MetadataRouter(owner=self.__class__.__name__)
            .add_self_request(self)
            .add(
                probe=self.probe,
                method_mapping=MethodMapping().add(caller="fit", callee="fit"),
            )
        )

    def _crf(self) -> Any:
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
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        images: Any = None,
        metric: str = "miou",
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
        sample_weight : array-like of shape (N,) or (N, H, W), default=None
            Weight of every image (each of its pixels counts with it) or
            pixel; for 2-D tokens, of every token.
        images : array-like or torch.Tensor, optional
            The images; without them, the probe's own ``score``.
        metric : {"miou", "accuracy"}, default="miou"
            Score returned.

        Returns
        -------
        score : float
            In [0, 1].
        """
        if metric not in ("miou", "accuracy"):
            raise ValueError(f"metric must be 'miou' or 'accuracy', got {metric!r}.")
        check_is_fitted(self)
        if images is None:
            if sample_weight is None:  # probes without sample_weight work too
                return float(self.probe_.score(X, y, metric=metric))
            return float(
                self.probe_.score(X, y, sample_weight=sample_weight, metric=metric)
            )
        pred = self.predict(X, images=images)
        clusters = hasattr(self.probe_, "cluster_centers_") and not hasattr(
            self.probe_, "mapping_"
        )
        matching = "hungarian" if clusters else "identity"
        if sample_weight is None:
            report = segmentation_report(y, pred, matching=matching)
        else:
            shape = tuple(np.shape(y))
            w = check_weights(sample_weight, shape[0], shape)
            report = _weighted_report(y, pred, w, matching)
        return float(report[metric])


def _weighted_report(y: Any, pred: Any, w: np.ndarray, matching: str) -> dict:
    """``segmentation_report(y, pred)`` with every pixel weighted by ``w``
    (one weight per image or per pixel): a float64 confusion matrix and
    support, negative predictions counted as misses."""
    t = torch.as_tensor(np.asarray(y) if not is_torch(y) else y.cpu())
    t = t.to(torch.int64)
    p = (pred.cpu() if is_torch(pred) else torch.as_tensor(pred)).to(torch.int64)
    wt = torch.as_tensor(w, dtype=torch.float64)
    wt = wt.reshape(wt.shape + (1,) * (t.ndim - wt.ndim)).expand(t.shape)
    t, p, wt = t.reshape(-1), p.reshape(-1), wt.reshape(-1)
    valid = t >= 0
    n_classes = int(t[valid].max()) + 1 if bool(valid.any()) else 1
    n_pred = max(n_classes, int(p.max()) + 1 if p.numel() else 0)
    support = torch.bincount(t[valid], weights=wt[valid], minlength=n_classes)
    keep = valid & (p >= 0)
    conf = torch.bincount(
        t[keep] * n_pred + p[keep], weights=wt[keep], minlength=n_classes * n_pred
    )
    return report_from_confusion(
        conf.reshape(n_classes, n_pred).numpy(),
        matching=matching,
        support=support.numpy(),
    )
