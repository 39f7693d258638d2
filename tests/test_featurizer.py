"""DinoFeaturizer against a direct timm forward, on every input type."""

import pickle
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.pipeline import Pipeline

from skstego import DinoFeaturizer, KMeansProbe, TorchPCA
from skstego.datasets import make_scenes
from skstego.features import _dino

RES = 64
ATOL = 1e-4


def _tiny(**kwargs):
    torch.manual_seed(0)
    params = dict(img_size=RES, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    params.update(kwargs)
    return timm.models.VisionTransformer(**params).eval()


@pytest.fixture(scope="module")
def vit():
    return _tiny()


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randint(0, 256, (5, RES, RES, 3), dtype=np.uint8)


def _reference(vit, images, layer=-1):
    """Direct timm forward: normalise, forward, drop prefix tokens, reshape."""
    cfg = timm.data.resolve_model_data_config(vit)
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        if layer == -1:
            t = vit.forward_features(x)
        else:
            t = vit._pos_embed(vit.patch_embed(x))
            t = vit.norm_pre(t)
            for block in vit.blocks[: len(vit.blocks) + layer + 1]:
                t = block(t)
            t = vit.norm(t)
    t = t[:, vit.num_prefix_tokens :]
    n, _, h, w = x.shape
    p = vit.patch_embed.patch_size[0]
    return t.reshape(n, h // p, w // p, -1).permute(0, 3, 1, 2).numpy()


def _feat(vit, **kwargs):
    kwargs.setdefault("resolution", RES)
    kwargs.setdefault("device", "cpu")
    return DinoFeaturizer(vit, **kwargs)


# --------------------------------------------------------------------------
# equality with timm on every input type
# --------------------------------------------------------------------------
def test_numpy_batch_matches_timm(vit, images):
    out = _feat(vit).fit_transform(images)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (5, 64, 8, 8)
    np.testing.assert_allclose(out, _reference(vit, images), atol=ATOL)


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_torch_batch_matches_timm(vit, images, kind):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if kind == "float":
        x = x.float() / 255
    out = _feat(vit).transform(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _reference(vit, images), atol=ATOL)


def test_pil_list_matches_timm(vit, images):
    out = _feat(vit).transform([Image.fromarray(im) for im in images])
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), _reference(vit, images), atol=ATOL)


def test_paths_match_timm(vit, images, tmp_path):
    paths = []
    for i, im in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray(im).save(path)
        paths.append(path if i % 2 else str(path))
    out = _feat(vit).transform(paths)
    np.testing.assert_allclose(out.numpy(), _reference(vit, images), atol=ATOL)
    # JPEG: compare with the decoded pixels
    jpg = tmp_path / "a.jpg"
    Image.fromarray(images[0]).save(jpg, quality=90)
    decoded = np.asarray(Image.open(jpg).convert("RGB"))[None]
    out = _feat(vit).transform([jpg])
    np.testing.assert_allclose(out.numpy(), _reference(vit, decoded), atol=ATOL)


