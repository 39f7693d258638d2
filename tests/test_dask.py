"""Dask input: fits from per-chunk statistics on a LocalCluster, lazy outputs.

References: the in-memory fits of the same estimators (themselves checked
against scikit-learn elsewhere), scikit-learn's PCA, and the sequential
GridSearchCV for the joblib dask backend.
"""

import dask
import dask.array as da
import joblib
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from skstego import KMeansProbe, TorchPCA
from skstego._dask import is_dask


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _tokens(seed=0, n=3000, d=12, offset=5.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + offset
    return X.astype(np.float32)


def _ran_on_cluster(stream, client, name):
    """Tasks named ``name`` ran, on the cluster's worker processes."""
    workers = set(client.scheduler_info()["workers"])
    keys = [(t["key"], t["worker"]) for t in stream.data]
    ran = {w for k, w in keys if name in (k[0] if isinstance(k, tuple) else k)}
    return bool(ran) and ran <= workers


def test_pca_fit_on_dask_equals_in_memory_and_sklearn(client):
    X = _tokens()
    D = da.from_array(X, chunks=(700, 6))  # columns split: rechunked
    with get_task_stream(client) as ts:
        pca = TorchPCA(4, device="cpu").fit(D)
    assert _ran_on_cluster(ts, client, "_block_scatter")
    ref = TorchPCA(4, device="cpu").fit(X)
    sk = PCA(4, svd_solver="covariance_eigh").fit(X.astype(np.float64))
    for other in (ref, sk):
        np.testing.assert_allclose(pca.components_, other.components_, atol=1e-5)
        np.testing.assert_allclose(
            pca.explained_variance_, other.explained_variance_, rtol=1e-5
        )
        np.testing.assert_allclose(pca.mean_, other.mean_, rtol=1e-6)
    assert pca.n_samples_ == X.shape[0]

    out = pca.transform(D)
    assert is_dask(out) and out.chunks[0] == D.chunks[0]
    np.testing.assert_allclose(out.compute(), ref.transform(X), atol=1e-4)


def test_pca_partial_fit_on_dask_batches(client):
    X = _tokens(1)
    pca = TorchPCA(3, standardize=True, device="cpu")
    for part in np.split(X, 2):
        pca.partial_fit(da.from_array(part, chunks=500))
    ref = TorchPCA(3, standardize=True, device="cpu").fit(X)
    np.testing.assert_allclose(pca.components_, ref.components_, atol=1e-5)
    np.testing.assert_allclose(pca.scale_, ref.scale_, rtol=1e-5)


def test_pca_maps_chunked_along_images(client):
    rng = np.random.default_rng(2)
    M = rng.normal(size=(6, 8, 5, 4)).astype(np.float32) + 3
    D = da.from_array(M, chunks=(2, 4, 5, 2))  # rechunked along images only
    pca = TorchPCA(3, device="cpu").fit(D)
    tokens = M.transpose(0, 2, 3, 1).reshape(-1, 8).astype(np.float64)
    sk = PCA(3, svd_solver="covariance_eigh").fit(tokens)
    np.testing.assert_allclose(pca.components_, sk.components_, atol=1e-5)
    out = pca.transform(D)
    assert out.shape == (6, 3, 5, 4) and out.chunks[0] == (2, 2, 2)
    expected = (tokens - sk.mean_) @ sk.components_.T
    expected = expected.reshape(6, 5, 4, 3).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.compute(), expected, atol=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeans_fit_on_dask_equals_in_memory(client, metric):
    X = _tokens(3, n=2000, d=6, offset=0.0)
    D = da.from_array(X, chunks=450)
    with get_task_stream(client) as ts:
        probe = KMeansProbe(5, metric=metric, device="cpu", random_state=0).fit(D)
    assert _ran_on_cluster(ts, client, "_chunk_estep")
    ref = KMeansProbe(5, metric=metric, device="cpu", random_state=0).fit(X)
    np.testing.assert_allclose(
        probe.cluster_centers_, ref.cluster_centers_, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(probe.inertia_, ref.inertia_, rtol=1e-5)
    np.testing.assert_array_equal(probe.labels_, ref.labels_)
    # the curve is non-increasing and ends at the final inertia
    assert np.all(np.diff(probe.inertia_curve_) <= 1e-6 * probe.inertia_)
    np.testing.assert_allclose(probe.inertia_curve_[-1], probe.inertia_)

    pred = probe.predict(D)
    assert is_dask(pred) and pred.dtype == np.int64
    np.testing.assert_array_equal(pred.compute(), ref.predict(X))
    dist = probe.transform(D)
    assert is_dask(dist)
    np.testing.assert_allclose(dist.compute(), ref.transform(X), atol=1e-4)


def test_kmeans_init_array_and_labels_on_maps(client):
    rng = np.random.default_rng(4)
    M = rng.normal(size=(6, 5, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=(6, 4, 4))
    init = rng.normal(size=(3, 5)).astype(np.float32)
    D = da.from_array(M, chunks=(4, 5, 4, 4))
    kw = dict(metric="euclidean", init=init, device="cpu", tol=0.0, max_iter=20)
    probe = KMeansProbe(3, **kw).fit(D, y)
    ref = KMeansProbe(3, **kw).fit(M, y)
    np.testing.assert_allclose(probe.cluster_centers_, ref.cluster_centers_, atol=1e-5)
    np.testing.assert_array_equal(probe.labels_, ref.labels_)
    np.testing.assert_array_equal(probe.mapping_, ref.mapping_)
    pred = probe.predict(D)
    assert pred.shape == (6, 4, 4)
    np.testing.assert_array_equal(pred.compute(), ref.predict(M))


def test_dask_errors_are_clear(client):
    X = _tokens()
    X[2500, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        TorchPCA(2, device="cpu").fit(da.from_array(X, chunks=1000))
    with pytest.raises(ValueError, match="4-D maps"):
        KMeansProbe(2, device="cpu", random_state=0).fit(_tokens()).predict(
            da.from_array(_tokens(), chunks=1000), size=(4, 4)
        )


def test_gridsearch_with_joblib_dask_backend(client):
    rng = np.random.default_rng(5)
    centers = rng.normal(scale=4, size=(3, 8))
    y = np.repeat(np.arange(3), 60)
    X = (centers[y] + rng.normal(size=(180, 8))).astype(np.float32)
    perm = rng.permutation(180)
    X, y = X[perm], y[perm]
    pipe = make_pipeline(
        TorchPCA(device="cpu"),
        KMeansProbe(3, metric="euclidean", device="cpu", random_state=0),
    )
    grid = {"torchpca__dim": [1, 2, 4]}
    seq = GridSearchCV(pipe, grid, cv=3).fit(X, y)
    with get_task_stream(client) as ts, joblib.parallel_backend("dask"):
        par = GridSearchCV(pipe, grid, cv=3, n_jobs=2).fit(X, y)
    assert ts.data  # the search ran on the cluster
    for key in ("mean_test_score", "split0_test_score", "rank_test_score"):
        np.testing.assert_allclose(par.cv_results_[key], seq.cv_results_[key])


def test_sync_scheduler_without_cluster():
    # dask input needs no distributed cluster: any dask scheduler computes it
    X = _tokens(6)
    with dask.config.set(scheduler="synchronous"):
        pca = TorchPCA(2, device="cpu").fit(da.from_array(X, chunks=1000))
    ref = PCA(2, svd_solver="covariance_eigh").fit(X.astype(np.float64))
    np.testing.assert_allclose(pca.components_, ref.components_, atol=1e-5)


def test_kmeans_empty_cluster_relocated_as_in_memory(client):
    X = _tokens(7, n=600, d=4, offset=0.0)
    init = np.vstack([X[:3], np.full((1, 4), 1e3, np.float32)])  # one far away
    kw = dict(metric="euclidean", init=init, device="cpu", max_iter=30)
    probe = KMeansProbe(4, **kw).fit(da.from_array(X, chunks=150))
    ref = KMeansProbe(4, **kw).fit(X)
    assert np.bincount(probe.labels_, minlength=4).min() > 0
    np.testing.assert_allclose(probe.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    np.testing.assert_array_equal(probe.labels_, ref.labels_)


@pytest.mark.parametrize("maps", [False, True])
def test_seed_subsample_draws_the_generator_tokens(monkeypatch, maps):
    import torch

    from skstego._dask import chunks_of
    from skstego.probes import _kmeans_kernels

    monkeypatch.setattr(_kmeans_kernels, "SEED_SAMPLES", 50)
    rng = np.random.default_rng(8)
    if maps:
        X = rng.normal(size=(10, 3, 4, 5)).astype(np.float32)
        tokens = X.transpose(0, 2, 3, 1).reshape(-1, 3)
        D = da.from_array(X, chunks=(3, 3, 4, 5))
    else:
        tokens = X = rng.normal(size=(300, 3)).astype(np.float32)
        D = da.from_array(X, chunks=70)
    n = tokens.shape[0]
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    seeds = _kmeans_kernels._seed_tokens(chunks_of(D, cpu), gen, n, cpu)
    # the draw: a seed from the generator, then 50 distinct token numbers
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(0)))
    idx = np.random.default_rng(seed).choice(n, size=50, replace=False)
    np.testing.assert_array_equal(seeds.numpy(), tokens[np.sort(idx)])


def test_random_seeding_reads_only_the_tokens_it_picks(monkeypatch):
    from skstego.probes import _kmeans_kernels

    monkeypatch.setattr(_kmeans_kernels, "SEED_SAMPLES", 50)
    drawn = []
    draw = _kmeans_kernels.sample_indices

    def recording(n_total, m, gen):
        drawn.append(m)
        return draw(n_total, m, gen)

    monkeypatch.setattr(_kmeans_kernels, "sample_indices", recording)
    X = _tokens(13, n=300, d=3, offset=0.0)
    D = da.from_array(X, chunks=70)
    kw = dict(metric="euclidean", max_samples=None, max_iter=100, tol=0.0)
    probe = KMeansProbe(3, init="random", n_init=2, random_state=0, **kw).fit(D)
    # k tokens per run, not a SEED_SAMPLES subsample (a pass over the data)
    assert drawn == [3 * 2]
    # and the fit is a Lloyd fixed point: scikit-learn's Lloyd step from
    # the fitted centroids leaves them where they are
    step = KMeans(3, init=probe.cluster_centers_, n_init=1, max_iter=1).fit(X)
    np.testing.assert_allclose(step.cluster_centers_, probe.cluster_centers_, atol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_streamed_lloyd_tol_measured_on_the_blocks(metric):
    # tol > 0 on dask input: the first E-step's blocks also return their
    # moments (no separate variance pass); the stopping point must be the
    # in-memory fit's, which measures the variance of the tokens it holds
    X = _tokens(14, n=900, d=5, offset=3.0)
    D = da.from_array(X, chunks=200)
    init = X[:4].copy()
    kw = dict(metric=metric, init=init, max_iter=100, tol=5e-2, device="cpu")
    streamed = KMeansProbe(4, max_samples=None, **kw).fit(D)
    memory = KMeansProbe(4, **kw).fit(X)
    assert 1 < streamed.n_iter_ == memory.n_iter_ < 100
    np.testing.assert_allclose(
        streamed.cluster_centers_, memory.cluster_centers_, atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(streamed.labels_), memory.labels_)
    if metric == "euclidean":  # scikit-learn stops at the same iteration
        ref = KMeans(4, init=init, n_init=1, max_iter=100, tol=5e-2).fit(X)
        assert streamed.n_iter_ == ref.n_iter_


@pytest.mark.parametrize("maps", [False, True])
def test_kmeans_subsample_gathered_and_labelled_on_the_workers(client, maps):
    rng = np.random.default_rng(11)
    if maps:
        X = rng.normal(size=(12, 4, 5, 5)).astype(np.float32)
        D = da.from_array(X, chunks=(5, 4, 5, 5))
    else:
        X = _tokens(12, n=1500, d=4, offset=0.0)
        D = da.from_array(X, chunks=400)
    kw = dict(max_samples=120, device="cpu", random_state=0)
    with get_task_stream(client) as ts:
        probe = KMeansProbe(4, **kw).fit(D)
    assert _ran_on_cluster(ts, client, "_block_take")
    assert _ran_on_cluster(ts, client, "_chunk_estep")
    # the same sample (drawn from the same generator) gives the same fit
    ref = KMeansProbe(4, **kw).fit(X)
    np.testing.assert_allclose(probe.cluster_centers_, ref.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(probe.labels_, ref.labels_)
    np.testing.assert_allclose(probe.inertia_, ref.inertia_, rtol=1e-5)
    # and only the sample's tokens came back from the workers
    lean = KMeansProbe(4, compute_labels=False, **kw)
    with get_task_stream(client) as ts:
        lean.fit(D)
    assert not _ran_on_cluster(ts, client, "_chunk_estep")


def test_random_projection_on_dask_is_lazy_and_equal(client):
    from skstego import RandomProjection

    X = _tokens(seed=3)
    dX = da.from_array(X, chunks=(700, -1))
    rp = RandomProjection(4, kind="gaussian", device="cpu", random_state=0)
    fitted = rp.fit(dX)  # only the shape is read
    ref = RandomProjection(4, kind="gaussian", device="cpu", random_state=0).fit(X)
    np.testing.assert_array_equal(fitted.components_, ref.components_)
    with get_task_stream(client) as stream:
        out = fitted.transform(dX)
        assert is_dask(out) and out.shape == (3000, 4)
        computed = out.compute()
    np.testing.assert_allclose(computed, ref.transform(X), rtol=1e-5, atol=1e-5)
    assert _ran_on_cluster(stream, client, "_call")  # map_method's task
    both = RandomProjection(4, kind="gaussian", device="cpu", random_state=0)
    np.testing.assert_allclose(
        both.fit_transform(dX).compute(), ref.transform(X), rtol=1e-5, atol=1e-5
    )


def test_linear_probe_outputs_on_dask_are_lazy(client):
    from skstego import LinearProbe

    rng = np.random.default_rng(0)
    X = _tokens(seed=4, n=600)
    y = np.where(X[:, 0] > np.median(X[:, 0]), 7, 3)
    probe = LinearProbe(device="cpu", random_state=0, max_iter=5).fit(X, y)
    dX = da.from_array(X, chunks=(150, -1))
    pred, proba = probe.predict(dX), probe.predict_proba(dX)
    assert is_dask(pred) and is_dask(proba)
    np.testing.assert_array_equal(pred.compute(), probe.predict(X))
    np.testing.assert_allclose(proba.compute(), probe.predict_proba(X), atol=1e-6)
    maps = rng.normal(size=(6, 12, 4, 4)).astype(np.float32)
    dmaps = da.from_array(maps, chunks=(2, -1, -1, -1))
    up = probe.predict(dmaps, size=(8, 8))
    np.testing.assert_array_equal(up.compute(), probe.predict(maps, size=(8, 8)))


# ----------------------------------------------------------------- LinearProbe


def _linear_data(seed=8, n=400):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, 4)) * [1.0, 3.0, 0.5, 2.0] + 1.0).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 1.5).astype(int) + (X[:, 2] > 1.5)
    return X, np.where(np.arange(n) % 7 == 0, -1, y)  # some ignored tokens


def test_linear_lbfgs_on_dask_reaches_logistic_regression(client):
    # Gradient sums of every chunk computed on the workers: the optimum of
    # LogisticRegression(C=1) on standardised features (weight_decay=1/n).
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from skstego import LinearProbe

    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    ref = LogisticRegression(C=1.0, tol=1e-8, max_iter=2000).fit(X, y)
    D = da.from_array(X, chunks=(400, 32))  # columns split: rechunked
    with get_task_stream(client) as ts:
        probe = LinearProbe(
            solver="lbfgs", weight_decay=1.0 / len(y), tol=1e-6, max_iter=1000
        ).fit(D, y)
    assert _ran_on_cluster(ts, client, "_block_loss_grad")
    assert _ran_on_cluster(ts, client, "_block_moments")
    np.testing.assert_allclose(probe.coef_, ref.coef_, atol=1e-2)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=2e-3)


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_linear_fit_on_dask_equals_streamed_and_in_memory(
    client, tmp_path, monkeypatch, solver
):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    import skstego._device as device_module
    from skstego import LinearProbe

    X, y = _linear_data()
    params = dict(
        solver=solver, ignore_index=-1, max_iter=30, device="cpu", random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        memory = LinearProbe(**params).fit(X, y)
        # one chunk: the in-memory fit, step for step
        one = LinearProbe(**params).fit(da.from_array(X, chunks=-1), y)
        np.testing.assert_allclose(one.coef_, memory.coef_, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(one.loss_curve_, memory.loss_curve_, rtol=1e-6)
        # 7 chunks of 60 rows: the memmap streamed fit with the same chunks
        # (Adam shuffles within each chunk, the generator carried across the
        # workers); L-BFGS sums the same gradients as in memory.
        monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "compute", 2 * 60 * 5)
        np.save(tmp_path / "x.npy", X)
        streamed = LinearProbe(**params).fit(
            np.load(tmp_path / "x.npy", mmap_mode="r"), y
        )
        with get_task_stream(client) as ts:
            chunked = LinearProbe(**params).fit(da.from_array(X, chunks=60), y)
    name = "_block_adam" if solver == "adam" else "_block_loss_grad"
    assert _ran_on_cluster(ts, client, name)
    np.testing.assert_allclose(chunked.coef_, streamed.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(chunked.loss_curve_, streamed.loss_curve_, rtol=1e-5)
    if solver == "lbfgs":
        np.testing.assert_allclose(chunked.coef_, memory.coef_, rtol=1e-3, atol=1e-4)


def test_linear_on_dask_maps_with_label_maps_of_another_size(client):
    from skstego import LinearProbe

    rng = np.random.default_rng(0)
    M = rng.normal(size=(8, 5, 4, 4)).astype(np.float32)
    Y = np.kron((M[:, 0] > 0).astype(int), np.ones((2, 2), dtype=int))
    Y[:, 0, 0] = -1
    params = dict(solver="lbfgs", max_iter=20, device="cpu", random_state=0)
    memory = LinearProbe(**params).fit(M, Y)
    chunked = LinearProbe(**params).fit(da.from_array(M, chunks=(3, 2, 4, 4)), Y)
    np.testing.assert_allclose(chunked.coef_, memory.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        chunked.predict(M, size=(8, 8)), memory.predict(M, size=(8, 8))
    )


def test_linear_partial_fit_on_dask_equals_in_memory(client):
    from skstego import LinearProbe

    X, y = _linear_data(9)
    dask_probe = LinearProbe(ignore_index=-1, device="cpu", random_state=0)
    memory = LinearProbe(ignore_index=-1, device="cpu", random_state=0)
    for part_X, part_y in zip(np.split(X, 2), np.split(y, 2), strict=True):
        dask_probe.partial_fit(
            da.from_array(part_X, chunks=-1), part_y, classes=[0, 1, 2]
        )
        memory.partial_fit(part_X, part_y, classes=[0, 1, 2])
    np.testing.assert_allclose(dask_probe.coef_, memory.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dask_probe.loss_curve_, memory.loss_curve_, rtol=1e-6)


def test_stego_and_hnne_transform_on_dask_are_lazy_and_equal(client):
    """The non-linear reducers fit on dask input as on the same data in memory
    (STEGO's steps read their batches by index; h-NNE's subsample is gathered
    in one pass) and map their transform over the chunks, on the workers."""
    from skstego import HNNEProjector, StegoProjector
    from skstego.datasets import make_feature_maps

    maps, _ = make_feature_maps(12, n_features=16, map_size=6, random_state=0)
    dmaps = da.from_array(maps, chunks=(5, -1, -1, -1))
    for make in (
        lambda: StegoProjector(dim=3, n_steps=2, batch_size=4, random_state=0),
        lambda: HNNEProjector(dim=3, max_fit_samples=300, random_state=0),
    ):
        ref = make().set_params(device="cpu").fit(maps)
        fitted = make().set_params(device="cpu").fit(dmaps)
        with get_task_stream(client) as stream:
            out = fitted.transform(dmaps)
            assert is_dask(out) and out.shape == (12, 3, 6, 6)
            assert out.chunks[0] == (5, 5, 2)
            computed = out.compute()
        np.testing.assert_allclose(computed, ref.transform(maps), atol=1e-5)
        assert _ran_on_cluster(stream, client, "_call")
        both = make().set_params(device="cpu").fit_transform(dmaps)
        assert is_dask(both)
        np.testing.assert_allclose(both.compute(), computed, atol=1e-5)


def test_every_per_token_method_is_lazy_on_dask(client):
    # one rule for dask input (skstego._dask.lazy_output): probabilities,
    # inverse maps and log-likelihoods are lazy too, and equal the
    # independent references
    from scipy.special import log_softmax, softmax

    from skstego import RandomProjection

    X = _tokens(5, n=900, d=6, offset=0.0)
    D = da.from_array(X, chunks=200)
    probe = KMeansProbe(4, metric="euclidean", device="cpu", random_state=0).fit(X)
    c = probe.cluster_centers_.astype(np.float64)
    neg_sq = -((X[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    for method, ref in (("predict_proba", softmax), ("predict_log_proba", log_softmax)):
        with get_task_stream(client) as stream:
            out = getattr(probe, method)(D)
            assert is_dask(out) and out.shape == (900, 4)
            got = out.compute()
        assert _ran_on_cluster(stream, client, "_call")
        np.testing.assert_allclose(
            got, ref(neg_sq / probe.temperature, axis=1), atol=1e-4
        )

    pca = TorchPCA(3, device="cpu").fit(X)
    sk = PCA(3).fit(X.astype(np.float64))
    back = pca.inverse_transform(pca.transform(D))
    assert is_dask(back) and back.shape == X.shape
    np.testing.assert_allclose(
        back.compute(), sk.inverse_transform(sk.transform(X)), atol=1e-3
    )
    ll = pca.score_samples(D)
    assert is_dask(ll) and ll.dtype == np.float64
    np.testing.assert_allclose(ll.compute(), sk.score_samples(X), rtol=1e-4)
    assert pca.score(D) == pytest.approx(sk.score(X), rel=1e-4)

    rp = RandomProjection(4, device="cpu", random_state=0).fit(X)
    Z = rp.transform(X)
    back = rp.inverse_transform(da.from_array(Z, chunks=200))
    assert is_dask(back)
    pinv = np.linalg.pinv(rp.components_.astype(np.float64))
    np.testing.assert_allclose(back.compute(), Z @ pinv.T, rtol=1e-4, atol=1e-4)


def test_linear_probe_log_proba_and_decision_function_are_lazy(client):
    # LinearProbe answers dask input through the same lazy_output rule;
    # the reference is the float64 affine map of its coef_ and intercept_
    from scipy.special import log_softmax

    from skstego import LinearProbe

    X = _tokens(seed=6, n=600, d=5, offset=0.0)
    D = da.from_array(X, chunks=(150, -1))
    y3 = np.digitize(X[:, 0], np.quantile(X[:, 0], [1 / 3, 2 / 3]))
    y2 = (X[:, 1] > 0).astype(int)
    for y in (y3, y2):
        probe = LinearProbe(device="cpu", random_state=0, max_iter=5).fit(X, y)
        logits = X.astype(np.float64) @ probe.coef_.T.astype(np.float64)
        logits += probe.intercept_
        if len(probe.classes_) == 2 and probe.coef_.shape[0] == 1:
            logits = np.hstack([np.zeros_like(logits), logits])
        scores = probe.decision_function(D)
        log_proba = probe.predict_log_proba(D)
        assert is_dask(scores) and is_dask(log_proba)
        expected = logits[:, 1] - logits[:, 0] if len(probe.classes_) == 2 else logits
        np.testing.assert_allclose(scores.compute(), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            log_proba.compute(), log_softmax(logits, axis=1), rtol=1e-4, atol=1e-4
        )
