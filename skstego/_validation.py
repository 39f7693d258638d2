"""Input checks shared by estimators and metrics (below every estimator).

Each check validates at a public boundary, never modifies its input, and
raises a ``ValueError`` that says what was wrong and what to pass instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_array

from ._device import check_finite_tensor, is_torch

__all__ = ["check_codes"]


def check_codes(X: Any, n_components: int, owner: str) -> np.ndarray | torch.Tensor:
    """Codes for ``inverse_transform``: 2-D (n, n_components) or 4-D maps
    (N, n_components, h, w), real and finite; never modifies ``X``.

    Parameters
    ----------
    X : array-like or torch.Tensor
        Codes as returned by the reducer's ``transform``.
    n_components : int
        Width the reducer projects to.
    owner : str
        Name of the estimator, for the message.

    Returns
    -------
    ndarray or torch.Tensor
        ``X`` itself (tensors) or the checked float array.
    """
    expected = (
        "Expected 2-D codes (n_samples, n_components) or 4-D code maps "
        "(N, n_components, h, w)"
    )
    if is_torch(X):
        if X.ndim not in (2, 4):
            raise ValueError(f"{expected}, got a tensor of shape {tuple(X.shape)}.")
        if X.is_complex() or X.dtype == torch.bool:
            raise ValueError(f"Expected a real-valued tensor, got dtype {X.dtype}.")
        check_finite_tensor(X)
    else:
        X = check_array(X, dtype=[np.float32, np.float64], allow_nd=True)
        if X.ndim not in (2, 4):
            raise ValueError(f"{expected}, got an array of shape {X.shape}.")
    if X.shape[1] != n_components:
        raise ValueError(
            f"X has {X.shape[1]} components, but {owner} projects to "
            f"n_components_={n_components}."
        )
    return X
