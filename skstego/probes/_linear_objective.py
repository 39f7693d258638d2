"""The linear probe's training objectives and its Adam optimiser.

One objective code for every path of :class:`~skstego.LinearProbe`:

* :class:`TokenObjective` (labelled tokens) and :class:`MapObjective` (label
  maps of another size than the feature maps) hold in-memory data;
* :class:`StreamedObjective` reads on-disk features chunk by chunk and makes
  each chunk one of those two;
* the dask objective (:mod:`._linear_dask`) builds the same per-chunk
  objectives on the workers (:func:`chunk_training_data`,
  :func:`chunk_objective`).

Every objective returns *sums* over a batch (loss, labelled count or weight,
gradients), so that mini-batch Adam steps (:func:`adam_pass`) and full-batch
L-BFGS passes share one code path. The model is trained in the standardised
parametrisation ``logits = ((x - mean) / scale) @ weight.T + bias``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .._device import (
    as_tensor,
    batch_elements,
    iter_slices,
    maps_to_tokens,
    rows_per_batch,
    tokens_to_maps,
)

__all__ = [
    "Adam",
    "MapObjective",
    "Objective",
    "StreamedObjective",
    "TokenObjective",
    "adam_pass",
    "chunk_objective",
    "chunk_training_data",
    "map_standardization",
    "positive",
    "scale_from",
    "sum_terms",
    "token_standardization",
]


class Adam:
    """Adam (Kingma and Ba) on a few tensors, updated in place.

    The same update as :class:`torch.optim.Adam` (checked: identical loss
    curves) without its per-step Python overhead, which dominates the small
    steps of a linear model, nor its first-use import of ``torch._dynamo``
    (about 2 s).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = params
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def state(self) -> dict[str, Any]:
        """Parameters, moments and step count as NumPy (to store or send)."""
        return {
            "params": [p.cpu().numpy() for p in self.params],
            "m": [m.cpu().numpy() for m in self.m],
            "v": [v.cpu().numpy() for v in self.v],
            "t": self.t,
        }

    @torch.no_grad()
    def load(self, state: dict[str, Any]) -> None:
        """Copy a :meth:`state` into the parameters and moments, in place."""
        for mine, theirs in zip(
            self.params + self.m + self.v,
            state["params"] + state["m"] + state["v"],
            strict=True,
        ):
            mine.copy_(torch.as_tensor(theirs))
        self.t = state["t"]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        """One update of the parameters from their gradients, in place."""
        self.t += 1
        beta1, beta2 = self.betas
        step = self.lr / (1.0 - beta1**self.t)
        root = (1.0 - beta2**self.t) ** 0.5
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            p.addcdiv_(m, v.sqrt().div_(root).add_(self.eps), value=-step)


