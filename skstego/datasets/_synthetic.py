"""Synthetic segmentation data: RGB scenes and DINO-like feature maps.

Both generators share one layout model (warped Voronoi cells, several classes
per image) and one seeding scheme: ``random_state`` is turned into a master
entropy, and image ``i`` is drawn from its own child seed
``SeedSequence(entropy, spawn_key=(i, part))``. Hence

* the first ``m`` images of ``n`` do not depend on ``n``
  (``make_scenes(n)[:m] == make_scenes(m)`` with the same seed), and
* :func:`make_scenes` and :func:`make_feature_maps` called with the same seed,
  ``n_classes``, label size and ``ignore_fraction`` draw the same label maps, so
  a scene and its synthetic "feature map" describe the same layout.

What a class *looks like* (its colour and texture in a scene, its mean and the
nuisance directions in feature space) is the fixed "world" of the generator:
it depends on the shape parameters only, never on ``random_state``, so a
training set and a test set drawn with different seeds share their classes, as
two splits of one dataset seen through one backbone do.
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from sklearn.utils import check_random_state
from threadpoolctl import threadpool_limits

__all__ = ["make_feature_maps", "make_scenes"]

# Fixed seed of the generator's "world" (class appearance, feature-space bases).
_WORLD_SEED = 20230618
# spawn keys of the per-image streams
_LAYOUT, _APPEARANCE = 0, 1


# --------------------------------------------------------------------------
# parameter validation and seeding
# --------------------------------------------------------------------------
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _check_real(
    value: Any,
    name: str,
    *,
    low: float = 0.0,
    high: float = np.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if not np.isfinite(value) or bad_low or bad_high:
        lb = "(" if low_open else "["
        hb = ")" if high_open or high == np.inf else "]"
        raise ValueError(f"{name} must be in {lb}{low}, {high}{hb}, got {value}.")
    return value


def _check_size(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            raise ValueError(
                f"{name} must be an int or a pair (height, width), got {value!r}."
            ) from None
        if len(pair) != 2:
            raise ValueError(
                f"{name} must be an int or a pair (height, width), got {value!r}."
            )
    h = _check_int(pair[0], f"{name} (height)", minimum)
    w = _check_int(pair[1], f"{name} (width)", minimum)
    return h, w


def _master_entropy(random_state: Any) -> list[int]:
    """Draw the master entropy from an int, RandomState, Generator or None."""
    if isinstance(random_state, np.random.Generator):
        words = random_state.integers(0, 2**32, size=4, dtype=np.uint64)
    else:
        words = check_random_state(random_state).randint(
            0, 2**32, size=4, dtype=np.uint64
        )
    return [int(w) for w in words]


def _image_rng(entropy: list[int], i: int, part: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(i, part)))


# --------------------------------------------------------------------------
# layout: warped Voronoi cells grouped by class
# --------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], shape (h, 1) and (1, w)."""
    yy = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    xx = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


class _Layout(NamedTuple):
    cells: np.ndarray  # (h, w) int64, index of each pixel's cell
    cell_class: np.ndarray  # (n_cells,) int64, class of each cell
    ignore: np.ndarray | None  # (h, w) bool, ignored pixels; None when none

    @property
    def labels(self) -> np.ndarray:
        """Label map (h, w) int64 without ignored pixels."""
        return self.cell_class[self.cells]

    def ignored_labels(self) -> np.ndarray:
        """Label map (h, w) int64 with ignored pixels set to -1."""
        labels = self.labels
        if self.ignore is not None:
            labels[self.ignore] = -1
        return labels


