"""Metadata routing and weighted / unsupervised scoring of the probes.

References: scikit-learn's ``accuracy_score`` / ``jaccard_score`` with
``sample_weight``, ``KMeans.score`` with the same centres, and the same scores
computed by hand on repeated samples.
"""

import numpy as np
import pytest
import sklearn
from sklearn.cluster import KMeans
from sklearn.metrics import accuracy_score, jaccard_score, make_scorer
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import normalize

from skstego import CRFProbe, HNNEClusterProbe, KMeansProbe, LinearProbe, TorchPCA
from skstego.datasets import make_feature_maps


@pytest.fixture(params=[False, True], ids=["routing-off", "routing-on"])
def routing(request):
    with sklearn.config_context(enable_metadata_routing=request.param):
        yield request.param


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 6)) * 3
    y = np.repeat([0, 1, 2], 30)
    X = (means[y] + rng.normal(size=(90, 6))).astype(np.float32)
    perm = rng.permutation(90)
    return X[perm], y[perm]


def _probes():
    return {
        "kmeans": KMeansProbe(k=3, metric="euclidean", device="cpu", random_state=0),
        "linear": LinearProbe(solver="lbfgs", device="cpu"),
        "hnne": HNNEClusterProbe(k=3, device="cpu", random_state=0),
        "crf-kmeans": CRFProbe(
            KMeansProbe(k=3, metric="euclidean", device="cpu", random_state=0)
        ),
        "crf-linear": CRFProbe(LinearProbe(solver="lbfgs", device="cpu")),
    }


PROBES = list(_probes())


@pytest.mark.parametrize("name", PROBES)
def test_pipeline_score_grid_search_cross_val(blobs, routing, name):
    X, y = blobs
    probe = _probes()[name]
    pipe = make_pipeline(TorchPCA(4, device="cpu"), probe).fit(X, y)
    expected = pipe[-1].score(pipe[0].transform(X), y)
    assert pipe.score(X, y) == pytest.approx(expected)
    cv = KFold(3)
    scores = cross_val_score(pipe, X, y, cv=cv)
    assert np.all(np.isfinite(scores))
    by_hand = [
        make_pipeline(TorchPCA(4, device="cpu"), _probes()[name])
        .fit(X[tr], y[tr])
        .score(X[te], y[te])
        for tr, te in cv.split(X)
    ]
    np.testing.assert_allclose(scores, by_hand)
    grid = GridSearchCV(pipe, {"torchpca__dim": [3, 4]}, cv=cv).fit(X, y)
    assert np.all(np.isfinite(grid.cv_results_["mean_test_score"]))


def _weights(n, seed=1):
    return np.random.default_rng(seed).integers(0, 4, n).astype(float)


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "float"])
def test_linear_weighted_score_equals_sklearn(blobs, integer):
    X, y = blobs
    w = _weights(len(y))
    if not integer:  # fractional weights must not be rounded anywhere
        w = w * np.random.default_rng(2).random(len(y))
    probe = LinearProbe(solver="lbfgs", device="cpu").fit(X[:45], y[:45])
    pred = probe.predict(X)
    assert probe.score(X, y, sample_weight=w) == pytest.approx(
        accuracy_score(y, pred, sample_weight=w)
    )
    miou = probe.score(X, y, sample_weight=w, metric="miou")
    assert miou == pytest.approx(
        jaccard_score(y, pred, average="macro", sample_weight=w)
    )


def test_weighted_map_scores_equal_repeated_images():
    X, y = make_feature_maps(
        6, n_features=8, n_classes=3, map_size=4, label_size=8, random_state=0
    )
    X = X.astype(np.float32)
    w = np.array([0, 1, 2, 3, 1, 2])
    rep = np.repeat(np.arange(6), w)
    for probe in (
        KMeansProbe(k=4, metric="euclidean", device="cpu", random_state=0).fit(X),
        LinearProbe(solver="lbfgs", device="cpu").fit(X, y),
    ):
        for metric in ("miou", "accuracy"):
            got = probe.score(X, y, sample_weight=w, metric=metric)
            assert got == pytest.approx(probe.score(X[rep], y[rep], metric=metric))
        # per-pixel weights of the label maps' shape: the same, broadcast
        pix = np.broadcast_to(w[:, None, None], y.shape)
        assert probe.score(X, y, sample_weight=pix) == pytest.approx(
            probe.score(X, y, sample_weight=w)
        )


def test_weights_are_checked(blobs):
    X, y = blobs
    probe = LinearProbe(solver="lbfgs", device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="sample_weight has shape"):
        probe.score(X, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="Negative"):
        probe.score(X, y, sample_weight=-np.ones(len(y)))


