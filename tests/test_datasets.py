"""Tests of the synthetic data generators in skstego.datasets."""

import numpy as np
import pytest
from _references import hungarian_scores
from scipy.ndimage import uniform_filter
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression

from skstego.datasets import make_feature_maps, make_scenes


def _tokens(maps):
    """(N, C, h, w) -> (N * h * w, C)."""
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


# --------------------------------------------------------------------------
# make_scenes
# --------------------------------------------------------------------------
def test_scenes_shapes_and_dtypes():
    images, labels = make_scenes(3, size=24, n_classes=4, random_state=0)
    assert images.shape == (3, 24, 24, 3) and images.dtype == np.uint8
    assert labels.shape == (3, 24, 24) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 4


def test_scenes_rectangular_size():
    images, labels = make_scenes(2, size=(16, 40), random_state=0)
    assert images.shape == (2, 16, 40, 3)
    assert labels.shape == (2, 16, 40)


def test_scenes_deterministic_and_seed_dependent():
    a = make_scenes(4, size=32, random_state=0)
    b = make_scenes(4, size=32, random_state=0)
    c = make_scenes(4, size=32, random_state=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize(
    "make_state",
    [np.random.RandomState, np.random.default_rng],
    ids=["RandomState", "Generator"],
)
def test_scenes_accept_random_state_objects(make_state):
    a = make_scenes(2, size=16, random_state=make_state(3))
    b = make_scenes(2, size=16, random_state=make_state(3))
    np.testing.assert_array_equal(a[0], b[0])


def test_scenes_none_uses_global_numpy_state():
    np.random.seed(5)  # noqa: NPY002 (the legacy global state is what None uses)
    a = make_scenes(2, size=16)
    np.random.seed(5)  # noqa: NPY002
    b = make_scenes(2, size=16)
    np.testing.assert_array_equal(a[1], b[1])


def test_scenes_prefix_property():
    big = make_scenes(7, size=20, ignore_fraction=0.05, random_state=4)
    small = make_scenes(3, size=20, ignore_fraction=0.05, random_state=4)
    np.testing.assert_array_equal(big[0][:3], small[0])
    np.testing.assert_array_equal(big[1][:3], small[1])


def test_scenes_all_classes_present_and_several_per_image():
    _, labels = make_scenes(30, size=32, n_classes=8, random_state=0)
    assert set(np.unique(labels).tolist()) == set(range(8))
    per_image = [np.unique(lab).size for lab in labels]
    assert min(per_image) >= 2
    assert max(per_image) <= 4


def test_scenes_two_classes():
    _, labels = make_scenes(5, size=16, n_classes=2, random_state=0)
    for lab in labels:
        assert set(np.unique(lab).tolist()) == {0, 1}


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3])
def test_scenes_ignore_fraction_exact_per_image(fraction):
    _, labels = make_scenes(5, size=(30, 20), ignore_fraction=fraction, random_state=0)
    expected = round(fraction * 30 * 20)
    for lab in labels:
        assert int((lab == -1).sum()) == expected
        assert lab[lab >= 0].max() < 5


def test_scenes_ignore_only_masks_boundaries():
    images0, labels0 = make_scenes(6, size=48, random_state=2)
    images1, labels1 = make_scenes(6, size=48, ignore_fraction=0.05, random_state=2)
    # same images, same labels outside the ignored pixels
    np.testing.assert_array_equal(images0, images1)
    kept = labels1 >= 0
    np.testing.assert_array_equal(labels0[kept], labels1[kept])
    # ignored pixels hug class boundaries: another class within 2 pixels
    pad = np.pad(labels0, ((0, 0), (2, 2), (2, 2)), mode="edge")
    lo = np.full(labels0.shape, np.iinfo(np.int64).max)
    hi = np.full(labels0.shape, np.iinfo(np.int64).min)
    for dy in range(5):
        for dx in range(5):
            window = pad[:, dy : dy + 48, dx : dx + 48]
            lo, hi = np.minimum(lo, window), np.maximum(hi, window)
    near_boundary = lo != hi
    assert near_boundary[labels1 == -1].mean() > 0.95


def test_scenes_zero_ignore_has_no_ignored_pixels():
    _, labels = make_scenes(3, size=16, random_state=0)
    assert (labels >= 0).all()


def test_scenes_colour_informative_texture_helps():
    """Colour alone classifies pixels well but not perfectly; texture adds."""
    images, labels = make_scenes(40, size=48, n_classes=8, random_state=0)
    rgb = images.astype(np.float64)
    mean = uniform_filter(rgb, size=(1, 5, 5, 1))
    std = np.sqrt(np.maximum(uniform_filter(rgb**2, size=(1, 5, 5, 1)) - mean**2, 0))
    feats = np.concatenate([rgb, std], axis=-1).reshape(-1, 6)
    y = labels.reshape(-1)
    half = y.size // 2
    colour = QuadraticDiscriminantAnalysis().fit(feats[:half, :3], y[:half])
    both = QuadraticDiscriminantAnalysis().fit(feats[:half], y[:half])
    acc_colour = colour.score(feats[half:, :3], y[half:])
    acc_both = both.score(feats[half:], y[half:])
    assert 0.4 < acc_colour < 0.95
    assert acc_both > acc_colour + 0.02


