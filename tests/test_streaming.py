"""Streaming fits: partial_fit and fits from on-disk / lazy input (issue 7)."""

import warnings

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

import skstego.probes._kmeans as kmeans_module
import skstego.probes._linear as linear_module
from skstego import HNNEProjector, KMeansProbe, LinearProbe
from skstego._device import LazyFeatures
from skstego.projection._hnne import sample_tokens


def _blobs(rng, n, d=5, k=3):
    centres = rng.normal(scale=4.0, size=(k, d))
    return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(
        np.float32
    )


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _numpy_minibatch(batches, init, cosine):
    """Mini-batch k-means written out: c <- (c * N + sum) / (N + n)."""
    centers = init.astype(np.float64)
    if cosine:
        centers = _unit(centers)
    counts = np.zeros(len(centers))
    for xb in batches:
        x = xb.astype(np.float64)
        if cosine:
            x = _unit(x)
            labels = np.argmax(x @ centers.T, axis=1)
        else:
            d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
            labels = np.argmin(d2, axis=1)
        for j in range(len(centers)):
            members = x[labels == j]
            if len(members) == 0:
                continue
            centers[j] = (centers[j] * counts[j] + members.sum(0)) / (
                counts[j] + len(members)
            )
            counts[j] += len(members)
            if cosine:
                centers[j] /= np.linalg.norm(centers[j])
    return centers, counts


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_partial_fit_equals_numpy_minibatch(metric):
    rng = np.random.default_rng(0)
    batches = [_blobs(rng, 40) + 1.0 for _ in range(6)]
    init = batches[0][:3].copy()
    probe = KMeansProbe(k=3, metric=metric, init=init, device="cpu")
    for xb in batches:
        probe.partial_fit(xb)
    ref_centers, ref_counts = _numpy_minibatch(batches, init, metric == "cosine")
    np.testing.assert_allclose(probe.cluster_centers_, ref_centers, atol=1e-5)
    np.testing.assert_array_equal(probe.counts_, ref_counts)
    assert probe.n_steps_ == len(batches)
    # labels_ are those of the last batch under the updated centroids
    np.testing.assert_array_equal(probe.labels_, probe.predict(batches[-1]))


def test_partial_fit_equals_sklearn_minibatchkmeans():
    rng = np.random.default_rng(1)
    batches = [_blobs(rng, 50) for _ in range(5)]
    init = batches[0][:3].copy()
    ours = KMeansProbe(k=3, metric="euclidean", init=init, device="cpu")
    ref = MiniBatchKMeans(n_clusters=3, init=init, n_init=1, reassignment_ratio=0.0)
    for xb in batches:
        ours.partial_fit(xb)
        ref.partial_fit(xb)
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    np.testing.assert_allclose(ours.counts_, ref._counts)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_allclose(ours.inertia_, ref.inertia_, rtol=1e-4)


def test_partial_fit_continues_a_fit_and_checks_input():
    rng = np.random.default_rng(2)
    X = _blobs(rng, 60)
    probe = KMeansProbe(k=3, metric="euclidean", device="cpu", random_state=0)
    probe.fit(X)
    np.testing.assert_array_equal(
        probe.counts_, np.bincount(probe.labels_, minlength=3)
    )
    start, counts = probe.cluster_centers_.copy(), probe.counts_.copy()
    batch = _blobs(rng, 20)
    probe.partial_fit(batch)
    ref, _ = _numpy_minibatch([batch], start, cosine=False)
    # the reference starts from zero counts: rebuild it with the fitted counts
    labels = np.argmin(((batch[:, None] - start[None]) ** 2).sum(-1), axis=1)
    for j in range(3):
        n_j = (labels == j).sum()
        if n_j:
            ref[j] = (start[j] * counts[j] + batch[labels == j].sum(0)) / (
                counts[j] + n_j
            )
    np.testing.assert_allclose(probe.cluster_centers_, ref, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        probe.partial_fit(batch[:, :2])
    with pytest.raises(ValueError, match=r"k=3"):
        KMeansProbe(k=3, device="cpu").partial_fit(batch[:2])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_minibatch_fit_streams_memmap_maps_equal_to_reference(
    tmp_path, monkeypatch, metric
):
    # tiny read slices, so that batches straddle slice boundaries
    monkeypatch.setattr(kmeans_module, "_STREAM_ELEMENTS", 5 * 3 * 4 * 2)
    rng = np.random.default_rng(3)
    maps = _blobs(rng, 7 * 12).reshape(7, 3, 4, 5).transpose(0, 3, 1, 2).copy()
    mm = np.lib.format.open_memmap(
        tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=maps.shape
    )
    mm[:] = maps
    mm.flush()
    on_disk = np.load(tmp_path / "x.npy", mmap_mode="r")
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 5)
    init = tokens[[0, 30, 60]].copy()
    params = dict(
        k=3,
        metric=metric,
        init=init,
        algorithm="minibatch",
        batch_size=16,
        max_iter=2,
        tol=0.0,
        device="cpu",
        random_state=0,
    )
    streamed = KMeansProbe(**params).fit(on_disk)
    memory = KMeansProbe(**params).fit(maps)
    batches = [tokens[i : i + 16] for i in range(0, len(tokens), 16)]
    ref_centers, ref_counts = _numpy_minibatch(batches * 2, init, metric == "cosine")
    for probe in (streamed, memory):
        np.testing.assert_allclose(probe.cluster_centers_, ref_centers, atol=1e-5)
        np.testing.assert_array_equal(probe.counts_, ref_counts)
        assert probe.n_steps_ == 2 * len(batches) and probe.n_iter_ == 2
        assert probe.labels_.shape == (7, 3, 4)
    np.testing.assert_array_equal(streamed.labels_, memory.labels_)
    np.testing.assert_array_equal(streamed.labels_, memory.predict(maps))


