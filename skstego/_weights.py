"""Checking ``sample_weight`` for tokens and feature maps.

A sample is a token for 2-D input and an image for 4-D maps. Weights are one
per sample (an image's weight then weights each of its pixels alike) or, for
maps, one per pixel: of the label maps' shape when scoring, of the feature
maps' (N, h, w) when fitting a cluster probe. The probes and
:mod:`skstego.metrics` all check weights here.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
import torch

__all__ = ["check_weights", "token_weights"]


def check_weights(
    sample_weight: Any, n_samples: int, pixel_shape: tuple | None = None
) -> np.ndarray | None:
    """``sample_weight`` as float64 NumPy of shape (n_samples,) or ``pixel_shape``.

    None stays None; a scalar becomes a constant array. Weights must be finite
    and non-negative (as scikit-learn's estimators require).
    """
    if sample_weight is None:
        return None
    if isinstance(sample_weight, Real):
        return np.full(n_samples, float(sample_weight), dtype=np.float64)
    if isinstance(sample_weight, torch.Tensor):
        sample_weight = sample_weight.detach().cpu().numpy()
    w = np.asarray(sample_weight, dtype=np.float64)
    if not w.flags.writeable:  # a broadcast view: torch wants writable memory
        w = w.copy()
    allowed = [(n_samples,)]
    if pixel_shape is not None:
        allowed.append(tuple(int(s) for s in pixel_shape))
    if w.shape not in allowed:
        raise ValueError(
            f"sample_weight has shape {w.shape}; expected "
            + " or ".join(str(s) for s in allowed)
            + " (one weight per sample"
            + (", or per pixel)." if pixel_shape is not None else ").")
        )
    if not np.all(np.isfinite(w)):
        raise ValueError("sample_weight contains NaN or infinity.")
    if np.any(w < 0):
        raise ValueError("Negative values in data passed to `sample_weight`.")
    return w


def token_weights(
    w: np.ndarray | None, X_shape: tuple, device: torch.device
) -> torch.Tensor | None:
    """Checked weights of ``X`` (2-D tokens or 4-D maps) as one float64 weight
    per token, in the order of ``maps_to_tokens`` (image-major, row-major)."""
    if w is None:
        return None
    wt = torch.as_tensor(w, dtype=torch.float64, device=device)
    if len(X_shape) == 4:
        n, _, h, wd = X_shape
        if wt.ndim == 1:
            wt = wt[:, None].expand(n, h * wd)
    return wt.reshape(-1)
