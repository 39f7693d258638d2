"""KMeansProbe: numerics against independent references, layouts, API contract."""

import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _references import hungarian_scores, numpy_lloyd
from scipy.spatial.distance import cdist
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score

from skstego import KMeansProbe
from skstego.metrics import miou_scorer


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def maps():
    """Small feature maps with a coarse structure, and their label maps."""
    rng = np.random.default_rng(0)
    n, c, h, w = 4, 6, 5, 7
    centers = rng.normal(scale=3.0, size=(3, c))
    y = rng.integers(0, 3, size=(n, h, w))
    X = centers[y].transpose(0, 3, 1, 2) + rng.normal(size=(n, c, h, w))
    return X.astype(np.float32), y


# ----------------------------------------------------------------- numerics


def test_euclidean_matches_sklearn_kmeans(digits):
    X, _ = digits
    probe = KMeansProbe(
        k=10, metric="euclidean", n_init=3, random_state=0, device="cpu"
    ).fit(X)
    km = KMeans(n_clusters=10, n_init=3, random_state=0).fit(X)
    assert probe.inertia_ == pytest.approx(km.inertia_, rel=0.01)
    assert adjusted_rand_score(km.labels_, probe.labels_) > 0.8
    assert probe.cluster_centers_.dtype == np.float32
    assert probe.labels_.dtype == np.int64


def test_euclidean_lloyd_equals_sklearn_from_same_init(digits):
    X, _ = digits
    init = X[::180][:10]
    probe = KMeansProbe(k=10, metric="euclidean", init=init, device="cpu").fit(X)
    km = KMeans(n_clusters=10, init=init, n_init=1, algorithm="lloyd").fit(X)
    np.testing.assert_array_equal(probe.labels_, km.labels_)
    np.testing.assert_allclose(probe.cluster_centers_, km.cluster_centers_, atol=1e-3)
    assert probe.inertia_ == pytest.approx(km.inertia_, rel=1e-4)
    assert probe.n_iter_ == km.n_iter_
    np.testing.assert_allclose(probe.transform(X), km.transform(X), atol=1e-3)


def test_kmeans_plusplus_quality_like_sklearn(digits):
    X, _ = digits
    ours = [
        KMeansProbe(k=10, metric="euclidean", max_iter=1, random_state=s).fit(X)
        for s in range(4)
    ]
    theirs = [KMeans(10, n_init=1, max_iter=1, random_state=s).fit(X) for s in range(4)]
    mean_ours = np.mean([p.inertia_ for p in ours])
    mean_theirs = np.mean([km.inertia_ for km in theirs])
    assert mean_ours == pytest.approx(mean_theirs, rel=0.05)


def test_spherical_matches_numpy_reference(digits):
    X, _ = digits
    X = X + 0.5  # no all-zero rows
    init = X[::180][:10]
    probe = KMeansProbe(k=10, init=init, max_iter=5, tol=0, device="cpu").fit(X)
    ref = numpy_lloyd(X, init, 5, spherical=True)
    np.testing.assert_allclose(probe.cluster_centers_, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(probe.cluster_centers_, axis=1), 1.0)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = Xn @ probe.cluster_centers_.T
    np.testing.assert_array_equal(probe.labels_, sim.argmax(axis=1))
    np.testing.assert_allclose(probe.transform(X), sim, atol=1e-5)
    expected = np.sum(2 - 2 * sim.max(axis=1))
    assert probe.inertia_ == pytest.approx(expected, rel=1e-4)


def test_spherical_close_to_kmeans_on_normalised_data(digits):
    X, _ = digits
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    probe = KMeansProbe(k=10, n_init=3, random_state=0).fit(X)
    km = KMeans(10, n_init=3, random_state=0).fit(Xn)
    assert adjusted_rand_score(km.labels_, probe.labels_) > 0.7


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_torch_and_faiss_backends_agree(digits, metric):
    pytest.importorskip("faiss")
    X, _ = digits
    kw = dict(k=10, metric=metric, max_iter=30, tol=0, random_state=0)
    a = KMeansProbe(backend="torch", **kw).fit(X)
    b = KMeansProbe(backend="faiss", **kw).fit(X)
    assert b.inertia_ == pytest.approx(a.inertia_, rel=0.01)
    assert b.n_iter_ == 30
    assert adjusted_rand_score(a.labels_, b.labels_) > 0.8


def test_n_init_keeps_best(digits):
    X, _ = digits
    one = KMeansProbe(k=10, metric="euclidean", random_state=3).fit(X)
    five = KMeansProbe(k=10, metric="euclidean", n_init=5, random_state=3).fit(X)
    assert five.inertia_ <= one.inertia_


