"""Cluster-quality, stability and calibration metrics against scikit-learn.

References: sklearn.metrics (silhouette_score, silhouette_samples,
davies_bouldin_score, calinski_harabasz_score, adjusted_rand_score) on the
same data, and a hand-worked calibration example.
"""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.datasets import load_digits, make_blobs

from skstego.metrics import (
    calinski_harabasz_score,
    clustering_stability,
    davies_bouldin_score,
    expected_calibration_error,
    silhouette_samples,
    silhouette_score,
)


def _digits():
    digits = load_digits()
    return digits.data[:120], digits.target[:120]  # float64, 10 classes


def _blobs():
    X, y = make_blobs(n_samples=90, n_features=5, centers=4, random_state=0)
    return X, y


DATA = {"digits": _digits(), "blobs": _blobs()}


def _as(kind, a):
    return torch.from_numpy(np.ascontiguousarray(a)) if kind == "torch" else a


def _numpy(a):
    return a.numpy() if isinstance(a, torch.Tensor) else a


# --------------------------------------------------------------------------
# silhouette
# --------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["digits", "blobs"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk", [1, 7, "n"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_silhouette_samples_equals_sklearn(data, metric, chunk, kind):
    X, y = DATA[data]
    chunk_size = X.shape[0] if chunk == "n" else chunk
    got = silhouette_samples(
        _as(kind, X), _as(kind, y), metric=metric, chunk_size=chunk_size, device="cpu"
    )
    assert isinstance(got, torch.Tensor) == (kind == "torch")
    assert got.dtype == (torch.float64 if kind == "torch" else np.float64)
    want = skm.silhouette_samples(X, y, metric=metric)
    np.testing.assert_allclose(_numpy(got), want, rtol=1e-9, atol=1e-11)
    score = silhouette_score(
        _as(kind, X), _as(kind, y), metric=metric, chunk_size=chunk_size, device="cpu"
    )
    assert score == pytest.approx(skm.silhouette_score(X, y, metric=metric), abs=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_float32_tokens(metric):
    X, y = DATA["digits"]
    # euclidean far from the origin tests the centring (cosine cannot be
    # shifted: nearly parallel vectors lose float32 digits in 1 - cos)
    X32 = X.astype(np.float32) + (100.0 if metric == "euclidean" else 0.0)
    got = silhouette_samples(torch.from_numpy(X32), y, metric=metric, chunk_size=13)
    assert got.dtype == torch.float32
    want = skm.silhouette_samples(X32.astype(np.float64), y, metric=metric)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)


def test_silhouette_labels_of_any_kind_and_singletons():
    X, y = DATA["blobs"]
    names = np.array(["sky", "road", "tree", "car"])[y].astype(object)
    names[5] = "lonely"  # a singleton cluster scores 0, as in scikit-learn
    got = silhouette_samples(X, names, device="cpu")
    want = skm.silhouette_samples(X, names)
    assert want[5] == 0.0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    far = torch.from_numpy(y * 10**9 - 7)  # a wide range of tensor labels
    np.testing.assert_allclose(
        silhouette_samples(X, far), skm.silhouette_samples(X, y), atol=1e-12
    )
    shifted = y - 1  # negative labels of 1-D labels are clusters, as sklearn
    assert silhouette_score(X, shifted, device="cpu") == pytest.approx(
        skm.silhouette_score(X, shifted), abs=1e-12
    )


@pytest.mark.parametrize("sample_size", [1 + 10, 40, 500])
@pytest.mark.parametrize("seed", [0, 3])
def test_silhouette_sample_size_picks_sklearn_sample(sample_size, seed):
    X, y = DATA["digits"]
    want = skm.silhouette_score(X, y, sample_size=sample_size, random_state=seed)
    got = silhouette_score(X, y, sample_size=sample_size, random_state=seed)
    assert got == pytest.approx(want, abs=1e-12)
    got_t = silhouette_score(
        torch.from_numpy(X), torch.from_numpy(y), sample_size=sample_size,
        random_state=np.random.RandomState(seed), chunk_size=9,
    )  # fmt: skip
    assert got_t == pytest.approx(want, abs=1e-12)


