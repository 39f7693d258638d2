"""StegoProjector.load_head against the STEGO reference's module structure.

The modules below are laid out as the reference code lays out its model
(``DinoFeaturizer.make_clusterer`` / ``make_nonlinear_clusterer`` and
``ClusterLookup`` in ``src/modules.py``, ``LitUnsupervisedSegmenter`` in
``src/train_segmentation.py``), so their real ``state_dict()`` has the keys
of the released checkpoints: ``net.cluster1.0.weight``,
``net.cluster2.2.bias``..., next to the backbone (``net.model.*``) and the
probes (``cluster_probe.clusters``, ``linear_probe.*``,
``train_cluster_probe.clusters``, ``decoder.*``).
"""

import numpy as np
import pytest
import torch
from torch import nn

from skstego.projection._stego import StegoProjector

C, DIM, N_CLASSES = 12, 5, 4


class RefFeaturizer(nn.Module):
    """The head part of the reference's DinoFeaturizer (``self.net``)."""

    def __init__(self, n_feats, dim, projection_type):
        super().__init__()
        # stand-in for the frozen ViT: only its keys (net.model.*) matter here
        self.model = nn.Sequential(nn.Linear(3, n_feats), nn.LayerNorm(n_feats))
        self.dropout = nn.Dropout2d(p=0.1)
        self.proj_type = projection_type
        self.cluster1 = nn.Sequential(nn.Conv2d(n_feats, dim, (1, 1)))
        if projection_type == "nonlinear":
            self.cluster2 = nn.Sequential(
                nn.Conv2d(n_feats, n_feats, (1, 1)),
                nn.ReLU(),
                nn.Conv2d(n_feats, dim, (1, 1)),
            )

    def forward(self, image_feat):
        code = self.cluster1(self.dropout(image_feat))
        if self.proj_type == "nonlinear":
            code = code + self.cluster2(self.dropout(image_feat))
        return code


class RefClusterLookup(nn.Module):
    def __init__(self, dim, n_classes):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_classes, dim))


class RefSegmenter(nn.Module):
    """The attributes of the reference's LitUnsupervisedSegmenter."""

    def __init__(self, projection_type="nonlinear", n_feats=C, dim=DIM):
        super().__init__()
        self.net = RefFeaturizer(n_feats, dim, projection_type)
        self.train_cluster_probe = RefClusterLookup(dim, N_CLASSES)
        self.cluster_probe = RefClusterLookup(dim, N_CLASSES)
        self.linear_probe = nn.Conv2d(dim, N_CLASSES, (1, 1))
        self.decoder = nn.Conv2d(dim, n_feats, (1, 1))


def _reference(projection_type, seed=0):
    torch.manual_seed(seed)
    return RefSegmenter(projection_type).eval()


def _feats(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, 6, 5, generator=g)


def _expected(ref, feats):
    with torch.no_grad():
        return ref.net(feats).numpy()  # eval mode: Dropout2d is the identity


PROJECTIONS = ["nonlinear", "linear"]