def test_empty_cluster_is_reseeded():
    rng = np.random.default_rng(0)
    X = np.concatenate(
        [rng.normal(0, 0.1, (30, 2)), rng.normal(5, 0.1, (30, 2)), [[20.0, 20.0]]]
    ).astype(np.float32)
    # The third centroid is far from everything: empty after the first E-step.
    init = np.array([[0.0, 0.0], [5.0, 5.0], [-100.0, -100.0]], dtype=np.float32)
    probe = KMeansProbe(k=3, metric="euclidean", init=init).fit(X)
    assert np.bincount(probe.labels_, minlength=3).min() >= 1
    # The farthest point (the outlier) became its own cluster.
    assert np.bincount(probe.labels_)[probe.labels_[-1]] == 1
    np.testing.assert_allclose(probe.cluster_centers_[probe.labels_[-1]], [20, 20])


def test_max_samples_fits_on_subsample_and_labels_all(digits):
    X, _ = digits
    probe = KMeansProbe(k=10, metric="euclidean", max_samples=300, random_state=0).fit(
        X
    )
    assert probe.labels_.shape == (X.shape[0],)
    d = cdist(X, probe.cluster_centers_, "sqeuclidean")
    np.testing.assert_array_equal(probe.labels_, d.argmin(axis=1))
    assert probe.inertia_ == pytest.approx(d.min(axis=1).sum(), rel=1e-4)
    again = KMeansProbe(k=10, metric="euclidean", max_samples=300, random_state=0).fit(
        X
    )
    np.testing.assert_array_equal(probe.cluster_centers_, again.cluster_centers_)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_onehot_update_equals_index_add(digits, metric, monkeypatch):
    """The GPU centroid update (one-hot GEMM), checked on the CPU."""
    import skstego.probes._kmeans_kernels as kernels_module

    X, _ = digits
    kw = dict(k=10, metric=metric, max_iter=10, tol=0, backend="torch", random_state=0)
    a = KMeansProbe(**kw).fit(X)
    monkeypatch.setattr(kernels_module, "_use_onehot_update", lambda device: True)
    b = KMeansProbe(**kw).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-4)


# ------------------------------------------------------------ Hungarian, score


def test_score_equals_independent_hungarian(digits):
    X, y = digits
    probe = KMeansProbe(k=12, metric="euclidean", random_state=0).fit(X)
    miou, acc, mapping = hungarian_scores(y, probe.labels_, 10, 12)
    assert probe.score(X, y) == pytest.approx(miou)
    assert probe.score(X, y, metric="accuracy") == pytest.approx(acc)
    report = probe.score_report(X, y)
    np.testing.assert_array_equal(report["mapping"], mapping)
    assert report["confusion"].shape == (10, 12)
    assert miou_scorer(probe, X, y) == pytest.approx(miou)


def test_fit_with_labels_maps_clusters_to_classes(digits):
    X, y = digits
    probe = KMeansProbe(k=12, metric="euclidean", random_state=0).fit(X, y)
    _, acc, mapping = hungarian_scores(y, probe.labels_, 10, 12)
    np.testing.assert_array_equal(probe.mapping_, mapping)
    assert probe.n_classes_ == 10
    assert (probe.mapping_ == -1).sum() == 2  # k > n_classes: unmatched clusters
    pred = probe.predict(X)
    np.testing.assert_array_equal(pred, mapping[probe.labels_])
    assert np.mean(pred == y) == pytest.approx(acc)
    np.testing.assert_array_equal(probe.fit_predict(X, y), pred)
    unfit = KMeansProbe(k=12, metric="euclidean", random_state=0)
    np.testing.assert_array_equal(unfit.fit_predict(X), probe.labels_)


def test_ignore_label_is_left_out(digits):
    X, y = digits
    y = y.copy()
    y[::3] = -1
    probe = KMeansProbe(k=10, metric="euclidean", random_state=0).fit(X)
    miou, acc, _ = hungarian_scores(y, probe.labels_, 10, 10)
    assert probe.score(X, y) == pytest.approx(miou)
    assert probe.score(X, y, metric="accuracy") == pytest.approx(acc)