def test_list_of_arrays_with_different_sizes(vit, images):
    rng = np.random.RandomState(1)
    wide = rng.randint(0, 256, (RES, 2 * RES, 3), dtype=np.uint8)  # crop keeps middle
    tall = rng.randint(0, 256, (2 * RES, 2 * RES, 3), dtype=np.uint8)  # resized
    out = _feat(vit).transform([images[0], wide, tall])
    assert isinstance(out, np.ndarray) and out.shape == (3, 64, 8, 8)
    expected = [
        images[0],
        wide[:, RES // 2 : RES // 2 + RES],
        _resize_like_featurizer(tall, (RES, RES)),
    ]
    np.testing.assert_allclose(out, _reference_float(vit, expected), atol=ATOL)


def _resize_like_featurizer(im, size):
    x = torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(
        x, size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]


def _reference_float(vit, images):
    """Reference for a mix of uint8 HWC arrays and [0, 1] CHW tensors."""
    xs = [
        torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255
        if isinstance(im, np.ndarray)
        else im
        for im in images
    ]
    x = torch.stack(xs)
    batch = (x.permute(0, 2, 3, 1) * 255).numpy()
    return _reference_from_float(vit, batch)


def _reference_from_float(vit, batch_hwc_255):
    cfg = timm.data.resolve_model_data_config(vit)
    x = torch.from_numpy(batch_hwc_255).permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        cfg["std"]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        t = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    n, _, h, w = x.shape
    return t.reshape(n, h // 8, w // 8, -1).permute(0, 3, 1, 2).numpy()


def test_lazy_sequence(vit, images):
    reads = []

    class Lazy:  # an indexable collection that decodes on access
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            reads.append(i)
            return images[i]

    out = _feat(vit, batch_size=2).transform(Lazy())
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, _reference(vit, images), atol=ATOL)
    assert sorted(reads) == list(range(len(images)))  # each image read once


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------
def test_crop_none_keeps_the_whole_image():
    vit = _tiny(dynamic_img_size=True)
    im = np.random.RandomState(2).randint(0, 256, (2, RES, 2 * RES, 3), dtype=np.uint8)
    out = _feat(vit, crop="none").transform(im)
    assert out.shape == (2, 64, 8, 16)
    np.testing.assert_allclose(out, _reference(vit, im), atol=ATOL)
    # a fixed-size model gives the same result (switched to dynamic sizes)
    fixed = _tiny()
    np.testing.assert_allclose(_feat(fixed, crop="none").transform(im), out, atol=ATOL)
    assert not fixed.dynamic_img_size and fixed.patch_embed.strict_img_size


def test_crop_none_rounds_to_patch_multiples(vit):
    im = np.zeros((1, 60, 100, 3), dtype=np.uint8)
    # short side 60 -> 64, long side 100 * 64 / 60 = 106.7 -> 104
    assert _feat(vit, crop="none").transform(im).shape == (1, 64, 8, 13)


def test_crop_none_different_sizes_raise(vit):
    ims = [np.zeros((RES, RES, 3), np.uint8), np.zeros((RES, 2 * RES, 3), np.uint8)]
    with pytest.raises(ValueError, match="crop='center'"):
        _feat(vit, crop="none").transform(ims)


def test_layer_minus_two(vit, images):
    out = _feat(vit, layer=-2).transform(images)
    np.testing.assert_allclose(out, _reference(vit, images, layer=-2), atol=ATOL)
    with pytest.raises(ValueError, match="layer=5 is out of range"):
        _feat(vit, layer=5).transform(images)


def test_register_tokens_are_dropped(images):
    vit = _tiny(reg_tokens=4, no_embed_class=True)
    assert vit.num_prefix_tokens == 5
    out = _feat(vit).transform(images[:2])
    np.testing.assert_allclose(out, _reference(vit, images[:2]), atol=ATOL)


def test_patch14_and_resolution_check(images):
    vit = _tiny(img_size=56, patch_size=14)
    out = _feat(vit, resolution=56).transform(images[:2])
    assert out.shape == (2, 64, 4, 4)
    with pytest.raises(ValueError, match=r"use e\.g\. 56 or 70"):
        _feat(vit, resolution=64).transform(images[:2])
    out = _feat(vit, resolution=64, crop="none").transform(images[:1])
    assert out.shape == (1, 64, 5, 5)  # 64 px rounded to 70 = 5 patches


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch8_224.dino",
        "vit_base_patch8_224.dino",
        "vit_small_patch16_224.dino",
        "vit_base_patch16_224.dino",
        "vit_small_patch14_dinov2.lvd142m",
    ],
)
def test_dino_names_are_known_to_timm(name):
    assert timm.is_model(name)
    assert timm.models.get_pretrained_cfg(name).hf_hub_id


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_batch_size_independence(vit, images, batch_size):
    full = _feat(vit, batch_size=16).transform(images)
    out = _feat(vit, batch_size=batch_size).transform(images)
    np.testing.assert_allclose(out, full, atol=ATOL)
    paths_like = _feat(vit, batch_size=batch_size).transform(list(images))
    np.testing.assert_allclose(paths_like, full, atol=ATOL)