@pytest.mark.parametrize("projection_type", PROJECTIONS)
def test_reference_state_dict_has_the_checkpoint_keys(projection_type):
    keys = set(_reference(projection_type).state_dict())
    assert {"net.cluster1.0.weight", "net.cluster1.0.bias"} <= keys
    cluster2 = {f"net.cluster2.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert (cluster2 <= keys) == (projection_type == "nonlinear")
    assert {"train_cluster_probe.clusters", "cluster_probe.clusters"} <= keys
    assert {"linear_probe.weight", "decoder.weight", "net.model.0.weight"} <= keys


@pytest.mark.parametrize("projection_type", PROJECTIONS)
@pytest.mark.parametrize("layout", ["bare", "lightning"])
def test_load_head_from_torch_save_matches_reference_forward(
    tmp_path, projection_type, layout
):
    ref = _reference(projection_type)
    sd = ref.state_dict()
    obj = sd if layout == "bare" else {"state_dict": sd, "epoch": 0, "global_step": 0}
    path = tmp_path / "stego.ckpt"
    torch.save(obj, path)
    est = StegoProjector.load_head(path, device="cpu")
    assert est.projection_type == projection_type
    assert est.dim == DIM and est.n_features_in_ == C
    assert len(est.head_state_) == (6 if projection_type == "nonlinear" else 2)
    feats = _feats()
    np.testing.assert_allclose(
        est.transform(feats.numpy()), _expected(ref, feats), rtol=1e-5, atol=1e-5
    )
    # torch in, torch out; tokens agree with maps
    out = est.transform(feats)
    assert isinstance(out, torch.Tensor)
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, C).numpy()
    np.testing.assert_allclose(
        est.transform(tokens),
        _expected(ref, feats).transpose(0, 2, 3, 1).reshape(-1, DIM),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("projection_type", PROJECTIONS)
@pytest.mark.parametrize("wrap", [False, True])
def test_load_head_from_mapping_matches_reference_forward(projection_type, wrap):
    # what skstego.io.load_stego_checkpoint hands over: the whole Lightning
    # state_dict, backbone and probes included
    ref = _reference(projection_type, seed=3)
    sd = ref.state_dict()
    source = {"state_dict": sd, "hyper_parameters": {"dim": DIM}} if wrap else sd
    est = StegoProjector.load_head(source, device="cpu", random_state=0)
    assert est.projection_type == projection_type and est.random_state == 0
    feats = _feats(seed=4)
    np.testing.assert_allclose(
        est.transform(feats.numpy()), _expected(ref, feats), rtol=1e-5, atol=1e-5
    )
    # NumPy values work too
    as_numpy = {k: v.numpy() for k, v in sd.items()}
    est2 = StegoProjector.load_head(as_numpy, device="cpu")
    np.testing.assert_array_equal(
        est2.transform(feats.numpy()), est.transform(feats.numpy())
    )


def test_loaded_reference_head_keeps_training():
    ref = _reference("linear")
    est = StegoProjector.load_head(
        ref.state_dict(),
        device="cpu",
        n_steps=2,
        batch_size=3,
        feature_samples=3,
        random_state=0,
    )
    before = est.head_state_["linear.weight"].copy()
    est.partial_fit(_feats(n=4).numpy())
    assert est.n_steps_ == 2
    assert sorted(est.head_state_) == ["linear.bias", "linear.weight"]
    assert not np.array_equal(est.head_state_["linear.weight"], before)


class _OmegaConfStandIn:
    """Any pickled object: full Lightning checkpoints pickle DictConfigs."""

    def __init__(self):
        self.dim = DIM


def test_full_lightning_checkpoint_is_refused_with_a_pointer(tmp_path):
    ref = _reference("nonlinear")
    ckpt = {
        "state_dict": ref.state_dict(),
        "epoch": 3,
        "global_step": 5000,
        "hyper_parameters": {"cfg": _OmegaConfStandIn()},
    }
    path = tmp_path / "cocostuff27_vit_base_5.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="load_stego_checkpoint") as info:
        StegoProjector.load_head(path)
    assert "refused for safety" in str(info.value)
    # its state dict, handed over in memory, loads
    est = StegoProjector.load_head(ckpt, device="cpu")
    feats = _feats()
    np.testing.assert_allclose(
        est.transform(feats.numpy()), _expected(ref, feats), rtol=1e-5, atol=1e-5
    )


def test_reference_names_in_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    ref = _reference("nonlinear")
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / "stego.safetensors"
    save_file(sd, str(path))
    est = StegoProjector.load_head(path, device="cpu")
    assert est.projection_type == "nonlinear"
    with torch.no_grad():
        for module in ref.net.modules():
            for p in module.parameters(recurse=False):
                p.copy_(p.to(torch.bfloat16).float())
    feats = _feats()
    np.testing.assert_allclose(
        est.transform(feats.numpy()), _expected(ref, feats), rtol=1e-5, atol=1e-5
    )


def test_only_probes_is_no_head():
    sd = _reference("nonlinear").state_dict()
    probes = {k: v for k, v in sd.items() if not k.startswith("net.cluster")}
    assert "cluster_probe.clusters" in probes and "linear_probe.weight" in probes
    with pytest.raises(ValueError, match=r"has no head weights.*keys found"):
        StegoProjector.load_head(probes)


def test_two_models_in_one_dict_are_ambiguous():
    a = _reference("nonlinear", seed=0).state_dict()
    b = _reference("nonlinear", seed=1).state_dict()
    both = {
        **{f"a.{k}": v for k, v in a.items()},
        **{f"b.{k}": v for k, v in b.items()},
    }
    with pytest.raises(ValueError, match=r"several heads.*\['a\.net\.', 'b\.net\.'\]"):
        StegoProjector.load_head(both)
    # one of them, by prefix, loads
    one = {k[2:]: v for k, v in both.items() if k.startswith("b.")}
    assert StegoProjector.load_head(one).dim == DIM


def test_incomplete_nonlinear_branch_is_refused():
    # e.g. the reference's FeaturePyramidNet: its cluster2 is a single conv
    sd = dict(_reference("nonlinear").state_dict())
    del sd["net.cluster2.2.weight"], sd["net.cluster2.2.bias"]
    with pytest.raises(ValueError, match=r"incomplete head.*net\.cluster2\.2\.weight"):
        StegoProjector.load_head(sd)


def test_wrong_kernel_or_shapes_are_refused():
    sd = dict(_reference("linear").state_dict())
    sd["net.cluster1.0.weight"] = torch.zeros(DIM, C, 3, 3)
    with pytest.raises(ValueError, match="not that of a 1x1 convolution"):
        StegoProjector.load_head(sd)
    sd = dict(_reference("linear").state_dict())
    sd["net.cluster1.0.bias"] = torch.zeros(DIM + 1)
    with pytest.raises(ValueError, match=r"linear\.bias has shape"):
        StegoProjector.load_head(sd)


def test_contradicting_projection_type_is_refused():
    sd = _reference("linear").state_dict()
    with pytest.raises(ValueError, match="projection_type='linear'"):
        StegoProjector.load_head(sd, projection_type="nonlinear")
