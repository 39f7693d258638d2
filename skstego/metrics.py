"""Segmentation metrics: confusion matrix, Hungarian matching, IoU, scorers.

All functions accept NumPy arrays or torch tensors of any shape (label maps
are flattened; two label maps of different shapes raise a ``ValueError``) on
any device, and count with ``torch.bincount`` on the device of the input.
Negative labels (``-1``) and ``ignore_index`` are left out of every count, as
in the STEGO protocol; a label ``>= n_classes``, or a prediction ``>= n_pred``,
when those are given, raises a ``ValueError`` rather than being dropped.
Scores over no valid pixel at all are NaN, with an
:class:`~sklearn.exceptions.UndefinedMetricWarning`.

Two ways to compare predictions with ground truth:

* ``matching="identity"``: predictions are class ids (a classifier, or a
  clustering already mapped to classes);
* ``matching="hungarian"``: predictions are cluster ids; clusters are mapped
  one-to-one to classes by the Hungarian algorithm maximising matched pixels
  (:func:`hungarian_match`).

With more clusters ``k`` than classes ``n`` (STEGO's ``extra_clusters``),
``extra_clusters`` chooses what happens to the pixels of the clusters left
over:

* ``"errors"`` (default): the Hungarian algorithm matches the ``n`` classes
  to ``n`` of the ``k`` clusters, whichever they are; the pixels of the
  unmatched clusters **count as errors** (misses of their true class).
* ``"reference"``: exactly what the STEGO reference code computes
  (``UnsupervisedMetrics`` in ``src/utils.py`` of
  https://github.com/mhamilton723/STEGO). Pixels predicted as a cluster
  *id* ``>= n`` (or ``< 0``) are dropped before anything else, whatever the
  matching: they count neither as right nor as wrong, and leave the accuracy's
  denominator. The remaining ``(k, n)`` cluster-by-class matrix, whose last
  ``k - n`` rows are zero, is matched by ``linear_sum_assignment``, so in
  effect the clusters of ids ``0 .. n-1`` are matched to the ``n`` classes.
  For ``k > n`` the rows of the clusters left unmatched are summed into one
  "Extra" row (with an empty column): their pixels count as misses and, when
  there are any (only where ties let a zero row be matched instead of a
  cluster of id ``< n``), the Extra bin's IoU of 0 enters the mean IoU.
  Because cluster ids are arbitrary, which clusters are dropped is arbitrary;
  the scores are those of the first ``n`` clusters on the pixels they take.

Both coincide exactly when ``k == n`` and no prediction is negative
(:func:`hungarian_match` breaks ties as the reference does).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import UndefinedMetricWarning

from ._calibration import expected_calibration_error
from ._cluster_metrics import (
    calinski_harabasz_score,
    clustering_stability,
    davies_bouldin_score,
    silhouette_samples,
    silhouette_score,
)
from ._validation import integer_labels
from ._weights import check_weights

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


#: Most cells a confusion matrix may have (int64: 512 MiB). A label id far
#: beyond the number of classes (a raw 16-bit id, 10**9) would otherwise ask
#: for a matrix of that many rows.
MAX_CONFUSION_CELLS = 2**26


def check_confusion_size(
    n_classes: int,
    n_pred: int,
    top_true: int | None = None,
    top_pred: int | None = None,
) -> None:
    """Raise a ValueError when a (n_classes, n_pred) matrix would be too large.

    A huge label id is reported rather than allocated. ``top_true`` and
    ``top_pred`` are the largest ids found (default ``n_classes - 1`` and
    ``n_pred - 1``).
    """
    cells = int(n_classes) * int(n_pred)
    if cells > MAX_CONFUSION_CELLS:
        top_true = int(n_classes) - 1 if top_true is None else int(top_true)
        top_pred = int(n_pred) - 1 if top_pred is None else int(top_pred)
        raise ValueError(
            f"Labels up to {top_true} and predictions up to {top_pred} would "
            f"need a {int(n_classes)} x {int(n_pred)} confusion matrix "
            f"({cells * 8 / 2**30:.3g} GiB), more than {MAX_CONFUSION_CELLS} "
            "cells. Labels must be consecutive class ids 0 .. n_classes - 1 "
            "(-1 to ignore): map raw label ids to them first (e.g. with "
            "skstego.datasets.LabelRemap), and mark ignored pixels -1."
        )


def _check_count(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}.")


def _as_labels(y: Any, name: str) -> torch.Tensor:
    t = integer_labels(y, name)
    if isinstance(t, torch.Tensor):
        return t
    return torch.from_numpy(np.ascontiguousarray(t))


def confusion_matrix(
    y_true: Any,
    y_pred: Any,
    *,
    n_classes: int | None = None,
    n_pred: int | None = None,
    ignore_index: int = -1,
    sample_weight: Any = None,
) -> np.ndarray:
    """Count (true class, predicted id) pairs over valid pixels.

    Parameters
    ----------
    y_true : array-like or torch.Tensor of int, any shape
        Ground truth. Negative labels and ``ignore_index`` are ignored.
    y_pred : array-like or torch.Tensor of int, same number of elements
        Predicted class or cluster ids; label maps must have the shape of
        ``y_true`` up to axes of length 1 (a 1-D array of the same size is
        taken as flattened).
        Negative predictions (e.g. -1 for an unmatched cluster) are counted
        in no column; :func:`segmentation_report` still counts them as misses.
    n_classes : int, optional
        Number of classes (rows); default ``max(y_true) + 1`` over labels other
        than ``ignore_index``. A label ``>= n_classes`` other than
        ``ignore_index`` raises a ``ValueError``.
    n_pred : int, optional
        Number of predicted ids (columns); default
        ``max(n_classes, max(y_pred) + 1)``. A prediction ``>= n_pred`` raises
        a ``ValueError``.
    ignore_index : int, default=-1
        Label to ignore (on top of negative labels).
    sample_weight : array-like of shape of ``y_true``, optional
        Weight of each pixel (non-negative, finite), as
        :func:`sklearn.metrics.confusion_matrix` weights samples.

    Returns
    -------
    ndarray of shape (n_classes, n_pred), int64 (float64 when weighted)
        ``C[i, j]`` = number (or total weight) of valid pixels of class ``i``
        predicted as ``j``.

    Raises
    ------
    ValueError
        When the sizes or label-map shapes differ, or ``n_classes`` /
        ``n_pred`` are too small for the labels given (pixels would be lost).

    Examples
    --------
    >>> from skstego.metrics import confusion_matrix
    >>> confusion_matrix([0, 0, 1, -1], [1, 1, 0, 0])
    array([[0, 2],
           [1, 0]])
    """
    return _count(y_true, y_pred, n_classes, n_pred, ignore_index, sample_weight)[0]


def _pixel_weights(sample_weight: Any, t: torch.Tensor) -> torch.Tensor | None:
    """Per-pixel float64 weights (one per label, or of the labels' shape) as a
    flat tensor beside the flat labels."""
    w = check_weights(sample_weight, t.numel(), pixel_shape=tuple(t.shape))
    return None if w is None else torch.from_numpy(w).to(t.device).reshape(-1)


def _count(
    y_true: Any,
    y_pred: Any,
    n_classes: int | None,
    n_pred: int | None,
    ignore_index: int,
    sample_weight: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix and per-class support (valid pixels of each class).

    The support also counts pixels whose prediction is negative, so that they
    count as misses.
    """
    _check_count(n_classes, "n_classes")
    _check_count(n_pred, "n_pred")
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred").to(t.device)
    if t.numel() != p.numel():
        raise ValueError(
            f"y_true and y_pred have different sizes: {t.numel()} and {p.numel()}."
        )
    squeezed = [tuple(d for d in a.shape if d != 1) for a in (t, p)]
    if t.ndim > 1 and p.ndim > 1 and squeezed[0] != squeezed[1]:
        raise ValueError(
            f"y_true of shape {tuple(t.shape)} and y_pred of shape "
            f"{tuple(p.shape)} are label maps of different shapes (transposed?); "
            "predict at the labels' size (predict(X, size=...)) or flatten both."
        )
    w = _pixel_weights(sample_weight, t)
    t, p = t.reshape(-1), p.reshape(-1)
    labelled = t[(t >= 0) & (t != ignore_index)]
    top = int(labelled.max()) if labelled.numel() else -1
    if n_classes is None:
        n_classes = max(top + 1, 1)
    elif top >= n_classes:
        raise ValueError(
            f"y_true holds class ids up to {top}, but n_classes={n_classes}: "
            f"pass n_classes >= {top + 1}, or map labels to ignore to -1 (or "
            "ignore_index)."
        )
    top_pred = int(p.max()) if p.numel() else -1
    if n_pred is None:
        n_pred = max(n_classes, top_pred + 1)
    elif top_pred >= n_pred:
        raise ValueError(
            f"y_pred holds ids up to {top_pred}, but n_pred={n_pred}: pass "
            f"n_pred >= {top_pred + 1}."
        )
    check_confusion_size(n_classes, n_pred, top, top_pred)
    valid = (t >= 0) & (t != ignore_index)
    wv = None if w is None else w[valid]
    support = torch.bincount(t[valid], weights=wv, minlength=n_classes)
    t, p = t[valid], p[valid]
    predicted = p >= 0
    idx = t[predicted] * n_pred + p[predicted]
    weights = None if wv is None else wv[predicted]
    counts = torch.bincount(idx, weights=weights, minlength=n_classes * n_pred)
    return counts.reshape(n_classes, n_pred).cpu().numpy(), support.cpu().numpy()


def _checked_confusion(confusion: Any, dtype: Any) -> np.ndarray:
    """A confusion matrix as a 2-D array of finite, non-negative counts."""
    conf = np.asarray(confusion)
    if conf.ndim != 2:
        raise ValueError(
            f"confusion must be a 2-D matrix (n_classes, n_pred), as returned "
            f"by confusion_matrix, got shape {conf.shape}."
        )
    if conf.dtype.kind not in "iubf":
        raise ValueError(
            f"confusion must hold counts (numbers), got dtype {conf.dtype}."
        )
    if conf.size and not np.all(np.isfinite(conf)):
        raise ValueError(
            "confusion holds NaN or infinity; it must hold pixel counts, as "
            "returned by confusion_matrix."
        )
    if conf.size and conf.min() < 0:
        raise ValueError(
            "confusion holds negative counts; it must hold pixel counts, as "
            "returned by confusion_matrix."
        )
    return conf.astype(dtype, copy=False)


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
        unmatched (more clusters than classes). Among equally good
        assignments, the one ``scipy.optimize.linear_sum_assignment`` returns
        for the problem the STEGO reference solves (clusters as rows for a
        square matrix, classes as rows for more clusters than classes).

    Examples
    --------
    >>> from skstego.metrics import hungarian_match
    >>> hungarian_match([[0, 5, 1], [4, 0, 0]])
    array([ 1,  0, -1])
    """
    conf = _checked_confusion(confusion, np.float64)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    if conf.shape[0] == conf.shape[1]:
        # clusters as rows, as the STEGO reference solves the square problem:
        # among equally good assignments (an absent class ties them all) the
        # same one is picked
        cols, rows = linear_sum_assignment(conf.T, maximize=True)
    else:
        rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping[cols] = rows
    return mapping


_EXTRA_CLUSTERS = ("errors", "reference")


def _check_extra_clusters(extra_clusters: str) -> None:
    if extra_clusters not in _EXTRA_CLUSTERS:
        raise ValueError(
            f"extra_clusters must be 'errors' or 'reference', got {extra_clusters!r}."
        )


def _reference_histogram(
    conf: np.ndarray, hungarian: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The STEGO reference's cluster-by-class histogram of a confusion matrix.

    ``conf`` is (n_classes, k), rows true classes. Returns the histogram
    (rows predicted bins, columns classes: (n, n), or (n + 1, n + 1) with the
    "Extra" bin when ``k > n`` and Hungarian) and the mapping cluster -> class.
    """
    n, k = conf.shape
    width = max(k, n)
    # ``stats`` of the reference: (n + extra, n), predictions >= n dropped
    stats = np.zeros((width, n), dtype=conf.dtype)
    stats[: min(k, n)] = conf[:, : min(k, n)].T
    mapping = None
    if not hungarian:
        return stats[:n], mapping
    clusters, classes = linear_sum_assignment(stats, maximize=True)
    if width == n:
        hist = stats[np.argsort(classes)]
        mapping = np.full(k, -1, dtype=np.int64)
        mapping[clusters[clusters < k]] = classes[clusters < k]
        return hist, mapping
    # the reference matches the transposed problem for the histogram's rows
    # and the direct one for the unmatched ("missing") clusters
    _, cluster_of_class = linear_sum_assignment(stats.T, maximize=True)
    missing = sorted(set(range(width)) - set(clusters.tolist()))
    hist = np.zeros((n + 1, n + 1), dtype=conf.dtype)
    hist[:n, :n] = stats[cluster_of_class]
    hist[n, :n] = stats[missing].sum(axis=0)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[cluster_of_class] = np.arange(n)
    return hist, mapping


def _reference_report(conf: np.ndarray, hungarian: bool) -> dict[str, Any]:
    """:func:`report_from_confusion` with ``extra_clusters="reference"``."""
    n = conf.shape[0]
    hist, mapping = _reference_histogram(conf, hungarian)
    hist = hist.astype(np.float64)
    tp = np.diag(hist)
    predicted = hist.sum(axis=1)  # rows: predicted bins
    support = hist.sum(axis=0)  # columns: classes
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (support + predicted - tp)
        precision = np.where(predicted > 0, tp / predicted, np.nan)[:n]
        recall = np.where(support > 0, tp / support, np.nan)[:n]
    total = hist.sum()
    defined = ~np.isnan(iou)
    return {
        "miou": float(iou[defined].mean()) if defined.any() else float("nan"),
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "iou": iou[:n],
        "precision": precision,
        "recall": recall,
        "support": support[:n].astype(conf.dtype),
        "confusion": conf,
        "mapping": mapping,
    }


def _warn_if_empty(report: dict[str, Any]) -> dict[str, Any]:
    if not np.sum(report["support"]):
        warnings.warn(
            "No valid pixel to score: every label is ignored (negative or "
            "ignore_index) or the input is empty; mIoU and accuracy are NaN.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
    return report


def report_from_confusion(
    confusion: Any,
    *,
    matching: str = "identity",
    support: Any = None,
    extra_clusters: str = "errors",
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
        pixels that were predicted as no column (misses). Not used with
        ``extra_clusters="reference"``, which drops such pixels.
    extra_clusters : {"errors", "reference"}, default="errors"
        What the pixels of columns ``>= n_classes`` (extra clusters) become:
        errors, or dropped as the STEGO reference code does (see the module
        docstring for exactly what that computes).

    Returns
    -------
    dict
        As :func:`segmentation_report`.

    Warns
    -----
    UndefinedMetricWarning
        When no pixel is valid: ``miou`` and ``accuracy`` are then NaN.

    Examples
    --------
    >>> from skstego.metrics import report_from_confusion
    >>> round(report_from_confusion([[3, 1], [0, 4]])["miou"], 3)
    0.775

    Three clusters for two classes; cluster 2 is the extra one:

    >>> conf = [[5, 0, 2], [0, 4, 1]]
    >>> report_from_confusion(conf, matching="hungarian")["accuracy"]
    0.75
    >>> report_from_confusion(
    ...     conf, matching="hungarian", extra_clusters="reference"
    ... )["accuracy"]
    1.0
    """
    if matching not in ("identity", "hungarian"):
        raise ValueError(
            f"matching must be 'identity' or 'hungarian', got {matching!r}."
        )
    _check_extra_clusters(extra_clusters)
    # pixel counts stay integers; weighted counts (sample_weight) stay float64
    weighted = np.asarray(confusion).dtype.kind == "f"
    dtype = np.float64 if weighted else np.int64
    conf = _checked_confusion(confusion, dtype)
    if extra_clusters == "reference":
        return _warn_if_empty(_reference_report(conf, matching == "hungarian"))
    mapping = hungarian_match(conf) if matching == "hungarian" else None
    n_classes = conf.shape[0]
    support = conf.sum(axis=1) if support is None else np.asarray(support, dtype)
    slack = 1e-9 * np.maximum(support, 1) if weighted else 0  # float rounding
    if support.shape != (n_classes,) or np.any(support + slack < conf.sum(axis=1)):
        raise ValueError(
            "support must hold one count per class, at least the row sums of "
            "the confusion matrix."
        )
    if mapping is None:
        width = max(n_classes, conf.shape[1])
        mapped = np.pad(conf, ((0, 0), (0, width - conf.shape[1])))[:, :n_classes]
    else:
        mapped = np.zeros((n_classes, n_classes), dtype=dtype)
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
    return _warn_if_empty(
        {
            "miou": float(iou[defined].mean()) if defined.any() else float("nan"),
            "accuracy": float(tp.sum() / total) if total else float("nan"),
            "iou": iou,
            "precision": precision,
            "recall": recall,
            "support": support,
            "confusion": conf,
            "mapping": mapping,
        }
    )


def segmentation_report(
    y_true: Any,
    y_pred: Any,
    *,
    n_classes: int | None = None,
    n_pred: int | None = None,
    matching: str = "identity",
    ignore_index: int = -1,
    extra_clusters: str = "errors",
    sample_weight: Any = None,
) -> dict[str, Any]:
    """All segmentation scores of a prediction in one pass.

    Parameters
    ----------
    y_true, y_pred : array-like or torch.Tensor of int
        Ground truth and predictions (class ids, or cluster ids with
        ``matching="hungarian"``), same number of elements; label maps of
        the same shape (or either one flattened).
    n_classes : int, optional
        Number of classes; default ``max(y_true) + 1``. Pass it (27 for
        COCO-Stuff) so that a class absent from ``y_true`` still counts, as
        in the reference protocol.
    n_pred : int, optional
        Number of predicted ids (clusters); default inferred.
    matching : {"identity", "hungarian"}, default="identity"
        How predictions map to classes, see the module docstring.
    ignore_index : int, default=-1
        Label to ignore.
    extra_clusters : {"errors", "reference"}, default="errors"
        Pixels of clusters beyond the ``n_classes`` matched ones count as
        errors, or are treated as the STEGO reference code does (see the
        module docstring).
    sample_weight : array-like of the shape of ``y_true``, optional
        Weight of each pixel: every count becomes a sum of weights.

    Returns
    -------
    dict
        ``miou`` and ``accuracy`` (fractions in [0, 1]; tables report x100),
        per-class ``iou``, ``precision``, ``recall`` and ``support``
        (NaN where undefined), the raw ``confusion`` (n_classes, n_pred) and the
        cluster ``mapping`` (None for identity matching).
        IoU = tp / (tp + fp + fn); mIoU averages the classes whose IoU is
        defined; accuracy = matched pixels / valid pixels.

    Warns
    -----
    UndefinedMetricWarning
        When no pixel is valid (empty input, or every label ignored): ``miou``
        and ``accuracy`` are then NaN.

    Examples
    --------
    >>> from skstego.metrics import segmentation_report
    >>> y_true, y_pred = [0, 0, 1, 1, 1], [2, 2, 0, 0, 1]
    >>> r = segmentation_report(y_true, y_pred, matching="hungarian")
    >>> r["mapping"].tolist(), round(r["accuracy"], 2)
    ([1, -1, 0], 0.8)
    """
    _check_extra_clusters(extra_clusters)
    conf, support = _count(
        y_true, y_pred, n_classes, n_pred, ignore_index, sample_weight
    )
    return report_from_confusion(
        conf, matching=matching, support=support, extra_clusters=extra_clusters
    )


def mean_iou(y_true: Any, y_pred: Any, **kwargs: Any) -> float:
    """Mean intersection over union; keyword arguments as :func:`segmentation_report`.

    Parameters
    ----------
    y_true, y_pred : array-like or torch.Tensor of int
        Ground truth and predictions (class ids, or cluster ids with
        ``matching="hungarian"``), same number of elements; pixels labelled
        ``ignore_index`` (-1) in ``y_true`` are left out.
    **kwargs
        ``n_classes``, ``n_pred``, ``matching``, ``ignore_index``,
        ``extra_clusters`` and ``sample_weight``, as in
        :func:`segmentation_report`.

    Returns
    -------
    float
        Mean over classes of IoU = tp / (tp + fp + fn), in [0, 1]; classes
        whose IoU is undefined are left out; NaN, with a warning, when no
        pixel is valid.

    Examples
    --------
    >>> from skstego.metrics import mean_iou
    >>> round(mean_iou([0, 0, 1, 1], [0, 1, 1, 1]), 4)
    0.5833
    """
    return segmentation_report(y_true, y_pred, **kwargs)["miou"]


def pixel_accuracy(y_true: Any, y_pred: Any, **kwargs: Any) -> float:
    """Fraction of valid pixels predicted right; see :func:`segmentation_report`.

    Parameters
    ----------
    y_true, y_pred : array-like or torch.Tensor of int
        Ground truth and predictions (class ids, or cluster ids with
        ``matching="hungarian"``), same number of elements; pixels labelled
        ``ignore_index`` (-1) in ``y_true`` are left out.
    **kwargs
        ``n_classes``, ``n_pred``, ``matching``, ``ignore_index``,
        ``extra_clusters`` and ``sample_weight``, as in
        :func:`segmentation_report`.

    Returns
    -------
    float
        Correctly predicted (matched) pixels over valid pixels, in [0, 1];
        NaN, with a warning, when no pixel is valid.

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
    """Scorer calling the final probe's ``score(X, y, metric=..., **params)``."""

    def __init__(self, metric: str, score_params: dict[str, Any] | None = None):
        self.metric = metric
        self.score_params = dict(score_params or {})

    def __call__(self, estimator: Any, X: Any, y: Any, **kwargs: Any) -> float:
        probe, Xt = _final_probe(estimator, X)
        return float(probe.score(Xt, y, metric=self.metric, **self.score_params))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.score_params.items())
        return f"make_segmentation_scorer(metric={self.metric!r}{extra})"


def make_segmentation_scorer(
    metric: str = "miou", **score_params: Any
) -> _SegmentationScorer:
    """A scorer for ``GridSearchCV(scoring=...)`` and ``cross_validate``.

    It transforms ``X`` through the steps of a
    :class:`~sklearn.pipeline.Pipeline` (nested ones too) and calls the final
    probe's ``score(X, y, metric=metric, **score_params)``, so it works on a
    probe or on a pipeline ending in one.
    Cluster probes (:class:`~skstego.KMeansProbe`) score with the Hungarian
    assignment fitted on the evaluation data (the unsupervised protocol);
    :class:`~skstego.LinearProbe` scores its own class predictions.

    Parameters
    ----------
    metric : {"miou", "accuracy"}
        Mean IoU or pixel accuracy; both greater-is-better.
    **score_params
        Passed on to the probe's ``score``: e.g. ``upsample="codes"``, or for
        cluster probes ``n_classes=27`` and ``extra_clusters="reference"``.

    Examples
    --------
    >>> from skstego.metrics import make_segmentation_scorer
    >>> make_segmentation_scorer("accuracy")
    make_segmentation_scorer(metric='accuracy')
    >>> make_segmentation_scorer(n_classes=27, extra_clusters="reference")
    make_segmentation_scorer(metric='miou', n_classes=27, extra_clusters='reference')
    """
    if metric not in ("miou", "accuracy"):
        raise ValueError(f"metric must be 'miou' or 'accuracy', got {metric!r}.")
    return _SegmentationScorer(metric, score_params)


#: Mean-IoU scorer, see :func:`make_segmentation_scorer`.
miou_scorer = make_segmentation_scorer("miou")
#: Pixel-accuracy scorer, see :func:`make_segmentation_scorer`.
accuracy_scorer = make_segmentation_scorer("accuracy")