def test_scenes_class_appearance_shared_across_seeds():
    """Classes look the same in sets drawn with different seeds."""
    means = []
    for seed in (0, 1):
        images, labels = make_scenes(40, size=32, n_classes=4, random_state=seed)
        means.append(np.stack([images[labels == c].mean(axis=0) for c in range(4)]))
    dist = np.linalg.norm(means[0][:, None] - means[1][None], axis=-1)
    np.testing.assert_array_equal(dist.argmin(axis=1), np.arange(4))
    assert np.diag(dist).max() < 0.5 * dist[~np.eye(4, dtype=bool)].min()


def test_scenes_speed_scales_linearly_enough():
    # not a timing assertion: just a smoke test of a larger call
    images, labels = make_scenes(200, size=32, random_state=0)
    assert images.shape[0] == labels.shape[0] == 200


# --------------------------------------------------------------------------
# make_feature_maps
# --------------------------------------------------------------------------
def test_feature_maps_shapes_and_dtypes():
    maps, labels = make_feature_maps(
        3, n_features=48, n_classes=4, map_size=6, label_size=(24, 30), random_state=0
    )
    assert maps.shape == (3, 48, 6, 6) and maps.dtype == np.float32
    assert labels.shape == (3, 24, 30) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 4
    assert np.isfinite(maps).all()


def test_feature_maps_default_label_size_is_map_size():
    maps, labels = make_feature_maps(2, n_features=32, map_size=(5, 7), random_state=0)
    assert maps.shape == (2, 32, 5, 7)
    assert labels.shape == (2, 5, 7)


