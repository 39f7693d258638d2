"""LinearProbe on dask input: every pass over the data runs on the workers.

The features never leave the workers; what travels is small:

* the standardisation: each chunk's count, mean and sum of squared
  deviations of its labelled tokens, merged on the client (Chan et al.);
* L-BFGS: each evaluation of the loss computes every chunk's summed loss and
  gradient in parallel, reduced on the client (the same sums as in memory);
* Adam: each epoch is a chain of tasks, one per chunk in order, each making
  the Adam steps of its chunk (shuffled within it) on the worker that holds
  the chunk and handing the parameters, Adam's moments and the shuffling
  generator's state to the next: the steps of the streamed fit with the
  same chunks, at ``n_classes * (n_features + 1)`` values of traffic per
  chunk. Adam is sequential by nature, so one worker works at a time;
  ``solver="lbfgs"`` uses them all at once.

How close the dask fit is to the streamed fit of the same data, chunked
alike, on the same device:

* the shuffles are the same on every device: both draw them from a CPU
  :class:`torch.Generator` (its state is what travels between the tasks).
  They used to differ on CUDA, where the streamed fit drew from a CUDA
  generator, which gives other permutations for the same seed;
* the standardisation differs by float64 rounding (per-chunk moments merged
  here, one two-pass sum there), which can move the float32 mean and scale
  by an ulp; L-BFGS sums the chunks' float32 gradients in float64 here and
  in float32 there;
* on CUDA, label maps of another size than the features go through the
  bilinear upsampling's backward, which accumulates with atomic adds in no
  fixed order.

So the two agree to float32 rounding amplified by the optimisation, not
bit for bit: ``tests/test_dask.py`` holds them to ``rtol=1e-5`` on
``loss_curve_`` and ``rtol=1e-4, atol=1e-5`` on ``coef_`` (30 epochs).

The labels (encoded, -1 ignored) are split along the chunks of ``X`` and
persisted on the workers once per fit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from .._dask import _blocks, _by_rows, _checked, _compute
from .._device import as_tensor, maps_to_tokens, resolve_device
from .._moments import merge_moments, token_moments
from ._linear_objective import (
    Adam,
    Objective,
    adam_pass,
    chunk_objective,
    chunk_training_data,
    scale_from,
)

__all__ = ["DaskObjective"]


def _chunk_data(
    block: Any, labels: np.ndarray, same_size: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    xb = as_tensor(_checked(block), device)
    return chunk_training_data(xb, torch.as_tensor(labels), same_size)


def _block_moments(
    block: Any, labels: np.ndarray, same_size: bool
) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, float64 mean and squared deviations of a chunk's training tokens."""
    xb, _ = _chunk_data(block, labels, same_size, torch.device("cpu"))
    return token_moments(maps_to_tokens(xb) if xb.ndim == 4 else xb)


def _part(block: Any, labels: np.ndarray, spec: dict) -> tuple[Objective, Any]:
    """The chunk's in-memory objective on the worker's device."""
    device = resolve_device(spec["device"])
    xb, yb = _chunk_data(block, labels, spec["same_size"], device)
    mean = torch.as_tensor(spec["mean"]).to(device)
    scale = torch.as_tensor(spec["scale"]).to(device)
    return chunk_objective(
        xb, yb, spec["same_size"], mean, scale, spec["n_classes"]
    ), device


