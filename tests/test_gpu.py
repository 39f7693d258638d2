"""CUDA paths: same results as the CPU, tensors stay on the GPU, CPU reload.

Marked ``gpu``: skipped on machines without CUDA, run with ``pytest -m gpu``
wherever a GPU is at hand.
"""

import pickle

import numpy as np
import pytest
import torch

from skstego import KMeansProbe, LinearProbe, RandomProjection, TorchPCA
from skstego.datasets import make_feature_maps

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def data():
    maps, labels = make_feature_maps(
        16, n_features=64, n_classes=4, map_size=8, label_size=16, random_state=0
    )
    return maps, labels


def _cpu(x):
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize(
    "make", [lambda: TorchPCA(dim=6), lambda: TorchPCA(dim=6, standardize=True)]
)
def test_pca_cuda_matches_cpu(data, make):
    maps, _ = data
    cpu = make().set_params(device="cpu").fit(maps)
    gpu = make().set_params(device="cuda").fit(torch.from_numpy(maps).cuda())
    np.testing.assert_allclose(
        np.abs(gpu.components_), np.abs(cpu.components_), atol=1e-4
    )
    out = gpu.transform(torch.from_numpy(maps).cuda())
    assert out.is_cuda and out.shape == (16, 6, 8, 8)


def test_random_projection_on_cuda_stays_on_cuda(data):
    maps, _ = data
    rp = RandomProjection(dim=8, device="cuda", random_state=0).fit(maps)
    out = rp.transform(torch.from_numpy(maps).cuda())
    assert out.is_cuda
    np.testing.assert_allclose(_cpu(out), rp.transform(maps), rtol=1e-4, atol=1e-4)


def test_kmeans_cuda_quality_matches_cpu(data):
    maps, labels = data
    codes = TorchPCA(dim=4, device="cpu").fit_transform(maps)
    cpu = KMeansProbe(k=4, n_init=3, device="cpu", random_state=0).fit(codes)
    gpu = KMeansProbe(k=4, n_init=3, device="cuda", backend="torch", random_state=0)
    gpu.fit(torch.from_numpy(codes).cuda())
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=0.05)
    assert abs(gpu.score(codes, labels) - cpu.score(codes, labels)) < 0.05
    assert gpu.predict(torch.from_numpy(codes).cuda()).is_cuda


def test_linear_probe_cuda_matches_cpu_accuracy(data):
    maps, labels = data
    cpu = LinearProbe(device="cpu", random_state=0).fit(maps, labels)
    gpu = LinearProbe(device="cuda", random_state=0).fit(
        torch.from_numpy(maps).cuda(), torch.from_numpy(labels).cuda()
    )
    assert abs(gpu.score(maps, labels) - cpu.score(maps, labels)) < 0.02


def test_fitted_on_cuda_reloads_on_cpu(data):
    maps, _ = data
    pca = TorchPCA(dim=4).fit(torch.from_numpy(maps).cuda())  # device="auto"
    restored = pickle.loads(pickle.dumps(pca))
    restored.set_params(device="cpu")
    np.testing.assert_allclose(restored.transform(maps), pca.transform(maps), atol=1e-4)


# --------------------------------------------------------------------------
# Issue 21 (k-means and StegoProjector): CUDA synchronisations counted by
# torch's own sync debug mode, float32 losses under bf16 autocast, faiss on
# the estimator's GPU, half-precision init. CPU and CUDA draw different
# random streams, so results are compared by quality, never label by label.
# --------------------------------------------------------------------------


def _cuda_syncs(fn):
    """Number of synchronising CUDA calls ``fn`` makes, with torch's
    ``set_sync_debug_mode("warn")`` (a warning per call)."""
    import warnings

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def _stego_gpu(**params):
    from skstego import StegoProjector

    kw = dict(dim=6, batch_size=8, feature_samples=7, random_state=0)
    return StegoProjector(**{**kw, **params})


@pytest.mark.parametrize("on_device", [True, False])
def test_stego_cuda_at_most_one_sync_per_20_steps(data, on_device):
    maps, _ = data
    X = torch.from_numpy(maps).cuda() if on_device else maps
    _stego_gpu(n_steps=2, device="cuda").fit(X)  # warm-up: lazy CUDA init
    short = _cuda_syncs(lambda: _stego_gpu(n_steps=40, device="cuda").fit(X))
    long = _cuda_syncs(lambda: _stego_gpu(n_steps=80, device="cuda").fit(X))
    assert long - short <= 40 // 20, (short, long)


