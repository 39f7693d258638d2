"""load_stego_checkpoint against checkpoints in the reference's real format.

The fixture rebuilds what ``LitUnsupervisedSegmenter`` (src/train_segmentation.py
of mhamilton723/STEGO) saves: its module tree (``net.model`` the DINO ViT,
``net.cluster1 = Sequential(Conv2d)``, ``net.cluster2 = Sequential(Conv2d,
ReLU, Conv2d)``, ``cluster_probe.clusters``, ``linear_probe``,
``train_cluster_probe``, ``decoder``, metric buffers) inside a Lightning
checkpoint dict whose ``hyper_parameters`` pickle a real OmegaConf
``DictConfig``. The expected outputs are an independent forward written here.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm")
omegaconf = pytest.importorskip("omegaconf")

from skstego.io import load_stego_checkpoint, read_stego_checkpoint  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class _ReferenceNet(torch.nn.Module):
    """The reference's DinoFeaturizer module tree (src/modules.py)."""

    def __init__(self, model, n_feats, dim, nonlinear):
        super().__init__()
        self.model = model
        self.dropout = torch.nn.Dropout2d(p=0.1)
        self.cluster1 = torch.nn.Sequential(torch.nn.Conv2d(n_feats, dim, (1, 1)))
        if nonlinear:
            self.cluster2 = torch.nn.Sequential(
                torch.nn.Conv2d(n_feats, n_feats, (1, 1)),
                torch.nn.ReLU(),
                torch.nn.Conv2d(n_feats, dim, (1, 1)),
            )


class _ClusterLookup(torch.nn.Module):
    def __init__(self, dim, n):
        super().__init__()
        self.clusters = torch.nn.Parameter(torch.randn(n, dim))


class _Metrics(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("stats", torch.zeros(n, n, dtype=torch.int64))


class _ReferenceSegmenter(torch.nn.Module):
    """LitUnsupervisedSegmenter's submodules, by their attribute names."""

    def __init__(self, model, n_feats, dim, n_classes, extra, nonlinear):
        super().__init__()
        self.net = _ReferenceNet(model, n_feats, dim, nonlinear)
        self.train_cluster_probe = _ClusterLookup(dim, n_classes)
        self.cluster_probe = _ClusterLookup(dim, n_classes + extra)
        self.linear_probe = torch.nn.Conv2d(dim, n_classes, (1, 1))
        self.decoder = torch.nn.Conv2d(dim, n_feats, (1, 1))
        self.cluster_metrics = _Metrics(n_classes + extra)
        self.linear_metrics = _Metrics(n_classes)


class _Hostile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _make_checkpoint(tmp_path, *, nonlinear=True, extra=1, dim=6, n_classes=3):
    torch.manual_seed(0)
    # the reference's DINO ViT takes any image size (it resamples its position
    # embeddings): timm's dynamic_img_size; same state dict keys
    vit = timm.create_model(
        "vit_small_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True
    )
    seg = _ReferenceSegmenter(vit, 384, dim, n_classes, extra, nonlinear)
    cfg = omegaconf.OmegaConf.create(
        {
            "output_root": "../",
            "experiment_name": "test",
            "arch": "dino",
            "model_type": "vit_small",
            "dino_patch_size": 8,
            "dino_feat_type": "feat",
            "projection_type": "nonlinear" if nonlinear else "linear",
            "dropout": True,
            "dim": dim,
            "continuous": True,
            "extra_clusters": extra,
            "dataset_name": "potsdam",
            "res": 224,
            "pointwise": True,
            "pos_intra_shift": 0.08,
            "pos_inter_shift": 0.02,
            "neg_inter_shift": 0.76,
            "pos_intra_weight": 0.67,
            "pos_inter_weight": 0.25,
            "neg_inter_weight": 0.63,
            "zero_clamp": True,
            "stabilize": False,
            "feature_samples": 11,
            "neg_samples": 5,
            "lr": 5e-4,
            "batch_size": 16,
            "max_steps": 5000,
        }
    )
    marker = tmp_path / "pwned"
    checkpoint = {
        "epoch": 0,
        "global_step": 5000,
        "pytorch-lightning_version": "1.5.10",
        "state_dict": seg.state_dict(),
        "hyper_parameters": {"n_classes": n_classes, "cfg": cfg},
        "hparams_name": "kwargs",
        "callbacks": {"evil": _Hostile(marker)},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-4}]}],
        "lr_schedulers": [],
    }
    path = tmp_path / "potsdam_test.ckpt"
    torch.save(checkpoint, path)
    return path, seg.eval(), marker


