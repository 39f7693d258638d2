"""Calibration of class probabilities: reliability bins and the expected
calibration error (ECE).

:func:`expected_calibration_error` is public as
:func:`skstego.metrics.expected_calibration_error`; the helpers that bin
confidences (:func:`confidence_and_correct`, :func:`calibration_bins`,
:func:`ece_from_bins`) serve :func:`skstego.plotting.plot_reliability_diagram`
and the study's chunked ECE, which draw or merge the bins themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._device import is_torch
from ._validation import integer_labels

__all__ = [
    "calibration_bins",
    "check_n_bins",
    "confidence_and_correct",
    "ece_from_bins",
    "expected_calibration_error",
]


def check_n_bins(n_bins: Any) -> int:
    """``n_bins`` as an int >= 1; a ValueError for anything else."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return int(n_bins)


def confidence_and_correct(
    y_true: Any, proba: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max probability (float64) and whether its class is right, labelled pixels.

    Accepts (n,) labels with (n, K) probabilities, or label maps (N, H, W)
    with (N, K, H, W) probabilities (NumPy or torch). Both results stay on
    the device of ``proba``. Negative labels are left out.
    """
    y = integer_labels(y_true, "y_true")
    p = proba if is_torch(proba) else torch.from_numpy(np.asarray(proba))
    y = y if is_torch(y) else torch.from_numpy(np.ascontiguousarray(y))
    y = y.to(p.device)
    if y.ndim not in (1, 3) or p.ndim != y.ndim + 1:
        raise ValueError(
            "Expected y_true (n,) with proba (n, K), or label maps (N, H, W) with "
            f"proba (N, K, H, W); got y_true {tuple(y.shape)} and proba "
            f"{tuple(p.shape)}."
        )
    if p.shape[0] != y.shape[0] or tuple(p.shape[2:]) != tuple(y.shape[1:]):
        raise ValueError(
            f"y_true {tuple(y.shape)} and proba {tuple(p.shape)} do not match: "
            "proba needs the class axis at position 1 and the same other sizes "
            "(resize the probabilities to the label size first)."
        )
    if not (p.is_floating_point() and p.shape[1] > 0):
        raise ValueError(
            f"proba must hold float probabilities for K >= 1 classes, got dtype "
            f"{p.dtype} and shape {tuple(p.shape)}."
        )
    if p.numel() and not bool(
        torch.isfinite(p).all() & (p >= 0).all() & (p <= 1).all()
    ):
        raise ValueError(
            "proba must hold probabilities in [0, 1] (e.g. predict_proba), not "
            "logits or NaN."
        )
    n_classes = p.shape[1]
    if y.numel() and int(y.max()) >= n_classes:
        raise ValueError(
            f"y_true holds label {int(y.max())} but proba has only {n_classes} classes."
        )
    with torch.no_grad():
        conf, pred = p.max(dim=1)
        valid = y >= 0
        conf, correct = conf[valid], pred[valid] == y[valid]
    if conf.numel() == 0:
        raise ValueError("y_true holds no labelled pixels (all negative).")
    return conf.to(torch.float64), correct


def calibration_bins(
    confidence: Any, correct: Any, n_bins: int
) -> dict[str, np.ndarray]:
    """Equal-width bins of confidence: edges, counts, accuracy and confidence.

    Bin ``b`` holds confidences in ``(edges[b], edges[b + 1]]`` (the first bin
    also 0), as :func:`sklearn.calibration.calibration_curve`. Empty bins get
    NaN accuracy and confidence. Counting runs where ``confidence`` lives.
    """
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    hit = torch.as_tensor(correct, device=conf.device).to(torch.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    inner = torch.as_tensor(edges[1:-1], dtype=torch.float64, device=conf.device)
    ids = torch.bucketize(conf, inner, right=False)
    counts = torch.bincount(ids, minlength=n_bins).cpu().numpy()
    hits = torch.bincount(ids, weights=hit, minlength=n_bins).cpu().numpy()
    sums = torch.bincount(ids, weights=conf, minlength=n_bins).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(counts > 0, hits / counts, np.nan)
        mean_conf = np.where(counts > 0, sums / counts, np.nan)
    return {
        "edges": edges,
        "counts": counts,
        "accuracy": accuracy,
        "confidence": mean_conf,
    }


def ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    """``sum_b (n_b / n) * |accuracy_b - confidence_b|`` over non-empty bins."""
    counts = bins["counts"]
    filled = counts > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


def expected_calibration_error(y_true: Any, proba: Any, *, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence, a fraction.

    Samples (or pixels) are grouped in ``n_bins`` equal-width bins of their
    maximum probability, bin ``b`` holding confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (the first also 0, as
    :func:`sklearn.calibration.calibration_curve`); then
    ``ECE = sum_b (n_b / n) * |acc_b - conf_b|`` (Guo et al., 2017), where
    ``acc_b`` is the fraction of bin ``b`` whose top class is right and
    ``conf_b`` its mean confidence. 0 is perfect calibration.

    Parameters
    ----------
    y_true : array-like or torch.Tensor of int, (n,) or (N, H, W)
        True classes; negative labels (-1) are ignored.
    proba : array-like or torch.Tensor, (n, K) or (N, K, H, W)
        Class probabilities in [0, 1], e.g. ``LinearProbe.predict_proba``
        resized to the label size. Counting runs on its device.
    n_bins : int, default=15
        Number of bins (1 compares the overall accuracy with the mean
        confidence).

    Returns
    -------
    float
        In [0, 1].

    See Also
    --------
    skstego.plotting.plot_reliability_diagram : The bins drawn.

    References
    ----------
    .. [1] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger (2017). "On
       calibration of modern neural networks". ICML.

    Examples
    --------
    >>> from skstego.metrics import expected_calibration_error
    >>> proba = [[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.42, 0.58]]
    >>> round(expected_calibration_error([0, 1, 1, 1], proba, n_bins=5), 4)
    0.23
    """
    n_bins = check_n_bins(n_bins)
    conf, correct = confidence_and_correct(y_true, proba)
    return ece_from_bins(calibration_bins(conf, correct, n_bins))
