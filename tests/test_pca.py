"""TorchPCA against scikit-learn's PCA, streaming, layouts and input checks."""

import pickle
import threading

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.extmath import svd_flip
from threadpoolctl import threadpool_info, threadpool_limits

from skstego import TorchPCA
from skstego.projection import _pca
from skstego.projection._pca import _scatter_numpy, _scatter_torch

SOLVERS = ["covariance_eigh", "full", "randomized"]


@pytest.fixture(scope="module")
def digits():
    return load_digits().data  # (1797, 64) float64, with constant pixels


@pytest.fixture(scope="module")
def offset_data():
    """Decaying spectrum, unit-ish spread, offset 1e3 (bad for naive X.T @ X)."""
    rng = np.random.RandomState(42)
    basis = np.linalg.qr(rng.normal(size=(24, 24)))[0]
    X = rng.normal(size=(3000, 24)) * np.geomspace(4.0, 0.05, 24) @ basis
    return X + 1e3 + rng.uniform(0, 10, size=24)


def _rel(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b))


def _assert_matches(pca, ref, X, tol):
    assert pca.n_components_ == ref.n_components_
    assert pca.n_samples_ == pca.n_samples_seen_ == ref.n_samples_
    assert pca.components_.dtype == np.float32
    assert _rel(pca.components_, ref.components_) < tol
    assert _rel(pca.explained_variance_, ref.explained_variance_) < tol
    assert _rel(pca.explained_variance_ratio_, ref.explained_variance_ratio_) < tol
    assert _rel(pca.singular_values_, ref.singular_values_) < tol
    assert_allclose(pca.noise_variance_, ref.noise_variance_, rtol=tol)
    Z, Z_ref = pca.transform(X), ref.transform(X)
    assert Z.dtype == np.float32
    assert _rel(Z, Z_ref) < tol
    back = pca.inverse_transform(Z)
    assert back.dtype == np.float32
    assert _rel(back - ref.mean_, ref.inverse_transform(Z_ref) - ref.mean_) < tol


# Randomized SVD is approximate (float32, 4-7 power iterations).
TOL = {"covariance_eigh": 1e-4, "full": 1e-4, "randomized": 5e-3}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("whiten", [False, True])
def test_matches_sklearn_digits(digits, solver, whiten):
    ref = PCA(8, whiten=whiten, svd_solver="full").fit(digits)
    pca = TorchPCA(8, whiten=whiten, solver=solver, random_state=0).fit(digits)
    assert_allclose(pca.mean_, ref.mean_, rtol=1e-6, atol=1e-6)
    _assert_matches(pca, ref, digits, TOL[solver])


@pytest.mark.parametrize("solver", SOLVERS)
def test_matches_sklearn_large_offset(offset_data, solver):
    ref = PCA(6, svd_solver="full").fit(offset_data)
    pca = TorchPCA(6, solver=solver, random_state=0).fit(offset_data)
    assert_allclose(pca.mean_, ref.mean_, rtol=1e-7)
    _assert_matches(pca, ref, offset_data, TOL[solver])


def test_small_offset_float32_tokens(digits):
    """Float32 tokens near the origin (shifted all the same): same result."""
    X = ((digits - digits.mean(0)) / 4 + 0.3).astype(np.float32)
    ref = PCA(6, svd_solver="full").fit(X.astype(np.float64))
    pca = TorchPCA(6, solver="covariance_eigh").fit(X)
    _assert_matches(pca, ref, X, 1e-4)
    assert_allclose(pca.mean_, ref.mean_, atol=1e-6)


def test_large_offset_float32_input(offset_data):
    """Float32 tokens far from the origin: the shifted Gram stays accurate."""
    X32 = offset_data.astype(np.float32)
    ref = PCA(6, svd_solver="full").fit(X32.astype(np.float64))
    pca = TorchPCA(6, solver="covariance_eigh").fit(X32)
    assert _rel(pca.components_, ref.components_) < 1e-4
    assert _rel(pca.explained_variance_, ref.explained_variance_) < 1e-4


