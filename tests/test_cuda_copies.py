"""Device-to-host copies, pinned memory, OOM back-off and dask shipping, on the CPU.

Every estimator runs under :mod:`_cuda_harness_copies`: once on the CPU (the
``x.to("cpu", non_blocking=True)`` pattern is flagged whatever the source
device), once with NumPy input on an emulated GPU (pinning is recorded and
budgeted) and once with (fake) CUDA tensors and ``device="cpu"`` (the
device-to-host path of issue 21 item 1).
"""

import pickle

import numpy as np
import pytest
import timm
import torch
from _cuda_harness_copies import CopyRecorder, cuda_copy_harness

from skstego import (
    DinoFeaturizer,
    HNNEClusterProbe,
    HNNEProjector,
    KMeansProbe,
    LinearProbe,
    RandomProjection,
    StegoProjector,
    TorchPCA,
    crf_refine,
)
from skstego._device import as_tensor, module_to_host, to_device, to_host
from skstego.features import _dino
from skstego.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)
from skstego.projection._knn import nearest_neighbors

RES = 32


def _vit():
    torch.manual_seed(0)
    return timm.models.VisionTransformer(
        img_size=RES, patch_size=8, embed_dim=32, depth=1, num_heads=2
    ).eval()


@pytest.fixture(scope="module")
def vit():
    return _vit()


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randint(0, 256, (40, RES, RES, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    maps = rng.standard_normal((6, 8, 4, 4)).astype(np.float32)
    tokens = rng.standard_normal((120, 8)).astype(np.float32)
    labels = rng.randint(0, 3, 120)
    return maps, tokens, labels


# --------------------------------------------------------------------------
# what each estimator runs; ``X`` is NumPy or a tensor on the harness's device
# --------------------------------------------------------------------------
def _run_reducers(X, device):
    TorchPCA(dim=3, device=device).fit(X).transform(X)
    RandomProjection(dim=3, device=device, random_state=0).fit(X).transform(X)


def _run_probes(X, y, device):
    KMeansProbe(k=3, backend="torch", device=device, random_state=0).fit(X).predict(X)
    LinearProbe(device=device, random_state=0, max_iter=50, tol=1e-2).fit(X, y).predict(
        X
    )


def _run_stego(maps, device):
    StegoProjector(
        dim=3, n_steps=2, batch_size=2, feature_samples=3, neg_samples=1,
        n_neighbors=2, device=device, random_state=0,
    ).fit(maps).transform(maps)  # fmt: skip


def _run_hnne(X, device):
    HNNEProjector(dim=2, device=device, random_state=0).fit(X).transform(X)
    HNNEClusterProbe(k=3, device=device, random_state=0).fit(X).predict(X)


def _run_metrics(X, labels, device):
    silhouette_score(X, labels, device=device)
    davies_bouldin_score(X, labels, device=device)
    calinski_harabasz_score(X, labels, device=device)


def _run_crf(proba, device):
    images = np.random.RandomState(1).randint(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    crf_refine(images, proba, n_iter=2, method="approx", device=device, backend="torch")


def _run_knn(descriptors, device):
    nearest_neighbors(descriptors, 3, backend="torch", device=device)


def _cases(maps, tokens, labels):
    """(name, function of (maps, tokens), needs label-free input)."""
    proba = np.random.RandomState(2).dirichlet(np.ones(3), (2, 8, 8))
    proba = np.ascontiguousarray(proba.transpose(0, 3, 1, 2)).astype(np.float32)
    desc = tokens[:20]
    return {
        "reducers": lambda conv, dev: _run_reducers(conv(tokens), dev),
        "reducers-maps": lambda conv, dev: _run_reducers(conv(maps), dev),
        "probes": lambda conv, dev: _run_probes(conv(tokens), labels, dev),
        "stego": lambda conv, dev: _run_stego(conv(maps), dev),
        "hnne": lambda conv, dev: _run_hnne(conv(tokens), dev),
        "metrics": lambda conv, dev: _run_metrics(conv(tokens), labels, dev),
        "crf": lambda conv, dev: _run_crf(conv(proba), dev),
        "knn": lambda conv, dev: _run_knn(conv(desc), dev),
    }


CASES = [
    "reducers",
    "reducers-maps",
    "probes",
    "stego",
    "hnne",
    "metrics",
    "crf",
    "knn",
]


@pytest.mark.parametrize("case", CASES)
def test_no_async_copy_to_host_on_the_cpu(data, case):
    # on the CPU the old as_tensor's .to(cpu, non_blocking=True) is flagged
    run = _cases(*data)[case]
    with cuda_copy_harness(fake_cuda=False) as rec:
        run(torch.as_tensor, "cpu")
        run(np.asarray, "cpu")
    rec.assert_no_async_d2h()
    assert rec.pins == []


@pytest.mark.parametrize("case", CASES)
def test_no_async_copy_to_host_from_the_gpu(data, case):
    # (fake) CUDA tensors computed on the CPU: the device-to-host path
    run = _cases(*data)[case]
    with cuda_copy_harness() as rec:
        run(lambda a: torch.as_tensor(np.asarray(a)).cuda(), "cpu")
    rec.assert_no_async_d2h()


@pytest.mark.parametrize("case", ["reducers", "reducers-maps", "probes", "metrics"])
def test_numpy_input_on_the_gpu_pins_nothing_whole(data, case):
    # NumPy input to a (fake) GPU estimator: the old as_tensor pinned every
    # array it was given (KMeansProbe, LinearProbe, the cluster metrics)
    run = _cases(*data)[case]
    with cuda_copy_harness() as rec:
        run(np.asarray, "cuda")
    rec.assert_no_async_d2h()
    rec.assert_pinned_at_most(0)


def test_as_tensor_never_copies_asynchronously():
    x = torch.arange(6.0)
    with cuda_copy_harness() as rec:
        gpu = as_tensor(np.arange(6.0), torch.device("cuda"))
        assert gpu.is_cuda
        back = as_tensor(gpu, torch.device("cpu"))
        assert not rec.is_fake_cuda(back)
        np.testing.assert_array_equal(back.numpy(), np.arange(6.0))
        # staged: pinned by the caller, host to device only
        pinned = x.pin_memory()
        assert to_device(pinned, torch.device("cuda"), staged=True).is_cuda
        to_device(gpu, torch.device("cpu"), staged=True)
    rec.assert_no_async_d2h()
    assert [r.what for r in rec.pins] == ["Tensor.pin_memory"]


def test_harness_flags_the_old_patterns():
    # the harness itself: the patterns of the defects it exists for
    with cuda_copy_harness() as rec:
        gpu = torch.ones(4, device="cuda")
        gpu.to(torch.device("cpu"), non_blocking=True)  # old as_tensor
        torch.ones(3).to("cpu", torch.float32, non_blocking=True)  # from the host
        host = torch.empty(4, pin_memory=True)  # old featurizer, per batch
        host.copy_(gpu, non_blocking=True)
        with pytest.raises(TypeError, match="numpy"):
            gpu.numpy()
        with pytest.raises(RuntimeError, match="same device"):
            gpu + torch.ones(4)
        pickle.dumps(gpu)
    assert len(rec.d2h_async) == 3
    assert rec.pins[0].nbytes == 16 and rec.peak_pinned_bytes == 16
    with pytest.raises(AssertionError, match="non_blocking=True"):
        rec.assert_no_async_d2h()
    with pytest.raises(AssertionError, match="budget"):
        rec.assert_pinned_at_most(8)
    with pytest.raises(AssertionError, match="pickled"):
        rec.assert_no_cuda_pickled()
    del host
    assert rec.pinned_bytes == 0


# --------------------------------------------------------------------------
# DinoFeaturizer on the emulated GPU
# --------------------------------------------------------------------------
def _featurizer(vit, **kwargs):
    kwargs.setdefault("resolution", RES)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("precision", "float32")
    return DinoFeaturizer(vit, **kwargs)


@pytest.mark.parametrize("as_list", [False, True], ids=["array", "list"])
def test_featurizer_numpy_output_pins_a_bounded_amount(vit, images, as_list):
    expected = _featurizer(vit, device="cpu").transform(images)
    X = list(images) if as_list else images
    with cuda_copy_harness() as rec:
        out = _featurizer(vit, device="cuda").transform(X)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    rec.assert_no_async_d2h()
    # at most three batches of images or maps pinned at once, whatever the
    # number of images (the old code kept one pinned buffer per batch)
    batch = 4 * max(images[0].nbytes, out[0].nbytes)
    rec.assert_pinned_at_most(3 * batch)


def test_featurizer_torch_output_stays_on_the_device(vit, images):
    expected = _featurizer(vit, device="cpu").transform(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with cuda_copy_harness() as rec:
        out = _featurizer(vit, device="cuda").transform(x.cuda())
        assert out.is_cuda
        host = out.cpu()
        out_cpu = _featurizer(vit, device="cpu").transform(x.cuda())
        assert not out_cpu.is_cuda
    np.testing.assert_allclose(host.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out_cpu.numpy(), expected, atol=1e-5)
    rec.assert_no_async_d2h()
    rec.assert_pinned_at_most(0)


@pytest.mark.parametrize("as_list", [False, True], ids=["array", "list"])
@pytest.mark.parametrize("where", ["resize", "write"])
def test_out_of_memory_back_off_covers_resize_and_output(
    vit, images, monkeypatch, where, as_list
):
    # an out-of-memory error outside the forward pass (in the on-device
    # resize, or storing the maps) halves the batch as one in the forward does
    expected = _featurizer(vit, device="cpu").transform(images[:10])
    sizes = []

    def failing_resize(x, runner):
        sizes.append(runner.batch_size)
        if runner.batch_size > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(x, runner)

    def failing_write(self, positions, maps, numpy):
        sizes.append(len(positions))
        if len(positions) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(self, positions, maps, numpy)

    if where == "resize":
        real = _dino._resize_crop
        monkeypatch.setattr(_dino, "_resize_crop", failing_resize)
    else:
        real = _dino._Output.write
        monkeypatch.setattr(_dino._Output, "write", failing_write)
    monkeypatch.setattr(_dino, "_CUDA_BATCH", {})
    X = list(images[:10]) if as_list else images[:10]
    with cuda_copy_harness() as rec:
        out = _featurizer(vit, device="cuda", batch_size="auto").transform(X)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert max(sizes) > 2 and sizes[-1] <= 2
    (size,) = _dino._CUDA_BATCH.values()
    assert size <= 2
    rec.assert_no_async_d2h()


def test_out_of_memory_in_resize_with_explicit_batch_raises(vit, images, monkeypatch):
    def failing(x, runner):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(_dino, "_resize_crop", failing)
    with cuda_copy_harness(), pytest.raises(torch.cuda.OutOfMemoryError):
        _featurizer(vit, device="cuda", batch_size=4).transform(images[:4])


# --------------------------------------------------------------------------
# what travels to dask workers
# --------------------------------------------------------------------------
def test_featurizer_pickles_a_gpu_module_on_the_cpu(vit, images):
    with cuda_copy_harness() as rec:
        gpu_vit = _vit().cuda()
        assert next(gpu_vit.parameters()).is_cuda
        feat = _featurizer(gpu_vit, device="auto")
        blob = pickle.dumps(feat)
        assert next(gpu_vit.parameters()).is_cuda  # the user's module stays
    rec.assert_no_cuda_pickled()
    loaded = pickle.loads(blob)
    assert next(loaded.model.parameters()).device.type == "cpu"
    np.testing.assert_allclose(
        loaded.set_params(device="cpu").transform(images[:2]),
        _featurizer(vit, device="cpu").transform(images[:2]),
        atol=1e-5,
    )


def test_old_pickling_of_a_gpu_module_is_flagged():
    # what the harness sees when a CUDA module is pickled as is
    with cuda_copy_harness() as rec:
        pickle.dumps(_vit().cuda())
    assert rec.cuda_pickled


def test_estimators_pickle_gpu_parameters_on_the_cpu(data):
    _, tokens, _ = data
    with cuda_copy_harness() as rec:
        init = torch.as_tensor(tokens[:3]).cuda()
        probe = KMeansProbe(
            k=3, init=init, n_init=1, backend="torch", device="cuda"
        ).fit(tokens)
        blob = pickle.dumps(probe)
        assert probe.init is init
    rec.assert_no_cuda_pickled()
    loaded = pickle.loads(blob)
    assert loaded.init.device.type == "cpu"
    np.testing.assert_array_equal(loaded.init.numpy(), tokens[:3])


def test_to_host_and_module_to_host():
    with cuda_copy_harness() as rec:
        net = torch.nn.Linear(2, 2).cuda()
        t = torch.ones(2, device="cuda")
        moved = to_host({"a": [t, 1], "b": (net,), "c": "x"})
        assert not rec.is_fake_cuda(moved["a"][0])
        assert not rec.is_fake_cuda(next(moved["b"][0].parameters()))
        assert rec.is_fake_cuda(next(net.parameters()))
        host = {"a": [torch.ones(1)]}
        assert to_host(host) is host
        cpu_net = torch.nn.Linear(2, 2)
        assert module_to_host(cpu_net) is cpu_net


def test_transform_to_store_sends_cuda_images_on_the_cpu(vit, images, tmp_path):
    pytest.importorskip("zarr")
    sent = []

    class Client:  # records what would be pickled to the workers
        def scatter(self, items, **kwargs):
            sent.extend(items)
            return [object() for _ in items]

        def submit(self, fn, *args, **kwargs):
            sent.extend(args)
            raise RuntimeError("stop after the first submission")

        def gather(self, *args, **kwargs):  # pragma: no cover
            raise AssertionError

    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2)
    with cuda_copy_harness() as rec:
        gpu_vit = _vit().cuda()
        feat = _featurizer(gpu_vit, device="auto")
        with pytest.raises(RuntimeError, match="first submission"):
            feat.transform_to_store(
                x.cuda(), tmp_path / "s.zarr", chunk_images=2, client=Client()
            )
        for item in sent:
            pickle.dumps(item)
    rec.assert_no_cuda_pickled()
    assert any(torch.is_tensor(item) for item in sent)


def test_recorder_can_be_used_directly():
    recorder = CopyRecorder()
    with recorder:
        torch.ones(2).to("cpu")
    recorder.assert_no_async_d2h()