# ------------------------------------------------------------------- layouts


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_maps_equal_tokens(maps, metric):
    X, y = maps
    n, c, h, w = X.shape
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, c)
    a = KMeansProbe(k=3, metric=metric, random_state=0).fit(X, y)
    b = KMeansProbe(k=3, metric=metric, random_state=0).fit(tokens, y.ravel())
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-6)
    assert a.labels_.shape == (n, h, w)
    np.testing.assert_array_equal(a.labels_.ravel(), b.labels_)
    np.testing.assert_array_equal(a.mapping_, b.mapping_)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-5)
    np.testing.assert_array_equal(a.predict(X).ravel(), b.predict(tokens))
    t = a.transform(X)
    assert t.shape == (n, 3, h, w)
    np.testing.assert_allclose(
        t.transpose(0, 2, 3, 1).reshape(-1, 3), b.transform(tokens), atol=1e-5
    )
    assert a.score(X, y) == pytest.approx(b.score(tokens, y.ravel()))
    assert a.score(X, y) > 0.9


def test_subsampled_maps_equal_subsampled_tokens(maps):
    X, _ = maps
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, X.shape[1])
    kw = dict(k=3, max_samples=60, random_state=0)
    a = KMeansProbe(**kw).fit(X)
    b = KMeansProbe(**kw).fit(tokens)
    c = KMeansProbe(**kw).fit(torch.from_numpy(X))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-6)
    np.testing.assert_allclose(c.cluster_centers_, b.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(a.labels_.ravel(), b.labels_)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-5)


def test_label_maps_of_another_size(maps):
    X, y = maps
    n, _, h, w = X.shape
    H, W = 3 * h, 3 * w
    y_big = y.repeat(3, axis=1).repeat(3, axis=2)
    y_big[:, 0, 0] = -1
    probe = KMeansProbe(k=4, random_state=0).fit(X)
    # Independent: bilinear upsampling of the similarities, then argmax.
    sim = torch.from_numpy(probe.transform(X))
    up = F.interpolate(sim, size=(H, W), mode="bilinear", align_corners=False)
    pred = up.argmax(dim=1).numpy()
    miou, acc, mapping = hungarian_scores(y_big, pred, 3, 4)
    assert probe.score(X, y_big) == pytest.approx(miou)
    assert probe.score(X, y_big, metric="accuracy") == pytest.approx(acc)
    np.testing.assert_array_equal(probe.predict(X, size=(H, W)), pred)
    fitted = KMeansProbe(k=4, random_state=0).fit(X, y_big)
    np.testing.assert_array_equal(fitted.mapping_, mapping)
    np.testing.assert_array_equal(fitted.predict(X, size=(H, W)), mapping[pred])
    assert fitted.predict(X).shape == (n, h, w)


# ----------------------------------------------------------------- contract


def test_deterministic_per_random_state(digits):
    X, _ = digits
    a = KMeansProbe(k=10, random_state=7).fit(X)
    b = KMeansProbe(k=10, random_state=7).fit(X)
    c = KMeansProbe(k=10, random_state=8).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)
    rs = np.random.RandomState(0)
    KMeansProbe(k=10, random_state=rs).fit(X)
    KMeansProbe(k=10, random_state=None).fit(X)


def test_output_type_follows_input(maps):
    X, y = maps
    Xt = torch.from_numpy(X)
    probe = KMeansProbe(k=3, random_state=0, device="cpu").fit(Xt, torch.from_numpy(y))
    assert isinstance(probe.cluster_centers_, np.ndarray)
    assert isinstance(probe.labels_, np.ndarray)
    assert isinstance(probe.mapping_, np.ndarray)
    assert isinstance(probe.predict(X), np.ndarray)
    pred = probe.predict(Xt)
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.int64
    np.testing.assert_array_equal(pred.numpy(), probe.predict(X))
    tr = probe.transform(Xt)
    assert isinstance(tr, torch.Tensor) and tr.dtype == torch.float32
    assert probe.transform(X.astype(np.float64)).dtype == np.float32
    fp = KMeansProbe(k=3, random_state=0).fit_predict(Xt)
    assert isinstance(fp, torch.Tensor)
    np.testing.assert_array_equal(fp.numpy(), probe.labels_)
    grad = Xt.clone().requires_grad_(True)
    fitted = KMeansProbe(k=3, random_state=0).fit(grad)
    np.testing.assert_array_equal(fitted.labels_, probe.labels_)
    assert not fitted.transform(grad).requires_grad


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_input_not_modified(maps, metric):
    X, y = maps
    Xt = torch.from_numpy(X.copy())
    for data in (X, Xt, X.astype(np.float64)):
        before = data.clone() if isinstance(data, torch.Tensor) else data.copy()
        y_before = y.copy()
        probe = KMeansProbe(k=3, metric=metric, max_samples=50, random_state=0)
        probe.fit(data, y)
        probe.predict(data, size=(10, 14))
        probe.transform(data)
        probe.score(data, y)
        if isinstance(data, torch.Tensor):
            assert torch.equal(data, before)
        else:
            np.testing.assert_array_equal(data, before)
        np.testing.assert_array_equal(y, y_before)


