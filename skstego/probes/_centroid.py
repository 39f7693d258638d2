"""What every centroid-based cluster probe shares.

:class:`KMeansProbe` and :class:`HNNEClusterProbe` differ in how they find
their centroids; once fitted, both assign tokens to the nearest centroid
(cosine or Euclidean), map clusters to classes by the Hungarian algorithm,
and score, predict and give probabilities the same way: this mixin.

The number of classes that scores count is fixed, as in the STEGO protocol
(``UnsupervisedMetrics(n_classes, ...)`` of the reference's ``src/utils.py``):
a class absent from the evaluated labels still has a row, so the Hungarian
algorithm can match a cluster to it and its IoU of 0 counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from .._dask import lazy_output
from .._device import (
    as_tensor,
    check_features,
    is_torch,
    iter_slices,
    maps_to_tokens,
    rows_per_batch,
)
from .._weights import check_weights, token_weights
from ..metrics import confusion_matrix, hungarian_match, report_from_confusion
from ._base import (
    check_targets,
    check_upsample,
    predict_labels,
    score_maps,
    scored_confusion,
)
from ._kmeans_kernels import _normalize_rows, _overflow_scale, _similarity

__all__ = ["CentroidProbeMixin"]


def _n_valid_classes(y: Any) -> int:
    """Largest label + 1 (0 when no label is valid)."""
    size = y.numel() if is_torch(y) else y.size
    m = int(y.max()) if size else -1
    return m + 1 if m >= 0 else 0


def _check_n_classes(n_classes: Any, name: str = "n_classes") -> int:
    if isinstance(n_classes, bool | np.bool_) or not isinstance(
        n_classes, int | np.integer
    ):
        raise ValueError(f"{name} must be an int >= 1 or None, got {n_classes!r}.")
    if n_classes < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {n_classes!r}.")
    return int(n_classes)


def _fixed_n_classes(y: Any, n_classes: int, source: str) -> int:
    """``n_classes``, after checking that every valid label of ``y`` is below it."""
    top = _n_valid_classes(y)
    if top > n_classes:
        raise ValueError(
            f"y holds class ids up to {top - 1}, but {source} n_classes="
            f"{n_classes}: pass a larger n_classes, or map the labels to ignore "
            "to -1."
        )
    return n_classes


def _check_size(size: Any, X: Any) -> None:
    """``size`` (an output map size) only for 4-D maps."""
    if size is not None and len(getattr(X, "shape", (0, 0, 0, 0))) != 4:
        raise ValueError("size only applies to 4-D maps (N, C, h, w).")


class CentroidProbeMixin:
    """Prediction, probabilities and scoring from ``cluster_centers_``.

    The host class provides ``cluster_centers_`` (n_clusters, n_features),
    ``metric`` ("cosine" or "euclidean"), ``temperature``, optionally an
    ``n_classes`` parameter, ``labels_`` and, when fitted with labels,
    ``mapping_`` and ``n_classes_``; and TorchEstimatorMixin's ``_tensor`` /
    ``_resolved_device``.
    """

    @property
    def _n_outputs(self) -> int:
        return int(self.cluster_centers_.shape[0])

    def _score_n_classes(self, y: Any, n_classes: int | None) -> int:
        """The fixed number of classes a score counts (rows of the confusion).

        ``n_classes`` (given to ``score``), else the ``n_classes`` parameter:
        every label must be below it. Else ``n_classes_`` from ``fit(X, y)``,
        grown to cover classes unseen in fit. Else the evaluated labels'
        largest class + 1.
        """
        if n_classes is not None:
            return _fixed_n_classes(y, _check_n_classes(n_classes), "score's")
        param = getattr(self, "n_classes", None)
        if param is not None:
            return _fixed_n_classes(y, _check_n_classes(param), "the probe's")
        return max(_n_valid_classes(y), getattr(self, "n_classes_", 0), 1)

    def _fit_mapping(self, X: Any, y: Any, labels: Any, device: torch.device) -> None:
        """``mapping_`` and ``n_classes_`` from the training labels ``y``.

        The Hungarian assignment on the confusion of ``y`` with the training
        clusters ``labels`` (or, for label maps of another size than ``X``,
        with the argmax of the cluster scores upsampled to that size).
        ``n_classes_`` is the ``n_classes`` parameter when set, else the
        largest training label + 1.
        """
        n_valid = _n_valid_classes(y)
        if n_valid == 0:
            raise ValueError(
                "y holds no valid label (all labels are negative); fit without "
                "y, or pass class ids >= 0."
            )
        param = getattr(self, "n_classes", None)
        if param is None:
            n_classes = n_valid
        else:
            n_classes = _fixed_n_classes(y, _check_n_classes(param), "the probe's")
        if X.ndim == 2 or tuple(y.shape[-2:]) == tuple(X.shape[-2:]):
            conf = confusion_matrix(
                y, labels, n_classes=n_classes, n_pred=self._n_outputs
            )
        else:
            conf = scored_confusion(
                self._scorer(device),
                X,
                y,
                device=device,
                n_outputs=self._n_outputs,
                n_classes=n_classes,
            )
        self.mapping_ = hungarian_match(conf)
        self.n_classes_ = n_classes

    def _scorer(self, device: torch.device):
        """Token scores (m, C) -> (m, k) to maximise, on ``device``."""
        centers = self._tensor("cluster_centers_", device)
        if self.metric == "cosine":
            return lambda xb: _similarity(_normalize_rows(xb), centers, None)
        scale = _overflow_scale(centers)
        if scale != 1.0:  # huge values: score x / s against c / s (same argmax)
            centers = centers / scale
            neg_c_sq = -(centers * centers).sum(dim=1)
            return lambda xb: _similarity(xb / scale, centers, neg_c_sq)
        neg_c_sq = -(centers * centers).sum(dim=1)
        return lambda xb: _similarity(xb, centers, neg_c_sq)

    def _check_X(self, X: Any) -> Any:
        check_is_fitted(self)
        return check_features(self, X, reset=False, lazy=True)

    def predict(
        self,
        X: Any,
        *,
        size: tuple[int, int] | None = None,
        upsample: str = "scores",
    ) -> Any:
        """Class (when fitted with ``y``) or cluster of every token.

        Parameters
        ----------
        X : array-like, torch.Tensor or dask array of shape \
                (n_samples, n_features) or (N, n_features, h, w)
            Tokens or feature maps.
        size : tuple of (int, int), default=None
            For maps only: upsample bilinearly to (H, W) before the argmax.
        upsample : {"scores", "codes"}, default="scores"
            With ``size``: upsample the cluster scores, or the feature maps
            themselves before scoring them, as the STEGO reference does. The
            two differ for ``metric="cosine"`` (each upsampled code is
            normalised before the cosine) and agree up to float rounding for
            ``"euclidean"``.

        Returns
        -------
        labels : ndarray, torch.Tensor or dask array of int64, shape \
                (n_samples,), (N, h, w) or (N, H, W)
            Class ids through ``mapping_`` (-1 for unmatched clusters) when
            ``fit`` got ``y``, else cluster ids. NumPy for NumPy input, torch on
            the estimator's device for torch input, a lazy dask array mapped
            over the chunks for dask input.
        """
        check_upsample(upsample)
        _check_size(size, X)
        kw = {"upsample": upsample} if upsample != "scores" else {}
        out = lazy_output(self, "predict", X, 0, dtype=np.int64, size=size, **kw)
        if out is not None:
            return out
        X = self._check_X(X)
        _check_size(size, X)
        device = self._resolved_device()
        label_fn = None
        if hasattr(self, "mapping_"):
            mapping = self._tensor("mapping_", device, torch.int64)
            label_fn = mapping.__getitem__
        return predict_labels(
            self._scorer(device),
            X,
            device=device,
            n_outputs=self._n_outputs,
            size=size,
            label_fn=label_fn,
            upsample=upsample,
        )

    def _proba_width(self) -> int:
        """Columns of :meth:`predict_proba`: clusters, or classes (+ 1 when
        some cluster is unmatched)."""
        check_is_fitted(self)
        if not hasattr(self, "mapping_"):
            return self._n_outputs
        return int(self.n_classes_) + int(bool((self.mapping_ < 0).any()))

    def _proba(
        self, X: Any, size: Any, upsample: str, log: bool
    ) -> np.ndarray | torch.Tensor:
        """Probabilities (or their logarithm) for :meth:`predict_proba`."""
        check_upsample(upsample)
        method = "predict_log_proba" if log else "predict_proba"
        kw = {"upsample": upsample} if upsample != "scores" else {}
        out = lazy_output(self, method, X, self._proba_width(), size=size, **kw)
        if out is not None:
            return out
        X = self._check_X(X)
        device = self._resolved_device()
        scale = 1.0 / float(self.temperature)
        width = self._n_outputs
        if hasattr(self, "mapping_"):
            mapping = self._tensor("mapping_", device, torch.int64)
            n_classes = int(self.n_classes_)
            columns = torch.where(mapping >= 0, mapping, n_classes)
            width = n_classes + int(bool((mapping < 0).any()))
            groups = [torch.nonzero(columns == c).flatten() for c in range(width)]

            def post(scores: torch.Tensor) -> torch.Tensor:
                if not log:
                    p = torch.softmax(scores * scale, dim=1)
                    shape = list(p.shape)
                    shape[1] = width
                    return p.new_zeros(shape).index_add_(1, columns, p)
                # log of the summed probabilities, stable: logsumexp per class
                lp = torch.log_softmax(scores * scale, dim=1)
                parts = [
                    torch.logsumexp(lp.index_select(1, g), dim=1)
                    if g.numel()
                    else torch.full_like(lp[:, 0], -torch.inf)
                    for g in groups
                ]
                return torch.stack(parts, dim=1)

        else:

            def post(scores: torch.Tensor) -> torch.Tensor:
                fn = torch.log_softmax if log else torch.softmax
                return fn(scores * scale, dim=1)

        return score_maps(
            self._scorer(device),
            X,
            device=device,
            n_outputs=self._n_outputs,
            post=post,
            out_features=width,
            size=size,
            upsample=upsample,
        )

    def predict_proba(
        self,
        X: Any,
        *,
        size: tuple[int, int] | None = None,
        upsample: str = "scores",
    ) -> Any:
        """Soft assignment of every token to clusters, or to classes.

        A softmax over the centroids of the cosine similarity (or negative
        squared Euclidean distance) divided by ``temperature``; the default
        ``temperature=0.5`` is the STEGO reference's ``alpha=2``
        (``ClusterLookup.forward(x, alpha=2)``, ``softmax(inner * alpha)``).
        When ``fit`` got ``y``, cluster probabilities are summed into the
        classes of ``mapping_``: column ``c`` is the probability of class
        ``c`` (``n_classes_`` columns), plus one last column holding the mass
        of unmatched clusters when there are any (their class is -1). Every
        row sums to one; its argmax is the :meth:`predict` label whenever
        every cluster is matched (and always without ``y``).

        Parameters
        ----------
        X : array-like, torch.Tensor or dask array of shape \
                (n_samples, n_features) or (N, n_features, h, w)
            Tokens or feature maps.
        size : tuple of (int, int), default=None
            For maps only: upsample bilinearly to (H, W) before the softmax,
            as :meth:`predict` does.
        upsample : {"scores", "codes"}, default="scores"
            With ``size``: what is upsampled, as in :meth:`predict`.

        Returns
        -------
        proba : ndarray, torch.Tensor or dask array of float32, shape \
                (n_samples, n_cols) or (N, n_cols, h, w) / (N, n_cols, H, W)
            ``n_cols`` is ``k`` without ``y``; with ``y`` it is
            ``n_classes_`` (+ 1 when some cluster is unmatched). For dask
            input, a lazy dask array mapped over the chunks.

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import KMeansProbe
        >>> X = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
        >>> probe = KMeansProbe(k=2, device="cpu", random_state=0).fit(X, [0, 0, 1, 1])
        >>> proba = probe.predict_proba(X)
        >>> proba.shape, bool(np.allclose(proba.sum(axis=1), 1))
        ((4, 2), True)
        >>> (proba.argmax(axis=1) == probe.predict(X)).all()
        np.True_
        """
        return self._proba(X, size, upsample, log=False)

    def predict_log_proba(
        self,
        X: Any,
        *,
        size: tuple[int, int] | None = None,
        upsample: str = "scores",
    ) -> Any:
        """Logarithm of :meth:`predict_proba`, computed stably.

        Without ``y`` in ``fit`` this is ``log_softmax(similarity /
        temperature)``, the reference's ``ClusterLookup.forward(code, 2,
        log_probs=True)`` at ``temperature=0.5`` (with ``size`` and
        ``upsample="codes"`` for its upsampled codes). With ``y``, a
        ``logsumexp`` over the clusters of each class.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps.
        size : tuple of (int, int), default=None
            For maps only: upsample bilinearly to (H, W) first.
        upsample : {"scores", "codes"}, default="scores"
            With ``size``: what is upsampled, as in :meth:`predict`.

        Returns
        -------
        log_proba : ndarray, torch.Tensor or dask array of float32
            Shaped as :meth:`predict_proba` (lazy for dask input).
        """
        return self._proba(X, size, upsample, log=True)

    def fit_predict(self, X: Any, y: Any = None) -> Any:
        """Fit, then return :meth:`predict` on the training data.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps.
        y : array-like or torch.Tensor of int, default=None
            Optional labels, as in :meth:`fit`.

        Returns
        -------
        labels : ndarray or torch.Tensor of int64, shape (n_samples,) or (N, h, w)
            ``labels_`` without ``y``; their classes (``mapping_[labels_]``)
            with ``y``.
        """
        self.fit(X, y)
        labels = self.labels_
        if hasattr(self, "mapping_"):
            labels = self.mapping_[labels]
        if is_torch(X):
            return torch.from_numpy(labels).to(self._resolved_device())
        return labels

    def score_report(
        self,
        X: Any,
        y: Any,
        *,
        n_classes: int | None = None,
        extra_clusters: str = "errors",
        upsample: str = "scores",
        sample_weight: Any = None,
    ) -> dict[str, Any]:
        """All scores of the unsupervised protocol on ``(X, y)``.

        Clusters are matched to classes by the Hungarian algorithm on the
        confusion matrix of ``(X, y)`` itself, as the STEGO evaluation does;
        ``mapping_`` is not used.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps.
        y : array-like or torch.Tensor of int
            Labels (n_samples,) or label maps (N, H, W) of the feature maps'
            aspect ratio, any size; negative labels are ignored.
        n_classes : int, default=None
            Number of classes scored (rows of the confusion matrix, 27 for
            COCO-Stuff); every label must be below it. Default: the probe's
            ``n_classes`` parameter, else ``n_classes_`` from ``fit(X, y)``
            (grown to cover classes unseen in fit), else the largest label of
            ``y`` + 1. A class absent from ``y`` still counts: the Hungarian
            algorithm may match a cluster to it, whose pixels then score an
            IoU of 0 there, as in the reference.
        extra_clusters : {"errors", "reference"}, default="errors"
            With more clusters than classes: the pixels of unmatched clusters
            count as errors, or are treated exactly as the STEGO reference
            code does (pixels of cluster ids ``>= n_classes`` dropped; see
            :mod:`skstego.metrics`).
        upsample : {"scores", "codes"}, default="scores"
            For label maps of another size: upsample the cluster scores, or
            the feature maps as the reference does (see :meth:`predict`).
        sample_weight : array-like of shape (n_samples,) or (N, H, W), \
                default=None
            Weight of every token (2-D input), of every image (4-D maps: each
            of its pixels counts with the image's weight) or of every pixel
            of the label maps. The confusion matrix then sums weights instead
            of counting pixels (float64).

        Returns
        -------
        report : dict
            As :func:`skstego.metrics.segmentation_report`: ``miou``,
            ``accuracy``, per-class ``iou``, ``precision``, ``recall``,
            ``support``, the ``confusion`` (n_classes, k) and the ``mapping``.

        Warns
        -----
        sklearn.exceptions.UndefinedMetricWarning
            When every label is ignored: the scores are then NaN.
        """
        check_upsample(upsample)
        X = self._check_X(X)
        y = check_targets(X, y)
        w = check_weights(sample_weight, X.shape[0], y.shape if X.ndim == 4 else None)
        device = self._resolved_device()
        conf = scored_confusion(
            self._scorer(device),
            X,
            y,
            device=device,
            n_outputs=self._n_outputs,
            n_classes=self._score_n_classes(y, n_classes),
            upsample=upsample,
            sample_weight=w,
        )
        return report_from_confusion(
            conf, matching="hungarian", extra_clusters=extra_clusters
        )

    def score(
        self,
        X: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        metric: str = "miou",
        n_classes: int | None = None,
        extra_clusters: str = "errors",
        upsample: str = "scores",
    ) -> float:
        """Mean IoU (or pixel accuracy) on ``(X, y)``; -inertia without ``y``.

        With labels, clusters are matched to classes by the Hungarian
        algorithm on ``(X, y)`` (the unsupervised segmentation protocol).
        Without labels (``y=None``), the score is the opposite of the
        (weighted) inertia of ``X``, as :meth:`sklearn.cluster.KMeans.score`:
        the sum of squared distances of the tokens to their nearest centroid
        (unit tokens and centroids for ``metric="cosine"``), so that a
        label-free grid search picks the tightest clustering (which, as with
        KMeans, favours more clusters).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps.
        y : array-like or torch.Tensor of int, default=None
            Labels (n_samples,) or label maps (N, H, W) of the feature maps'
            aspect ratio, any size; negative labels are ignored. None: score
            -inertia.
        sample_weight : array-like of shape (n_samples,), default=None
            Weight of every token (2-D input) or image (4-D maps); also per
            pixel, of the label maps' shape (N, H, W) with ``y``, or of the
            feature maps' (N, h, w) without.
        metric : {"miou", "accuracy"}, default="miou"
            Score returned with ``y``; both are fractions in [0, 1], greater
            is better.
        n_classes, extra_clusters, upsample
            As in :meth:`score_report` (used with ``y`` only).

        Returns
        -------
        score : float
            See :meth:`score_report`; without ``y``, -inertia (<= 0).
        """
        if metric not in ("miou", "accuracy"):
            raise ValueError(f"metric must be 'miou' or 'accuracy', got {metric!r}.")
        if y is None:
            return -self._inertia(X, sample_weight)
        report = self.score_report(
            X,
            y,
            n_classes=n_classes,
            extra_clusters=extra_clusters,
            upsample=upsample,
            sample_weight=sample_weight,
        )
        return float(report[metric])

    def _inertia(self, X: Any, sample_weight: Any = None) -> float:
        """(Weighted) sum of squared distances of every token of ``X`` to its
        nearest centroid, in float64 from the differences themselves (no
        ``|x|^2 - 2 x.c + |c|^2`` cancellation)."""
        X = self._check_X(X)
        pix = (X.shape[0], X.shape[2], X.shape[3]) if X.ndim == 4 else None
        w = check_weights(sample_weight, X.shape[0], pix)
        device = self._resolved_device()
        centers = self._tensor("cluster_centers_", device)
        cosine = self.metric == "cosine"
        scorer = self._scorer(device)
        per_row = int(np.prod(X.shape[1:])) * 2 + self._n_outputs * (
            int(np.prod(X.shape[2:])) if X.ndim == 4 else 1
        )
        total = 0.0
        with torch.no_grad():
            for sl in iter_slices(X.shape[0], rows_per_batch(per_row)):
                xb = as_tensor(X[sl], device)
                if xb.ndim == 4:
                    xb = maps_to_tokens(xb)
                if cosine:
                    xb = _normalize_rows(xb)
                labels = scorer(xb).argmax(dim=1)
                d = xb.double() - centers[labels].double()
                sq = (d * d).sum(dim=1)
                if w is not None:
                    shape = (sl.stop - sl.start, *X.shape[1:])
                    sq = sq * token_weights(w[sl], shape, device)
                total += float(sq.sum())
        return total
