"""HNNEProjector against hnne.HNNE itself, layouts, edge cases, API contract."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from hnne import HNNE
from sklearn.datasets import load_digits

from skstego import HNNEProjector


@pytest.fixture(scope="module")
def digits():
    X, _ = load_digits(return_X_y=True)
    return X[:600].astype(np.float32)


def hnne_reference(X, **params):
    """hnne's own fit + transform, called directly."""
    ref = HNNE(**params)
    ref.fit(X)
    return ref, ref.transform(X)


# ----------------------------------------------------------------- numerics


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_equals_hnne_transform_high_dim(digits, metric):
    # dim > 3: no inflation, so the float32 torch path matches hnne to
    # float32 precision.
    ref, expected = hnne_reference(
        digits, n_components=8, metric=metric, random_state=0
    )
    proj = HNNEProjector(dim=8, metric=metric, device="cpu", random_state=0)
    codes = proj.fit(digits).transform(digits)
    np.testing.assert_array_equal(
        proj.hnne_.hierarchy_parameters.partitions,
        ref.hierarchy_parameters.partitions,
    )
    assert codes.dtype == np.float32 and codes.shape == (600, 8)
    np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-4)


def test_equals_hnne_transform_2d(digits):
    # dim <= 3: hnne's inflation divides by the spread of small clusters and
    # magnifies float32 rounding of the PCA for a few tokens (see Notes).
    # (hnne's 2-D packing is slow pure Python: 300 tokens keep the test short)
    X = digits[:300]
    _, expected = hnne_reference(X, n_components=2, random_state=0)
    codes = HNNEProjector(dim=2, device="cpu", random_state=0).fit_transform(X)
    err = np.abs(codes - expected).max(axis=1)
    assert np.median(err) < 1e-5
    assert np.mean(err < 1e-3) >= 0.98
    assert err.max() < 0.1 * np.abs(expected).max()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("ann_threshold", [20_000, 400])
def test_hierarchy_equals_hnne_fit_only_hierarchy(digits, metric, ann_threshold):
    # finch_hierarchy + set_hierarchy (FINCH's exact cosine neighbours
    # without its (n, n) copies) give hnne's hierarchy field by field, in
    # the exact regime and above ann_threshold (NN-descent at level 0), on
    # tokens with duplicates (zero distances: ties, the clip at 0)
    from skstego.projection._hnne import finch_hierarchy, set_hierarchy

    X = np.concatenate([digits, digits[:50], _blob_tokens(n=400, d=64)])
    params = {"metric": metric, "ann_threshold": ann_threshold, "random_state": 0}
    ref = HNNE(**params)
    ref.fit_only_hierarchy(X)
    ours = HNNE(**params)
    set_hierarchy(ours, finch_hierarchy(ours, X))
    a, b = ours.hierarchy_parameters, ref.hierarchy_parameters
    assert len(a.partition_sizes) > 1
    np.testing.assert_array_equal(a.partitions, b.partitions)
    np.testing.assert_array_equal(a.partition_sizes, b.partition_sizes)
    for u, v in zip(a.partition_labels, b.partition_labels, strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.lowest_level_centroids, b.lowest_level_centroids)
    assert a.requested_partition is b.requested_partition is None


def test_fit_transform_is_fit_then_transform(digits):
    a = HNNEProjector(dim=3, device="cpu", random_state=1).fit_transform(digits)
    b = HNNEProjector(dim=3, device="cpu", random_state=1).fit(digits).transform(digits)
    np.testing.assert_array_equal(a, b)