@pytest.mark.parametrize("solver", ["auto", "covariance_eigh", "full"])
def test_all_components_and_sign_convention(digits, solver):
    ref = PCA(svd_solver="full").fit(digits)
    pca = TorchPCA(solver=solver).fit(digits)
    assert pca.n_components_ == 64
    assert_allclose(pca.explained_variance_ratio_.sum(), 1.0, rtol=1e-5)
    # scikit-learn's sign convention: its svd_flip leaves the rows unchanged
    _, flipped = svd_flip(None, pca.components_.copy(), u_based_decision=False)
    np.testing.assert_array_equal(flipped, pca.components_)
    top = ref.explained_variance_ > 1e-3 * ref.explained_variance_[0]
    assert _rel(pca.components_[top], ref.components_[top]) < 1e-3
    assert _rel(pca.explained_variance_, ref.explained_variance_) < 1e-4


@pytest.mark.parametrize(
    "shape, dim",
    [
        ((1797, 64), 5),  # many samples, few features
        ((100, 64), 5),  # small
        ((600, 700), 5),  # wide, few components
        ((600, 700), None),  # wide, all components
        ((600, 700), 0.9),  # a fraction of the variance
        ((2000, 30), "mle"),
    ],
)
def test_auto_solver_follows_sklearn(shape, dim):
    # scikit-learn's own "auto" choice is the reference (its _fit_svd_solver)
    X = np.random.RandomState(0).normal(size=shape)
    ref = PCA(n_components=dim, svd_solver="auto").fit(X)
    assert TorchPCA(dim, device="cpu").fit(X)._fit_solver == ref._fit_svd_solver


@pytest.mark.parametrize("solver", SOLVERS)
def test_standardize_matches_pipeline(digits, solver):
    pipe = make_pipeline(StandardScaler(), PCA(6, whiten=True, svd_solver="full"))
    pipe.fit(digits)
    pca = TorchPCA(6, whiten=True, standardize=True, solver=solver, random_state=0)
    pca.fit(digits)
    scaler, ref = pipe[0], pipe[-1]
    assert_allclose(pca.scale_, scaler.scale_, rtol=1e-5)  # constant pixels -> 1
    assert_allclose(pca.mean_, scaler.mean_, rtol=1e-6, atol=1e-6)
    tol = 1e-4 if solver != "randomized" else 2e-2  # flat standardized spectrum
    assert _rel(pca.explained_variance_, ref.explained_variance_) < tol
    assert _rel(pca.components_, ref.components_) < tol
    Z = pca.transform(digits)
    assert _rel(Z, pipe.transform(digits)) < tol
    assert _rel(pca.inverse_transform(Z), pipe.inverse_transform(Z)) < tol
    assert TorchPCA(6).fit(digits).scale_ is None


def test_partial_fit_equals_fit_and_sklearn(offset_data):
    stream = TorchPCA(6, device="cpu")
    for batch in np.array_split(offset_data, 23):
        assert stream.partial_fit(batch) is stream
    full = TorchPCA(6, solver="covariance_eigh").fit(offset_data)
    assert stream.n_samples_seen_ == len(offset_data)
    assert _rel(stream.components_, full.components_) < 1e-5
    assert _rel(stream.explained_variance_, full.explained_variance_) < 1e-5
    assert_allclose(stream.mean_, full.mean_, rtol=1e-7)
    ref = PCA(6, svd_solver="full").fit(offset_data)
    _assert_matches(stream, ref, offset_data, 1e-4)