def test_routed_sample_weight_reaches_score(blobs):
    X, y = blobs
    w = _weights(len(y))
    with sklearn.config_context(enable_metadata_routing=True):
        probe = LinearProbe(solver="lbfgs", device="cpu").set_score_request(
            sample_weight=True
        )
        # the weights go to score only (fit takes them too)
        probe.set_fit_request(sample_weight=False)
        pipe = make_pipeline(TorchPCA(4, device="cpu"), probe).fit(X, y)
        pred = pipe.predict(X)
        got = pipe.score(X, y, sample_weight=w)
        assert got == pytest.approx(accuracy_score(y, pred, sample_weight=w))
        cv = KFold(3)
        # an explicit scorer requesting the weights (scikit-learn 1.6's
        # default scorer cannot route to Pipeline.score)
        scorer = make_scorer(accuracy_score).set_score_request(sample_weight=True)
        scores = cross_val_score(
            pipe, X, y, cv=cv, scoring=scorer, params={"sample_weight": w}
        )
        by_hand = []
        for tr, te in cv.split(X):
            fold = make_pipeline(
                TorchPCA(4, device="cpu"), LinearProbe(solver="lbfgs", device="cpu")
            ).fit(X[tr], y[tr])
            by_hand.append(
                accuracy_score(y[te], fold.predict(X[te]), sample_weight=w[te])
            )
        np.testing.assert_allclose(scores, by_hand)
        # an unrequested weight raises, as for scikit-learn's estimators
        plain = make_pipeline(
            TorchPCA(4, device="cpu"), LinearProbe(solver="lbfgs", device="cpu")
        ).fit(X, y)
        with pytest.raises(Exception, match="sample_weight"):
            plain.score(X, y, sample_weight=w)


def test_crf_probe_declares_routing(blobs):
    X, y = blobs
    w = _weights(len(y))
    routing = CRFProbe(KMeansProbe(k=3)).get_metadata_routing()
    assert "probe" in str(routing)
    with sklearn.config_context(enable_metadata_routing=True):
        # score consumes sample_weight itself, once requested
        crf = CRFProbe(LinearProbe(solver="lbfgs", device="cpu"))
        crf.set_score_request(sample_weight=True)
        pipe = make_pipeline(TorchPCA(4, device="cpu"), crf).fit(X, y)
        assert pipe.score(X, y, sample_weight=w) == pytest.approx(
            accuracy_score(y, pipe.predict(X), sample_weight=w)
        )


# --------------------------------------------------------- unsupervised score


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_score_without_y_is_minus_inertia_like_kmeans(blobs, metric):
    X, _ = blobs
    w = _weights(len(X))
    km = KMeans(3, n_init=3, random_state=0).fit(X)
    if metric == "cosine":
        km = KMeans(3, n_init=3, random_state=0).fit(normalize(X))
        km.cluster_centers_ = normalize(km.cluster_centers_)
    probe = KMeansProbe.from_centroids(km.cluster_centers_, metric=metric, device="cpu")
    Xr = normalize(X) if metric == "cosine" else X
    assert probe.score(X) == pytest.approx(km.score(Xr), rel=1e-5)
    assert probe.score(X, sample_weight=w) == pytest.approx(
        km.score(Xr, sample_weight=w), rel=1e-5
    )


def test_fitted_kmeans_probe_score_is_minus_inertia(blobs):
    X, _ = blobs
    probe = KMeansProbe(k=3, metric="euclidean", device="cpu", random_state=0).fit(X)
    assert probe.score(X) == pytest.approx(-probe.inertia_, rel=1e-5)


def test_hnne_cluster_probe_score_without_y(blobs):
    X, _ = blobs
    probe = HNNEClusterProbe(k=3, metric="euclidean", device="cpu", random_state=0)
    probe.fit(X)
    Xd = X.astype(np.float64)
    km = KMeans(probe.n_clusters_, n_init=1, random_state=0).fit(Xd)
    km.cluster_centers_ = probe.cluster_centers_.astype(np.float64)
    assert probe.score(X) == pytest.approx(km.score(Xd), rel=1e-5)


def test_maps_score_without_y_weights_images():
    X, _ = make_feature_maps(4, n_features=8, n_classes=3, map_size=4, random_state=0)
    X = X.astype(np.float32)
    probe = KMeansProbe(k=3, metric="euclidean", device="cpu", random_state=0).fit(X)
    w = np.array([1, 0, 2, 1])
    rep = np.repeat(np.arange(4), w)
    assert probe.score(X, sample_weight=w) == pytest.approx(probe.score(X[rep]))


@pytest.mark.parametrize("cls", [KMeansProbe, HNNEClusterProbe])
def test_label_free_grid_search(blobs, cls):
    X, _ = blobs
    est = cls(k=2, metric="euclidean", device="cpu", random_state=0)
    cv = KFold(3)
    grid = GridSearchCV(est, {"k": [2, 3]}, cv=cv).fit(X)
    scores = grid.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and np.all(scores <= 0)
    # each candidate's score is -inertia of the held-out fold, as for KMeans
    by_hand = np.mean(
        [
            cls(k=3, metric="euclidean", device="cpu", random_state=0)
            .fit(X[tr])
            .score(X[te])
            for tr, te in cv.split(X)
        ]
    )
    assert scores[1] == pytest.approx(by_hand)


def test_cluster_probe_fractional_weights_are_not_rounded():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    X[:, 0] += 3 * y
    w = rng.random(200) * 2
    probe = KMeansProbe(k=3, metric="euclidean", random_state=0, device="cpu").fit(X)
    pred = probe.predict(X)
    weighted = np.zeros((3, 3))
    np.add.at(weighted, (y, pred), w)  # the weighted confusion, by hand
    rows, cols = linear_sum_assignment(weighted, maximize=True)
    expected = weighted[rows, cols].sum() / w.sum()
    got = probe.score(X, y, sample_weight=w, metric="accuracy")
    assert got == pytest.approx(expected, rel=1e-9)
