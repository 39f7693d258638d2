"""Released STEGO checkpoints as fitted scikit-learn pipelines.

The STEGO authors released PyTorch Lightning checkpoints of their
``LitUnsupervisedSegmenter`` (``src/train_segmentation.py`` of
mhamilton723/STEGO): ``cocostuff27_vit_base_5.ckpt``,
``cityscapes_vit_base_1.ckpt``, ``potsdam_test.ckpt``. Their ``state_dict``
holds the DINO backbone (``net.model.*``), the segmentation head
(``net.cluster1.0.*``, ``net.cluster2.{0,2}.*``), the cluster probe
(``cluster_probe.clusters``, a cosine lookup of ``n_classes +
extra_clusters`` centroids) and the linear probe (``linear_probe.*``, a 1x1
convolution); ``hyper_parameters`` holds ``n_classes`` and the OmegaConf
settings ``cfg`` of the run. :func:`load_stego_checkpoint` reads such a file
with a restricted unpickler (no code from the file runs, OmegaConf need not be
installed) and returns ``Pipeline([DinoFeaturizer, StegoProjector, probe])``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._safe_pickle import plain, safe_torch_load
from .features import DinoFeaturizer
from .features._dino import load_backbone_state
from .probes import KMeansProbe, LinearProbe
from .projection import StegoProjector

__all__ = ["PUBLISHED_RESULTS", "load_stego_checkpoint", "read_stego_checkpoint"]

#: ImageNet statistics: the reference normalises every DINO input with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: STEGO's published results (Hamilton et al., ICLR 2022, Tables 1-3; with
#: CRF), in percent, by dataset and probe.
PUBLISHED_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "cocostuff27": {
        "cluster": {"accuracy": 56.9, "miou": 28.2},
        "linear": {"accuracy": 76.1, "miou": 41.0},
    },
    "cityscapes27": {"cluster": {"accuracy": 73.2, "miou": 21.0}},
    "potsdam3": {"cluster": {"accuracy": 77.0}},
}

#: The reference's dataset names (``cfg.dataset_name``) -> skstego's.
DATASET_NAMES = {
    "cocostuff27": "cocostuff27",
    "cityscapes": "cityscapes27",
    "potsdam": "potsdam3",
    "potsdamraw": "potsdam3",
}

#: ``cfg`` keys of the reference -> StegoProjector parameters (training
#: settings: used when the loaded head is trained further).
_HEAD_SETTINGS = {
    "pos_intra_weight": "pos_intra_weight",
    "pos_inter_weight": "pos_inter_weight",
    "neg_inter_weight": "neg_weight",
    "pos_intra_shift": "pos_intra_shift",
    "pos_inter_shift": "pos_inter_shift",
    "neg_inter_shift": "neg_shift",
    "pointwise": "pointwise",
    "zero_clamp": "zero_clamp",
    "stabilize": "stabilize",
    "feature_samples": "feature_samples",
    "neg_samples": "neg_samples",
    "lr": "lr",
    "batch_size": "batch_size",
    "max_steps": "n_steps",
}


def _setting(cfg: Mapping, key: str, default: Any = None) -> Any:
    """``cfg[key]``, also where a config nests its run settings in ``train``."""
    if key in cfg:
        return cfg[key]
    nested = cfg.get("train")
    if isinstance(nested, Mapping) and key in nested:
        return nested[key]
    return default


def read_stego_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The parts of a STEGO Lightning checkpoint, read without running code.

    Parameters
    ----------
    path : str or path-like
        A ``.ckpt`` file of the reference's ``LitUnsupervisedSegmenter``.

    Returns
    -------
    dict
        ``state_dict`` (name -> CPU tensor), ``n_classes`` (int), ``cfg``
        (the run's settings as plain dicts and values) and ``refused`` (the
        classes the file named that were replaced by inert records).

    Raises
    ------
    ValueError
        If the file cannot be read or is not such a checkpoint.
    """

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"No STEGO checkpoint at {path!r}.")
    try:
        obj = safe_torch_load(path)
    except Exception as exc:
        raise ValueError(
            f"Could not read {path!r} as a PyTorch checkpoint "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise ValueError(
            f"{path!r} is not a PyTorch Lightning checkpoint (no 'state_dict'); "
            "STEGO's released .ckpt files are. For a bare head state dict use "
            "StegoProjector.load_head."
        )
    state = {
        str(k): v for k, v in obj["state_dict"].items() if isinstance(v, torch.Tensor)
    }
    hyper = plain(obj.get("hyper_parameters", {}))
    if not isinstance(hyper, Mapping):
        hyper = {}
    cfg = hyper.get("cfg", {})
    if not isinstance(cfg, Mapping):
        cfg = {}
    n_classes = hyper.get("n_classes")
    if n_classes is None and "linear_probe.weight" in state:
        n_classes = int(state["linear_probe.weight"].shape[0])
    return {
        "state_dict": state,
        "n_classes": None if n_classes is None else int(n_classes),
        "cfg": dict(cfg),
    }


def _timm_name(cfg: Mapping, path: str) -> str:
    arch = _setting(cfg, "model_type")
    patch = _setting(cfg, "dino_patch_size")
    names = {
        ("vit_small", 8): "vit_small_patch8_224.dino",
        ("vit_small", 16): "vit_small_patch16_224.dino",
        ("vit_base", 8): "vit_base_patch8_224.dino",
        ("vit_base", 16): "vit_base_patch16_224.dino",
    }
    key = (arch, None if patch is None else int(patch))
    if key not in names:
        raise ValueError(
            f"{path!r}: the checkpoint's backbone model_type={arch!r}, "
            f"dino_patch_size={patch!r} is not a DINO ViT the reference builds "
            "(vit_small or vit_base, patch 8 or 16)."
        )
    return names[key]


def _backbone(
    name: str, state: Mapping[str, torch.Tensor], path: str
) -> torch.nn.Module:
    import timm  # imported on use, as in DinoFeaturizer: slow to import

    net = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True
    )
    weights = {
        k.removeprefix("net.model."): v
        for k, v in state.items()
        if k.startswith("net.model.") and not k.startswith("net.model.head")
    }
    if not weights:
        raise ValueError(
            f"{path!r} holds no backbone weights (keys 'net.model.*'); it is "
            "not a checkpoint of the reference's DINO segmenter."
        )
    load_backbone_state(net, weights, f"{path!r} (net.model.*)")
    return net.eval().requires_grad_(False)


