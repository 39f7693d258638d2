"""Dense CRF refinement of segmentation probabilities, in-process.

STEGO refines its predictions with the fully connected CRF of Krähenbühl and
Koltun (2011), through pydensecrf in a process pool. This module runs the same
mean-field inference in the calling process, with no worker processes, on one
of two backends:

* ``"torch"``: batched over images, on the CPU or a GPU (below);
* ``"pydensecrf"``: the C++ implementation of Krähenbühl and Koltun's
  permutohedral-lattice CRF (``pip install pydensecrf2``), on the CPU, one
  image at a time, with the same model and parameters as STEGO's call.

``backend="auto"`` (the default) takes pydensecrf for the lattice on the CPU
when it can be imported (its C++ lattice is about twice as fast per core as
the torch one), and torch everywhere else: on CUDA, for the exact method, and
on the CPU without pydensecrf.

The model is the one pydensecrf builds for STEGO. With ``p`` the input
probabilities at image size, the unary is ``U = -log(clip(p, 1e-5, 1))``
(pydensecrf's ``unary_from_softmax``); the pairwise term is a Potts model with
two Gaussian kernels,

.. code-block:: text

    k_g(i, j) = exp(-|p_i - p_j|^2 / (2 gaussian_sxy^2))
    k_b(i, j) = exp(-|p_i - p_j|^2 / (2 bilateral_sxy^2)
                    - |I_i - I_j|^2 / (2 bilateral_srgb^2))

(``p`` pixel positions, ``I`` RGB values in 0-255). Mean-field inference
starts from ``Q = softmax(-U)`` and repeats ``n_iter`` times

.. code-block:: text

    Q <- softmax(-U + gaussian_compat * A_g Q + bilateral_compat * A_b Q)

over the classes of every pixel, where ``A = D^(-1/2) K D^(-1/2)`` is the
kernel matrix ``K`` with densecrf's default symmetric normalisation,
``D = diag(K 1)``. As in densecrf, the sums run over *all* pixels, the pixel
itself included (``k(i, i) = 1``); the paper's update leaves ``j = i`` out.

The torch backend has two ways to apply the bilateral matrix:

* ``method="exact"`` computes ``K`` block by block (rows of pixels against
  the whole image, a bounded block at a time, never the whole ``N x N``
  matrix): ``O(N^2)`` work per iteration, the reference.
* ``method="approx"`` filters on a permutohedral lattice (Adams, Baek and
  Davis 2010) built as densecrf builds it: splat to the ``d + 1`` vertices of
  each point's simplex, blur along the ``d + 1`` lattice directions with
  ``[1/2, 1, 1/2]``, slice back. ``O(N)`` work per iteration.

The Gaussian (appearance-free) kernel lives on the pixel grid, so it is
separable; both torch methods apply it exactly, as two 1-D filters. The
pydensecrf backend (``method="approx"`` only) puts it on a lattice too, as
densecrf does, with the features of densecrf's ``addPairwiseGaussian`` and
``addPairwiseBilateral`` (x, y; x, y and the colours in STEGO's BGR order).
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from ._device import (
    as_tensor,
    check_finite_tensor,
    is_torch,
    iter_slices,
    resolve_device,
    to_output,
)

__all__ = ["DenseCRF", "crf_refine"]

#: Smallest probability before the log, as pydensecrf's ``unary_from_softmax``.
_CLIP = 1e-5
#: ``method="auto"`` filters exactly up to this many pixels per image (32 x 32):
#: there the exact method takes about 0.2 s per image on one CPU core, six
#: times the lattice, and the gap grows linearly with the pixel count.
_AUTO_EXACT_PIXELS = 1024
#: Float32 values one block of work may hold: kernel rows of the exact method,
#: lattice values of a batch of images (about 128 MiB).
_BLOCK_ELEMENTS = 1 << 25
#: Largest lattice key code; larger lattices use row-wise ``unique`` instead.
_MAX_CODE = 1 << 62
#: Added to ``K 1`` before the inverse square root, as densecrf does.
_NORM_EPS = 1e-20
#: A 1-D Gaussian weight below this is dropped (relative to the centre's 1).
_TRUNCATE = 1e-8
#: Tolerance on the class sums of the input probabilities.
_SUM_ATOL = 1e-2

_CONSTRAINTS: dict = {
    "n_iter": [Interval(Integral, 0, None, closed="left")],
    "gaussian_sxy": [Interval(Real, 0, None, closed="neither")],
    "gaussian_compat": [Interval(Real, None, None, closed="neither")],
    "bilateral_sxy": [Interval(Real, 0, None, closed="neither")],
    "bilateral_srgb": [Interval(Real, 0, None, closed="neither")],
    "bilateral_compat": [Interval(Real, None, None, closed="neither")],
    "method": [StrOptions({"auto", "exact", "approx"})],
    "backend": [StrOptions({"auto", "torch", "pydensecrf"})],
    "device": [str, torch.device, None],
}


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------
def _check_images(images: Any) -> tuple[Any, bool]:
    """Validate images; return them (never copied) and whether they are NHWC.

    NumPy: uint8 (N, H, W, 3) or (H, W, 3). Torch: (N, 3, H, W) or (3, H, W),
    uint8 or float in [0, 1]. A single image gets a leading axis (a view).
    """
    if is_torch(images):
        if images.ndim not in (3, 4) or images.shape[-3] != 3:
            hint = (
                " Tensors are channels-first; use images.permute(0, 3, 1, 2)."
                if images.ndim in (3, 4) and images.shape[-1] == 3
                else ""
            )
            raise ValueError(
                "images as a tensor must have shape (N, 3, H, W) or (3, H, W), got "
                f"{tuple(images.shape)}.{hint}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(
                f"images must be uint8 or a floating-point tensor in [0, 1], got "
                f"dtype {images.dtype}."
            )
        if images.is_floating_point() and images.numel():
            check_finite_tensor(images, "images")
            lo, hi = images.aminmax()
            if float(lo) < -1e-3 or float(hi) > 1 + 1e-3:
                raise ValueError(
                    "Float images must lie in [0, 1] (got values in "
                    f"[{float(lo):.3g}, {float(hi):.3g}]); pass uint8 for 0-255 "
                    "images."
                )
        return (images[None] if images.ndim == 3 else images), False
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(
            "images as an array must have shape (N, H, W, 3) or (H, W, 3) (RGB), "
            f"got {images.shape}."
        )
    if images.dtype != np.uint8:
        raise TypeError(
            f"images as an array must be uint8 (0-255), got dtype {images.dtype}; "
            "convert with (images * 255).round().astype(np.uint8) for [0, 1] "
            "floats, or pass a float torch tensor (N, 3, H, W) in [0, 1]."
        )
    return (images[None] if images.ndim == 3 else images), True


def _check_proba_shape(proba: Any) -> Any:
    """Check the layout and dtype of probabilities; returns them (no copy)."""
    if not is_torch(proba) and not isinstance(proba, np.ndarray):
        proba = np.asarray(proba)
    if proba.ndim not in (3, 4):
        raise ValueError(
            "proba must have shape (N, K, H, W) or (K, H, W), got "
            f"{tuple(proba.shape)}."
        )
    if is_torch(proba):
        if proba.is_complex() or proba.dtype == torch.bool:
            raise TypeError(f"proba must be real-valued, got dtype {proba.dtype}.")
    elif proba.dtype.kind not in "fiu":
        raise TypeError(f"proba must be real-valued, got dtype {proba.dtype}.")
    if min(proba.shape) == 0:
        raise ValueError(f"proba is empty (shape {tuple(proba.shape)}).")
    return proba


def _check_proba_values(proba: Any) -> None:
    """Finite, non-negative, summing to 1 over the class axis (axis -3)."""
    if is_torch(proba):
        check_finite_tensor(proba, "proba")
    elif proba.dtype.kind == "f" and not np.isfinite(proba).all():
        raise ValueError(
            "Input proba contains NaN or infinity; pass finite probabilities."
        )
    low = float(proba.min())
    if low < 0:
        raise ValueError(
            f"proba has negative values (min {low:.3g}): pass probabilities, e.g. "
            "softmax(logits) over the class axis, not logits."
        )
    if is_torch(proba):
        sums = proba.sum(dim=-3, dtype=torch.float64)
    else:
        sums = proba.sum(axis=-3, dtype=np.float64)
    lo, hi = float(sums.min()), float(sums.max())
    if lo < 1 - _SUM_ATOL or hi > 1 + _SUM_ATOL:
        raise ValueError(
            "proba must sum to 1 over the class axis (axis -3), got sums in "
            f"[{lo:.4g}, {hi:.4g}]; pass softmax(logits) over the classes."
        )


# --------------------------------------------------------------------------
# kernels (inputs trusted: float32 on one device)
# --------------------------------------------------------------------------
def _filter_axis(X: torch.Tensor, sxy: float, axis: int) -> torch.Tensor:
    """Gaussian filter of (B, C, H, W) along H (axis 2) or W (axis 3).

    Zero outside the image: the kernel only couples pixels of the image.
    Weights below ``_TRUNCATE`` of the centre are dropped (for sxy = 1, pixels
    7 or more apart), which leaves the sums exact to float32. The axis is cut
    into blocks of outputs; each block is one small matrix product with the
    band of inputs it needs (``unfold`` makes the windows without a copy).
    """
    n = X.shape[axis]
    radius = math.ceil(sxy * math.sqrt(-2.0 * math.log(_TRUNCATE)))
    idx = torch.arange(n, device=X.device, dtype=torch.float32)
    if 2 * radius + 1 >= n:  # the kernel spans the axis: one dense matrix
        G = torch.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sxy) ** 2)
        eq = "ij,bcjw->bciw" if axis == 2 else "ij,bchj->bchi"
        return torch.einsum(eq, G, X)
    block = min(n, max(32, 4 * radius))
    n_blocks = -(-n // block)
    window = block + 2 * radius
    # G[l, o]: input l of a window (offset -radius) to output o of the block
    dist = (
        torch.arange(window, device=X.device, dtype=torch.float32)[:, None]
        - radius
        - idx[None, :block]
    )
    G = torch.exp(-0.5 * (dist / sxy) ** 2)
    G = G.masked_fill_(dist.abs() > radius, 0.0)
    extra = n_blocks * block - n
    # copy the (overlapping) windows out so that the product is one GEMM
    if axis == 3:
        windows = F.pad(X, (radius, radius + extra)).unfold(3, window, block)
        out = (windows.reshape(-1, window) @ G).view(*X.shape[:3], -1)
        return out[..., :n]
    windows = F.pad(X, (0, 0, radius, radius + extra)).unfold(2, window, block)
    out = windows.reshape(-1, window) @ G  # (B * C * n_blocks * W, block)
    out = out.view(X.shape[0], X.shape[1], n_blocks, X.shape[3], block)
    return out.transpose(-1, -2).flatten(2, 3)[:, :, :n]


class _GaussianKernel:
    """Symmetrically normalised appearance-free kernel on the pixel grid."""

    def __init__(self, shape: tuple[int, int], sxy: float, device) -> None:
        h, w = shape
        self.sxy = sxy
        ones = torch.ones(1, 1, h, w, device=device)
        self.norm = (self._filter(ones) + _NORM_EPS).rsqrt()  # (1, 1, H, W)

    def _filter(self, X: torch.Tensor) -> torch.Tensor:
        return _filter_axis(_filter_axis(X, self.sxy, 2), self.sxy, 3)

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        return self._filter(Q * self.norm).mul_(self.norm)


class _ExactBilateral:
    """Bilateral kernel applied exactly, a bounded block of rows at a time.

    Squared distances come from matrix products of augmented coordinates,
    ``[x, |x|^2, 1] . [-2 y, 1, |y|^2] = |x - y|^2``, centred by integers.
    For uint8 colours every term of the colour product is an integer below
    ``2^24``, so colour distances are exact in float32; the position product
    is scaled by ``-1 / (2 sxy^2)`` inside the second product (``baddbmm``),
    which rounds each term once. Exponents are thus exact to float32
    rounding (float colours add their own rounding, about ``1e-3`` grey
    levels squared), provided float32 products run in full float32 (torch's
    default; TF32 would round the terms).
    """

    def __init__(self, pos, colours, sxy, srgb, block_elements) -> None:
        self.pos_left, self.pos_right = _augment(pos)  # (B, N, 4) each
        self.col_left, self.col_right = _augment(colours)  # (B, N, 5) each
        self.a = 0.5 / (sxy * sxy)
        self.c = 0.5 / (srgb * srgb)
        b, n, _ = pos.shape
        self.rows = max(1, block_elements // max(1, b * n))
        ones = torch.ones(b, n, 1, device=pos.device)
        self.norm = (self._filter(ones) + _NORM_EPS).rsqrt()  # (B, N, 1)

    def _block(self, sl: slice) -> torch.Tensor:
        """Kernel rows ``sl`` against all pixels: (B, rows, N)."""
        E = torch.bmm(self.col_left[:, sl], self.col_right.mT)
        E.baddbmm_(self.pos_left[:, sl], self.pos_right.mT, beta=-self.c, alpha=-self.a)
        return E.exp_()

    def _filter(self, V: torch.Tensor) -> torch.Tensor:
        """``K V`` for V of shape (B, N, C)."""
        out = torch.empty_like(V)
        for sl in iter_slices(V.shape[1], self.rows):
            out[:, sl] = torch.bmm(self._block(sl), V)
        return out

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        b, k, h, w = Q.shape
        V = Q.reshape(b, k, h * w).mT * self.norm
        out = self._filter(V).mul_(self.norm)
        return out.mT.reshape(b, k, h, w)


class _Lattice:
    """Permutohedral lattice of B point sets (one per image), built at once.

    ``features`` (B, N, d) are the scaled features (positions / sxy, colours /
    srgb). The construction follows Adams, Baek and Davis (2010) as densecrf
    implements it (same elevation, scale, rounding, ranking, barycentric
    weights, blur and ``alpha``), vectorised; lattice points carry their image
    index, so images never mix. Points are found by packing keys into one
    int64 code and sorting (``torch.unique``, ``searchsorted``).
    """

    def __init__(self, features: torch.Tensor) -> None:
        b, n, d = features.shape
        device = features.device
        d1 = d + 1
        self.n_points = b * n
        f = features.reshape(b * n, d)
        inv_std = math.sqrt(2.0 / 3.0) * d1
        scale = torch.tensor(
            [inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)],
            device=device,
            dtype=torch.float32,
        )
        cf = f * scale  # (P, d)
        # elevated[j] = sum_{k >= j} cf[k] - j * cf[j - 1]; elevated[0] = sum cf
        tail = torch.cat([cf.flip(1).cumsum(1).flip(1), cf.new_zeros(b * n, 1)], dim=1)
        j = torch.arange(1, d1, device=device, dtype=torch.float32)
        elevated = tail.clone()
        elevated[:, 1:] -= j * cf
        # nearest remainder-0 point
        v = elevated / d1
        up = torch.ceil(v) * d1
        down = torch.floor(v) * d1
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = torch.round(rem0.sum(1) / d1).long()
        # rank of each coordinate of the residual (0 = largest), ties by index
        res = elevated - rem0
        larger = res[:, None, :] > res[:, :, None]
        tie = (res[:, None, :] == res[:, :, None]) & torch.ones(
            d1, d1, dtype=torch.bool, device=device
        ).tril(-1)
        rank = (larger | tie).sum(2) + total[:, None]
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + d1, torch.where(high, rank - d1, rank))
        rem0 = torch.where(low, rem0 + d1, torch.where(high, rem0 - d1, rem0))
        # barycentric weights of the d + 1 vertices
        v = (elevated - rem0) / d1
        bary = torch.zeros(b * n, d + 2, device=device)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d - rank + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d1]
        self.bary = bary[:, :d1]  # (P, d + 1)
        # vertices: rem0 + canonical simplex, d coordinates (the last is implied)
        r = torch.arange(d1, device=device)
        canonical = torch.where(
            r[None, :] <= d - r[:, None], r[:, None], r[:, None] - d1
        )
        keys = rem0[:, None, :d].long() + canonical[r[None, :, None], rank[:, None, :d]]
        image = torch.arange(b, device=device).repeat_interleave(n)
        self._index(keys, image, b, d)

    def _index(self, keys: torch.Tensor, image: torch.Tensor, b: int, d: int) -> None:
        """Lattice point of every vertex (``offsets``) and blur neighbours."""
        d1 = d + 1
        n_points = keys.shape[0]
        device = keys.device
        kmin = keys.amin(dim=(0, 1))
        span = (keys.amax(dim=(0, 1)) - kmin).tolist()
        # digits padded by d + 1 so that neighbours (+-d, +-1) stay in range
        radix = [s + 2 * d1 + 1 for s in span]
        strides = [1] * d
        for c in range(d - 2, -1, -1):
            strides[c] = strides[c + 1] * radix[c + 1]
        total = strides[0] * radix[0]
        # steps along the d + 1 lattice directions: key - 1, with + (d + 1) at j
        steps = [[-1] * d for _ in range(d1)]
        for jj in range(d):
            steps[jj][jj] = d
        if b * total < _MAX_CODE:
            stride_t = torch.tensor(strides, device=device)
            codes = ((keys - kmin + d1) * stride_t).sum(-1) + image[:, None] * total
            uniq, inverse = torch.unique(codes.flatten(), return_inverse=True)
            m = uniq.numel()
            neighbours = []
            for step in steps:
                delta = sum(s * t for s, t in zip(step, strides, strict=True))
                pair = []
                for target in (uniq + delta, uniq - delta):
                    idx = torch.searchsorted(uniq, target).clamp_(max=m - 1)
                    pair.append(torch.where(uniq[idx] == target, idx, m))
                neighbours.append(pair)
        else:
            rows = torch.cat(
                [image[:, None, None].expand(-1, d1, 1), keys], dim=2
            ).reshape(-1, d1)
            uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
            m = uniq.shape[0]
            step_t = torch.tensor(steps, device=device)
            step_t = torch.cat(
                [torch.zeros(d1, 1, dtype=torch.long, device=device), step_t], 1
            )
            targets = torch.cat(
                [
                    uniq,
                    (uniq[None] + step_t[:, None]).reshape(-1, d1),
                    (uniq[None] - step_t[:, None]).reshape(-1, d1),
                ]
            )
            _, inv = torch.unique(targets, dim=0, return_inverse=True)
            table = torch.full(
                (int(inv.max()) + 1,), m, device=device, dtype=torch.long
            )
            table[inv[:m]] = torch.arange(m, device=device)
            found = table[inv[m:]].view(2, d1, m)
            neighbours = [[found[0, jj], found[1, jj]] for jj in range(d1)]
        # number lattice points by their first vertex (points are in raster
        # order): neighbouring pixels then touch nearby rows, which keeps the
        # gathers of splat, blur and slice in cache
        first = torch.full((m,), inverse.numel(), device=device, dtype=torch.long)
        first.scatter_reduce_(
            0, inverse, torch.arange(inverse.numel(), device=device), "amin"
        )
        old = torch.argsort(first)  # old number of each new point
        rank = torch.empty_like(first)
        rank[old] = torch.arange(m, device=device)
        rank = F.pad(rank, (0, 1), value=m)  # "no neighbour" stays m
        neighbours = [(rank[n1[old]], rank[n2[old]]) for n1, n2 in neighbours]
        self._matrices(rank[inverse].view(n_points, d1), neighbours, m, d)

    def _matrices(self, offsets, neighbours, m: int, d: int) -> None:
        """Sparse (CSR) splat, blur and slice matrices.

        ``offsets`` (P, d + 1): lattice point of each vertex of each point;
        ``neighbours``: per direction, the two neighbours of every lattice
        point (``m`` where there is none).
        """
        device = offsets.device
        n_points, d1 = offsets.shape
        bary = self.bary
        # slice: point -> its d + 1 vertices, weighted (alpha folded in)
        cols, order = offsets.sort(dim=1)
        weights = bary.gather(1, order) * (1.0 / (1.0 + 2.0 ** (-d)))
        crow = torch.arange(0, n_points * d1 + 1, d1, device=device)
        self.slice = _csr(crow, cols.flatten(), weights.flatten(), (n_points, m))
        # splat: lattice point -> the points that have it as a vertex
        flat = offsets.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=m)
        self.splat = _csr(
            _crow(counts), order // d1, bary.flatten()[order], (m, n_points)
        )
        # blur along each direction: [1/2, 1, 1/2] over existing neighbours
        self.blur = []
        rows = torch.arange(m, device=device)
        half = torch.tensor([1.0, 0.5, 0.5], device=device).expand(m, 3)
        for n1, n2 in neighbours:
            cols, order = torch.stack([rows, n1, n2], dim=1).sort(dim=1)
            valid = cols < m
            self.blur.append(
                _csr(
                    _crow(valid.sum(1)),
                    cols[valid],
                    half.gather(1, order)[valid],
                    (m, m),
                )
            )

    def filter(self, V: torch.Tensor) -> torch.Tensor:
        """Splat, blur and slice values V of shape (P, C)."""
        values = self.splat @ V
        for blur in self.blur:
            values = blur @ values
        return self.slice @ values


def _crow(counts: torch.Tensor) -> torch.Tensor:
    """CSR row pointers from the number of entries of each row."""
    return F.pad(counts.cumsum(0), (1, 0))


def _csr(crow, cols, values, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


class _LatticeBilateral:
    """Bilateral kernel applied on a permutohedral lattice."""

    def __init__(self, pos, colours, sxy, srgb) -> None:
        # densecrf's feature order for STEGO's call: x, y, then the colours as
        # the reference passes them (B, G, R); the lattice is not invariant
        # to the order of its axes.
        feats = torch.cat([pos.flip(-1) / sxy, colours.flip(-1) / srgb], dim=-1)
        self.lattice = _Lattice(feats)
        b, n, _ = pos.shape
        ones = torch.ones(b * n, 1, device=pos.device)
        self.norm = (self.lattice.filter(ones) + _NORM_EPS).rsqrt()  # (P, 1)

    def __call__(self, Q: torch.Tensor) -> torch.Tensor:
        b, k, h, w = Q.shape
        V = Q.permute(0, 2, 3, 1).reshape(b * h * w, k) * self.norm
        out = self.lattice.filter(V).mul_(self.norm)
        return out.view(b, h, w, k).permute(0, 3, 1, 2)


def _augment(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, c) -> ``[X, |X|^2, 1]`` and ``[-2 X, 1, |X|^2]``, (B, N, c + 2)."""
    sq = (X * X).sum(-1, keepdim=True)
    one = torch.ones_like(sq)
    return torch.cat([X, sq, one], -1), torch.cat([-2.0 * X, one, sq], -1)


