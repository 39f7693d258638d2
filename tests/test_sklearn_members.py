"""Members added against the scikit-learn peers (issue 17), each checked
against scikit-learn on the same data."""

import numpy as np
import pytest
import scipy.linalg
import timm
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.random_projection import GaussianRandomProjection

from skstego import (
    CRFProbe,
    DinoFeaturizer,
    FlipAveraged,
    HNNEClusterProbe,
    LinearProbe,
    RandomProjection,
    TorchPCA,
)


@pytest.fixture
def X():
    rng = np.random.RandomState(0)
    return rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 3


# ------------------------------------------------------------------ TorchPCA


@pytest.mark.parametrize("solver", ["covariance_eigh", "full"])
@pytest.mark.parametrize("dim", [3, 0.5, 0.9, 0.95])
def test_pca_ppca_members_match_sklearn(X, solver, dim):
    ref = PCA(n_components=dim, svd_solver=solver).fit(X)
    pca = TorchPCA(dim=dim, solver=solver, device="cpu").fit(X)
    assert pca.n_components_ == ref.n_components_
    assert pca.noise_variance_ == pytest.approx(
        ref.noise_variance_, rel=1e-5, abs=1e-6 * ref.explained_variance_.sum()
    )
    scale = np.abs(ref.get_covariance()).max()
    np.testing.assert_allclose(
        pca.get_covariance(), ref.get_covariance(), rtol=0, atol=5e-6 * scale
    )
    prec = ref.get_precision()
    np.testing.assert_allclose(
        pca.get_precision(), prec, rtol=0, atol=5e-5 * np.abs(prec).max()
    )
    np.testing.assert_allclose(pca.score_samples(X), ref.score_samples(X), rtol=1e-5)
    assert pca.score(X) == pytest.approx(ref.score(X), rel=1e-6)


def test_pca_fraction_auto_and_partial_fit(X):
    ref = PCA(n_components=0.9).fit(X)
    assert TorchPCA(dim=0.9, device="cpu").fit(X).n_components_ == ref.n_components_
    stream = TorchPCA(dim=0.9, device="cpu")
    for batch in np.split(X, 3):
        stream.partial_fit(batch)
    assert stream.n_components_ == ref.n_components_
    np.testing.assert_allclose(
        stream.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-5
    )


def test_pca_fraction_rejected_by_randomized(X):
    with pytest.raises(ValueError, match="randomized"):
        TorchPCA(dim=0.9, solver="randomized", device="cpu").fit(X)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError):
            TorchPCA(dim=bad, device="cpu").fit(X)


def test_pca_standardize_scores_in_standardized_space(X):
    ref = make_pipeline(StandardScaler(), PCA(4)).fit(X)
    pca = TorchPCA(dim=4, standardize=True, device="cpu").fit(X)
    np.testing.assert_allclose(pca.score_samples(X), ref.score_samples(X), rtol=1e-5)
    np.testing.assert_allclose(
        pca.get_covariance(), ref[-1].get_covariance(), rtol=0, atol=1e-6
    )


def test_pca_whiten_models_the_data(X):
    # The model is the data's: whiten=True gives sklearn's whiten=False values
    ref = PCA(3).fit(X)
    pca = TorchPCA(dim=3, whiten=True, device="cpu").fit(X)
    scale = np.abs(ref.get_covariance()).max()
    np.testing.assert_allclose(
        pca.get_covariance(), ref.get_covariance(), rtol=0, atol=5e-6 * scale
    )
    np.testing.assert_allclose(pca.score_samples(X), ref.score_samples(X), rtol=1e-5)


def test_pca_score_samples_maps_and_tensors():
    rng = np.random.RandomState(1)
    maps = rng.normal(size=(3, 6, 4, 5))
    pca = TorchPCA(dim=2, device="cpu").fit(maps)
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 6)
    ref = PCA(2).fit(tokens)
    ll = pca.score_samples(maps)
    assert ll.shape == (3, 4, 5)
    np.testing.assert_allclose(ll.reshape(-1), ref.score_samples(tokens), rtol=1e-5)
    llt = pca.score_samples(torch.as_tensor(maps))
    assert isinstance(llt, torch.Tensor)
    np.testing.assert_allclose(llt.numpy(), ll, rtol=1e-12)
    assert pca.score(maps) == pytest.approx(ref.score(tokens), rel=1e-6)


