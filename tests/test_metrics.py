"""Tests of skstego.metrics: hand-worked cases and an independent reference."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.base import BaseEstimator
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.model_selection import cross_val_score

from skstego.metrics import (
    accuracy_scorer,
    confusion_matrix,
    hungarian_match,
    make_segmentation_scorer,
    mean_iou,
    miou_scorer,
    pixel_accuracy,
    report_from_confusion,
    segmentation_report,
)

# --------------------------------------------------------------------------
# Hand-worked example 1 (identity matching), the last pixel ignored:
#
#   y_true 0 0 0 1 1 2 2 2 2 -1
#   y_pred 0 0 1 1 1 2 2 2 1  2
#
#   confusion     pred 0  1  2     support
#   true 0             2  1  0     3
#   true 1             0  2  0     2
#   true 2             0  1  3     4
#   predicted          2  4  3
#
#   IoU_0 = 2 / (2 + 3 - 2) = 2/3,  IoU_1 = 2 / (4 + 2 - 2) = 1/2,
#   IoU_2 = 3 / (3 + 4 - 3) = 3/4,  mIoU = (2/3 + 1/2 + 3/4) / 3 = 23/36,
#   accuracy = (2 + 2 + 3) / 9 = 7/9,
#   precision = (1, 1/2, 1),  recall = (2/3, 1, 3/4).
# --------------------------------------------------------------------------
Y_TRUE_1 = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
Y_PRED_1 = np.array([0, 0, 1, 1, 1, 2, 2, 2, 1, 2])
CONF_1 = np.array([[2, 1, 0], [0, 2, 0], [0, 1, 3]])


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(Y_TRUE_1, Y_PRED_1)
    np.testing.assert_array_equal(conf, CONF_1)
    assert conf.dtype == np.int64


def test_report_by_hand():
    r = segmentation_report(Y_TRUE_1, Y_PRED_1)
    np.testing.assert_allclose(r["iou"], [2 / 3, 1 / 2, 3 / 4])
    assert r["miou"] == pytest.approx(23 / 36)
    assert r["accuracy"] == pytest.approx(7 / 9)
    np.testing.assert_allclose(r["precision"], [1, 1 / 2, 1])
    np.testing.assert_allclose(r["recall"], [2 / 3, 1, 3 / 4])
    np.testing.assert_array_equal(r["support"], [3, 2, 4])
    np.testing.assert_array_equal(r["confusion"], CONF_1)
    assert r["mapping"] is None


def test_shortcuts_match_report():
    assert mean_iou(Y_TRUE_1, Y_PRED_1) == pytest.approx(23 / 36)
    assert pixel_accuracy(Y_TRUE_1, Y_PRED_1) == pytest.approx(7 / 9)


def test_report_from_confusion_equals_report():
    a = report_from_confusion(CONF_1)
    b = segmentation_report(Y_TRUE_1, Y_PRED_1)
    assert a["miou"] == b["miou"] and a["accuracy"] == b["accuracy"]
    np.testing.assert_array_equal(a["iou"], b["iou"])


def test_label_maps_of_any_shape_are_flattened():
    t, p = Y_TRUE_1[:9].reshape(3, 3), Y_PRED_1[:9].reshape(1, 3, 3)
    np.testing.assert_array_equal(confusion_matrix(t, p), CONF_1)


# --------------------------------------------------------------------------
# Hand-worked example 2 (Hungarian, more clusters than classes):
#
#   y_true    0 0 0 0 1 1 1 1
#   clusters  2 2 2 0 1 1 1 0
#
#   confusion   cluster 0  1  2
#   class 0             1  0  3
#   class 1             1  3  0
#
#   Hungarian: cluster 2 -> class 0, cluster 1 -> class 1, cluster 0
#   unmatched; its 2 pixels count as errors:
#   IoU_0 = 3 / (3 + 0 + 1) = 3/4 = IoU_1, accuracy = 6/8.
#   (Dropping the unmatched cluster, as the STEGO reference does, gives 1.)
# --------------------------------------------------------------------------
def test_hungarian_rectangular_unmatched_cluster_counts_as_error():
    y_true = [0, 0, 0, 0, 1, 1, 1, 1]
    y_pred = [2, 2, 2, 0, 1, 1, 1, 0]
    r = segmentation_report(y_true, y_pred, matching="hungarian")
    np.testing.assert_array_equal(r["confusion"], [[1, 0, 3], [1, 3, 0]])
    np.testing.assert_array_equal(r["mapping"], [-1, 1, 0])
    np.testing.assert_allclose(r["iou"], [0.75, 0.75])
    assert r["miou"] == pytest.approx(0.75)
    assert r["accuracy"] == pytest.approx(0.75)
    np.testing.assert_allclose(r["precision"], [1.0, 1.0])
    np.testing.assert_allclose(r["recall"], [0.75, 0.75])


def test_hungarian_fewer_clusters_than_classes():
    # 2 clusters, 3 classes: cluster 0 -> class 0 (1 px right), cluster 1 ->
    # class 2; class 1 is never matched, its IoU is 0
    y_true, y_pred = [0, 1, 2, 2], [0, 0, 1, 1]
    r = segmentation_report(y_true, y_pred, n_pred=2, matching="hungarian")
    assert r["confusion"].shape == (3, 2)
    np.testing.assert_array_equal(r["mapping"], [0, 2])
    np.testing.assert_allclose(r["iou"], [0.5, 0.0, 1.0])
    assert r["miou"] == pytest.approx(0.5)
    assert r["accuracy"] == pytest.approx(0.75)
    # by default n_pred >= n_classes: an empty third column, same scores
    d = segmentation_report(y_true, y_pred, matching="hungarian")
    assert d["confusion"].shape == (3, 3)
    np.testing.assert_allclose(d["iou"], r["iou"])


def test_hungarian_permutation_is_undone():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, size=500)
    perm = rng.permutation(6)
    r = segmentation_report(y, perm[y], matching="hungarian")
    assert r["miou"] == 1.0 and r["accuracy"] == 1.0
    np.testing.assert_array_equal(r["mapping"][perm], np.arange(6))


def test_hungarian_match_by_hand():
    np.testing.assert_array_equal(hungarian_match([[0, 5, 1], [4, 0, 0]]), [1, 0, -1])
    # square: the anti-diagonal wins (2 + 3 > 1 + 1)
    np.testing.assert_array_equal(hungarian_match([[1, 2], [3, 1]]), [1, 0])
    # more classes than clusters: every cluster matched, one class left out
    np.testing.assert_array_equal(hungarian_match([[1, 2], [3, 4], [5, 6]]), [2, 1])


def test_hungarian_match_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        hungarian_match([1, 2, 3])


# --------------------------------------------------------------------------
# ignore label, out-of-range labels, undefined IoU
# --------------------------------------------------------------------------
def test_ignore_label_is_dropped_and_out_of_range_labels_raise():
    y_true = [0, 1, -1, -5, 1, 1]
    y_pred = [0, 1, 1, 0, 0, 1]
    conf = confusion_matrix(y_true, y_pred, n_classes=2)
    np.testing.assert_array_equal(conf, [[1, 0], [1, 2]])
    r = segmentation_report(y_true, y_pred, n_classes=2)
    assert r["accuracy"] == pytest.approx(3 / 4)
    np.testing.assert_array_equal(r["support"], [1, 3])
    # a label >= n_classes would be lost silently: it raises
    with pytest.raises(ValueError, match="up to 7, but n_classes=2"):
        confusion_matrix([0, 1, 7], [0, 1, 1], n_classes=2)
    with pytest.raises(ValueError, match="n_classes=2"):
        segmentation_report([0, 1, 5], [0, 1, 1], n_classes=2)
    # so does a prediction >= n_pred
    with pytest.raises(ValueError, match="up to 3, but n_pred=2"):
        confusion_matrix([0, 1, 1], [0, 3, 1], n_pred=2)
    with pytest.raises(ValueError, match="n_pred=2"):
        segmentation_report([0, 1, 1], [0, 2, 1], n_pred=2, matching="hungarian")


def test_label_maps_of_different_shapes_raise():
    y = np.arange(24).reshape(2, 3, 4) % 3
    with pytest.raises(ValueError, match="different shapes"):
        confusion_matrix(y, y.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="different shapes"):
        segmentation_report(y, y.reshape(2, 4, 3))
    # flattened predictions, or an extra axis of length 1, are fine
    np.testing.assert_array_equal(
        confusion_matrix(y, y.ravel()), confusion_matrix(y, y[:, None])
    )


def test_custom_ignore_index():
    y_true = [0, 1, 255, 255, 1]
    y_pred = [0, 1, 0, 0, 0]
    r = segmentation_report(y_true, y_pred, n_classes=2, ignore_index=255)
    np.testing.assert_array_equal(r["confusion"], [[1, 0], [1, 1]])
    # an in-range ignore_index is ignored too
    conf = confusion_matrix([0, 1, 1], [0, 1, 0], n_classes=2, ignore_index=1)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 0]])


def test_undefined_iou_is_excluded_from_the_mean():
    # class 2 neither present nor predicted: IoU undefined (NaN), left out
    r = segmentation_report([0, 0, 1, 1], [0, 1, 1, 1], n_classes=3)
    assert np.isnan(r["iou"][2]) and np.isnan(r["precision"][2])
    assert np.isnan(r["recall"][2])
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_absent_but_predicted_class_has_zero_iou():
    # class 2 absent from the truth but predicted once: IoU 0, counted
    r = segmentation_report([0, 0, 1, 1], [0, 2, 1, 1], n_classes=3)
    np.testing.assert_allclose(r["iou"], [0.5, 1.0, 0.0])
    assert r["miou"] == pytest.approx(0.5)
    assert np.isnan(r["recall"][2]) and r["precision"][2] == 0.0


@pytest.mark.parametrize("extra_clusters", ["errors", "reference"])
@pytest.mark.parametrize("matching", ["identity", "hungarian"])
@pytest.mark.parametrize("y_true", [[-1, -1], []], ids=["ignored", "empty"])
def test_all_pixels_ignored_gives_nan_with_a_warning(y_true, matching, extra_clusters):
    y_pred = list(range(len(y_true)))
    with pytest.warns(UndefinedMetricWarning, match="No valid pixel"):
        r = segmentation_report(
            y_true, y_pred, matching=matching, extra_clusters=extra_clusters
        )
    assert np.isnan(r["miou"]) and np.isnan(r["accuracy"])
    with pytest.warns(UndefinedMetricWarning):
        report_from_confusion(np.zeros((3, 3)))


def test_identity_predictions_beyond_n_classes_count_as_misses():
    # prediction 2 is no class: the pixel is a miss of class 1
    r = segmentation_report([0, 1, 1], [0, 1, 2], n_classes=2)
    np.testing.assert_array_equal(r["confusion"], [[1, 0, 0], [0, 1, 1]])
    assert r["accuracy"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(r["iou"], [1.0, 0.5])


def test_explicit_sizes():
    conf = confusion_matrix([0, 1], [0, 1], n_classes=3, n_pred=4)
    assert conf.shape == (3, 4)
    assert conf.sum() == 2


# --------------------------------------------------------------------------
# against an independent computation
# --------------------------------------------------------------------------
def _reference_report(y_true, y_pred, n_classes, n_clusters, hungarian):
    """sklearn confusion + scipy Hungarian + numpy IoU, written independently."""
    y_true, y_pred = np.ravel(y_true), np.ravel(y_pred)
    valid = (y_true >= 0) & (y_true < n_classes)
    conf = sk_confusion_matrix(
        y_true[valid], y_pred[valid], labels=np.arange(max(n_classes, n_clusters))
    )[:n_classes, :n_clusters]
    if hungarian:
        rows, cols = linear_sum_assignment(conf, maximize=True)
        cluster_of_class = dict(zip(rows, cols, strict=True))
    else:
        cluster_of_class = {c: c for c in range(n_classes)}
    iou = np.full(n_classes, np.nan)
    tp_total = 0
    for c in range(n_classes):
        j = cluster_of_class.get(c)
        tp = conf[c, j] if j is not None else 0
        predicted = conf[:, j].sum() if j is not None else 0
        union = predicted + conf[c].sum() - tp
        if union > 0:
            iou[c] = tp / union
        tp_total += tp
    return {
        "confusion": conf,
        "iou": iou,
        "miou": np.nanmean(iou),
        "accuracy": tp_total / valid.sum(),
    }


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_clusters", [5, 8])
def test_hungarian_against_reference(seed, n_clusters):
    rng = np.random.default_rng(seed)
    n_classes = 5
    y_true = rng.integers(-1, n_classes, size=(4, 17, 13))
    # correlated predictions, so the matching is not trivial
    y_pred = np.where(
        rng.random(y_true.shape) < 0.6,
        (y_true * 3 + 1) % n_clusters,
        rng.integers(0, n_clusters, size=y_true.shape),
    )
    ref = _reference_report(y_true, y_pred, n_classes, n_clusters, hungarian=True)
    r = segmentation_report(
        y_true, y_pred, n_classes=n_classes, n_pred=n_clusters, matching="hungarian"
    )
    np.testing.assert_array_equal(r["confusion"], ref["confusion"])
    np.testing.assert_allclose(r["iou"], ref["iou"])
    assert r["miou"] == pytest.approx(ref["miou"])
    assert r["accuracy"] == pytest.approx(ref["accuracy"])


@pytest.mark.parametrize("seed", range(3))
def test_identity_against_reference(seed):
    rng = np.random.default_rng(seed)
    n_classes = 6
    y_true = rng.integers(-1, n_classes, size=1000)
    y_pred = np.where(rng.random(1000) < 0.7, y_true, rng.integers(0, 6, 1000))
    y_pred = np.clip(y_pred, 0, None)
    ref = _reference_report(y_true, y_pred, n_classes, n_classes, hungarian=False)
    r = segmentation_report(y_true, y_pred, n_classes=n_classes)
    np.testing.assert_array_equal(r["confusion"], ref["confusion"])
    np.testing.assert_allclose(r["iou"], ref["iou"])
    assert r["miou"] == pytest.approx(ref["miou"])
    assert r["accuracy"] == pytest.approx(ref["accuracy"])


# --------------------------------------------------------------------------
# torch input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("matching", ["identity", "hungarian"])
def test_torch_input_gives_the_same_numbers(matching):
    rng = np.random.default_rng(0)
    y_true = rng.integers(-1, 4, size=(3, 8, 8))
    y_pred = rng.integers(0, 6, size=(3, 8, 8))
    a = segmentation_report(y_true, y_pred, matching=matching)
    b = segmentation_report(
        torch.from_numpy(y_true), torch.from_numpy(y_pred), matching=matching
    )
    c = segmentation_report(  # mixed, and torch of another integer dtype
        torch.from_numpy(y_true).int(), y_pred, matching=matching
    )
    for other in (b, c):
        np.testing.assert_array_equal(a["confusion"], other["confusion"])
        np.testing.assert_array_equal(a["iou"], other["iou"])
        assert a["miou"] == other["miou"] and a["accuracy"] == other["accuracy"]
    assert isinstance(b["confusion"], np.ndarray)


def test_integral_float_labels_are_accepted():
    expected = confusion_matrix(Y_TRUE_1, Y_PRED_1)
    np.testing.assert_array_equal(
        confusion_matrix(Y_TRUE_1.astype(np.float32), Y_PRED_1.astype(np.float64)),
        expected,
    )
    np.testing.assert_array_equal(
        confusion_matrix(
            torch.tensor(Y_TRUE_1, dtype=torch.float32), torch.tensor(Y_PRED_1)
        ),
        expected,
    )


@pytest.mark.gpu
def test_cuda_input_gives_the_same_numbers():
    a = segmentation_report(Y_TRUE_1, Y_PRED_1, matching="hungarian")
    b = segmentation_report(
        torch.tensor(Y_TRUE_1, device="cuda"),
        torch.tensor(Y_PRED_1, device="cuda"),
        matching="hungarian",
    )
    np.testing.assert_array_equal(a["confusion"], b["confusion"])
    assert a["miou"] == b["miou"]


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------
def test_size_mismatch_raises():
    with pytest.raises(ValueError, match="different sizes"):
        confusion_matrix([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="different sizes"):
        segmentation_report(torch.zeros(4, dtype=torch.long), torch.zeros(5))


@pytest.mark.parametrize(
    "bad",
    [
        np.array([0.0, 0.5, 1.0]),
        np.array([0.0, np.nan, 1.0]),
        np.array([0.0, np.inf, 1.0]),
        np.array(["a", "b", "c"]),
        torch.tensor([0.0, 0.5, 1.0]),
        torch.tensor([0.0, float("nan"), 1.0]),
    ],
    ids=["np-frac", "np-nan", "np-inf", "str", "torch-frac", "torch-nan"],
)
@pytest.mark.parametrize("which", ["y_true", "y_pred"])
def test_non_integer_labels_raise(bad, which):
    good = np.array([0, 1, 1])
    args = (bad, good) if which == "y_true" else (good, bad)
    with pytest.raises(ValueError, match=f"{which} must hold integer labels"):
        confusion_matrix(*args)


def test_bad_matching_raises():
    with pytest.raises(ValueError, match="matching"):
        segmentation_report([0, 1], [0, 1], matching="greedy")
    with pytest.raises(ValueError, match="matching"):
        report_from_confusion(np.eye(2), matching="max")


def test_report_from_confusion_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        report_from_confusion([1, 2])


# --------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------
class _FakeEstimator(BaseEstimator):
    """Records score calls; returns a number per metric."""

    def __init__(self, miou=0.25, accuracy=0.75):
        self.miou = miou
        self.accuracy = accuracy

    def fit(self, X, y=None):
        self.fitted_ = True
        return self

    def score(self, X, y, metric="miou"):
        self.calls_ = [*getattr(self, "calls_", []), (len(X), len(y), metric)]
        return {"miou": self.miou, "accuracy": self.accuracy}[metric]


def test_scorer_calls_score_with_metric():
    est = _FakeEstimator()
    X, y = np.zeros((3, 2)), np.zeros(3)
    assert make_segmentation_scorer("miou")(est, X, y) == 0.25
    assert make_segmentation_scorer("accuracy")(est, X, y) == 0.75
    assert est.calls_ == [(3, 3, "miou"), (3, 3, "accuracy")]
    assert isinstance(make_segmentation_scorer()(est, X, y), float)


def test_module_scorers():
    est = _FakeEstimator(miou=0.1, accuracy=0.9)
    X, y = np.zeros((2, 1)), np.zeros(2)
    assert miou_scorer(est, X, y) == 0.1
    assert accuracy_scorer(est, X, y) == 0.9
    assert repr(miou_scorer) == "make_segmentation_scorer(metric='miou')"


def test_scorer_works_in_cross_validation():
    X, y = np.zeros((6, 2)), np.zeros(6)
    scores = cross_val_score(_FakeEstimator(miou=0.4), X, y, cv=3, scoring=miou_scorer)
    np.testing.assert_allclose(scores, 0.4)


@pytest.mark.parametrize("metric", ["f1", "MIOU", "iou", None])
def test_scorer_rejects_unknown_metric(metric):
    with pytest.raises(ValueError, match="metric"):
        make_segmentation_scorer(metric)


# --------------------------------------------------------------------------
# regressions: out-of-range predictions, narrow matrices, infinite labels
# --------------------------------------------------------------------------
def test_negative_prediction_counts_as_a_miss():
    r = segmentation_report([0, 0, 1], [0, -1, 1])
    assert r["accuracy"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(r["support"], [2, 1])


def test_identity_with_fewer_columns_than_classes():
    r = report_from_confusion([[1], [2]])
    np.testing.assert_allclose(r["iou"], [1 / 3, 0.0])


def test_torch_inf_labels_raise():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0.0, float("inf")]), torch.tensor([0, 1]))


def test_default_n_classes_ignores_the_ignore_label():
    conf = confusion_matrix([0, 1, 255, 1], [0, 1, 1, 1], ignore_index=255)
    assert conf.shape == (2, 2)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 2]])


def test_sample_weight_against_scikit_learn():
    from sklearn.metrics import accuracy_score, jaccard_score
    from sklearn.metrics import confusion_matrix as sk_confusion

    from skstego.metrics import confusion_matrix, mean_iou, pixel_accuracy

    rng = np.random.default_rng(0)
    y = rng.integers(-1, 4, size=(3, 5, 7))
    pred = np.where(rng.random(y.shape) < 0.7, np.maximum(y, 0), 2)
    w = rng.random(y.shape) * 3
    keep = y.ravel() >= 0
    yt, yp, wt = y.ravel()[keep], pred.ravel()[keep], w.ravel()[keep]
    ours = confusion_matrix(y, pred, n_classes=4, sample_weight=w)
    np.testing.assert_allclose(
        ours, sk_confusion(yt, yp, labels=range(4), sample_weight=wt), rtol=1e-12
    )
    assert pixel_accuracy(y, pred, sample_weight=w) == pytest.approx(
        accuracy_score(yt, yp, sample_weight=wt)
    )
    assert mean_iou(y, pred, n_classes=4, sample_weight=w) == pytest.approx(
        jaccard_score(yt, yp, labels=range(4), average="macro", sample_weight=wt)
    )
    # integer weights equal repeated pixels
    reps = rng.integers(0, 3, size=y.shape)
    np.testing.assert_array_equal(
        confusion_matrix(y, pred, n_classes=4, sample_weight=reps),
        confusion_matrix(
            np.repeat(y.ravel(), reps.ravel()),
            np.repeat(pred.ravel(), reps.ravel()),
            n_classes=4,
        ),
    )
    # the checks every sample_weight of skstego goes through
    with pytest.raises(ValueError, match=r"sample_weight has shape \(3,\)"):
        confusion_matrix(y, pred, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="Negative values"):
        confusion_matrix(y, pred, sample_weight=-np.ones(y.shape))