def test_pickle_and_clone(digits):
    X, y = digits
    probe = KMeansProbe(k=10, random_state=0).fit(X, y)
    probe.predict(X)  # fills the device cache
    restored = pickle.loads(pickle.dumps(probe))
    assert b"torch" not in pickle.dumps(probe)  # no device state in the pickle
    np.testing.assert_array_equal(restored.predict(X), probe.predict(X))
    np.testing.assert_array_equal(restored.cluster_centers_, probe.cluster_centers_)
    fresh = clone(probe)
    assert fresh.get_params() == probe.get_params()
    assert not hasattr(fresh, "cluster_centers_")


def test_feature_names_out(digits):
    X, _ = digits
    probe = KMeansProbe(k=3, random_state=0).fit(X)
    assert list(probe.get_feature_names_out()) == [
        "kmeansprobe0",
        "kmeansprobe1",
        "kmeansprobe2",
    ]


def test_verbose_shows_progress(digits, capsys):
    X, _ = digits
    KMeansProbe(k=5, max_iter=3, tol=0, verbose=True, random_state=0).fit(X)
    assert "k-means run 1/1" in capsys.readouterr().err


def test_missing_faiss_is_a_clear_error(digits, monkeypatch):
    X, _ = digits
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="faiss"):
        KMeansProbe(k=3, backend="faiss").fit(X)
    KMeansProbe(k=3, backend="auto", random_state=0).fit(X)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cuda_matches_cpu(maps, metric):
    X, y = maps
    Xt = torch.from_numpy(X)
    init = X.transpose(0, 2, 3, 1).reshape(-1, X.shape[1])[::37][:3]
    kw = dict(k=3, metric=metric, init=init, max_iter=20)
    cpu = KMeansProbe(device="cpu", **kw).fit(X, y)
    gpu = KMeansProbe(device="cuda", **kw).fit(Xt, torch.from_numpy(y))
    # Same start, but CUDA sums in another order: a token almost equidistant
    # from two centroids may go either way (then the centroids move by about
    # a token over a cluster size), so compare labels by agreement and ARI.
    assert np.mean(gpu.labels_ == cpu.labels_) >= 0.98
    assert adjusted_rand_score(cpu.labels_.ravel(), gpu.labels_.ravel()) > 0.95
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=1e-3)
    if np.array_equal(gpu.labels_, cpu.labels_):
        np.testing.assert_allclose(
            gpu.cluster_centers_, cpu.cluster_centers_, atol=1e-4
        )
    pred = gpu.predict(Xt, size=(10, 14))
    assert pred.is_cuda
    assert np.mean(pred.cpu().numpy() == cpu.predict(X, size=(10, 14))) >= 0.98
    assert gpu.transform(Xt).is_cuda
    assert gpu.score(Xt, torch.from_numpy(y)) == pytest.approx(
        cpu.score(X, y), abs=0.02
    )
    sub = KMeansProbe(k=3, metric=metric, device="cuda", max_samples=60).fit(Xt)
    assert sub.labels_.shape == y.shape
    restored = pickle.loads(pickle.dumps(gpu))
    np.testing.assert_array_equal(restored.predict(X), gpu.predict(X))


@pytest.mark.gpu
def test_cuda_faiss_backend(digits):
    pytest.importorskip("faiss")
    X, _ = digits
    kw = dict(k=10, metric="euclidean", max_iter=30, tol=0, random_state=0)
    a = KMeansProbe(backend="torch", device="cuda", **kw).fit(X)
    b = KMeansProbe(backend="faiss", device="cuda", **kw).fit(X)
    assert b.inertia_ == pytest.approx(a.inertia_, rel=0.01)


# ---------------------------------------------------------------- bad input


