"""Tests for the nearest-neighbour positives (image descriptors and k-NN)."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from skstego.projection._knn import image_descriptors, nearest_neighbors

BACKENDS = ["torch", "faiss"]


def _reference_neighbors(X, k):
    """sklearn's brute-force cosine k-NN, one extra neighbour, self dropped."""
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(X)
    idx = nn.kneighbors(X, return_distance=False)
    return [[j for j in row if j != i][:k] for i, row in enumerate(idx)]


def _reference_descriptors(maps):
    mean = np.asarray(maps, dtype=np.float64).mean(axis=(2, 3))
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "faiss":
        pytest.importorskip("faiss")
    return request.param


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 100])
def test_matches_sklearn_cosine(backend, chunk_size):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((53, 12)).astype(np.float32)
    k = 5
    got = nearest_neighbors(X, k, backend=backend, chunk_size=chunk_size)
    assert got.shape == (53, k)
    assert got.dtype == np.int64
    for i, (row, ref) in enumerate(zip(got, _reference_neighbors(X, k), strict=True)):
        assert set(row) == set(ref), i
    # ordered by decreasing similarity
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = np.take_along_axis(Xn @ Xn.T, got, axis=1)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_backends_agree_and_torch_input(backend):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 8)).astype(np.float32)
    ref = nearest_neighbors(X, 4, backend="torch")
    got = nearest_neighbors(torch.from_numpy(X), 4, backend=backend, chunk_size=9)
    np.testing.assert_array_equal(got, ref)