def test_silhouette_sample_of_one_cluster_is_refused_like_sklearn():
    X = np.arange(12.0).reshape(6, 2)
    y = np.array([0, 0, 0, 0, 0, 1])
    seed = next(
        s for s in range(50) if 5 not in np.random.RandomState(s).permutation(6)[:3]
    )
    with pytest.raises(ValueError, match="Number of labels is 1"):
        skm.silhouette_score(X, y, sample_size=3, random_state=seed)
    with pytest.raises(ValueError, match="Number of labels is 1"):
        silhouette_score(X, y, sample_size=3, random_state=seed)


# --------------------------------------------------------------------------
# centroid scores
# --------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["digits", "blobs"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_davies_bouldin_and_calinski_harabasz_equal_sklearn(data, kind):
    X, y = DATA[data]
    Xk, yk = _as(kind, X), _as(kind, y)
    assert davies_bouldin_score(Xk, yk, device="cpu") == pytest.approx(
        skm.davies_bouldin_score(X, y), rel=1e-10
    )
    assert calinski_harabasz_score(Xk, yk, device="cpu") == pytest.approx(
        skm.calinski_harabasz_score(X, y), rel=1e-10
    )


def test_centroid_scores_float32_and_degenerate_cases():
    X, y = DATA["blobs"]
    X32 = X.astype(np.float32)
    assert davies_bouldin_score(X32, y) == pytest.approx(
        skm.davies_bouldin_score(X.astype(np.float32).astype(np.float64), y), rel=1e-6
    )
    assert calinski_harabasz_score(X32, y) == pytest.approx(
        skm.calinski_harabasz_score(X32.astype(np.float64), y), rel=1e-6
    )
    # every cluster a single repeated point: W = 0 -> CH 1.0, DB 0.0 (sklearn)
    Xd = np.repeat([[0.0, 0.0], [3.0, 4.0]], 3, axis=0)
    yd = np.repeat([0, 1], 3)
    assert calinski_harabasz_score(Xd, yd) == skm.calinski_harabasz_score(Xd, yd)
    assert davies_bouldin_score(Xd, yd) == skm.davies_bouldin_score(Xd, yd) == 0.0


def _centroid_pair_equal_sklearn(X, y, rel, **kwargs):
    X64 = np.asarray(X, dtype=np.float64)
    y_np = _numpy(y)
    assert davies_bouldin_score(X, y, device="cpu", **kwargs) == pytest.approx(
        skm.davies_bouldin_score(X64, y_np), rel=rel
    )
    assert calinski_harabasz_score(X, y, device="cpu", **kwargs) == pytest.approx(
        skm.calinski_harabasz_score(X64, y_np), rel=rel
    )


@pytest.mark.parametrize(
    "ids",
    [
        [3, 7, 100],  # gaps: cluster ids 0-2, 4-6, 8-99 are empty
        [-5, 10, 2_000_000_000],  # negative first, and a range too wide to table
        [250, 251, 252],  # int labels not starting at 0
    ],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_centroid_scores_with_sparse_integer_label_ids(ids, kind):
    X, y = DATA["blobs"]
    y_ids = np.asarray(ids, dtype=np.int64)[y % 3]
    _centroid_pair_equal_sklearn(_as(kind, X), _as(kind, y_ids), rel=1e-10)


def test_centroid_scores_of_one_cluster_raise_like_sklearn():
    X, _ = DATA["blobs"]
    y = np.full(len(X), 7)
    for fn in (davies_bouldin_score, calinski_harabasz_score):
        with pytest.raises(ValueError, match="Number of labels is 1"):
            getattr(skm, fn.__name__)(X, y)
        with pytest.raises(ValueError, match="Number of labels is 1"):
            fn(X, y)


def test_centroid_scores_float32_far_from_the_origin():
    # per-token distances to the centroid are computed directly, not from
    # |x|^2 - 2 x.c + |c|^2, which cancels in float32 at an offset of 1e3
    rng = np.random.default_rng(4)
    y = rng.integers(0, 5, size=3000)
    X = (1e3 + rng.normal(size=(5, 8))[y] + rng.normal(size=(3000, 8))).astype(
        np.float32
    )
    _centroid_pair_equal_sklearn(X, y, rel=1e-5)


def test_centroid_scores_over_many_chunks_equal_sklearn(monkeypatch):
    import skstego._device as device_module

    # 300 clusters (16-bit sort keys), chunks of 37 rows split every cluster
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "compute", 37 * 6)
    X, y = make_blobs(n_samples=3000, n_features=6, centers=300, random_state=1)
    _centroid_pair_equal_sklearn(X.astype(np.float32), y, rel=1e-5)
    _centroid_pair_equal_sklearn(_as("torch", X), _as("torch", y), rel=1e-10)


