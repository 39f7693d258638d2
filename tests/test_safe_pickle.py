"""The restricted unpickler against real pickles: Lightning-layout checkpoints
with OmegaConf settings, DINO training checkpoints, and hostile files."""

import argparse
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch

from skstego._safe_pickle import InertRecord, plain, safe_torch_load

omegaconf = pytest.importorskip("omegaconf")


class _WritesFile:
    """Unpickling this with the standard pickle module creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _OpensFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _lightning_checkpoint(tmp_path, marker):
    cfg = omegaconf.OmegaConf.create(
        {
            "model_type": "vit_small",
            "dino_patch_size": 8,
            "dim": 70,
            "projection_type": "nonlinear",
            "extra_clusters": 0,
            "dataset_name": "potsdam",
            "res": 224,
            "pretrained_weights": None,
            "lists": [1, 2.5, {"x": "y"}],
        }
    )
    state = OrderedDict(
        (k, torch.randn(*v.shape))
        for k, v in torch.nn.Sequential(torch.nn.Conv2d(4, 3, 1)).state_dict().items()
    )
    return {
        "epoch": 3,
        "global_step": 5000,
        "pytorch-lightning_version": "1.5.0",
        "state_dict": state,
        "hyper_parameters": {"n_classes": 3, "cfg": cfg},
        "callbacks": {"hostile": _WritesFile(marker), "opener": _OpensFile(marker)},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-4}]}],
        "numpy": np.arange(4, dtype=np.float32),
        "bytes": b"\x00\xff",
    }, cfg


@pytest.mark.parametrize("zipfile", [True, False])
def test_lightning_checkpoint_loads_without_running_code(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    ckpt, cfg = _lightning_checkpoint(tmp_path, marker)
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipfile)
    # the standard unpickler would run the payload: the test's premise
    with pytest.raises(Exception):  # noqa: B017 - weights_only refuses it
        torch.load(path, weights_only=True)

    loaded = safe_torch_load(path)
    assert not marker.exists()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value)
    assert plain(loaded["hyper_parameters"]) == {
        "n_classes": 3,
        "cfg": omegaconf.OmegaConf.to_container(cfg),
    }
    hostile = loaded["callbacks"]["hostile"]
    assert isinstance(hostile, InertRecord) and hostile.name == "system"
    assert hostile.args == (f"touch {marker}",)
    assert isinstance(loaded["callbacks"]["opener"], InertRecord)
    assert plain(loaded["optimizer_states"]) == ckpt["optimizer_states"]
    np.testing.assert_array_equal(loaded["numpy"], ckpt["numpy"])
    assert loaded["bytes"] == ckpt["bytes"]
    assert not marker.exists()


def test_settings_read_where_omegaconf_cannot_be_imported(tmp_path):
    marker = tmp_path / "pwned"
    ckpt, cfg = _lightning_checkpoint(tmp_path, marker)
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    script = textwrap.dedent(
        f"""
        import sys, json
        class _Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("omegaconf", "pytorch_lightning",
                                          "lightning"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, _Refuse())
        from skstego._safe_pickle import plain, safe_torch_load
        obj = safe_torch_load({str(path)!r})
        assert "omegaconf" not in sys.modules
        print(json.dumps(plain(obj["hyper_parameters"])))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    import json

    assert json.loads(out.stdout) == {
        "n_classes": 3,
        "cfg": omegaconf.OmegaConf.to_container(cfg),
    }
    assert not marker.exists()


def test_dino_training_checkpoint_namespace_is_a_record(tmp_path):
    teacher = {"module.backbone.cls_token": torch.zeros(1, 1, 4)}
    args = argparse.Namespace(arch="vit_small", patch_size=8)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": teacher, "args": args}, path)
    loaded = safe_torch_load(path)
    assert torch.equal(
        loaded["teacher"]["module.backbone.cls_token"], torch.zeros(1, 1, 4)
    )
    assert plain(loaded["args"]) == {"arch": "vit_small", "patch_size": 8}


def test_plain_passes_values_and_refuses_runaway_nesting():
    assert plain({"a": (1, [2.0, None])}) == {"a": (1, [2.0, None])}
    deep: list = []
    node = deep
    for _ in range(300):
        node.append([])
        node = node[0]
    with pytest.raises(ValueError, match="nested"):
        plain(deep)