def _probe(
    kind: str,
    state: Mapping[str, torch.Tensor],
    n_classes: int,
    device: Any,
    path: str,
) -> Any:

    if kind == "cluster":
        if "cluster_probe.clusters" not in state:
            raise ValueError(
                f"{path!r} has no cluster probe ('cluster_probe.clusters')."
            )
        centroids = state["cluster_probe.clusters"].detach().float().numpy()
        # the reference's ClusterLookup: cosine similarity, softmax at alpha 2
        return KMeansProbe.from_centroids(
            centroids, metric="cosine", n_classes=n_classes, device=device
        )
    if kind == "linear":
        if "linear_probe.weight" not in state:
            raise ValueError(f"{path!r} has no linear probe ('linear_probe.weight').")
        weight = state["linear_probe.weight"].detach().float().numpy()
        bias = state.get("linear_probe.bias")
        bias = (
            np.zeros(weight.shape[0], np.float32)
            if bias is None
            else bias.detach().float().numpy()
        )
        return LinearProbe.from_weights(weight, bias, device=device)
    raise ValueError(f"probe must be 'cluster' or 'linear', got {kind!r}.")


def load_stego_checkpoint(
    path: str | os.PathLike,
    *,
    probe: str = "cluster",
    resolution: int | None = None,
    device: Any = "auto",
    verbose: bool = False,
) -> Any:
    """A released STEGO checkpoint as a fitted scikit-learn pipeline.

    Reads a PyTorch Lightning checkpoint of the reference implementation's
    ``LitUnsupervisedSegmenter`` (``cocostuff27_vit_base_5.ckpt``,
    ``cityscapes_vit_base_1.ckpt``, ``potsdam_test.ckpt``...) and returns
    ``Pipeline([("featurize", DinoFeaturizer), ("reduce", StegoProjector),
    ("probe", KMeansProbe or LinearProbe)])``, ready to ``predict``:

    * the backbone is the checkpoint's own DINO ViT (``net.model.*``; the
      architecture from ``cfg.model_type`` and ``cfg.dino_patch_size``),
      normalised with ImageNet statistics and resized with nearest
      interpolation, as the reference does;
    * the head is ``net.cluster1`` (+ ``net.cluster2`` for
      ``projection_type: nonlinear``), its training settings from ``cfg``;
    * ``probe="cluster"``: a cosine :class:`~skstego.KMeansProbe` whose
      centroids are ``cluster_probe.clusters`` (no refit). Clusters are
      matched to classes by the Hungarian algorithm on the data it is scored
      on, as the reference does; ``probe="linear"``: a
      :class:`~skstego.LinearProbe` holding ``linear_probe.weight/bias``.

    The file is read by a restricted unpickler: tensors and plain values are
    rebuilt, every other class (OmegaConf's, Lightning's, anything hostile)
    becomes an inert record and no code from the file runs.

    Parameters
    ----------
    path : str or path-like
        The ``.ckpt`` file.
    probe : {"cluster", "linear"}, default="cluster"
        Which of the checkpoint's probes ends the pipeline.
    resolution : int, optional
        The featurizer's resolution; default the checkpoint's ``cfg.res``
        (the training resolution, 224). The reference evaluates at 320.
    device : str or torch.device, default="auto"
        Device of every step.
    verbose : bool, default=False
        Print the checkpoint's settings.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Fitted. ``pipeline.stego_config_`` holds the checkpoint's settings
        (``cfg`` as plain values, plus ``n_classes``) and
        ``pipeline.stego_dataset_`` skstego's name of its dataset.

    Raises
    ------
    ValueError
        If the file is not such a checkpoint or its parts do not fit together
        (the message names the file and the part).

    See Also
    --------
    skstego.FlipAveraged : The reference evaluation's flip averaging.
    skstego.StegoProjector.load_head : Load a head alone.

    Examples
    --------
    The command line evaluates a released checkpoint with the reference's
    protocol::

        skstego evaluate --protocol stego --checkpoint cocostuff27_vit_base_5.ckpt \\
            --dataset cocostuff27 --root data/cocostuff
    """
    from sklearn.pipeline import Pipeline

    path = os.fspath(path)
    parts = read_stego_checkpoint(path)
    state, cfg, n_classes = parts["state_dict"], parts["cfg"], parts["n_classes"]
    if n_classes is None:
        raise ValueError(f"{path!r}: the checkpoint names no n_classes.")
    arch = _setting(cfg, "arch", "dino")
    if arch != "dino":
        raise ValueError(
            f"{path!r}: arch={arch!r}; only the reference's DINO segmenter "
            "(arch: dino) is supported."
        )
    feat_type = _setting(cfg, "dino_feat_type", "feat")
    if feat_type != "feat":
        raise ValueError(
            f"{path!r}: dino_feat_type={feat_type!r}; skstego's featurizer "
            "returns the last block's tokens ('feat') only."
        )
    projection = _setting(cfg, "projection_type", "nonlinear")
    if projection not in ("linear", "nonlinear"):
        raise ValueError(
            f"{path!r}: projection_type={projection!r}; STEGO heads are "
            "'linear' or 'nonlinear'."
        )
    name = _timm_name(cfg, path)
    net = _backbone(name, state, path)
    res = int(resolution or _setting(cfg, "res", 224))
    featurizer = DinoFeaturizer(
        net,
        resolution=res,
        interpolation="nearest",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device=device,
    )
    settings = {
        param: _setting(cfg, key)
        for key, param in _HEAD_SETTINGS.items()
        if _setting(cfg, key) is not None
    }
    if "dropout" in cfg or "dropout" in (cfg.get("train") or {}):
        settings["feature_dropout"] = bool(_setting(cfg, "dropout"))
    head = StegoProjector.load_head(
        {k: v for k, v in state.items() if k.startswith("net.cluster")},
        projection_type=projection,
        device=device,
        **settings,
    )
    last = _probe(probe, state, n_classes, device, path)
    pipe = Pipeline([("featurize", featurizer), ("reduce", head), ("probe", last)])
    pipe.stego_config_ = {**cfg, "n_classes": n_classes}
    pipe.stego_dataset_ = DATASET_NAMES.get(_setting(cfg, "dataset_name"))
    if verbose:
        print(f"STEGO checkpoint {path}")
        print(f"  backbone {name} at {res} px, head dim {head.dim} ({projection})")
        print(f"  {probe} probe, {n_classes} classes")
        for key in sorted(cfg):
            if not isinstance(cfg[key], Mapping | list):
                print(f"  {key}: {cfg[key]}")
    return pipe
