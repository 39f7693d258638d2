"""Streaming fits: partial_fit and fits from on-disk / lazy input (issue 7)."""

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

import skstego.probes._kmeans as kmeans_module
from skstego import KMeansProbe


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