def test_out_of_memory_halves_the_batch(vit, images, monkeypatch):
    # CUDA out-of-memory simulated on the CPU: batches above 2 images fail
    real = _dino._Runner._forward
    seen = []

    def forward(self, x):
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(self, x)

    monkeypatch.setattr(_dino._Runner, "_forward", forward)
    runner = _dino._Runner(_feat(vit), vit, torch.device("cpu"))
    runner.device, runner.batch_key, runner.batch_size = torch.device("cuda"), "k", 8
    monkeypatch.setitem(_dino._CUDA_BATCH, "k", 8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    out = runner.features(x)
    assert seen == [5, 4, 2, 2, 1] and _dino._CUDA_BATCH["k"] == 2
    np.testing.assert_allclose(out.numpy(), _reference(vit, images), atol=ATOL)
    runner.auto_batch = False  # an explicit batch size does not back off
    runner.batch_size = 4
    with pytest.raises(torch.cuda.OutOfMemoryError):
        runner.features(x)


def test_verbose_progress_bar(vit, images, capsys):
    _feat(vit, verbose=True).transform(images)
    assert "DinoFeaturizer" in capsys.readouterr().err


def test_bfloat16_on_cpu_is_close(vit, images):
    out = _feat(vit, precision="bfloat16").transform(images)
    assert out.dtype == np.float32
    ref = _reference(vit, images)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


# --------------------------------------------------------------------------
# backbone cache and weights
# --------------------------------------------------------------------------
def test_clone_reuses_the_backbone(vit, images):
    feat = _feat(vit)
    copy = clone(feat)
    assert copy.model is vit
    dev = torch.device("cpu")
    assert _dino.get_backbone(copy.model, True, None, dev) is vit
    named = DinoFeaturizer("vit_small_patch8_224", pretrained=False, device="cpu")
    a = _dino.get_backbone("vit_small_patch8_224", False, None, dev)
    b = _dino.get_backbone(
        clone(named).model, clone(named).pretrained, clone(named).weights, dev
    )
    assert a is b
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def _weights_model():
    torch.manual_seed(3)
    return timm.create_model(
        "vit_small_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True
    ).eval()


@pytest.fixture(scope="module")
def saved_vit():
    net = _weights_model()
    images = np.random.RandomState(4).randint(0, 256, (2, RES, RES, 3), np.uint8)
    return net, images, _reference(net, images)


def test_weights_safetensors(saved_vit, tmp_path):
    from safetensors.torch import save_file

    net, images, ref = saved_vit
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    feat = DinoFeaturizer(
        "vit_small_patch8_224", weights=path, resolution=RES, device="cpu"
    )
    np.testing.assert_allclose(feat.transform(images), ref, atol=ATOL)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.backbone."])
def test_weights_dino_pth(saved_vit, tmp_path, prefix):
    net, images, ref = saved_vit
    state = {prefix + k: v for k, v in net.state_dict().items()}
    state[prefix.replace("backbone.", "") + "head.mlp.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "dino.pth"
    torch.save({"teacher": state, "epoch": 3}, path)
    feat = DinoFeaturizer(
        "vit_small_patch8_224.dino", weights=str(path), resolution=RES, device="cpu"
    )
    np.testing.assert_allclose(feat.transform(images), ref, atol=ATOL)


@pytest.mark.parametrize("teacher_prefix", ["module.backbone.", "backbone."])
def test_weights_dino_training_checkpoint(saved_vit, tmp_path, teacher_prefix):
    # DINO's main_dino.py saves teacher, student, optimizer, epoch, args (an
    # argparse.Namespace) and the loss state in checkpoint.pth
    import argparse

    net, images, ref = saved_vit
    state = net.state_dict()
    teacher = {teacher_prefix + k: v for k, v in state.items()}
    # the projection head, beside the backbone in DINO's wrapper
    head_prefix = teacher_prefix.removesuffix("backbone.") + "head."
    teacher[head_prefix + "mlp.0.weight"] = torch.zeros(4, 384)
    teacher[head_prefix + "last_layer.weight_g"] = torch.ones(4, 1)
    student = {"module.backbone." + k: v + 1.0 for k, v in state.items()}
    checkpoint = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 4)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    feat = DinoFeaturizer(
        "vit_small_patch8_224", weights=path, resolution=RES, device="cpu"
    )
    np.testing.assert_allclose(feat.transform(images), ref, atol=ATOL)  # teacher
    assert feat.fit(images).normalization_.startswith("imagenet")


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_weights_with_code_are_refused(saved_vit, tmp_path):
    import argparse

    net, images, _ = saved_vit
    teacher = {"backbone." + k: v for k, v in net.state_dict().items()}

    def save(target, path):
        checkpoint = {"teacher": teacher, "args": argparse.Namespace(arch="vit_small")}
        checkpoint["extra"] = _Payload(target)
        torch.save(checkpoint, path)

    # the payload is live: an unrestricted torch.load runs it
    live, live_target = tmp_path / "live.pth", tmp_path / "created-by-live"
    save(live_target, live)
    torch.load(live, weights_only=False)
    assert live_target.exists()

    target, path = tmp_path / "created-by-pickle", tmp_path / "evil.pth"
    save(target, path)
    for name in ("vit_small_patch8_224", "vit_tiny_patch16_224"):
        feat = DinoFeaturizer(name, weights=path, resolution=RES, device="cpu")
        with pytest.raises(ValueError, match=r"Refusing to read .*evil\.pth.*open"):
            feat.transform(images)
        if name == "vit_tiny_patch16_224":  # fit reads the file's layout
            with pytest.raises(ValueError, match="Refusing to read"):
                feat.fit(images)
    assert not target.exists()


def test_weights_errors(tmp_path, images):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        DinoFeaturizer("vit_small_patch8_224", weights=missing).transform(images)
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.norm1.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match=r"do not (match|fit)"):
        DinoFeaturizer("vit_small_patch8_224", weights=bad, device="cpu").transform(
            images
        )