def test_calinski_harabasz_with_more_clusters_than_16_bit_ids():
    # 70 000 clusters of 2 to 3 points: the 64-bit sort keys; reference: the
    # variance ratio in NumPy float64 (scikit-learn loops once per cluster)
    rng = np.random.default_rng(5)
    k = 70_000
    y = np.concatenate([np.arange(k), rng.integers(0, k, size=k)])
    X = rng.normal(size=(2 * k, 2)) + 10 * rng.normal(size=(k, 2))[y]
    counts = np.bincount(y)
    centroids = np.zeros((k, 2))
    np.add.at(centroids, y, X)
    centroids /= counts[:, None]
    within = np.sum((X - centroids[y]) ** 2)
    between = np.sum(counts * np.sum((centroids - X.mean(axis=0)) ** 2, axis=1))
    expected = between * (len(X) - k) / (within * (k - 1))
    assert calinski_harabasz_score(X, y, device="cpu") == pytest.approx(
        expected, rel=1e-10
    )


@pytest.mark.parametrize("in_numpy", [True, False])
def test_centroid_kernels_equal_float64_sums(in_numpy):
    # the NumPy steps (CPU) and the torch steps (other devices), both run here
    from skstego._cluster_metrics import _cluster_sums, _distance_sums

    rng = np.random.default_rng(6)
    k = 300
    codes = rng.integers(0, k, size=5000)
    codes[codes == 7] = 8  # an empty cluster
    X = (50 + rng.normal(size=(5000, 6))).astype(np.float32)
    sums = np.zeros((k, 6))
    np.add.at(sums, codes, X.astype(np.float64))
    got = _cluster_sums(torch.from_numpy(X), torch.from_numpy(codes), k, in_numpy)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), sums, rtol=1e-12, atol=1e-9)
    centroids = sums / np.maximum(np.bincount(codes, minlength=k), 1)[:, None]
    sq = np.sum((X - centroids[codes]) ** 2, axis=1)
    dist, sqdist = _distance_sums(
        torch.from_numpy(X),
        torch.from_numpy(codes),
        torch.from_numpy(centroids.astype(np.float32)),
        in_numpy,
    )
    np.testing.assert_allclose(
        dist.numpy(), np.bincount(codes, np.sqrt(sq), minlength=k), rtol=1e-5
    )
    np.testing.assert_allclose(
        sqdist.numpy(), np.bincount(codes, sq, minlength=k), rtol=1e-5
    )


# --------------------------------------------------------------------------
# maps vs tokens
# --------------------------------------------------------------------------
def _maps(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(2, 4, 5))
    centres = rng.normal(scale=3.0, size=(3, 6))
    X = centres[labels] + rng.normal(size=(2, 4, 5, 6))  # (N, h, w, C)
    return np.ascontiguousarray(X.transpose(0, 3, 1, 2)).astype(np.float32), labels


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_maps_agree_with_channel_last_tokens(kind):
    maps, labels = _maps()
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])
    flat = labels.reshape(-1)
    Xm, ym = _as(kind, maps), _as(kind, labels)
    got = silhouette_samples(Xm, ym, chunk_size=7)
    assert tuple(got.shape) == labels.shape
    np.testing.assert_allclose(
        _numpy(got).reshape(-1),
        skm.silhouette_samples(tokens.astype(np.float64), flat),
        atol=2e-5,
    )
    for ours, theirs in [
        (davies_bouldin_score, skm.davies_bouldin_score),
        (calinski_harabasz_score, skm.calinski_harabasz_score),
    ]:
        assert ours(Xm, ym) == pytest.approx(
            theirs(tokens.astype(np.float64), flat), rel=1e-6
        )