# --------------------------------------------------------- RandomProjection


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_random_projection_inverse_components(X, kind):
    rp = RandomProjection(
        5, kind=kind, compute_inverse_components=True, device="cpu", random_state=0
    ).fit(X)
    assert rp.inverse_components_.shape == (10, 5)
    assert rp.inverse_components_.dtype == np.float32
    np.testing.assert_allclose(
        rp.inverse_components_,
        scipy.linalg.pinv(rp.components_.astype(np.float64)),
        rtol=1e-5,
        atol=1e-6,
    )
    # sklearn's inverse_transform with the same matrix
    ref = GaussianRandomProjection(5, compute_inverse_components=True).fit(X)
    ref.components_ = rp.components_.astype(np.float64)
    ref.inverse_components_ = ref._compute_inverse_components()
    codes = rp.transform(X)
    np.testing.assert_allclose(
        rp.inverse_transform(codes),
        ref.inverse_transform(codes.astype(np.float64)),
        rtol=1e-4,
        atol=1e-4,
    )
    lazy = RandomProjection(5, kind=kind, device="cpu", random_state=0).fit(X)
    assert not hasattr(lazy, "inverse_components_")
    np.testing.assert_allclose(
        lazy.inverse_transform(codes), rp.inverse_transform(codes), atol=1e-5
    )
    # refit without the flag drops the attribute
    rp.set_params(compute_inverse_components=False).fit(X)
    assert not hasattr(rp, "inverse_components_")


# --------------------------------------------------------- HNNEClusterProbe


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_hnne_cluster_transform_inertia_match_kmeans(metric):
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 8)) * 5
    y = np.repeat([0, 1, 2], 100)
    X = (means[y] + rng.normal(size=(300, 8))).astype(np.float32)
    probe = HNNEClusterProbe(k=3, metric=metric, device="cpu", random_state=0)
    probe.fit(X)
    C = probe.cluster_centers_.astype(np.float64)
    Xm = X.astype(np.float64)
    if metric == "cosine":  # distances between unit vectors (documented)
        Xm = Xm / np.linalg.norm(Xm, axis=1, keepdims=True)
    km = KMeans(n_clusters=len(C), init=C, n_init=1, max_iter=1).fit(Xm)
    km.cluster_centers_ = C  # KMeans as the reference with these centroids
    D = probe.transform(X)
    assert D.dtype == np.float32 and D.shape == (300, len(C))
    np.testing.assert_allclose(D, km.transform(Xm), rtol=1e-6, atol=1e-6)
    assert probe.inertia_ == pytest.approx(-km.score(Xm), rel=1e-6)
    assert probe.score(X) == pytest.approx(-probe.inertia_, rel=1e-9)
    assert probe.n_iter_ == len(probe.levels_)
    names = probe.get_feature_names_out()
    assert list(names) == [f"hnneclusterprobe{i}" for i in range(len(C))]
    # maps keep their layout
    maps = X[:40].reshape(2, 4, 5, 8).transpose(0, 3, 1, 2)
    Dm = probe.transform(maps)
    assert Dm.shape == (2, len(C), 4, 5)
    np.testing.assert_allclose(
        Dm.transpose(0, 2, 3, 1).reshape(-1, len(C)), D[:40], rtol=1e-6
    )


# ------------------------------------------------------------ DinoFeaturizer


def _vit():
    return timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )


def test_dino_feature_names_and_pipeline():
    featurizer = DinoFeaturizer(_vit(), resolution=32, device="cpu")
    names = featurizer.get_feature_names_out()
    assert list(names) == [f"dino{i}" for i in range(16)]
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert featurizer.transform(images).shape[1] == len(names)
    pipe = Pipeline([("dino", featurizer), ("pca", TorchPCA(3, device="cpu"))])
    pipe.fit(images)
    assert list(pipe.get_feature_names_out()) == ["torchpca0", "torchpca1", "torchpca2"]
    # a name is resolved without weights nor forward pass
    assert (
        len(DinoFeaturizer("vit_small_patch8_224.dino").get_feature_names_out()) == 384
    )


def test_dino_set_output():
    featurizer = DinoFeaturizer(_vit(), resolution=32, device="cpu")
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert featurizer.set_output(transform="default") is featurizer
    assert featurizer.transform(images).shape == (2, 16, 4, 4)
    featurizer.set_output(transform="pandas")
    with pytest.raises(ValueError, match="4-D feature maps"):
        featurizer.transform(images)


# ----------------------------------------------------------------- doc link


