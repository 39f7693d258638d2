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