def test_minibatch_fit_finds_blobs_and_compute_labels_false(capsys):
    rng = np.random.default_rng(4)
    centres = np.array([[8.0, 0, 0], [0, 8.0, 0], [0, 0, 8.0]])
    y = rng.integers(3, size=3000)
    X = (centres[y] + rng.normal(size=(3000, 3))).astype(np.float32)
    probe = KMeansProbe(
        k=3,
        metric="euclidean",
        algorithm="minibatch",
        batch_size=256,
        device="cpu",
        random_state=0,
        verbose=True,
    ).fit(X, y)
    assert "mini-batch k-means pass 1" in capsys.readouterr().err
    assert probe.score(X, y) > 0.99
    np.testing.assert_array_equal(probe.predict(X), y)
    lean = KMeansProbe(
        k=3,
        metric="euclidean",
        algorithm="minibatch",
        batch_size=256,
        compute_labels=False,
        device="cpu",
        random_state=0,
    ).fit(X)
    assert not hasattr(lean, "labels_") and not hasattr(lean, "inertia_")
    np.testing.assert_allclose(lean.cluster_centers_, probe.cluster_centers_)
    with pytest.raises(ValueError, match="compute_labels=True"):
        lean.fit(X, y)


# ----------------------------------------------------------------- LinearProbe


def _memmap(tmp_path, name, a):
    mm = np.lib.format.open_memmap(
        tmp_path / name, mode="w+", dtype=a.dtype, shape=a.shape
    )
    mm[:] = a
    mm.flush()
    return np.load(tmp_path / name, mmap_mode="r")


def _linear_data(rng, n=400, d=4):
    X = (rng.normal(size=(n, d)) * [1.0, 3.0, 0.5, 2.0][:d] + 1.0).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 1.5).astype(int) + (X[:, 2] > 1.5)
    return X, y


def test_linear_partial_fit_first_epoch_equals_fit_one_epoch():
    X, y = _linear_data(np.random.default_rng(5))
    params = dict(device="cpu", random_state=0, batch_size=32)
    one = LinearProbe(max_iter=1, **params)
    with pytest.warns(ConvergenceWarning):
        one.fit(X, y)
    part = LinearProbe(**params).partial_fit(X, y, classes=np.unique(y))
    np.testing.assert_allclose(part.coef_, one.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.intercept_, one.intercept_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.loss_curve_, one.loss_curve_, rtol=1e-6)


def test_linear_partial_fit_stream_matches_logistic_regression():
    rng = np.random.default_rng(6)
    probe = LinearProbe(lr=0.02, device="cpu", random_state=0)
    for _ in range(40):
        X, y = _linear_data(rng, n=100)
        probe.partial_fit(X, y, classes=[0, 1, 2])
    assert len(probe.loss_curve_) == probe.n_iter_ == 40
    assert probe.loss_curve_[-1] < probe.loss_curve_[0]
    X, y = _linear_data(rng, n=4000)
    X_test, y_test = _linear_data(rng, n=2000)
    ref = LogisticRegression(C=1e4, max_iter=2000).fit(X, y).score(X_test, y_test)
    assert probe.score(X_test, y_test) > ref - 0.03