def _layout(
    rng: np.random.Generator, h: int, w: int, n_classes: int, ignore_fraction: float
) -> _Layout:
    """Draw one layout: warped Voronoi cells, each of one class.

    3 to 8 cells with uniform centres in the unit square, each given one of 2
    to 4 distinct classes drawn uniformly (every drawn class gets at least one
    cell). Pixel coordinates are warped by a random low-frequency sinusoid
    (amplitude up to 8 % of the side), so boundaries are wavy. A pixel belongs
    to its nearest cell. Its margin is the distance to the nearest cell of
    another class minus the distance to its own; the
    ``round(ignore_fraction * h * w)`` pixels of smallest margin (those that
    hug class boundaries) are marked ignored.
    """
    yy, xx = _grid(h, w)
    n_cells = int(rng.integers(3, 9))
    n_present = int(rng.integers(2, min(n_classes, 4) + 1))
    present = rng.choice(n_classes, size=n_present, replace=False)
    cell_class = np.concatenate(
        [present, rng.choice(present, size=max(n_cells - n_present, 0))]
    ).astype(np.int64)
    n_cells = cell_class.size
    centres = rng.random((n_cells, 2), dtype=np.float32)
    amp = rng.uniform(0.0, 0.08, size=2).astype(np.float32)
    freq = rng.uniform(1.0, 3.0, size=2).astype(np.float32)
    phase = rng.uniform(0.0, 2 * np.pi, size=2).astype(np.float32)
    wy = yy + amp[0] * np.sin(2 * np.pi * freq[0] * xx + phase[0])
    wx = xx + amp[1] * np.sin(2 * np.pi * freq[1] * yy + phase[1])
    # squared distance of every pixel to every cell centre: (n_cells, h, w)
    d = (wy[None] - centres[:, 0, None, None]) ** 2 + (
        wx[None] - centres[:, 1, None, None]
    ) ** 2
    cells = np.argmin(d, axis=0)
    n_ignore = round(ignore_fraction * h * w)
    if n_ignore == 0:
        return _Layout(cells, cell_class, None)
    labels = cell_class[cells]
    own = np.full((h, w), np.inf, dtype=np.float32)
    other = np.full((h, w), np.inf, dtype=np.float32)
    for j in range(n_cells):
        dj = np.sqrt(d[j])
        same = labels == cell_class[j]
        np.minimum(own, dj, out=own, where=same)
        np.minimum(other, dj, out=other, where=~same)
    margin = (other - own).ravel()
    ignore = np.zeros(h * w, dtype=bool)
    ignore[np.argpartition(margin, n_ignore - 1)[:n_ignore]] = True
    return _Layout(cells, cell_class, ignore.reshape(h, w))


# --------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------
_TEXTURES = ("stripes", "checker", "rings", "noise")


class _Look(NamedTuple):
    colour: np.ndarray  # (3,) base RGB colour
    tint: np.ndarray  # (3,) RGB weights of the texture
    kind: str  # texture kind
    period: float  # texture period in pixels
    angle: float  # texture orientation in radians
    amplitude: float  # texture amplitude in grey levels


@lru_cache(maxsize=1024)
def _class_look(c: int) -> _Look:
    """Appearance of class ``c``: fixed, independent of ``random_state``."""
    rng = np.random.default_rng(np.random.SeedSequence(_WORLD_SEED, spawn_key=(c,)))
    return _Look(
        colour=rng.uniform(40.0, 215.0, size=3).astype(np.float32),
        tint=rng.uniform(0.5, 1.0, size=3).astype(np.float32),
        kind=_TEXTURES[c % len(_TEXTURES)],
        period=float(rng.uniform(3.0, 12.0)),
        angle=float(rng.uniform(0.0, np.pi)),
        amplitude=float(rng.uniform(20.0, 40.0)),
    )


def _texture(
    rng: np.random.Generator,
    kind: str,
    period: float,
    angle: float,
    y: np.ndarray,
    x: np.ndarray,
) -> np.ndarray:
    """Texture values in about [-1, 1] at pixel coordinates ``y``, ``x``."""
    if kind == "noise":
        # blocky noise: i.i.d. values on a grid of cells of ``period / 3`` pixels
        cell = max(period / 3.0, 1.0)
        iy = (y / cell).astype(np.int64)
        ix = (x / cell).astype(np.int64)
        table = rng.uniform(-1.0, 1.0, size=(iy.max() + 1, ix.max() + 1))
        return table[iy, ix].astype(np.float32)
    period *= rng.uniform(0.9, 1.1)
    angle += rng.uniform(-0.25, 0.25)
    phase = rng.uniform(0.0, 2 * np.pi)
    k = np.float32(2 * np.pi / period)
    u = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))
    if kind == "stripes":
        return np.sin(k * u + phase)
    if kind == "checker":
        v = -x * np.float32(np.sin(angle)) + y * np.float32(np.cos(angle))
        return np.sign(np.sin(k * u + phase) * np.sin(k * v + phase)).astype(np.float32)
    # rings around a random centre
    cy, cx = rng.uniform(0, y.max() + 1), rng.uniform(0, x.max() + 1)
    r = np.sqrt((y - np.float32(cy)) ** 2 + (x - np.float32(cx)) ** 2)
    return np.sin(k * r + phase)


