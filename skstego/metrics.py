"""Segmentation metrics: confusion matrix, Hungarian matching, IoU, scorers.

All functions accept NumPy arrays or torch tensors of any shape (label maps
are flattened) on any device, and count with ``torch.bincount`` on the
device of the input. Labels outside ``[0, n_classes)`` -- the ignore label
``-1`` included -- are left out of every count, as in the STEGO protocol.

Two ways to compare predictions with ground truth:

* ``matching="identity"``: predictions are class ids (a classifier, or a
  clustering already mapped to classes);
* ``matching="hungarian"``: predictions are cluster ids; clusters are mapped
  one-to-one to classes by the Hungarian algorithm maximising matched pixels
  (:func:`hungarian_match`). With more clusters than classes the extra
  clusters stay unmatched and **their pixels count as errors** (the STEGO
  reference code drops them, which inflates scores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ._cluster_metrics import (
    calinski_harabasz_score,
    clustering_stability,
    davies_bouldin_score,
    expected_calibration_error,
    silhouette_samples,
    silhouette_score,
)

__all__ = [
    "accuracy_scorer",
    "calinski_harabasz_score",
    "clustering_stability",
    "confusion_matrix",
    "davies_bouldin_score",
    "expected_calibration_error",
    "hungarian_match",
    "integer_labels",
    "make_segmentation_scorer",
    "mean_iou",
    "miou_scorer",
    "pixel_accuracy",
    "report_from_confusion",
    "segmentation_report",
    "silhouette_samples",
    "silhouette_score",
]


def integer_labels(y: Any, name: str = "y") -> np.ndarray | torch.Tensor:
    """Check that ``y`` holds integer labels; return it as int64, same shape.

    Float arrays of whole, finite numbers are accepted and converted; the input
    is never modified. NumPy stays NumPy, torch stays torch.

    Raises
    ------
    ValueError
        "Unknown label type" (scikit-learn's wording) for anything else.
    """
    if isinstance(y, torch.Tensor):
        if y.is_floating_point() and not bool(
            torch.all(torch.isfinite(y) & (y == torch.round(y)))
        ):
            raise ValueError(
                f"Unknown label type: {name} must hold integer labels (class ids, "
                f"-1 to ignore), got {y.dtype} values that are not whole numbers."
            )
        if y.is_complex():
            raise ValueError(f"Unknown label type: {name} is complex.")
        return y.long()
    arr = np.asarray(y)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr) & (arr == np.round(arr))):
        return arr.astype(np.int64)
    raise ValueError(
        f"Unknown label type: {name} must hold integer labels (class ids, -1 to "
        f"ignore), got dtype {arr.dtype}."
    )


def _as_labels(y: Any, name: str) -> torch.Tensor:
    t = integer_labels(y, name)
    t = t if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t))
    return t.reshape(-1)


def confusion_matrix(
    y_true: Any,
    y_pred: Any,
    *,
    n_classes: int | None = None,
    n_pred: int | None = None,
    ignore_index: int = -1,
) -> np.ndarray:
    """Count (true class, predicted id) pairs over valid pixels.

    Parameters
    ----------
    y_true : array-like or torch.Tensor of int, any shape
        Ground truth. Values outside ``[0, n_classes)`` and ``ignore_index``
        are ignored.
    y_pred : array-like or torch.Tensor of int, same number of elements
        Predicted class or cluster ids. Predictions outside ``[0, n_pred)``
        (e.g. -1 for an unmatched cluster) are counted in no column;
        :func:`segmentation_report` still counts them as misses.
    n_classes : int, optional
        Number of classes; default ``max(y_true) + 1`` over labels other than
        ``ignore_index``.
    n_pred : int, optional
        Number of predicted ids (columns); default
        ``max(n_classes, max(y_pred) + 1)``.
    ignore_index : int, default=-1
        Label to ignore (on top of out-of-range labels).

    Returns
    -------
    ndarray of shape (n_classes, n_pred), int64
        ``C[i, j]`` = number of valid pixels of class ``i`` predicted as ``j``.

    Examples
    --------
    >>> from skstego.metrics import confusion_matrix
    >>> confusion_matrix([0, 0, 1, -1], [1, 1, 0, 0])
    array([[0, 2],
           [1, 0]])
    """
    return _count(y_true, y_pred, n_classes, n_pred, ignore_index)[0]


def _count(
    y_true: Any,
    y_pred: Any,
    n_classes: int | None,
    n_pred: int | None,
    ignore_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix and per-class support (valid pixels of each class).

    The support also counts pixels whose prediction falls outside
    ``[0, n_pred)``, so that they count as misses.
    """
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred").to(t.device)
    if t.numel() != p.numel():
        raise ValueError(
            f"y_true and y_pred have different sizes: {t.numel()} and {p.numel()}."
        )
    if n_classes is None:
        labelled = t[t != ignore_index]
        n_classes = max(int(labelled.max()) + 1 if labelled.numel() else 0, 1)
    if n_pred is None:
        n_pred = max(n_classes, int(p.max()) + 1 if p.numel() else 0)
    valid = (t >= 0) & (t < n_classes) & (t != ignore_index)
    support = torch.bincount(t[valid], minlength=n_classes)
    t, p = t[valid], p[valid]
    predicted = (p >= 0) & (p < n_pred)
    idx = t[predicted] * n_pred + p[predicted]
    counts = torch.bincount(idx, minlength=n_classes * n_pred)
    return counts.reshape(n_classes, n_pred).cpu().numpy(), support.cpu().numpy()


def hungarian_match(confusion: Any) -> np.ndarray:
    """Map predicted ids to classes one-to-one, maximising matched pixels.

    Parameters
    ----------
    confusion : array-like of shape (n_classes, n_clusters)
        Rows are true classes, columns predicted cluster ids, as returned by
        :func:`confusion_matrix`. Rectangular matrices are fine.

    Returns
    -------
    mapping : ndarray of shape (n_clusters,), int64
        ``mapping[j]`` is the class of cluster ``j``, or -1 when ``j`` is left
        unmatched (more clusters than classes).

    Examples
    --------
    >>> from skstego.metrics import hungarian_match
    >>> hungarian_match([[0, 5, 1], [4, 0, 0]])
    array([ 1,  0, -1])
    """
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {conf.shape}.")
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def report_from_confusion(
    confusion: Any, *, matching: str = "identity", support: Any = None
) -> dict[str, Any]:
    """All scores of :func:`segmentation_report` from a confusion matrix.

    Use it when the matrix was accumulated batch by batch (the probes do).

    Parameters
    ----------
    confusion : array-like of shape (n_classes, n_pred)
        Rows true classes, columns predicted ids.
    matching : {"identity", "hungarian"}, default="identity"
        Identity compares column ``j`` with class ``j``; Hungarian first maps
        columns to classes with :func:`hungarian_match`.
    support : array-like of shape (n_classes,), optional
        Valid pixels of each class; default the row sums. Larger values count
        pixels that were predicted as no column (misses).

    Returns
    -------
    dict
        As :func:`segmentation_report`.

    Examples
    --------
    >>> from skstego.metrics import report_from_confusion
    >>> round(report_from_confusion([[3, 1], [0, 4]])["miou"], 3)
    0.775
    """
    if matching not in ("identity", "hungarian"):
        raise ValueError(
            f"matching must be 'identity' or 'hungarian', got {matching!r}."
        )
    conf = np.asarray(confusion, dtype=np.int64)
    if conf.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {conf.shape}.")
    mapping = hungarian_match(conf) if matching == "hungarian" else None
    n_classes = conf.shape[0]
    support = conf.sum(axis=1) if support is None else np.asarray(support, np.int64)
    if support.shape != (n_classes,) or np.any(support < conf.sum(axis=1)):
        raise ValueError(
            "support must hold one count per class, at least the row sums of "
            "the confusion matrix."
        )
    if mapping is None:
        width = max(n_classes, conf.shape[1])
        mapped = np.pad(conf, ((0, 0), (0, width - conf.shape[1])))[:, :n_classes]
    else:
        mapped = np.zeros((n_classes, n_classes), dtype=np.int64)
        matched = mapping >= 0
        np.add.at(mapped.T, mapping[matched], conf[:, matched].T)
    tp = np.diag(mapped).astype(np.float64)
    predicted = mapped.sum(axis=0).astype(np.float64)
    fp = predicted - tp
    fn = support - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
    total = support.sum()
    defined = ~np.isnan(iou)
    return {
        "miou": float(iou[defined].mean()) if defined.any() else float("nan"),
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "support": support,
        "confusion": conf,
        "mapping": mapping,
    }


def segmentation_report(
    y_true: Any,
    y_pred: Any,
    *,
    n_classes: int | None = None,
    n_pred: int | None = None,
    matching: str = "identity",
    ignore_index: int = -1,
) -> dict[str, Any]:
    """All segmentation scores of a prediction in one pass.

    Parameters
    ----------
    y_true, y_pred : array-like or torch.Tensor of int
        Ground truth and predictions (class ids, or cluster ids with
        ``matching="hungarian"``), any shape, same number of elements.
    n_classes : int, optional
        Number of classes; default ``max(y_true) + 1``.
    n_pred : int, optional
        Number of predicted ids (clusters); default inferred.
    matching : {"identity", "hungarian"}, default="identity"
        How predictions map to classes, see the module docstring.
    ignore_index : int, default=-1
        Label to ignore.

    Returns
    -------
    dict
        ``miou`` and ``accuracy`` (fractions in [0, 1]; tables report x100),
        per-class ``iou``, ``precision``, ``recall`` and ``support``
        (NaN where undefined), the raw ``confusion`` (n_classes, n_pred) and the
        cluster ``mapping`` (None for identity matching).
        IoU = tp / (tp + fp + fn); mIoU averages the classes whose IoU is
        defined; accuracy = matched pixels / valid pixels.

    Examples
    --------
    >>> from skstego.metrics import segmentation_report
    >>> y_true, y_pred = [0, 0, 1, 1, 1], [2, 2, 0, 0, 1]
    >>> r = segmentation_report(y_true, y_pred, matching="hungarian")
    >>> r["mapping"].tolist(), round(r["accuracy"], 2)
    ([1, -1, 0], 0.8)
    """
    conf, support = _count(y_true, y_pred, n_classes, n_pred, ignore_index)
    return report_from_confusion(conf, matching=matching, support=support)


def mean_iou(y_true: Any, y_pred: Any, **kwargs: Any) -> float:
    """Mean intersection over union; keyword arguments as :func:`segmentation_report`.

    Examples
    --------
    >>> from skstego.metrics import mean_iou
    >>> round(mean_iou([0, 0, 1, 1], [0, 1, 1, 1]), 4)
    0.5833
    """
    return segmentation_report(y_true, y_pred, **kwargs)["miou"]


def pixel_accuracy(y_true: Any, y_pred: Any, **kwargs: Any) -> float:
    """Fraction of valid pixels predicted right; see :func:`segmentation_report`.

    Examples
    --------
    >>> from skstego.metrics import pixel_accuracy
    >>> pixel_accuracy([0, 0, 1, -1], [0, 1, 1, 0])
    0.6666666666666666
    """
    return segmentation_report(y_true, y_pred, **kwargs)["accuracy"]


def _final_probe(estimator: Any, X: Any) -> tuple[Any, Any]:
    """The last step of (nested) pipelines and ``X`` transformed up to it.

    ``Pipeline.score`` does not forward keyword arguments to the final step
    unless metadata routing is enabled, so scorers walk the pipeline themselves.
    """
    from sklearn.pipeline import Pipeline

    while isinstance(estimator, Pipeline):
        if len(estimator.steps) > 1:
            X = estimator[:-1].transform(X)
        estimator = estimator.steps[-1][1]
    return estimator, X


class _SegmentationScorer:
    """Scorer calling the final probe's ``score(X, y, metric=...)``."""

    def __init__(self, metric: str):
        self.metric = metric

    def __call__(self, estimator: Any, X: Any, y: Any, **kwargs: Any) -> float:
        probe, Xt = _final_probe(estimator, X)
        return float(probe.score(Xt, y, metric=self.metric))

    def __repr__(self) -> str:
        return f"make_segmentation_scorer(metric={self.metric!r})"


def make_segmentation_scorer(metric: str = "miou") -> _SegmentationScorer:
    """A scorer for ``GridSearchCV(scoring=...)`` and ``cross_validate``.

    It transforms ``X`` through the steps of a
    :class:`~sklearn.pipeline.Pipeline` (nested ones too) and calls the final
    probe's ``score(X, y, metric=metric)``, so it works on a probe or on a
    pipeline ending in one.
    Cluster probes (:class:`~skstego.KMeansProbe`) score with the Hungarian
    assignment fitted on the evaluation data (the unsupervised protocol);
    :class:`~skstego.LinearProbe` scores its own class predictions.

    Parameters
    ----------
    metric : {"miou", "accuracy"}
        Mean IoU or pixel accuracy; both greater-is-better.

    Examples
    --------
    >>> from skstego.metrics import make_segmentation_scorer
    >>> make_segmentation_scorer("accuracy")
    make_segmentation_scorer(metric='accuracy')
    """
    if metric not in ("miou", "accuracy"):
        raise ValueError(f"metric must be 'miou' or 'accuracy', got {metric!r}.")
    return _SegmentationScorer(metric)


#: Mean-IoU scorer, see :func:`make_segmentation_scorer`.
miou_scorer = make_segmentation_scorer("miou")
#: Pixel-accuracy scorer, see :func:`make_segmentation_scorer`.
accuracy_scorer = make_segmentation_scorer("accuracy")