def test_linear_partial_fit_errors():
    X, y = _linear_data(np.random.default_rng(7), n=60)
    with pytest.raises(ValueError, match="classes must be passed"):
        LinearProbe(device="cpu").partial_fit(X, y)
    probe = LinearProbe(device="cpu").partial_fit(X, y, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="not in classes"):
        probe.partial_fit(X, y + 5)
    with pytest.raises(ValueError, match="differs from the classes_"):
        probe.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="features"):
        probe.partial_fit(X[:, :2], y)


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_linear_fit_streams_memmap_equal_to_in_memory(tmp_path, monkeypatch, solver):
    X, y = _linear_data(np.random.default_rng(8))
    y = np.where(np.arange(len(y)) % 7 == 0, -1, y)  # some ignored tokens
    on_disk = _memmap(tmp_path, "x.npy", X)
    params = dict(
        solver=solver, ignore_index=-1, max_iter=30, device="cpu", random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        memory = LinearProbe(**params).fit(X, y)
        # one chunk: the same shuffles, so the same steps
        streamed = LinearProbe(**params).fit(on_disk, y)
        np.testing.assert_allclose(streamed.coef_, memory.coef_, rtol=1e-4, atol=1e-5)
        # 7 chunks: L-BFGS sums the same gradients (equal); Adam shuffles
        # within chunks, another order of the same steps: it reaches the same
        # optimum only approximately, so compare losses and predictions.
        monkeypatch.setattr(linear_module, "_STREAM_ELEMENTS", 2 * 60 * 5)
        chunked = LinearProbe(**params).fit(on_disk, y)
    if solver == "lbfgs":
        np.testing.assert_allclose(chunked.coef_, memory.coef_, rtol=1e-3, atol=1e-4)
    else:
        assert abs(chunked.loss_curve_[-1] - memory.loss_curve_[-1]) < 0.05
        assert np.mean(chunked.predict(X) == memory.predict(X)) > 0.95


def test_linear_streams_label_maps_of_another_size(tmp_path):
    rng = np.random.default_rng(9)
    maps = rng.normal(size=(6, 3, 4, 4)).astype(np.float32)
    labels = np.repeat(np.repeat(maps[:, 0] > 0, 2, axis=1), 2, axis=2).astype(
        np.int64
    ) + (np.repeat(np.repeat(maps[:, 1], 2, axis=1), 2, axis=2) > 1)
    on_disk = _memmap(tmp_path, "maps.npy", maps)
    params = dict(max_iter=3, batch_size=64, device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        memory = LinearProbe(**params).fit(maps, labels)
        streamed = LinearProbe(**params).fit(on_disk, labels)
    np.testing.assert_allclose(streamed.coef_, memory.coef_, rtol=1e-4, atol=1e-5)
    part_mem = LinearProbe(**params).partial_fit(maps, labels)
    part_disk = LinearProbe(**params).partial_fit(on_disk, labels)
    np.testing.assert_allclose(part_disk.coef_, part_mem.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(part_mem.classes_, [0, 1, 2])
    with pytest.raises(ValueError, match="class ids >= 3"):
        part_mem.partial_fit(maps, labels + 1)


# ------------------------------------------------------------ HNNEProjector


@pytest.mark.parametrize("maps", [False, True])
def test_hnne_subsample_streamed_from_memmap_equals_in_memory(tmp_path, maps):
    rng = np.random.default_rng(10)
    X = _blobs(rng, 600, d=6, k=4)
    if maps:
        X = X.reshape(24, 5, 5, 6).transpose(0, 3, 1, 2).copy()
    on_disk = _memmap(tmp_path, "x.npy", X)
    lazy = LazyFeatures(on_disk)
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, 6) if maps else X
    got, idx = sample_tokens(lazy, 100, 0)
    ref, ref_idx = sample_tokens(X, 100, 0)
    assert len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(got, tokens[idx])
    np.testing.assert_array_equal(ref, tokens[idx])
    params = dict(dim=2, max_fit_samples=200, device="cpu", random_state=0)
    streamed = HNNEProjector(**params).fit(on_disk)
    memory = HNNEProjector(**params).fit(X)
    np.testing.assert_allclose(
        streamed.transform(X), memory.transform(X), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------ StegoProjector


def test_stego_trains_from_a_feature_store_as_from_memory(tmp_path):
    import timm
    import torch

    from skstego import DinoFeaturizer, StegoProjector

    pytest.importorskip("zarr")
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2
    ).eval()
    images = np.random.RandomState(0).randint(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    featurizer = DinoFeaturizer(vit, resolution=16, device="cpu")
    store = featurizer.transform_to_store(images, tmp_path / "f.zarr", chunk_images=2)
    reads = []
    getitem = type(store).__getitem__

    def counting(self, key):
        reads.append(key)
        return getitem(self, key)

    with pytest.warns(UserWarning, match="whole feature store"):
        full = np.asarray(store)
    params = dict(
        dim=3, n_steps=4, batch_size=3, n_neighbors=2, device="cpu", random_state=0
    )
    memory = StegoProjector(**params).fit(full)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(store), "__getitem__", counting)
        streamed = StegoProjector(**params).fit(store)
    for name, value in memory.head_state_.items():
        np.testing.assert_allclose(streamed.head_state_[name], value, atol=1e-6)
    np.testing.assert_allclose(streamed.loss_curve_, memory.loss_curve_, rtol=1e-5)
    # one pass of slices for the descriptors, then one fancy-indexed read per
    # step of just its batch (images and partners)
    fancy = [k for k in reads if not isinstance(k, slice)]
    assert len(fancy) == params["n_steps"]
    assert all(len(k) == 2 * params["batch_size"] for k in fancy)
    slices = [k for k in reads if isinstance(k, slice)]
    assert sum(min(k.stop, len(full)) - k.start for k in slices) == len(full)