def _reference_codes(seg, images_uint8):
    """The reference's forward at eval time on already-cropped images."""
    x = torch.from_numpy(np.array(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        tokens = seg.net.model.forward_features(x)[:, 1:]
        b, n, c = tokens.shape
        side = round(n**0.5)
        feats = tokens.reshape(b, side, side, c).permute(0, 3, 1, 2)
        code = seg.net.cluster1(feats)
        if hasattr(seg.net, "cluster2"):
            code = code + seg.net.cluster2(feats)
    return code


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("nonlinear", [True, False])
def test_pipeline_equals_the_reference_forward(tmp_path, images, nonlinear):
    path, seg, marker = _make_checkpoint(tmp_path, nonlinear=nonlinear)
    pipe = load_stego_checkpoint(path, resolution=32, device="cpu")
    assert not marker.exists()
    assert [name for name, _ in pipe.steps] == ["featurize", "reduce", "probe"]
    expected = _reference_codes(seg, images)
    codes = pipe[:-1].transform(images)
    np.testing.assert_allclose(codes, expected.numpy(), atol=1e-5, rtol=1e-4)
    # ClusterLookup: cosine of unit codes and unit centroids, argmax
    inner = torch.einsum(
        "bchw,nc->bnhw",
        F.normalize(expected, dim=1),
        F.normalize(seg.cluster_probe.clusters.detach(), dim=1),
    )
    np.testing.assert_array_equal(pipe.predict(images), inner.argmax(1).numpy())
    assert pipe.stego_config_["dim"] == 6 and pipe.stego_config_["n_classes"] == 3
    assert pipe.stego_dataset_ == "potsdam3"
    head = pipe.named_steps["reduce"]
    assert head.dim == 6 and head.neg_shift == 0.76 and head.pointwise is True
    assert head.projection_type == ("nonlinear" if nonlinear else "linear")


def test_linear_probe_equals_the_reference_conv(tmp_path, images):
    path, seg, _ = _make_checkpoint(tmp_path)
    pipe = load_stego_checkpoint(path, probe="linear", resolution=32, device="cpu")
    expected = _reference_codes(seg, images)
    with torch.no_grad():
        logits = seg.linear_probe(expected)
    np.testing.assert_array_equal(pipe.predict(images), logits.argmax(1).numpy())


def test_checkpoint_loads_where_omegaconf_is_absent(tmp_path):
    path, _, marker = _make_checkpoint(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        class _Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("omegaconf", "pytorch_lightning"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, _Refuse())
        from skstego.io import read_stego_checkpoint
        parts = read_stego_checkpoint({str(path)!r})
        assert "omegaconf" not in sys.modules
        print(parts["n_classes"], parts["cfg"]["model_type"], parts["cfg"]["dim"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.stdout.split() == ["3", "vit_small", "6"]
    assert not marker.exists()


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="No STEGO checkpoint"):
        load_stego_checkpoint(tmp_path / "missing.ckpt")
    bare = tmp_path / "bare.pt"
    torch.save({"cluster1.0.weight": torch.zeros(2, 3, 1, 1)}, bare)
    with pytest.raises(ValueError, match="not a PyTorch Lightning checkpoint"):
        load_stego_checkpoint(bare)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.ckpt"):
        load_stego_checkpoint(garbage)
    path, _, _ = _make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="probe"):
        load_stego_checkpoint(path, probe="crf")
    parts = read_stego_checkpoint(path)
    state = dict(parts["state_dict"])
    wrong = tmp_path / "wrong_arch.ckpt"
    cfg = omegaconf.OmegaConf.create({**parts["cfg"], "model_type": "vit_huge"})
    torch.save(
        {"state_dict": state, "hyper_parameters": {"n_classes": 3, "cfg": cfg}}, wrong
    )
    with pytest.raises(ValueError, match="vit_huge"):
        load_stego_checkpoint(wrong)


# --------------------------------------------------------------------------
# skstego evaluate --protocol stego --checkpoint, end to end
# --------------------------------------------------------------------------
#: A few COCO-Stuff fine ids and their coarse classes (STEGO's src/data.py).
_FINE_TO_COARSE = {0: 9, 1: 11, 105: 23, 156: 23, 124: 21, 255: -1}


def _coco_tree(root, n_images=3, size=(40, 56)):
    from PIL import Image

    rng = np.random.default_rng(1)
    ids = [f"{i:012d}" for i in (139, 285, 632, 724)][:n_images]
    fine = np.array(list(_FINE_TO_COARSE))
    for split in ("val2017",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        (root / "curated" / split).mkdir(parents=True)
        for image_id in ids:
            rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / "images" / split / f"{image_id}.jpg")
            label = fine[rng.integers(0, len(fine), size)].astype(np.uint8)
            Image.fromarray(label).save(
                root / "annotations" / split / f"{image_id}.png"
            )
        # the evaluation list is the _7 one; the full list holds one more image
        (root / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt").write_text(
            "\n".join(ids[:2]) + "\n"
        )
        (root / "curated" / split / "Coco164kFull_Stuff_Coarse.txt").write_text(
            "\n".join(ids) + "\n"
        )
    return ids[:2]


def _reference_protocol(seg, root, ids, res):
    """src/eval_segmentation.py on the same files, written out here."""
    import torchvision.transforms as T
    from PIL import Image
    from test_probe_reference import RefUnsupervisedMetrics
    from torchvision.transforms import InterpolationMode

    geometry = T.Compose([T.Resize(res, InterpolationMode.NEAREST), T.CenterCrop(res)])
    n_classes = seg.linear_probe.out_channels
    extra = seg.cluster_probe.clusters.shape[0] - n_classes
    metric = RefUnsupervisedMetrics(n_classes, extra, True)
    for image_id in ids:
        img = Image.open(root / "images" / "val2017" / f"{image_id}.jpg").convert("RGB")
        img = np.asarray(geometry(img))[None]
        fine = np.asarray(
            geometry(Image.open(root / "annotations" / "val2017" / f"{image_id}.png"))
        )
        label = np.vectorize(_FINE_TO_COARSE.get)(fine)
        code1 = _reference_codes(seg, img)
        code2 = _reference_codes(seg, np.ascontiguousarray(img[:, :, ::-1]))
        code = (code1 + code2.flip(dims=[3])) / 2
        code = F.interpolate(code, label.shape, mode="bilinear", align_corners=False)
        inner = torch.einsum(
            "bchw,nc->bnhw",
            F.normalize(code, dim=1),
            F.normalize(seg.cluster_probe.clusters.detach(), dim=1),
        )
        metric.update(inner.argmax(1).numpy(), label[None])
    return metric.compute()


def test_evaluate_protocol_stego_with_a_checkpoint(tmp_path, capsys):
    import json

    from skstego.cli import main

    root = tmp_path / "cocostuff"
    ids = _coco_tree(root)
    path, seg, marker = _make_checkpoint(tmp_path, n_classes=27, extra=1)
    report = tmp_path / "report.json"
    argv = [
        *("evaluate", "--protocol", "stego", "--checkpoint", str(path)),
        *("--dataset", "cocostuff27", "--root", str(root), "--resolution", "48"),
        *("--device", "cpu", "--quiet", "--json", str(report)),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not marker.exists()
    expected = _reference_protocol(seg, root, ids, 48)
    scores = json.loads(report.read_text())
    assert scores["n_images"] == 2  # the _7 list, not the full one
    assert 100 * scores["miou"] == pytest.approx(expected["mIoU"], abs=1e-6)
    assert 100 * scores["accuracy"] == pytest.approx(expected["Accuracy"], abs=1e-6)
    assert "STEGO published" in out and "56.9" in out and "28.2" in out
    assert main([*argv, "--probe", "linear", "--crf"]) == 0
    assert "76.1" in capsys.readouterr().out
    # a model file and a checkpoint at once, or neither, is a usage error
    assert main(["evaluate", "--dataset", "cocostuff27", "--root", str(root)]) == 2


def test_segment_a_folder_with_a_checkpoint(tmp_path):
    from PIL import Image

    from skstego.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (48, 32)]
    for i, size in enumerate(sizes):
        rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"p{i}.png")
    path, _, marker = _make_checkpoint(tmp_path, n_classes=3, extra=2)
    out = tmp_path / "out"
    argv = ["segment", str(folder), "--out", str(out), "--checkpoint", str(path)]
    assert main([*argv, "--resolution", "32", "--device", "cpu", "--quiet"]) == 0
    assert not marker.exists()
    for i, size in enumerate(sizes):
        label = np.asarray(Image.open(out / "photos" / f"p{i}_label.png"))
        assert label.shape == size
        assert label.max() < 5  # cluster ids of the checkpoint's 3 + 2 clusters
    assert main([*argv, "--model", "vit_small_patch8_224.dino"]) == 2
