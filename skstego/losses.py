"""STEGO's correspondence-distillation loss as plain functions.

STEGO (Hamilton et al., ICLR 2022) trains a segmentation head so that the
correlation of its codes follows the correlation of frozen DINO features. For
two feature maps ``f1``, ``f2`` and their codes ``c1``, ``c2``:

1. ``S x S`` points per image are read by bilinear sampling at uniformly random
   coordinates in ``[-1, 1]^2`` (:func:`random_coords`, :func:`sample_points`);
2. ``F = corr(f1, f2)`` and ``Cc = corr(c1, c2)`` are correlations of the
   channel-normalised sampled maps (:func:`correlation`); ``F`` carries no
   gradient and, with ``pointwise=True``, is centred per query point;
3. ``loss(shift) = mean(-clamp(Cc) * (F - shift))``
   (:func:`correlation_loss`).

:func:`stego_loss` adds the three terms of the reference training objective:
the image with itself (intra), with a K-NN partner (inter) and with other
images of the batch (negatives, via :func:`derangement`).

Every function takes explicit arguments (no configuration object) and works
on any device and floating dtype; randomness comes from an optional
``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "correlation",
    "correlation_loss",
    "derangement",
    "random_coords",
    "sample_points",
    "stego_loss",
]


def _check_4d(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be 4-D (batch, channels, height, width), got "
            f"{x.ndim}-D with shape {tuple(x.shape)}."
        )


def _check_pair(
    a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, *, dims: str
) -> None:
    """Check that ``a`` and ``b`` agree on the axes named in ``dims``."""
    axes = {"batch": (0,), "channels": (1,), "spatial": (2, 3)}
    for what in dims.split(","):
        idx = axes[what]
        sa = tuple(a.shape[i] for i in idx)
        sb = tuple(b.shape[i] for i in idx)
        if sa != sb:
            raise ValueError(
                f"{name_a} and {name_b} must have the same {what} size, got "
                f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)}."
            )


def _check_partners(
    feats_a: torch.Tensor,
    codes_a: torch.Tensor,
    feats_b: torch.Tensor,
    codes_b: torch.Tensor,
    names: tuple[str, str, str, str],
) -> None:
    """Two (features, codes) pairs of 4-D maps that a loss term compares.

    Features and codes of one image share batch and spatial size; the two
    images' features (and codes) share batch and channel size.
    """
    for x, name in zip((feats_a, codes_a, feats_b, codes_b), names, strict=True):
        _check_4d(x, name)
    fa, ca, fb, cb = names
    _check_pair(feats_a, feats_b, fa, fb, dims="batch,channels")
    _check_pair(codes_a, codes_b, ca, cb, dims="batch,channels")
    _check_pair(feats_a, codes_a, fa, ca, dims="batch,spatial")
    _check_pair(feats_b, codes_b, fb, cb, dims="batch,spatial")


def _draw_device(
    generator: torch.Generator | None, device: torch.device | str | None
) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def sample_points(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Read maps at continuous coordinates by bilinear sampling.

    Parameters
    ----------
    maps : torch.Tensor of shape (B, C, H, W)
        Feature maps or codes.
    coords : torch.Tensor of shape (B, S, S2, 2)
        Coordinates in ``[-1, 1]`` in ``(x, y)`` order, as
        :func:`torch.nn.functional.grid_sample` expects: ``x = -1`` is the
        centre of the left-most column and ``x = 1`` that of the right-most
        (``align_corners=True``); points outside are clamped to the border.

    Returns
    -------
    torch.Tensor of shape (B, C, S, S2)
        ``out[b, :, i, j]`` is ``maps[b]`` read at ``coords[b, i, j]``.

    Examples
    --------
    >>> import torch
    >>> maps = torch.arange(6.0).reshape(1, 1, 2, 3)
    >>> coords = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0], [0.0, -1.0]]]])
    >>> sample_points(maps, coords)
    tensor([[[[0., 5., 1.]]]])
    """
    _check_4d(maps, "maps")
    if (
        not isinstance(coords, torch.Tensor)
        or coords.ndim != 4
        or coords.shape[-1] != 2
    ):
        raise ValueError(
            "coords must be a tensor of shape (B, S, S, 2), got "
            f"{tuple(getattr(coords, 'shape', ()))}."
        )
    if coords.shape[0] != maps.shape[0]:
        raise ValueError(
            f"maps and coords must have the same batch size, got {maps.shape[0]} "
            f"and {coords.shape[0]}."
        )
    return F.grid_sample(
        maps,
        coords.to(device=maps.device, dtype=maps.dtype),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )


