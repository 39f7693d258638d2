"""Tests for skstego.losses against an independent float64 evaluation."""

import itertools

import numpy as np
import pytest
import torch

from skstego.losses import (
    correlation,
    correlation_loss,
    derangement,
    random_coords,
    sample_points,
    stego_loss,
)


def _reference_loss(f1, f2, c1, c2, shift, pointwise, zero_clamp, stabilize):
    """The reference's ContrastiveCorrelationLoss.helper (src/modules.py),
    written out in float64 NumPy."""
    f1, f2, c1, c2 = (
        np.asarray(x.detach(), dtype=np.float64) for x in (f1, f2, c1, c2)
    )

    def normalise(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def corr(a, b):
        return np.einsum("nchw,ncij->nhwij", normalise(a), normalise(b))

    fd = corr(f1, f2)
    if pointwise:
        fd = fd - fd.mean(axis=(3, 4), keepdims=True) + fd.mean()
    cd = corr(c1, c2)
    lo = 0.0 if zero_clamp else -np.inf
    hi = 0.8 if stabilize else np.inf
    return float(np.mean(-np.clip(cd, lo, hi) * (fd - shift)))


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


FLAGS = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize(("pointwise", "zero_clamp", "stabilize"), FLAGS)
@pytest.mark.parametrize("shift", [0.0, 0.08, 0.46, 0.66])
def test_correlation_loss_matches_float64_reference(
    pointwise, zero_clamp, stabilize, shift
):
    f1, f2 = _randn(3, 16, 5, 5, seed=1), _randn(3, 16, 4, 4, seed=2)
    # Codes correlated with features so that some code correlations exceed 0.8.
    c1 = f1[:, :6] + 0.3 * _randn(3, 6, 5, 5, seed=3)
    c2 = f2[:, :6] + 0.3 * _randn(3, 6, 4, 4, seed=4)
    flags = {"pointwise": pointwise, "zero_clamp": zero_clamp, "stabilize": stabilize}
    got = correlation_loss(f1, f2, c1, c2, shift, **flags)
    want = _reference_loss(f1, f2, c1, c2, shift, **flags)
    assert got.shape == ()
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), want, rtol=1e-5, atol=1e-6)
    # float64 inputs give float64 precision
    got64 = correlation_loss(
        f1.double(), f2.double(), c1.double(), c2.double(), shift, **flags
    )
    np.testing.assert_allclose(got64.item(), want, rtol=1e-12, atol=1e-12)


def test_flags_change_the_loss():
    f = _randn(2, 8, 4, 4, seed=5)
    c = f[:, :4] + 0.2 * _randn(2, 4, 4, 4, seed=6)
    values = {
        flags: correlation_loss(
            f,
            f,
            c,
            c,
            0.1,
            **dict(zip(("pointwise", "zero_clamp", "stabilize"), flags, strict=True)),
        ).item()
        for flags in FLAGS
    }
    assert len({round(v, 6) for v in values.values()}) == len(FLAGS)


def test_gradients_reach_codes_not_features():
    f1 = _randn(2, 8, 4, 4, seed=7).requires_grad_()
    f2 = _randn(2, 8, 3, 3, seed=8).requires_grad_()
    c1 = _randn(2, 5, 4, 4, seed=9).requires_grad_()
    c2 = _randn(2, 5, 3, 3, seed=10).requires_grad_()
    loss = correlation_loss(f1, f2, c1, c2, 0.1, zero_clamp=False)
    loss.backward()
    assert f1.grad is None and f2.grad is None
    assert c1.grad is not None and c1.grad.abs().sum() > 0
    assert c2.grad is not None and c2.grad.abs().sum() > 0


def test_stego_loss_gradients_reach_head_not_features():
    feats = _randn(3, 8, 6, 6, seed=11).requires_grad_()
    knn = _randn(3, 8, 6, 6, seed=12).requires_grad_()
    torch.manual_seed(0)
    head = torch.nn.Conv2d(8, 4, 1)
    total, _ = stego_loss(
        feats, head(feats), knn, head(knn), generator=torch.Generator().manual_seed(0)
    )
    total.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # The features themselves get no gradient from the loss; their only path
    # is through the head (codes), so check with codes independent of them.
    feats.grad = None
    knn.grad = None
    frozen = _randn(3, 4, 6, 6, seed=13).requires_grad_()
    total, _ = stego_loss(
        feats, frozen, knn, frozen.detach(), generator=torch.Generator().manual_seed(0)
    )
    total.backward()
    assert feats.grad is None and knn.grad is None
    assert frozen.grad is not None and frozen.grad.abs().sum() > 0