def test_unnormalised_input_gives_cosine_neighbours(backend):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 6)).astype(np.float32)
    scaled = X * rng.uniform(0.1, 100.0, size=(30, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        nearest_neighbors(scaled, 3, backend=backend),
        nearest_neighbors(X, 3, backend=backend),
    )


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_self_never_returned_with_duplicates(backend, chunk_size):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 5)).astype(np.float32)
    # each base row repeated 6 times: more duplicates than k + 1
    X = np.repeat(base, 6, axis=0)
    k = 4
    got = nearest_neighbors(X, k, backend=backend, chunk_size=chunk_size)
    rows = np.arange(len(X))[:, None]
    assert not np.any(got == rows)
    # the neighbours are the other copies of the same row
    np.testing.assert_array_equal(got // 6, np.broadcast_to(rows // 6, got.shape))
    for row in got:
        assert len(set(row)) == k


def test_self_never_returned_all_identical(backend):
    X = np.ones((10, 3), dtype=np.float32)
    got = nearest_neighbors(X, 20, backend=backend, chunk_size=4)
    assert got.shape == (10, 9)
    for i, row in enumerate(got):
        assert set(row) == set(range(10)) - {i}


def test_k_capped_and_two_rows(backend):
    X = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(nearest_neighbors(X, 30, backend=backend), [[1], [0]])


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbors(np.ones((1, 4), dtype=np.float32), backend="torch")
    with pytest.raises(ValueError, match="at least 1"):
        nearest_neighbors(np.eye(3, dtype=np.float32), 0, backend="torch")
    with pytest.raises(ValueError, match="integer"):
        nearest_neighbors(np.eye(3, dtype=np.float32), 1.5, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        nearest_neighbors(np.eye(3, dtype=np.float32), backend="annoy")
    with pytest.raises(ValueError, match="shape"):
        nearest_neighbors(np.ones((3, 2, 2), dtype=np.float32))
    X = np.eye(3, dtype=np.float32)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbors(X, backend="torch")


def test_deterministic(backend):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((37, 10)).astype(np.float32)
    a = nearest_neighbors(X, 6, backend=backend, chunk_size=5)
    b = nearest_neighbors(X, 6, backend=backend, chunk_size=5)
    np.testing.assert_array_equal(a, b)


def test_auto_backend_runs():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((20, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        nearest_neighbors(X, 3), nearest_neighbors(X, 3, backend="torch")
    )


def test_input_not_modified(backend):
    rng = np.random.default_rng(6)
    X = rng.standard_normal((15, 4)).astype(np.float32) * 3
    before = X.copy()
    nearest_neighbors(X, 3, backend=backend)
    np.testing.assert_array_equal(X, before)


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_descriptors_match_numpy(batch_size):
    rng = np.random.default_rng(7)
    maps = rng.standard_normal((7, 5, 3, 4)).astype(np.float32)
    got = image_descriptors(maps, device="cpu", batch_size=batch_size)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == torch.float32
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got.numpy(), _reference_descriptors(maps), atol=1e-6)


def test_descriptors_from_memmap(tmp_path):
    rng = np.random.default_rng(8)
    data = rng.standard_normal((11, 4, 2, 3)).astype(np.float32)
    mm = np.memmap(tmp_path / "maps.dat", dtype=np.float32, mode="w+", shape=data.shape)
    mm[:] = data
    mm.flush()
    ro = np.memmap(tmp_path / "maps.dat", dtype=np.float32, mode="r", shape=data.shape)
    got = image_descriptors(ro, device="cpu", batch_size=4)
    np.testing.assert_allclose(got.numpy(), _reference_descriptors(data), atol=1e-6)


def test_descriptors_torch_and_tokens():
    rng = np.random.default_rng(9)
    maps = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    got = image_descriptors(torch.from_numpy(maps), device="cpu")
    np.testing.assert_allclose(got.numpy(), _reference_descriptors(maps), atol=1e-6)
    tokens = rng.standard_normal((6, 3)).astype(np.float32)
    got = image_descriptors(tokens, device="cpu", batch_size=4)
    ref = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(torch.linalg.norm(got, dim=1).numpy(), 1.0, atol=1e-6)


def test_descriptors_errors():
    with pytest.raises(ValueError, match="4-D maps"):
        image_descriptors(np.ones((2, 3, 4), dtype=np.float32), device="cpu")
    maps = np.ones((2, 3, 2, 2), dtype=np.float32)
    maps[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        image_descriptors(maps, device="cpu")


def _dropped_reference(maps, dropped):
    """Dropout2d on each map, then the spatial mean, L2-normalised: the
    reference's descriptor with its featurizer's dropout active, for the
    channels ``dropped`` (N, C) boolean."""
    kept = np.asarray(maps, dtype=np.float64) * ~dropped[:, :, None, None]
    return _reference_descriptors(kept)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_descriptors_with_channel_dropout(p):
    rng = np.random.default_rng(12)
    maps = np.abs(rng.standard_normal((300, 16, 3, 3))).astype(np.float32) + 0.1
    g = torch.Generator().manual_seed(0)
    got = image_descriptors(maps, device="cpu", dropout=p, generator=g).numpy()
    dropped = got == 0  # positive maps: only a dropped channel averages to 0
    assert abs(dropped.mean() - p) < 0.03, dropped.mean()
    np.testing.assert_allclose(got, _dropped_reference(maps, dropped), atol=1e-6)
    # seeded; other seeds drop other channels
    again = image_descriptors(
        maps, device="cpu", dropout=p, generator=torch.Generator().manual_seed(0)
    )
    np.testing.assert_array_equal(again.numpy(), got)
    other = image_descriptors(
        maps, device="cpu", dropout=p, generator=torch.Generator().manual_seed(1)
    )
    assert not np.array_equal(other.numpy() == 0, dropped)
    # in batches, the masks still drop whole channels of each image
    batched = image_descriptors(
        maps, device="cpu", dropout=p, batch_size=7, generator=g
    ).numpy()
    np.testing.assert_allclose(
        batched, _dropped_reference(maps, batched == 0), atol=1e-6
    )


def test_descriptors_dropout_zero_is_clean_and_bad_values_raise():
    maps = np.random.default_rng(13).standard_normal((5, 4, 2, 2)).astype(np.float32)
    got = image_descriptors(maps, device="cpu", dropout=0.0)
    np.testing.assert_allclose(got.numpy(), _reference_descriptors(maps), atol=1e-6)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout must be in"):
            image_descriptors(maps, device="cpu", dropout=bad)


def test_descriptors_then_neighbors(backend):
    # two groups of images whose mean features point in opposite directions
    rng = np.random.default_rng(10)
    maps = rng.standard_normal((12, 6, 4, 4)).astype(np.float32) * 0.1
    maps[:6, 0] += 1.0
    maps[6:, 0] -= 1.0
    desc = image_descriptors(maps, device="cpu")
    got = nearest_neighbors(desc, 5, backend=backend)
    rows = np.arange(12)[:, None]
    np.testing.assert_array_equal(got // 6, np.broadcast_to(rows // 6, got.shape))


# --------------------------------------------------------------------------
# backend selection on CUDA, tested on the CPU with a stand-in faiss
# --------------------------------------------------------------------------
class _FlatIP:
    """faiss.IndexFlatIP in NumPy (stable order for ties)."""

    def __init__(self, c):
        self.X = np.empty((0, c), dtype=np.float32)

    def add(self, X):
        self.X = np.vstack([self.X, X])

    def search(self, Q, k):
        sims = Q @ self.X.T
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, idx, axis=1), idx


class _FakeFaiss:
    """A faiss module whose GPU calls are recorded (``gpu=False``: faiss-cpu)."""

    def __init__(self, gpu=True, n_gpus=2):
        self.calls = []
        self.n_gpus = n_gpus
        if gpu:
            calls = self.calls

            class StandardGpuResources:
                def setTempMemory(self, size):
                    calls.append(("setTempMemory", size))

            self.StandardGpuResources = StandardGpuResources

    def get_num_gpus(self):
        return self.n_gpus

    def IndexFlatIP(self, c):
        self.calls.append(("IndexFlatIP", c))
        return _FlatIP(c)

    def index_cpu_to_gpu(self, res, device, index):
        self.calls.append(("index_cpu_to_gpu", device))
        return index


@pytest.fixture
def on_cuda(monkeypatch):
    """nearest_neighbors believes it searches on a CUDA device (data on CPU)."""
    import skstego.projection._knn as knn

    real_as_tensor = knn.as_tensor
    monkeypatch.setattr(knn, "resolve_device", lambda d: torch.device(d))
    monkeypatch.setattr(
        knn, "as_tensor", lambda x, dev, *a, **k: real_as_tensor(x, "cpu", *a, **k)
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)

    def use(fake):
        monkeypatch.setattr(knn, "_faiss", lambda: fake)
        return fake

    return use


@pytest.mark.parametrize(
    ("backend", "device", "faiss", "k", "want"),
    [
        ("auto", "cpu", "gpu", 30, "faiss"),
        ("auto", "cpu", None, 30, "torch"),
        ("torch", "cpu", "gpu", 30, "torch"),
        ("faiss", "cpu", "gpu", 30, "faiss"),
        ("faiss", "cpu", "gpu", 5000, "faiss"),  # no limit on the CPU
        ("auto", "cuda:1", "gpu", 30, "torch"),  # never faiss by default on CUDA
        ("auto", "cuda:1", None, 30, "torch"),
        ("torch", "cuda:1", "gpu", 30, "torch"),
        ("faiss", "cuda:1", "gpu", 30, "faiss-gpu"),
        ("faiss", "cuda:1", "gpu", 2047, "faiss-gpu"),  # k + 1 = 2048 results
        ("faiss", "cuda:1", "gpu", 2048, "torch"),  # above faiss's GPU top-k
        ("faiss", "cuda:1", "cpu", 30, "faiss"),  # faiss-cpu: the CPU index
        ("faiss", "cuda:1", "no-gpus", 30, "faiss"),
    ],
)
def test_backend_choice(monkeypatch, backend, device, faiss, k, want):
    import skstego.projection._knn as knn

    fake = {
        "gpu": _FakeFaiss(),
        "cpu": _FakeFaiss(gpu=False),
        "no-gpus": _FakeFaiss(n_gpus=0),
        None: None,
    }[faiss]
    monkeypatch.setattr(knn, "_faiss", lambda: fake)
    assert knn._choose_backend(backend, torch.device(device), k) == want


@pytest.mark.parametrize(("device", "ordinal"), [("cuda:1", 1), ("cuda", 3)])
def test_faiss_gpu_index_on_the_requested_device_with_bounded_memory(
    on_cuda, device, ordinal
):
    # The old code searched with faiss by default on CUDA, took the ordinal
    # as `index or 0` (cuda:0 for "cuda" whatever torch's current device)
    # and left faiss's scratch memory at its default share of the GPU.
    import skstego.projection._knn as knn

    rng = np.random.default_rng(12)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    want = nearest_neighbors(X, 4, backend="torch", device="cpu")
    fake = on_cuda(_FakeFaiss())
    got = nearest_neighbors(X, 4, backend="faiss", device=device)
    np.testing.assert_array_equal(got, want)
    assert ("index_cpu_to_gpu", ordinal) in fake.calls
    assert ("setTempMemory", knn._FAISS_GPU_TEMP_MEMORY) in fake.calls


def test_auto_on_cuda_and_large_k_search_with_torch(on_cuda, monkeypatch):
    import skstego.projection._knn as knn

    rng = np.random.default_rng(13)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    want = nearest_neighbors(X, 4, backend="torch", device="cpu")
    fake = on_cuda(_FakeFaiss())
    np.testing.assert_array_equal(nearest_neighbors(X, 4, device="cuda:1"), want)
    assert fake.calls == []  # faiss untouched
    # above faiss's GPU limit, backend="faiss" falls back to torch
    monkeypatch.setattr(knn, "_FAISS_GPU_MAX_K", 4)
    got = nearest_neighbors(X, 4, backend="faiss", device="cuda:1")
    np.testing.assert_array_equal(got, want)
    assert fake.calls == []


@pytest.mark.gpu
def test_gpu_matches_cpu(backend):
    rng = np.random.default_rng(11)
    X = rng.standard_normal((64, 16)).astype(np.float32)
    cpu = nearest_neighbors(X, 5, backend=backend, device="cpu")
    gpu = nearest_neighbors(torch.from_numpy(X).cuda(), 5, backend=backend)
    for a, b in zip(cpu, gpu, strict=True):
        assert set(a) == set(b)


@pytest.mark.gpu
def test_gpu_auto_and_many_neighbours_with_faiss_installed():
    # auto on CUDA is torch; backend="faiss" above faiss's GPU top-k limit
    # (2048 results) falls back to torch instead of failing
    rng = np.random.default_rng(14)
    X = rng.standard_normal((2600, 8)).astype(np.float32)
    cpu = nearest_neighbors(X, 2100, backend="torch", device="cpu")
    for backend in ("auto", "faiss"):
        if backend == "faiss":
            pytest.importorskip("faiss")
        gpu = nearest_neighbors(X, 2100, backend=backend, device="cuda")
        assert gpu.shape == cpu.shape
        # exact search: the same first neighbours up to near-ties
        assert np.mean(gpu[:, 0] == cpu[:, 0]) > 0.99