def random_coords(
    batch: int,
    feature_samples: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw uniformly random sampling coordinates in ``[-1, 1]^2``.

    Parameters
    ----------
    batch : int
        Number of images ``B``.
    feature_samples : int
        Points per side ``S``; ``S x S`` points are drawn per image.
    generator : torch.Generator, optional
        Source of randomness; the numbers are drawn on its device.
    device : torch.device or str, optional
        Device of the result (default: the generator's device, else CPU).

    Returns
    -------
    torch.Tensor of shape (B, S, S, 2), float32
        Coordinates for :func:`sample_points`.

    Examples
    --------
    >>> import torch
    >>> c = random_coords(2, 11, generator=torch.Generator().manual_seed(0))
    >>> c.shape, bool(c.abs().max() <= 1)
    (torch.Size([2, 11, 11, 2]), True)
    """
    if batch < 0 or feature_samples < 1:
        raise ValueError(
            "batch must be >= 0 and feature_samples >= 1, got "
            f"batch={batch}, feature_samples={feature_samples}."
        )
    draw = _draw_device(generator, device)
    coords = torch.rand(
        (batch, feature_samples, feature_samples, 2), generator=generator, device=draw
    )
    coords = coords * 2 - 1
    return coords.to(device) if device is not None else coords


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correlation between every point of ``a`` and every point of ``b``.

    Parameters
    ----------
    a : torch.Tensor of shape (B, C, S, S2)
    b : torch.Tensor of shape (B, C, T, T2)
        Both are L2-normalised over channels first (a zero vector stays zero).

    Returns
    -------
    torch.Tensor of shape (B, S, S2, T, T2)
        ``out[n, h, w, i, j] = <a[n, :, h, w], b[n, :, i, j]>`` of the
        normalised maps, in ``[-1, 1]``.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    >>> correlation(a, a)[0, 0]
    tensor([[[1., 0.]],
    <BLANKLINE>
            [[0., 1.]]])
    """
    _check_4d(a, "a")
    _check_4d(b, "b")
    _check_pair(a, b, "a", "b", dims="batch,channels")
    a = F.normalize(a, dim=1)
    b = F.normalize(b, dim=1)
    return torch.einsum("nchw,ncij->nhwij", a, b)


def correlation_loss(
    feats1: torch.Tensor,
    feats2: torch.Tensor,
    codes1: torch.Tensor,
    codes2: torch.Tensor,
    shift: float,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> torch.Tensor:
    """STEGO's correspondence-distillation loss on sampled maps.

    ``F = correlation(feats1, feats2)`` is computed without gradient (the
    features are detached); with ``pointwise`` it is centred per query point,
    ``F <- F - mean_{i,j} F + mean(F_original)``. With
    ``Cc = correlation(codes1, codes2)`` the loss is
    ``mean(-clamp(Cc, lo, hi) * (F - shift))`` where ``lo = 0`` if
    ``zero_clamp`` else ``-inf`` and ``hi = 0.8`` if ``stabilize`` else
    ``+inf``. Gradients flow to the codes only.

    Parameters
    ----------
    feats1, feats2 : torch.Tensor of shape (B, C, S, S) and (B, C, T, T)
        Sampled feature maps (see :func:`sample_points`).
    codes1, codes2 : torch.Tensor of shape (B, D, S, S) and (B, D, T, T)
        Sampled codes at the same points as ``feats1`` and ``feats2``.
    shift : float
        Subtracted from the feature correlation: pairs whose correlation is
        below ``shift`` push their codes apart.
    pointwise : bool, default=True
        Centre the feature correlation of each query point.
    zero_clamp : bool, default=True
        Clamp the code correlation below at 0.
    stabilize : bool, default=False
        Clamp the code correlation above at 0.8.

    Returns
    -------
    torch.Tensor
        Scalar, the mean over batch and all point pairs.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> f = torch.randn(2, 8, 3, 3, generator=g)
    >>> c = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    >>> loss = correlation_loss(f, f, c, c, 0.1)
    >>> loss.ndim, loss.requires_grad
    (0, True)
    """
    _check_partners(
        feats1, codes1, feats2, codes2, ("feats1", "codes1", "feats2", "codes2")
    )
    with torch.no_grad():
        f1 = F.normalize(feats1.detach(), dim=1)
        f2 = F.normalize(feats2.detach(), dim=1)
    return _normalized_loss(
        f1,
        f2,
        F.normalize(codes1, dim=1),
        F.normalize(codes2, dim=1),
        shift,
        pointwise=pointwise,
        zero_clamp=zero_clamp,
        stabilize=stabilize,
    )


def _bilinear_taps(
    coords: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four pixels and weights that :func:`sample_points` blends per point.

    Bilinear sampling with ``align_corners=True`` and border padding, as
    :func:`sample_points`: ``x = -1`` is the centre of column 0 and
    ``x = 1`` that of column ``width - 1``, positions outside are clamped.
    A point reads ``sum_k weights[..., k] * map[index[..., k]]`` from the
    map flattened to ``height * width`` pixels (row-major); the weights of a
    point sum to 1. Taps that fall off the map's last row or column carry
    weight 0 and are redirected to the border pixel.

    Parameters
    ----------
    coords : torch.Tensor of shape (B, S, S2, 2)
        Coordinates in ``[-1, 1]``, ``(x, y)`` order.
    height, width : int
        Size of the maps that are read.

    Returns
    -------
    index : torch.Tensor of shape (B, S * S2, 4), int64
        Flat pixel index of each tap, within its own map.
    weights : torch.Tensor of shape (B, S * S2, 4)
        Bilinear weight of each tap, in the dtype of ``coords``.
    """
    x = ((coords[..., 0] + 1) * (0.5 * (width - 1))).clamp(0, width - 1)
    y = ((coords[..., 1] + 1) * (0.5 * (height - 1))).clamp(0, height - 1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1 = (x0 + 1).clamp(max=width - 1)
    y1 = (y0 + 1).clamp(max=height - 1)
    index = torch.stack(
        [y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1], dim=-1
    )
    weights = torch.stack(
        [(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], dim=-1
    )
    batch = coords.shape[0]
    return index.reshape(batch, -1, 4), weights.reshape(batch, -1, 4)


def _draw_loss_samples(
    batch: int,
    feature_samples: int,
    neg_samples: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The random draws of :func:`stego_loss`, in its order.

    Returns the images' coordinates, the partners' coordinates (both
    ``(batch, S, S, 2)``) and ``neg_samples`` derangements of
    ``range(batch)``.
    """
    coords1 = random_coords(batch, feature_samples, generator=generator, device=device)
    coords2 = random_coords(batch, feature_samples, generator=generator, device=device)
    perms = [
        derangement(batch, generator=generator, device=device)
        for _ in range(neg_samples)
    ]
    return coords1, coords2, perms


def _negative_coords(coords2: torch.Tensor, perms: list[torch.Tensor]) -> torch.Tensor:
    """Where :func:`stego_loss` reads each image for its negatives.

    Negative ``n`` pairs image ``b`` with image ``perms[n][b]`` read at
    ``coords2[b]``, that is image ``j`` read at ``coords2[inverse(p)[j]]``:
    reading the images (not permuted copies) at these coordinates and then
    reordering each block by ``perms[n]`` gives the partners' points. The
    blocks are stacked along the rows: (B, n_neg * S, S, 2).
    """
    return torch.cat([coords2[torch.argsort(p)] for p in perms], dim=1)


def _negative_keys(
    blocks: torch.Tensor, perms: list[torch.Tensor], dim: int
) -> list[torch.Tensor]:
    """Split points read at :func:`negative_coords` into one block per
    negative (``P`` points each along ``dim``), each reordered by its
    derangement so that row ``b`` holds image ``b``'s negative partner."""
    size = blocks.shape[dim] // max(len(perms), 1)
    return [
        blocks.narrow(dim, i * size, size).index_select(0, perm)
        for i, perm in enumerate(perms)
    ]


def _stacked_loss(
    feat_corr: torch.Tensor,
    code_corr: torch.Tensor,
    shifts: tuple[float, float, float],
    *,
    pointwise: bool,
    zero_clamp: bool,
    stabilize: bool,
) -> torch.Tensor:
    """:func:`correlation_loss` of several terms at once, from correlations.

    ``feat_corr`` and ``code_corr`` of shape (B, P, T, Q) hold, for each of
    ``T`` terms, the correlation of the ``P`` query points of each image
    with the ``Q`` points of its partner in that term (the feature
    correlation without gradient). Returns the ``T`` losses
    ``mean(-clamp(Cc_t) * (F_t - shift_t))``, each a mean over batch and
    point pairs, with ``F_t`` centred per query point when ``pointwise``
    exactly as the reference does it. The terms are ordered intra, inter,
    then the negatives: ``shifts`` = (intra, inter, negative) give
    ``shift_t``.
    """
    terms = feat_corr.shape[2]
    with torch.no_grad():
        fd = feat_corr
        if pointwise:
            whole = (0, 1, 3)
            old_mean = fd.mean(dim=whole, keepdim=True)
            fd = fd - fd.mean(dim=3, keepdim=True)
            fd = fd - fd.mean(dim=whole, keepdim=True) + old_mean
        # shifts (intra, inter, negatives...) set on the device: no copy
        # from the host, which would wait for the GPU
        shift = code_corr.new_full((terms,), float(shifts[-1]))
        shift[0] = float(shifts[0])
        shift[1] = float(shifts[1])
        target = fd.to(code_corr.dtype) - shift.view(1, 1, terms, 1)
    cd = code_corr
    lo = 0.0 if zero_clamp else None
    hi = 0.8 if stabilize else None
    if lo is not None or hi is not None:
        cd = cd.clamp(min=lo, max=hi)
    return -(cd * target).mean(dim=(0, 1, 3))


def _normalized_loss(
    feats1: torch.Tensor,
    feats2: torch.Tensor,
    codes1: torch.Tensor,
    codes2: torch.Tensor,
    shift: float,
    *,
    pointwise: bool,
    zero_clamp: bool,
    stabilize: bool,
) -> torch.Tensor:
    """:func:`correlation_loss` on maps already L2-normalised over channels
    (features detached), so that a map shared by several terms is
    normalised once."""
    with torch.no_grad():
        fd = torch.einsum("nchw,ncij->nhwij", feats1, feats2)
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = torch.einsum("nchw,ncij->nhwij", codes1, codes2)
    lo = 0.0 if zero_clamp else None
    hi = 0.8 if stabilize else None
    if lo is not None or hi is not None:
        cd = cd.clamp(min=lo, max=hi)
    return (-cd * (fd.to(cd.dtype) - shift)).mean()


#: Candidate permutations :func:`derangement` draws at once (fewer for very
#: large ``n``, see :func:`_n_candidates`).
_DERANGEMENT_CANDIDATES = 64
#: Random keys :func:`derangement` draws at most per call (candidates x n).
_DERANGEMENT_KEYS = 1 << 22


def _n_candidates(n: int) -> int:
    """Candidates drawn by :func:`derangement` for size ``n``: 64 up to
    ``n = 65536``, then fewer (at least 4) so that the keys stay within
    :data:`_DERANGEMENT_KEYS`."""
    return min(_DERANGEMENT_CANDIDATES, max(4, _DERANGEMENT_KEYS // n))


def derangement(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random permutation of ``range(n)`` with no fixed points, drawn on the device.

    Rejection sampling without reading anything back to the host: ``m = 64``
    uniformly random permutations are drawn at once (each the ``argsort`` of
    ``n`` float64 uniform keys), and the first one without a fixed point is
    returned, chosen by an ``argmax`` on the device. The first success of
    independent uniform permutations is uniform over the ``D_n``
    derangements, so the result is **uniform over all derangements** (every
    cycle structure: for ``n = 4`` the three double transpositions as often
    as each of the six 4-cycles), except when all ``m`` candidates have a
    fixed point. A random permutation is a derangement with probability
    ``D_n / n! >= 1/3`` (the minimum is at ``n = 3``; it tends to ``1/e``),
    so that happens with probability at most ``(2/3)^64 < 6e-12``; the
    result is then the cyclic permutation ``s_0 -> s_1 -> ... -> s_{n-1} ->
    s_0`` of the first candidate ``s`` (a uniformly random ``n``-cycle, as
    Sattolo's algorithm draws), still a derangement. Above ``n = 65536``
    fewer candidates are drawn (at least 4; at most ``2**22`` keys per
    call), which raises that probability to ``(1 - 1/e)^m`` (about 16 % at
    ``m = 4``).

    No ``.item()``, ``bool(tensor)`` or data-dependent shape is involved,
    so on CUDA the call queues a few kernels and returns: the training loop
    of :class:`~skstego.StegoProjector` never waits for the GPU here. The
    reference code's ``super_perm`` bumps fixed points by one instead,
    which can repeat indices; this is a true permutation.

    Parameters
    ----------
    n : int
        Size, at least 2.
    generator : torch.Generator, optional
        Source of randomness; the numbers are drawn on its device
        (``m * n`` float64 uniforms per call).
    device : torch.device or str, optional
        Device of the result (default: the generator's device, else CPU).

    Returns
    -------
    torch.Tensor of shape (n,), int64

    Raises
    ------
    ValueError
        If ``n < 2`` (no derangement exists).

    Examples
    --------
    >>> import torch
    >>> derangement(2)
    tensor([1, 0])
    >>> p = derangement(5, generator=torch.Generator().manual_seed(0))
    >>> bool((p != torch.arange(5)).all()), sorted(p.tolist())
    (True, [0, 1, 2, 3, 4])
    """
    n = int(n)
    if n < 2:
        raise ValueError(
            f"A permutation without fixed points needs n >= 2, got n={n} (the "
            "negative term of the STEGO loss needs a batch of at least 2 images)."
        )
    draw = _draw_device(generator, device)
    keys = torch.rand(
        (_n_candidates(n), n), generator=generator, device=draw, dtype=torch.float64
    )
    candidates = keys.argsort(dim=1)  # independent uniform permutations
    ok = (candidates != torch.arange(n, device=draw)).all(dim=1)
    first = ok.to(torch.int64).argmax().reshape(1)  # first derangement, else 0
    chosen = candidates.index_select(0, first)[0]
    # The fallback (all candidates have a fixed point): the n-cycle that
    # sends s[i] to s[i + 1] for the first candidate s.
    s = candidates[0]
    cycle = torch.empty_like(s).scatter_(0, s, s.roll(-1))
    perm = torch.where(ok.any(), chosen, cycle)
    return perm.to(device) if device is not None else perm


def stego_loss(
    feats: torch.Tensor,
    codes: torch.Tensor,
    knn_feats: torch.Tensor,
    knn_codes: torch.Tensor,
    *,
    pos_intra_weight: float = 0.67,
    pos_inter_weight: float = 0.25,
    neg_weight: float = 0.63,
    pos_intra_shift: float = 0.18,
    pos_inter_shift: float = 0.12,
    neg_shift: float = 0.46,
    neg_samples: int = 5,
    feature_samples: int = 11,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full STEGO training objective on a batch of feature maps and codes.

    Randomness is drawn from ``generator`` in this order: coordinates of the
    images (``random_coords(B, feature_samples)``), coordinates of the
    partners (same call again), then one :func:`derangement` of ``range(B)``
    per negative sample. The images are sampled at the first set; K-NN
    partners and negatives at the second, as in the reference code. Then

    * ``pos_intra = correlation_loss(f, f, c, c, pos_intra_shift)``,
    * ``pos_inter = correlation_loss(f, f_knn, c, c_knn, pos_inter_shift)``,
    * ``neg`` = mean over ``neg_samples`` derangements ``p`` of
      ``correlation_loss(f, f[p], c, c[p], neg_shift)``,

    and ``total = pos_intra_weight * pos_intra + pos_inter_weight * pos_inter
    + neg_weight * neg``.

    The defaults are the active values of the reference code's
    ``src/configs/train_config.yml`` (ViT-S/8), as in
    :class:`~skstego.StegoProjector`.

    ``feats`` and ``knn_feats`` are the correlation targets: the reference
    passes them channel-dropped (``Dropout2d(0.1)``) when its ``dropout``
    option is on; :class:`~skstego.StegoProjector` does so with
    ``feature_dropout=True``. This function uses them as given.

    Parameters
    ----------
    feats : torch.Tensor of shape (B, C, H, W)
        Feature maps of the batch (never receive gradients).
    codes : torch.Tensor of shape (B, D, H, W)
        Codes of the head for ``feats``.
    knn_feats : torch.Tensor of shape (B, C, H2, W2)
        Feature maps of each image's K-NN partner.
    knn_codes : torch.Tensor of shape (B, D, H2, W2)
        Codes of the partners.
    pos_intra_weight, pos_inter_weight, neg_weight : float
        Weights of the three terms (0.67, 0.25, 0.63).
    pos_intra_shift, pos_inter_shift, neg_shift : float
        Shifts of the three terms (0.18, 0.12, 0.46).
    neg_samples : int, default=5
        Number of derangements averaged for the negative term; 0 drops it
        (its part is then 0). Needs ``B >= 2`` when positive.
    feature_samples : int, default=11
        Points per side sampled from each map.
    pointwise, zero_clamp, stabilize : bool
        Passed to :func:`correlation_loss`.
    generator : torch.Generator, optional
        Source of randomness (see above for the order of draws).

    Returns
    -------
    total : torch.Tensor
        Scalar loss to minimise.
    parts : dict of str to torch.Tensor
        Unweighted terms ``"pos_intra"``, ``"pos_inter"`` and ``"neg"``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> feats, knn = torch.randn(2, 4, 16, 8, 8, generator=g)
    >>> head = torch.nn.Conv2d(16, 5, 1)
    >>> total, parts = stego_loss(feats, head(feats), knn, head(knn), generator=g)
    >>> total.backward()
    >>> sorted(parts), head.weight.grad is not None
    (['neg', 'pos_inter', 'pos_intra'], True)
    """
    _check_partners(
        feats, codes, knn_feats, knn_codes, ("feats", "codes", "knn_feats", "knn_codes")
    )
    neg_samples = int(neg_samples)
    if neg_samples < 0:
        raise ValueError(f"neg_samples must be >= 0, got {neg_samples}.")
    batch = feats.shape[0]
    if neg_samples > 0 and batch < 2:
        raise ValueError(
            f"The negative term needs a batch of at least 2 images, got {batch}; "
            "use a larger batch or neg_samples=0."
        )

    device = feats.device
    coords1, coords2, perms = _draw_loss_samples(
        batch, feature_samples, neg_samples, generator=generator, device=device
    )
    flags = {"pointwise": pointwise, "zero_clamp": zero_clamp, "stabilize": stabilize}

    # Each map is read once: the images at coords1 and, below them, at the
    # points of all their negatives (see _negative_coords: no permuted
    # copies of the maps), the partners at coords2. Each sampled map is
    # normalised once.
    grid = coords1
    if perms:
        grid = torch.cat([coords1, _negative_coords(coords2, perms)], dim=1)
    n_points = coords1.shape[1] * coords1.shape[2]
    with torch.no_grad():
        f_img = F.normalize(sample_points(feats.detach(), grid), dim=1).flatten(2)
        f_knn = F.normalize(sample_points(knn_feats.detach(), coords2), dim=1)
    c_img = F.normalize(sample_points(codes, grid), dim=1).flatten(2)
    c_knn = F.normalize(sample_points(knn_codes, coords2), dim=1)

    def stacked(img: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        # (B, P, T, P): the queries against every term's partner points
        query = img[:, :, :n_points]
        rest = img[:, :, n_points:]
        keys = torch.cat(
            [query, knn.flatten(2), *_negative_keys(rest, perms, dim=2)], dim=2
        )
        corr = torch.bmm(query.transpose(1, 2), keys)
        return corr.view(batch, n_points, -1, n_points)

    with torch.no_grad():
        feat_corr = stacked(f_img, f_knn)
    shifts = (pos_intra_shift, pos_inter_shift, neg_shift)
    terms = _stacked_loss(feat_corr, stacked(c_img, c_knn), shifts, **flags)
    pos_intra, pos_inter = terms[0], terms[1]
    neg = terms[2:].mean() if perms else pos_intra.new_zeros(())

    total = (
        pos_intra_weight * pos_intra + pos_inter_weight * pos_inter + neg_weight * neg
    )
    return total, {"pos_intra": pos_intra, "pos_inter": pos_inter, "neg": neg}