def _features(colours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel positions (B, N, 2) as (row, column) and colours (B, N, 3)."""
    b, h, w, _ = colours.shape
    device = colours.device
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    pos = grid.reshape(1, h * w, 2).expand(b, -1, -1).contiguous()
    return pos, colours.reshape(b, h * w, 3)


def _mean_field(
    colours: torch.Tensor, proba: torch.Tensor, params: dict, method: str
) -> torch.Tensor:
    """Refine (B, K, H, W) probabilities for (B, H, W, 3) colours in 0-255."""
    h, w = colours.shape[1:3]
    if proba.shape[-2:] != (h, w):
        proba = F.interpolate(proba, size=(h, w), mode="bilinear", align_corners=False)
    unary = proba.clamp(min=_CLIP, max=1.0).log()  # -U
    Q = torch.softmax(unary, dim=1)
    n_iter = params["n_iter"]
    if n_iter == 0:
        return Q
    kernels = []
    if params["gaussian_compat"] != 0:
        gauss = _GaussianKernel((h, w), float(params["gaussian_sxy"]), proba.device)
        kernels.append((float(params["gaussian_compat"]), gauss))
    if params["bilateral_compat"] != 0:
        pos, col = _features(colours)
        sxy, srgb = float(params["bilateral_sxy"]), float(params["bilateral_srgb"])
        if method == "exact":
            # centring by integers keeps uint8 colours integer: exact distances
            centre = pos.new_tensor([h // 2, w // 2])
            bilateral = _ExactBilateral(
                pos - centre, col - 128.0, sxy, srgb, _BLOCK_ELEMENTS
            )
        else:
            bilateral = _LatticeBilateral(pos, col, sxy, srgb)
        kernels.append((float(params["bilateral_compat"]), bilateral))
    for _ in range(n_iter):
        energy = unary.clone()
        for compat, kernel in kernels:
            energy.add_(kernel(Q), alpha=compat)
        Q = torch.softmax(energy, dim=1)
    return Q


def _images_per_batch(n_pixels: int, n_classes: int, method: str) -> int:
    if method == "exact":
        return (
            1
            if n_pixels * n_pixels >= _BLOCK_ELEMENTS
            else max(1, _BLOCK_ELEMENTS // (n_pixels * n_pixels))
        )
    # lattice: offsets and weights of 6 vertices per pixel, values of K classes
    per_image = n_pixels * (4 * n_classes + 24)
    return max(1, _BLOCK_ELEMENTS // per_image)


def _pydensecrf() -> Any:
    """The ``pydensecrf.densecrf`` module, or None when it cannot be imported."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        return None
    return dcrf


def _resolve(params: dict, n_pixels: int) -> tuple[str, str, torch.device]:
    """The backend, the method and the device a call runs with.

    ``"auto"`` takes pydensecrf where it applies (the lattice, on the CPU,
    pydensecrf importable) and torch everywhere else.
    """
    device = resolve_device(params["device"])
    method, backend = params["method"], params["backend"]
    if backend == "pydensecrf":
        if method == "exact":
            raise ValueError(
                "backend='pydensecrf' has only the permutohedral lattice; pass "
                "method='approx' (or 'auto'), or backend='torch' for the exact "
                "method."
            )
        if device.type != "cpu":
            raise ValueError(
                f"backend='pydensecrf' runs on the CPU, but device is {device}; "
                "pass device='cpu', or backend='torch' (or 'auto') to run on "
                f"{device}."
            )
        if _pydensecrf() is None:
            raise ImportError(
                "backend='pydensecrf' needs pydensecrf, which is not installed: "
                "pip install pydensecrf2 (it builds the C++ extension), or pass "
                "backend='torch'."
            )
        return "pydensecrf", "approx", device
    if method == "auto":
        method = "exact" if n_pixels <= _AUTO_EXACT_PIXELS else "approx"
    if (
        backend == "auto"
        and method == "approx"
        and device.type == "cpu"
        and _pydensecrf() is not None
    ):
        return "pydensecrf", method, device
    return "torch", method, device


def _check_inputs(images: Any, proba: Any) -> tuple[Any, bool, Any, bool]:
    """Validated images (NHWC or not) and (N, K, h, w) probabilities."""
    images, nhwc = _check_images(images)
    proba = _check_proba_shape(proba)
    single = proba.ndim == 3
    proba4 = proba[None] if single else proba
    if images.shape[0] != proba4.shape[0]:
        raise ValueError(
            f"images and proba hold different numbers of images: {images.shape[0]} "
            f"and {proba4.shape[0]}."
        )
    _check_proba_values(proba)
    h, w = images.shape[1:3] if nhwc else images.shape[2:4]
    if h * w == 0:
        raise ValueError(f"images are empty (size {h} x {w}).")
    return images, nhwc, proba4, single


def _colours(img: Any, nhwc: bool, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) float32 colours in 0-255 on ``device``."""
    if nhwc:
        return as_tensor(img, device).contiguous()
    colours = as_tensor(img, device).permute(0, 2, 3, 1)
    if img.is_floating_point():
        colours = colours * 255.0
    return colours.contiguous()


def _refine_torch(
    images: Any, nhwc: bool, proba4: Any, params: dict, method: str, device
) -> torch.Tensor:
    """Mean-field on torch, in batches of images; (N, K, H, W) float32."""
    h, w = images.shape[1:3] if nhwc else images.shape[2:4]
    n, k = proba4.shape[0], proba4.shape[1]
    outputs = []
    for sl in iter_slices(n, _images_per_batch(h * w, k, method)):
        colours = _colours(images[sl], nhwc, device)
        pb = as_tensor(proba4[sl], device)
        Q = _mean_field(colours, pb, params, method)
        outputs.append(Q if is_torch(proba4) else Q.cpu())
    return torch.cat(outputs) if len(outputs) != 1 else outputs[0]


def _refine_pydensecrf(
    images: Any, nhwc: bool, proba4: Any, params: dict
) -> torch.Tensor:
    """Mean-field in pydensecrf's C++ code, image by image; (N, K, H, W) float32.

    The model is the one STEGO's ``dense_crf`` builds: ``unary_from_softmax``
    (``-log(clip(p, 1e-5, 1))``), ``addPairwiseGaussian`` and
    ``addPairwiseBilateral`` (the BGR image), Potts compatibilities, diagonal
    kernels, symmetric normalisation. The kernels are added through
    ``addPairwiseEnergy`` with the very features those two methods compute
    (float32 ``x / sxy``, ``y / sxy``, ``colour / srgb``), so that float
    images keep their fractional colours; for uint8 images the result is
    bit for bit STEGO's.
    """
    dcrf = _pydensecrf()
    cpu = torch.device("cpu")
    h, w = images.shape[1:3] if nhwc else images.shape[2:4]
    n, k = proba4.shape[0], proba4.shape[1]
    n_pixels = h * w
    rows, cols = np.mgrid[:h, :w].astype(np.float32)
    xy = np.stack([cols.ravel(), rows.ravel()])  # (2, N): x (column), then y
    gauss_compat = float(params["gaussian_compat"])
    bilateral_compat = float(params["bilateral_compat"])
    gauss = np.ascontiguousarray(xy / np.float32(params["gaussian_sxy"]))
    bilateral = np.empty((5, n_pixels), dtype=np.float32)
    bilateral[:2] = xy / np.float32(params["bilateral_sxy"])
    srgb = np.float32(params["bilateral_srgb"])
    out = torch.empty(n, k, h, w)
    for i in range(n):
        p = as_tensor(proba4[i : i + 1], cpu)
        if p.shape[-2:] != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        # NumPy's log, as unary_from_softmax (torch's may differ in the last bit)
        p = np.ascontiguousarray(p[0].detach().reshape(k, n_pixels).numpy())
        unary = np.log(np.clip(p, _CLIP, 1.0))
        crf = dcrf.DenseCRF(n_pixels, k)
        crf.setUnaryEnergy(np.negative(unary, out=unary))
        if gauss_compat != 0:
            crf.addPairwiseEnergy(gauss, compat=gauss_compat)
        if bilateral_compat != 0:
            # colours in STEGO's (BGR) order, as pydensecrf's features
            bgr = _colours(images[i : i + 1], nhwc, cpu)[0].flip(-1)
            bilateral[2:] = bgr.reshape(n_pixels, 3).T.numpy() / srgb
            crf.addPairwiseEnergy(bilateral, compat=bilateral_compat)
        Q = np.asarray(crf.inference(int(params["n_iter"])), dtype=np.float32)
        out[i] = torch.from_numpy(Q.reshape(k, h, w))
    return out


def _refine(
    images: Any, proba: Any, params: dict
) -> tuple[np.ndarray | torch.Tensor, str]:
    """Validated parameters; checks the arrays and runs mean-field.

    Returns the refined probabilities and the backend that computed them.
    """
    images, nhwc, proba4, single = _check_inputs(images, proba)
    h, w = images.shape[1:3] if nhwc else images.shape[2:4]
    backend, method, device = _resolve(params, h * w)
    with torch.no_grad():
        if backend == "pydensecrf":
            out = _refine_pydensecrf(images, nhwc, proba4, params)
        else:
            out = _refine_torch(images, nhwc, proba4, params, method, device)
    if single:
        out = out[0]
    return to_output(out.contiguous(), proba), backend


def _label_output(Q: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if is_torch(Q):
        return Q.argmax(dim=-3)
    return Q.argmax(axis=-3).astype(np.int64)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
@validate_params(
    {"images": "no_validation", "proba": "no_validation", **_CONSTRAINTS},
    prefer_skip_nested_validation=True,
)
def crf_refine(
    images: Any,
    proba: Any,
    *,
    n_iter: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
    method: str = "auto",
    backend: str = "auto",
    device: str | torch.device | None = "auto",
) -> np.ndarray | torch.Tensor:
    """Refine segmentation probabilities with a fully connected CRF.

    Mean-field inference of the dense CRF of Krähenbühl and Koltun (2011) with
    a Potts model, an appearance-free Gaussian kernel and a bilateral kernel,
    as STEGO's post-processing runs it with pydensecrf (the defaults are
    STEGO's). Runs in-process: in pydensecrf's C++ code on the CPU when it
    is installed, else on torch, batched over images, on ``device`` (see
    ``backend``). See :class:`DenseCRF` for the model, the backends, the
    methods and their accuracy.

    Parameters
    ----------
    images : ndarray of shape (N, H, W, 3) or (H, W, 3), uint8; or torch.Tensor \
            of shape (N, 3, H, W) or (3, H, W), uint8 or float in [0, 1]
        RGB images.
    proba : ndarray or torch.Tensor of shape (N, K, h, w) or (K, h, w)
        Class probabilities, non-negative and summing to 1 over the class
        axis (a softmax). When ``(h, w)`` differs from the image size they
        are resized bilinearly (``align_corners=False``) to ``(H, W)`` first,
        as the reference does with its scores; the result has the image size.
    n_iter : int, default=10
        Mean-field iterations, >= 0. ``0`` returns the input, clipped at
        ``1e-5`` and normalised.
    gaussian_sxy : float, default=1.0
        Standard deviation, in pixels, of the appearance-free kernel.
    gaussian_compat : float, default=3.0
        Potts weight of the appearance-free kernel (0 leaves it out).
    bilateral_sxy : float, default=67.0
        Spatial standard deviation, in pixels, of the bilateral kernel.
    bilateral_srgb : float, default=3.0
        Colour standard deviation, in grey levels (0-255), of the bilateral
        kernel.
    bilateral_compat : float, default=4.0
        Potts weight of the bilateral kernel (0 leaves it out).
    method : {"auto", "exact", "approx"}, default="auto"
        How the bilateral kernel is applied: exactly (``O(N^2)`` per
        iteration in ``N = H * W`` pixels, in bounded blocks), on a
        permutohedral lattice (``O(N)``), or ``"auto"``: exact up to 1024
        pixels (32 x 32), the lattice above.
    backend : {"auto", "torch", "pydensecrf"}, default="auto"
        Who computes. ``"pydensecrf"``: pydensecrf's C++ lattice, on the
        CPU, one image at a time (``method`` ``"approx"`` or ``"auto"``;
        needs ``pip install pydensecrf2``). ``"torch"``: this module's torch
        code, batched, on ``device``. ``"auto"``: pydensecrf when the
        lattice runs on the CPU and pydensecrf can be imported, torch
        otherwise (on CUDA, for the exact method, without pydensecrf).
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where to compute; ``"auto"`` is CUDA when available, else the CPU.

    Returns
    -------
    refined : ndarray or torch.Tensor of shape (N, K, H, W) or (K, H, W), float32
        Refined probabilities, summing to 1 over the classes; NumPy for NumPy
        ``proba``, torch on ``device`` for torch ``proba``.

    Raises
    ------
    ValueError
        For images or probabilities of the wrong shape, type or values, and
        for ``backend="pydensecrf"`` with ``method="exact"`` or a device other
        than the CPU.
    ImportError
        For ``backend="pydensecrf"`` when pydensecrf is not installed.

    See Also
    --------
    DenseCRF : The same as an object, with ``predict`` for label maps.

    References
    ----------
    .. [1] P. Krähenbühl and V. Koltun, "Efficient Inference in Fully
           Connected CRFs with Gaussian Edge Potentials", NIPS 2011.
    .. [2] A. Adams, J. Baek and M. A. Davis, "Fast High-Dimensional Filtering
           Using the Permutohedral Lattice", Eurographics 2010.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.postprocess import crf_refine
    >>> images = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    >>> images[:, :, 8:] = 200  # two flat regions
    >>> proba = np.full((1, 2, 16, 16), 0.5, dtype=np.float32)
    >>> proba[:, 0, :, :6], proba[:, 1, :, :6] = 0.8, 0.2  # confident on the left
    >>> proba[:, 0, :, 10:], proba[:, 1, :, 10:] = 0.3, 0.7  # and on the right
    >>> refined = crf_refine(images, proba, device="cpu")
    >>> refined.shape, refined.dtype
    ((1, 2, 16, 16), dtype('float32'))
    >>> refined[0].argmax(0)[0].tolist()  # the uncertain middle follows the colours
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    """
    params = {
        "n_iter": n_iter,
        "gaussian_sxy": gaussian_sxy,
        "gaussian_compat": gaussian_compat,
        "bilateral_sxy": bilateral_sxy,
        "bilateral_srgb": bilateral_srgb,
        "bilateral_compat": bilateral_compat,
        "method": method,
        "backend": backend,
        "device": device,
    }
    return _refine(images, proba, params)[0]


class DenseCRF(BaseEstimator):
    """Fully connected CRF post-processing as an object.

    Holds the parameters of :func:`crf_refine` (scikit-learn style, so
    ``get_params``, ``set_params``, ``clone`` and ``repr`` work) and applies
    them with :meth:`refine` (probabilities) or :meth:`predict` (label maps).
    Nothing is learnt: there is no ``fit``.

    The model (see the module docstring for the formulas) is densecrf's as
    pydensecrf runs it for STEGO: unary ``-log(clip(p, 1e-5, 1))``, Potts
    compatibility, ``Q <- softmax(-U + sum_k compat_k A_k Q)`` with
    ``A = D^(-1/2) K D^(-1/2)`` (symmetric normalisation) and the pixel's own
    term included in ``K Q``.

    Two backends compute it. On the CPU, when pydensecrf is installed
    (``pip install pydensecrf2``), ``backend="auto"`` hands the lattice to
    pydensecrf's C++ code, one image at a time, with STEGO's very calls;
    ``backend_`` then reads ``"pydensecrf"``. Elsewhere (on CUDA, for
    the exact method of small images, without pydensecrf) the torch code of
    this module runs, batched over images, and ``backend_`` reads
    ``"torch"``.

    Parameters
    ----------
    n_iter : int, default=10
        Mean-field iterations, >= 0.
    gaussian_sxy : float, default=1.0
        Standard deviation, in pixels, of the appearance-free kernel.
    gaussian_compat : float, default=3.0
        Potts weight of the appearance-free kernel (0 leaves it out).
    bilateral_sxy : float, default=67.0
        Spatial standard deviation, in pixels, of the bilateral kernel.
    bilateral_srgb : float, default=3.0
        Colour standard deviation (0-255 grey levels) of the bilateral kernel.
    bilateral_compat : float, default=4.0
        Potts weight of the bilateral kernel (0 leaves it out).
    method : {"auto", "exact", "approx"}, default="auto"
        ``"exact"``: the bilateral kernel matrix, in blocks of rows (at most
        about 2^25 float32 values at once), ``O(N^2)`` per iteration.
        ``"approx"``: a permutohedral lattice, ``O(N)``. ``"auto"``: exact up
        to 1024 pixels (32 x 32), the lattice above.
    backend : {"auto", "torch", "pydensecrf"}, default="auto"
        ``"pydensecrf"``: pydensecrf's C++ lattice, on the CPU only, image by
        image, single-threaded (``method`` must be ``"approx"`` or
        ``"auto"``). ``"torch"``: the torch code, batched, on ``device``.
        ``"auto"``: pydensecrf when the lattice runs on the CPU and
        pydensecrf can be imported, else torch.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where to compute, resolved at each call.

    Attributes
    ----------
    backend_ : {"torch", "pydensecrf"}
        The backend of the last :meth:`refine` or :meth:`predict` call (set
        by the call; there is no ``fit``).

    See Also
    --------
    crf_refine : The same as a function.

    Notes
    -----
    The torch code applies the Gaussian kernel exactly with both methods
    (pydensecrf puts it on a lattice of its own): it is separable
    on the pixel grid (two 1-D filters; weights below ``1e-8`` of the centre
    are dropped, below float32 resolution of the sums).

    The lattice is densecrf's: the same elevation, scale
    (``sqrt(2/3) (d + 1)``), rounding, barycentric weights, blur
    (``[1/2, 1, 1/2]`` along each of the ``d + 1`` directions) and slicing
    constant, with the features in densecrf's order for STEGO's call
    (x, y, then the colours B, G, R), so ``method="approx"`` reproduces
    pydensecrf's bilateral message (10 iterations of a bilateral-only CRF
    on 64 x 64 scenes agree with pydensecrf to 3e-5). Its kernel only
    approximates the Gaussian, and the error is largest on small images,
    where the whole image spans a fraction of a lattice cell in position.
    Measured with STEGO's parameters on synthetic scenes with noisy
    unaries: at 32 x 32 (3 to 5 classes) refined probabilities differ from
    the exact ones by 0.004 to 0.013 on average and labels agree on 97 to
    99.5 % of the pixels (a few pixels near decisions flip, so the largest
    difference is close to 1); at 64 x 64 and 96 x 96 (27 classes) labels
    agree on 99.98 % and 99.995 %.

    The torch backend processes images in batches (one lattice for the
    batch, images never mixed); memory per batch is bounded by about 2^25
    float32 values per block plus the lattice itself. The pydensecrf
    backend refines one image at a time on one thread (pydensecrf holds
    the GIL, so threads would not help). Everything runs in the calling
    process: no worker pool.

    Speed (``benchmarks/bench_crf.py``, 320 x 320, 27 classes, 10
    iterations, shared 2-core CPU, CPU time per image, one thread):
    pydensecrf about 0.7 s, the torch lattice about 1.5 s. Per phase, the
    torch lattice is construction 0.32 s (pydensecrf 0.12 s) and 0.085 s
    per bilateral iteration (pydensecrf about 0.045 s for both kernels);
    its six blur directions alone cost as much as the gathers they need
    (about 0.05 s), so no rearrangement of the torch code reaches the C++
    lattice on a CPU core, hence ``backend="auto"``. The torch code runs
    unchanged on a GPU (sparse matrix products for the lattice), batched
    over images.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.base import clone
    >>> from skstego.postprocess import DenseCRF
    >>> crf = DenseCRF(n_iter=5, device="cpu")
    >>> crf
    DenseCRF(device='cpu', n_iter=5)
    >>> clone(crf).get_params()["n_iter"]
    5
    >>> images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    >>> images[:, :, 8:] = 200
    >>> proba = np.full((2, 2, 16, 16), 0.5, dtype=np.float32)
    >>> proba[:, 0, :, :6], proba[:, 1, :, :6] = 0.8, 0.2
    >>> proba[:, 0, :, 10:], proba[:, 1, :, 10:] = 0.3, 0.7
    >>> labels = crf.predict(images, proba)
    >>> labels.shape, labels.dtype
    ((2, 16, 16), dtype('int64'))
    >>> labels[:, :, 8:].min(), labels[:, :, :8].max()
    (np.int64(1), np.int64(0))
    """

    _parameter_constraints: ClassVar[dict] = _CONSTRAINTS

    def __init__(
        self,
        n_iter: int = 10,
        *,
        gaussian_sxy: float = 1.0,
        gaussian_compat: float = 3.0,
        bilateral_sxy: float = 67.0,
        bilateral_srgb: float = 3.0,
        bilateral_compat: float = 4.0,
        method: str = "auto",
        backend: str = "auto",
        device: str | torch.device | None = "auto",
    ) -> None:
        self.n_iter = n_iter
        self.gaussian_sxy = gaussian_sxy
        self.gaussian_compat = gaussian_compat
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.bilateral_compat = bilateral_compat
        self.method = method
        self.backend = backend
        self.device = device

    def refine(self, images: Any, proba: Any) -> np.ndarray | torch.Tensor:
        """Refined probabilities; see :func:`crf_refine`.

        Parameters
        ----------
        images : ndarray (N, H, W, 3) uint8 or torch.Tensor (N, 3, H, W)
            RGB images (or one image without the leading axis); tensors may be
            float in [0, 1].
        proba : ndarray or torch.Tensor of shape (N, K, h, w) or (K, h, w)
            Class probabilities, resized bilinearly to the image size if
            needed.

        Returns
        -------
        refined : ndarray or torch.Tensor of shape (N, K, H, W) or (K, H, W)
            float32 probabilities, the array type of ``proba``.
        """
        self._validate_params()
        refined, self.backend_ = _refine(images, proba, self.get_params())
        return refined

    def predict(self, images: Any, proba: Any) -> np.ndarray | torch.Tensor:
        """Label maps: the class of highest refined probability.

        Parameters
        ----------
        images : ndarray (N, H, W, 3) uint8 or torch.Tensor (N, 3, H, W)
            RGB images, as for :meth:`refine`.
        proba : ndarray or torch.Tensor of shape (N, K, h, w) or (K, h, w)
            Class probabilities.

        Returns
        -------
        labels : ndarray or torch.Tensor of shape (N, H, W) or (H, W), int64
            NumPy for NumPy ``proba``, torch on the device for torch ``proba``.
        """
        return _label_output(self.refine(images, proba))