def test_stego_cuda_loss_is_float32_and_trains_like_cpu():
    from skstego._precision import fast_bf16
    from skstego.datasets import make_feature_maps

    X, _ = make_feature_maps(
        32, n_features=64, n_classes=5, map_size=12, random_state=0
    )
    kw = dict(
        n_steps=300, lr=5e-3, neg_shift=0.3, pos_intra_shift=0.1, pos_inter_shift=0.1
    )
    cpu = _stego_gpu(device="cpu", **kw).fit(X)
    gpu = _stego_gpu(device="cuda", **kw).fit(torch.from_numpy(X).cuda())
    curve = gpu.loss_curve_
    assert curve.dtype == np.float64 and np.isfinite(curve).all()
    assert fast_bf16("cuda") == (torch.cuda.get_device_capability() >= (8, 0))
    # float32 losses even under bf16 autocast: not rounded to bf16
    bf16 = torch.from_numpy(curve).to(torch.bfloat16).double().numpy()
    assert not np.array_equal(curve, bf16)
    # other random streams: the training converges to the same loss level
    a, b = cpu.loss_curve_[-50:].mean(), curve[-50:].mean()
    assert abs(a - b) <= 0.1 * abs(a) + 0.01, (a, b)
    codes = gpu.transform(torch.from_numpy(X).cuda())
    assert codes.is_cuda and codes.dtype == torch.float32


def test_kmeans_minibatch_cuda_no_sync_per_step():
    tokens = torch.from_numpy(
        np.random.default_rng(0).normal(size=(8000, 8)).astype(np.float32)
    ).cuda()

    def fit(n):
        return KMeansProbe(
            k=5,
            algorithm="minibatch",
            batch_size=100,
            max_iter=1,
            device="cuda",
            random_state=0,
        ).fit(tokens[:n])

    fit(400)  # warm-up
    short = _cuda_syncs(lambda: fit(4000))
    long = _cuda_syncs(lambda: fit(8000))
    assert long == short, (short, long)


def test_kmeans_lloyd_cuda_one_sync_per_iteration():
    from sklearn.datasets import load_digits

    X = torch.from_numpy(load_digits().data.astype(np.float32)).cuda()
    kw = dict(k=10, metric="euclidean", tol=0, device="cuda", random_state=0)
    KMeansProbe(max_iter=2, **kw).fit(X)  # warm-up
    probes = {}

    def fit(max_iter):
        probes[max_iter] = KMeansProbe(max_iter=max_iter, **kw).fit(X)

    short = _cuda_syncs(lambda: fit(4))
    long = _cuda_syncs(lambda: fit(8))
    extra_iter = probes[8].n_iter_ - probes[4].n_iter_
    # one read per iteration, two more in one that re-seeds an empty cluster
    assert long - short <= 3 * extra_iter, (short, long, extra_iter)


def test_kmeans_minibatch_cuda_matches_cpu_quality(data):
    from sklearn.metrics import adjusted_rand_score

    maps, _ = data
    codes = TorchPCA(dim=4, device="cpu").fit_transform(maps)
    kw = dict(k=4, algorithm="minibatch", batch_size=64, n_init=3, random_state=0)
    cpu = KMeansProbe(device="cpu", **kw).fit(codes)
    gpu = KMeansProbe(device="cuda", **kw).fit(torch.from_numpy(codes).cuda())
    # device-dependent streams: other initial sample, same clustering quality
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=0.05)
    assert adjusted_rand_score(cpu.labels_.ravel(), gpu.labels_.ravel()) > 0.8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kmeans_half_precision_init_on_cuda(data, dtype):
    maps, _ = data
    X = torch.from_numpy(maps).cuda()
    tokens = X.permute(0, 2, 3, 1).reshape(-1, X.shape[1])
    init = tokens[::97][:4].to(dtype)
    a = KMeansProbe(k=4, init=init, device="cuda", max_iter=10).fit(X.to(dtype))
    b = KMeansProbe(k=4, init=init.float(), device="cuda", max_iter=10).fit(X)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)


def test_kmeans_faiss_on_the_named_gpu(data):
    pytest.importorskip("faiss")
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss without GPU support")
    maps, _ = data
    last = f"cuda:{torch.cuda.device_count() - 1}"
    kw = dict(k=4, metric="euclidean", max_iter=20, tol=0, random_state=0)
    a = KMeansProbe(backend="torch", device=last, **kw).fit(maps)
    b = KMeansProbe(backend="faiss", device=last, **kw).fit(maps)
    assert b.inertia_ == pytest.approx(a.inertia_, rel=0.01)