def test_bad_input_errors(digits, maps):
    X, y = digits
    with pytest.raises(ValueError, match="n_samples=5"):
        KMeansProbe(k=6).fit(X[:5])
    with pytest.raises(ValueError, match="n_samples=4"):
        KMeansProbe(k=6, max_samples=4).fit(X)
    X_nan = X.copy()
    X_nan[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        KMeansProbe(k=3).fit(X_nan)
    t_nan = torch.from_numpy(X_nan)
    with pytest.raises(ValueError, match="NaN"):
        KMeansProbe(k=3).fit(t_nan)
    with pytest.raises(ValueError, match="4-D maps"):
        KMeansProbe(k=3).fit(np.zeros((4, 3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        KMeansProbe(k=3).fit(X, y[:-1])
    Xm, ym = maps
    with pytest.raises(ValueError, match="label maps"):
        KMeansProbe(k=3).fit(Xm, ym[:, 0])
    with pytest.raises(ValueError, match="no valid label"):
        KMeansProbe(k=3).fit(X, np.full(len(X), -1))
    with pytest.raises(ValueError, match="integer labels"):
        KMeansProbe(k=3).fit(X, y + 0.5)
    with pytest.raises(ValueError, match="init has shape"):
        KMeansProbe(k=3, init=np.zeros((2, 64))).fit(X)
    with pytest.raises(ValueError, match="metric"):
        KMeansProbe(k=3, metric="manhattan").fit(X)
    probe = KMeansProbe(k=3, random_state=0).fit(X)
    with pytest.raises(ValueError, match="size only applies"):
        probe.predict(X, size=(4, 4))
    with pytest.raises(ValueError, match="metric"):
        probe.score(X, y, metric="f1")
    with pytest.raises(ValueError, match="features"):
        probe.predict(X[:, :10])


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_predict_proba_is_a_softmax_over_centroids(metric):
    X = load_digits().data.astype(np.float32)[:300]
    probe = KMeansProbe(k=6, metric=metric, device="cpu", random_state=0).fit(X)
    proba = probe.predict_proba(X)
    c = probe.cluster_centers_.astype(np.float64)
    if metric == "cosine":
        xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        scores = xn @ c.T / 0.5  # the reference's factor 2
    else:
        scores = -cdist(X, c, "sqeuclidean") / 0.5
    np.testing.assert_allclose(proba, _softmax(scores), atol=1e-4)
    assert np.array_equal(proba.argmax(axis=1), probe.predict(X))
    soft = clone(probe).set_params(temperature=1e3).fit(X).predict_proba(X)
    assert soft.max(axis=1).mean() < proba.max(axis=1).mean()
    assert np.array_equal(soft.argmax(axis=1), probe.predict(X))


def test_predict_proba_maps_through_the_hungarian_assignment():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, size=400)
    X = (centers[y] + rng.normal(size=(400, 8))).astype(np.float32)
    # k = classes: every cluster matched, columns are classes
    probe = KMeansProbe(k=3, device="cpu", random_state=0).fit(X, y)
    proba = probe.predict_proba(X)
    cluster = clone(probe).fit(X).predict_proba(X)
    assert proba.shape == (400, 3)
    np.testing.assert_allclose(proba[:, probe.mapping_], cluster, atol=1e-6)
    assert np.array_equal(proba.argmax(axis=1), probe.predict(X))
    # k > classes: the unmatched clusters' mass gets a last column
    probe5 = KMeansProbe(k=5, device="cpu", random_state=0).fit(X, y)
    proba5 = probe5.predict_proba(X)
    assert proba5.shape == (400, 4)
    np.testing.assert_allclose(proba5.sum(axis=1), 1.0, rtol=1e-5)
    raw = clone(probe5).fit(X).predict_proba(X)
    unmatched = probe5.mapping_ < 0
    np.testing.assert_allclose(proba5[:, 3], raw[:, unmatched].sum(axis=1), atol=1e-6)


def test_predict_proba_on_maps_upsamples_like_predict():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(4, 5, 6, 6)).astype(np.float32)
    probe = KMeansProbe(k=3, device="cpu", random_state=0).fit(maps)
    proba = probe.predict_proba(maps, size=(12, 12))
    assert proba.shape == (4, 3, 12, 12)
    assert np.array_equal(proba.argmax(axis=1), probe.predict(maps, size=(12, 12)))
    small = probe.predict_proba(maps)
    sims = torch.from_numpy(probe.transform(maps))
    up = F.interpolate(sims, size=(12, 12), mode="bilinear")
    np.testing.assert_allclose(proba, torch.softmax(up / 0.5, dim=1).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        small, torch.softmax(sims / 0.5, dim=1).numpy(), atol=1e-5
    )
    out = probe.predict_proba(torch.from_numpy(maps))
    assert isinstance(out, torch.Tensor) and out.shape == (4, 3, 6, 6)


# ------------------------------------------------------------ inertia curve


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_inertia_curve_follows_the_lloyd_iterations(digits, metric):
    X, _ = digits
    X = X + 0.5  # no all-zero rows
    init = X[::180][:10]
    probe = KMeansProbe(k=10, metric=metric, init=init, device="cpu").fit(X)
    curve = probe.inertia_curve_
    assert curve.shape == (probe.n_iter_,) and curve.dtype == np.float64
    # non-increasing (Lloyd never increases the inertia), ends at inertia_
    assert np.all(np.diff(curve) <= 1e-6 * curve[0])
    assert curve[-1] == pytest.approx(probe.inertia_, rel=1e-6)
    # entry i: the inertia of a textbook Lloyd loop's centroids after i + 1 steps
    spherical = metric == "cosine"
    Xr = X / np.linalg.norm(X, axis=1, keepdims=True) if spherical else X
    for i in (0, 1, len(curve) // 2):
        C = numpy_lloyd(X, init, i + 1, spherical=spherical)
        expected = cdist(np.asarray(Xr, np.float64), C, "sqeuclidean").min(1).sum()
        assert curve[i] == pytest.approx(expected, rel=1e-4)


def test_inertia_curve_of_the_faiss_backend(digits):
    pytest.importorskip("faiss")
    X, _ = digits
    for metric in ("euclidean", "cosine"):
        probe = KMeansProbe(
            k=10, metric=metric, backend="faiss", max_iter=8, random_state=0
        ).fit(X + 0.5)
        curve = probe.inertia_curve_
        assert curve.shape == (8,) and np.isfinite(curve).all()
        assert np.all(np.diff(curve) <= 1e-4 * curve[0])
        assert curve[-1] == pytest.approx(probe.inertia_, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cuda_inertia_curve_matches_cpu(maps, metric):
    X, _ = maps
    init = X.transpose(0, 2, 3, 1).reshape(-1, X.shape[1])[::37][:3]
    kw = dict(k=3, metric=metric, init=init, max_iter=20)
    cpu = KMeansProbe(device="cpu", **kw).fit(X)
    gpu = KMeansProbe(device="cuda", **kw).fit(torch.from_numpy(X))
    assert isinstance(gpu.inertia_curve_, np.ndarray)
    # a near-tie labelled the other way changes the curve slightly
    # (see test_cuda_matches_cpu), and may change the iteration count
    m = min(len(gpu.inertia_curve_), len(cpu.inertia_curve_))
    np.testing.assert_allclose(
        gpu.inertia_curve_[:m], cpu.inertia_curve_[:m], rtol=1e-3
    )
    assert gpu.inertia_curve_[-1] == pytest.approx(gpu.inertia_, rel=1e-6)


# ------------------------------------------- reduced precision, devices, faiss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_init_is_accepted(digits, dtype):
    X, _ = digits
    init = torch.from_numpy(X[:5]).to(dtype)
    want = init.float().numpy()  # the same values, exactly, in float32
    kw = dict(k=5, metric="euclidean", device="cpu", max_iter=10)
    a = KMeansProbe(init=init, **kw).fit(X)
    b = KMeansProbe(init=want, **kw).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    a = KMeansProbe(init=init, algorithm="minibatch", **kw).fit(X)
    b = KMeansProbe(init=want, algorithm="minibatch", **kw).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    a = KMeansProbe(init=init, **kw).partial_fit(X[:100])
    b = KMeansProbe(init=want, **kw).partial_fit(X[:100])
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    probe = KMeansProbe.from_centroids(init, metric="euclidean", device="cpu")
    np.testing.assert_array_equal(probe.cluster_centers_, want)
    assert probe.cluster_centers_.dtype == np.float32
    # half-precision input too, computed in float32
    Xh = torch.from_numpy(X).to(dtype)
    c = KMeansProbe(init=init, **kw).fit(Xh)
    d = KMeansProbe(init=want, **kw).fit(Xh.float())
    np.testing.assert_array_equal(c.cluster_centers_, d.cluster_centers_)


def test_counts_match_bincount():
    from skstego.probes._kmeans_kernels import _counts

    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 7, 1000))
    for dtype in (torch.int64, torch.float64):
        got = _counts(labels, 9, dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(
            got.numpy(), np.bincount(labels.numpy(), minlength=9)
        )


def test_auto_backend_is_torch_on_cuda(digits, monkeypatch):
    # fit resolves the device, then the backend: emulate a CUDA device and
    # stop right after the choice (nothing can run on a fake GPU)
    from skstego.probes import _kmeans

    X, _ = digits
    chosen = []

    class Chosen(Exception):
        pass

    def spy(backend, device):
        chosen.append((backend, device, _kmeans_choose(backend, device)))
        raise Chosen

    _kmeans_choose = _kmeans._choose_backend
    cuda1 = torch.device("cuda:1")
    monkeypatch.setattr(KMeansProbe, "_resolved_device", lambda self: cuda1)
    monkeypatch.setattr(_kmeans, "_choose_backend", spy)
    for backend in ("auto", "torch", "faiss"):
        with pytest.raises(Chosen):
            KMeansProbe(k=3, backend=backend, device="cuda:1").fit(X)
    assert chosen == [
        ("auto", torch.device("cuda:1"), "torch"),
        ("torch", torch.device("cuda:1"), "torch"),
        ("faiss", torch.device("cuda:1"), "faiss"),
    ]
    # on the CPU: scikit-learn's compiled Lloyd kernel; "sklearn" is CPU-only
    assert _kmeans_choose("auto", torch.device("cpu")) == "sklearn"
    with pytest.raises(ValueError, match="CPU"):
        _kmeans_choose("sklearn", cuda1)


def test_auto_backend_is_torch_without_the_compiled_kernel(digits, monkeypatch):
    from skstego.probes import _kmeans

    monkeypatch.setattr(_kmeans, "compiled_lloyd_available", lambda: False)
    assert _kmeans._choose_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ImportError, match="backend='torch'"):
        KMeansProbe(k=3, backend="sklearn", device="cpu").fit(digits[0])


class _FakeGpuFaiss:
    """The parts of faiss's GPU API that _faiss_index calls, recorded; the
    indexes stay faiss's CPU ones, so the clustering runs for real."""

    def __init__(self, faiss, n_gpus):
        self._faiss = faiss
        self.n_gpus = n_gpus
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._faiss, name)

    def get_num_gpus(self):
        return self.n_gpus

    def StandardGpuResources(self):  # faiss's name
        calls = self.calls

        class Resources:
            def setTempMemory(self, n):
                calls.append(("setTempMemory", n))

        return Resources()

    def index_cpu_to_gpu(self, res, device, index):
        self.calls.append(("index_cpu_to_gpu", device))
        return index

    def index_cpu_to_all_gpus(self, *args, **kwargs):  # pragma: no cover
        raise AssertionError("faiss must not spread over every GPU")


@pytest.mark.parametrize("cosine", [False, True])
def test_faiss_index_on_the_estimators_gpu_with_bounded_memory(cosine):
    faiss = pytest.importorskip("faiss")
    from skstego.probes._kmeans import _FAISS_GPU_TEMP_BYTES, _faiss_index

    fake = _FakeGpuFaiss(faiss, n_gpus=2)
    index, res = _faiss_index(fake, 8, cosine, torch.device("cuda:1"))
    assert fake.calls == [
        ("setTempMemory", _FAISS_GPU_TEMP_BYTES),
        ("index_cpu_to_gpu", 1),
    ]
    assert _FAISS_GPU_TEMP_BYTES <= 512 * 2**20
    assert isinstance(index, faiss.IndexFlatIP if cosine else faiss.IndexFlatL2)
    assert res is not None
    # the CPU, or a faiss without GPUs: a CPU index, no GPU call
    for device, n_gpus in ((torch.device("cpu"), 2), (torch.device("cuda:0"), 0)):
        fake = _FakeGpuFaiss(faiss, n_gpus=n_gpus)
        index, res = _faiss_index(fake, 8, cosine, device)
        assert fake.calls == [] and res is None


def test_faiss_backend_uses_faiss_index(digits, monkeypatch):
    # the faiss backend trains through _faiss_index (which places the index)
    faiss = pytest.importorskip("faiss")
    from skstego.probes import _kmeans

    X, _ = digits
    placed = []
    real = _kmeans._faiss_index

    def spy(faiss_module, d, cosine, device):
        placed.append((d, cosine, device))
        return real(faiss_module, d, cosine, device)

    monkeypatch.setattr(_kmeans, "_faiss_index", spy)
    probe = KMeansProbe(
        k=4,
        backend="faiss",
        metric="euclidean",
        device="cpu",
        max_iter=5,
        random_state=0,
    ).fit(X)
    assert placed == [(64, False, torch.device("cpu"))]
    assert faiss.get_num_gpus() >= 0 and probe.n_iter_ == 5


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_huge_values_do_not_overflow(scale):
    # issue 18: float32 squared norms overflowed at 1e19 -> one cluster
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(5, 1, (50, 4)), rng.normal(-5, 1, (50, 4))])
    X = X.astype(np.float32)
    ref = KMeans(2, n_init=1, random_state=0).fit(X.astype(np.float64))
    probe = KMeansProbe(k=2, metric="euclidean", device="cpu", random_state=0)
    probe.fit(X * np.float32(scale))
    assert adjusted_rand_score(ref.labels_, probe.labels_) == 1.0
    assert adjusted_rand_score(ref.labels_, probe.predict(X * np.float32(scale))) == 1
    assert probe.inertia_ / scale**2 == pytest.approx(ref.inertia_, rel=1e-4)
    assert -probe.score(X * np.float32(scale)) / scale**2 == pytest.approx(
        ref.inertia_, rel=1e-4
    )