def test_offline_pretrained_fails_fast(images):
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="weights="):
        DinoFeaturizer("vit_small_patch16_224.dino", device="cpu").transform(images)
    assert time.perf_counter() - start < 20


def test_offline_without_env_variable_fails_fast(monkeypatch, images):
    # no network here, and the probe is what keeps the failure fast; simulate an
    # unreachable hub so the test holds on a machine with network too
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_dino, "_HUB_REACHABLE", [False])
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="unreachable"):
        DinoFeaturizer("vit_small_patch16_224.dino", device="cpu").transform(images)
    assert time.perf_counter() - start < 20
    assert constants.HF_HUB_OFFLINE is False


def test_bad_model_names(images):
    with pytest.raises(ValueError, match="not a timm model"):
        DinoFeaturizer("no_such_vit", pretrained=False).transform(images)
    with pytest.raises(ValueError, match="not a timm Vision Transformer"):
        DinoFeaturizer(torch.nn.Linear(2, 2)).transform(images)


# --------------------------------------------------------------------------
# bad and unusual input
# --------------------------------------------------------------------------
def test_missing_and_unreadable_files_name_the_path(vit, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        _feat(vit).transform([missing])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"broken\.png"):
        _feat(vit).transform([str(broken)])


def test_grayscale_and_rgba_are_converted(vit, images, tmp_path):
    gray = images[0, :, :, 0]
    rgb_gray = np.repeat(gray[:, :, None], 3, axis=2)[None]
    ref = _reference(vit, rgb_gray)
    feat = _feat(vit)
    np.testing.assert_allclose(feat.transform([gray]), ref, atol=ATOL)
    path = tmp_path / "g.png"
    Image.fromarray(gray, mode="L").save(path)
    np.testing.assert_allclose(feat.transform([path]).numpy(), ref, atol=ATOL)
    rgba = np.concatenate([images[:1], np.full((1, RES, RES, 1), 7, np.uint8)], -1)
    np.testing.assert_allclose(
        feat.transform(rgba), _reference(vit, images[:1]), atol=ATOL
    )
    pil = Image.fromarray(rgba[0], mode="RGBA")
    np.testing.assert_allclose(
        feat.transform([pil]).numpy(), _reference(vit, images[:1]), atol=ATOL
    )


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.zeros((2, 8, 8), np.uint8), r"\(N, H, W, 3\)"),
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((2, 8, 8, 5), np.uint8), r"\(N, H, W, 3\)"),
        (torch.zeros(2, 8, 8, 3), r"\(N, 3, H, W\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), "dtype"),
        (torch.full((1, 3, 8, 8), 255.0), r"\[0, 1\]"),
        ([np.zeros((8, 8, 3), np.float64)], "uint8"),
        ([np.zeros((8, 8, 3, 1), np.uint8)], "image array"),
        ([3.0], "Cannot read float"),
        ("image.png", "sequence of images"),
        ([], "no images"),
    ],
)
def test_bad_input_raises(vit, X, match):
    with pytest.raises(ValueError, match=match):
        _feat(vit).transform(X)