def _block_loss_grad(
    block: Any, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray, spec: dict
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Summed loss, labelled count and gradients of one chunk."""
    part, device = _part(block, labels, spec)
    w = torch.as_tensor(weight).to(device)
    b = torch.as_tensor(bias).to(device)
    total, count, gw, gb = part.full_loss_grad(w, b)
    return float(total), float(count), gw.cpu().numpy(), gb.cpu().numpy()


def _block_adam(block: Any, labels: np.ndarray, carry: dict, spec: dict) -> dict:
    """Adam's steps over one chunk, continuing from ``carry``; the new carry."""
    part, device = _part(block, labels, spec)
    weight, bias = (torch.tensor(p, device=device) for p in carry["params"])
    adam = Adam([weight, bias], lr=spec["lr"])
    adam.load(carry)
    gen = torch.Generator()
    gen.set_state(torch.from_numpy(carry["gen"]))
    with torch.no_grad():
        total, count = adam_pass(
            part.epoch(gen, spec["batch_size"], device),
            weight,
            bias,
            adam,
            spec["weight_decay"],
        )
    return {
        **adam.state(),
        "gen": gen.get_state().numpy(),
        "total": carry["total"] + float(total),
        "count": carry["count"] + float(count),
    }


class DaskObjective(Objective):
    """The cross-entropy objective over a dask array, computed on its workers.

    Parameters
    ----------
    X : dask.array.Array of shape (n, C) or (N, C, h, w)
        Chunked along rows (images); other chunkings are rechunked lazily.
    labels : torch.Tensor
        Encoded labels (-1 ignored), (n,) or (N, H, W), on the client.
    n_classes : int
    device : torch.device
        The client's device, where the parameters live between passes.
    worker_device : str or torch.device
        The estimator's ``device`` parameter, resolved on each worker (a
        worker may have a GPU where the client has none).
    moments : (mean, scale) or None, default=None
        The standardisation; None measures it from per-chunk moments.
    """

    remote_steps: ClassVar[bool] = True

    def __init__(
        self,
        X: Any,
        labels: torch.Tensor,
        n_classes: int,
        device: torch.device,
        worker_device: Any,
        moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        import dask

        X = _by_rows(X)
        self.blocks = _blocks(X)
        self.device = device
        self.worker_device = worker_device
        self.units = X.shape[0]
        self.same_size = X.ndim == 2 or tuple(labels.shape[-2:]) == tuple(X.shape[-2:])
        labels = labels.cpu()
        valid = labels >= 0
        self.n_labelled = int(valid.sum()) if self.same_size else labels.numel()
        self.counts = torch.bincount(labels[valid].reshape(-1), minlength=n_classes)
        bounds = np.cumsum(X.chunks[0])[:-1]
        parts = np.split(labels.numpy(), bounds)
        self.label_parts = dask.persist(*[dask.delayed(p) for p in parts])
        mean, scale = self._measure_moments() if moments is None else moments
        super().__init__(mean, scale, n_classes)

    def _spec(self, **extra: Any) -> dict:
        """What every task needs besides its chunk (small, sent per task)."""
        return {
            "device": self.worker_device,
            "same_size": self.same_size,
            "n_classes": self.n_classes,
            "mean": self.mean.cpu().numpy(),
            "scale": self.scale.cpu().numpy(),
            **extra,
        }

    def _measure_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation per feature, from per-chunk moments."""
        import dask

        task = dask.delayed(_block_moments, pure=True)
        parts = _compute(
            [
                task(b, lab, self.same_size)
                for b, lab in zip(self.blocks, self.label_parts, strict=True)
            ]
        )
        n, mean, m2 = merge_moments(parts)
        mean = torch.as_tensor(mean, device=self.device)
        return mean.float(), scale_from(torch.as_tensor(m2, device=self.device), n)

    def full_loss_grad(self, weight: torch.Tensor, bias: torch.Tensor):
        """Summed loss, count and gradients over every chunk, in parallel."""
        import dask

        task = dask.delayed(_block_loss_grad, pure=True)
        w, b, spec = weight.cpu().numpy(), bias.cpu().numpy(), self._spec()
        parts = _compute(
            [
                task(block, lab, w, b, spec)
                for block, lab in zip(self.blocks, self.label_parts, strict=True)
            ]
        )
        kw = {"dtype": torch.float64, "device": weight.device}
        total = torch.tensor(sum(p[0] for p in parts), **kw)
        count = torch.tensor(sum(p[1] for p in parts), **kw)
        grad_w = torch.as_tensor(sum(p[2].astype(np.float64) for p in parts))
        grad_b = torch.as_tensor(sum(p[3].astype(np.float64) for p in parts))
        return total, count, grad_w.to(weight), grad_b.to(bias)

    def adam_epoch(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        adam: Adam,
        gen: torch.Generator,
        batch_size: int,
        weight_decay: float,
    ) -> tuple[float, float]:
        """One epoch of Adam: a chain of per-chunk tasks; summed loss and count.

        ``weight``, ``bias``, ``adam`` and the CPU generator ``gen`` are
        updated in place, as by the in-memory epoch.
        """
        import dask

        spec = self._spec(lr=adam.lr, batch_size=batch_size, weight_decay=weight_decay)
        carry: Any = {
            **adam.state(),
            "gen": gen.get_state().numpy(),
            "total": 0.0,
            "count": 0.0,
        }
        task = dask.delayed(_block_adam, pure=True)
        for block, lab in zip(self.blocks, self.label_parts, strict=True):
            carry = task(block, lab, carry, spec)
        (carry,) = dask.compute(carry)
        adam.load(carry)  # adam.params are weight and bias
        gen.set_state(torch.from_numpy(carry["gen"]))
        return carry["total"], carry["count"]