def test_label_maps_ignore_negative_labels():
    maps, labels = _maps(1)
    labels = labels.copy()
    labels[0, :2] = -1
    labels[1, 3, 4] = -7
    before = maps.copy(), labels.copy()
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1]).astype(np.float64)
    flat = labels.reshape(-1)
    keep = flat >= 0
    got = silhouette_samples(maps, labels)
    assert np.isnan(got[labels < 0]).all()
    np.testing.assert_allclose(
        got[labels >= 0], skm.silhouette_samples(tokens[keep], flat[keep]), atol=2e-5
    )
    assert silhouette_score(maps, labels, sample_size=17, random_state=2) == (
        pytest.approx(
            skm.silhouette_score(
                tokens[keep], flat[keep], sample_size=17, random_state=2
            ),
            abs=2e-6,
        )
    )
    assert davies_bouldin_score(maps, labels) == pytest.approx(
        skm.davies_bouldin_score(tokens[keep], flat[keep]), rel=1e-6
    )
    assert calinski_harabasz_score(maps, labels) == pytest.approx(
        skm.calinski_harabasz_score(tokens[keep], flat[keep]), rel=1e-6
    )
    np.testing.assert_array_equal(maps, before[0])  # inputs untouched
    np.testing.assert_array_equal(labels, before[1])


# --------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------
def test_clustering_stability_equals_pairwise_sklearn_ari():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 5, size=(2, 6, 7))
    labelings = [base]
    for k in (5, 8, 3):  # noisy copies with other cluster ids and counts
        noisy = np.where(rng.random(base.shape) < 0.3, rng.integers(0, k), base)
        labelings.append(torch.from_numpy((noisy * 7 + 2) % 11))
    labelings.append(list(base.reshape(-1)))
    result = clustering_stability(labelings)
    flat = [np.asarray(lab).reshape(-1) for lab in labelings]
    m = len(flat)
    want = np.array(
        [
            [skm.adjusted_rand_score(flat[i], flat[j]) for j in range(m)]
            for i in range(m)
        ]
    )
    np.testing.assert_allclose(result["pairwise"], want, rtol=1e-12)
    upper = want[np.triu_indices(m, 1)]
    assert result["mean"] == pytest.approx(upper.mean())
    assert result["std"] == pytest.approx(upper.std())
    # discordant labelings: negative ARI, as sklearn
    r = clustering_stability(np.array([[0, 0, 1, 1], [0, 1, 0, 1]]))
    assert r["mean"] == pytest.approx(
        skm.adjusted_rand_score([0, 0, 1, 1], [0, 1, 0, 1])
    )


def test_clustering_stability_pair_counts_without_integer_matmul():
    # The pair counts are elementwise int64 sums (CUDA has no int64 mv): still
    # sklearn's pair_confusion_matrix exactly, negative labels and unbalanced
    # cluster counts included. tests/test_cuda_ops.py checks the ops issued.
    rng = np.random.default_rng(3)
    for k_a, k_b in ((2, 9), (7, 1), (30, 30)):
        a = rng.integers(-3, k_a, size=500)
        b = np.where(rng.random(500) < 0.5, a, rng.integers(0, k_b, size=500))
        got = clustering_stability([torch.from_numpy(a), b])["pairwise"][0, 1]
        assert got == pytest.approx(skm.adjusted_rand_score(a, b), rel=1e-12)