@pytest.mark.parametrize(
    "estimator",
    [
        TorchPCA(),
        RandomProjection(),
        HNNEClusterProbe(),
        LinearProbe(),
        DinoFeaturizer(),
        FlipAveraged(DinoFeaturizer()),
        CRFProbe(LinearProbe()),
    ],
    ids=lambda e: type(e).__name__,
)
def test_html_repr_doc_link(estimator, monkeypatch):
    name = type(estimator).__name__
    monkeypatch.delenv("SKSTEGO_DOC_URL", raising=False)
    link = f"api/generated/skstego.{name}.html"
    assert estimator._get_doc_link() == link
    assert link in estimator._repr_html_()
    monkeypatch.setenv("SKSTEGO_DOC_URL", "https://example.org/skstego")
    assert estimator._get_doc_link() == f"https://example.org/skstego/{link}"


# ---------------------------------------------------------------- dim="mle"


def _mle_datasets():
    from sklearn.datasets import load_diabetes, load_digits, load_iris

    rng = np.random.RandomState(0)
    low_rank = rng.randn(300, 4) @ rng.randn(4, 12) * 3 + 0.3 * rng.randn(300, 12)
    square = rng.randn(40, 10) @ rng.randn(10, 40) + 0.2 * rng.randn(40, 40)
    return {
        "iris": load_iris().data,
        "diabetes": load_diabetes().data,
        "digits": load_digits().data[:400],  # constant pixels: zero eigenvalues
        "low_rank": low_rank,
        "square": square,
    }


@pytest.mark.parametrize("solver", ["auto", "covariance_eigh", "full"])
@pytest.mark.parametrize("name", sorted(_mle_datasets()))
def test_pca_mle_matches_sklearn(name, solver):
    from sklearn.decomposition import PCA

    X = _mle_datasets()[name]
    ref = PCA(n_components="mle").fit(X)
    pca = TorchPCA(dim="mle", solver=solver, device="cpu").fit(X)
    assert pca.n_components_ == ref.n_components_
    signs = np.sign(np.sum(pca.components_ * ref.components_, axis=1))
    np.testing.assert_allclose(
        pca.components_ * signs[:, None], ref.components_, atol=1e-4
    )
    np.testing.assert_allclose(
        pca.explained_variance_, ref.explained_variance_, rtol=1e-4
    )
    # digits keeps every non-zero eigenvalue: its noise is float32 rounding.
    atol = 1e-5 * ref.explained_variance_[0]
    np.testing.assert_allclose(
        pca.noise_variance_, ref.noise_variance_, rtol=1e-4, atol=atol
    )


def test_pca_mle_infer_dimension_matches_sklearn():
    # The re-implementation against scikit-learn's private functions.
    from sklearn.decomposition._pca import _assess_dimension, _infer_dimension

    from skstego.projection import _pca

    rng = np.random.RandomState(1)
    for _ in range(5):
        spectrum = np.sort(rng.exponential(size=15))[::-1].copy()
        spectrum[-2:] = 0.0
        for n_samples in (20, 500):
            assert _pca._infer_dimension(spectrum, n_samples) == int(
                _infer_dimension(spectrum, n_samples)
            )
            for rank in range(1, 15):
                ours = _pca._assess_dimension(spectrum, rank, n_samples)
                theirs = _assess_dimension(spectrum, rank, n_samples)
                np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_pca_mle_partial_fit_and_standardize():
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    X = _mle_datasets()["low_rank"]
    stream = TorchPCA(dim="mle", device="cpu")
    for batch in np.array_split(X, 3):
        stream.partial_fit(batch)
    assert stream.n_components_ == PCA(n_components="mle").fit(X).n_components_
    std = TorchPCA(dim="mle", standardize=True, device="cpu").fit(X)
    ref = PCA(n_components="mle").fit(StandardScaler().fit_transform(X))
    assert std.n_components_ == ref.n_components_


def test_pca_mle_errors():
    X = np.random.RandomState(0).randn(5, 10)
    with pytest.raises(ValueError, match="n_samples >= n_features"):
        TorchPCA(dim="mle", device="cpu").fit(X)
    with pytest.raises(ValueError, match="n_samples >= n_features"):
        TorchPCA(dim="mle", solver="full", device="cpu").fit(X)
    pca = TorchPCA(dim="mle", device="cpu")
    with pytest.raises(ValueError, match="n_samples >= n_features"):
        pca.partial_fit(X)
    assert not hasattr(pca, "_stat_n")  # no state left by the failed call
    with pytest.raises(ValueError, match="randomized"):
        TorchPCA(dim="mle", solver="randomized", device="cpu").fit(X.T)
    with pytest.raises(ValueError, match="dim"):
        TorchPCA(dim="MLE", device="cpu").fit(X.T)
