"""DinoFeaturizer against the STEGO reference preprocessing and DINO's statistics.

The reference (STEGO ``src/utils.py``, ``get_transform``) resizes PIL images
with torchvision's ``Resize(res, NEAREST)``, center crops ``res x res``, then
applies ``ToTensor`` and ImageNet ``Normalize`` for every DINO backbone. Every
expectation below comes from torchvision / PIL and a hand-written timm forward,
never from skstego itself.
"""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from skstego import DinoFeaturizer
from skstego.features import _dino

# the reference's normalisation (STEGO src/utils.py, ``normalize``)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RES = 32


def reference_transform(res, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The reference's image transform (``get_transform(res, False, "center")``)."""
    return T.Compose(
        [
            T.Resize(res, interpolation=T.InterpolationMode.NEAREST),
            T.CenterCrop(res),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def reference_features(vit, x):
    """Hand-written forward: last block after the final norm, prefix tokens
    dropped, tokens reshaped to (N, C, H / p, W / p)."""
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    n, _, h, w = x.shape
    p = vit.patch_embed.patch_size[0]
    return tokens.reshape(n, h // p, w // p, -1).permute(0, 3, 1, 2).numpy()


class RecordingViT(timm.models.VisionTransformer):
    """A ViT that keeps the (normalised) images it is given."""

    def forward_intermediates(self, x, *args, **kwargs):
        self.inputs.append(x.detach().clone())
        return super().forward_intermediates(x, *args, **kwargs)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    net = RecordingViT(
        img_size=RES, patch_size=8, embed_dim=32, depth=2, num_heads=2
    ).eval()
    net.inputs = []
    return net


def _image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _nearest(vit, **kwargs):
    kwargs.setdefault("resolution", RES)
    return DinoFeaturizer(vit, interpolation="nearest", device="cpu", **kwargs)


def _recorded(vit, featurizer, X):
    vit.inputs.clear()
    out = featurizer.transform(X)
    return torch.cat(vit.inputs), out


# odd sizes, a transposed one, an upscale (20 x 30 -> 32) and a large one
SIZES = [(37, 53), (80, 61), (20, 30), (61, 80), (32, 32), (333, 500)]


# --------------------------------------------------------------------------
# interpolation="nearest" is the reference preprocessing, pixel for pixel
# --------------------------------------------------------------------------
@pytest.mark.parametrize(("h", "w"), SIZES)
@pytest.mark.parametrize("kind", ["array", "pil", "path"])
def test_nearest_equals_reference_transform(vit, h, w, kind, tmp_path):
    image = _image(h, w, seed=h * w)
    expected = reference_transform(RES)(Image.fromarray(image))[None]
    if kind == "array":
        X = [image]
    elif kind == "pil":
        X = [Image.fromarray(image)]
    else:
        X = [tmp_path / "image.png"]
        Image.fromarray(image).save(X[0])
    seen, out = _recorded(vit, _nearest(vit), X)
    np.testing.assert_array_equal(seen.numpy(), expected.numpy())
    np.testing.assert_allclose(
        np.asarray(out), reference_features(vit, expected), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(("h", "w"), SIZES)
@pytest.mark.parametrize("kind", ["numpy", "uint8 tensor", "float tensor"])
def test_nearest_batches_equal_reference_transform(vit, h, w, kind):
    images = np.stack([_image(h, w, seed=s) for s in range(3)])
    expected = torch.stack(
        [reference_transform(RES)(Image.fromarray(im)) for im in images]
    )
    if kind == "numpy":
        X = images
    else:
        X = torch.from_numpy(images).permute(0, 3, 1, 2)
        if kind == "float tensor":
            X = X.float() / 255
    seen, out = _recorded(vit, _nearest(vit), X)
    np.testing.assert_allclose(seen.numpy(), expected.numpy(), atol=1e-6, rtol=0)
    if kind != "float tensor":  # uint8 in: the same bits as ToTensor's
        np.testing.assert_array_equal(seen.numpy(), expected.numpy())
    np.testing.assert_allclose(
        np.asarray(out), reference_features(vit, expected), atol=1e-5, rtol=0
    )


def test_nearest_list_of_mixed_sizes(vit):
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    expected = torch.stack(
        [reference_transform(RES)(Image.fromarray(im)) for im in images]
    )
    out = _nearest(vit, batch_size=4).transform(images)
    np.testing.assert_allclose(out, reference_features(vit, expected), atol=1e-5)


@pytest.mark.parametrize("res", [8, 24, 64, 100, 224])
def test_nearest_pixels_at_many_sizes(res):
    """PIL's nearest resize is not torch's "nearest-exact" at every size (its
    sample positions are accumulated step by step): check many sizes."""
    vit = RecordingViT(img_size=res, patch_size=4, embed_dim=8, depth=1, num_heads=1)
    vit.inputs = []
    featurizer = DinoFeaturizer(
        vit, resolution=res, interpolation="nearest", device="cpu", batch_size=64
    )
    rng = np.random.RandomState(res)
    sizes = [(7, 9), (8, 100), (14, 13), (16, 300), (24, 111), (28, 13), (99, 7)]
    sizes += [tuple(rng.randint(2, 400, 2)) for _ in range(12)]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    seen, _ = _recorded(vit, featurizer, images)
    expected = torch.stack(
        [reference_transform(res)(Image.fromarray(im)) for im in images]
    )
    np.testing.assert_array_equal(seen.numpy(), expected.numpy())


@pytest.mark.parametrize("crop", ["center", "none"])
def test_bilinear_default_differs_from_the_reference(vit, crop):
    image = _image(80, 61)
    expected = reference_transform(RES)(Image.fromarray(image))[None]
    assert DinoFeaturizer(vit).interpolation == "bilinear"
    seen, _ = _recorded(vit, DinoFeaturizer(vit, resolution=RES, device="cpu"), [image])
    assert seen.shape == expected.shape
    assert not torch.allclose(seen, expected, atol=1e-3)
    # crop="none" with nearest: PIL's nearest resize to the patch-rounded size
    vit.inputs.clear()
    _nearest(vit, crop="none").transform([image])
    (seen,) = vit.inputs
    h, w = seen.shape[-2:]
    resized = Image.fromarray(image).resize((w, h), Image.NEAREST)
    tail = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    np.testing.assert_array_equal(seen[0].numpy(), tail(resized).numpy())


def test_target_size_matches_torchvision():
    """Resize sizes (short side -> r, long side truncated) and CenterCrop boxes
    (offsets rounded half to even) of torchvision for many image sizes."""
    rng = np.random.RandomState(0)
    sizes = [(h, w) for h in range(1, 70, 3) for w in range(1, 70, 4)]
    sizes += [tuple(rng.randint(1, 2000, 2)) for _ in range(100)]
    for r in (7, 32, 224, 320):
        for h, w in sizes:
            resized_w, resized_h = T.Resize(r)(Image.new("L", (w, h))).size
            index = torch.arange(resized_h * resized_w).view(1, resized_h, resized_w)
            corner = int(T.CenterCrop(r)(index)[0, 0, 0])
            box = divmod(corner, resized_w)
            assert _dino._target_size(h, w, r, "center", (8, 8)) == (
                (resized_h, resized_w),
                box,
            ), (h, w, r)


# --------------------------------------------------------------------------
# normalisation: ImageNet statistics for DINO weights
# --------------------------------------------------------------------------
UNTAGGED = [
    "vit_small_patch8_224",
    "vit_base_patch8_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
]


@pytest.mark.parametrize("name", UNTAGGED + [n + ".dino" for n in UNTAGGED])
def test_dino_names_use_imagenet_statistics(name):
    featurizer = DinoFeaturizer(name).fit(None)  # builds no model
    assert featurizer.mean_ == IMAGENET_MEAN and featurizer.std_ == IMAGENET_STD
    arch = name.removesuffix(".dino")
    assert featurizer.normalization_ == f"imagenet (DINO weights of {arch}.dino)"


@pytest.mark.parametrize("name", UNTAGGED[1:])
def test_untagged_names_are_the_dino_weights(name):
    # the trap: timm's default tag of these names is augreg, mean = std = 0.5
    assert timm.models.get_pretrained_cfg(name).mean == (0.5, 0.5, 0.5)
    assert _dino.resolve_model_name(name) == name + ".dino"


@pytest.mark.parametrize(
    "name",
    [
        "vit_base_patch16_224.augreg_in21k",
        "vit_small_patch16_224.augreg_in21k_ft_in1k",
        "vit_base_patch16_clip_224.openai",
        "vit_small_patch14_dinov2.lvd142m",
        "vit_large_patch16_224",  # no DINO tag: timm's default stays
    ],
)
def test_other_weights_keep_their_timm_statistics(name):
    featurizer = DinoFeaturizer(name).fit(None)
    cfg = timm.models.get_pretrained_cfg(name)
    assert featurizer.mean_ == tuple(cfg.mean) and featurizer.std_ == tuple(cfg.std)
    assert featurizer.normalization_.startswith("timm data config (")


def _seeded(name, **kwargs):
    torch.manual_seed(5)
    return timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
    ).eval()


def _features(net, images, mean, std):
    x = torch.stack(
        [reference_transform(RES, mean, std)(Image.fromarray(im)) for im in images]
    )
    return reference_features(net, x)


@pytest.fixture(scope="module")
def small16(tmp_path_factory):
    """A random ViT-S/16 saved as a plain timm state dict (.safetensors)."""
    from safetensors.torch import save_file

    net = _seeded("vit_small_patch16_224")
    path = tmp_path_factory.mktemp("w") / "vit_s16.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def test_untagged_name_with_weights_is_normalised_as_dino(small16):
    net, path = small16
    images = [_image(37, 53), _image(50, 41, seed=1)]
    featurizer = DinoFeaturizer(
        "vit_small_patch16_224",
        weights=path,
        resolution=RES,
        interpolation="nearest",
        device="cpu",
    )
    out = featurizer.transform(images)
    expected = _features(net, images, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    # what timm's data config for the untagged name would have given
    half = _features(net, images, (0.5,) * 3, (0.5,) * 3)
    assert np.abs(out - half).max() > 1e-2
    assert featurizer.fit(images).mean_ == IMAGENET_MEAN


def test_user_statistics_override_everything(small16):
    net, path = small16
    images = [_image(40, 40)]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    featurizer = DinoFeaturizer(
        "vit_small_patch16_224.dino",
        weights=path,
        mean=mean,
        std=np.array(std),
        resolution=RES,
        interpolation="nearest",
        device="cpu",
    )
    np.testing.assert_allclose(
        featurizer.transform(images), _features(net, images, mean, std), atol=1e-5
    )
    fitted = featurizer.fit(images)
    assert (fitted.mean_, fitted.std_, fitted.normalization_) == (mean, std, "user")


@pytest.mark.parametrize(
    ("kind", "imagenet"),
    [("timm state dict", False), ("dino teacher", True), ("backbone prefix", True)],
)
def test_dino_checkpoint_layout_implies_imagenet(tmp_path, kind, imagenet):
    import argparse

    # an architecture without DINO weights: its timm data config is 0.5 / 0.5
    name = "vit_tiny_patch16_224"
    assert timm.models.get_pretrained_cfg(name).mean == (0.5, 0.5, 0.5)
    net = _seeded(name)
    state = net.state_dict()
    if kind == "dino teacher":
        state = {
            "teacher": {"backbone." + k: v for k, v in state.items()},
            "student": {"module.backbone." + k: v + 1 for k, v in state.items()},
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
            "epoch": 3,
        }
    elif kind == "backbone prefix":
        state = {"backbone." + k: v for k, v in state.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    featurizer = DinoFeaturizer(
        name, weights=path, resolution=RES, interpolation="nearest", device="cpu"
    )
    fitted = featurizer.fit(None)
    stats = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else ((0.5,) * 3, (0.5,) * 3)
    assert (fitted.mean_, fitted.std_) == stats
    assert fitted.normalization_.startswith("imagenet" if imagenet else "timm")
    images = [_image(45, 33)]
    np.testing.assert_allclose(
        featurizer.transform(images), _features(net, images, *stats), atol=1e-5
    )


def test_modules_use_their_pretrained_config():
    images = [_image(37, 53)]
    dino = _seeded("vit_small_patch16_224.dino", img_size=RES)
    featurizer = DinoFeaturizer(
        dino, resolution=RES, interpolation="nearest", device="cpu"
    ).fit(images)
    assert (featurizer.mean_, featurizer.std_) == (IMAGENET_MEAN, IMAGENET_STD)
    assert featurizer.normalization_.startswith("imagenet (DINO weights")
    augreg = _seeded("vit_tiny_patch16_224.augreg_in21k", img_size=RES)
    featurizer = DinoFeaturizer(
        augreg, resolution=RES, interpolation="nearest", device="cpu"
    )
    half = ((0.5,) * 3, (0.5,) * 3)
    assert (featurizer.fit(images).mean_, featurizer.std_) == half
    np.testing.assert_allclose(
        featurizer.transform(images), _features(augreg, images, *half), atol=1e-5
    )


def test_module_with_weights_is_an_error(vit, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(vit.state_dict(), path)
    featurizer = DinoFeaturizer(vit, weights=path, device="cpu")
    for call in (featurizer.fit, featurizer.transform):
        with pytest.raises(ValueError, match="load_state_dict"):
            call(np.zeros((1, RES, RES, 3), np.uint8))


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((0.5, 0.5), (0.5, 0.5, 0.5), r"mean must be 3 numbers"),
        ((0.5, 0.5, 0.5), [[0.5, 0.5, 0.5]], r"std must be 3 numbers"),
        ((0.5, float("nan"), 0.5), (0.5, 0.5, 0.5), "mean must be finite"),
        ((0.5, 0.5, 0.5), (0.5, float("inf"), 0.5), "std must be finite"),
        ((0.5, 0.5, 0.5), (0.5, 0.0, 0.5), "std must be positive"),
        ((0.5, 0.5, 0.5), (0.5, -0.1, 0.5), "std must be positive"),
        ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4), r"divide 0-255 statistics"),
        ((0.5, 0.5, 0.5), None, "mean is set but std is not"),
        (None, (0.5, 0.5, 0.5), "std is set but mean is not"),
        (("a", "b", "c"), (0.5, 0.5, 0.5), "mean must be 3 numbers"),
        ("abc", (0.5, 0.5, 0.5), "'mean' parameter"),
    ],
)
def test_bad_statistics(vit, mean, std, match):
    featurizer = DinoFeaturizer(vit, mean=mean, std=std, device="cpu")
    with pytest.raises(ValueError, match=match):
        featurizer.fit(None)
    with pytest.raises(ValueError, match=match):
        featurizer.transform(np.zeros((1, RES, RES, 3), np.uint8))


def test_bad_names_and_interpolation(vit):
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        DinoFeaturizer("vit_small_patch8_224.nope").fit(None)
    with pytest.raises(ValueError, match="not a timm model name"):
        DinoFeaturizer("no_such_vit").fit(None)
    with pytest.raises(ValueError, match="interpolation"):
        DinoFeaturizer(vit, interpolation="bicubic").fit(None)
