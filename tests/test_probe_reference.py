"""Probes and metrics against hand-written re-implementations of the STEGO code.

The references below are written for these tests from the published STEGO
code (https://github.com/mhamilton723/STEGO): ``UnsupervisedMetrics`` of
``src/utils.py`` (confusion by bincount over ``n_classes + extra_clusters``
rows, Hungarian assignment, "Extra" row of unmatched clusters),
``ClusterLookup`` of ``src/modules.py`` (cosine of normalised codes and
normalised clusters, ``log_softmax(inner * alpha)`` with alpha 2) and the
evaluation of ``src/train_segmentation.py`` / ``src/eval_segmentation.py``
(codes upsampled with ``F.interpolate(..., mode="bilinear",
align_corners=False)`` to the label size *before* either probe; the linear
probe a ``Conv2d(dim, n_classes, (1, 1))``). They use only NumPy, SciPy and
torch, never skstego.
"""

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning

from skstego import KMeansProbe, LinearProbe
from skstego.metrics import make_segmentation_scorer, segmentation_report

# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------


class RefUnsupervisedMetrics:
    """The reference's metric in NumPy: ``stats`` is (n + extra, n).

    Rows are predicted ids, columns true classes. ``update`` keeps pixels
    whose label *and prediction* lie in ``[0, n)``; ``compute`` matches with
    ``linear_sum_assignment`` and, with extra clusters, appends the summed
    rows of unmatched clusters and an empty column.
    """

    def __init__(self, n_classes, extra_clusters, compute_hungarian):
        self.n = n_classes
        self.extra = extra_clusters
        self.hungarian = compute_hungarian
        self.stats = np.zeros((n_classes + extra_clusters, n_classes), np.int64)

    def update(self, preds, target):
        n, width = self.n, self.n + self.extra
        actual = np.asarray(target).reshape(-1)
        preds = np.asarray(preds).reshape(-1)
        keep = (actual >= 0) & (actual < n) & (preds >= 0) & (preds < n)
        counts = np.bincount(width * actual[keep] + preds[keep], minlength=n * width)
        self.stats += counts.reshape(n, width).T

    def compute(self):
        n = self.n
        if not self.hungarian:
            hist = self.stats
        else:
            clusters, classes = linear_sum_assignment(self.stats, maximize=True)
            if self.extra == 0:
                hist = self.stats[np.argsort(classes)]
            else:
                _, of_class = linear_sum_assignment(self.stats.T, maximize=True)
                unmatched = sorted(set(range(n + self.extra)) - set(clusters))
                hist = np.concatenate(
                    [self.stats[of_class], self.stats[unmatched].sum(0)[None]]
                )
                hist = np.concatenate([hist, np.zeros((n + 1, 1), np.int64)], 1)
        tp = np.diag(hist).astype(np.float64)
        fp = hist.sum(0) - tp
        fn = hist.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = tp / (tp + fp + fn)
            acc = tp.sum() / hist.sum()
        return {
            "mIoU": 100 * iou[~np.isnan(iou)].mean(),
            "Accuracy": 100 * acc,
            "iou": iou,
        }


class RefClusterLookup(torch.nn.Module):
    """Cosine cluster probe: normalised codes against normalised clusters."""

    def __init__(self, clusters):
        super().__init__()
        self.clusters = torch.nn.Parameter(torch.as_tensor(clusters))

    def forward(self, x, alpha=2.0):
        clusters = F.normalize(self.clusters, dim=1)
        codes = F.normalize(x, dim=1)
        inner = torch.einsum("bchw,nc->bnhw", codes, clusters)
        return inner, torch.log_softmax(inner * alpha, dim=1)


def upsample_codes(codes, size):
    return F.interpolate(
        torch.as_tensor(codes), size, mode="bilinear", align_corners=False
    )


def top2_margin(scores):
    """Gap between the best and second-best score per pixel, (N, H, W)."""
    top = torch.topk(scores, 2, dim=1).values
    return (top[:, 0] - top[:, 1]).numpy()


def assert_argmax_equal(pred, scores, tol=1e-5):
    """``pred`` is the argmax of ``scores`` wherever the argmax is clear."""
    ref = scores.argmax(dim=1).numpy()
    clear = top2_margin(scores) > tol
    np.testing.assert_array_equal(np.asarray(pred)[clear], ref[clear])
    assert clear.mean() > 0.99


