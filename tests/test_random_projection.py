"""Tests for RandomProjection: distributions, determinism, layouts, checks."""

import pickle

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.base import clone
from sklearn.exceptions import DataDimensionalityWarning
from sklearn.random_projection import (
    GaussianRandomProjection,
    SparseRandomProjection,
    johnson_lindenstrauss_min_dim,
)

from skstego import RandomProjection

# Large enough for tight statistics (100k entries), small enough to be instant.
DIM, N_FEATURES = 200, 500


def _rp(**params):
    params.setdefault("device", "cpu")
    params.setdefault("random_state", 0)
    return RandomProjection(**params)


def _tokens(n=64, c=32, seed=0, dtype=np.float32):
    return np.random.RandomState(seed).standard_normal((n, c)).astype(dtype)


def _maps(n=3, c=16, h=5, w=4, seed=0, dtype=np.float32):
    return np.random.RandomState(seed).standard_normal((n, c, h, w)).astype(dtype)


def _fitted_matrix(**params):
    X = np.zeros((10, N_FEATURES), dtype=np.float32)
    return _rp(dim=DIM, **params).fit(X).components_


# ---------------------------------------------------------------- distributions


def test_gaussian_entries_match_theory_and_sklearn():
    W = _fitted_matrix(kind="gaussian")
    assert W.shape == (DIM, N_FEATURES)
    assert W.dtype == np.float32
    n = W.size
    # Mean 0 with standard error sqrt(1 / DIM / n); variance 1 / DIM within
    # a few standard errors (relative SE of a variance is sqrt(2 / n)).
    assert abs(W.mean()) < 5 * np.sqrt(1 / DIM / n)
    assert W.var() * DIM == pytest.approx(1.0, abs=5 * np.sqrt(2 / n))
    # Normal shape: scaled entries pass a KS test against N(0, 1).
    assert stats.kstest(W.ravel() * np.sqrt(DIM), "norm").pvalue > 1e-3
    # Same distribution as scikit-learn's own matrix (a two-sample KS test).
    X = np.zeros((10, N_FEATURES), dtype=np.float32)
    ref = GaussianRandomProjection(DIM, random_state=0).fit(X).components_
    assert ref.var() * DIM == pytest.approx(W.var() * DIM, abs=0.03)
    assert stats.ks_2samp(W.ravel(), ref.ravel()).pvalue > 1e-3


@pytest.mark.parametrize("density", ["auto", 1 / 3, 0.01])
def test_sparse_entries_match_theory_and_sklearn(density):
    W = _fitted_matrix(kind="sparse", density=density)
    rp_density = 1 / np.sqrt(N_FEATURES) if density == "auto" else density
    n = W.size
    nonzero = W != 0
    frac = nonzero.mean()
    assert frac == pytest.approx(rp_density, abs=5 * np.sqrt(rp_density / n))
    # The two non-zero values, exactly as scikit-learn scales them.
    value = np.float32(np.sqrt(1 / rp_density) / np.sqrt(DIM))
    assert set(np.unique(W[nonzero])) == {-value, value}
    X = np.zeros((10, N_FEATURES), dtype=np.float32)
    ref = SparseRandomProjection(DIM, density=density, random_state=0).fit(X)
    assert set(np.unique(ref.components_.data)) == {-value, value}
    assert ref.density_ == pytest.approx(rp_density)
    # Signs balanced; mean 0 and variance 1 / DIM as for the Gaussian kind.
    n_nonzero = nonzero.sum()
    assert (W > 0).sum() == pytest.approx(n_nonzero / 2, abs=5 * np.sqrt(n_nonzero))
    assert abs(W.mean()) < 5 * np.sqrt(1 / DIM / n)
    assert W.var() * DIM == pytest.approx(1.0, rel=5 * np.sqrt(2 / n_nonzero))
    # Non-zeros spread over rows as scikit-learn's binomial row counts.
    rows = nonzero.sum(axis=1)
    ref_rows = np.asarray((ref.components_ != 0).sum(axis=1)).ravel()
    assert rows.mean() == pytest.approx(ref_rows.mean(), rel=0.1)


def test_sparse_density_one_is_dense_signs():
    W = _fitted_matrix(kind="sparse", density=1.0)
    value = np.float32(1 / np.sqrt(DIM))
    assert set(np.unique(W)) == {-value, value}
    assert (W > 0).mean() == pytest.approx(0.5, abs=0.01)