# --------------------------------------------------------------------------
# expected calibration error
# --------------------------------------------------------------------------
# Hand-worked example, 4 classes, n_bins=3: bins (0, 1/3], (1/3, 2/3], (2/3, 1].
#
#   proba                     top  conf  true  right  bin
#   [0.30 0.25 0.25 0.20]      0   0.30   0     yes    0
#   [0.20 0.30 0.25 0.25]      1   0.30   0     no     0
#   [0.50 0.20 0.20 0.10]      0   0.50   0     yes    1
#   [0.10 0.60 0.20 0.10]      1   0.60   2     no     1
#   [0.10 0.10 0.80 0.00]      2   0.80   2     yes    2
#   [0.00 0.00 0.10 0.90]      3   0.90   3     yes    2
#   [0.90 0.10 0.00 0.00]      -   -     -1   ignored
#
#   bin 0: acc 1/2, conf 0.30 -> gap 0.20;  bin 1: acc 1/2, conf 0.55 -> 0.05;
#   bin 2: acc 1,   conf 0.85 -> gap 0.15
#   ECE = (2 * 0.20 + 2 * 0.05 + 2 * 0.15) / 6 = 0.8 / 6 = 0.13333...
#   n_bins=1: accuracy 4/6, mean confidence 3.4/6 -> ECE = 0.6 / 6 = 0.1
# --------------------------------------------------------------------------
PROBA = np.array(
    [
        [0.30, 0.25, 0.25, 0.20],
        [0.20, 0.30, 0.25, 0.25],
        [0.50, 0.20, 0.20, 0.10],
        [0.10, 0.60, 0.20, 0.10],
        [0.10, 0.10, 0.80, 0.00],
        [0.00, 0.00, 0.10, 0.90],
        [0.90, 0.10, 0.00, 0.00],
    ]
)
Y = np.array([0, 0, 0, 2, 2, 3, -1])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_ece_by_hand(kind):
    assert expected_calibration_error(
        _as(kind, Y), _as(kind, PROBA), n_bins=3
    ) == pytest.approx(0.8 / 6)
    assert expected_calibration_error(Y, PROBA, n_bins=1) == pytest.approx(0.1)


def test_ece_bin_edges_and_fine_bins():
    # a confidence on an edge belongs to the lower bin: 0.5 -> (0, 0.5]
    proba = np.array([[0.5, 0.3, 0.2], [0.25, 0.75, 0.0]])
    y = np.array([0, 0])
    # bins {0.5 right}, {0.75 wrong}: (|1 - 0.5| + |0 - 0.75|) / 2 = 0.625
    assert expected_calibration_error(y, proba, n_bins=2) == pytest.approx(0.625)
    # with one bin per sample, ECE is the mean |right - confidence|
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=40)
    t = rng.integers(0, 3, size=40)
    n_bins = 100_000
    assert np.unique(np.ceil(p.max(1) * n_bins)).size == 40  # distinct bins
    right = p.argmax(1) == t
    assert expected_calibration_error(t, p, n_bins=n_bins) == pytest.approx(
        np.mean(np.abs(right - p.max(1)))
    )


def test_ece_maps_equal_flat():
    rng = np.random.default_rng(4)
    proba = torch.softmax(torch.from_numpy(rng.normal(size=(2, 4, 5, 6))), dim=1)
    labels = torch.from_numpy(rng.integers(-1, 4, size=(2, 5, 6)))
    flat_p = proba.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    flat_y = labels.reshape(-1).numpy()
    assert expected_calibration_error(labels, proba, n_bins=7) == pytest.approx(
        expected_calibration_error(flat_y, flat_p, n_bins=7)
    )


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn", [silhouette_score, silhouette_samples, davies_bouldin_score,
           calinski_harabasz_score],
)  # fmt: skip
def test_number_of_labels_errors_like_sklearn(fn):
    X = np.arange(10.0).reshape(5, 2)
    for y in (np.zeros(5, int), np.arange(5)):
        with pytest.raises(ValueError, match=r"Number of labels is \d+\. Valid values"):
            getattr(skm, fn.__name__)(X, y)
        with pytest.raises(ValueError, match=r"Number of labels is \d+\. Valid values"):
            fn(X, y)


