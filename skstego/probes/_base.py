"""What every probe shares: label checks, map-aware prediction, batched scoring.

A probe computes one score per (token, output) -- similarities to centroids,
class logits -- through a score function. This module turns that into
predictions for 2-D tokens or 4-D maps (optionally upsampled bilinearly to a
label map's size before the argmax, as the STEGO protocol does) and into
confusion matrices computed batch by batch on the device, so that scoring a
large validation set never materialises all upsampled scores at once.

Upsampling comes in two flavours (``upsample``): ``"scores"`` upsamples the
per-output scores of the feature maps; ``"codes"`` upsamples the feature maps
(codes) themselves and scores every pixel of the result, which is what the
STEGO reference does (``F.interpolate(code, label.shape[-2:],
mode="bilinear", align_corners=False)`` before both probes, in
``src/train_segmentation.py`` and ``src/eval_segmentation.py``). The two are
equal up to float rounding for scores affine in the codes (a linear probe,
Euclidean k-means' ``2 x.c - |c|^2``) and differ for cosine similarities,
which normalise every (upsampled) code first.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._device import (
    DEFAULT_BATCH_ELEMENTS,
    apply_tokenwise,
    as_tensor,
    is_torch,
    iter_slices,
    maps_to_tokens,
    rows_per_batch,
    to_output,
    tokens_to_maps,
)
from ..metrics import check_confusion_size, integer_labels

__all__ = [
    "check_size",
    "check_targets",
    "check_upsample",
    "predict_labels",
    "score_maps",
    "scored_confusion",
]

_UPSAMPLE = ("scores", "codes")


def check_upsample(upsample: str) -> str:
    """Validate the ``upsample`` option: ``"scores"`` or ``"codes"``."""
    if upsample not in _UPSAMPLE:
        raise ValueError(f"upsample must be 'scores' or 'codes', got {upsample!r}.")
    return upsample


def check_size(size: Any) -> tuple[int, int]:
    """Validate an output ``size=(H, W)``: two positive integers."""
    try:
        if any(isinstance(v, bool | np.bool_) for v in size):
            raise TypeError
        pair = tuple(operator.index(v) for v in size)
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(
            "size must be (H, W), two positive integers (the label maps' height "
            f"and width, e.g. labels.shape[-2:]), got {size!r}."
        )
    return pair


def _same_aspect(small: tuple[int, int], big: tuple[int, int]) -> bool:
    """Whether ``big`` is a rescaling of ``small`` up to rounding.

    True when one scale factor ``s`` brings both sides of ``big`` within less
    than one cell of ``small``: ``|H / s - h| < 1`` and ``|W / s - w| < 1``
    (e.g. labels of a 321 x 481 image for 40 x 60 feature maps of a
    patch-8 ViT). A transposed or otherwise reshaped label map fails.
    """
    (h, w), (H, W) = small, big
    lo = max(H / (h + 1), W / (w + 1))
    hi = min(H / (h - 1) if h > 1 else np.inf, W / (w - 1) if w > 1 else np.inf)
    return lo < hi


def check_targets(X: Any, y: Any) -> np.ndarray | torch.Tensor:
    """Check that ``y`` fits ``X``: 1-D labels for tokens, label maps for maps.

    Returns ``y`` as an int64 array/tensor (a copy when a conversion is needed;
    the input is never modified).
    """
    if y is None:
        raise ValueError("This probe needs labels y; got y=None.")
    yt = integer_labels(y, "y")
    if X.ndim == 2:
        if yt.ndim != 1 or yt.shape[0] != X.shape[0]:
            raise ValueError(
                f"For 2-D tokens X of shape {tuple(X.shape)}, y must be 1-D with "
                f"{X.shape[0]} labels; got shape {tuple(yt.shape)}."
            )
    else:
        if yt.ndim != 3 or yt.shape[0] != X.shape[0]:
            raise ValueError(
                f"For 4-D maps X of shape {tuple(X.shape)}, y must be label maps "
                f"(N, H, W) with N={X.shape[0]}; got shape {tuple(yt.shape)}."
            )
        hw, HW = tuple(X.shape[-2:]), tuple(yt.shape[-2:])
        if not _same_aspect(hw, HW):
            raise ValueError(
                f"Label maps of size {HW} do not have the aspect ratio of the "
                f"feature maps, {hw} (transposed, or cropped differently?): "
                "scores are upsampled to the label size, which must be a "
                "rescaling of the feature maps' size."
            )
    return yt


def _upsampled_scores(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    xb: torch.Tensor,
    size: tuple[int, int] | None,
    upsample: str = "scores",
) -> torch.Tensor:
    """Scores of a 4-D batch as (B, K, H, W), upsampled to ``size`` if given.

    ``upsample="codes"`` upsamples the maps ``xb`` before scoring them;
    ``"scores"`` scores the maps and upsamples the scores.
    """
    resize = size is not None and tuple(size) != tuple(xb.shape[-2:])
    if resize and upsample == "codes":
        xb = F.interpolate(xb, size=tuple(size), mode="bilinear", align_corners=False)
        resize = False
    b, _, h, w = xb.shape
    scores = tokens_to_maps(score_fn(maps_to_tokens(xb)), b, h, w)
    if resize:
        scores = F.interpolate(
            scores, size=tuple(size), mode="bilinear", align_corners=False
        )
    return scores


def _image_batch(
    X: Any, n_outputs: int, size: tuple[int, int] | None, upsample: str = "scores"
) -> int:
    h, w = (X.shape[2], X.shape[3]) if size is None else size
    per_image = int(np.prod(X.shape[1:])) + 2 * n_outputs * h * w
    if upsample == "codes":
        per_image += 2 * X.shape[1] * h * w  # upsampled and normalised codes
    return rows_per_batch(per_image, DEFAULT_BATCH_ELEMENTS)


def _argmax_batches(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    X: Any,
    device: torch.device,
    n_outputs: int,
    size: tuple[int, int] | None,
    upsample: str = "scores",
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (slice, argmax ids on ``device``) batch by batch.

    Ids are (n,) for tokens and (B, H, W) for maps, upsampled to ``size``.
    """
    batch = (
        _image_batch(X, n_outputs, size, upsample)
        if X.ndim == 4
        else rows_per_batch(X.shape[1] + 2 * n_outputs)
    )
    with torch.no_grad():
        for sl in iter_slices(X.shape[0], batch):
            xb = as_tensor(X[sl], device)
            if xb.ndim == 4:
                scores = _upsampled_scores(score_fn, xb, size, upsample)
                yield sl, scores.argmax(dim=1)
            else:
                yield sl, score_fn(xb).argmax(dim=1)