def test_partial_fit_maps_and_continuation(digits):
    maps = digits[:1792].reshape(-1, 8, 8, 8).transpose(0, 3, 1, 2)  # (224, 8, 8, 8)
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 8)
    stream = TorchPCA(3)
    for batch in np.array_split(maps, 7):
        stream.partial_fit(torch.from_numpy(batch))
    ref = PCA(3, svd_solver="full").fit(tokens)
    _assert_matches(stream, ref, tokens, 1e-4)
    # partial_fit after a covariance fit continues its statistics.
    cont = TorchPCA(3, solver="covariance_eigh").fit(tokens[:500])
    cont.partial_fit(tokens[500:])
    assert cont.n_samples_seen_ == len(tokens)
    assert _rel(cont.components_, ref.components_) < 1e-4
    # fit discards earlier statistics.
    cont.fit(tokens[:500])
    assert cont.n_samples_seen_ == 500


def test_partial_fit_dim_none_keeps_all_features(digits):
    stream = TorchPCA().partial_fit(digits[:10])
    assert stream.n_components_ == 64


def test_partial_fit_errors(digits):
    for solver in ("full", "randomized"):
        # only the covariance solver streams: the method is absent elsewhere
        assert not hasattr(TorchPCA(2, solver=solver), "partial_fit")
        with pytest.raises(AttributeError, match="partial_fit"):
            TorchPCA(2, solver=solver).partial_fit(digits)
    assert hasattr(TorchPCA(2, solver="covariance_eigh"), "partial_fit")
    pca = TorchPCA(2, solver="full").fit(digits)
    pca.set_params(solver="auto")
    with pytest.raises(ValueError, match="cannot continue a fit made with the 'full'"):
        pca.partial_fit(digits)
    stream = TorchPCA(2).partial_fit(digits)
    with pytest.raises(ValueError, match="features"):
        stream.partial_fit(digits[:, :10])
    with pytest.raises(ValueError, match="at least 2 samples"):
        TorchPCA(2).partial_fit(digits[:1])
    with pytest.raises(ValueError, match="dim=65"):
        TorchPCA(65).partial_fit(digits)


@pytest.mark.parametrize("solver", SOLVERS)
def test_maps_equal_tokens(solver):
    rng = np.random.RandomState(0)
    maps = (
        rng.normal(size=(6, 12, 5, 7)) * np.linspace(3, 0.5, 12)[:, None, None]
    ).astype(np.float32)
    tokens = maps.transpose(0, 2, 3, 1).reshape(-1, 12)
    a = TorchPCA(4, whiten=True, solver=solver, random_state=0).fit(maps)
    b = TorchPCA(4, whiten=True, solver=solver, random_state=0).fit(tokens)
    assert a.n_features_in_ == 12 and a.n_samples_ == 6 * 5 * 7
    assert_allclose(a.components_, b.components_, rtol=1e-5, atol=1e-6)
    Z = a.transform(maps)
    assert Z.shape == (6, 4, 5, 7) and Z.dtype == np.float32
    assert_allclose(
        Z.transpose(0, 2, 3, 1).reshape(-1, 4), b.transform(tokens), atol=1e-5
    )
    back = a.inverse_transform(Z)
    assert back.shape == maps.shape
    assert_allclose(
        back.transpose(0, 2, 3, 1).reshape(-1, 12),
        b.inverse_transform(b.transform(tokens)),
        atol=1e-5,
    )
    assert list(a.get_feature_names_out()) == [f"torchpca{i}" for i in range(4)]


