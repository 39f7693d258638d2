"""Dask plumbing: row blocks, per-block work on the workers, lazy outputs.

When an estimator is given a :class:`dask.array.Array`, the work is split
along its row chunks and run by dask's current scheduler (the
:class:`distributed.Client` in use, when there is one), so tokens are read
and reduced where they live and only small statistics come back. This module
knows nothing of any algorithm:

* :class:`DaskChunks`: ``map(fn, *args)`` runs ``fn`` on every block as a
  dask task and returns the results (on the host), ``gather`` selects tokens
  on the workers. It has the interface of :class:`skstego._tokens.SliceChunks`
  (slices read here, for in-memory and on-disk input), so one estimator loop
  serves both; :func:`chunks_of` picks one.
* :func:`lazy_output`: the one decision point for dask input of
  ``transform`` / ``predict`` / ``predict_proba`` and friends: a lazy dask
  array mapped over the chunks (the fitted estimator, whose attributes are
  NumPy, is shipped to the workers and run on NumPy blocks there), or None
  when the input is not a dask array.

Layouts: 2-D tokens must be chunked along rows only and 4-D maps
``(N, C, h, w)`` along images only; other chunkings are rechunked first
(``X.rechunk({1: -1})`` and so on), which dask does lazily, chunk by chunk.
dask is an optional dependency (``pip install skstego[dask]``); this module
imports it only when given a dask array.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._device import dask_source, is_dask, to_host
from ._tokens import SliceChunks, read_rows, take_tokens, tokens_per_row

__all__ = [
    "DaskChunks",
    "chunks_of",
    "gather_tokens",
    "is_dask",
    "lazy_output",
    "map_method",
]


def _by_rows(X: Any) -> Any:
    """``X`` chunked along its first axis only (tokens or whole images)."""
    if any(len(c) > 1 for c in X.chunks[1:]):
        X = X.rechunk({axis: -1 for axis in range(1, X.ndim)})
    return X


def _blocks(X: Any) -> list:
    """One delayed NumPy block per row chunk of ``X``."""
    return list(_by_rows(X).to_delayed().ravel())


def _checked(block: Any) -> np.ndarray:
    """A block as C-contiguous float32 (float64 kept), checked for NaN/inf."""
    dtype = np.float64 if np.dtype(block.dtype) == np.float64 else np.float32
    block = np.ascontiguousarray(np.asarray(block), dtype=dtype)
    if not np.isfinite(block).all():
        raise ValueError(
            "Input X contains NaN or infinity (in a dask chunk); remove or "
            "impute those values before calling skstego."
        )
    return block


def _compute(tasks: list) -> list:
    import dask

    return list(dask.compute(*tasks))


def _on_host(block: Any, fn: Callable, args: tuple) -> Any:
    """``fn`` on a checked block; tensors in its result come back on the CPU."""
    return to_host(fn(_checked(block), *args))


class DaskChunks:
    """The row chunks of a dask array; per-chunk functions run as dask tasks.

    ``map(fn, *args)`` computes ``fn(block, *args)`` for every chunk (a
    checked NumPy block) with dask's current scheduler (on the workers of a
    ``distributed.Client``) and returns the results in order, their tensors
    on the CPU; ``gather(idx, device)`` returns the tokens ``idx`` (sorted),
    selected where the chunks live. Arguments travel to the workers with
    their tensors on the CPU.
    """

    def __init__(self, X: Any) -> None:
        self.X = _by_rows(X)
        self.blocks = _blocks(self.X)

    def __len__(self) -> int:
        return len(self.blocks)

    def map(self, fn: Callable, *args: Any) -> list:
        import dask

        task = dask.delayed(_on_host)
        args = to_host(args)
        call = uuid.uuid4().hex  # the tasks are named after ``fn``
        return _compute(
            [
                task(block, fn, args, dask_key_name=f"{fn.__name__}-{call}-{i}")
                for i, block in enumerate(self.blocks)
            ]
        )

    def gather(self, idx: Any, device: torch.device) -> torch.Tensor:
        """Tokens ``idx`` (sorted; None for all) on ``device``."""
        if idx is None:
            idx = np.arange(self.X.shape[0] * tokens_per_row(self.X))
        idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        return torch.from_numpy(gather_tokens(self.X, np.asarray(idx))).to(device)


def chunks_of(
    X: Any, device: torch.device, progress: str | None = None
) -> DaskChunks | SliceChunks:
    """The chunks a pass over ``X`` walks: those of a dask array (or of the
    dask array behind ``LazyFeatures``), else slices read here.

    ``device`` (where slices are computed on) sets the slice size;
    ``progress`` (a description) shows a bar over the slices of each pass.
    """
    source = X if is_dask(X) else dask_source(X)
    if source is not None:
        return DaskChunks(source)
    return SliceChunks(X, read_rows(X, device), progress)


def _block_take(block: Any, local: np.ndarray) -> np.ndarray:
    """Tokens number ``local`` (sorted) of one block."""
    return np.ascontiguousarray(take_tokens(_checked(block), local))


def gather_tokens(X: Any, idx: np.ndarray) -> np.ndarray:
    """Tokens number ``idx`` (sorted) of a dask array, selected on the workers.

    Each chunk's task returns only its selected tokens, so the traffic is
    ``len(idx)`` tokens, not the array.

    Returns
    -------
    ndarray of shape (len(idx), C)
        float32 (float64 kept).
    """
    import dask

    X = _by_rows(X)
    bounds = np.concatenate([[0], np.cumsum(X.chunks[0])]) * tokens_per_row(X)
    cuts = np.searchsorted(idx, bounds)
    task = dask.delayed(_block_take, pure=True)
    tasks = [
        task(block, idx[cuts[i] : cuts[i + 1]] - bounds[i])
        for i, block in enumerate(_blocks(X))
        if cuts[i] < cuts[i + 1]
    ]
    parts = _compute(tasks)
    if not parts:
        return np.empty((0, X.shape[1]), dtype=np.float32)
    return np.concatenate(parts)


# ------------------------------------------------------- transform / predict


def _call(block: np.ndarray, estimator: Any, method: str, kwargs: dict) -> np.ndarray:
    return np.asarray(getattr(estimator, method)(_checked(block), **kwargs))


def map_method(
    estimator: Any,
    method: str,
    X: Any,
    out_features: int,
    dtype: Any = np.float32,
    **kwargs: Any,
) -> Any:
    """``estimator.<method>(X)`` as a lazy dask array, mapped over row chunks.

    Parameters
    ----------
    estimator : fitted estimator
        Pickled to the workers (fitted attributes are NumPy) and called on
        each NumPy block.
    method : str
        "transform", "predict", ...
    X : dask.array.Array of shape (n, C) or (N, C, h, w)
    out_features : int
        Width of the output (axis 1); 0 when the method returns one value
        per token (labels), the channel axis then being dropped.
    dtype : dtype, default=np.float32
        dtype of the method's output (np.int64 for labels).
    **kwargs
        Passed to the method; ``size=(H, W)`` sets the output's map size.

    Returns
    -------
    dask.array.Array
        (n, out_features), (N, out_features, h, w), (n,) or (N, h, w).
    """
    check_is_fitted(estimator)
    # tensors in the arguments travel on the CPU (the estimator's own
    # pickling moves its tensors and modules there too): a worker without
    # this process's device can load them
    kwargs = to_host(kwargs)
    X = _by_rows(X)
    spatial = tuple((s,) for s in kwargs.get("size") or X.shape[2:])
    dtype = np.dtype(dtype)
    drop = {} if out_features else {"drop_axis": 1}
    width = ((out_features,),) if out_features else ()
    chunks = (X.chunks[0], *width, *spatial)
    return X.map_blocks(
        _call,
        estimator,
        method,
        kwargs,
        dtype=dtype,
        chunks=chunks,
        meta=np.empty((0,) * len(chunks), dtype),
        **drop,
    )


def lazy_output(
    estimator: Any,
    method: str,
    X: Any,
    out_features: int,
    dtype: Any = np.float32,
    **kwargs: Any,
) -> Any:
    """The answer of ``estimator.<method>(X)`` to dask input, else None.

    The one rule for dask input of a per-token method (``transform``,
    ``predict``, ``predict_proba``, ...): a lazy dask array mapped over the
    row chunks (see :func:`map_method`), nothing computed until the caller
    asks. Methods start with::

        out = lazy_output(self, "predict", X, 0, dtype=np.int64, size=size)
        if out is not None:
            return out

    Parameters
    ----------
    estimator, method, out_features, dtype, **kwargs
        As :func:`map_method`; arguments equal to the method's defaults may
        be left out.
    X : any
        The method's input, as given by the user.

    Returns
    -------
    dask.array.Array or None
        None when ``X`` is not a dask array (the method computes as usual).
    """
    if not is_dask(X):
        return None
    return map_method(estimator, method, X, out_features, dtype, **kwargs)