def test_bad_parameters(vit, images):
    with pytest.raises(ValueError, match="crop"):
        _feat(vit, crop="left").transform(images)
    with pytest.raises(ValueError, match="precision"):
        _feat(vit, precision="fp16").fit(images)


# --------------------------------------------------------------------------
# scikit-learn contract (the generic checks need 2-D data; see test_common)
# --------------------------------------------------------------------------
def test_sklearn_contract(vit, images):
    feat = DinoFeaturizer(vit, resolution=RES, layer=-2, device="cpu")
    params = feat.get_params()
    assert params["model"] is vit and params["layer"] == -2
    assert set(vars(feat)) == set(params)  # __init__ stores parameters only
    assert feat.fit(images) is feat
    assert feat.get_params() == params  # fit changes no parameter
    # fit records only the resolved normalisation
    fitted = {"mean_", "std_", "normalization_"}
    assert set(vars(feat)) == set(params) | fitted
    other = clone(feat).set_params(resolution=32, crop="none")
    assert other.get_params()["resolution"] == 32 and feat.resolution == RES
    assert clone(feat).get_params() == params
    assert not fitted & set(vars(clone(feat)))
    # stateless: transform works unfitted
    assert feat.__sklearn_tags__().requires_fit is False
    unfitted = DinoFeaturizer(vit, resolution=RES, device="cpu")
    np.testing.assert_allclose(
        unfitted.transform(images[:1]), _reference(vit, images[:1]), atol=ATOL
    )
    assert set(vars(unfitted)) == set(params)


def test_pickle_is_small_and_reusable(images):
    feat = DinoFeaturizer("vit_small_patch8_224", pretrained=False, resolution=RES)
    feat.set_params(device="cpu").fit(images)
    out = feat.transform(images[:2])
    blob = pickle.dumps(feat)
    assert len(blob) < 2000
    np.testing.assert_allclose(pickle.loads(blob).transform(images[:2]), out)


def test_pipeline_on_scenes(vit):
    images, labels = make_scenes(8, size=RES, n_classes=3, random_state=0)
    pipe = Pipeline(
        [
            ("dino", _feat(vit)),
            ("pca", TorchPCA(dim=4, device="cpu")),
            ("probe", KMeansProbe(k=3, random_state=0, device="cpu")),
        ]
    )
    pipe.fit(images)
    pred = pipe.predict(images, size=labels.shape[-2:])
    assert isinstance(pred, np.ndarray) and pred.shape == labels.shape
    score = pipe.score(images, labels)
    assert 0.0 <= score <= 1.0


@pytest.mark.gpu
def test_bfloat16_on_cuda_close_to_float32(vit, images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).cuda()
    bf16 = DinoFeaturizer(vit, resolution=RES, device="cuda").transform(x)
    fp32 = DinoFeaturizer(
        vit, resolution=RES, device="cuda", precision="float32"
    ).transform(x)
    assert bf16.is_cuda and bf16.dtype == torch.float32
    # cuDNN runs the float32 patch-embedding convolution in TF32 by default
    np.testing.assert_allclose(fp32.cpu().numpy(), _reference(vit, images), atol=3e-2)
    as_numpy = DinoFeaturizer(vit, resolution=RES, device="cuda").transform(images)
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_allclose(as_numpy, bf16.cpu().numpy(), atol=1e-5)
    err = (bf16 - fp32).abs().max() / fp32.abs().max()
    assert float(err) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("as_list", [False, True], ids=["array", "list"])