def test_output_follows_input_and_input_untouched(digits):
    X = digits.copy()
    pca = TorchPCA(5, device="cpu").fit(X)
    assert_allclose(X, digits, rtol=0, atol=0)
    Z = pca.transform(X)
    assert isinstance(Z, np.ndarray) and Z.dtype == np.float32
    assert_allclose(X, digits, rtol=0, atol=0)

    Xt = torch.from_numpy(X)  # float64 tensor sharing X's memory
    Zt = pca.transform(Xt)
    assert isinstance(Zt, torch.Tensor) and Zt.dtype == torch.float32
    assert Zt.device == torch.device("cpu")
    assert_allclose(Zt.numpy(), Z, rtol=1e-6, atol=1e-5)
    back = pca.inverse_transform(Zt)
    assert isinstance(back, torch.Tensor) and back.shape == Xt.shape
    fitted_torch = TorchPCA(5, device="cpu").fit(Xt)
    assert_allclose(fitted_torch.components_, pca.components_, rtol=1e-6, atol=1e-7)
    assert_allclose(X, digits, rtol=0, atol=0)

    maps = torch.from_numpy(digits[:64].reshape(-1, 4, 4, 4).astype(np.float32))
    before = maps.clone()
    TorchPCA(2).fit(maps).transform(maps)
    TorchPCA(2).partial_fit(maps)
    assert torch.equal(maps, before)


def test_pickle_and_clone(digits):
    pca = TorchPCA(4, whiten=True, device="cpu").fit(digits)
    Z = pca.transform(digits)
    again = pickle.loads(pickle.dumps(pca))
    assert b"torch" not in pickle.dumps(pca)  # no device state in the pickle
    assert_allclose(again.transform(digits), Z)
    again.partial_fit(digits)  # statistics survive pickling
    assert again.n_samples_seen_ == 2 * len(digits)
    fresh = clone(pca)
    assert fresh.get_params() == pca.get_params()
    assert not hasattr(fresh, "components_")


def test_randomized_is_reproducible(offset_data):
    a = TorchPCA(3, solver="randomized", random_state=7).fit(offset_data)
    b = TorchPCA(3, solver="randomized", random_state=7).fit(offset_data)
    assert_allclose(a.components_, b.components_)


def test_bad_input(digits):
    pca = TorchPCA(3)
    bad = digits.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pca.fit(bad)
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        pca.fit(torch.from_numpy(bad))
    with pytest.raises(ValueError, match=r"2D array|1-D|shape"):
        pca.fit(digits[0])
    with pytest.raises(ValueError, match="Expected 2-D tokens"):
        pca.fit(digits.reshape(-1, 8, 8))
    with pytest.raises(ValueError, match="Expected 2-D tokens"):
        pca.fit(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="dim=65"):
        TorchPCA(65).fit(digits)
    with pytest.raises(ValueError, match="dim"):
        TorchPCA(0).fit(digits)
    with pytest.raises(ValueError, match="solver"):
        TorchPCA(solver="arpack").fit(digits)
    with pytest.raises(ValueError, match="at least 2 samples"):
        TorchPCA().fit(digits[:1])
    pca.fit(digits)
    with pytest.raises(ValueError, match="64 features"):
        pca.transform(digits[:, :10])
    with pytest.raises(ValueError, match="n_components_=3"):
        pca.inverse_transform(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="Expected 2-D codes"):
        pca.inverse_transform(np.zeros((2, 3, 4)))


