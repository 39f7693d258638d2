"""FeatureStore and streaming fits, against in-memory featurization and fits."""

import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.decomposition import PCA

import skstego._device as device_module
from skstego import DinoFeaturizer, KMeansProbe, TorchPCA
from skstego._device import LazyFeatures, check_features
from skstego.features import FeatureStore

zarr = pytest.importorskip("zarr")

RES = 16


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.models.VisionTransformer(
        img_size=RES, patch_size=4, embed_dim=16, depth=1, num_heads=2
    ).eval()


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randint(0, 256, (11, RES, RES, 3), dtype=np.uint8)


def _featurizer(vit, **kwargs):
    return DinoFeaturizer(vit, resolution=RES, device="cpu", **kwargs)


class Source:
    """A lazy image sequence that counts reads and can fail on one image."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at, self.reads = images, fail_at, []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"simulated failure reading image {i}")
        self.reads.append(i)
        return self.images[i]


class Counting:
    """An on-disk-like array recording the rows of every read."""

    _skstego_lazy = True

    def __init__(self, data):
        self.data, self.reads = data, []
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]


# --------------------------------------------------------------- writing


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_equals_transform(vit, images, tmp_path, dtype):
    featurizer = _featurizer(vit)
    expected = featurizer.transform(images)
    store = featurizer.transform_to_store(
        images, tmp_path / "f.zarr", dtype=dtype, chunk_images=4
    )
    assert isinstance(store, FeatureStore)
    assert store.shape == expected.shape and len(store) == 11 and store.ndim == 4
    assert store.dtype == np.float32 and store.storage_dtype == np.dtype(dtype)
    got = store[:]
    assert got.dtype == np.float32
    # float16 storage: the transform rounded to the nearest float16
    reference = expected.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(got, reference)
    on_disk = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")["features"]
    assert on_disk.chunks == (4, *expected.shape[1:])
    assert store.attrs["n_images"] == 11 and store.attrs["images"] is None
    assert store.attrs["featurizer"]["resolution"] == RES
    assert store.attrs["featurizer"]["model"].endswith("VisionTransformer>")


def test_paths_are_recorded(vit, images, tmp_path):
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    featurizer = _featurizer(vit)
    store = featurizer.transform_to_store(paths, tmp_path / "f.zarr", chunk_images=2)
    assert store.attrs["images"] == paths
    np.testing.assert_allclose(
        store[:], featurizer.transform(paths).cpu().numpy(), rtol=1e-3, atol=1e-3
    )
    # another image list is refused
    with pytest.raises(ValueError, match="different image list"):
        featurizer.transform_to_store(paths[::-1], tmp_path / "f.zarr", chunk_images=2)


def test_interrupted_write_resumes_only_unfinished_chunks(vit, images, tmp_path):
    featurizer = _featurizer(vit)
    path = tmp_path / "f.zarr"
    failing = Source(list(images), fail_at=6)
    with pytest.raises(RuntimeError, match="image 6"):
        featurizer.transform_to_store(failing, path, chunk_images=3)
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(path)
    # chunks 0:3 and 3:6 are done; the rerun reads only images 6..10
    rerun = Source(list(images))
    store = featurizer.transform_to_store(rerun, path, chunk_images=3)
    assert sorted(rerun.reads) == list(range(6, 11))
    straight = featurizer.transform_to_store(
        Source(list(images)), tmp_path / "g.zarr", chunk_images=3
    )
    np.testing.assert_array_equal(store[:], straight[:])
    # a finished store: a rerun reads nothing at all
    again = Source(list(images))
    featurizer.transform_to_store(again, path, chunk_images=3)
    assert again.reads == []


def test_rerun_with_other_settings_is_refused_unless_overwrite(vit, images, tmp_path):
    path = tmp_path / "f.zarr"
    _featurizer(vit).transform_to_store(images, path, chunk_images=4)
    for kwargs, what in [
        (dict(chunk_images=3), "chunk_images"),
        (dict(chunk_images=4, dtype="float32"), "dtype"),
    ]:
        with pytest.raises(ValueError, match=what):
            _featurizer(vit).transform_to_store(images, path, **kwargs)
    with pytest.raises(ValueError, match="layer"):
        _featurizer(vit, layer=0).transform_to_store(images, path, chunk_images=4)
    # the preprocessing changes the features too
    with pytest.raises(ValueError, match="interpolation"):
        _featurizer(vit, interpolation="nearest").transform_to_store(
            images, path, chunk_images=4
        )
    with pytest.raises(ValueError, match="mean"):
        _featurizer(vit, mean=(0.5,) * 3, std=(0.5,) * 3).transform_to_store(
            images, path, chunk_images=4
        )
    with pytest.raises(ValueError, match="n_images"):
        _featurizer(vit).transform_to_store(images[:5], path, chunk_images=4)
    other = _featurizer(vit, layer=0)
    store = other.transform_to_store(images, path, chunk_images=4, overwrite=True)
    expected = other.transform(images).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(store[:], expected)


def test_bad_arguments(vit, images, tmp_path):
    featurizer = _featurizer(vit)
    with pytest.raises(ValueError, match="dtype"):
        featurizer.transform_to_store(images, tmp_path / "a", dtype="int8")
    with pytest.raises(ValueError, match="chunk_images"):
        featurizer.transform_to_store(images, tmp_path / "a", chunk_images=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a feature store"):
        featurizer.transform_to_store(images, tmp_path / "b", overwrite=True)
    assert (tmp_path / "b" / "keep.txt").read_text() == "user data"
    with pytest.raises(FileNotFoundError, match="no skstego feature store"):
        FeatureStore(tmp_path / "missing")


# --------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def store(vit, images, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "f.zarr"
    return _featurizer(vit).transform_to_store(images, path, chunk_images=2)


def test_indexing_matches_numpy(store):
    with pytest.warns(UserWarning, match="whole feature store"):
        full = np.asarray(store)
    assert full.shape == store.shape and full.dtype == np.float32
    np.testing.assert_array_equal(store[3], full[3])
    np.testing.assert_array_equal(store[-1], full[-1])
    np.testing.assert_array_equal(store[2:9:3], full[2:9:3])
    idx = np.array([7, 1, 7, -2, 0])
    np.testing.assert_array_equal(store[idx], full[idx])
    np.testing.assert_array_equal(store[[4, 2]], full[[4, 2]])
    mask = np.arange(11) % 3 == 0
    np.testing.assert_array_equal(store[mask], full[mask])
    np.testing.assert_array_equal(store[[1, 5], :3], full[[1, 5], :3])
    with pytest.raises(IndexError, match="out of range"):
        store[[11]]


def test_to_dask(store):
    dask_array = pytest.importorskip("dask.array")
    d = store.to_dask()
    assert isinstance(d, dask_array.Array)
    assert d.shape == store.shape and d.dtype == np.float32
    assert d.chunks[0] == (2, 2, 2, 2, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = np.asarray(store)
    np.testing.assert_array_equal(d[3:8].compute(), full[3:8])


# --------------------------------------------------------------- streaming


def test_check_features_reads_nothing(store, tmp_path):
    data = np.random.RandomState(0).rand(10, 3, 2, 2).astype(np.float32)
    counting = Counting(data)
    est = TorchPCA()
    X = check_features(est, counting, reset=True, lazy=True)
    assert isinstance(X, LazyFeatures) and counting.reads == []
    assert est.n_features_in_ == 3 and X.shape == data.shape
    memmap = np.lib.format.open_memmap(tmp_path / "m.npy", "w+", np.float16, (4, 3))
    assert isinstance(check_features(est, memmap, reset=True, lazy=True), LazyFeatures)
    assert isinstance(check_features(est, store, reset=True, lazy=True), LazyFeatures)
    # without lazy=True nothing changes: a plain array comes back
    assert isinstance(check_features(est, memmap, reset=True), np.ndarray)
    with pytest.raises(ValueError, match="shape"):
        check_features(
            est, Counting(data[:, :, 0]), reset=True, allowed_ndim=(4,), lazy=True
        )
    with pytest.raises(ValueError, match="real-valued"):
        check_features(est, Counting(data.astype(complex)), reset=True, lazy=True)
    with pytest.raises(ValueError, match="expecting 3 features"):
        check_features(est, Counting(data[:, :2]), reset=False, lazy=True)


def _small_chunks(monkeypatch, per_chunk):
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "gram", per_chunk)
    monkeypatch.setitem(device_module.CPU_BATCH_ELEMENTS, "read", per_chunk)


def test_pca_streams_store_equal_to_in_memory(store, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = np.asarray(store)
    counting = Counting(store)
    _small_chunks(monkeypatch, 2 * int(np.prod(store.shape[1:])))  # 2 images
    streamed = TorchPCA(dim=5, solver="covariance_eigh", device="cpu").fit(counting)
    assert max(k.stop - k.start for k in counting.reads) <= 2 < store.shape[0]
    assert sorted(k.start for k in counting.reads) == list(range(0, 11, 2))
    memory = TorchPCA(dim=5, solver="covariance_eigh", device="cpu").fit(full)
    np.testing.assert_allclose(streamed.components_, memory.components_, atol=1e-5)
    np.testing.assert_allclose(
        streamed.explained_variance_, memory.explained_variance_, rtol=1e-5
    )
    tokens = full.transpose(0, 2, 3, 1).reshape(-1, full.shape[1]).astype(float)
    ref = PCA(n_components=5).fit(tokens)
    np.testing.assert_allclose(streamed.components_, ref.components_, atol=1e-4)
    np.testing.assert_allclose(
        streamed.explained_variance_, ref.explained_variance_, rtol=1e-4
    )
    # partial_fit on the store itself, then on the store again: twice the tokens
    twice = TorchPCA(dim=5, device="cpu").partial_fit(store).partial_fit(store)
    ref2 = PCA(n_components=5).fit(np.concatenate([tokens, tokens]))
    np.testing.assert_allclose(
        twice.explained_variance_, ref2.explained_variance_, rtol=1e-4
    )


def test_pca_streams_memmap_and_dask(tmp_path, monkeypatch):
    rng = np.random.RandomState(1)
    data = (rng.randn(300, 6) @ rng.randn(6, 6) + 5).astype(np.float32)
    memmap = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, data.shape)
    memmap[:] = data
    memmap.flush()
    reopened = np.load(tmp_path / "x.npy", mmap_mode="r")
    _small_chunks(monkeypatch, 6 * 40)  # 40 rows per chunk
    ref = PCA(n_components=3).fit(data.astype(float))
    got = TorchPCA(dim=3, solver="covariance_eigh", device="cpu").fit(reopened)
    np.testing.assert_allclose(got.components_, ref.components_, atol=1e-4)
    da = pytest.importorskip("dask.array")
    got = TorchPCA(dim=3, solver="covariance_eigh", device="cpu").fit(
        da.from_array(data, chunks=50)
    )
    np.testing.assert_allclose(got.components_, ref.components_, atol=1e-4)


def test_nan_found_in_a_later_chunk(tmp_path, monkeypatch):
    data = np.random.RandomState(0).rand(100, 4).astype(np.float32)
    data[93, 2] = np.nan
    np.save(tmp_path / "x.npy", data)
    _small_chunks(monkeypatch, 4 * 10)
    with pytest.raises(ValueError, match=r"NaN or infinity \(in rows 90:100\)"):
        TorchPCA(dim=2, device="cpu").fit(np.load(tmp_path / "x.npy", mmap_mode="r"))
    with pytest.raises(ValueError, match="NaN or infinity"):
        KMeansProbe(k=2, device="cpu").fit(np.load(tmp_path / "x.npy", mmap_mode="r"))


@pytest.mark.parametrize("max_samples", [None, 60])
def test_kmeans_streams_store_equal_to_in_memory(store, monkeypatch, max_samples):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = np.asarray(store)
    counting = Counting(store)
    _small_chunks(monkeypatch, 3 * int(np.prod(store.shape[1:])))  # 3 images
    params = dict(k=4, max_samples=max_samples, random_state=0, device="cpu")
    tokens = full.transpose(0, 2, 3, 1).reshape(-1, full.shape[1])
    init = tokens[[0, 50, 100, 150]]
    streamed = KMeansProbe(init=init, **params).fit(counting)
    assert max(k.stop - k.start for k in counting.reads) <= 3 < store.shape[0]
    memory = KMeansProbe(init=init, **params).fit(full)
    np.testing.assert_allclose(
        streamed.cluster_centers_, memory.cluster_centers_, atol=1e-5
    )
    np.testing.assert_array_equal(streamed.labels_, memory.labels_)
    assert streamed.inertia_ == pytest.approx(memory.inertia_, rel=1e-5)
    # the streamed labels are the nearest centres (a direct computation)
    d = ((tokens[:, None, :] - streamed.cluster_centers_[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(streamed.labels_.ravel(), d.argmin(1))


@pytest.mark.gpu
def test_streamed_fits_on_cuda_equal_in_memory(store, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = np.asarray(store)
    _small_chunks(monkeypatch, 2 * int(np.prod(store.shape[1:])))
    # on CUDA every purpose gets DEFAULT_BATCH_ELEMENTS: 2 images
    monkeypatch.setattr(device_module, "DEFAULT_BATCH_ELEMENTS", 2 * full[0].size)
    streamed = TorchPCA(dim=5, solver="covariance_eigh", device="cuda").fit(store)
    memory = TorchPCA(dim=5, solver="covariance_eigh", device="cpu").fit(full)
    np.testing.assert_allclose(streamed.components_, memory.components_, atol=1e-4)
    tokens = full.transpose(0, 2, 3, 1).reshape(-1, full.shape[1])
    init = tokens[[0, 50, 100, 150]]
    params = dict(k=4, init=init, max_samples=60, random_state=0)
    got = KMeansProbe(device="cuda", **params).fit(store)
    ref = KMeansProbe(device="cuda", **params).fit(torch.from_numpy(full).cuda())
    np.testing.assert_allclose(got.cluster_centers_, ref.cluster_centers_, atol=1e-5)
    np.testing.assert_array_equal(got.labels_, ref.labels_)