def test_feature_maps_deterministic_and_seed_dependent():
    kw = dict(n_features=32, map_size=8)
    a = make_feature_maps(3, random_state=0, **kw)
    b = make_feature_maps(3, random_state=0, **kw)
    c = make_feature_maps(3, random_state=1, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_feature_maps_prefix_property():
    kw = dict(n_features=40, map_size=6, label_size=12, random_state=9)
    big = make_feature_maps(6, **kw)
    small = make_feature_maps(2, **kw)
    np.testing.assert_array_equal(big[0][:2], small[0])
    np.testing.assert_array_equal(big[1][:2], small[1])


def test_feature_maps_share_layouts_with_scenes():
    _, scene_labels = make_scenes(4, size=32, n_classes=6, random_state=3)
    _, map_labels = make_feature_maps(
        4, n_features=16, n_classes=6, map_size=8, label_size=32, random_state=3
    )
    np.testing.assert_array_equal(scene_labels, map_labels)


def test_feature_maps_ignore_fraction():
    _, labels = make_feature_maps(
        4, n_features=16, map_size=8, label_size=32, ignore_fraction=0.1, random_state=0
    )
    for lab in labels:
        assert int((lab == -1).sum()) == round(0.1 * 32 * 32)


def test_feature_maps_ignore_does_not_change_features():
    kw = dict(n_features=16, map_size=8, label_size=16, random_state=0)
    maps0, _ = make_feature_maps(3, **kw)
    maps1, _ = make_feature_maps(3, ignore_fraction=0.2, **kw)
    np.testing.assert_array_equal(maps0, maps1)


def test_feature_maps_all_classes_present():
    _, labels = make_feature_maps(30, n_features=16, n_classes=7, random_state=0)
    assert set(np.unique(labels).tolist()) == set(range(7))


def test_feature_maps_positive_mean_like_vit():
    maps, _ = make_feature_maps(10, n_features=64, map_size=8, random_state=0)
    channel_mean = maps.mean(axis=(0, 2, 3))
    assert channel_mean.mean() > 0.5
    assert (channel_mean > 0).mean() > 0.8
    flat, _ = make_feature_maps(
        10, n_features=64, map_size=8, offset=0.0, random_state=0
    )
    assert abs(flat.mean()) < 0.2


def test_feature_maps_noise_free_tokens_are_cell_constant():
    """Without noise or smooth nuisance, and labels at the feature resolution,
    a token is its cell's vector: at most 8 distinct tokens per image."""
    maps, labels = make_feature_maps(
        4, n_features=24, map_size=8, noise=0.0, nuisance_scale=0.0, random_state=0
    )
    for fmap, lab in zip(maps, labels, strict=True):
        tokens = fmap.reshape(24, -1).T.round(4)
        distinct = np.unique(tokens, axis=0).shape[0]
        assert np.unique(lab).size <= distinct <= 8


def test_feature_maps_class_sep_sets_distances():
    """Noise- and nuisance-free tokens: class means class_sep apart."""
    maps, labels = make_feature_maps(
        40,
        n_features=24,
        n_classes=4,
        map_size=8,
        noise=0.0,
        mode_scale=0.0,
        nuisance_scale=0.0,
        class_sep=3.0,
        random_state=0,
    )
    tokens = _tokens(maps).astype(np.float64)
    y = labels.reshape(-1)
    means = np.stack([tokens[y == c].mean(axis=0) for c in range(4)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    off_diag = dist[~np.eye(4, dtype=bool)]
    # per-image jitter (10 % of class_sep) and boundary mixing blur a little
    np.testing.assert_allclose(off_diag, 3.0, rtol=0.1)


def test_feature_maps_linear_probe_near_perfect_across_seeds():
    """Class information is linearly available in raw tokens; the world is
    shared between seeds, so a probe fitted on one set scores on another."""
    train, y_train = make_feature_maps(60, map_size=8, random_state=0)
    test, y_test = make_feature_maps(30, map_size=8, random_state=1)
    clf = LogisticRegression(max_iter=300).fit(_tokens(train), y_train.reshape(-1))
    assert clf.score(_tokens(test), y_test.reshape(-1)) > 0.97


def test_feature_maps_kmeans_converges_better_after_pca():
    """The mechanism of the STEGO study, with the default parameters: PCA to
    the class dimension lets k-means find the classes; k-means on the raw
    tokens has the same optimum but often stops in a local one (a class
    split, two merged). Averaged over data seeds and k-means seeds,
    ``n_init=1`` in both arms."""
    k = 5
    raw_scores, pca_scores = [], []
    for seed in range(4):
        maps, labels = make_feature_maps(100, map_size=8, random_state=seed)
        tokens, y = _tokens(maps), labels.reshape(-1)
        codes = PCA(n_components=k - 1, random_state=0).fit_transform(tokens)
        for km_seed in range(2):
            raw = KMeans(k, n_init=1, random_state=km_seed).fit_predict(tokens)
            low = KMeans(k, n_init=1, random_state=km_seed).fit_predict(codes)
            raw_scores.append(hungarian_scores(y, raw, k, k)[0])
            pca_scores.append(hungarian_scores(y, low, k, k)[0])
    assert np.mean(pca_scores) > 0.9
    assert np.median(pca_scores) > 0.98
    assert np.mean(pca_scores) - np.mean(raw_scores) > 0.1
    # the raw runs that fail are stuck in a local optimum, not noise
    assert min(raw_scores) < 0.8


# --------------------------------------------------------------------------
# parameter validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_images=0), "n_images"),
        (dict(n_images=2.0), "n_images"),
        (dict(n_images=True), "n_images"),
        (dict(n_classes=1), "n_classes"),
        (dict(size=4), "size"),
        (dict(size=(16, 4)), "size"),
        (dict(size=(16, 16, 3)), "size"),
        (dict(size="big"), "size"),
        (dict(ignore_fraction=1.0), "ignore_fraction"),
        (dict(ignore_fraction=-0.1), "ignore_fraction"),
        (dict(ignore_fraction=float("nan")), "ignore_fraction"),
    ],
)
def test_scenes_bad_parameters(kwargs, match):
    kwargs = {"n_images": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_scenes(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_images=0), "n_images"),
        (dict(n_features=0), "n_features"),
        (dict(n_classes=1), "n_classes"),
        (dict(n_informative=0), "n_informative"),
        (dict(n_features=8, n_informative=9), "n_informative"),
        (dict(n_features=8, n_informative=4, n_nuisance=5), "n_nuisance"),
        (dict(n_nuisance=-1), "n_nuisance"),
        (dict(n_modes=0), "n_modes"),
        (dict(map_size=1), "map_size"),
        (dict(map_size=8, label_size=4), "label_size"),
        (dict(map_size=(8, 8), label_size=(16, 6)), "label_size"),
        (dict(class_sep=0.0), "class_sep"),
        (dict(mode_scale=-1.0), "mode_scale"),
        (dict(nuisance_scale=-1.0), "nuisance_scale"),
        (dict(noise=-0.5), "noise"),
        (dict(noise=float("inf")), "noise"),
        (dict(offset=-1.0), "offset"),
        (dict(ignore_fraction=1.5), "ignore_fraction"),
    ],
)
def test_feature_maps_bad_parameters(kwargs, match):
    kwargs = {"n_images": 2, "n_features": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_feature_maps(**kwargs)


def test_feature_maps_small_feature_space_works():
    # fewer nuisance dimensions than modes (random mode directions), r < k - 1
    maps, _ = make_feature_maps(
        3, n_features=10, n_classes=6, n_informative=2, map_size=4, random_state=0
    )
    assert maps.shape == (3, 10, 4, 4)
    maps, _ = make_feature_maps(2, n_features=5, n_nuisance=0, random_state=0)
    assert np.isfinite(maps).all()