def _blob_tokens(n=3000, d=32, modes=12, seed=0):
    """Float32 tokens around a few modes: a hierarchy of several levels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(modes, d))
    X = centres[rng.integers(modes, size=n)] + rng.normal(size=(n, d))
    return (X + rng.uniform(0, 1, d)).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("dim", [2, 8])
def test_fit_transform_keeps_proven_clusters_and_equals_transform(
    monkeypatch, metric, dim
):
    # fit_transform keeps the cluster hnne put a training token in wherever
    # that is provably the centroid transform finds, and searches the rest:
    # the codes are those of fit(X).transform(X), row by row
    from skstego.projection import _hnne

    X = _blob_tokens(n=3000 if dim > 3 else 1000)  # hnne's 2-D packing is slow
    searched = []
    nearest = _hnne.nearest_rows

    def spy(x, *args):
        searched.append(x.shape[0])
        return nearest(x, *args)

    kw = {"dim": dim, "metric": metric, "device": "cpu", "random_state": 0}
    monkeypatch.setattr(_hnne, "nearest_rows", spy)
    codes = HNNEProjector(**kw).fit_transform(X)
    kept = len(X) - sum(searched)
    assert kept > 0.5 * len(X)  # most tokens certified here
    searched.clear()
    proj = HNNEProjector(**kw).fit(X)
    expected = proj.transform(X)
    assert sum(searched) == len(X)
    np.testing.assert_array_equal(codes, expected)
    # and hnne's own transform (float64): the same nearest centroid, so the
    # same codes up to float32 rounding (2-D: see test_equals_hnne_transform_2d)
    ref = HNNE(n_components=dim, metric=metric, random_state=0)
    layout = ref.fit(X)
    theirs = ref.transform(X)
    err = np.abs(codes - theirs).max(axis=1)
    scale = np.abs(theirs).max()
    if dim > 3:
        np.testing.assert_allclose(codes, theirs, rtol=1e-4, atol=1e-4 * scale)
    else:
        assert np.mean(err < 1e-3 * scale) >= 0.98
    # hnne's training layout equals its transform for the tokens farthest
    # from their cluster's mean (same anchor, same scale); ours agrees there
    same = np.abs(layout - theirs).max(axis=1) < 1e-9 * scale
    assert same.sum() > 0.1 * len(X)
    agree = np.abs(codes[same] - layout[same]).max(axis=1) < 1e-3 * scale
    assert np.mean(agree) >= (1.0 if dim > 3 else 0.98)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_certified_guesses_are_the_exact_nearest_centroid(metric):
    # whatever the guess (hnne's clusters, random, or a near-tie), a
    # certified token's guess is the float32 search's pick and the float64
    # argmax
    from skstego.projection import _hnne

    X = _blob_tokens(n=2000, seed=1)
    proj = HNNEProjector(dim=4, metric=metric, device="cpu", random_state=0)
    proj.fit(X)
    cosine = metric == "cosine"
    p = proj._params(torch.device("cpu"))
    x = torch.from_numpy(X)
    # near-ties: tokens half way between two centroids
    c = p["centers"]
    mid = (0.5 * (c[:-1] + c[1:]))[:500]
    x = torch.cat([x, mid])
    hnne_own = torch.as_tensor(proj.hnne_.hierarchy_parameters.partitions[:, 0])
    found = _hnne.nearest_rows(x, c, cosine, None if cosine else p["neg_c_sq"])
    xd = torch.nn.functional.normalize(x.double(), dim=1) if cosine else x.double()
    cd = c.double()
    exact = (xd @ cd.T if cosine else 2 * xd @ cd.T - (cd * cd).sum(1)).argmax(1)
    rng = np.random.default_rng(0)
    guesses = {
        "hnne": torch.cat([hnne_own, torch.arange(len(mid))]),
        "found": found,
        "random": torch.as_tensor(rng.integers(len(c), size=len(x))),
    }
    for name, own in guesses.items():
        groups = _hnne._groups(proj.hnne_, p, x, own, cosine)
        idx, ok = _hnne._certified(x, own, groups, cosine)
        assert torch.equal(idx[ok], found[ok]), name
        assert torch.equal(idx[ok], exact[ok]), name
        if name == "random":  # a random group rarely holds the nearest
            assert ok.float().mean() < 0.05
        else:
            assert ok[: len(X)].float().mean() > 0.5, name
            assert ok[len(X) :].float().mean() < 0.5, name  # near-ties


def test_maps_are_projected_token_by_token(digits):
    maps = digits[:24].reshape(24, 4, 4, 4)  # (N, C, h, w)
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 4)
    proj = HNNEProjector(dim=3, device="cpu", random_state=0).fit(maps)
    ref = HNNE(n_components=3, random_state=0)
    ref.fit_only_hierarchy(tokens)
    np.testing.assert_array_equal(
        proj.hnne_.hierarchy_parameters.partitions,
        ref.hierarchy_parameters.partitions,
    )
    codes = proj.transform(maps)
    assert codes.shape == (24, 3, 4, 4)
    flat = proj.transform(tokens)
    np.testing.assert_allclose(
        codes.transpose(0, 2, 3, 1).reshape(-1, 3), flat, rtol=1e-6, atol=1e-6
    )


def test_torch_in_torch_out_and_input_untouched(digits):
    X = digits.copy()
    proj = HNNEProjector(dim=4, device="cpu", random_state=0)
    codes = proj.fit_transform(X)
    np.testing.assert_array_equal(X, digits)
    Xt = torch.from_numpy(digits.copy()).requires_grad_()
    out = proj.transform(Xt)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
    np.testing.assert_allclose(out.numpy(), codes, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(Xt.detach().numpy(), digits)


def test_subsample_fits_on_max_fit_samples_tokens(digits):
    kw = {"dim": 4, "max_fit_samples": 250, "device": "cpu"}
    a = HNNEProjector(random_state=0, **kw).fit(digits)
    b = HNNEProjector(random_state=0, **kw).fit(digits)
    c = HNNEProjector(random_state=1, **kw).fit(digits)
    parts = a.hnne_.hierarchy_parameters.partitions
    assert parts.shape[0] == 250
    np.testing.assert_array_equal(parts, b.hnne_.hierarchy_parameters.partitions)
    # Every finest-level centroid is the mean of distinct rows of X, so it lies
    # in the convex hull of the data: here, inside the per-feature range.
    cents = a.hnne_.hierarchy_parameters.lowest_level_centroids
    assert np.all(cents >= digits.min(0) - 1e-4)
    assert np.all(cents <= digits.max(0) + 1e-4)
    assert not np.array_equal(
        cents, c.hnne_.hierarchy_parameters.lowest_level_centroids
    )
    assert a.transform(digits).shape == (600, 4)
    # fit_transform on a subsample searches every token (no cluster of hnne's
    # to keep for the tokens it did not fit): still fit(X).transform(X)
    codes = HNNEProjector(random_state=0, **kw).fit_transform(digits)
    np.testing.assert_array_equal(codes, a.transform(digits))


def test_pickle_roundtrip(digits):
    proj = HNNEProjector(dim=3, device="cpu", random_state=0).fit(digits[:300])
    back = pickle.loads(pickle.dumps(proj))
    np.testing.assert_array_equal(back.transform(digits), proj.transform(digits))


def test_feature_names_out(digits):
    proj = HNNEProjector(dim=3, device="cpu", random_state=0).fit(digits[:200])
    assert list(proj.get_feature_names_out()) == [
        "hnneprojector0",
        "hnneprojector1",
        "hnneprojector2",
    ]


# ----------------------------------------------------------------- edge cases


def test_dim_larger_than_n_features_is_a_clear_error():
    X = np.random.default_rng(0).random((50, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"dim=5 is larger than n_features=3"):
        HNNEProjector(dim=5, device="cpu").fit(X)


def test_dim_larger_than_fit_tokens_is_a_clear_error():
    X = np.random.default_rng(0).random((50, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"n_samples=4"):
        HNNEProjector(dim=6, max_fit_samples=4, device="cpu").fit(X)


def test_one_sample_is_a_clear_error():
    with pytest.raises(ValueError, match="1 sample"):
        HNNEProjector(dim=1, device="cpu").fit(np.ones((1, 4), dtype=np.float32))


def test_tiny_data_warns_and_falls_back(digits):
    # 5 tokens: FINCH finds fewer than 3 clusters; hnne itself refuses.
    X = digits[:5]
    with pytest.raises(ValueError, match="too few points"):
        HNNE(n_components=2, random_state=0).fit(X)
    proj = HNNEProjector(dim=2, device="cpu", random_state=0)
    with pytest.warns(UserWarning, match="all levels are kept"):
        codes = proj.fit_transform(X)
    assert codes.shape == (5, 2) and np.all(np.isfinite(codes))
    assert proj.hnne_.hierarchy_parameters.partition_sizes[-1] < 3


def test_dim_1_works(digits):
    # hnne's own transform fails for n_components=1 (no inflation parameters).
    proj = HNNEProjector(dim=1, device="cpu", random_state=0).fit(digits)
    codes = proj.transform(digits)
    assert codes.shape == (600, 1) and np.all(np.isfinite(codes))
    ref = HNNE(n_components=1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = ref.fit(digits)  # hnne's training layout of the same points
    # Same hierarchy and anchors: the out-of-sample codes follow hnne's layout.
    assert np.corrcoef(codes[:, 0], layout[:, 0])[0, 1] > 0.99


def test_random_linear_is_rejected():
    X = np.random.default_rng(0).random((50, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="preliminary_embedding"):
        HNNEProjector(preliminary_embedding="random_linear").fit(X)


def test_wrong_feature_count_at_transform(digits):
    proj = HNNEProjector(dim=4, device="cpu", random_state=0).fit(digits[:200])
    with pytest.raises(ValueError, match="64 features"):
        proj.transform(digits[:10, :10])


# ----------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_transform_matches_cpu(digits):
    proj = HNNEProjector(dim=8, device="cpu", random_state=0).fit(digits)
    expected = proj.transform(digits)
    proj.set_params(device="cuda")
    out = proj.transform(torch.from_numpy(digits).cuda())
    assert out.is_cuda and out.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-4, atol=1e-4)
    maps = digits[:24].reshape(24, 4, 4, 4)
    codes = HNNEProjector(dim=3, device="cuda", random_state=0).fit_transform(maps)
    assert isinstance(codes, np.ndarray) and codes.shape == (24, 3, 4, 4)