def test_density_attribute_only_for_sparse():
    X = _tokens()
    rp = _rp(dim=4, kind="sparse").fit(X)
    assert rp.density_ == pytest.approx(1 / np.sqrt(X.shape[1]))
    rp.set_params(kind="gaussian").fit(X)
    assert not hasattr(rp, "density_")
    assert isinstance(rp.n_components_, int) and rp.n_components_ == 4


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_same_seed_same_matrix_different_seed_different(kind):
    X = _tokens()
    a = _rp(dim=8, kind=kind, random_state=3).fit(X).components_
    rp = _rp(dim=8, kind=kind, random_state=3)
    b = rp.fit(X).components_
    assert np.array_equal(a, b)
    assert np.array_equal(rp.fit(X).components_, a)  # refit
    c = _rp(dim=8, kind=kind, random_state=4).fit(X).components_
    assert not np.array_equal(a, c)


def test_random_state_none_and_instance_draw_new_matrices():
    X = _tokens()
    rp = _rp(dim=8, random_state=None)
    assert not np.array_equal(rp.fit(X).components_, rp.fit(X).components_)
    rp = _rp(dim=8, random_state=np.random.RandomState(0))
    assert not np.array_equal(rp.fit(X).components_, rp.fit(X).components_)


# ------------------------------------------------------------------- transform


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_transform_is_a_matmul_with_components(kind):
    X = _tokens(n=100, c=40)
    rp = _rp(dim=12, kind=kind).fit(X)
    Y = rp.transform(X)
    assert Y.dtype == np.float32 and Y.shape == (100, 12)
    np.testing.assert_allclose(Y, X @ rp.components_.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rp.fit_transform(X), Y, rtol=1e-6, atol=1e-6)


