"""HNNEClusterProbe against hnne's own hierarchy, scipy's Hungarian, layouts."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _references import hungarian_scores
from hnne import HNNE
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits

from skstego import HNNEClusterProbe
from skstego.datasets import make_feature_maps


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:600].astype(np.float32), y[:600]


@pytest.fixture(scope="module")
def blobs():
    """Three well separated blobs (FINCH levels [67, 14, 3] with seed 0)."""
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 8)) * 5
    y = np.repeat([0, 1, 2], 100)
    X = (means[y] + rng.normal(size=(300, 8))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def feature_maps():
    X, y = make_feature_maps(
        6, n_features=16, n_classes=3, map_size=6, label_size=12, random_state=0
    )
    return X.astype(np.float32), y


def hnne_hierarchy(X, metric="cosine"):
    ref = HNNE(metric=metric, random_state=0)
    ref.fit_only_hierarchy(X)
    return ref.hierarchy_parameters


def nearest_centroid(X, centers, metric):
    X = np.asarray(X, dtype=np.float64)
    return np.argmin(
        cdist(X, centers, "cosine" if metric == "cosine" else "sqeuclidean"), 1
    )


# ----------------------------------------------------------------- hierarchy


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_partition_is_hnnes_own(digits, metric):
    X, _ = digits
    hp = hnne_hierarchy(X, metric)
    sizes = np.asarray(hp.partition_sizes)
    level = len(sizes) // 2
    probe = HNNEClusterProbe(
        k=int(sizes[level]), metric=metric, device="cpu", random_state=0
    )
    probe.fit(X)
    np.testing.assert_array_equal(probe.levels_[: len(sizes)], sizes)
    assert probe.level_ == level and probe.n_clusters_ == sizes[level]
    np.testing.assert_array_equal(probe.labels_, hp.partitions[:, level])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_centroids_are_cluster_means(digits, metric):
    X, _ = digits
    probe = HNNEClusterProbe(level=1, metric=metric, device="cpu", random_state=0)
    labels = probe.fit(X).labels_
    Xd = X.astype(np.float64)
    if metric == "cosine":
        Xd = Xd / np.linalg.norm(Xd, axis=1, keepdims=True)
    expected = np.stack([Xd[labels == j].mean(0) for j in range(probe.n_clusters_)])
    if metric == "cosine":
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(probe.cluster_centers_, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_predict_is_nearest_centroid(digits, metric):
    X, _ = digits
    probe = HNNEClusterProbe(level=2, metric=metric, device="cpu", random_state=0)
    probe.fit(X[:400])
    new = X[400:]
    expected = nearest_centroid(new, probe.cluster_centers_.astype(np.float64), metric)
    np.testing.assert_array_equal(probe.predict(new), expected)


def test_predict_reproduces_partition_on_separated_data(blobs):
    X, _ = blobs
    probe = HNNEClusterProbe(device="cpu", random_state=0).fit(X)
    ref = hnne_hierarchy(X).partitions[:, -1]  # coarsest level = level="auto"
    np.testing.assert_array_equal(probe.labels_, ref)
    np.testing.assert_array_equal(probe.predict(X), ref)


def test_auto_level_without_k_is_the_coarsest(digits):
    X, _ = digits
    probe = HNNEClusterProbe(device="cpu", random_state=0).fit(X)
    assert probe.level_ == len(probe.levels_) - 1
    assert probe.n_clusters_ == probe.levels_[-1] >= 2


def test_k_picks_the_closest_level(digits):
    X, _ = digits
    levels = HNNEClusterProbe(device="cpu", random_state=0).fit(X).levels_
    for k in range(levels[-1], levels[0] + 1, 7):
        probe = HNNEClusterProbe(k=k, device="cpu", random_state=0).fit(X)
        dist = np.abs(levels - k)
        assert dist[probe.level_] == dist.min()
        assert probe.level_ == np.flatnonzero(dist == dist.min())[0]  # finer on ties


# ----------------------------------------------------------------- scoring


def test_score_matches_scipy_hungarian_on_maps(feature_maps):
    X, y = feature_maps  # maps (6, 16, 6, 6), labels (6, 12, 12)
    probe = HNNEClusterProbe(k=4, device="cpu", random_state=0).fit(X)
    k = probe.n_clusters_
    # Hand-built: cosine scores, bilinearly upsampled to the labels, argmax.
    C = torch.from_numpy(probe.cluster_centers_)
    scores = torch.einsum("nchw,kc->nkhw", F.normalize(torch.from_numpy(X), dim=1), C)
    up = F.interpolate(scores, size=y.shape[-2:], mode="bilinear", align_corners=False)
    pred = up.argmax(1).numpy()
    miou, acc, mapping = hungarian_scores(y, pred, int(y.max()) + 1, k)
    report = probe.score_report(X, y)
    assert report["miou"] == pytest.approx(miou)
    assert report["accuracy"] == pytest.approx(acc)
    np.testing.assert_array_equal(report["mapping"], mapping)
    assert probe.score(X, y) == pytest.approx(miou)
    assert probe.score(X, y, metric="accuracy") == pytest.approx(acc)
    np.testing.assert_array_equal(probe.predict(X, size=y.shape[-2:]), pred)


def test_fit_with_y_maps_clusters_to_classes(digits):
    X, y = digits
    probe = HNNEClusterProbe(k=10, device="cpu", random_state=0).fit(X, y)
    _, _, mapping = hungarian_scores(y, probe.labels_, 10, probe.n_clusters_)
    np.testing.assert_array_equal(probe.mapping_, mapping)
    assert probe.n_classes_ == 10
    np.testing.assert_array_equal(probe.fit_predict(X, y), mapping[probe.labels_])
    pred = probe.predict(X)
    ids = nearest_centroid(X, probe.cluster_centers_.astype(np.float64), "cosine")
    np.testing.assert_array_equal(pred, mapping[ids])


# ----------------------------------------------------------------- layouts


def test_maps_labels_and_predict_layout(feature_maps):
    X, _ = feature_maps
    probe = HNNEClusterProbe(device="cpu", random_state=0).fit(X)
    assert probe.labels_.shape == (6, 6, 6)
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, X.shape[1])
    np.testing.assert_array_equal(
        probe.labels_.ravel(), hnne_hierarchy(tokens).partitions[:, -1]
    )
    out = probe.predict(torch.from_numpy(X))
    assert isinstance(out, torch.Tensor) and out.shape == (6, 6, 6)
    np.testing.assert_array_equal(out.numpy(), probe.predict(X))


def test_subsample_labels_every_token(digits):
    X, _ = digits
    probe = HNNEClusterProbe(max_fit_samples=200, device="cpu", random_state=0)
    probe.fit(X)
    assert probe.hnne_.hierarchy_parameters.partitions.shape[0] == 200
    assert probe.labels_.shape == (600,)
    # Every token outside the sample got its nearest centroid; all FINCH
    # clusters are present.
    ids = nearest_centroid(X, probe.cluster_centers_.astype(np.float64), "cosine")
    assert np.mean(probe.labels_ == ids) > 0.9
    assert set(np.unique(probe.labels_)) == set(range(probe.n_clusters_))


def test_pickle_roundtrip(digits):
    X, y = digits
    probe = HNNEClusterProbe(k=10, device="cpu", random_state=0).fit(X, y)
    back = pickle.loads(pickle.dumps(probe))
    np.testing.assert_array_equal(back.predict(X), probe.predict(X))


# ----------------------------------------------------------------- errors


def test_k_outside_the_hierarchy_warns_and_uses_nearest_level(digits):
    X, _ = digits
    with pytest.warns(UserWarning, match="outside the range"):
        probe = HNNEClusterProbe(k=5000, device="cpu", random_state=0).fit(X)
    assert probe.level_ == 0
    with pytest.warns(UserWarning, match="outside the range"):
        probe = HNNEClusterProbe(k=1, device="cpu", random_state=0).fit(X)
    assert probe.level_ == len(probe.levels_) - 1


def test_bad_level_and_both_k_and_level(digits):
    X, _ = digits
    with pytest.raises(ValueError, match="level=40 does not exist"):
        HNNEClusterProbe(level=40, device="cpu").fit(X)
    with pytest.raises(ValueError, match="not both"):
        HNNEClusterProbe(k=3, level=1, device="cpu").fit(X)


def test_bad_labels(digits):
    X, y = digits
    with pytest.raises(ValueError, match="y must be 1-D"):
        HNNEClusterProbe(device="cpu").fit(X, y[:10])


@pytest.mark.gpu
def test_cuda_matches_cpu(feature_maps):
    X, y = feature_maps
    cpu = HNNEClusterProbe(k=4, device="cpu", random_state=0).fit(X, y)
    gpu = HNNEClusterProbe(k=4, device="cuda", random_state=0).fit(X, y)
    np.testing.assert_array_equal(gpu.labels_, cpu.labels_)
    np.testing.assert_allclose(
        gpu.cluster_centers_, cpu.cluster_centers_, rtol=1e-4, atol=1e-5
    )
    out = gpu.predict(torch.from_numpy(X).cuda(), size=y.shape[-2:])
    assert out.is_cuda
    np.testing.assert_array_equal(out.cpu().numpy(), cpu.predict(X, size=y.shape[-2:]))
    assert gpu.score(X, y) == pytest.approx(cpu.score(X, y))


def test_predict_proba_is_a_softmax_over_the_level_centroids():
    X = load_digits().data.astype(np.float32)[:300]
    y = load_digits().target[:300]
    probe = HNNEClusterProbe(k=10, device="cpu", random_state=0).fit(X)
    proba = probe.predict_proba(X)
    xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    z = xn @ probe.cluster_centers_.T.astype(np.float64) / 0.5
    z = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(proba, z / z.sum(axis=1, keepdims=True), atol=1e-4)
    assert np.array_equal(proba.argmax(axis=1), probe.predict(X))
    # fitted with labels: columns are classes (+ the unmatched clusters' mass)
    mapped = HNNEClusterProbe(k=10, device="cpu", random_state=0).fit(X, y)
    cols = mapped.predict_proba(X)
    np.testing.assert_allclose(cols.sum(axis=1), 1.0, rtol=1e-5)
    matched = mapped.mapping_ >= 0
    np.testing.assert_allclose(
        cols[:, mapped.mapping_[matched]], proba[:, matched], atol=1e-6
    )