def _paint(rng: np.random.Generator, layout: _Layout) -> np.ndarray:
    """Render one (h, w, 3) uint8 image of a layout, cell by cell."""
    h, w = layout.cells.shape
    cells = layout.cells.reshape(-1)
    n = layout.cell_class.size
    colours = np.empty((n, 3), dtype=np.float32)
    tints = np.empty((n, 3), dtype=np.float32)
    tex = np.empty(h * w, dtype=np.float32)
    brightness = rng.uniform(0.75, 1.25)
    for j, c in enumerate(layout.cell_class.tolist()):
        look = _class_look(c)
        colours[j] = look.colour * brightness + rng.normal(0.0, 18.0, size=3)
        tints[j] = look.tint * np.float32(look.amplitude)
        idx = np.flatnonzero(cells == j)
        if idx.size:
            ys = (idx // w).astype(np.float32)
            xs = (idx % w).astype(np.float32)
            tex[idx] = _texture(rng, look.kind, look.period, look.angle, ys, xs)
    img = np.take(tints, cells, axis=0)
    img *= tex[:, None]
    img += np.take(colours, cells, axis=0)
    # pixel noise: uniform, standard deviation 6 grey levels
    noise = rng.random(img.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(12.0 * np.sqrt(3.0))
    img += noise
    np.clip(img, 0.0, 255.0, out=img)
    np.rint(img, out=img)
    return img.astype(np.uint8).reshape(h, w, 3)


def make_scenes(
    n_images: int,
    *,
    size: int | tuple[int, int] = 64,
    n_classes: int = 5,
    ignore_fraction: float = 0.0,
    random_state: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic RGB scenes with ground-truth label maps.

    Each image is a warped Voronoi partition: 3 to 8 cells (objects), each
    of one of 2 to 4 distinct classes drawn uniformly from
    ``range(n_classes)``, with wavy boundaries. A class has a fixed colour and
    a fixed texture (stripes, checkerboard, rings or blocky noise, by
    ``class % 4``, with a class-specific period, orientation, amplitude and
    RGB tint). Every image scales the brightness (uniform in [0.75, 1.25]);
    every cell shifts its colour (normal, 18 grey levels per channel) and
    draws its own texture phase, period (+-10 %) and orientation
    (+-0.25 rad); uniform pixel noise of standard deviation 6 grey levels is
    added. Colour is informative but not perfect, texture disambiguates.
    Class appearance does not depend on ``random_state``: sets drawn with
    different seeds share their classes.

    Parameters
    ----------
    n_images : int
        Number of images, >= 1.
    size : int or (int, int), default=64
        Image height and width (an int for square images), each >= 8.
    n_classes : int, default=5
        Number of classes, >= 2.
    ignore_fraction : float, default=0.0
        Fraction of pixels of every image labelled ``-1`` (ignore), in
        ``[0, 1)``: the pixels closest to a boundary between two classes,
        i.e. thin boundaries, thicker as the fraction grows. Each image has
        exactly ``round(ignore_fraction * H * W)`` ignored pixels. The images
        and the other labels do not depend on it.
    random_state : int, RandomState, Generator or None, default=None
        Seed of the layouts and per-image jitter. Image ``i`` has its own
        child seed, so ``make_scenes(n)`` starts with ``make_scenes(m)``
        for ``m < n`` (same ``random_state``, ``size``, ``n_classes``,
        ``ignore_fraction``).

    Returns
    -------
    images : ndarray of shape (n_images, H, W, 3), uint8
        RGB images.
    labels : ndarray of shape (n_images, H, W), int64
        Class of every pixel, in ``[0, n_classes)``, or ``-1`` for ignored
        pixels.

    See Also
    --------
    make_feature_maps : DINO-like feature maps with the same layouts.

    Examples
    --------
    >>> from skstego.datasets import make_scenes
    >>> images, labels = make_scenes(4, size=32, n_classes=3, random_state=0)
    >>> images.shape, images.dtype, labels.shape, labels.dtype
    ((4, 32, 32, 3), dtype('uint8'), (4, 32, 32), dtype('int64'))
    >>> sorted(set(labels.ravel().tolist())) <= [0, 1, 2]
    True
    >>> _, labels = make_scenes(2, size=(24, 40), ignore_fraction=0.1, random_state=0)
    >>> labels.shape, float((labels == -1).mean())
    ((2, 24, 40), 0.1)
    """
    n_images = _check_int(n_images, "n_images", 1)
    h, w = _check_size(size, "size", 8)
    n_classes = _check_int(n_classes, "n_classes", 2)
    ignore_fraction = _check_real(
        ignore_fraction, "ignore_fraction", low=0.0, high=1.0, high_open=True
    )
    entropy = _master_entropy(random_state)
    images = np.empty((n_images, h, w, 3), dtype=np.uint8)
    labels = np.empty((n_images, h, w), dtype=np.int64)
    for i in range(n_images):
        layout = _layout(
            _image_rng(entropy, i, _LAYOUT), h, w, n_classes, ignore_fraction
        )
        images[i] = _paint(_image_rng(entropy, i, _APPEARANCE), layout)
        labels[i] = layout.ignored_labels()
    return images, labels


# --------------------------------------------------------------------------
# feature maps
# --------------------------------------------------------------------------
def _low_freq_basis(h: int, w: int, max_freq: int = 2) -> np.ndarray:
    """Orthonormal low-frequency cosine fields on an (h, w) grid, no constant.

    Returns shape (J, h * w) with ``J = (max_freq + 1) ** 2 - 1``, every row
    with unit mean square (so a unit-variance coefficient gives a unit-RMS
    field).
    """
    yy, xx = _grid(h, w)
    fields = []
    for fy in range(max_freq + 1):
        for fx in range(max_freq + 1):
            if fy == fx == 0:
                continue
            f = np.cos(np.pi * fy * yy) * np.cos(np.pi * fx * xx)
            fields.append(f.ravel())
    basis = np.stack(fields).astype(np.float64)
    # Gram-Schmidt on the discrete grid (cosines are only nearly orthogonal)
    q, _ = np.linalg.qr(basis.T)
    return (q.T * np.sqrt(h * w)).astype(np.float32)


def _class_means(
    rng: np.random.Generator, n_classes: int, n_informative: int, class_sep: float
) -> np.ndarray:
    """Class means (n_classes, n_informative) with pairwise distance class_sep.

    A regular simplex (exact equal distances) when ``n_informative >=
    n_classes - 1``, randomly rotated; otherwise Gaussian points rescaled so
    that their smallest pairwise distance is ``class_sep``.
    """
    k, r = n_classes, n_informative
    if r >= k - 1:
        simplex = np.eye(k) - 1.0 / k  # rows: vertices, edge sqrt(2)
        # orthonormal basis of the (k-1)-dim span, coordinates of the vertices
        q, _ = np.linalg.qr(simplex.T)
        coords = simplex @ q[:, : k - 1]
        rot, _ = np.linalg.qr(rng.standard_normal((r, k - 1)))
        means = coords @ rot.T * (class_sep / np.sqrt(2.0))
    else:
        means = rng.standard_normal((k, r))
        means -= means.mean(axis=0)
        diff = np.linalg.norm(means[:, None] - means[None], axis=-1)
        dmin = diff[~np.eye(k, dtype=bool)].min()
        means *= class_sep / max(dmin, 1e-12)
    return means


# shares of the smooth nuisance variance: image offset, image field, position
_SHARES = {"image": 0.4, "field": 0.3, "position": 0.3}
# per-image jitter of the class means, relative to class_sep
_JITTER = 0.1


class _FeatureWorld(NamedTuple):
    """The fixed part of the feature model, in feature space (all float32)."""

    informative: np.ndarray  # (r, F) U^T
    nuisance: np.ndarray  # (m, F) V^T
    means: np.ndarray  # (k, F) class means U mu_c
    modes: np.ndarray  # (k, n_modes, F) unit mode directions V nu_{c,j}
    phi: np.ndarray  # (J, h*w) low-frequency fields, unit RMS
    position: np.ndarray  # (h*w, F) positional field V P(p), unit RMS norm
    bias: np.ndarray  # (F,) positive mean b


def _feature_world(
    n_features: int,
    n_classes: int,
    r: int,
    m: int,
    n_modes: int,
    h: int,
    w: int,
    class_sep: float,
    offset: float,
) -> _FeatureWorld:
    """Draw the fixed part of the feature model (see :func:`make_feature_maps`)."""
    key = (n_features, n_classes, r, m)
    rng = np.random.default_rng(np.random.SeedSequence(_WORLD_SEED, spawn_key=key))
    basis, _ = np.linalg.qr(rng.standard_normal((n_features, r + m)))
    u, v = basis[:, :r], basis[:, r:]
    means = _class_means(rng, n_classes, r, class_sep) @ u.T
    phi = _low_freq_basis(h, w)
    n_fields = phi.shape[0]
    coef = rng.standard_normal((n_fields, m)) / np.sqrt(max(m * n_fields, 1))
    position = phi.T @ (coef @ v.T)
    bias = offset * np.abs(rng.standard_normal(n_features))
    mode_rng = np.random.default_rng(
        np.random.SeedSequence(_WORLD_SEED, spawn_key=(*key, n_modes))
    )
    n_total = n_classes * n_modes
    if m == 0:
        modes = np.zeros((n_total, 0))
    elif n_total <= m:
        # orthonormal: every mode direction carries the same, smallest variance
        modes = np.linalg.qr(mode_rng.standard_normal((m, n_total)))[0].T
    else:
        modes = mode_rng.standard_normal((n_total, m))
        modes /= np.linalg.norm(modes, axis=1, keepdims=True)
    modes = (modes @ v.T).reshape(n_classes, n_modes, n_features)
    f32 = np.float32
    return _FeatureWorld(
        informative=np.ascontiguousarray(u.T, dtype=f32),
        nuisance=np.ascontiguousarray(v.T, dtype=f32),
        means=means.astype(f32),
        modes=modes.astype(f32),
        phi=phi,
        position=position.astype(f32),
        bias=bias.astype(f32),
    )


def _pool(n_out: int, n_in: int) -> np.ndarray:
    """Area-averaging operator (n_out, n_in) from a fine grid to a coarse one."""
    idx = (np.arange(n_in) * n_out) // n_in
    op = np.zeros((n_out, n_in), dtype=np.float32)
    op[idx, np.arange(n_in)] = 1.0
    return op / op.sum(axis=1, keepdims=True)


def make_feature_maps(
    n_images: int,
    *,
    n_features: int = 384,
    n_classes: int = 5,
    n_informative: int | None = None,
    n_nuisance: int | None = None,
    n_modes: int = 8,
    map_size: int | tuple[int, int] = 16,
    label_size: int | tuple[int, int] | None = None,
    class_sep: float = 10.0,
    mode_scale: float = 14.0,
    nuisance_scale: float = 6.0,
    noise: float = 1.5,
    offset: float = 1.0,
    ignore_fraction: float = 0.0,
    random_state: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Synthetic "DINO-like" feature maps with ground-truth label maps.

    A test bed for the mechanisms the STEGO study describes (Koenig et al.,
    CVPR 2023 workshop): the class information lives in a few directions of a
    high-dimensional feature space;
    the other directions carry large, structured nuisance: class sub-modes
    (parts, instances, sub-types of a class, which DINO tells apart), image
    offsets and spatially smooth fields. The design keeps the
    between-class variance per informative direction well above the variance
    of any nuisance direction, so

    * PCA to ``n_informative`` dimensions recovers the class subspace and
      k-means there finds the classes;
    * k-means on the raw maps has essentially the same optimum (the class
      partition) but converges badly:
      distances between raw tokens are dominated by nuisance and noise, so
      k-means++ seeding often puts two centres in one class, and the
      sub-modes hold that split in place (Lloyd's iterations stop in a local
      optimum that splits one class and merges two others);
    * a linear classifier on raw tokens is nearly perfect.

    **Generative model.** Write ``F = n_features``, ``k = n_classes``,
    ``r = n_informative``, ``m = n_nuisance``, ``M = n_modes``. The *world*
    (fixed for given ``F, k, r, m, M``, independent of ``random_state``) is

    * a random orthonormal basis ``[U, V]`` of ``r + m`` directions of
      ``R^F``: ``U`` (F, r) spans the informative subspace, ``V`` (F, m) the
      nuisance subspace;
    * class means ``mu_c`` in ``R^r`` with pairwise distance ``class_sep``:
      a regular simplex, randomly rotated, when ``r >= k - 1`` (it spans
      ``k - 1`` dimensions, hence the default ``r = k - 1``); random points
      scaled so the closest two are ``class_sep`` apart otherwise;
    * ``M`` sub-modes per class: unit vectors ``nu_{c,j}`` in ``R^m``,
      orthonormal when ``k M <= m``, random otherwise;
    * a positional field ``P(p) = sum_j phi_j(p) a_j``, ``a_j ~ N(0, I_m /
      (m J))``, where ``phi_j`` (``J = 8``) are the low-frequency cosines
      ``cos(pi f_y y) cos(pi f_x x)``, ``0 <= f_y, f_x <= 2``, not both 0,
      orthonormalised on the feature grid to unit RMS (position information,
      as ViT tokens keep);
    * a positive mean ``b = offset * |g|``, ``g ~ N(0, I_F)``, like the
      large mean of real ViT features.

    Image ``n`` draws a layout at ``label_size`` with the model of
    :func:`make_scenes` (same seed, same label maps): cells ``q``, each of
    class ``c_q``. It draws a mode ``j_q`` uniformly from ``M`` for every cell,
    a class jitter ``e_{n,c} ~ N(0, (0.1 class_sep)^2 I_r / r)`` for every
    class, an image offset ``o_n ~ N(0, I_m / m)`` and an image field
    ``G_n(p) = sum_j phi_j(p) g_{n,j}``, ``g_{n,j} ~ N(0, I_m / (m J))``.
    Token ``p`` of the feature grid (``map_size``) covers label pixels of
    cells ``q`` in area fractions ``w_q(p)`` (tokens on boundaries are
    mixtures, as DINO patches are), and is

    .. math::

        x_n(p) = b + \sum_q w_q(p) \big[U (\mu_{c_q} + e_{n,c_q})
                 + s_M V \nu_{c_q, j_q}\big]
                 + s_N V \big(\sqrt{0.4}\, o_n + \sqrt{0.3}\, G_n(p)
                 + \sqrt{0.3}\, P(p)\big) + \sigma \varepsilon_n(p)

    with ``s_M = mode_scale``, ``s_N = nuisance_scale``, ``sigma = noise`` and
    ``eps_n(p) ~ N(0, I_F)`` i.i.d. Each nuisance term has expected squared
    norm 1 before scaling, so a token carries nuisance of RMS norm about
    ``sqrt(s_M^2 + s_N^2)`` and noise of RMS norm ``sigma sqrt(F)``.

    **Regimes.** With balanced classes the between-class variance is
    ``class_sep^2 / (2k)`` along each of the ``k - 1`` simplex directions
    (10 with the defaults); a sub-mode direction has variance about
    ``s_M^2 / (k M)`` (4.9), a positional direction ``0.3 s_N^2 / J`` (1.35),
    an image-offset direction about ``0.4 s_N^2 / n_images``; the noise adds
    ``sigma^2`` (2.25) to every direction. PCA finds the class subspace while
    the first clearly exceeds the others; with few images, uneven class and
    mode counts shrink that margin (the defaults want a few dozen images).
    Raw k-means gets stuck more often as the sub-modes grow against the
    classes (``2 s_M^2 / M`` against ``class_sep^2``, the same ratio as the
    variances above), as nuisance and noise swamp ``class_sep`` in the token
    distances, and for larger ``k``. Classes are linearly separable when
    ``class_sep >> noise`` (the sub-modes, being class-specific, help a
    linear probe). With the defaults and 100 maps of 8 x 8, k-means
    (``n_init=1``) reaches a Hungarian mIoU of about 0.97 after PCA to 4
    dimensions and about 0.8 on raw tokens (averaged over seeds; a stuck run
    scores about 0.65), and a logistic regression on raw tokens about 0.995
    accuracy.

    Parameters
    ----------
    n_images : int
        Number of feature maps, >= 1.
    n_features : int, default=384
        Channels ``F`` (384 as DINO ViT-S, 768 as ViT-B).
    n_classes : int, default=5
        Number of classes ``k``, >= 2.
    n_informative : int, optional
        Dimension ``r`` of the class subspace, in ``[1, n_features]``;
        default ``min(n_classes - 1, n_features)``.
    n_nuisance : int, optional
        Dimension ``m`` of the nuisance subspace, in
        ``[0, n_features - n_informative]``; default
        ``n_features - n_informative``. With ``m = 0`` there are no modes and
        no nuisance, only noise.
    n_modes : int, default=8
        Sub-modes ``M`` per class, >= 1.
    map_size : int or (int, int), default=16
        Feature grid ``(h, w)``, each >= 2.
    label_size : int or (int, int), optional
        Label grid ``(H, W)``, each at least the feature grid's; default
        ``map_size``. Larger label maps are finer than the features, like
        pixels against DINO patches; the grids are aligned by area (token
        ``i`` covers label rows ``i H / h`` to ``(i + 1) H / h``).
    class_sep : float, default=10.0
        Distance between class means, > 0.
    mode_scale : float, default=14.0
        Norm ``s_M`` of the sub-mode offsets, >= 0.
    nuisance_scale : float, default=6.0
        RMS norm ``s_N`` of the smooth nuisance (image offset, image field,
        positional field), >= 0.
    noise : float, default=1.5
        Standard deviation ``sigma`` of the i.i.d. token noise per channel,
        >= 0.
    offset : float, default=1.0
        Scale of the positive mean ``b``, >= 0.
    ignore_fraction : float, default=0.0
        Fraction of label pixels of every image set to ``-1`` along class
        boundaries, as in :func:`make_scenes`, in ``[0, 1)``; features are
        not affected.
    random_state : int, RandomState, Generator or None, default=None
        Seed of layouts, modes, jitter, nuisance and noise (not of the
        world). Image ``i`` has its own child seed, so the first maps do not
        depend on ``n_images``.

    Returns
    -------
    maps : ndarray of shape (n_images, n_features, h, w), float32
        Feature maps, channels first.
    labels : ndarray of shape (n_images, H, W), int64
        Class of every label pixel, in ``[0, n_classes)``, or ``-1``.

    See Also
    --------
    make_scenes : RGB scenes with the same layouts.

    Examples
    --------
    >>> from skstego.datasets import make_feature_maps
    >>> maps, labels = make_feature_maps(
    ...     3, n_features=64, map_size=8, label_size=32, random_state=0
    ... )
    >>> maps.shape, maps.dtype, labels.shape, labels.dtype
    ((3, 64, 8, 8), dtype('float32'), (3, 32, 32), dtype('int64'))

    Tokens as a 2-D matrix (one row per token) for any scikit-learn estimator;
    PCA to ``n_classes - 1`` dimensions, then k-means:

    >>> from sklearn.cluster import KMeans
    >>> from sklearn.decomposition import PCA
    >>> maps, labels = make_feature_maps(100, map_size=8, random_state=0)
    >>> tokens = maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])
    >>> tokens.shape, labels.reshape(-1).shape
    ((6400, 384), (6400,))
    >>> codes = PCA(n_components=4).fit_transform(tokens)
    >>> clusters = KMeans(5, n_init=1, random_state=0).fit_predict(codes)
    >>> from skstego.metrics import mean_iou
    >>> mean_iou(labels.reshape(-1), clusters, matching="hungarian") > 0.95
    True
    """
    n_images = _check_int(n_images, "n_images", 1)
    n_features = _check_int(n_features, "n_features", 1)
    n_classes = _check_int(n_classes, "n_classes", 2)
    if n_informative is None:
        n_informative = min(n_classes - 1, n_features)
    r = _check_int(n_informative, "n_informative", 1)
    if r > n_features:
        raise ValueError(
            f"n_informative must be <= n_features ({n_features}), got {r}."
        )
    if n_nuisance is None:
        n_nuisance = n_features - r
    m = _check_int(n_nuisance, "n_nuisance", 0)
    if r + m > n_features:
        raise ValueError(
            f"n_informative + n_nuisance must be <= n_features ({n_features}), "
            f"got {r} + {m}."
        )
    n_modes = _check_int(n_modes, "n_modes", 1)
    h, w = _check_size(map_size, "map_size", 2)
    H, W = (h, w) if label_size is None else _check_size(label_size, "label_size", 2)
    if H < h or W < w:
        raise ValueError(
            f"label_size {(H, W)} must be at least map_size {(h, w)} in each dimension."
        )
    class_sep = _check_real(class_sep, "class_sep", low=0.0, low_open=True)
    mode_scale = _check_real(mode_scale, "mode_scale")
    nuisance_scale = _check_real(nuisance_scale, "nuisance_scale")
    noise = _check_real(noise, "noise")
    offset = _check_real(offset, "offset")
    ignore_fraction = _check_real(
        ignore_fraction, "ignore_fraction", low=0.0, high=1.0, high_open=True
    )
    entropy = _master_entropy(random_state)

    maps = np.empty((n_images, n_features, h, w), dtype=np.float32)
    labels = np.empty((n_images, H, W), dtype=np.int64)
    # Small products, one image at a time: one BLAS thread is faster than many,
    # and results do not depend on the machine's thread count.
    with threadpool_limits(limits=1, user_api="blas"):
        world = _feature_world(
            n_features, n_classes, r, m, n_modes, h, w, class_sep, offset
        )
        pool_y, pool_x = _pool(h, H), _pool(w, W)
        n_fields = world.phi.shape[0]
        jitter = _JITTER * class_sep / np.sqrt(r)
        scale = {
            key: np.float32(nuisance_scale * np.sqrt(share))
            for key, share in _SHARES.items()
        }
        # the same for every image: positive mean and positional field
        constant = (world.bias + scale["position"] * world.position).T  # (F, h*w)
        constant = np.ascontiguousarray(constant)
        eps = np.empty((n_features, h * w), dtype=np.float32)
        for i in range(n_images):
            layout = _layout(
                _image_rng(entropy, i, _LAYOUT), H, W, n_classes, ignore_fraction
            )
            labels[i] = layout.ignored_labels()
            rng = _image_rng(entropy, i, _APPEARANCE)
            cell_class = layout.cell_class
            n_cells = cell_class.size
            # area fraction of each cell under each token: (h*w, n_cells)
            onehot = layout.cells[None] == np.arange(n_cells)[:, None, None]
            frac = pool_y @ onehot.astype(np.float32) @ pool_x.T
            frac = frac.reshape(n_cells, h * w).T
            # one feature vector per cell: class mean + jitter + mode
            jit = jitter * rng.standard_normal((n_classes, r)).astype(np.float32)
            cells = world.means[cell_class] + (jit @ world.informative)[cell_class]
            if m:
                mode = rng.integers(0, n_modes, size=n_cells)
                cells += np.float32(mode_scale) * world.modes[cell_class, mode]
            # channels first, written in place: out = cells^T frac^T + ...
            out = maps[i].reshape(n_features, h * w)
            np.matmul(cells.T, frac.T, out=out)
            if m:
                # image offset and image field, drawn in the nuisance subspace
                coef = rng.standard_normal((n_fields + 1, m)).astype(np.float32)
                coef[0] *= scale["image"] / np.sqrt(m)
                coef[1:] *= scale["field"] / np.sqrt(m * n_fields)
                coef = world.nuisance.T @ coef.T  # (F, J + 1)
                out += coef[:, :1]
                out += coef[:, 1:] @ world.phi
            out += constant
            if noise > 0:
                rng.standard_normal(dtype=np.float32, out=eps)
                eps *= np.float32(noise)
                out += eps
    return maps, labels
