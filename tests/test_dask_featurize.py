"""Featurization into a FeatureStore on a Dask cluster (2 worker processes on
loopback), against the local, in-memory ``transform`` of the same images."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from skstego import DinoFeaturizer
from skstego.features import FeatureStore

zarr = pytest.importorskip("zarr")
distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(180)

RES = 32
N_IMAGES = 12
CHUNK = 2  # 6 chunks


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random tiny ViT saved to a file, so that every process loads the same."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 256, size=(RES + 4 * (i % 3), RES, 3), dtype=np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def _featurizer(weights):
    return DinoFeaturizer(
        "vit_tiny_patch16_224", weights=weights, resolution=RES, device="cpu"
    )


@pytest.fixture(scope="module")
def expected(weights, image_paths):
    return _featurizer(weights).transform(image_paths).numpy()


def _chunk_workers(records):
    return {
        record["worker"]
        for record in records
        if str(record["key"]).startswith("skstego-chunk-")
    }


def test_cluster_store_equals_local_transform(
    client, weights, image_paths, expected, tmp_path
):
    from distributed import get_task_stream

    path = tmp_path / "features.zarr"
    with get_task_stream(client) as stream:
        store = _featurizer(weights).transform_to_store(
            image_paths, path, dtype="float32", chunk_images=CHUNK, client=client
        )
    assert isinstance(store, FeatureStore)
    assert store.attrs["complete"] and store.attrs["images"] == image_paths
    np.testing.assert_allclose(store[:], expected, rtol=1e-4, atol=1e-4)
    assert np.asarray(zarr.open_group(str(path), mode="r")["done"][:]).all()
    # both workers wrote chunks, and each built exactly one backbone
    workers = set(client.scheduler_info()["workers"])
    assert _chunk_workers(stream.data) == workers
    from skstego.features import _dino

    counts = client.run(lambda: len(_dino._BACKBONES))
    assert sorted(counts.values()) == [1, 1]


@pytest.mark.parametrize("source", ["collection", "array"])
def test_cluster_store_from_a_lazy_collection_or_an_array(
    client, weights, image_paths, expected, tmp_path, source
):
    # a lazy collection is sent once per worker, an array chunk by chunk
    from skstego.datasets import ImageCollection

    if source == "collection":
        images, reference = ImageCollection(image_paths), expected
    else:
        images = np.stack([np.asarray(Image.open(p))[:RES] for p in image_paths])
        reference = _featurizer(weights).transform(images)
    store = _featurizer(weights).transform_to_store(
        images, tmp_path / "f.zarr", chunk_images=CHUNK, client=client
    )
    assert store.storage_dtype == np.float16
    np.testing.assert_allclose(store[:], reference, rtol=2e-3, atol=2e-3)


def test_cluster_write_resumes_after_a_failed_chunk(
    client, weights, image_paths, expected, tmp_path
):
    # image 7 (chunk 3) is unreadable on the first run
    paths = list(image_paths)
    broken = tmp_path / "img07.png"
    broken.write_bytes(b"not a png")
    paths[7] = str(broken)
    path = tmp_path / "features.zarr"
    featurizer = _featurizer(weights)
    with pytest.raises(RuntimeError, match=r"1 chunk\(s\).*chunk 3, images 6:8"):
        featurizer.transform_to_store(
            paths, path, dtype="float32", chunk_images=CHUNK, client=client
        )
    group = zarr.open_group(str(path), mode="r+")
    np.testing.assert_array_equal(group["done"][:], [1, 1, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(path)
    # mark a finished chunk: a rerun must not recompute it
    group["features"][4:6] = 7.0
    Image.open(image_paths[7]).save(broken, format="PNG")
    store = featurizer.transform_to_store(
        paths, path, dtype="float32", chunk_images=CHUNK, client=client
    )
    data = store[:]
    assert (data[4:6] == 7.0).all()
    keep = np.r_[0:4, 6:N_IMAGES]
    np.testing.assert_allclose(data[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_cluster_resumes_a_store_begun_locally(
    client, weights, image_paths, expected, tmp_path
):
    # a store whose features array exists (chunk 0 written locally, then
    # interrupted) is finished on the cluster: all remaining chunks at once
    path = tmp_path / "features.zarr"
    featurizer = _featurizer(weights)

    class Interrupt(Exception):
        pass

    class Source(list):
        def __getitem__(self, i):
            if isinstance(i, (int, np.integer)) and i >= CHUNK:
                raise Interrupt
            return super().__getitem__(i)

    with pytest.raises(Interrupt):
        featurizer.transform_to_store(
            Source(image_paths), path, chunk_images=CHUNK, dtype="float32"
        )
    store = featurizer.transform_to_store(
        image_paths, path, dtype="float32", chunk_images=CHUNK, client=client
    )
    np.testing.assert_allclose(store[:], expected, rtol=1e-4, atol=1e-4)


def test_client_must_be_a_dask_client(weights, image_paths, tmp_path):
    with pytest.raises(TypeError, match=r"distributed\.Client"):
        _featurizer(weights).transform_to_store(
            image_paths, tmp_path / "f.zarr", client="tcp://127.0.0.1:8786"
        )
    assert not (tmp_path / "f.zarr").exists()