def test_correlation_is_cosine_and_zero_safe():
    a = _randn(2, 6, 3, 4, seed=14)
    b = _randn(2, 6, 2, 5, seed=15)
    b[0, :, 0, 0] = 0
    out = correlation(a, b)
    assert out.shape == (2, 3, 4, 2, 5)
    assert torch.isfinite(out).all()
    assert torch.all(out[0, :, :, 0, 0] == 0)
    an = a / a.norm(dim=1, keepdim=True)
    bn = b / b.norm(dim=1, keepdim=True)
    torch.testing.assert_close(
        out[1, 2, 3, 1, 4], (an[1, :, 2, 3] * bn[1, :, 1, 4]).sum()
    )
    self_corr = correlation(a, a)
    diag = torch.stack(
        [self_corr[:, h, w, h, w] for h in range(3) for w in range(4)], dim=-1
    )
    torch.testing.assert_close(diag, torch.ones_like(diag))
    torch.testing.assert_close(self_corr, self_corr.permute(0, 3, 4, 1, 2))


def test_sample_points_integer_grid_is_indexing():
    maps = _randn(2, 3, 5, 7, seed=16)
    h, w = maps.shape[-2:]
    rows = torch.tensor([0, 4, 2, 1])
    cols = torch.tensor([0, 6, 3, 5])
    # align_corners=True: -1 and 1 are the centres of the corner pixels
    x = cols.double() / (w - 1) * 2 - 1
    y = rows.double() / (h - 1) * 2 - 1
    coords = torch.stack([x, y], dim=-1).float().reshape(1, 2, 2, 2).repeat(2, 1, 1, 1)
    out = sample_points(maps, coords)
    assert out.shape == (2, 3, 2, 2)
    want = maps[:, :, rows, cols].reshape(2, 3, 2, 2)
    torch.testing.assert_close(out, want)
    # corners, and border padding outside [-1, 1]
    corners = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0], [-3.0, 0.0], [1.0, -1.0]]]])
    out = sample_points(maps[:1], corners)[0, :, 0]
    want = torch.stack(
        [
            maps[0, :, 0, 0],
            maps[0, :, -1, -1],
            maps[0, :, h // 2, 0],
            maps[0, :, 0, -1],
        ],
        dim=-1,
    )
    torch.testing.assert_close(out, want)


def test_sample_points_bilinear_midpoint():
    maps = _randn(1, 2, 3, 3, seed=17)
    coords = torch.tensor([[[[-0.5, -1.0]]]])  # halfway between columns 0 and 1
    out = sample_points(maps, coords)[0, :, 0, 0]
    torch.testing.assert_close(out, (maps[0, :, 0, 0] + maps[0, :, 0, 1]) / 2)


def test_random_coords_shape_range_determinism():
    c = random_coords(4, 11, generator=torch.Generator().manual_seed(3))
    assert c.shape == (4, 11, 11, 2)
    assert c.dtype == torch.float32
    assert c.min() >= -1 and c.max() <= 1
    assert c.min() < -0.9 and c.max() > 0.9
    torch.testing.assert_close(
        c, random_coords(4, 11, generator=torch.Generator().manual_seed(3))
    )
    assert random_coords(2, 3, device="cpu").device.type == "cpu"


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_derangement_no_fixed_points(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(50):
        p = derangement(n, generator=g)
        assert p.dtype == torch.int64
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == torch.arange(n)).any()
    p1 = derangement(n, generator=torch.Generator().manual_seed(1))
    p2 = derangement(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p1, p2)


def test_derangement_covers_all_derangements_of_3():
    g = torch.Generator().manual_seed(0)
    seen = {tuple(derangement(3, generator=g).tolist()) for _ in range(100)}
    assert seen == {(1, 2, 0), (2, 0, 1)}


def _derangements(n):
    """Every permutation of range(n) without a fixed point, by enumeration."""
    return {
        p for p in itertools.permutations(range(n)) if all(p[i] != i for i in range(n))
    }


def test_derangement_is_uniform_over_all_derangements_of_4():
    # D_4 = 9: six 4-cycles and three double transpositions such as
    # (1, 0, 3, 2), which a cyclic-only scheme (Sattolo, shifts of a sorted
    # order) never draws. 9000 draws: each count is Binomial(9000, 1/9),
    # mean 1000, sd 29.8; 1000 +- 150 is a 5-sd band.
    g = torch.Generator().manual_seed(0)
    counts = {}
    for _ in range(9000):
        p = tuple(derangement(4, generator=g).tolist())
        counts[p] = counts.get(p, 0) + 1
    assert set(counts) == _derangements(4)
    assert all(850 <= c <= 1150 for c in counts.values()), counts


@pytest.mark.parametrize("n", [5, 6])
def test_derangement_covers_every_derangement(n):
    g = torch.Generator().manual_seed(n)
    want = _derangements(n)  # 44 and 265
    seen = {tuple(derangement(n, generator=g).tolist()) for _ in range(40 * len(want))}
    assert seen == want


@pytest.mark.parametrize("n", [100, 70_000])
def test_derangement_large_n(n):
    # above n = 65536 fewer candidates are drawn at once
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        p = derangement(n, generator=g)
        assert torch.equal(p.sort().values, torch.arange(n))
        assert not (p == torch.arange(n)).any()


def test_derangement_fallback_is_an_n_cycle(monkeypatch):
    # With a single candidate the fallback runs whenever it has a fixed
    # point (2/3 of the draws for n = 3, 5/8 for n = 4): still a
    # derangement, and then a single n-cycle.
    import skstego.losses as losses

    monkeypatch.setattr(losses, "_DERANGEMENT_CANDIDATES", 1)
    g = torch.Generator().manual_seed(0)
    for n in (3, 4, 7):
        for _ in range(100):
            p = derangement(n, generator=g).tolist()
            assert all(p[i] != i for i in range(n))
    # n = 4: the 9 derangements include 3 double transpositions; the
    # fallback draws 4-cycles only, so their share drops below 3/9.
    draws = [tuple(derangement(4, generator=g).tolist()) for _ in range(2000)]
    doubles = sum(1 for p in draws if p[p[0]] == 0)
    assert doubles < 0.2 * len(draws)


@pytest.mark.parametrize("n", [0, 1, -1])
def test_derangement_small_n_raises(n):
    with pytest.raises(ValueError, match="n >= 2"):
        derangement(n)


def _batch(b=4, c=8, d=5, h=6, w=7, seed=20):
    feats = _randn(b, c, h, w, seed=seed)
    knn = _randn(b, c, h, w, seed=seed + 1)
    codes = feats[:, :d] + 0.5 * _randn(b, d, h, w, seed=seed + 2)
    knn_codes = knn[:, :d] + 0.5 * _randn(b, d, h, w, seed=seed + 3)
    return feats, codes, knn, knn_codes


@pytest.mark.parametrize(
    ("pointwise", "zero_clamp", "stabilize"), [FLAGS[0], FLAGS[-1]]
)
def test_stego_loss_is_weighted_sum_of_replayed_parts(pointwise, zero_clamp, stabilize):
    feats, codes, knn, knn_codes = _batch()
    kw = {
        "pos_intra_weight": 0.3,
        "pos_inter_weight": 0.7,
        "neg_weight": 1.1,
        "pos_intra_shift": 0.1,
        "pos_inter_shift": 0.05,
        "neg_shift": 0.5,
        "neg_samples": 3,
        "feature_samples": 4,
        "pointwise": pointwise,
        "zero_clamp": zero_clamp,
        "stabilize": stabilize,
    }
    total, parts = stego_loss(
        feats, codes, knn, knn_codes, generator=torch.Generator().manual_seed(42), **kw
    )

    # Replay the documented order of draws.
    g = torch.Generator().manual_seed(42)
    coords1 = random_coords(4, 4, generator=g)
    coords2 = random_coords(4, 4, generator=g)
    perms = [derangement(4, generator=g) for _ in range(3)]
    flags = {"pointwise": pointwise, "zero_clamp": zero_clamp, "stabilize": stabilize}
    f1, c1 = sample_points(feats, coords1), sample_points(codes, coords1)
    f2, c2 = sample_points(knn, coords2), sample_points(knn_codes, coords2)
    intra = _reference_loss(f1, f1, c1, c1, 0.1, **flags)
    inter = _reference_loss(f1, f2, c1, c2, 0.05, **flags)
    neg = np.mean(
        [
            _reference_loss(
                f1,
                sample_points(feats[p], coords2),
                c1,
                sample_points(codes[p], coords2),
                0.5,
                **flags,
            )
            for p in perms
        ]
    )
    np.testing.assert_allclose(parts["pos_intra"].item(), intra, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["pos_inter"].item(), inter, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["neg"].item(), neg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        total.item(), 0.3 * intra + 0.7 * inter + 1.1 * neg, rtol=1e-5, atol=1e-6
    )


def test_stego_loss_defaults_and_determinism():
    feats, codes, knn, knn_codes = _batch()
    t1, p1 = stego_loss(
        feats, codes, knn, knn_codes, generator=torch.Generator().manual_seed(0)
    )
    t2, p2 = stego_loss(
        feats, codes, knn, knn_codes, generator=torch.Generator().manual_seed(0)
    )
    t3, _ = stego_loss(
        feats, codes, knn, knn_codes, generator=torch.Generator().manual_seed(1)
    )
    assert t1.shape == ()
    assert torch.equal(t1, t2)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not torch.equal(t1, t3)
    want = 0.67 * p1["pos_intra"] + 0.25 * p1["pos_inter"] + 0.63 * p1["neg"]
    torch.testing.assert_close(t1, want)


def test_stego_loss_no_negatives_and_other_partner_size():
    feats, codes, _, _ = _batch(b=1)
    knn, knn_codes = _randn(1, 8, 3, 4, seed=30), _randn(1, 5, 3, 4, seed=31)
    total, parts = stego_loss(
        feats, codes, knn, knn_codes, neg_samples=0, neg_weight=1.0
    )
    assert parts["neg"].item() == 0
    torch.testing.assert_close(
        total, 0.67 * parts["pos_intra"] + 0.25 * parts["pos_inter"]
    )


@pytest.mark.parametrize(
    ("which", "shape", "match"),
    [
        ("feats", (4, 8, 6), "4-D"),
        ("codes", (3, 5, 6, 7), "batch"),
        ("codes", (4, 5, 6, 6), "spatial"),
        ("knn", (4, 9, 6, 7), "channels"),
        ("knn", (2, 8, 6, 7), "batch"),
        ("knn_codes", (4, 6, 6, 7), "channels"),
        ("knn_codes", (4, 5, 5, 7), "spatial"),
    ],
)
def test_stego_loss_bad_shapes_raise(which, shape, match):
    arrays = dict(zip(("feats", "codes", "knn", "knn_codes"), _batch(), strict=True))
    arrays[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        stego_loss(*arrays.values())


def test_stego_loss_batch_of_one_with_negatives_raises():
    feats, codes, knn, knn_codes = _batch(b=1)
    with pytest.raises(ValueError, match="at least 2"):
        stego_loss(feats, codes, knn, knn_codes)
    with pytest.raises(ValueError, match="neg_samples"):
        stego_loss(*_batch(), neg_samples=-1)


def test_correlation_loss_bad_shapes_raise():
    f = torch.zeros(2, 8, 4, 4)
    c = torch.zeros(2, 5, 4, 4)
    with pytest.raises(ValueError, match="4-D"):
        correlation_loss(f[0], f, c, c, 0.0)
    with pytest.raises(ValueError, match="channels"):
        correlation_loss(f, f[:, :7], c, c, 0.0)
    with pytest.raises(ValueError, match="batch"):
        correlation_loss(f, f, c, c[:1], 0.0)
    with pytest.raises(ValueError, match="spatial"):
        correlation_loss(f, f, c[..., :3], c[..., :3], 0.0)
    with pytest.raises(ValueError, match="channels"):
        correlation(f, c)
    with pytest.raises(ValueError, match="batch"):
        sample_points(f, torch.zeros(3, 2, 2, 2))
    with pytest.raises(ValueError, match="coords"):
        sample_points(f, torch.zeros(2, 2, 2, 3))
    with pytest.raises(ValueError, match="feature_samples"):
        random_coords(2, 0)