def test_degenerate_input_warns_like_sklearn():
    from sklearn.exceptions import ConvergenceWarning

    X = np.ones((10, 2), dtype=np.float32)
    with pytest.warns(ConvergenceWarning, match="distinct clusters"):
        KMeans(3, n_init=1).fit(X)
    for kw in ({}, {"algorithm": "minibatch"}):
        with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(1\)"):
            KMeansProbe(k=3, metric="euclidean", device="cpu", **kw).fit(X)


def _two_blobs(seed=1):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(5, 1, (60, 4)), rng.normal(-5, 1, (60, 4))])
    return X.astype(np.float32)


def _fit_by(path, X, tmp_path, **kw):
    """A Euclidean KMeansProbe fitted on ``X`` along one of its code paths."""
    kw = dict(k=kw.pop("k", 2), metric="euclidean", device="cpu", random_state=0, **kw)
    if path == "lloyd":
        return KMeansProbe(**kw).fit(X)
    if path == "minibatch":
        return KMeansProbe(algorithm="minibatch", batch_size=32, **kw).fit(X)
    if path == "partial_fit":
        probe = KMeansProbe(**kw)
        for batch in np.array_split(X[np.random.default_rng(2).permutation(len(X))], 3):
            probe.partial_fit(batch)
        return probe
    if path == "streamed":  # exact Lloyd passes over an on-disk memmap
        np.save(tmp_path / "x.npy", X)
        on_disk = np.load(tmp_path / "x.npy", mmap_mode="r")
        return KMeansProbe(max_samples=None, **kw).fit(on_disk)
    if path == "dask":  # exact Lloyd passes over dask blocks
        da = pytest.importorskip("dask.array")
        return KMeansProbe(**kw).fit(da.from_array(X, chunks=50))
    raise AssertionError(path)


