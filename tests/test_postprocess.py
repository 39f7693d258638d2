"""Tests of skstego.postprocess: dense CRF mean-field on torch.

The exact method is checked against an O(N^2) float64 NumPy mean-field
written out here from the model (full kernel matrices); the lattice against
the exact method and, when pydensecrf is installed, against pydensecrf.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone

import skstego.postprocess as pp
from skstego.datasets import make_scenes
from skstego.metrics import mean_iou, pixel_accuracy
from skstego.postprocess import DenseCRF, crf_refine

STEGO = dict(
    gaussian_sxy=1.0,
    gaussian_compat=3.0,
    bilateral_sxy=67.0,
    bilateral_srgb=3.0,
    bilateral_compat=4.0,
)


# --------------------------------------------------------------------------
# independent float64 reference
# --------------------------------------------------------------------------
def reference_crf(
    image,
    proba,
    n_iter=10,
    gaussian_sxy=1.0,
    gaussian_compat=3.0,
    bilateral_sxy=67.0,
    bilateral_srgb=3.0,
    bilateral_compat=4.0,
):
    """Mean-field of densecrf's model on one (H, W, 3) image, (K, H, W) proba.

    Unary -log(clip(p, 1e-5, 1)); Potts pairwise with kernel matrices
    normalised symmetrically, D^-1/2 K D^-1/2 with D = diag(K 1), the pixel
    itself included; Q <- softmax(-U + sum_k w_k A_k Q).
    """
    h, w, _ = image.shape
    k = proba.shape[0]
    n = h * w
    yy, xx = np.mgrid[:h, :w]
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    col = image.reshape(n, 3).astype(np.float64)
    d_pos = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    d_col = ((col[:, None, :] - col[None, :, :]) ** 2).sum(-1)
    kernels = [
        (gaussian_compat, np.exp(-d_pos / (2 * gaussian_sxy**2))),
        (
            bilateral_compat,
            np.exp(-d_pos / (2 * bilateral_sxy**2) - d_col / (2 * bilateral_srgb**2)),
        ),
    ]
    messages = []
    for weight, K in kernels:
        deg = K.sum(1)
        messages.append(weight * K / np.sqrt(deg[:, None] * deg[None, :]))
    log_p = np.log(np.clip(proba.reshape(k, n).astype(np.float64), 1e-5, 1.0))

    def softmax(e):
        e = e - e.max(0)
        q = np.exp(e)
        return q / q.sum(0)

    Q = softmax(log_p)
    for _ in range(n_iter):
        Q = softmax(log_p + sum(A @ Q.T for A in messages).T)
    return Q.reshape(k, h, w)


def random_proba(rng, shape, scale=2.0):
    logits = rng.normal(size=shape) * scale
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def noisy_proba(labels, n_classes, rng, noise=1.0):
    """One-hot ground truth plus Gaussian noise, softmaxed over classes."""
    onehot = np.eye(n_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
    logits = onehot + noise * rng.normal(size=onehot.shape).astype(np.float32)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def tiny():
    images, _ = make_scenes(2, size=(12, 10), n_classes=3, random_state=0)
    proba = random_proba(np.random.default_rng(0), (2, 3, 12, 10))
    return images, proba


# --------------------------------------------------------------------------
# exact method against the float64 reference
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"n_iter": 0},
        {"n_iter": 1},
        {"n_iter": 3, "gaussian_compat": 0.0},
        {"n_iter": 5, "bilateral_compat": 0.0},
        {
            "gaussian_sxy": 2.5,
            "gaussian_compat": 1.0,
            "bilateral_sxy": 5.0,
            "bilateral_srgb": 20.0,
            "bilateral_compat": 2.0,
        },
        {"bilateral_srgb": 40.0, "bilateral_compat": -1.5, "gaussian_compat": 6.0},
    ],
)
def test_exact_matches_float64_reference(tiny, params):
    images, proba = tiny
    out = crf_refine(images, proba, method="exact", device="cpu", **params)
    expected = np.stack(
        [reference_crf(im, p, **params) for im, p in zip(images, proba, strict=True)]
    )
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_exact_matches_reference_banded_gaussian():
    # 20 x 24 pixels: the sxy=1 Gaussian (radius 7) is filtered in bands
    images, _ = make_scenes(1, size=(20, 24), n_classes=4, random_state=3)
    proba = random_proba(np.random.default_rng(3), (1, 4, 20, 24))
    out = crf_refine(images, proba, method="exact", device="cpu", n_iter=4)
    expected = reference_crf(images[0], proba[0], n_iter=4)
    np.testing.assert_allclose(out[0], expected, atol=2e-6)


def test_exact_blocks_do_not_change_the_result(tiny, monkeypatch):
    images, proba = tiny
    whole = crf_refine(images, proba, method="exact", device="cpu")
    monkeypatch.setattr(pp, "_BLOCK_ELEMENTS", 7 * 120)  # a few rows per block
    blocked = crf_refine(images, proba, method="exact", device="cpu")
    np.testing.assert_allclose(blocked, whole, atol=1e-6)


def test_zero_iterations_return_clipped_normalised_input(tiny):
    images, proba = tiny
    proba = proba.copy()
    proba[0, :, 0, 0] = [1.0, 0.0, 0.0]
    out = crf_refine(images, proba, n_iter=0, device="cpu")
    clipped = np.clip(proba.astype(np.float64), 1e-5, 1.0)
    np.testing.assert_allclose(out, clipped / clipped.sum(1, keepdims=True), atol=1e-7)


# --------------------------------------------------------------------------
# the lattice
# --------------------------------------------------------------------------
def test_approx_close_to_exact_on_small_scenes():
    # measured on these scenes: mean |diff| 0.004-0.013, labels agree 97-99.5 %
    for seed in range(3):
        images, labels = make_scenes(3, size=32, n_classes=3, random_state=seed)
        proba = noisy_proba(labels, 3, np.random.default_rng(seed))
        exact = crf_refine(images, proba, method="exact", device="cpu")
        approx = crf_refine(images, proba, method="approx", device="cpu")
        assert np.abs(approx - exact).mean() < 0.02
        assert (approx.argmax(1) == exact.argmax(1)).mean() > 0.96
        np.testing.assert_allclose(approx.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("d, tolerance", [(2, 0.12), (5, 0.35)])
def test_lattice_kernel_approximates_unit_gaussian(d, tolerance):
    # the lattice filter is a linear map; its matrix (filtering the identity)
    # against exp(-|f_i - f_j|^2 / 2), up to a global scale (which the
    # symmetric normalisation removes). Measured: 0.09 (d=2), 0.30 (d=5).
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(1, 500, d, generator=gen) * 6
    lattice = pp._Lattice(feats)
    K_lattice = lattice.filter(torch.eye(500)).double().numpy()
    sq = ((feats[0, :, None] - feats[0, None]) ** 2).sum(-1).double().numpy()
    K_exact = np.exp(-sq / 2)
    scale = (K_lattice * K_exact).sum() / (K_exact * K_exact).sum()
    error = np.linalg.norm(K_lattice - scale * K_exact) / np.linalg.norm(
        scale * K_exact
    )
    assert error < tolerance
    # and not a trivial map: far pairs get (almost) nothing
    assert K_lattice[sq > 36].max() < 0.01 * K_lattice.diagonal().mean()


def test_lattice_batch_equals_one_image_at_a_time():
    images, labels = make_scenes(3, size=(20, 28), n_classes=4, random_state=1)
    proba = noisy_proba(labels, 4, np.random.default_rng(1))
    batch = crf_refine(images, proba, method="approx", device="cpu")
    for i in range(3):
        one = crf_refine(images[i], proba[i], method="approx", device="cpu")
        np.testing.assert_allclose(batch[i], one, atol=1e-5)


def test_lattice_row_unique_fallback_matches_packed_codes(monkeypatch):
    images, labels = make_scenes(2, size=24, n_classes=3, random_state=2)
    proba = noisy_proba(labels, 3, np.random.default_rng(2))
    packed = crf_refine(images, proba, method="approx", device="cpu")
    monkeypatch.setattr(pp, "_MAX_CODE", 0)  # keys no longer fit: unique rows
    rows = crf_refine(images, proba, method="approx", device="cpu")
    np.testing.assert_allclose(rows, packed, atol=1e-6)


def test_approx_reproduces_pydensecrf():
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    utils = pytest.importorskip("pydensecrf.utils")
    images, labels = make_scenes(2, size=40, n_classes=4, random_state=4)
    proba = noisy_proba(labels, 4, np.random.default_rng(4))
    # bilateral only: pydensecrf puts the Gaussian kernel on a lattice too,
    # skstego filters it exactly
    out = crf_refine(images, proba, method="approx", gaussian_compat=0, device="cpu")
    for image, p, q in zip(images, proba, out, strict=True):
        crf = dcrf.DenseCRF2D(40, 40, 4)
        crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(p)))
        # STEGO hands pydensecrf the image in BGR order
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=bgr, compat=4)
        expected = np.array(crf.inference(10)).reshape(4, 40, 40)
        np.testing.assert_allclose(q, expected, atol=1e-4)


# --------------------------------------------------------------------------
# the CRF helps
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["exact", "approx"])
def test_crf_raises_miou_on_noisy_scenes(method):
    # measured: mIoU 0.30-0.37 -> 0.72-0.97, pixel accuracy -> 0.96-0.996
    for seed in range(3):
        images, labels = make_scenes(3, size=32, n_classes=4, random_state=seed)
        proba = noisy_proba(labels, 4, np.random.default_rng(10 + seed))
        before = mean_iou(labels, proba.argmax(1))
        predicted = DenseCRF(method=method, device="cpu").predict(images, proba)
        after = mean_iou(labels, predicted)
        assert after > before + 0.3, (seed, before, after)
        assert pixel_accuracy(labels, predicted) > 0.95
        assert pixel_accuracy(labels, proba.argmax(1)) < 0.75


# --------------------------------------------------------------------------
# input and output types
# --------------------------------------------------------------------------
def test_torch_inputs_give_torch_outputs_and_same_values(tiny):
    images, proba = tiny
    expected = crf_refine(images, proba, device="cpu")
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = crf_refine(chw, torch.from_numpy(proba), device="cpu")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    # float images in [0, 1], torch images with NumPy proba
    out = crf_refine(chw.float() / 255, proba, device="cpu")
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_single_image(tiny):
    images, proba = tiny
    both = crf_refine(images, proba, device="cpu")
    one = crf_refine(images[1], proba[1], device="cpu")
    assert one.shape == proba.shape[1:]
    np.testing.assert_allclose(one, both[1], atol=1e-6)
    labels = DenseCRF(device="cpu").predict(images[1], proba[1])
    assert labels.shape == images.shape[1:3] and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, both[1].argmax(0))


def test_low_resolution_proba_is_upsampled_bilinearly():
    images, _ = make_scenes(2, size=(24, 16), n_classes=3, random_state=0)
    low = random_proba(np.random.default_rng(1), (2, 3, 6, 4))
    up = F.interpolate(
        torch.from_numpy(low), size=(24, 16), mode="bilinear", align_corners=False
    ).numpy()
    out = crf_refine(images, low, n_iter=2, device="cpu")
    assert out.shape == (2, 3, 24, 16)
    np.testing.assert_allclose(
        out, crf_refine(images, up, n_iter=2, device="cpu"), atol=1e-6
    )


def test_dense_crf_estimator(tiny):
    images, proba = tiny
    crf = DenseCRF(5, bilateral_srgb=10.0, method="exact", device="cpu")
    assert repr(crf) == (
        "DenseCRF(bilateral_srgb=10.0, device='cpu', method='exact', n_iter=5)"
    )
    twin = clone(crf)
    assert twin.get_params() == crf.get_params()
    refined = twin.refine(images, proba)
    np.testing.assert_allclose(
        refined,
        crf_refine(images, proba, n_iter=5, bilateral_srgb=10.0, device="cpu"),
        atol=1e-7,
    )
    labels = crf.predict(
        torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(proba)
    )
    assert labels.dtype == torch.int64 and labels.shape == (2, 12, 10)
    np.testing.assert_array_equal(labels.numpy(), refined.argmax(1))


def test_inputs_not_modified(tiny):
    images, proba = tiny
    images_c, proba_c = images.copy(), proba.copy()
    crf_refine(images, proba, device="cpu")
    np.testing.assert_array_equal(images, images_c)
    np.testing.assert_array_equal(proba, proba_c)
    t_images = torch.from_numpy(images_c).permute(0, 3, 1, 2).float() / 255
    t_proba = torch.from_numpy(proba_c)
    before = (t_images.clone(), t_proba.clone())
    crf_refine(t_images, t_proba, method="approx", device="cpu")
    assert torch.equal(t_images, before[0]) and torch.equal(t_proba, before[1])


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------
def test_bad_images(tiny):
    images, proba = tiny
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\).*got \(2, 12, 10\)"):
        crf_refine(images[..., 0], proba)
    with pytest.raises(TypeError, match="uint8"):
        crf_refine(images.astype(np.float32), proba)
    with pytest.raises(ValueError, match="channels-first"):
        crf_refine(torch.from_numpy(images), proba)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crf_refine(torch.from_numpy(images).permute(0, 3, 1, 2).float(), proba)
    with pytest.raises(ValueError, match="different numbers of images: 1 and 2"):
        crf_refine(images[:1], proba)


def test_bad_proba(tiny):
    images, proba = tiny
    with pytest.raises(ValueError, match=r"\(N, K, H, W\).*got \(2, 3\)"):
        crf_refine(images, proba[:, :, 0, 0])
    with pytest.raises(ValueError, match="different numbers of images: 2 and 1"):
        crf_refine(images, proba[0])
    with pytest.raises(TypeError, match="real-valued"):
        crf_refine(images, proba.astype(np.complex64))
    with pytest.raises(ValueError, match="negative"):
        crf_refine(images, np.log(proba))
    nan = proba.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        crf_refine(images, nan)
    with pytest.raises(ValueError, match="NaN"):
        crf_refine(images, torch.from_numpy(nan))
    with pytest.raises(ValueError, match="sum to 1"):
        crf_refine(images, proba * 2)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_iter": -1}, "n_iter"),
        ({"n_iter": 1.5}, "n_iter"),
        ({"method": "fast"}, "method"),
        ({"bilateral_srgb": 0.0}, "bilateral_srgb"),
        ({"gaussian_sxy": -1.0}, "gaussian_sxy"),
        ({"bilateral_compat": np.inf}, "bilateral_compat"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_parameters(tiny, params, message):
    images, proba = tiny
    with pytest.raises(ValueError, match=message):
        crf_refine(images, proba, **params)
    with pytest.raises(ValueError, match=message):
        DenseCRF(**params).refine(images, proba)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    images, labels = make_scenes(2, size=48, n_classes=5, random_state=0)
    proba = noisy_proba(labels, 5, np.random.default_rng(0))
    for method in ("exact", "approx"):
        cpu = crf_refine(images, proba, method=method, device="cpu")
        gpu = crf_refine(
            images, torch.from_numpy(proba).cuda(), method=method, device="cuda"
        )
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu, atol=1e-3)