def test_float64_and_non_contiguous_input():
    X = _tokens(n=50, c=20, dtype=np.float64)
    rp = _rp(dim=6).fit(X)
    Y = rp.transform(X)
    assert Y.dtype == np.float32
    expected = X.astype(np.float32) @ rp.components_.T
    np.testing.assert_allclose(Y, expected, rtol=1e-5, atol=1e-5)
    Xf = np.asfortranarray(X.astype(np.float32))
    np.testing.assert_allclose(rp.transform(Xf), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_pairwise_distances_preserved_within_eps(kind):
    eps = 0.5
    rng = np.random.RandomState(0)
    X = rng.standard_normal((60, 800)).astype(np.float32)
    rp = _rp(dim="auto", eps=eps, kind=kind).fit(X)
    assert rp.n_components_ == johnson_lindenstrauss_min_dim(60, eps=eps)
    Y = rp.transform(X).astype(np.float64)
    Xd = X.astype(np.float64)
    i, j = np.triu_indices(len(X), k=1)
    ratio = ((Y[i] - Y[j]) ** 2).sum(1) / ((Xd[i] - Xd[j]) ** 2).sum(1)
    assert np.all(ratio > 1 - eps) and np.all(ratio < 1 + eps)
    assert ratio.mean() == pytest.approx(1.0, abs=0.05)


def test_dim_auto_counts_tokens_of_maps():
    maps = np.zeros((2, 8000, 2, 2), dtype=np.float32)
    rp = _rp(dim="auto", eps=0.5).fit(maps)
    assert rp.n_components_ == johnson_lindenstrauss_min_dim(2 * 2 * 2, eps=0.5)
    assert rp.transform(maps).shape == (2, rp.n_components_, 2, 2)


def test_dim_auto_too_large_errors_like_sklearn():
    X = _tokens(n=100, c=50)
    with pytest.raises(ValueError) as ref:
        GaussianRandomProjection(random_state=0).fit(X)
    with pytest.raises(ValueError) as ours:
        _rp().fit(X)
    assert str(ours.value) == str(ref.value)
    assert "larger than the original space with n_features=50" in str(ours.value)
    # One token: log(1) = 0 components, refused as by scikit-learn.
    with pytest.raises(ValueError, match="which is invalid"):
        _rp().fit(X[:1])
    # eps outside ]0, 1[ is refused by the JL bound when dim="auto".
    with pytest.raises(ValueError, match="eps"):
        _rp(eps=1.5).fit(X)
    assert _rp(dim=3, eps=1.5).fit(X).n_components_ == 3


def test_dim_larger_than_features_warns_like_sklearn():
    X = _tokens(n=10, c=4)
    with pytest.warns(DataDimensionalityWarning, match="higher than the number"):
        rp = _rp(dim=6).fit(X)
    assert rp.transform(X).shape == (10, 6)


def test_maps_equal_tokens_path():
    maps = _maps()
    rp = _rp(dim=5).fit(maps)
    assert rp.n_features_in_ == 16
    Y = rp.transform(maps)
    assert Y.shape == (3, 5, 5, 4) and Y.dtype == np.float32
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 16)
    Yt = rp.transform(tokens)
    np.testing.assert_allclose(
        Y.transpose(0, 2, 3, 1).reshape(-1, 5), Yt, rtol=1e-6, atol=1e-6
    )
    # Fitting on tokens or on maps draws the same matrix (same seed, same C).
    assert np.array_equal(_rp(dim=5).fit(tokens).components_, rp.components_)
    Yt_torch = rp.transform(torch.from_numpy(maps))
    np.testing.assert_allclose(Yt_torch.numpy(), Y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_batches_equal_one(monkeypatch, dtype):
    import skstego._device
    import skstego.projection._random as mod

    maps = _maps(n=5, dtype=dtype)
    tokens = _tokens(n=37, c=16, dtype=dtype)
    rp = _rp(dim=4).fit(maps)
    whole = rp.transform(maps), rp.transform(tokens)
    # Force tiny batches and the batched path (as on a GPU or for conversions).
    monkeypatch.setattr(mod, "rows_per_batch", lambda *a, **k: 2)
    monkeypatch.setattr(mod, "_is_cpu_float32", lambda X: False)
    monkeypatch.setattr(skstego._device, "rows_per_batch", lambda *a, **k: 7)
    np.testing.assert_allclose(rp.transform(maps), whole[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rp.transform(tokens), whole[1], rtol=1e-6, atol=1e-6)
    Yt = rp.transform(torch.from_numpy(maps))
    np.testing.assert_allclose(Yt.numpy(), whole[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------- array types, no copies


def test_output_type_follows_input_and_input_untouched():
    X = _tokens()
    X_copy = X.copy()
    rp = _rp(dim=6)
    Y = rp.fit_transform(X)
    assert isinstance(Y, np.ndarray) and Y.dtype == np.float32
    assert not np.shares_memory(Y, X)
    Y[:] = 0  # the output is the caller's; the input must not change
    np.testing.assert_array_equal(X, X_copy)

    Xt = torch.from_numpy(_tokens(dtype=np.float64))
    Xt_copy = Xt.clone()
    Yt = rp.transform(Xt)
    assert isinstance(Yt, torch.Tensor)
    assert Yt.dtype == torch.float32 and Yt.device.type == "cpu"
    assert torch.equal(Xt, Xt_copy)
    np.testing.assert_allclose(Yt.numpy(), rp.transform(X), rtol=1e-5, atol=1e-5)

    maps_t = torch.from_numpy(_maps(c=X.shape[1]))
    maps_copy = maps_t.clone()
    Ym = rp.transform(maps_t)
    assert isinstance(Ym, torch.Tensor) and Ym.shape == (3, 6, 5, 4)
    assert torch.equal(maps_t, maps_copy)
    # Fitting on a torch tensor works too, also one that requires grad.
    assert isinstance(_rp(dim=3).fit_transform(Xt), torch.Tensor)
    Xg = torch.from_numpy(X).requires_grad_()
    Yg = rp.transform(Xg)
    assert not Yg.requires_grad
    np.testing.assert_array_equal(Yg.numpy(), rp.transform(X))


def test_feature_names_out():
    rp = _rp(dim=3).fit(_tokens())
    assert list(rp.get_feature_names_out()) == [
        "randomprojection0",
        "randomprojection1",
        "randomprojection2",
    ]


# ------------------------------------------------------------- inverse transform


def test_inverse_transform_uses_pseudo_inverse():
    X = _tokens(n=40, c=10)
    with pytest.warns(DataDimensionalityWarning):
        rp = _rp(dim=16).fit(X)  # more components than features: exact inverse
    np.testing.assert_allclose(
        rp.inverse_transform(rp.transform(X)), X, rtol=1e-4, atol=1e-4
    )
    rp = _rp(dim=4).fit(X)
    codes = rp.transform(X)
    expected = codes @ np.linalg.pinv(rp.components_.astype(np.float64)).T
    np.testing.assert_allclose(rp.inverse_transform(codes), expected, atol=1e-4)
    maps = _maps(c=10)
    back = rp.inverse_transform(rp.transform(maps))
    assert back.shape == maps.shape
    back_t = rp.inverse_transform(torch.from_numpy(rp.transform(maps)))
    assert isinstance(back_t, torch.Tensor)
    np.testing.assert_allclose(back_t.numpy(), back, atol=1e-5)
    with pytest.raises(ValueError, match="components"):
        rp.inverse_transform(X)
    # The cached pseudo-inverse follows a refit.
    rp.set_params(random_state=1).fit(X)
    codes = rp.transform(X)
    expected = codes @ np.linalg.pinv(rp.components_.astype(np.float64)).T
    np.testing.assert_allclose(rp.inverse_transform(codes), expected, atol=1e-4)


# ------------------------------------------------------------- pickle and clone


def test_pickle_and_clone():
    X = _tokens()
    rp = _rp(dim=5, kind="sparse").fit(X)
    rp.transform(X)
    assert b"torch" not in pickle.dumps(rp)  # no device state in the pickle
    rp2 = pickle.loads(pickle.dumps(rp))
    np.testing.assert_array_equal(rp2.transform(X), rp.transform(X))
    assert rp2.density_ == rp.density_
    cl = clone(rp)
    assert cl.get_params() == rp.get_params()
    assert not hasattr(cl, "components_")
    np.testing.assert_array_equal(cl.fit(X).components_, rp.components_)


# ------------------------------------------------------------------- bad input


def test_bad_input():
    X = _tokens()
    rp = _rp(dim=3)
    Xnan = X.copy()
    Xnan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rp.fit(Xnan)
    with pytest.raises(ValueError, match="NaN"):
        rp.fit(torch.from_numpy(Xnan))
    with pytest.raises(ValueError):
        rp.fit(X[0])  # 1-D
    with pytest.raises(ValueError, match="2-D tokens"):
        rp.fit(X[None])  # 3-D
    with pytest.raises(ValueError, match="2-D tokens"):
        rp.fit(torch.from_numpy(X[None]))
    rp.fit(X)
    with pytest.raises(ValueError, match="features"):
        rp.transform(X[:, :-1])
    with pytest.raises(ValueError, match="features"):
        rp.transform(torch.from_numpy(_maps(c=X.shape[1] + 1)))
    with pytest.raises(ValueError, match="NaN"):
        rp.transform(torch.from_numpy(Xnan))


@pytest.mark.parametrize(
    "params",
    [
        {"density": 0.0},
        {"density": 1.5},
        {"density": -0.1},
        {"kind": "uniform"},
        {"dim": 0},
        {"eps": 0.0},
        {"device": 3},
    ],
)
def test_bad_parameters(params):
    with pytest.raises(ValueError):
        _rp(**{"dim": 3, **params}).fit(_tokens())


def test_unfitted_transform_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        _rp(dim=3).transform(_tokens())


# ------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_cuda(kind):
    X = _tokens(n=300, c=64)
    rp = RandomProjection(dim=8, kind=kind, device="cuda", random_state=0).fit(X)
    assert isinstance(rp.components_, np.ndarray)
    assert rp.components_.dtype == np.float32
    again = RandomProjection(dim=8, kind=kind, device="cuda", random_state=0)
    assert np.array_equal(again.fit(X).components_, rp.components_)
    Y = rp.transform(X)
    assert isinstance(Y, np.ndarray)
    np.testing.assert_allclose(Y, X @ rp.components_.T, rtol=1e-4, atol=1e-4)
    Yt = rp.transform(torch.from_numpy(X))
    assert Yt.device.type == "cuda"
    maps = torch.from_numpy(_maps(c=64)).cuda()
    assert rp.transform(maps).shape == (3, 8, 5, 4)
    rp2 = pickle.loads(pickle.dumps(rp))
    np.testing.assert_allclose(rp2.transform(X), Y, rtol=1e-6, atol=1e-6)