def predict_labels(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    X: Any,
    *,
    device: torch.device,
    n_outputs: int,
    size: tuple[int, int] | None = None,
    label_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    upsample: str = "scores",
) -> np.ndarray | torch.Tensor:
    """Argmax of ``score_fn`` per token, (n,) for tokens or (N, h, w) for maps.

    ``size`` upsamples map scores (or, with ``upsample="codes"``, the maps)
    bilinearly to (H, W) first; ``label_fn`` maps argmax ids (e.g. cluster ->
    class). Output follows input type.
    """
    check_upsample(upsample)
    label_fn = label_fn or (lambda ids: ids)
    if X.ndim == 4 and size is not None:
        size = check_size(size)
    out = []
    for _, ids in _argmax_batches(score_fn, X, device, n_outputs, size, upsample):
        ids = label_fn(ids)
        out.append(ids if is_torch(X) else ids.cpu())
    return to_output(torch.cat(out), X)


def scored_confusion(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    X: Any,
    y: Any,
    *,
    device: torch.device,
    n_outputs: int,
    n_classes: int,
    ignore_index: int = -1,
    upsample: str = "scores",
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Confusion matrix (n_classes, n_outputs) of argmax predictions against ``y``.

    For maps, scores (or the maps, ``upsample="codes"``) are upsampled
    bilinearly to the label maps' size before the argmax. Negative labels and
    ``ignore_index`` are left out; callers make ``n_classes`` cover every other
    label (labels ``>= n_classes`` would be dropped). Computed in batches on
    ``device``. ``sample_weight`` (float64, checked by the caller: one weight
    per row of ``y`` or of ``y``'s shape) weights every pixel; the matrix is
    then float64.
    """
    check_upsample(upsample)
    check_confusion_size(n_classes, n_outputs)
    dtype = torch.int64 if sample_weight is None else torch.float64
    conf = torch.zeros(n_classes * n_outputs, dtype=dtype, device=device)
    size = tuple(y.shape[-2:]) if X.ndim == 4 else None
    batches = _argmax_batches(score_fn, X, device, n_outputs, size, upsample)
    for sl, pred in batches:
        yb = torch.as_tensor(y[sl]).to(device, torch.int64).reshape(-1)
        pred = pred.reshape(-1)
        valid = (yb >= 0) & (yb < n_classes) & (yb != ignore_index)
        wb = None
        if sample_weight is not None:
            wb = torch.as_tensor(sample_weight[sl]).to(device, torch.float64)
            wb = wb.reshape(wb.shape + (1,) * (y[sl].ndim - wb.ndim))
            wb = wb.expand(tuple(y[sl].shape)).reshape(-1)[valid]
        conf += torch.bincount(
            yb[valid] * n_outputs + pred[valid],
            weights=wb,
            minlength=n_classes * n_outputs,
        )
    return conf.reshape(n_classes, n_outputs).cpu().numpy()


def score_maps(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    X: Any,
    *,
    device: torch.device,
    n_outputs: int,
    post: Callable[[torch.Tensor], torch.Tensor],
    out_features: int,
    size: tuple[int, int] | None = None,
    upsample: str = "scores",
) -> np.ndarray | torch.Tensor:
    """``post(scores)`` per token: (n, out) for tokens, (N, out, h, w) for maps.

    ``post`` acts along dimension 1 (softmax, cluster -> class sums...) of
    (m, K) token scores or (B, K, H, W) map scores alike. ``size`` upsamples
    map scores (or the maps, ``upsample="codes"``) bilinearly to (H, W)
    before ``post``, as for predictions. Output follows input type.
    """
    check_upsample(upsample)
    if X.ndim == 2 or size is None:
        if size is not None:
            raise ValueError("size applies to 4-D feature maps only.")
        return apply_tokenwise(
            lambda t: post(score_fn(t)), X, device=device, out_features=out_features
        )
    size = check_size(size)
    out = []
    with torch.no_grad():
        batch = _image_batch(X, n_outputs, size, upsample)
        for sl in iter_slices(X.shape[0], batch):
            xb = as_tensor(X[sl], device)
            scores = _upsampled_scores(score_fn, xb, size, upsample)
            res = post(scores)
            out.append(res if is_torch(X) else res.cpu())
    return to_output(torch.cat(out), X)