PATHS = ["lloyd", "minibatch", "partial_fit", "streamed", "dask"]


@pytest.mark.parametrize("path", PATHS)
def test_huge_values_in_every_path(tmp_path, path):
    # values >= 1e19 overflow float32 squared norms; every path rescales by
    # a power of two, so the partition is scikit-learn's float64 one
    X = _two_blobs()
    ref = KMeans(2, n_init=1, random_state=0).fit(X.astype(np.float64))
    scale = np.float32(1e20)
    probe = _fit_by(path, X * scale, tmp_path)
    assert adjusted_rand_score(ref.labels_, probe.predict(X * scale)) == 1.0
    np.testing.assert_allclose(
        np.sort(probe.cluster_centers_ / scale, axis=0),
        np.sort(ref.cluster_centers_, axis=0),
        rtol=1e-4,
    )
    if path != "partial_fit":  # its labels_ are those of the last batch
        assert adjusted_rand_score(ref.labels_, probe.labels_.ravel()) == 1.0
        assert probe.inertia_ / float(scale) ** 2 == pytest.approx(
            ref.inertia_, rel=1e-4
        )


@pytest.mark.parametrize("path", PATHS)
def test_degenerate_input_warns_in_every_path(tmp_path, path):
    from sklearn.exceptions import ConvergenceWarning

    X = np.repeat(np.eye(2, dtype=np.float32), 15, axis=0)  # 2 distinct points
    with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(2\)"):
        KMeans(3, n_init=1, random_state=0).fit(X)
    with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(2\)"):
        _fit_by(path, X, tmp_path, k=3)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_init_is_checked_alike_by_fit_and_partial_fit(method):
    X = _two_blobs()
    bad = np.zeros((2, 4), dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="init contains NaN or infinity"):
        getattr(KMeansProbe(k=2, init=bad, device="cpu"), method)(X)
    with pytest.raises(ValueError, match=r"init has shape \(2, 3\)"):
        getattr(KMeansProbe(k=2, init=bad[:, :3], device="cpu"), method)(X)
