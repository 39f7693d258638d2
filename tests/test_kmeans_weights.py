"""``sample_weight`` in ``KMeansProbe.fit`` / ``partial_fit``.

Integer weights equal repeated tokens; from scikit-learn's centres, a weighted
fit equals ``KMeans(sample_weight=...)`` (Euclidean) and the weighted
spherical mean (cosine); routing passes the weights through ``Pipeline`` and
``GridSearchCV``.
"""

import numpy as np
import pytest
import sklearn
import torch
from sklearn.cluster import KMeans
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from skstego import KMeansProbe


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (4, 5))
    X = (centres[rng.integers(0, 4, 300)] + rng.normal(0, 1.5, (300, 5))).astype(
        np.float32
    )
    w = rng.integers(0, 4, 300)
    return X, w


def _probe(**kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("random_state", 0)
    kw.setdefault("max_samples", None)
    return KMeansProbe(**kw)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_integer_weights_equal_repeated_rows(data, metric):
    X, w = data
    init = X[[0, 50, 100, 150]]
    kw = dict(k=4, metric=metric, init=init, tol=1e-6)
    a = _probe(**kw).fit(X, sample_weight=w)
    b = _probe(**kw).fit(np.repeat(X, w, axis=0))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-5)
    np.testing.assert_allclose(a.counts_, b.counts_)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_array_equal(np.repeat(a.labels_, w), b.labels_)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_partial_fit_integer_weights_equal_repeated_rows(data, metric):
    X, w = data
    init = X[[0, 50, 100, 150]]
    kw = dict(k=4, metric=metric, init=init)
    a = _probe(**kw).partial_fit(X, sample_weight=w).partial_fit(X[:40], None)
    b = _probe(**kw).partial_fit(np.repeat(X, w, axis=0)).partial_fit(X[:40])
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    np.testing.assert_allclose(a.counts_, b.counts_)


@pytest.mark.parametrize("weights", ["int", "float"])
def test_equals_sklearn_kmeans(data, weights):
    X, w = data
    if weights == "float":
        w = np.random.default_rng(1).uniform(0.1, 3.0, len(X))
    ref0 = KMeans(4, n_init=1, random_state=0).fit(X, sample_weight=w)
    # start both from a rough start so that several iterations run
    init = ref0.cluster_centers_ + 2.0
    ref = KMeans(4, init=init, n_init=1, tol=0.0).fit(
        X.astype(np.float64), sample_weight=w
    )
    got = _probe(k=4, metric="euclidean", init=init, tol=0.0).fit(X, sample_weight=w)
    np.testing.assert_allclose(got.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    np.testing.assert_array_equal(got.labels_, ref.labels_)
    assert got.inertia_ == pytest.approx(ref.inertia_, rel=1e-5)
    assert got.n_iter_ == ref.n_iter_
    # score without y is -inertia, weighted like KMeans.score
    assert got.score(X, sample_weight=w) == pytest.approx(
        ref.score(X.astype(np.float64), sample_weight=w), rel=1e-4
    )


def test_cosine_is_weighted_spherical_mean(data):
    X, w = data
    w = w + 0.5
    probe = _probe(k=4, init=X[[0, 50, 100, 150]], tol=0.0).fit(X, sample_weight=w)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    for j in range(4):
        m = (w[probe.labels_ == j, None] * U[probe.labels_ == j]).sum(axis=0)
        np.testing.assert_allclose(
            probe.cluster_centers_[j], m / np.linalg.norm(m), atol=1e-5
        )
    expected = (w * ((U - probe.cluster_centers_[probe.labels_]) ** 2).sum(1)).sum()
    assert probe.inertia_ == pytest.approx(expected, rel=1e-4)


def test_zero_weights_equal_removed_rows(data):
    X, w = data
    keep = w > 0
    kw = dict(k=4, metric="euclidean", init=X[[0, 50, 100, 150]] + 0.1, tol=0.0)
    a = _probe(**kw).fit(X, sample_weight=keep.astype(float))
    b = _probe(**kw).fit(X[keep])
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)


@pytest.mark.parametrize("init", ["k-means++", "random"])
@pytest.mark.parametrize("algorithm", ["lloyd", "minibatch"])
def test_seeding_ignores_zero_weight_tokens(init, algorithm):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)).astype(np.float32)
    X[100:] += 1000.0  # far outliers with zero weight
    w = np.r_[np.ones(100), np.zeros(100)]
    probe = _probe(
        k=3, metric="euclidean", init=init, algorithm=algorithm, batch_size=32
    ).fit(X, sample_weight=w)
    assert np.abs(probe.cluster_centers_).max() < 10
    assert probe.counts_.sum() == pytest.approx(
        100 * (1 if algorithm == "lloyd" else probe.n_iter_)
    )


