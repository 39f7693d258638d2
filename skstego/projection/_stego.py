"""The STEGO segmentation head as a scikit-learn transformer.

``code = linear(drop(f)) + nonlinear(drop(f))`` (Hamilton et al., ICLR 2022;
``DinoFeaturizer`` in the reference code's ``src/modules.py``), trained with
the correspondence-distillation loss of :func:`skstego.losses.stego_loss`
and K-NN positives from :mod:`skstego.projection._knn`
(``src/train_segmentation.py``, ``src/precompute_knns.py``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from .._dask import lazy_output
from .._device import (
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    is_torch,
    make_generator,
    resolve_device,
    same_device,
)
from .._precision import fast_bf16
from ..losses import (
    _bilinear_taps,
    _draw_loss_samples,
    _negative_coords,
    _negative_keys,
    _stacked_loss,
)
from ._knn import image_descriptors, nearest_neighbors

__all__ = ["StegoProjector"]

#: Neighbours kept per image by the K-NN step (top 30 in the reference's
#: ``src/precompute_knns.py``).
_KNN_POOL = 30

#: Steps between progress-bar updates (each update waits for the device).
_REPORT_EVERY = 20

#: Names of the head's parameters, in ``head_state_``; conv weights are
#: stored as 2-D (out, in) matrices (a 1x1 convolution is a matrix product).
#: A ``projection_type="linear"`` head has only the first two.
_LINEAR_NAMES = ("linear.weight", "linear.bias")
_NONLINEAR_NAMES = (
    "nonlinear.0.weight",
    "nonlinear.0.bias",
    "nonlinear.2.weight",
    "nonlinear.2.bias",
)
_PARAM_NAMES = _LINEAR_NAMES + _NONLINEAR_NAMES

#: The layouts :meth:`StegoProjector.load_head` reads: a name, the key suffix
#: of each head weight, and whether the keys may carry a prefix (``net.``...).
#: The reference's ``DinoFeaturizer`` builds ``cluster1`` as
#: ``Sequential(Conv2d)`` and ``cluster2`` as ``Sequential(Conv2d, ReLU,
#: Conv2d)`` (``src/modules.py``); the second layout is a bare ``Conv2d``
#: ``cluster1`` as older exports name it; the last is skstego's own file
#: (exact keys only, so that no ``*.linear.weight`` of another module of a
#: large state dict is taken for the head).
_LAYOUTS: tuple[tuple[str, dict[str, str], bool], ...] = (
    (
        "STEGO reference",
        {
            "linear.weight": "cluster1.0.weight",
            "linear.bias": "cluster1.0.bias",
            "nonlinear.0.weight": "cluster2.0.weight",
            "nonlinear.0.bias": "cluster2.0.bias",
            "nonlinear.2.weight": "cluster2.2.weight",
            "nonlinear.2.bias": "cluster2.2.bias",
        },
        True,
    ),
    (
        "bare cluster1",
        {
            "linear.weight": "cluster1.weight",
            "linear.bias": "cluster1.bias",
            "nonlinear.0.weight": "cluster2.0.weight",
            "nonlinear.0.bias": "cluster2.0.bias",
            "nonlinear.2.weight": "cluster2.2.weight",
            "nonlinear.2.bias": "cluster2.2.bias",
        },
        True,
    ),
    ("skstego", {name: name for name in _PARAM_NAMES}, False),
)

#: Metadata tag of files written by StegoProjector.save_head.
_HEAD_FORMAT = "skstego.StegoProjector.head/1"

#: Settings that reproduce the released checkpoints (the paper's
#: hyper-parameter table; the cocostuff27 and cityscapes values are also
#: commented-out blocks of the reference's ``src/configs/train_config.yml``).
#: Every reference run trains with ``dropout: True``, hence the two dropout
#: flags.
PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff27": {
        "dim": 90,
        "n_steps": 7000,
        "batch_size": 32,
        "pointwise": True,
        "neg_weight": 0.1538,
        "pos_inter_weight": 1.0,
        "pos_intra_weight": 0.1,
        "neg_shift": 1.0,
        "pos_inter_shift": 0.2,
        "pos_intra_shift": 0.12,
        "feature_dropout": True,
        "knn_dropout": True,
    },
    "cityscapes": {
        "dim": 100,
        "n_steps": 7000,
        "batch_size": 32,
        "pointwise": False,
        "neg_weight": 0.9059,
        "pos_inter_weight": 0.5775,
        "pos_intra_weight": 1.0,
        "neg_shift": 0.3136,
        "pos_inter_shift": 0.1754,
        "pos_intra_shift": 0.4583,
        "feature_dropout": True,
        "knn_dropout": True,
    },
    "potsdam": {
        "dim": 70,
        "n_steps": 5000,
        "batch_size": 16,
        "pointwise": True,
        "neg_weight": 0.63,
        "pos_inter_weight": 0.25,
        "pos_intra_weight": 0.67,
        "neg_shift": 0.76,
        "pos_inter_shift": 0.02,
        "pos_intra_shift": 0.08,
        "feature_dropout": True,
        "knn_dropout": True,
    },
}


def _init_params(
    n_features: int,
    dim: int,
    projection_type: str,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """torch's default Conv2d initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    drawn from ``generator`` so that a seed fixes the whole fit."""
    bound = 1.0 / math.sqrt(n_features)
    shapes = {
        "linear.weight": (dim, n_features),
        "linear.bias": (dim,),
        "nonlinear.0.weight": (n_features, n_features),
        "nonlinear.0.bias": (n_features,),
        "nonlinear.2.weight": (dim, n_features),
        "nonlinear.2.bias": (dim,),
    }
    names = _PARAM_NAMES if projection_type == "nonlinear" else _LINEAR_NAMES
    params = {}
    for name in names:
        u = torch.rand(shapes[name], generator=generator, device=device)
        params[name] = ((u * 2 - 1) * bound).requires_grad_(True)
    return params


def _autocast_bf16(device: torch.device) -> bool:
    """Whether training on ``device`` runs the head under bf16 autocast: on
    CUDA devices where bf16 is native (:func:`skstego._precision.fast_bf16`,
    compute capability >= 8.0); float32 elsewhere."""
    return device.type == "cuda" and fast_bf16(device)