@pytest.mark.parametrize("offset", [0.5, 50.0])  # near / far from the origin
@pytest.mark.parametrize("layout", ["tokens", "maps"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_backends_agree(layout, dtype, offset):
    """The torch (CUDA) accumulation, run on the CPU, equals the NumPy one."""
    rng = np.random.RandomState(0)
    X = (rng.normal(size=(40, 150, 3, 4)) + offset).astype(dtype)
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, 150).astype(np.float64)
    if layout == "tokens":
        X = X.transpose(0, 2, 3, 1).reshape(-1, 150)
    centred = tokens - tokens.mean(0)
    for ref in (None, np.full(150, offset - 0.5)):  # reference: a running mean
        for n, shift, sums, gram in (
            _scatter_numpy(X, ref),
            _scatter_torch(torch.from_numpy(X), torch.device("cpu"), ref),
        ):
            assert n == 40 * 12
            assert_allclose(shift + sums / n, tokens.mean(0), rtol=1e-6, atol=1e-7)
            assert _rel(gram - np.outer(sums, sums) / n, centred.T @ centred) < 1e-5


@pytest.mark.parametrize("layout", ["tokens", "maps"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_numpy_threads_and_blocks(monkeypatch, layout, dtype):
    """Many small blocks, 3 threads, blocks across chunk ends: the float64
    statistics of the shifted data, equal to one thread's."""
    rng = np.random.RandomState(1)
    X = (rng.normal(size=(37, 20, 3, 5)) * 0.1 + 100.0).astype(dtype)
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, 20).astype(np.float64)
    if layout == "tokens":
        X = X.transpose(0, 2, 3, 1).reshape(-1, 20)
    centred = tokens - tokens.mean(0)
    monkeypatch.setattr(_pca, "_GRAM_BLOCK_ROWS", 40)  # 2 images, or 40 tokens
    monkeypatch.setattr(_pca, "_GRAM_BLOCK_ROWS_PER_FEATURE", 0)
    monkeypatch.setattr(_pca, "batch_elements", lambda device, purpose: 2100)
    results = []
    for threads in (3, 1):
        monkeypatch.setattr(_pca, "_blas_threads", lambda threads=threads: threads)
        n, shift, sums, gram = _scatter_numpy(X, None)
        assert n == 37 * 15
        assert_allclose(shift + sums / n, tokens.mean(0), rtol=1e-6)
        assert _rel(gram - np.outer(sums, sums) / n, centred.T @ centred) < 1e-5
        results.append((shift, sums, gram))
    for a, b in zip(*results, strict=True):  # other blocks, other roundings
        assert _rel(a, b) < 1e-6


def _blas_threads_now():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_fit_restores_blas_threads(offset_data):
    """The one-thread BLAS limit of the CPU accumulation is lifted after fit,
    also when fits run in parallel threads, and a user's limit is kept."""
    X = np.repeat(offset_data, 2, axis=0).astype(np.float32)  # several blocks
    before = _blas_threads_now()
    ref = TorchPCA(6, solver="covariance_eigh").fit(X)
    assert _blas_threads_now() == before
    fits = [TorchPCA(6, solver="covariance_eigh") for _ in range(4)]
    threads = [threading.Thread(target=f.fit, args=(X,)) for f in fits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _blas_threads_now() == before
    for f in fits:
        assert_allclose(f.explained_variance_, ref.explained_variance_, rtol=1e-6)
    with threadpool_limits(limits=1, user_api="blas"):
        one = TorchPCA(6, solver="covariance_eigh").fit(X)
        assert set(_blas_threads_now()) == {1}
    assert _blas_threads_now() == before
    assert_allclose(one.explained_variance_, ref.explained_variance_, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_matches_cpu(digits, solver):
    maps = torch.from_numpy(digits[:1792].reshape(-1, 8, 8, 8)).permute(0, 3, 1, 2)
    cpu = TorchPCA(4, whiten=True, solver=solver, device="cpu", random_state=0)
    gpu = TorchPCA(4, whiten=True, solver=solver, device="cuda", random_state=0)
    cpu.fit(maps)
    gpu.fit(maps.cuda())
    tol = TOL[solver]
    assert _rel(gpu.components_, cpu.components_) < tol
    assert _rel(gpu.explained_variance_, cpu.explained_variance_) < tol
    Z = gpu.transform(maps)  # a CPU tensor in: computed and returned on CUDA
    assert Z.device.type == "cuda" and Z.shape == (224, 4, 8, 8)
    assert _rel(Z.cpu().numpy(), cpu.transform(maps).numpy()) < tol
    tokens = maps.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    Zn = gpu.transform(tokens)  # NumPy in, NumPy out
    assert isinstance(Zn, np.ndarray) and Zn.dtype == np.float32
    stream = TorchPCA(4, device="cuda")
    for batch in maps.split(32):
        stream.partial_fit(batch.cuda())
    assert _rel(stream.components_, cpu.components_) < max(tol, 1e-4)