def test_maps_weights_per_image_and_per_pixel():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    w_img = np.array([1.0, 2.0, 0.5])
    w_pix = np.broadcast_to(w_img[:, None, None], (3, 5, 6))
    kw = dict(k=3, init=rng.normal(size=(3, 4)))
    a = _probe(**kw).fit(maps, sample_weight=w_img)
    b = _probe(**kw).fit(maps, sample_weight=w_pix)
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 4)
    c = _probe(**kw).fit(tokens, sample_weight=w_pix.reshape(-1))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-6)
    np.testing.assert_allclose(a.cluster_centers_, c.cluster_centers_, atol=1e-5)
    assert a.labels_.shape == (3, 5, 6)
    # subsampled fit: weights follow the sampled tokens
    d = _probe(k=3, max_samples=50).fit(maps, sample_weight=w_pix)
    assert d.labels_.shape == (3, 5, 6)


def test_torch_weights_and_ones_equal_none(data):
    X, _ = data
    # (k-means++ draws its first token by weight, so compare from one init)
    kw = dict(k=4, init=X[[0, 50, 100, 150]])
    a = _probe(**kw).fit(X)
    b = _probe(**kw).fit(X, sample_weight=torch.ones(len(X)))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)


def test_invalid_weights(data):
    X, _ = data
    probe = _probe(k=2)
    with pytest.raises(ValueError, match="sample_weight has shape"):
        probe.fit(X, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="Negative"):
        probe.fit(X, sample_weight=-np.ones(len(X)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        probe.fit(X, sample_weight=np.full(len(X), np.nan))
    with pytest.raises(ValueError, match="positive weights"):
        probe.fit(X, sample_weight=np.r_[1.0, np.zeros(len(X) - 1)])
    with pytest.raises(ValueError, match="sample_weight has shape"):
        probe.partial_fit(X, sample_weight=np.ones(5))
    with pytest.raises(ValueError, match="faiss"):
        _probe(k=2, backend="faiss").fit(X, sample_weight=np.ones(len(X)))


def test_dask_and_streamed_input_raise(data, tmp_path, monkeypatch):
    from skstego.probes import _kmeans

    X, w = data
    da = pytest.importorskip("dask.array")
    with pytest.raises(ValueError, match="in-memory"):
        _probe(k=2).fit(da.from_array(X, chunks=100), sample_weight=w)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, X.shape)
    mm[:] = X
    mm.flush()
    kw = dict(k=4, metric="euclidean", init=X[[0, 50, 100, 150]])
    # on-disk tokens that fit in memory are gathered, so they take weights
    a = _probe(**kw).fit(mm, sample_weight=w + 1)
    b = _probe(**kw).fit(X, sample_weight=w + 1)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    # streamed Lloyd passes (on-disk tokens too large to gather) do not
    monkeypatch.setattr(_kmeans, "fits_in_memory", lambda nbytes, device: False)
    with pytest.raises(ValueError, match="in-memory"):
        _probe(k=2, max_samples=None).fit(mm, sample_weight=w)
    # gathered on-disk tokens take weights
    a = _probe(max_samples=100, **kw).fit(mm, sample_weight=w + 1)
    b = _probe(max_samples=100, **kw).fit(X, sample_weight=w + 1)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    c = _probe(algorithm="minibatch", batch_size=64, **kw).fit(mm, sample_weight=w)
    d = _probe(algorithm="minibatch", batch_size=64, **kw).fit(X, sample_weight=w)
    np.testing.assert_allclose(c.cluster_centers_, d.cluster_centers_, atol=1e-5)
    assert c.inertia_ == pytest.approx(d.inertia_, rel=1e-5)


def test_routing_pipeline_and_gridsearch(data):
    X, w = data
    init = X[[0, 50, 100, 150]]
    with sklearn.config_context(enable_metadata_routing=True):
        probe = _probe(k=4, metric="euclidean", init=init).set_fit_request(
            sample_weight=True
        )
        pipe = Pipeline([("probe", probe)]).fit(X, sample_weight=w)
        ref = _probe(k=4, metric="euclidean", init=init).fit(X, sample_weight=w)
        np.testing.assert_allclose(
            pipe[-1].cluster_centers_, ref.cluster_centers_, atol=1e-6
        )
        grid = GridSearchCV(
            _probe(k=4, metric="euclidean")
            .set_fit_request(sample_weight=True)
            .set_score_request(sample_weight=True),
            {"k": [2, 4]},
            cv=3,
        ).fit(X, sample_weight=w)
        assert grid.best_params_["k"] == 4