@pytest.mark.parametrize(
    ("X", "y", "kwargs", "match"),
    [
        (np.ones((4, 2)), [0, 1, 0], {}, r"shape \(4,\)"),
        (np.ones((2, 3, 2, 2)), np.zeros((2, 3, 3)), {}, r"label maps of shape"),
        (np.array([[np.nan, 1], [0, 1], [1, 1]]), [0, 1, 1], {}, "NaN"),
        (torch.tensor([[np.inf, 1], [0, 1], [1, 1]]), [0, 1, 1], {}, "NaN"),
        (np.ones((3, 2)), [0.0, np.nan, 1.0], {}, "labels contains NaN"),
        (np.ones((3, 2, 2)), [0, 1, 1], {}, "2-D tokens"),
        (np.ones((3, 2)), [0, 1, 1], {"metric": "l1"}, "metric must be"),
        (np.ones((3, 2)), [0, 1, 1], {"chunk_size": 0}, "chunk_size must be"),
        (np.ones((3, 2)), [0, 1, 1], {"sample_size": 0}, "sample_size must be"),
        (np.ones((3, 2)), [0, 1, 1], {"device": "tpu7"}, "not a device name"),
    ],
)
def test_silhouette_bad_input(X, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        silhouette_score(X, y, **kwargs)


def test_centroid_scores_and_stability_bad_input():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        davies_bouldin_score(np.ones((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        calinski_harabasz_score(np.array([[0, np.nan], [1, 1], [2, 2]]), [0, 1, 1])
    with pytest.raises(ValueError, match="at least 2 labelings"):
        clustering_stability([[0, 1, 1]])
    with pytest.raises(ValueError, match="same samples"):
        clustering_stability([[0, 1, 1], [0, 1]])
    with pytest.raises(ValueError, match="NaN"):
        clustering_stability([[0, 1, 1], [0, 1, np.nan]])


@pytest.mark.parametrize("n_bins", [0, -1, 2.5, True, None])
def test_ece_bad_n_bins(n_bins):
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        expected_calibration_error(Y, PROBA, n_bins=n_bins)


def test_ece_bad_input():
    with pytest.raises(ValueError, match="do not match"):
        expected_calibration_error(Y[:5], PROBA)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        expected_calibration_error(Y, PROBA * 3 - 1)
    with pytest.raises(ValueError, match="no labelled pixels"):
        expected_calibration_error(np.full(7, -1), PROBA)


# --------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_matches_sklearn_and_keeps_tensors_on_device():
    maps, labels = _maps(2)
    Xc, yc = torch.from_numpy(maps).cuda(), torch.from_numpy(labels).cuda()
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1]).astype(np.float64)
    flat = labels.reshape(-1)
    values = silhouette_samples(Xc, yc, chunk_size=7, device="cuda")
    assert values.is_cuda and tuple(values.shape) == labels.shape
    np.testing.assert_allclose(
        values.cpu().numpy().reshape(-1),
        skm.silhouette_samples(tokens, flat),
        atol=2e-5,
    )
    assert silhouette_score(maps, labels, metric="cosine", device="cuda") == (
        pytest.approx(skm.silhouette_score(tokens, flat, metric="cosine"), abs=2e-5)
    )
    assert davies_bouldin_score(Xc, yc) == pytest.approx(
        skm.davies_bouldin_score(tokens, flat), rel=1e-6
    )
    assert calinski_harabasz_score(maps, labels, device="cuda") == pytest.approx(
        skm.calinski_harabasz_score(tokens, flat), rel=1e-6
    )
    other = (yc + 1) % 3
    result = clustering_stability([yc, other, labels])
    assert result["pairwise"][0, 2] == 1.0
    assert result["pairwise"][0, 1] == pytest.approx(1.0)  # renamed clusters
    proba = torch.from_numpy(PROBA).cuda()
    assert expected_calibration_error(torch.from_numpy(Y).cuda(), proba, n_bins=3) == (
        pytest.approx(0.8 / 6)
    )
