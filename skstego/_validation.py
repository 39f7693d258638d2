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

__all__ = ["check_codes", "dense_codes", "integer_labels", "label_codes"]


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


def integer_labels(y: Any, name: str = "y") -> np.ndarray | torch.Tensor:
    """Check that ``y`` holds integer labels; return it as int64, same shape.

    Float arrays of whole, finite numbers are accepted and converted; the input
    is never modified. NumPy stays NumPy, torch stays torch.

    Parameters
    ----------
    y : array-like or torch.Tensor
        Labels of any shape.
    name : str, default="y"
        Name of the argument, for the message.

    Returns
    -------
    ndarray or torch.Tensor
        int64 labels of the shape of ``y`` (``y`` itself when it is int64).

    Raises
    ------
    ValueError
        "Unknown label type" (scikit-learn's wording) for anything else.

    Examples
    --------
    >>> from skstego.metrics import integer_labels
    >>> integer_labels([0.0, 2.0, -1.0])
    array([ 0,  2, -1])
    """
    if isinstance(y, torch.Tensor):
        if y.is_floating_point() and not bool(
            torch.all(torch.isfinite(y) & (y == torch.round(y)))
        ):
            raise ValueError(
                f"Unknown label type: {name} must hold integer labels (class ids, "
                f"-1 to ignore), got {y.dtype} values that are not whole numbers."
            )
        if y.is_complex():
            raise ValueError(f"Unknown label type: {name} is complex.")
        return y.long()
    arr = np.asarray(y)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr) & (arr == np.round(arr))):
        return arr.astype(np.int64)
    raise ValueError(
        f"Unknown label type: {name} must hold integer labels (class ids, -1 to "
        f"ignore), got dtype {arr.dtype}."
    )


def dense_codes(t: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Integer labels -> codes ``0 .. k-1`` in sorted label order, where ``t`` lives.

    Labels spanning a short range are mapped through a table of the values
    present (O(n), no sort); others are sorted (:func:`torch.unique`,
    :func:`numpy.unique`). Returns a new flat int64 tensor (a NumPy array for
    NumPy input: on the CPU NumPy's single-threaded steps are several times
    faster than torch's parallel ones on a busy machine); ``t`` is not
    modified.
    """
    if isinstance(t, np.ndarray):
        flat = t.reshape(-1).astype(np.int64)
        if flat.size == 0:
            return flat
        lo, hi = int(flat.min()), int(flat.max())
        if hi - lo <= max(4 * flat.size, 1024):
            flat -= lo
            present = np.bincount(flat, minlength=hi - lo + 1) > 0
            return (np.cumsum(present) - 1)[flat]
        return np.unique(flat, return_inverse=True)[1].reshape(-1)
    t = t.reshape(-1).long()
    if t.numel() == 0:
        return t
    lo, hi = int(t.min()), int(t.max())
    if hi - lo <= max(4 * t.numel(), 1024):
        present = torch.bincount(t - lo, minlength=hi - lo + 1) > 0
        return (present.cumsum(0) - 1)[t - lo]
    return torch.unique(t, return_inverse=True)[1]


def label_codes(labels: Any, name: str, device: torch.device) -> torch.Tensor:
    """Any 1-D labels -> int64 codes ``0 .. k-1`` (sorted label order) on ``device``.

    Every distinct value is a label, as in scikit-learn's clustering metrics
    (strings and negative numbers included).

    Raises
    ------
    ValueError
        For NaN, complex labels, or labels of types that cannot be sorted.
    """
    if is_torch(labels):
        if labels.is_complex():
            raise ValueError(f"{name} must hold real labels, got dtype {labels.dtype}.")
        if labels.is_floating_point():
            if bool(torch.isnan(labels).any()):
                raise ValueError(f"{name} contains NaN; every sample needs a label.")
            return torch.unique(labels.to(device), return_inverse=True)[1].reshape(-1)
        return dense_codes(labels.to(device))
    arr = np.asarray(labels)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; every sample needs a label.")
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} must hold real labels, got dtype {arr.dtype}.")
    if arr.dtype.kind == "i" or (arr.dtype.kind == "u" and arr.dtype.itemsize < 8):
        # integers: the O(n) table of dense_codes, not a sort
        return torch.from_numpy(dense_codes(arr)).to(device)
    try:
        inverse = np.unique(arr, return_inverse=True)[1]
    except TypeError as exc:
        raise ValueError(
            f"{name} mixes label types that cannot be sorted ({exc})."
        ) from None
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device)
