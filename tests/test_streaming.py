"""Streaming fits: partial_fit and fits from on-disk / lazy input (issue 7)."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score

import skstego._device as device_module
from skstego import HNNEProjector, KMeansProbe, LinearProbe
from skstego._device import LazyFeatures
from skstego.projection._hnne import TokenReservoir, sample_tokens


def _blobs(rng, n, d=5, k=3):
    centres = rng.normal(scale=4.0, size=(k, d))
    return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(
        np.float32
    )


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


class _Counting(LazyFeatures):
    """On-disk input that records the keys it is read with."""

    def __init__(self, source):
        super().__init__(source)
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)


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
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "read", 5 * 3 * 4 * 2)
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


def _too_large_to_gather(monkeypatch):
    """Make on-disk input count as too large for memory: exact Lloyd streams."""
    from skstego.probes import _kmeans

    monkeypatch.setattr(_kmeans, "fits_in_memory", lambda nbytes, device: False)


def test_exact_lloyd_gathers_on_disk_input_that_fits_in_memory(tmp_path, monkeypatch):
    # one read of every token, then Lloyd in memory: the same fit as on the
    # in-memory array, and as scikit-learn's
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "read", 6 * 5 * 5 * 3)
    rng = np.random.default_rng(24)
    maps = _blobs(rng, 40 * 25, d=6, k=4).reshape(40, 5, 5, 6).transpose(0, 3, 1, 2)
    maps = maps.copy()
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 6)
    init = tokens[[0, 250, 500, 750]].copy()
    params = dict(k=4, metric="euclidean", init=init, max_iter=50, tol=0.0)
    on_disk = _Counting(_memmap(tmp_path, "x.npy", maps))
    gathered = KMeansProbe(max_samples=None, device="cpu", **params).fit(on_disk)
    assert sum(k.stop - k.start for k in on_disk.reads) == 40  # every map once
    memory = KMeansProbe(device="cpu", **params).fit(maps)
    np.testing.assert_array_equal(gathered.cluster_centers_, memory.cluster_centers_)
    np.testing.assert_array_equal(gathered.labels_, memory.labels_)
    ref = KMeans(4, init=init, n_init=1, max_iter=50, tol=0.0).fit(tokens)
    np.testing.assert_allclose(
        gathered.cluster_centers_, ref.cluster_centers_, atol=1e-4
    )
    np.testing.assert_array_equal(gathered.labels_.reshape(-1), ref.labels_)


def test_fits_in_memory_is_a_share_of_the_free_memory(monkeypatch):
    from skstego._device import fits_in_memory, free_memory

    cpu = device_module.torch.device("cpu")
    free = free_memory(cpu)
    assert free is not None and free > 0  # Linux: MemAvailable
    assert fits_in_memory(1 << 20, cpu)
    assert not fits_in_memory(free, cpu)
    monkeypatch.setattr(device_module, "free_memory", lambda device: None)
    assert not fits_in_memory(1, cpu)  # unknown: stream


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_lloyd_streams_on_disk_input_equal_to_sklearn(
    tmp_path, monkeypatch, metric
):
    _too_large_to_gather(monkeypatch)
    # max_samples=None on on-disk input: every Lloyd iteration is one pass of
    # per-slice statistics, the tokens never gathered (tiny slices here)
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "read", 6 * 5 * 5 * 3)
    rng = np.random.default_rng(21)
    maps = _blobs(rng, 40 * 25, d=6, k=4).reshape(40, 5, 5, 6).transpose(0, 3, 1, 2)
    maps = maps.copy()
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 6)

    init = tokens[[0, 250, 500, 750]].copy()
    params = dict(k=4, metric=metric, init=init, max_iter=50, tol=0.0, device="cpu")
    on_disk = _Counting(_memmap(tmp_path, "x.npy", maps))
    streamed = KMeansProbe(max_samples=None, **params).fit(on_disk)
    assert all(k.stop - k.start <= 3 for k in on_disk.reads)
    # one pass of 14 slices per Lloyd iteration, and one for the labels
    assert len(on_disk.reads) == 14 * (streamed.n_iter_ + 1) > 14
    memory = KMeansProbe(**params).fit(maps)
    np.testing.assert_allclose(
        streamed.cluster_centers_, memory.cluster_centers_, atol=1e-5
    )
    np.testing.assert_array_equal(streamed.labels_, memory.labels_)
    np.testing.assert_allclose(streamed.inertia_, memory.inertia_, rtol=1e-5)
    np.testing.assert_array_equal(streamed.counts_, memory.counts_)
    if metric == "euclidean":  # and the independent reference
        ref = KMeans(4, init=init, n_init=1, max_iter=50, tol=0.0).fit(tokens)
        np.testing.assert_allclose(
            streamed.cluster_centers_, ref.cluster_centers_, atol=1e-4
        )
        np.testing.assert_array_equal(streamed.labels_.reshape(-1), ref.labels_)
    # without compute_labels no O(n_tokens) labels are kept, counts still are
    lean = KMeansProbe(max_samples=None, compute_labels=False, **params)
    lean.fit(LazyFeatures(_memmap(tmp_path, "y.npy", maps)))
    assert not hasattr(lean, "labels_")
    np.testing.assert_array_equal(lean.counts_, memory.counts_)
    np.testing.assert_allclose(lean.cluster_centers_, streamed.cluster_centers_)


@pytest.mark.parametrize("tol", [1e-3, 3e-2])
def test_exact_lloyd_on_disk_measures_tol_in_its_first_pass(tmp_path, monkeypatch, tol):
    _too_large_to_gather(monkeypatch)
    # tol is relative to the mean feature variance: the first E-step's pass
    # measures it, so a tol > 0 costs no pass of its own
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "read", 6 * 5 * 5 * 3)
    rng = np.random.default_rng(23)
    maps = _blobs(rng, 40 * 25, d=6, k=4).reshape(40, 5, 5, 6).transpose(0, 3, 1, 2)
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 6)
    init = tokens[[0, 1, 2, 3]].copy()  # poor seeds: several iterations
    on_disk = _Counting(_memmap(tmp_path, "x.npy", maps.copy()))
    probe = KMeansProbe(
        4,
        metric="euclidean",
        init=init,
        max_iter=100,
        tol=tol,
        max_samples=None,
        device="cpu",
    )
    probe.fit(on_disk)
    assert len(on_disk.reads) == 14 * (probe.n_iter_ + 1)
    # scikit-learn stops after the same iteration, at the same centroids
    ref = KMeans(4, init=init, n_init=1, max_iter=100, tol=tol).fit(tokens)
    assert probe.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(probe.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    np.testing.assert_array_equal(probe.labels_.reshape(-1), ref.labels_)


def test_exact_lloyd_on_disk_seeds_with_kmeans_plus_plus(tmp_path):
    rng = np.random.default_rng(22)
    X = _blobs(rng, 3000, d=4, k=3)
    on_disk = _memmap(tmp_path, "x.npy", X)
    probe = KMeansProbe(3, max_samples=None, device="cpu", random_state=0)
    probe.fit(on_disk)
    ref = KMeans(3, n_init=1, random_state=0).fit(X)
    # the same partition as scikit-learn's (up to cluster order)
    assert adjusted_rand_score(probe.labels_, ref.labels_) > 0.99
    assert probe.inertia_ <= ref.inertia_ * 1.001


def test_streamed_fits_show_progress_over_chunks(tmp_path, monkeypatch, capsys):
    _too_large_to_gather(monkeypatch)
    from skstego import TorchPCA

    rng = np.random.default_rng(23)
    X = _blobs(rng, 1000, d=5, k=3)
    on_disk = _memmap(tmp_path, "x.npy", X)
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "gram", 5 * 100)
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "read", 5 * 100)
    TorchPCA(2, device="cpu").fit(on_disk)
    KMeansProbe(3, max_samples=None, max_iter=2, device="cpu").fit(on_disk)
    assert "chunks" not in capsys.readouterr().err
    TorchPCA(2, device="cpu", verbose=True).fit(on_disk)
    assert "TorchPCA: chunks" in capsys.readouterr().err
    KMeansProbe(3, max_samples=None, max_iter=2, device="cpu", verbose=True).fit(
        on_disk
    )
    err = capsys.readouterr().err
    assert "k-means: chunks" in err and "/10 " in err  # 10 slices a pass


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
        monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "compute", 2 * 60 * 5)
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


def _hnne_data(seed, maps):
    """600 blob tokens of 6 features, or the same as 24 maps of 5 x 5."""
    X = _blobs(np.random.default_rng(seed), 600, d=6, k=4)
    return X.reshape(24, 5, 5, 6).transpose(0, 3, 1, 2).copy() if maps else X


@pytest.mark.parametrize("maps", [False, True])
def test_hnne_subsample_streamed_from_memmap_equals_in_memory(tmp_path, maps):
    X = _hnne_data(10, maps)
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


def test_hnne_cluster_probe_fits_on_disk_input_without_loading_it(tmp_path):
    from skstego import HNNEClusterProbe

    rng = np.random.default_rng(14)
    X = _blobs(rng, 600, d=6, k=4).reshape(24, 5, 5, 6).transpose(0, 3, 1, 2).copy()
    y = rng.integers(0, 3, size=(24, 5, 5))
    on_disk = _memmap(tmp_path, "x.npy", X)

    params = dict(k=4, max_fit_samples=300, device="cpu", random_state=0)
    counting = _Counting(on_disk)
    streamed = HNNEClusterProbe(**params).fit(counting, y)
    memory = HNNEClusterProbe(**params).fit(X, y)
    np.testing.assert_array_equal(streamed.labels_, memory.labels_)
    np.testing.assert_array_equal(streamed.mapping_, memory.mapping_)
    np.testing.assert_allclose(
        streamed.cluster_centers_, memory.cluster_centers_, atol=1e-6
    )
    assert counting.reads and all(isinstance(k, slice) for k in counting.reads)


def _reservoir_inclusion(n, size, splits, n_runs):
    """How often each of ``n`` stream items ends in the reservoir, per run."""
    stream = np.arange(n, dtype=np.float32)[:, None]
    counts = np.zeros(n)
    for seed in range(n_runs):
        res = TokenReservoir(size, seed=seed)
        for block in np.array_split(stream, splits):
            res.add(block)
        kept = res.tokens[:, 0].astype(int)
        assert res.n_seen == n and len(np.unique(kept)) == size
        counts[kept] += 1
    return counts / n_runs


@pytest.mark.parametrize("splits", [1, 3, 40])
def test_token_reservoir_is_a_uniform_sample(splits):
    # Reference: in a uniform draw of `size` of `n` items without replacement,
    # each item is kept with probability size / n, whatever the blocks (one
    # block of 40 has many tokens drawing the same slot: the last must win).
    n, size, runs = 40, 5, 4000
    freq = _reservoir_inclusion(n, size, splits, runs)
    p = size / n
    sigma = np.sqrt(p * (1 - p) / runs)
    assert np.abs(freq - p).max() < 5 * sigma
    # and the early (kept in order) and late halves of the stream alike
    assert abs(freq[:20].mean() - freq[20:].mean()) < 5 * sigma


def test_token_reservoir_keeps_everything_up_to_its_size():
    stream = np.arange(30, dtype=np.float32).reshape(15, 2)
    for size in (15, 20, None):
        res = TokenReservoir(size, seed=0)
        for block in np.array_split(stream, 4):
            res.add(block)
        np.testing.assert_array_equal(res.tokens, stream)


@pytest.mark.parametrize("maps", [False, True])
def test_hnne_partial_fit_equals_fit_on_the_concatenation(tmp_path, maps):
    X = _hnne_data(11, maps)
    params = dict(dim=2, max_fit_samples=600, device="cpu", random_state=0)
    batches = np.array_split(X, 3)
    batches[1] = _memmap(tmp_path, "b.npy", batches[1])  # read slice by slice
    streamed = HNNEProjector(**params)
    for batch in batches:
        streamed = streamed.partial_fit(batch)
    assert streamed.n_samples_seen_ == 600
    full = HNNEProjector(**params).fit(X)
    assert full.n_samples_seen_ == 600
    np.testing.assert_array_equal(
        streamed.hnne_.hierarchy_parameters.partitions,
        full.hnne_.hierarchy_parameters.partitions,
    )
    np.testing.assert_allclose(streamed.transform(X), full.transform(X), atol=1e-6)


def test_hnne_partial_fit_subsamples_beyond_max_fit_samples():
    rng = np.random.default_rng(12)
    X = _blobs(rng, 900, d=6, k=4)
    proj = HNNEProjector(dim=2, max_fit_samples=300, device="cpu", random_state=0)
    for batch in np.array_split(X, 6):
        proj.partial_fit(batch)
    sample = proj._reservoir.tokens
    assert proj.n_samples_seen_ == 900 and sample.shape == (300, 6)
    # the sample is 300 distinct input tokens, from early and late batches
    rows = [np.flatnonzero((X == t).all(axis=1)) for t in sample]
    assert all(len(r) == 1 for r in rows)
    rows = np.concatenate(rows)
    assert len(np.unique(rows)) == 300
    assert (rows < 300).sum() > 50 and (rows >= 600).sum() > 50
    # the model is h-NNE fitted on exactly that sample
    ref = HNNEProjector(dim=2, max_fit_samples=None, device="cpu", random_state=0)
    ref.fit(sample)
    np.testing.assert_allclose(proj.transform(X), ref.transform(X), atol=1e-6)
    # a pickled estimator continues the same stream
    again = pickle.loads(pickle.dumps(proj)).partial_fit(X[:10])
    assert again.n_samples_seen_ == 910 and proj.n_samples_seen_ == 900


def test_hnne_partial_fit_contract():
    rng = np.random.default_rng(13)
    X = _blobs(rng, 300, d=6, k=4)
    X_before = X.copy()
    proj = HNNEProjector(dim=2, device="cpu", random_state=0).partial_fit(X)
    np.testing.assert_array_equal(X, X_before)
    with pytest.raises(ValueError, match="6 features"):
        proj.partial_fit(X[:, :5])
    # fit keeps no sample: partial_fit after fit starts a new one
    proj.fit(X)
    assert proj.n_samples_seen_ == 300
    assert proj.partial_fit(X[:100]).n_samples_seen_ == 100
    with pytest.raises(ValueError, match="at least 2 tokens"):
        HNNEProjector(dim=1, device="cpu").partial_fit(X[:1])


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


# ------------------------------------------------------------ chunk-aligned reads


class _ChunkedSource:
    """A chunked array-like (as zarr): records the row ranges it is read."""

    def __init__(self, data, chunk_rows):
        self.data = data
        self.shape, self.dtype = data.shape, data.dtype
        self.chunks = (chunk_rows, *data.shape[1:])
        self.reads = []

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop) if isinstance(key, slice) else key)
        return self.data[key]


@pytest.mark.parametrize("slice_rows", [1, 3, 7, 10, 25])
def test_lazy_reads_whole_chunks_once(slice_rows):
    data = np.random.default_rng(30).normal(size=(53, 4)).astype(np.float32)
    source = _ChunkedSource(data, chunk_rows=10)
    lazy = LazyFeatures(source)
    got = [lazy[a : a + slice_rows] for a in range(0, 53, slice_rows)]
    np.testing.assert_array_equal(np.concatenate(got), data)
    if lazy._pending is not None:  # a background read still in flight counts
        lazy._pending[1].result()
    # every read is whole chunks, and no row is read twice
    for lo, hi in source.reads:
        assert lo % 10 == 0 and (hi % 10 == 0 or hi == 53)
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in source.reads])
    np.testing.assert_array_equal(np.sort(covered), np.arange(53))


def test_lazy_reads_any_access_pattern_correctly():
    rng = np.random.default_rng(31)
    data = rng.normal(size=(40, 3)).astype(np.float32)
    lazy = LazyFeatures(_ChunkedSource(data, chunk_rows=6))
    for _ in range(60):  # jumps, repeats, backwards, empty slices, fancy indices
        a = int(rng.integers(0, 40))
        b = int(rng.integers(a, 41))
        np.testing.assert_array_equal(lazy[a:b], data[a:b])
        got = lazy[a:b]
        got[...] = -1  # the caller owns its slice: later reads are unaffected
        idx = rng.integers(0, 40, size=5)
        np.testing.assert_array_equal(lazy[idx], data[idx])
    np.testing.assert_array_equal(lazy[0:40], data)


def test_chunk_rows_of_sources():
    import dask.array as da

    from skstego._device import source_chunk_rows

    assert source_chunk_rows(np.zeros((9, 2))) == 1
    assert source_chunk_rows(_ChunkedSource(np.zeros((9, 2)), 4)) == 4
    assert source_chunk_rows(da.zeros((9, 2), chunks=(4, 2))) == 4
    assert source_chunk_rows(da.zeros((9, 2), chunks=((3, 5, 1), (2,)))) == 1
    assert source_chunk_rows(da.zeros((9, 2), chunks=((4, 4, 1), (2,)))) == 4