def _host_seed(seed: int) -> int:
    """Seed of the host generator that draws batch indices, from the main
    generator's seed (a splitmix64 step, so the two streams differ)."""
    z = (seed + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def _head_type(state: Mapping[str, Any]) -> str:
    """``"nonlinear"`` when the head has its nonlinear branch, else ``"linear"``."""
    return "nonlinear" if "nonlinear.0.weight" in state else "linear"


def _read_taps(
    rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Bilinear reads of pixel rows: ``rows`` (B, P, C), the taps ``index``
    and ``weights`` (B, N, 4) of :func:`skstego.losses._bilinear_taps`.
    Returns (B, N, C): for each point, the weighted sum of its four pixels'
    rows, what :func:`skstego.losses.sample_points` reads from the maps.
    One ``embedding_bag`` over the batch's pixel rows: each tap reads one
    contiguous row (``grid_sample`` on channels-first maps reads one value
    per channel and was measured 2-5x slower here).
    """
    b, pixels, c = rows.shape
    n = index.shape[1]
    offset = torch.arange(b, device=index.device).view(b, 1, 1) * pixels
    out = F.embedding_bag(
        (index + offset).view(b * n, 4),
        rows.reshape(b * pixels, c),
        per_sample_weights=weights.reshape(b * n, 4).to(rows.dtype),
        mode="sum",
    )
    return out.view(b, n, c)


def _hidden_points(
    params: dict[str, torch.Tensor],
    rows: torch.Tensor,
    drop: torch.Tensor | None,
    index: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The nonlinear branch's hidden layer, read at points by bilinear sampling.

    ``rows`` (B, h * w, C) are the head's inputs, pixels as rows, ``drop`` their channel
    masks (B, C) or None, ``index`` and ``weights`` (B, N, 4) the taps of
    :func:`skstego.losses._bilinear_taps`. Returns ``sample(relu(conv(drop
    * maps)))`` at the N points, (B, N, C). The ReLU does not commute with
    the sampling, so the layer is evaluated at pixels: over the whole map
    when the points touch most of it, else only at the ``4 N`` taps (the
    K-NN partners are read at ``S * S`` points, a fraction of the map).
    The mask scales the weight's columns per image, which equals scaling
    the input's channels, without a masked copy of the maps.
    """
    b, pixels, c = rows.shape
    n = index.shape[1]
    weight = params["nonlinear.0.weight"]
    weight = weight.expand(b, -1, -1) if drop is None else weight * drop.view(b, 1, c)
    bias = params["nonlinear.0.bias"]
    if 4 * n < pixels:
        offset = torch.arange(b, device=index.device).view(b, 1) * pixels
        taps = F.embedding(index.view(b, 4 * n) + offset, rows.reshape(-1, c))
        hidden = torch.baddbmm(bias, taps, weight.transpose(1, 2))
        hidden = hidden.relu_().view(b, n, 4, c)
        return (hidden * weights.view(b, n, 4, 1).to(hidden.dtype)).sum(2)
    hidden = torch.baddbmm(bias, rows, weight.transpose(1, 2)).relu_()
    return _read_taps(hidden, index, weights)


def _head_points(
    params: dict[str, torch.Tensor],
    rows: torch.Tensor,
    drop1: torch.Tensor | None,
    drop2: torch.Tensor | None,
    taps: list[tuple[torch.Tensor, torch.Tensor]],
    feats: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Codes of the head in training mode, read at the loss's points.

    ``rows`` (2B, h * w, C) holds the pixels of B images then of their B
    partners, as rows; ``drop1`` and
    ``drop2`` (2B, C) are the channel-dropout masks of the linear and the
    nonlinear branch (scaled by ``1 / (1 - p)``; None: no dropout). For
    each half, ``taps`` are its points' bilinear taps (B, N, 4) and
    ``feats`` (B, N, C) its features read at the same points. Returns the
    codes (B, N, dim) of each half: ``sample(linear(drop1 * x) +
    nonlinear(drop2 * x))``, the reference's head followed by
    :func:`skstego.losses.sample_points`, computed as
    ``linear(drop1 * sample(x)) + W2 sample(relu(...)) + b2``: bilinear
    sampling commutes with the 1x1 convolutions (its weights sum to one),
    so only the ReLU layer needs pixels.
    """
    two_b, _, c = rows.shape
    b = two_b // 2
    linear = params["linear.weight"]
    if drop1 is None:
        linear = linear.expand(two_b, -1, -1)
    else:
        linear = linear * drop1.view(two_b, 1, c)
    bias = params["linear.bias"]
    nonlinear = "nonlinear.0.weight" in params
    if nonlinear:
        bias = bias + params["nonlinear.2.bias"]
    codes = []
    for half, ((index, weights), points) in enumerate(zip(taps, feats, strict=True)):
        half_rows = slice(half * b, (half + 1) * b)
        out = torch.baddbmm(bias, points, linear[half_rows].transpose(1, 2))
        if nonlinear:
            drop = None if drop2 is None else drop2[half_rows]
            hidden = _hidden_points(params, rows[half_rows], drop, index, weights)
            out = out + hidden @ params["nonlinear.2.weight"].T
        codes.append(out)
    return codes


def _train_loss(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    drop1: torch.Tensor | None,
    drop2: torch.Tensor | None,
    drop_target: torch.Tensor | None,
    *,
    weights: tuple[float, float, float],
    shifts: tuple[float, float, float],
    neg_samples: int,
    feature_samples: int,
    flags: dict[str, bool],
    generator: torch.Generator,
    bf16: bool = False,
) -> torch.Tensor:
    """The STEGO loss of one training batch, for the head ``params``.

    Equals :func:`skstego.losses.stego_loss` on ``target = x * drop_target``
    (the correlation target; ``x`` when None) and ``codes =
    linear(drop1 * x) + nonlinear(drop2 * x)``, split into the B images
    (first half of ``x``) and their partners (second half), with the same
    draws from ``generator`` in the same order. It computes the same
    formula with less work: the features and the head are read at the
    sampled points (:func:`_head_points`) instead of running the head on
    whole maps and sampling the codes; each map is read once per set of
    points; the correlations of all terms are one batched product per
    side. ``weights`` and ``shifts`` are (intra, inter, negative).
    ``bf16`` runs the head's products under bf16 autocast; the loss is
    computed in float32.
    """
    two_b, c, height, width = x.shape
    b = two_b // 2
    coords1, coords2, perms = _draw_loss_samples(
        b, feature_samples, neg_samples, generator=generator, device=x.device
    )
    grid = coords1
    if perms:
        grid = torch.cat([coords1, _negative_coords(coords2, perms)], dim=1)
    n_points = feature_samples * feature_samples
    with torch.no_grad():
        # pixels as rows (one copy): every tap then reads a contiguous row
        rows = x.reshape(two_b, c, -1).transpose(1, 2).contiguous()
        taps = [_bilinear_taps(co.to(x.dtype), height, width) for co in (grid, coords2)]
        feats = [_read_taps(rows[:b], *taps[0]), _read_taps(rows[b:], *taps[1])]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        codes = _head_points(params, rows, drop1, drop2, taps, feats)
    codes = [code.to(x.dtype) for code in codes]  # float32 after bf16 autocast

    with torch.no_grad():
        if drop_target is not None:  # dropping channels commutes with sampling
            drop = drop_target.view(two_b, 1, c)
            feats = [feats[0] * drop[:b], feats[1] * drop[b:]]
        f_img, f_knn = (F.normalize(f, dim=2) for f in feats)
        f_query = f_img[:, :n_points]
        f_keys = torch.cat(
            [f_query, f_knn, *_negative_keys(f_img[:, n_points:], perms, dim=1)],
            dim=1,
        )
        feat_corr = torch.bmm(f_query, f_keys.transpose(1, 2))
    c_img, c_knn = (F.normalize(code, dim=2) for code in codes)
    c_query = c_img[:, :n_points]
    c_keys = torch.cat(
        [c_query, c_knn, *_negative_keys(c_img[:, n_points:], perms, dim=1)], dim=1
    )
    code_corr = torch.bmm(c_query, c_keys.transpose(1, 2))
    n_neg = len(perms)
    terms = _stacked_loss(
        feat_corr.view(b, n_points, -1, n_points),
        code_corr.view(b, n_points, -1, n_points),
        shifts,
        **flags,
    )
    total = weights[0] * terms[0] + weights[1] * terms[1]
    if n_neg:
        total = total + weights[2] * terms[2:].mean()
    return total


def _head_tokens(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The head (eval mode) on tokens (n, C) -> (n, dim)."""
    lin = torch.addmm(params["linear.bias"], x, params["linear.weight"].T)
    if "nonlinear.0.weight" not in params:
        return lin
    hid = F.relu(
        torch.addmm(params["nonlinear.0.bias"], x, params["nonlinear.0.weight"].T)
    )
    return lin + torch.addmm(
        params["nonlinear.2.bias"], hid, params["nonlinear.2.weight"].T
    )


def _dump_adam(
    optimizer: torch.optim.Adam, params: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Adam's per-parameter state as NumPy arrays (empty before any step)."""
    out: dict[str, np.ndarray] = {}
    step = 0
    for name, p in params.items():
        st = optimizer.state.get(p)
        if not st:
            continue
        step = int(st["step"])
        out[f"exp_avg.{name}"] = st["exp_avg"].detach().cpu().numpy().copy()
        out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().cpu().numpy().copy()
    out["step"] = np.asarray(step, dtype=np.int64)
    return out


def _load_adam(
    optimizer: torch.optim.Adam,
    params: dict[str, torch.Tensor],
    state: dict[str, np.ndarray],
    device: torch.device,
) -> None:
    """Restore what :func:`_dump_adam` saved."""
    step = int(state["step"])
    if step == 0:
        return
    for name, p in params.items():
        optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.as_tensor(state[f"exp_avg.{name}"]).to(device),
            "exp_avg_sq": torch.as_tensor(state[f"exp_avg_sq.{name}"]).to(device),
        }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_head_source(
    source: Any,
) -> tuple[Iterable[str], Callable[[str], Any], dict[str, Any], str]:
    """Keys, a getter and stored parameters of a head file or state dict.

    Only the head's tensors are ever read from a safetensors file or turned
    into NumPy, so a whole Lightning state dict (backbone included) costs
    nothing beyond what torch.load already read.
    """
    if isinstance(source, Mapping):
        inner = source.get("state_dict")
        mapping = inner if isinstance(inner, Mapping) else source
        return list(mapping.keys()), mapping.__getitem__, {}, "the given state dict"
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            "load_head takes a path to a weights file or a mapping of tensors "
            f"(a state dict), got {type(source).__name__}."
        )
    path = os.fspath(source)
    where = repr(path)
    if not os.path.isfile(path):
        raise ValueError(f"No head weights file at {where}.")
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            handle = safe_open(path, framework="pt")
            meta = handle.metadata() or {}
            keys = list(handle.keys())
        except Exception as exc:  # safetensors raises several types
            raise ValueError(
                f"Could not read head weights from {where} "
                f"({type(exc).__name__}: {_first_line(exc)}): not a safetensors "
                "file."
            ) from exc
        stored: dict[str, Any] = {}
        if meta.get("format") == _HEAD_FORMAT:
            stored = json.loads(meta.get("params", "{}"))
        return keys, handle.get_tensor, stored, where
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickler and zip errors of many kinds
        raise ValueError(
            f"Could not read head weights from {where} ({type(exc).__name__}: "
            f"{_first_line(exc)}). Expected a safetensors file or a "
            "torch.save'd state dict of tensors, which torch.load reads with "
            "weights_only=True. Files that pickle other Python objects are "
            "refused for safety: a full PyTorch Lightning checkpoint of the "
            "STEGO reference (its hyper-parameters are OmegaConf objects) is "
            "read by skstego.io.load_stego_checkpoint, which unpickles only an "
            "allow-list of types."
        ) from exc
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"Could not read head weights from {where}: it holds a "
            f"{type(obj).__name__}, not a state dict."
        )
    inner = obj.get("state_dict")
    mapping = inner if isinstance(inner, Mapping) else obj
    return list(mapping.keys()), mapping.__getitem__, {}, where


def _as_matrix(value: Any, name: str, where: str) -> np.ndarray:
    """A head weight as float32 NumPy; 1x1 conv kernels become 2-D matrices."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    try:
        value = np.array(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {name} is not an array of numbers.") from exc
    if value.ndim == 4:
        if value.shape[2:] != (1, 1):
            raise ValueError(
                f"{where}: {name} has shape {value.shape}, not that of a 1x1 "
                "convolution."
            )
        value = value.reshape(value.shape[:2])
    return value


def _find_head(
    keys: Iterable[str], get: Callable[[str], Any], where: str
) -> tuple[dict[str, np.ndarray], str]:
    """Head weights (skstego names, 2-D) and projection type in a state dict.

    The keys are matched on whole path components (``cluster1.0.weight``
    matches ``net.cluster1.0.weight``, never ``train_cluster_probe.*`` or
    ``linear_probe.*``) and every weight must sit under one common prefix.
    """
    keys = [k for k in keys if isinstance(k, str)]
    present = set(keys)
    for layout, names, prefixed in _LAYOUTS:
        anchor = names["linear.weight"]
        if prefixed:
            prefixes = sorted(
                {
                    k[: len(k) - len(anchor)]
                    for k in keys
                    if k == anchor or k.endswith("." + anchor)
                }
            )
        else:
            prefixes = [""] if anchor in present else []
        if not prefixes:
            continue
        if len(prefixes) > 1:
            raise ValueError(
                f"{where} holds several heads ({layout} layout, key "
                f"{anchor!r}) under the prefixes {prefixes}; pass the state "
                "dict of one model."
            )
        prefix = prefixes[0]
        found = [n for n in _PARAM_NAMES if prefix + names[n] in present]
        missing_linear = [prefix + names[n] for n in _LINEAR_NAMES if n not in found]
        nonlinear = [n for n in _NONLINEAR_NAMES if n in found]
        missing_nonlinear = [
            prefix + names[n] for n in _NONLINEAR_NAMES if n not in found
        ]
        missing = missing_linear + (missing_nonlinear if nonlinear else [])
        if missing:
            raise ValueError(
                f"{where} has an incomplete head ({layout} layout under the "
                f"prefix {prefix!r}): missing {missing}."
            )
        state = {
            n: _as_matrix(get(prefix + names[n]), prefix + names[n], where)
            for n in found
        }
        projection_type = _head_type(state)
        _check_head_shapes(state, where)
        return state, projection_type
    shown = sorted(keys)[:12]
    raise ValueError(
        f"{where} has no head weights: expected keys ending in "
        "'cluster1.0.weight', 'cluster1.0.bias' (and, for a nonlinear head, "
        "'cluster2.0.*' and 'cluster2.2.*') as in the STEGO reference, or "
        f"skstego's {list(_PARAM_NAMES)}; keys found: {shown}"
        f"{' ...' if len(keys) > len(shown) else ''}."
    )


def _check_head_shapes(state: dict[str, np.ndarray], where: str) -> None:
    weight = state["linear.weight"]
    if weight.ndim != 2:
        raise ValueError(
            f"{where}: linear.weight has shape {weight.shape}, expected "
            "(dim, channels) or (dim, channels, 1, 1)."
        )
    dim, c = weight.shape
    expected = {
        "linear.bias": (dim,),
        "nonlinear.0.weight": (c, c),
        "nonlinear.0.bias": (c,),
        "nonlinear.2.weight": (dim, c),
        "nonlinear.2.bias": (dim,),
    }
    for name, value in state.items():
        if name in expected and value.shape != expected[name]:
            raise ValueError(
                f"{where}: {name} has shape {value.shape}, expected "
                f"{expected[name]} for a head with dim={dim} on {c} channels."
            )


class StegoProjector(
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """STEGO's segmentation head, trained by correspondence distillation.

    The head maps feature maps ``f`` of shape (N, C, h, w) to codes of shape
    (N, dim, h, w)::

        code = linear(drop(f)) + nonlinear(drop(f))

    where ``linear`` is a 1x1 convolution C -> dim, ``nonlinear`` is a 1x1
    convolution C -> C, ReLU, 1x1 convolution C -> dim, and ``drop`` is channel
    dropout (Dropout2d), drawn separately for each branch and used only in
    training (the reference's ``cluster1`` and ``cluster2``;
    ``projection_type="linear"`` keeps ``linear`` only). ``fit`` trains the
    head with Adam on :func:`skstego.losses.stego_loss`: each step draws
    ``batch_size`` distinct images, pairs each with one of its
    ``n_neighbors`` nearest images (cosine similarity of spatially pooled
    features, top 30 kept) and with other images of the batch (negatives).
    2-D tokens (n, C) are treated as 1x1 maps: neighbours are then searched
    over tokens, and the output is (n, dim).

    The defaults are the active values of the reference's
    ``src/configs/train_config.yml`` (ViT-S/8); :meth:`from_preset` gives
    the settings of the released checkpoints.

    Parameters
    ----------
    dim : int, default=70
        Dimension of the codes.
    projection_type : {"nonlinear", "linear"}, default="nonlinear"
        ``"nonlinear"``: ``code = linear(drop(f)) + nonlinear(drop(f))``.
        ``"linear"``: ``code = linear(drop(f))``, the reference's
        ``projection_type: linear``.
    n_steps : int, default=5000
        Optimisation steps (mini-batches) per ``fit``.
    batch_size : int, default=16
        Images per step; capped at the number of images. The negative term
        needs at least 2 images per batch and is dropped (weight 0) when the
        effective batch is 1.
    lr : float, default=5e-4
        Adam learning rate.
    dropout : float in [0, 1), default=0.1
        Channel dropout probability used in training: on the head's input,
        drawn separately for each branch, and (see below) on the
        correlation target and the K-NN descriptors.
    feature_dropout : bool, default=True
        Channel-drop (probability ``dropout``) the feature maps that the
        loss correlates (the ``F`` of
        :func:`skstego.losses.correlation_loss`), with a mask drawn
        independently of the branches' masks, for the images and their
        partners alike. The reference does this with ``dropout: True`` (the
        default of its ``train_config.yml``): its featurizer returns
        ``Dropout2d(0.1)(features)`` as the correlation target.
        ``False`` correlates the clean features.
    knn_dropout : bool, default=False
        Channel-drop each image's features (probability ``dropout``, one
        draw per fit) before pooling them into the K-NN descriptors, as the
        reference's ``src/precompute_knns.py`` does (its featurizer's
        dropout is never switched to eval mode there). Off by default: the
        clean neighbours are deterministic (independent of
        ``random_state``) and the dropout is a side effect in the reference
        rather than a design choice of the paper. On
        :func:`skstego.datasets.make_feature_maps` (500 maps) the top-7
        lists with and without dropout share 64 % (64 channels) and 49 %
        (384 channels) of their members; the presets turn it on.
    feature_samples : int, default=11
        Points per side sampled from each map by the loss (S x S points);
        1 for 2-D tokens, whose maps are 1x1.
    neg_samples : int, default=5
        Derangements of the batch averaged in the negative term; 0 drops it.
    n_neighbors : int, default=7
        The positive partner is drawn among this many nearest images
        (capped at the number of other images).
    pos_intra_weight : float, default=0.67
        Weight of the intra term (image with itself).
    pos_inter_weight : float, default=0.25
        Weight of the K-NN term (image with its partner).
    neg_weight : float, default=0.63
        Weight of the negative term (image with other images of the batch);
        the reference's ``neg_inter_weight``.
    pos_intra_shift : float, default=0.18
        Shift of the intra term.
    pos_inter_shift : float, default=0.12
        Shift of the K-NN term.
    neg_shift : float, default=0.46
        Shift of the negative term; the reference's ``neg_inter_shift``.
    pointwise : bool, default=True
        Centre the feature correlation per query point
        (:func:`skstego.losses.correlation_loss`).
    zero_clamp : bool, default=True
        Clamp the code correlation at 0 from below.
    stabilize : bool, default=False
        Clamp the code correlation at 0.8 from above (the reference's
        ``stabalize``).
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the head trains and runs; resolved at each call. On CUDA
        devices with native bf16 (compute capability >= 8.0) the head's
        matrix products run under bf16 autocast in training; the loss, the
        feature correlation it follows and ``loss_curve_`` are float32
        everywhere, and older GPUs train in float32.
    random_state : int, RandomState instance or None, default=None
        Seeds the :class:`torch.Generator` that draws the initial weights,
        batches, partners, dropout masks and loss samples: an int gives the
        same head at every fit on a given device type and input placement.
        Random streams are device-dependent: CPU and CUDA generators give
        different numbers for one seed, and the batches of input that is
        not on the training device (NumPy, on-disk, a host tensor when
        training on CUDA) are drawn by a host generator seeded from it, so a
        CPU fit and a CUDA fit differ (statistically alike).
    verbose : bool, default=False
        Show a progress bar with the running loss.
    warm_start : bool, default=False
        When True and the estimator is fitted, ``fit`` continues training
        from the current head and Adam state (as :meth:`partial_fit` does)
        instead of starting afresh.

    Attributes
    ----------
    head_state_ : dict of str to ndarray (float32)
        Trained weights: ``"linear.weight"`` (dim, C), ``"linear.bias"``
        (dim,), ``"nonlinear.0.weight"`` (C, C), ``"nonlinear.0.bias"`` (C,),
        ``"nonlinear.2.weight"`` (dim, C), ``"nonlinear.2.bias"`` (dim,);
        the first two only for a linear head. :meth:`transform` applies the
        branches present here. NumPy only, so the fitted estimator pickles
        without device state.
    optimizer_state_ : dict of str to ndarray
        Adam's moments (``"exp_avg.<name>"``, ``"exp_avg_sq.<name>"``) and
        step count (``"step"``), so that :meth:`partial_fit` and
        ``warm_start`` continue the optimisation exactly.
    loss_curve_ : ndarray of shape (n_steps_,)
        Training loss at each step, over all continued fits.
    n_steps_, n_iter_ : int
        Number of steps run, over all continued fits.
    n_features_in_ : int
        Number of channels seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`, when all strings.

    See Also
    --------
    TorchPCA : Linear, data-dependent reduction.
    RandomProjection : Data-independent baseline.

    Notes
    -----
    The shifts are thresholds on the feature correlation ``F`` (cosine
    similarity of the sampled feature vectors, after ``pointwise``
    centring): code pairs whose features correlate above the shift are
    pulled together, those below are pushed apart. The defaults and the
    presets were tuned for DINO ViT features; features whose cosine
    similarities sit elsewhere need other shifts. A quick check: compute
    :func:`skstego.losses.correlation` on a few maps and put the negative
    shift between the typical same-object and different-object values.
    On :func:`skstego.datasets.make_feature_maps`, for instance, same-class
    tokens have mean cosine 0.25 and different-class tokens 0.08, so the
    DINO negative shift (0.46) pushes every pair apart; shifts of 0.3 (neg)
    and 0.1 (intra, inter) train codes on which k-means finds the classes.

    NumPy arrays and memory maps are streamed: only the images of the current
    batch (and their partners) are moved to the device; torch tensors
    already on the device are used in place. Output is float32; NumPy in
    gives NumPy out, torch in gives torch out on the estimator's device.

    The training loop never waits for the GPU between steps: batch indices
    are drawn where the input lives (no device-to-host copy of indices),
    the derangements of the negative term are drawn on the device
    (:func:`skstego.losses.derangement`), and the loss is read back only
    every 20 steps for the progress bar (``verbose``) and once at the end
    for ``loss_curve_``.

    References
    ----------
    .. [1] M. Hamilton, Z. Zhang, B. Hariharan, N. Snavely and W. T. Freeman,
           2022, "Unsupervised Semantic Segmentation by Distilling Feature
           Correspondences", ICLR.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego import StegoProjector
    >>> rng = np.random.RandomState(0)
    >>> maps = rng.rand(8, 16, 6, 6).astype(np.float32)
    >>> stego = StegoProjector(dim=4, n_steps=3, batch_size=4, device="cpu",
    ...                        random_state=0)
    >>> stego.fit_transform(maps).shape
    (8, 4, 6, 6)
    >>> stego.loss_curve_.shape
    (3,)
    """

    _parameter_constraints: ClassVar[dict] = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "projection_type": [StrOptions({"nonlinear", "linear"})],
        "n_steps": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "feature_dropout": ["boolean"],
        "knn_dropout": ["boolean"],
        "feature_samples": [Interval(Integral, 1, None, closed="left")],
        "neg_samples": [Interval(Integral, 0, None, closed="left")],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "pos_intra_weight": [Real],
        "pos_inter_weight": [Real],
        "neg_weight": [Real],
        "pos_intra_shift": [Real],
        "pos_inter_shift": [Real],
        "neg_shift": [Real],
        "pointwise": ["boolean"],
        "zero_clamp": ["boolean"],
        "stabilize": ["boolean"],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        dim: int = 70,
        *,
        projection_type: str = "nonlinear",
        n_steps: int = 5000,
        batch_size: int = 16,
        lr: float = 5e-4,
        dropout: float = 0.1,
        feature_dropout: bool = True,
        knn_dropout: bool = False,
        feature_samples: int = 11,
        neg_samples: int = 5,
        n_neighbors: int = 7,
        pos_intra_weight: float = 0.67,
        pos_inter_weight: float = 0.25,
        neg_weight: float = 0.63,
        pos_intra_shift: float = 0.18,
        pos_inter_shift: float = 0.12,
        neg_shift: float = 0.46,
        pointwise: bool = True,
        zero_clamp: bool = True,
        stabilize: bool = False,
        device: str | torch.device | None = "auto",
        random_state: Any = None,
        verbose: bool = False,
        warm_start: bool = False,
    ) -> None:
        self.dim = dim
        self.projection_type = projection_type
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.lr = lr
        self.dropout = dropout
        self.feature_dropout = feature_dropout
        self.knn_dropout = knn_dropout
        self.feature_samples = feature_samples
        self.neg_samples = neg_samples
        self.n_neighbors = n_neighbors
        self.pos_intra_weight = pos_intra_weight
        self.pos_inter_weight = pos_inter_weight
        self.neg_weight = neg_weight
        self.pos_intra_shift = pos_intra_shift
        self.pos_inter_shift = pos_inter_shift
        self.neg_shift = neg_shift
        self.pointwise = pointwise
        self.zero_clamp = zero_clamp
        self.stabilize = stabilize
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    @classmethod
    def from_preset(cls, name: str, **params: Any) -> StegoProjector:
        """Settings that reproduce a released STEGO checkpoint.

        Parameters
        ----------
        name : {"cocostuff27", "cityscapes", "potsdam"}
            Dataset of the released checkpoint: the hyper-parameter table of
            the STEGO paper (dim, steps, batch, pointwise, weights and
            shifts), with ``feature_dropout`` and ``knn_dropout`` on as in
            every reference run.
        **params
            Further parameters (``device``, ``random_state``...), which
            override the preset.

        Returns
        -------
        StegoProjector
            Unfitted estimator.

        Examples
        --------
        >>> from skstego import StegoProjector
        >>> StegoProjector.from_preset("cocostuff27").dim
        90
        """
        if name not in PRESETS:
            raise ValueError(
                f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}."
            )
        return cls(**{**PRESETS[name], **params})

    def save_head(self, path: str | os.PathLike) -> None:
        """Write the trained head to a safetensors file.

        The file holds the weight matrices of ``head_state_`` (six, or two
        for a linear head) under their names (1x1 convolution weights as 2-D
        matrices) and, as
        metadata, the estimator's parameters. It contains no code and no
        pickle: :meth:`load_head` (or any safetensors reader) can open it
        on any machine. Adam's state is not saved; pickle the estimator
        (it holds only NumPy arrays) to continue training later.

        Parameters
        ----------
        path : str or path-like
            Output file, conventionally ``*.safetensors``.

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> from skstego import StegoProjector
        >>> maps = np.random.RandomState(0).rand(6, 8, 4, 4).astype(np.float32)
        >>> stego = StegoProjector(dim=3, n_steps=2, batch_size=4, device="cpu",
        ...                        random_state=0).fit(maps)
        >>> path = os.path.join(tempfile.mkdtemp(), "head.safetensors")
        >>> stego.save_head(path)
        >>> loaded = StegoProjector.load_head(path, device="cpu")
        >>> np.allclose(loaded.transform(maps), stego.transform(maps))
        True
        """
        from safetensors.numpy import save_file

        check_is_fitted(self)
        params = {
            k: v
            for k, v in self.get_params(deep=False).items()
            if isinstance(v, bool | int | float | str) or v is None
        }
        metadata = {
            "format": _HEAD_FORMAT,
            "n_features_in": str(self.n_features_in_),
            "params": json.dumps(params),
        }
        arrays = {
            k: np.ascontiguousarray(self.head_state_[k], dtype=np.float32)
            for k in _PARAM_NAMES
            if k in self.head_state_
        }
        save_file(arrays, os.fspath(path), metadata=metadata)

    @classmethod
    def load_head(
        cls, source: str | os.PathLike | Mapping[str, Any], **params: Any
    ) -> StegoProjector:
        """A fitted StegoProjector from a saved or a reference head.

        Reads

        * safetensors files written by :meth:`save_head` (their stored
          parameters are restored);
        * state dicts of the STEGO reference code, bare or inside a PyTorch
          Lightning checkpoint (``{"state_dict": {...}, ...}``): the keys
          ``cluster1.0.weight``, ``cluster1.0.bias`` and, for a nonlinear
          head, ``cluster2.0.*`` and ``cluster2.2.*`` of its
          ``DinoFeaturizer`` (``src/modules.py``), under any prefix such as
          ``net.`` (``LitUnsupervisedSegmenter.net`` in
          ``src/train_segmentation.py``); a bare ``Conv2d`` ``cluster1``
          (``cluster1.weight``) is read too. A state dict without
          ``cluster2`` is a ``projection_type: linear`` head. Other entries
          (the backbone ``net.model.*``, ``cluster_probe``, ``linear_probe``,
          ``decoder``...) are ignored; keys match on whole path components
          and the head must sit under a single prefix.

        A path is read with safetensors or ``torch.load(weights_only=True)``,
        so no pickled code runs. Full Lightning checkpoints pickle their
        OmegaConf hyper-parameters and are refused: read them with
        ``skstego.io.load_stego_checkpoint``, or pass their ``state_dict``
        here as a mapping.

        Parameters
        ----------
        source : str, path-like or mapping of str to tensor
            Weights file (``*.safetensors`` or a ``torch.save``'d state
            dict), or a state dict in memory (values torch tensors or NumPy
            arrays; a mapping with a ``"state_dict"`` mapping is unwrapped).
        **params
            Estimator parameters (``device``...), overriding stored ones.
            ``dim`` and ``projection_type`` follow from the weights; giving
            other values raises.

        Returns
        -------
        StegoProjector
            Fitted: ``transform`` works at once; ``partial_fit`` continues
            training with a fresh Adam state.

        Raises
        ------
        ValueError
            If the file cannot be read, holds no head, an incomplete head or
            several heads, or the weights contradict ``dim`` or
            ``projection_type`` (the message names the source and the keys).
        TypeError
            If ``source`` is neither a path nor a mapping.

        Examples
        --------
        A head built as the reference builds it, loaded from its state dict:

        >>> import numpy as np, torch
        >>> from skstego import StegoProjector
        >>> net = torch.nn.Module()
        >>> net.cluster1 = torch.nn.Sequential(torch.nn.Conv2d(8, 3, (1, 1)))
        >>> net.cluster2 = torch.nn.Sequential(
        ...     torch.nn.Conv2d(8, 8, (1, 1)), torch.nn.ReLU(),
        ...     torch.nn.Conv2d(8, 3, (1, 1)))
        >>> state = {"net." + k: v for k, v in net.state_dict().items()}
        >>> head = StegoProjector.load_head(state, device="cpu")
        >>> head.dim, head.projection_type, head.n_features_in_
        (3, 'nonlinear', 8)
        >>> f = torch.randn(2, 8, 4, 4)
        >>> with torch.no_grad():
        ...     expected = net.cluster1(f) + net.cluster2(f)
        >>> torch.allclose(head.transform(f), expected, atol=1e-5)
        True
        """
        keys, get, stored, where = _open_head_source(source)
        state, projection_type = _find_head(keys, get, where)
        dim, n_features = state["linear.weight"].shape
        implied = {"dim": int(dim), "projection_type": projection_type}
        for name, value in implied.items():
            if name in params and params[name] != value:
                raise ValueError(
                    f"{where} holds a head with {name}={value!r}, but "
                    f"{name}={params[name]!r} was given."
                )
        est = cls(**{**stored, **params, **implied})
        est.head_state_ = state
        est.optimizer_state_ = {"step": np.asarray(0, dtype=np.int64)}
        est.loss_curve_ = np.empty(0, dtype=np.float64)
        est.n_steps_ = est.n_iter_ = 0
        est.n_features_in_ = int(n_features)
        est._n_features_out = int(dim)
        return est

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> StegoProjector:
        """Train the head on feature maps or tokens ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w) or (n_samples, C)
            Feature maps (or tokens, as 1x1 maps); at least 2 samples (an
            image needs another image as its positive partner). On-disk
            input (a :class:`~skstego.features.FeatureStore`, a zarr or dask
            array, a NumPy memmap) is never loaded whole: the K-NN
            descriptors are computed in one chunked pass and every training
            step reads only its batch (and the partners) by fancy indexing.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : StegoProjector
            Fitted estimator.
        """
        first = not (self.warm_start and hasattr(self, "head_state_"))
        X = check_features(self, X, reset=first, min_samples=2, lazy=True)
        self._fit(X, continue_=not first)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: Any, y: Any = None) -> StegoProjector:
        """Train ``n_steps`` more steps on ``X``, from the current head.

        The first call trains from scratch (like :meth:`fit`); later calls
        keep the head and Adam's state, search the K-NN partners within
        ``X`` and append to ``loss_curve_``. Each call draws from a
        generator seeded by ``random_state`` and the number of steps already
        run, so a sequence of calls is reproducible.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w) or (n_samples, C)
            Feature maps or tokens; at least 2 samples.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : StegoProjector
            The estimator, trained further.
        """
        first = not hasattr(self, "head_state_")
        X = check_features(self, X, reset=first, min_samples=2, lazy=True)
        self._fit(X, continue_=not first)
        return self

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Apply the trained head (no dropout).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w) or (n_samples, C)
            Feature maps or tokens.

        Returns
        -------
        X_new : ndarray, torch.Tensor or dask.array.Array of shape \
                (N, dim, h, w) or (n_samples, dim)
            Codes, float32; NumPy for NumPy input, torch (on the estimator's
            device) for torch input, a lazy dask array mapped over the chunks
            for dask input (computed on the workers).
        """
        check_is_fitted(self)
        dim = int(self.head_state_["linear.bias"].shape[0])
        out = lazy_output(self, "transform", X, dim)
        if out is not None:
            return out
        X = check_features(self, X, reset=False, lazy=True)
        device = self._resolved_device()
        params = self._device_params(device)
        return apply_tokenwise(
            lambda x: _head_tokens(params, x),
            X,
            device=device,
            out_features=dim,
        )

    def _device_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        state = self.head_state_
        return self._cached(
            ("head_state", str(device)),
            state,
            lambda: {
                k: torch.as_tensor(np.asarray(v)).to(device, torch.float32)
                for k, v in state.items()
            },
        )

    def _fit(self, X: np.ndarray | torch.Tensor, continue_: bool = False) -> None:
        device = resolve_device(self.device)
        n, c = int(X.shape[0]), int(X.shape[1])
        generator = make_generator(self.random_state, device)
        done = self.n_steps_ if continue_ else 0
        if done:
            # a fresh, reproducible stream for each continuation
            generator.manual_seed((generator.initial_seed() + 7919 * done) % 2**63)
        if continue_ and int(self.dim) != self.head_state_["linear.bias"].shape[0]:
            raise ValueError(
                f"dim={self.dim} differs from the fitted head's "
                f"{self.head_state_['linear.bias'].shape[0]}; continuing training "
                "(partial_fit, warm_start) needs the same dim."
            )
        projection_type = str(self.projection_type)
        if continue_ and projection_type != _head_type(self.head_state_):
            raise ValueError(
                f"projection_type={projection_type!r} differs from the fitted "
                f"head's {_head_type(self.head_state_)!r}; continuing training "
                "(partial_fit, warm_start) needs the same projection_type."
            )
        p_drop = float(self.dropout)

        # K-NN positives: pooled, normalised descriptors (the reference's
        # src/precompute_knns.py), optionally channel-dropped as there.
        descriptors = image_descriptors(
            X,
            device=device,
            dropout=p_drop if self.knn_dropout else 0.0,
            generator=generator,
        )
        neighbors = nearest_neighbors(descriptors, _KNN_POOL, device=device)
        del descriptors
        n_pool = min(int(self.n_neighbors), neighbors.shape[1])
        # Batch indices are drawn where X lives, so that reading a batch never
        # waits for the device: on the device for tensors already there (with
        # the main generator), on the host for NumPy, on-disk input and host
        # tensors (with a host generator seeded from the main one's seed --
        # a host value, so seeding it reads nothing from the device).
        x_device = X.device if is_torch(X) else torch.device("cpu")
        if same_device(x_device, device):
            index_gen, index_device = generator, device
        else:
            index_device = torch.device("cpu")
            index_gen = torch.Generator(device=index_device)
            index_gen.manual_seed(_host_seed(generator.initial_seed()))
        neighbors_t = torch.as_tensor(neighbors[:, :n_pool], device=index_device)

        batch = min(int(self.batch_size), n)
        neg_samples = int(self.neg_samples) if batch >= 2 else 0
        samples = int(self.feature_samples) if X.ndim == 4 else 1
        keep = 1.0 - p_drop
        # masks drawn per step: one per branch, one for the correlation target
        n_branches = 2 if projection_type == "nonlinear" else 1
        n_masks = n_branches + int(bool(self.feature_dropout))

        if continue_:
            params = {
                k: torch.as_tensor(v).to(device, torch.float32).requires_grad_(True)
                for k, v in self.head_state_.items()
            }
        else:
            params = _init_params(c, int(self.dim), projection_type, generator, device)
        optimizer = torch.optim.Adam(list(params.values()), lr=float(self.lr))
        if continue_:
            _load_adam(optimizer, params, self.optimizer_state_, device)
        # bf16 autocast for the head's matrix products only, on GPUs where
        # bf16 is native; the loss (and the feature correlation it targets)
        # is computed in float32 outside autocast.
        use_bf16 = _autocast_bf16(device)
        loss_weights = (
            float(self.pos_intra_weight),
            float(self.pos_inter_weight),
            float(self.neg_weight),
        )
        loss_shifts = (
            float(self.pos_intra_shift),
            float(self.pos_inter_shift),
            float(self.neg_shift),
        )
        loss_flags = {
            "pointwise": bool(self.pointwise),
            "zero_clamp": bool(self.zero_clamp),
            "stabilize": bool(self.stabilize),
        }

        # maps are gathered straight into channels-last memory (each image's
        # pixels as rows, the layout _train_loss reads them in): one pass
        # per batch instead of a gather and a transposed copy
        x_rows = None
        if X.ndim == 4 and is_torch(X):
            x_rows = X.permute(0, 2, 3, 1)
        elif (
            X.ndim == 4
            and isinstance(X, np.ndarray)
            and min(X.strides) >= 0  # torch.from_numpy refuses negative strides
        ):
            with warnings.catch_warnings():
                # read-only input is only read here
                warnings.filterwarnings("ignore", message="The given NumPy array")
                x_rows = torch.from_numpy(np.asarray(X)).permute(0, 2, 3, 1)

        def load(idx: torch.Tensor) -> torch.Tensor:
            # idx lives on index_device: X's own device, or the host
            if x_rows is not None:
                xb = torch.index_select(x_rows, 0, idx.to(x_rows.device))
                return as_tensor(xb, device).permute(0, 3, 1, 2)
            xb = X[idx.to(x_device)] if is_torch(X) else X[idx.numpy()]
            xb = as_tensor(xb, device)
            return xb if xb.ndim == 4 else xb[:, :, None, None]

        def masks(b: int) -> list[torch.Tensor | None]:
            """Dropout2d masks (b, C), scaled by 1 / keep: linear branch,
            nonlinear branch, correlation target (None when off)."""
            if p_drop == 0:
                return [None, None, None]
            u = torch.rand((n_masks, b, c), generator=generator, device=device)
            m = list((u < keep).to(torch.float32) / keep)
            if n_branches == 1:
                m.insert(1, None)
            return m + [None] * (3 - len(m))

        # the loss stays on the device: reading it each step would wait for the
        # GPU; the progress bar reads it only every _REPORT_EVERY steps
        losses = torch.empty(int(self.n_steps), dtype=torch.float32, device=device)
        bar = tqdm(
            range(int(self.n_steps)), disable=not self.verbose, desc="StegoProjector"
        )
        for step in bar:
            idx = torch.randperm(n, generator=index_gen, device=index_device)[:batch]
            pick = torch.randint(
                n_pool, (batch,), generator=index_gen, device=index_device
            )
            partner = neighbors_t[idx, pick]
            both = load(torch.cat([idx, partner]))
            d1, d2, d_target = masks(2 * batch)
            # the correlation target is the features, channel-dropped with
            # their own mask when feature_dropout (the reference's cfg.dropout)
            total = _train_loss(
                params,
                both,
                d1,
                d2,
                d_target,
                weights=loss_weights,
                shifts=loss_shifts,
                neg_samples=neg_samples,
                feature_samples=samples,
                flags=loss_flags,
                generator=generator,
                bf16=use_bf16,
            )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses[step] = total.detach()
            last = step + 1 == int(self.n_steps)
            if self.verbose and ((step + 1) % _REPORT_EVERY == 0 or last):
                recent = losses[max(0, step + 1 - _REPORT_EVERY) : step + 1]
                bar.set_postfix(loss=f"{float(recent.mean()):.4f}")
        bar.close()
        losses = losses.cpu().numpy().astype(np.float64)
        finite = torch.stack([torch.isfinite(v).all() for v in params.values()])
        if not bool(finite.all()):  # one read, after the loop
            raise ValueError(
                f"StegoProjector training diverged: the head holds NaN or "
                f"infinite weights after {int(self.n_steps)} steps at "
                f"lr={self.lr!r}. Lower lr (the reference uses 5e-4) or set "
                "stabilize=True; the estimator keeps its previous state."
            )

        self.head_state_ = {
            k: v.detach().to("cpu", torch.float32).numpy().copy()
            for k, v in params.items()
        }
        self.optimizer_state_ = _dump_adam(optimizer, params)
        if continue_:
            losses = np.concatenate([self.loss_curve_, losses])
        self.loss_curve_ = losses
        self.n_steps_ = done + int(self.n_steps)
        self.n_iter_ = self.n_steps_
        self._n_features_out = int(self.dim)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        tags.non_deterministic = False
        return tags