def random_problem(seed, n=3, dim=5, hw=(4, 6), factor=4, n_classes=5, k=7):
    """Codes (n, dim, h, w), labels (n, H, W) with -1s, centroids (k, dim)."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(n, dim, *hw)).astype(np.float32)
    size = (hw[0] * factor, hw[1] * factor)
    labels = rng.integers(-1, n_classes, size=(n, *size))
    centroids = rng.normal(size=(k, dim)).astype(np.float32)
    return codes, labels, centroids, size


# --------------------------------------------------------------------------
# the metric: extra_clusters="reference" is the reference, exactly
# --------------------------------------------------------------------------


def _correlated(rng, y, n_classes, k, absent=()):
    pred = np.where(
        rng.random(y.shape) < 0.6,
        (np.clip(y, 0, None) * 5 + 2) % k,
        rng.integers(0, k, size=y.shape),
    )
    for c in absent:
        y = np.where(y == c, -1, y)
    return y, pred


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [5, 6, 9])
@pytest.mark.parametrize("absent", [(), (4,), (0, 2)])
def test_reference_treatment_equals_the_reference_metric(seed, k, absent):
    n_classes = 5
    rng = np.random.default_rng(seed)
    y = rng.integers(-1, n_classes, size=(3, 11, 13))
    y, pred = _correlated(rng, y, n_classes, k, absent)
    ref = RefUnsupervisedMetrics(n_classes, k - n_classes, True)
    ref.update(pred, y)
    expected = ref.compute()
    r = segmentation_report(
        y,
        pred,
        n_classes=n_classes,
        n_pred=k,
        matching="hungarian",
        extra_clusters="reference",
    )
    assert 100 * r["miou"] == pytest.approx(expected["mIoU"], rel=1e-12)
    assert 100 * r["accuracy"] == pytest.approx(expected["Accuracy"], rel=1e-12)
    np.testing.assert_allclose(r["iou"], expected["iou"][:n_classes])
    if k == n_classes:  # no extra cluster: the default is the reference too
        d = segmentation_report(
            y, pred, n_classes=n_classes, n_pred=k, matching="hungarian"
        )
        assert 100 * d["miou"] == pytest.approx(expected["mIoU"], rel=1e-12)
        assert 100 * d["accuracy"] == pytest.approx(expected["Accuracy"], rel=1e-12)
    # the confusion is still skstego's (n_classes, k), nothing dropped
    assert r["confusion"].shape == (n_classes, k)
    assert r["confusion"].sum() == np.sum((y >= 0) & (pred >= 0))


@pytest.mark.parametrize("seed", range(4))
def test_reference_treatment_with_ties_and_an_extra_row(seed):
    # sparse predictions: many zero entries, so linear_sum_assignment meets
    # ties, and unmatched clusters of id < n_classes may hold pixels
    n_classes, k = 4, 7
    rng = np.random.default_rng(seed)
    y = rng.integers(-1, 2, size=60)  # classes 2 and 3 absent
    pred = rng.choice([0, 1, 5, 6], size=60)
    ref = RefUnsupervisedMetrics(n_classes, k - n_classes, True)
    ref.update(pred, y)
    expected = ref.compute()
    r = segmentation_report(
        y,
        pred,
        n_classes=n_classes,
        n_pred=k,
        matching="hungarian",
        extra_clusters="reference",
    )
    assert 100 * r["miou"] == pytest.approx(expected["mIoU"], rel=1e-12)
    assert 100 * r["accuracy"] == pytest.approx(expected["Accuracy"], rel=1e-12)


def test_reference_drops_pixels_of_extra_cluster_ids_by_hand():
    # classes 0, 1; clusters 0, 1, 2 (one extra). Cluster 2 takes 2 pixels of
    # class 0: the reference drops them (ids >= n_classes) whatever the
    # matching, so both classes are perfect; skstego counts them as errors.
    y = [0, 0, 0, 0, 1, 1, 1]
    pred = [1, 1, 2, 2, 0, 0, 0]
    ref = RefUnsupervisedMetrics(2, 1, True)
    ref.update(np.array(pred), np.array(y))
    assert ref.compute()["mIoU"] == 100.0
    kw = dict(n_classes=2, n_pred=3, matching="hungarian")
    r = segmentation_report(y, pred, extra_clusters="reference", **kw)
    assert r["miou"] == 1.0 and r["accuracy"] == 1.0
    e = segmentation_report(y, pred, **kw)
    assert e["accuracy"] == pytest.approx(5 / 7)
    np.testing.assert_allclose(e["iou"], [0.5, 1.0])


@pytest.mark.parametrize("seed", range(3))
def test_reference_identity_equals_the_linear_metric(seed):
    n_classes = 6
    rng = np.random.default_rng(seed)
    y = rng.integers(-1, n_classes, size=500)
    y[y == 3] = -1  # an absent class
    pred = np.where(rng.random(500) < 0.7, y, rng.integers(0, n_classes, 500))
    pred = np.clip(pred, 0, None)
    ref = RefUnsupervisedMetrics(n_classes, 0, False)
    ref.update(pred, y)
    expected = ref.compute()
    for extra_clusters in ("errors", "reference"):
        r = segmentation_report(
            y, pred, n_classes=n_classes, extra_clusters=extra_clusters
        )
        assert 100 * r["miou"] == pytest.approx(expected["mIoU"])
        assert 100 * r["accuracy"] == pytest.approx(expected["Accuracy"])


def test_both_treatments_agree_without_extra_clusters():
    rng = np.random.default_rng(0)
    y = rng.integers(-1, 5, size=(2, 9, 9))
    y, pred = _correlated(rng, y, 5, 5, absent=(1,))
    kw = dict(n_classes=5, n_pred=5, matching="hungarian")
    a = segmentation_report(y, pred, **kw)
    b = segmentation_report(y, pred, extra_clusters="reference", **kw)
    assert a["miou"] == pytest.approx(b["miou"])
    assert a["accuracy"] == pytest.approx(b["accuracy"])
    np.testing.assert_allclose(a["iou"], b["iou"])


def test_bad_extra_clusters_raises():
    with pytest.raises(ValueError, match="extra_clusters"):
        segmentation_report([0, 1], [0, 1], extra_clusters="drop")


# --------------------------------------------------------------------------
# cluster probe: from_centroids, upsampling codes, fixed n_classes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_cluster_probe_equals_the_reference_evaluation(seed):
    codes, labels, centroids, size = random_problem(seed)
    n_classes, k = 5, centroids.shape[0]
    lookup = RefClusterLookup(centroids)
    with torch.no_grad():
        inner, log_probs = lookup(upsample_codes(codes, size))
    preds = log_probs.argmax(dim=1)
    ref = RefUnsupervisedMetrics(n_classes, k - n_classes, True)
    ref.update(preds.numpy(), labels)
    expected = ref.compute()

    probe = KMeansProbe.from_centroids(centroids, n_classes=n_classes, device="cpu")
    pred = probe.predict(codes, size=size, upsample="codes")
    assert_argmax_equal(pred, inner)
    np.testing.assert_allclose(
        probe.predict_log_proba(codes, size=size, upsample="codes"),
        log_probs.numpy(),
        atol=2e-5,
    )
    np.testing.assert_allclose(
        probe.predict_proba(codes, size=size, upsample="codes"),
        log_probs.exp().numpy(),
        atol=2e-6,
    )
    # exact unless a near-tie flipped a pixel (none does for these seeds)
    tol = dict(rel=1e-9) if np.array_equal(pred, preds.numpy()) else dict(abs=0.1)
    kw = dict(extra_clusters="reference", upsample="codes")
    r = probe.score_report(codes, labels, **kw)
    assert 100 * r["miou"] == pytest.approx(expected["mIoU"], **tol)
    assert 100 * r["accuracy"] == pytest.approx(expected["Accuracy"], **tol)
    scorer = make_segmentation_scorer("accuracy", **kw)
    assert 100 * scorer(probe, codes, labels) == pytest.approx(
        expected["Accuracy"], **tol
    )


def test_upsampling_scores_is_the_default_and_differs_for_cosine():
    codes, _, centroids, size = random_problem(0, hw=(6, 6), factor=8)
    probe = KMeansProbe.from_centroids(centroids, device="cpu")
    with torch.no_grad():
        inner, _ = RefClusterLookup(centroids)(torch.from_numpy(codes))
        scores_up = F.interpolate(inner, size, mode="bilinear", align_corners=False)
        codes_up, _ = RefClusterLookup(centroids)(upsample_codes(codes, size))
    by_scores = probe.predict(codes, size=size)
    assert_argmax_equal(by_scores, scores_up)
    np.testing.assert_array_equal(
        by_scores, probe.predict(codes, size=size, upsample="scores")
    )
    by_codes = probe.predict(codes, size=size, upsample="codes")
    assert_argmax_equal(by_codes, codes_up)
    # normalising after upsampling moves boundaries: some pixels differ
    assert 0 < np.mean(by_scores != by_codes) < 0.2


def test_upsampling_codes_is_the_same_for_euclidean():
    codes, _, centroids, size = random_problem(1, hw=(6, 6), factor=8)
    probe = KMeansProbe.from_centroids(centroids, metric="euclidean", device="cpu")
    up = upsample_codes(codes, size)
    dist = torch.cdist(
        up.permute(0, 2, 3, 1).reshape(-1, up.shape[1]).double(),
        torch.from_numpy(centroids).double(),
    )
    neg = -dist.reshape(up.shape[0], *size, -1).permute(0, 3, 1, 2)
    for upsample in ("scores", "codes"):
        assert_argmax_equal(probe.predict(codes, size=size, upsample=upsample), neg)


def test_from_centroids_is_a_fitted_probe_without_refit():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(4, 3)).astype(np.float32) * 5
    probe = KMeansProbe.from_centroids(torch.from_numpy(centroids), n_classes=3)
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    np.testing.assert_allclose(probe.cluster_centers_, unit, rtol=1e-6)
    assert probe.k == 4 and probe.n_features_in_ == 3 and probe.n_classes == 3
    assert not hasattr(probe, "mapping_") and not hasattr(probe, "labels_")
    X = rng.normal(size=(50, 3)).astype(np.float32)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_array_equal(probe.predict(X), np.argmax(Xn @ unit.T, axis=1))
    np.testing.assert_allclose(probe.transform(X), Xn @ unit.T, atol=1e-6)
    # a clone refits from the given centroids; pickling keeps them
    refit = clone(probe).fit(X)
    assert refit.cluster_centers_.shape == (4, 3)
    restored = pickle.loads(pickle.dumps(probe))
    np.testing.assert_array_equal(restored.predict(X), probe.predict(X))
    # partial_fit continues from them
    moved = pickle.loads(pickle.dumps(probe)).partial_fit(X)
    assert moved.counts_.sum() == 50


def test_from_centroids_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        KMeansProbe.from_centroids(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        KMeansProbe.from_centroids([[np.nan, 1.0]])
    with pytest.raises(ValueError, match="metric"):
        KMeansProbe.from_centroids([[1.0, 0.0]], metric="manhattan")
    with pytest.raises(ValueError, match="n_classes"):
        KMeansProbe.from_centroids([[1.0, 0.0]], n_classes=0)


def _absent_last_class(seed=0):
    """Tokens of 4 classes in 4 clusters; class 3 absent from the labels."""
    rng = np.random.default_rng(seed)
    centers = np.eye(4, 6, dtype=np.float32) * 4
    y = rng.integers(0, 4, size=400)
    X = centers[y] + rng.normal(size=(400, 6)).astype(np.float32)
    y_eval = np.where(y == 3, 0, y)  # class 3 relabelled: absent
    return X, y, y_eval, centers


def _reference_score(pred, y, n_classes, k):
    ref = RefUnsupervisedMetrics(n_classes, k - n_classes, True)
    ref.update(pred, y)
    return ref.compute()["mIoU"] / 100


def test_fixed_n_classes_keeps_absent_classes():
    X, _, y_eval, centers = _absent_last_class()
    probe = KMeansProbe(k=4, n_classes=4, random_state=0, init=centers).fit(X)
    pred = probe.predict(X)
    expected = _reference_score(pred, y_eval, 4, 4)
    assert probe.score(X, y_eval) == pytest.approx(expected)
    # inferring the class count from the evaluated labels forgets class 3
    free = KMeansProbe(k=4, random_state=0, init=centers).fit(X)
    assert free.score(X, y_eval) > expected
    assert free.score(X, y_eval, n_classes=4) == pytest.approx(expected)
    # from_centroids with n_classes, and the fitted n_classes_ of fit(X, y)
    loaded = KMeansProbe.from_centroids(probe.cluster_centers_, n_classes=4)
    assert loaded.score(X, y_eval) == pytest.approx(expected)


def test_fitted_n_classes_is_kept_at_score_time():
    X, y, y_eval, centers = _absent_last_class()
    probe = KMeansProbe(k=4, random_state=0, init=centers).fit(X, y)
    assert probe.n_classes_ == 4
    assert probe.score(X, y_eval) == pytest.approx(
        _reference_score(probe.labels_, y_eval, 4, 4)
    )
    assert probe.score_report(X, y_eval)["confusion"].shape == (4, 4)
    # the parameter fixes n_classes_ too
    wide = KMeansProbe(k=4, n_classes=6, random_state=0, init=centers).fit(X, y)
    assert wide.n_classes_ == 6 and wide.mapping_.max() < 6


def test_labels_beyond_n_classes_raise():
    X, y, _, centers = _absent_last_class()
    probe = KMeansProbe(k=4, n_classes=3, init=centers, random_state=0)
    with pytest.raises(ValueError, match="n_classes=3"):
        probe.fit(X, y)
    probe.fit(X)
    with pytest.raises(ValueError, match="n_classes=3"):
        probe.score(X, y)
    with pytest.raises(ValueError, match="n_classes=2"):
        probe.score(X, y, n_classes=2)


# --------------------------------------------------------------------------
# linear probe: from_weights against Conv2d
# --------------------------------------------------------------------------


def _conv(seed=0, dim=5, n_classes=4):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(dim, n_classes, (1, 1))
    return conv


@pytest.mark.parametrize("seed", range(3))
def test_linear_probe_equals_the_reference_conv2d(seed):
    codes, labels, _, size = random_problem(seed, n_classes=4)
    conv = _conv(seed)
    probe = LinearProbe.from_weights(conv.weight, conv.bias, device="cpu")
    np.testing.assert_array_equal(probe.classes_, np.arange(4))
    x = torch.from_numpy(codes)
    with torch.no_grad():
        logits = conv(x)
        up_logits = conv(upsample_codes(codes, size))
    np.testing.assert_allclose(probe.decision_function(codes), logits, atol=1e-5)
    np.testing.assert_allclose(
        probe.predict_log_proba(codes, size=size, upsample="codes"),
        torch.log_softmax(up_logits, dim=1),
        atol=1e-5,
    )
    # affine: upsampling logits or codes agree up to rounding
    for upsample in ("scores", "codes"):
        np.testing.assert_allclose(
            probe.predict_proba(codes, size=size, upsample=upsample),
            torch.softmax(up_logits, dim=1),
            atol=1e-5,
        )
        assert_argmax_equal(
            probe.predict(codes, size=size, upsample=upsample), up_logits
        )
    preds = up_logits.argmax(dim=1).numpy()
    ref = RefUnsupervisedMetrics(4, 0, False)
    ref.update(preds, labels)
    expected = ref.compute()
    pred = probe.predict(codes, size=size, upsample="codes")
    tol = dict(rel=1e-9) if np.array_equal(pred, preds) else dict(abs=0.1)
    assert 100 * probe.score(codes, labels, upsample="codes") == pytest.approx(
        expected["mIoU"], **tol
    )
    assert 100 * probe.score(
        codes, labels, metric="accuracy", upsample="codes"
    ) == pytest.approx(expected["Accuracy"], **tol)


def test_from_weights_shapes_and_partial_fit():
    conv = _conv(0)
    w2d = conv.weight.detach()[:, :, 0, 0].numpy()
    probe = LinearProbe.from_weights(w2d, device="cpu")  # no bias: zeros
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    np.testing.assert_allclose(probe.decision_function(x), x @ w2d.T, atol=1e-5)
    named = LinearProbe.from_weights(w2d, classes=[2, 3, 5, 7])
    np.testing.assert_array_equal(
        named.predict(x), np.array([2, 3, 5, 7])[np.argmax(x @ w2d.T, axis=1)]
    )
    # partial_fit continues from the loaded weights
    tiny = LinearProbe.from_weights(conv.weight, conv.bias).set_params(lr=1e-12)
    y = np.argmax(x @ w2d.T, axis=1)
    tiny.partial_fit(x, y)
    np.testing.assert_allclose(tiny.coef_, w2d, atol=1e-6)
    assert len(tiny.loss_curve_) == 1
    with pytest.raises(ValueError, match="weight must have shape"):
        LinearProbe.from_weights(np.zeros((3, 4, 3, 3)))
    with pytest.raises(ValueError, match="bias must have shape"):
        LinearProbe.from_weights(w2d, np.zeros(3))
    with pytest.raises(ValueError, match="classes"):
        LinearProbe.from_weights(w2d, classes=[3, 2, 1, 0])


# --------------------------------------------------------------------------
# issue 18: label maps of another aspect ratio, all-ignored labels
# --------------------------------------------------------------------------


@pytest.fixture
def fitted_probes():
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 4, 6))
    kmeans = KMeansProbe(k=3, random_state=0).fit(codes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear = LinearProbe(max_iter=3, random_state=0).fit(codes, labels)
    return codes, labels, (kmeans, linear)


def test_label_maps_of_another_aspect_ratio_raise(fitted_probes):
    codes, labels, probes = fitted_probes
    for probe in probes:
        for bad in (labels.transpose(0, 2, 1), np.zeros((2, 8, 8), np.int64)):
            with pytest.raises(ValueError, match="aspect ratio"):
                probe.score(codes, bad)
        # larger maps of the same aspect ratio are fine, with rounding
        probe.score(codes, labels.repeat(4, axis=1).repeat(4, axis=2))
        probe.score(codes, np.zeros((2, 17, 25), np.int64))
    with pytest.raises(ValueError, match="aspect ratio"):
        KMeansProbe(k=3).fit(codes, labels.transpose(0, 2, 1))


def test_labels_of_a_patch_8_image_with_remainder_are_accepted():
    # a 321 x 481 image gives 40 x 60 maps with patch 8
    probe = KMeansProbe.from_centroids(np.eye(2, 3, dtype=np.float32))
    codes = np.random.default_rng(0).normal(size=(1, 3, 40, 60)).astype(np.float32)
    labels = np.zeros((1, 321, 481), np.int64)
    assert probe.score(codes, labels, metric="accuracy") >= 0.0
    with pytest.raises(ValueError, match="aspect ratio"):
        probe.score(codes, labels.transpose(0, 2, 1))


def test_all_ignored_labels_warn_and_give_nan(fitted_probes):
    codes, labels, probes = fitted_probes
    ignored = np.full_like(labels, -1)
    for probe in probes:
        for metric in ("miou", "accuracy"):
            with pytest.warns(UndefinedMetricWarning, match="No valid pixel"):
                assert np.isnan(probe.score(codes, ignored, metric=metric))


def test_bad_upsample_raises(fitted_probes):
    codes, labels, probes = fitted_probes
    for probe in probes:
        with pytest.raises(ValueError, match="upsample"):
            probe.predict(codes, size=(8, 12), upsample="labels")
        with pytest.raises(ValueError, match="upsample"):
            probe.score(codes, labels, upsample="features")


def test_hnne_cluster_probe_counts_a_fixed_n_classes():
    from skstego import HNNEClusterProbe

    X, _, y_eval, _ = _absent_last_class()
    probe = HNNEClusterProbe(k=4, n_classes=4, random_state=0, device="cpu").fit(X)
    pred = probe.predict(X)
    k = probe.cluster_centers_.shape[0]
    expected = _reference_score(pred, y_eval, 4, max(k, 4))
    assert probe.score(X, y_eval) == pytest.approx(expected)
    free = HNNEClusterProbe(k=4, random_state=0, device="cpu").fit(X)
    assert free.score(X, y_eval, n_classes=4) == pytest.approx(expected)