def test_cuda_numpy_output_equals_torch_output_and_cpu(vit, as_list):
    # NumPy output is copied to the host synchronously, batch by batch, into
    # one preallocated array (issue 21): its values are those of the torch
    # output, for more batches than the old per-batch pinned buffers
    imgs = np.random.RandomState(1).randint(0, 256, (40, RES, RES, 3), dtype=np.uint8)
    kwargs = dict(resolution=RES, device="cuda", precision="float32", batch_size=4)
    X = list(imgs) if as_list else imgs
    out = DinoFeaturizer(vit, **kwargs).transform(X)
    assert isinstance(out, np.ndarray) and out.shape[0] == 40
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).cuda()
    on_device = DinoFeaturizer(vit, **kwargs).transform(x)
    assert on_device.is_cuda
    np.testing.assert_allclose(out, on_device.cpu().numpy(), atol=1e-5)
    # cuDNN runs the float32 patch embedding in TF32 by default
    np.testing.assert_allclose(out, _reference(vit, imgs), atol=3e-2)
    # CUDA tensors featurized on the CPU: a synchronous device-to-host copy
    on_cpu = _feat(vit).transform(x)
    np.testing.assert_allclose(on_cpu.numpy(), _reference(vit, imgs), atol=ATOL)


@pytest.mark.gpu
def test_featurizer_with_a_cuda_module_pickles_on_the_cpu(vit, images):
    gpu_vit = _tiny().cuda()
    loaded = pickle.loads(pickle.dumps(_feat(gpu_vit, device="cuda")))
    assert next(gpu_vit.parameters()).is_cuda
    assert next(loaded.model.parameters()).device.type == "cpu"
    out = loaded.set_params(precision="float32").transform(images)
    np.testing.assert_allclose(out, _reference(vit, images), atol=3e-2)


def test_max_tokens_refuses_images_with_huge_token_grids():
    import timm

    vit = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )
    strip = np.zeros((1, 3, 400, 3), np.uint8)  # a thin strip, crop="none"
    feat = DinoFeaturizer(vit, resolution=16, crop="none", device="cpu")
    # 16 px short side -> 16 x 2133 px -> a 2 x 267 grid of 534 tokens
    with pytest.raises(ValueError, match=r"2 x 267 token grid .* max_tokens=100"):
        feat.set_params(max_tokens=100).transform(strip)
    assert feat.set_params(max_tokens=None).transform(strip).shape == (1, 16, 2, 267)
    # the same limit for lists of images, and for a centre crop
    with pytest.raises(ValueError, match="max_tokens=3"):
        DinoFeaturizer(vit, resolution=16, max_tokens=3, device="cpu").transform(
            [np.zeros((20, 20, 3), np.uint8)]
        )
    with pytest.raises(ValueError, match="max_tokens"):
        DinoFeaturizer(vit, max_tokens=0, device="cpu").fit(None)


def test_precision_auto_asks_fast_bf16(monkeypatch):
    import timm

    from skstego.features import _dino

    vit = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )
    seen = []
    answers = [True, False]

    def fake(device):
        seen.append(device)
        return answers[len(seen) - 1]

    monkeypatch.setattr(_dino, "fast_bf16", fake)
    for expected in (torch.bfloat16, None):
        est = DinoFeaturizer(vit, resolution=32, device="cpu")
        runner = _dino._Runner(est, vit, torch.device("cpu"))
        assert runner.autocast_dtype is expected
    assert seen == [torch.device("cpu")] * 2
    forced = DinoFeaturizer(vit, resolution=32, precision="float32", device="cpu")
    assert _dino._Runner(forced, vit, torch.device("cpu")).autocast_dtype is None
