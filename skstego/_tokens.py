"""Token access for any input: count, sample, gather, batch and stream tokens.

A token is one row of 2-D input ``(n, C)`` or one pixel of 4-D maps
``(N, C, h, w)``, numbered image-major, then row-major over the grid (the
order of :func:`~skstego._device.maps_to_tokens`). Input is anything an
estimator accepts after :func:`~skstego._device.check_features`: a NumPy
array, a torch tensor, or on-disk :class:`~skstego._device.LazyFeatures`
(read slice by slice, each slice prefetched). Slices are sized by the one
streaming-memory policy, :func:`~skstego._device.batch_elements`.

Dask arrays are split by :mod:`skstego._dask`, which builds on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ._device import (
    LazyFeatures,
    as_tensor,
    batch_elements,
    is_torch,
    iter_slices,
    maps_to_tokens,
    rows_per_batch,
)

__all__ = [
    "SliceChunks",
    "gather_tokens",
    "n_tokens",
    "numpy_tokens",
    "read_rows",
    "sample_indices",
    "take_tokens",
    "token_batches",
    "token_tensor",
    "tokens_per_row",
]


def tokens_per_row(X: Any) -> int:
    """Tokens in one row of ``X``: 1 for 2-D tokens, ``h * w`` for 4-D maps."""
    return int(np.prod(X.shape[2:])) if len(X.shape) == 4 else 1


def n_tokens(X: Any) -> int:
    """Number of tokens of 2-D tokens or 4-D maps."""
    return int(X.shape[0]) * tokens_per_row(X)


def read_rows(X: Any, device: torch.device) -> int:
    """Rows of ``X`` per slice read for work on ``device`` (the "read" budget)."""
    return rows_per_batch(int(np.prod(X.shape[1:])), batch_elements(device, "read"))


def token_tensor(block: Any, device: torch.device) -> torch.Tensor:
    """A block of rows (NumPy or torch, 2-D or 4-D) as (m, C) float32 tokens
    on ``device``."""
    x = as_tensor(block, device)
    return maps_to_tokens(x) if x.ndim == 4 else x


def numpy_tokens(block: np.ndarray) -> np.ndarray:
    """A NumPy block of rows (2-D or 4-D) as (m, C) tokens, in token order."""
    if block.ndim == 4:
        b, c = block.shape[:2]
        block = block.reshape(b, c, -1).transpose(0, 2, 1)
    return block.reshape(-1, block.shape[-1])


def take_tokens(X: Any, idx: Any) -> Any:
    """Tokens number ``idx`` of an in-memory NumPy array or tensor.

    ``idx`` is a NumPy array for NumPy ``X``, a tensor on ``X``'s device for
    tensor ``X``. Returns (len(idx), C) in ``X``'s type and dtype.
    """
    if X.ndim == 2:
        return X[idx]
    n, c, h, w = X.shape
    return X.reshape(n, c, h * w)[idx // (h * w), :, idx % (h * w)]


def sample_indices(n_total: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` distinct token numbers below ``n_total``, sorted, drawn from ``gen``.

    Memory is O(m), not O(n_total): NumPy's ``Generator.choice`` without
    replacement uses a hash set (Floyd's algorithm) when ``m`` is a small
    fraction of ``n_total``, so a billion-token store costs no index array
    of its size.
    """
    seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    idx = np.random.default_rng(seed).choice(n_total, size=m, replace=False)
    return torch.from_numpy(np.sort(idx))


def gather_tokens(X: Any, idx: Any, device: torch.device) -> torch.Tensor:
    """Tokens number ``idx`` (sorted; None for all) of ``X`` as one (m, C)
    float32 tensor on ``device``.

    On-disk ``X`` (:class:`~skstego._device.LazyFeatures`) is read once,
    slice by slice, and the result filled on ``device`` as it goes: the host
    never holds more than a slice (and its prefetched successor).
    """
    if isinstance(X, LazyFeatures):
        return _gather_lazy(X, None if idx is None else _as_numpy_index(idx), device)
    if idx is None:
        return token_tensor(X, device)
    if is_torch(X):
        return as_tensor(take_tokens(X, torch.as_tensor(idx).to(X.device)), device)
    return as_tensor(take_tokens(X, _as_numpy_index(idx)), device)


def _as_numpy_index(idx: Any) -> np.ndarray:
    return idx.cpu().numpy() if is_torch(idx) else np.asarray(idx)


def _gather_lazy(
    X: LazyFeatures, idx: np.ndarray | None, device: torch.device
) -> torch.Tensor:
    per_row = tokens_per_row(X)
    size = n_tokens(X) if idx is None else len(idx)
    out = torch.empty(size, X.shape[1], device=device)
    filled = 0
    for sl in iter_slices(X.shape[0], read_rows(X, device)):
        lo, hi = sl.start * per_row, sl.stop * per_row
        if idx is not None:
            a, b = np.searchsorted(idx, [lo, hi])
            if a == b:
                continue
        xb = numpy_tokens(X[sl])
        if idx is not None:
            xb = xb[idx[a:b] - lo]
        if device.type == "cpu":  # one copy, cast on the way (as_tensor made two)
            out[filled : filled + xb.shape[0]].numpy()[...] = xb
        else:
            out[filled : filled + xb.shape[0]] = as_tensor(xb, device)
        filled += xb.shape[0]
    return out


def token_batches(
    X: Any, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``batch_size`` tokens of ``X`` on ``device``.

    ``X`` is read in slices of :func:`read_rows` rows; tokens left over at
    the end of a slice open the next batch, so the batches do not depend on
    the slice size (only the last one may be smaller).
    """
    carry = None
    for sl in iter_slices(X.shape[0], read_rows(X, device)):
        xb = token_tensor(X[sl], device)
        if carry is not None:
            xb = torch.cat([carry, xb])
        n_full = xb.shape[0] - xb.shape[0] % batch_size
        for start in range(0, n_full, batch_size):
            yield xb[start : start + batch_size]
        carry = xb[n_full:] if n_full < xb.shape[0] else None
    if carry is not None:
        yield carry


class SliceChunks:
    """Consecutive row slices of ``X``, read one after the other here.

    ``X`` is in memory (NumPy, torch) or on disk
    (:class:`~skstego._device.LazyFeatures`: the next slice is prefetched
    while one is computed on, so memory holds about two slices whatever the
    size of the input). The same interface as :class:`skstego._dask.DaskChunks`:

    * ``map(fn, *args)``: ``fn(block, *args)`` for every slice, lazily;
    * ``gather(idx, device)``: the tokens ``idx`` (sorted) on ``device``;

    Parameters
    ----------
    X : ndarray, torch.Tensor or LazyFeatures of shape (n, C) or (N, C, h, w)
    rows : int
        Rows per slice.
    progress : str or None
        Description of a progress bar over the slices of each pass.
    """

    def __init__(self, X: Any, rows: int, progress: str | None = None) -> None:
        self.X = X
        self.rows = int(rows)
        self.progress = progress

    def __len__(self) -> int:
        return -(-self.X.shape[0] // self.rows)

    def map(self, fn: Callable, *args: Any) -> Iterator:
        """``fn(slice, *args)`` for every slice, lazily: read the results once.

        Callers fold each result into running totals before the next slice
        is read: results kept across a pass, however small, would pin the
        heap pages each slice's temporaries were freed from, and memory
        would grow with the number of slices.
        """
        slices = iter_slices(self.X.shape[0], self.rows, progress=self.progress)
        return (fn(self.X[sl], *args) for sl in slices)

    def gather(self, idx: Any, device: torch.device) -> torch.Tensor:
        return gather_tokens(self.X, idx, device)