class Objective:
    """Cross-entropy of a linear model on standardised features.

    The model is ``logits = z @ weight.T + bias`` with ``z = (x - mean) / scale``;
    :meth:`loss_grad` returns sums over a batch (loss, labelled count,
    gradients), so mini-batch steps and full-batch passes share one code path.
    Subclasses hold the data; those that measure the standardisation on the
    data (streamed, dask) do so in their constructor before calling this one.

    Parameters
    ----------
    mean, scale : torch.Tensor of shape (n_features,)
        The standardisation (float32, on the device of the data).
    n_classes : int
    """

    units: int
    n_labelled: int
    #: True when the objective runs Adam's steps itself, chunk by chunk
    #: where the data live (:class:`~._linear_dask.DaskObjective`).
    remote_steps: ClassVar[bool] = False

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, n_classes: int):
        self.n_classes = n_classes
        self.mean, self.scale = mean, scale
        self.inv = 1.0 / scale
        self.shift = -mean * self.inv

    def epoch(self, gen: torch.Generator, batch_size: int, device: torch.device):
        """``(objective, batch)`` pairs of one shuffled pass."""
        perm = torch.randperm(self.units, generator=gen, device=gen.device)
        for batch in self.batches(perm.to(device), batch_size):
            yield self, batch

    def raw(
        self, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters on raw features: (coef, intercept)."""
        return weight * self.inv, bias + weight @ self.shift

    def full_loss_grad(self, weight, bias):
        """Sums over all the data, in memory-bounded batches."""
        terms = (self.loss_grad(batch, weight, bias) for batch in self.full_batches())
        return sum_terms(terms, weight, bias)


class TokenObjective(Objective):
    """(n, C) tokens with a label each; hand-written gradients (no autograd)."""

    def __init__(self, tokens, labels, mean, scale, n_classes, weights=None):
        super().__init__(mean, scale, n_classes)
        self.tokens, self.labels = tokens, labels
        #: float32 weight per token (sample and class weights), or None
        self.weights = None if weights is None else weights.float()
        self.units = self.n_labelled = tokens.shape[0]
        self._minus_one = torch.full((1, 1), -1.0, device=tokens.device)

    def batches(self, perm, batch_size):
        for sl in iter_slices(self.units, batch_size):
            yield perm[sl]

    def full_batches(self):
        per_row = 2 * self.tokens.shape[1] + 3 * self.n_classes
        budget = batch_elements(self.tokens.device, "compute")
        yield from iter_slices(self.units, rows_per_batch(per_row, budget))

    @torch.no_grad()
    def loss_grad(self, batch, weight, bias):
        wb = None
        if isinstance(batch, slice):
            z = torch.addcmul(self.shift, self.tokens[batch], self.inv)
            yb = self.labels[batch][:, None]
            if self.weights is not None:
                wb = self.weights[batch]
        else:
            z = self.tokens.index_select(0, batch)  # a copy: standardise in place
            torch.addcmul(self.shift, z, self.inv, out=z)
            yb = self.labels.index_select(0, batch)[:, None]
            if self.weights is not None:
                wb = self.weights.index_select(0, batch)
        rows = z.shape[0]
        logp = torch.log_softmax(torch.addmm(bias, z, weight.T), dim=1)
        if wb is not None:
            loss = -(logp.gather(1, yb)[:, 0].double() @ wb.double())
            p = logp.clamp_(min=-60.0).exp_()
            p.scatter_add_(1, yb, self._minus_one.expand(rows, 1))
            p.mul_(wb[:, None])
            return loss, wb.sum(dtype=torch.float64), p.T @ z, p.sum(0)
        loss = -logp.gather(1, yb).sum()
        # d(cross-entropy)/d(logits) = softmax - one-hot. Probabilities below
        # exp(-60) are raised to it (a negligible change of the gradient):
        # smaller ones lead to subnormal floats in exp() and in the matrix
        # product, tens of times slower on CPUs once the model is confident.
        p = logp.clamp_(min=-60.0).exp_()
        p.scatter_add_(1, yb, self._minus_one.expand(rows, 1))
        return loss, rows, p.T @ z, p.sum(0)


class MapObjective(Objective):
    """(N, C, h, w) maps with (N, H, W) label maps of another size.

    Logits are upsampled bilinearly to the label size before the loss; batches
    hold whole images.
    """

    def __init__(self, maps, labels, mean, scale, n_classes, weights=None):
        super().__init__(mean, scale, n_classes)
        self.maps, self.labels = maps, labels
        #: float32 weight per pixel of the label maps (N, H, W), or None
        self.weights = None if weights is None else weights.float()
        self.size = tuple(labels.shape[-2:])
        self.units = maps.shape[0]
        self.n_labelled = labels.numel()

    def batches(self, perm, batch_size):
        images = max(1, batch_size // (self.size[0] * self.size[1]))
        for sl in iter_slices(self.units, images):
            yield perm[sl]

    def full_batches(self):
        _, c, h, w = self.maps.shape
        per_image = 2 * c * h * w + 4 * self.n_classes * self.size[0] * self.size[1]
        budget = batch_elements(self.maps.device, "compute")
        yield from iter_slices(self.units, rows_per_batch(per_image, budget))

    def loss_grad(self, batch, weight, bias):
        wb = None
        if isinstance(batch, slice):
            xb, yb = self.maps[batch], self.labels[batch]
            if self.weights is not None:
                wb = self.weights[batch]
        else:
            xb = self.maps.index_select(0, batch)
            yb = self.labels.index_select(0, batch)
            if self.weights is not None:
                wb = self.weights.index_select(0, batch)
        b, _, h, w = xb.shape
        z = torch.addcmul(self.shift, maps_to_tokens(xb), self.inv)
        with torch.enable_grad():
            w_ = weight.detach().requires_grad_()
            b_ = bias.detach().requires_grad_()
            logits = tokens_to_maps(torch.addmm(b_, z, w_.T), b, h, w)
            logits = F.interpolate(
                logits, size=self.size, mode="bilinear", align_corners=False
            )
            if wb is None:
                loss = F.cross_entropy(logits, yb, ignore_index=-1, reduction="sum")
                count = (yb >= 0).sum()
            else:
                per_pixel = F.cross_entropy(
                    logits, yb, ignore_index=-1, reduction="none"
                )
                wb = torch.where(yb >= 0, wb, 0.0)
                loss = (per_pixel * wb).sum()
                count = wb.sum(dtype=torch.float64)
            grad_w, grad_b = torch.autograd.grad(loss, [w_, b_])
        return loss.detach(), count, grad_w, grad_b


class StreamedObjective(Objective):
    """The objective over on-disk features, read chunk by chunk.

    Each chunk (consecutive rows or images, about
    ``batch_elements(device, "compute")`` values of features and labels)
    becomes an in-memory :class:`TokenObjective` (its labelled tokens) or
    :class:`MapObjective` (label maps of another size); an epoch shuffles
    within each chunk, chunks in order. ``labels`` (encoded, -1 ignored) stay
    where they are and are moved per chunk.

    Parameters
    ----------
    X : LazyFeatures
        On-disk features (n, C) or (N, C, h, w), sliced along the first axis.
    labels : torch.Tensor
        Encoded labels (-1 ignored), (n,) or (N, H, W).
    n_classes : int
    device : torch.device
        Where the chunks are computed.
    moments : (mean, scale) or None, default=None
        The standardisation; None measures it on the data (two streamed
        passes over the labelled tokens).
    """

    def __init__(
        self,
        X: Any,
        labels: torch.Tensor,
        n_classes: int,
        device: torch.device,
        moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.X, self.labels, self.device = X, labels, device
        self.units = X.shape[0]
        self.same_size = X.ndim == 2 or tuple(labels.shape[-2:]) == tuple(X.shape[-2:])
        per_row = int(np.prod(X.shape[1:])) + int(np.prod(labels.shape[1:]))
        self.rows = rows_per_batch(2 * per_row, batch_elements(device, "compute"))
        valid = labels >= 0
        self.n_labelled = int(valid.sum()) if self.same_size else labels.numel()
        self.counts = torch.bincount(labels[valid].reshape(-1), minlength=n_classes)
        mean, scale = self._measure_moments() if moments is None else moments
        super().__init__(mean, scale, n_classes)

    def chunks(self):
        """(tokens, labels) of the labelled tokens, or (maps, label maps)."""
        for sl in iter_slices(self.units, self.rows):
            xb = as_tensor(self.X[sl], self.device)
            yield chunk_training_data(xb, self.labels[sl], self.same_size)

    def _measure_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation per feature: two streamed passes."""
        c = self.X.shape[1]
        total = torch.zeros(c, dtype=torch.float64, device=self.device)
        n = 0
        for xb, _ in self.chunks():
            tokens = maps_to_tokens(xb) if xb.ndim == 4 else xb
            total += tokens.sum(0, dtype=torch.float64)
            n += tokens.shape[0]
        mean = total / max(n, 1)
        sq = torch.zeros(c, dtype=torch.float64, device=self.device)
        for xb, _ in self.chunks():
            tokens = maps_to_tokens(xb) if xb.ndim == 4 else xb
            sq += (tokens.double() - mean).square().sum(0)
        return mean.float(), scale_from(sq, n)

    def parts(self):
        for xb, yb in self.chunks():
            yield chunk_objective(
                xb, yb, self.same_size, self.mean, self.scale, self.n_classes
            )

    def epoch(self, gen, batch_size, device):
        for part in self.parts():
            yield from part.epoch(gen, batch_size, device)

    def full_loss_grad(self, weight, bias):
        terms = (part.full_loss_grad(weight, bias) for part in self.parts())
        return sum_terms(terms, weight, bias)


def chunk_training_data(
    xb: torch.Tensor, yb: torch.Tensor, same_size: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's (labelled tokens, labels), or (maps, label maps) of another size.

    ``yb`` (encoded, -1 ignored) is moved to the device of ``xb``.
    """
    yb = yb.to(xb.device)
    if not same_size:
        return xb, yb
    if xb.ndim == 4:
        xb, yb = maps_to_tokens(xb), yb.reshape(-1)
    keep = yb >= 0
    if not bool(keep.all()):
        xb, yb = xb[keep], yb[keep]
    return xb, yb


def chunk_objective(
    xb: torch.Tensor,
    yb: torch.Tensor,
    same_size: bool,
    mean: torch.Tensor,
    scale: torch.Tensor,
    n_classes: int,
) -> Objective:
    """The in-memory objective of one chunk from :func:`chunk_training_data`."""
    cls = TokenObjective if same_size else MapObjective
    return cls(xb, yb, mean, scale, n_classes)


def sum_terms(
    terms: Any, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum ``(loss, count, grad_w, grad_b)`` terms of batches or chunks.

    Loss and count accumulate in float64, the gradients in the dtype of
    ``weight`` and ``bias``.
    """
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    count = torch.zeros((), dtype=torch.float64, device=weight.device)
    grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for loss, n, gw, gb in terms:
        total += loss
        count += n
        grad_w += gw
        grad_b += gb
    return total, count, grad_w, grad_b


def adam_pass(
    steps: Any,
    weight: torch.Tensor,
    bias: torch.Tensor,
    adam: Adam,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam steps over ``(objective, batch)`` pairs; summed loss and count.

    ``weight`` and ``bias`` are updated in place. Used by every fit and, on
    dask input, by each chunk's task on the worker holding the chunk.
    """
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    count = torch.zeros((), dtype=torch.float64, device=weight.device)
    for part, batch in steps:
        loss, n, grad_w, grad_b = part.loss_grad(batch, weight, bias)
        n_ = positive(n)
        grad_w.div_(n_)
        grad_b.div_(n_)
        if weight_decay:
            grad_w.add_(weight, alpha=weight_decay)
        adam.step([grad_w, grad_b])
        total += loss
        count += n
    return total, count


def positive(n: Any) -> Any:
    """``n`` (a count or a sum of weights), or 1 where it is not positive."""
    if isinstance(n, torch.Tensor):
        return torch.where(n > 0, n, torch.ones_like(n))
    return n if n > 0 else 1


def scale_from(sq: torch.Tensor, n: int) -> torch.Tensor:
    """Standard deviation from centred sums of squares; 1 for constant features."""
    scale = (sq / (n if n > 0 else 1)).sqrt()
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    return scale.float()


def token_standardization(
    tokens: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per feature, float64 accumulation, chunked.

    With ``weights`` (float64, one per token) the weighted moments, so that
    integer weights standardise as repeated tokens do.
    """
    n, c = tokens.shape
    step = rows_per_batch(4 * c, batch_elements(tokens.device, "compute"))
    total = torch.zeros(c, dtype=torch.float64, device=tokens.device)
    for sl in iter_slices(n, step):
        if weights is None:
            total += tokens[sl].sum(0, dtype=torch.float64)
        else:
            total += weights[sl] @ tokens[sl].double()
    count = n if weights is None else float(weights.sum())
    mean = total / (count if count > 0 else 1)
    sq = torch.zeros(c, dtype=torch.float64, device=tokens.device)
    for sl in iter_slices(n, step):
        dev = (tokens[sl].double() - mean).square()
        sq += dev.sum(0) if weights is None else weights[sl] @ dev
    return mean.float(), scale_from(sq, count)


def map_standardization(
    maps: torch.Tensor, image_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per channel of (N, C, h, w) maps.

    With ``image_weights`` (float64, one per image) every pixel of an image
    counts with the image's weight.
    """
    n, c, h, w = maps.shape
    step = rows_per_batch(4 * c * h * w, batch_elements(maps.device, "compute"))
    total = torch.zeros(c, dtype=torch.float64, device=maps.device)
    for sl in iter_slices(n, step):
        if image_weights is None:
            total += maps[sl].sum((0, 2, 3), dtype=torch.float64)
        else:
            total += image_weights[sl] @ maps[sl].sum((2, 3), dtype=torch.float64)
    count = n * h * w if image_weights is None else float(image_weights.sum()) * h * w
    mean = total / (count if count > 0 else 1)
    sq = torch.zeros(c, dtype=torch.float64, device=maps.device)
    for sl in iter_slices(n, step):
        dev = (maps[sl].double() - mean[:, None, None]).square().sum((2, 3))
        sq += dev.sum(0) if image_weights is None else image_weights[sl] @ dev
    return mean.float(), scale_from(sq, count)
