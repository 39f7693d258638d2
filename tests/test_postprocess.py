"""Tests of skstego.postprocess: dense CRF mean-field on torch and pydensecrf.

The exact method is checked against an O(N^2) float64 NumPy mean-field
written out from the model (full kernel matrices; ``reference_crf`` in
tests/_references.py); the lattice against
the exact method and, when pydensecrf is installed, against pydensecrf
called as STEGO's ``dense_crf`` calls it. The pydensecrf backend is checked
against that same call.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _references import reference_crf
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


#: CRF settings both the float64 reference and pydensecrf are checked with:
#: the defaults, no or few iterations, each kernel switched off, other widths
#: and a negative compatibility.
CRF_PARAMS = [
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
]


# --------------------------------------------------------------------------
# exact method against the float64 reference
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    CRF_PARAMS,
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
@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_approx_close_to_exact_on_small_scenes(backend):
    # measured on these scenes: mean |diff| 0.004-0.013, labels agree 97-99.5 %
    # (torch); pydensecrf also puts the Gaussian kernel on a lattice
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
    for seed in range(3):
        images, labels = make_scenes(3, size=32, n_classes=3, random_state=seed)
        proba = noisy_proba(labels, 3, np.random.default_rng(seed))
        exact = crf_refine(images, proba, method="exact", device="cpu")
        approx = crf_refine(
            images, proba, method="approx", backend=backend, device="cpu"
        )
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
    batch = crf_refine(images, proba, method="approx", backend="torch", device="cpu")
    for i in range(3):
        one = crf_refine(
            images[i], proba[i], method="approx", backend="torch", device="cpu"
        )
        np.testing.assert_allclose(batch[i], one, atol=1e-5)


def test_lattice_row_unique_fallback_matches_packed_codes(monkeypatch):
    images, labels = make_scenes(2, size=24, n_classes=3, random_state=2)
    proba = noisy_proba(labels, 3, np.random.default_rng(2))
    kwargs = dict(method="approx", backend="torch", device="cpu")
    packed = crf_refine(images, proba, **kwargs)
    monkeypatch.setattr(pp, "_MAX_CODE", 0)  # keys no longer fit: unique rows
    rows = crf_refine(images, proba, **kwargs)
    np.testing.assert_allclose(rows, packed, atol=1e-6)


def stego_dense_crf(image, proba, n_iter=10, **params):
    """STEGO's ``dense_crf`` on one (H, W, 3) image and (K, H, W) proba.

    pydensecrf called as the reference calls it (``unary_from_softmax``,
    ``addPairwiseGaussian``, ``addPairwiseBilateral`` on the BGR image);
    ``params`` override STEGO's settings, a compat of 0 leaves a term out.
    """
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    utils = pytest.importorskip("pydensecrf.utils")
    p = {**STEGO, **params}
    k, h, w = proba.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(proba)))
    if p["gaussian_compat"] != 0:
        crf.addPairwiseGaussian(sxy=p["gaussian_sxy"], compat=p["gaussian_compat"])
    if p["bilateral_compat"] != 0:
        # STEGO hands pydensecrf the image in BGR order
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        crf.addPairwiseBilateral(
            sxy=p["bilateral_sxy"],
            srgb=p["bilateral_srgb"],
            rgbim=bgr,
            compat=p["bilateral_compat"],
        )
    return np.array(crf.inference(n_iter)).reshape(k, h, w)


def test_approx_reproduces_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf")
    images, labels = make_scenes(2, size=40, n_classes=4, random_state=4)
    proba = noisy_proba(labels, 4, np.random.default_rng(4))
    # bilateral only: pydensecrf puts the Gaussian kernel on a lattice too,
    # the torch code filters it exactly. Measured: max |diff| 3e-5.
    out = crf_refine(
        images, proba, gaussian_compat=0, method="approx", backend="torch", device="cpu"
    )
    for image, p, q in zip(images, proba, out, strict=True):
        expected = stego_dense_crf(image, p, gaussian_compat=0)
        np.testing.assert_allclose(q, expected, atol=1e-4)


@pytest.mark.parametrize("size, n_classes, seed", [(64, 5, 0), (64, 5, 1), (96, 27, 0)])
def test_torch_lattice_agrees_with_pydensecrf_at_stego_settings(size, n_classes, seed):
    # both kernels: the torch code filters the Gaussian exactly, pydensecrf on
    # a 2-D lattice, so a few pixels near a decision may flip. Measured:
    # mean |diff| 6e-5, 1.4e-4, 3.4e-4; labels agree on 100, 99.99, 99.57 %.
    # Wrong models fail: without the Gaussian term mean |diff| 0.017-0.052;
    # srgb 4 instead of 3, 5e-4 to 1.7e-3 (labels 97.4 % at 96 x 96); RGB
    # instead of BGR, 3.7e-4 to 7.7e-4 (labels 98.6 %); sxy 60 instead of 67,
    # labels 99.0 % at 96 x 96.
    pytest.importorskip("pydensecrf.densecrf")
    images, labels = make_scenes(2, size=size, n_classes=n_classes, random_state=seed)
    proba = noisy_proba(labels, n_classes, np.random.default_rng(seed))
    out = crf_refine(images, proba, method="approx", backend="torch", device="cpu")
    expected = np.stack(
        [stego_dense_crf(im, p) for im, p in zip(images, proba, strict=True)]
    )
    assert np.abs(out - expected).mean() < 5e-4
    assert (out.argmax(1) == expected.argmax(1)).mean() > 0.994


# --------------------------------------------------------------------------
# the pydensecrf backend
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    CRF_PARAMS,
)
def test_pydensecrf_backend_is_stegos_dense_crf(params):
    # the same features, unary and calls: bit for bit
    pytest.importorskip("pydensecrf.densecrf")
    images, labels = make_scenes(2, size=(36, 44), n_classes=4, random_state=5)
    proba = noisy_proba(labels, 4, np.random.default_rng(5))
    out = crf_refine(images, proba, backend="pydensecrf", device="cpu", **params)
    assert out.dtype == np.float32 and out.shape == proba.shape
    for image, p, q in zip(images, proba, out, strict=True):
        expected = stego_dense_crf(image, p, **params)
        np.testing.assert_array_equal(q, expected)


def test_pydensecrf_backend_inputs():
    # low-resolution proba are upsampled as for torch; float images in [0, 1]
    # and torch tensors give the uint8 result; torch in, torch out
    pytest.importorskip("pydensecrf.densecrf")
    images, _ = make_scenes(2, size=(40, 36), n_classes=3, random_state=6)
    low = random_proba(np.random.default_rng(6), (2, 3, 10, 9))
    up = F.interpolate(
        torch.from_numpy(low), size=(40, 36), mode="bilinear", align_corners=False
    ).numpy()
    out = crf_refine(images, low, backend="pydensecrf", device="cpu")
    for image, p, q in zip(images, up, out, strict=True):
        np.testing.assert_array_equal(q, stego_dense_crf(image, p))
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    for t_images in (chw, chw.float() / 255):
        t_out = crf_refine(t_images, torch.from_numpy(low), backend="pydensecrf")
        assert isinstance(t_out, torch.Tensor) and t_out.device.type == "cpu"
        np.testing.assert_allclose(t_out.numpy(), out, atol=1e-6)
    one = crf_refine(images[1], low[1], backend="pydensecrf", device="cpu")
    np.testing.assert_allclose(one, out[1], atol=1e-7)


def test_auto_backend_and_backend_attribute(monkeypatch):
    pytest.importorskip("pydensecrf.densecrf")
    big, labels = make_scenes(2, size=40, n_classes=3, random_state=7)
    proba = noisy_proba(labels, 3, np.random.default_rng(7))
    # the lattice on the CPU (above 32 x 32 pixels): pydensecrf
    crf = DenseCRF(device="cpu")
    refined = crf.refine(big, proba)
    assert crf.backend_ == "pydensecrf"
    pyd = [stego_dense_crf(im, p) for im, p in zip(big, proba, strict=True)]
    np.testing.assert_array_equal(refined, np.stack(pyd))
    np.testing.assert_array_equal(crf.predict(big, proba), refined.argmax(1))
    # small images: the exact method, which only torch has
    small, small_labels = make_scenes(1, size=16, n_classes=3, random_state=7)
    small_proba = noisy_proba(small_labels, 3, np.random.default_rng(7))
    exact = crf.refine(small, small_proba)
    assert crf.backend_ == "torch"
    np.testing.assert_allclose(
        exact[0], reference_crf(small[0], small_proba[0]), atol=2e-6
    )
    # explicit torch
    torch_crf = DenseCRF(backend="torch", device="cpu")
    lattice = torch_crf.refine(big, proba)
    assert torch_crf.backend_ == "torch"
    assert np.abs(lattice - refined).max() > 1e-4  # another implementation
    # without pydensecrf, "auto" falls back to the torch lattice
    monkeypatch.setattr(pp, "_pydensecrf", lambda: None)
    np.testing.assert_array_equal(crf.refine(big, proba), lattice)
    assert crf.backend_ == "torch"
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        crf_refine(big, proba, backend="pydensecrf", device="cpu")


def test_crf_probe_uses_the_same_backend():
    # CRFProbe's default DenseCRF() takes the same route as crf_refine
    pytest.importorskip("pydensecrf.densecrf")
    from skstego import CRFProbe, KMeansProbe

    images, _ = make_scenes(2, size=40, n_classes=3, random_state=8)
    codes = (images.transpose(0, 3, 1, 2)[:, :, ::5, ::5] / 255.0).astype(np.float32)
    km = KMeansProbe(k=3, metric="euclidean", device="cpu", random_state=0)
    probe = CRFProbe(km).fit(codes)
    proba = probe.probe_.predict_proba(codes, size=(40, 40))
    expected = np.stack(
        [stego_dense_crf(im, p) for im, p in zip(images, proba, strict=True)]
    )
    np.testing.assert_allclose(
        probe.predict_proba(codes, images=images), expected, atol=1e-6
    )
    crf = DenseCRF(device="cpu")
    CRFProbe(km, crf).fit(codes).predict(codes, images=images)
    assert crf.backend_ == "pydensecrf"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"method": "exact"}, "only the permutohedral lattice"),
        ({"device": "cuda"}, "runs on the CPU"),
    ],
)
def test_pydensecrf_backend_bad_combinations(tiny, monkeypatch, params, message):
    images, proba = tiny
    real = pp.resolve_device
    # a CUDA device without a GPU: the check must come before any CUDA work
    monkeypatch.setattr(
        pp,
        "resolve_device",
        lambda d: torch.device("cuda") if d == "cuda" else real(d),
    )
    with pytest.raises(ValueError, match=message):
        crf_refine(images, proba, backend="pydensecrf", **params)
    with pytest.raises(ValueError, match=message):
        DenseCRF(backend="pydensecrf", **params).refine(images, proba)


# --------------------------------------------------------------------------
# the CRF helps
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, backend",
    [("exact", "torch"), ("approx", "torch"), ("approx", "pydensecrf")],
)
def test_crf_raises_miou_on_noisy_scenes(method, backend):
    # measured: mIoU 0.30-0.37 -> 0.72-0.97, pixel accuracy -> 0.96-0.996
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
    for seed in range(3):
        images, labels = make_scenes(3, size=32, n_classes=4, random_state=seed)
        proba = noisy_proba(labels, 4, np.random.default_rng(10 + seed))
        before = mean_iou(labels, proba.argmax(1))
        crf = DenseCRF(method=method, backend=backend, device="cpu")
        predicted = crf.predict(images, proba)
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
    for backend in ("torch", "pydensecrf"):
        if backend == "pydensecrf" and pp._pydensecrf() is None:
            continue
        crf_refine(t_images, t_proba, method="approx", backend=backend, device="cpu")
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
        ({"backend": "cpp"}, "backend"),
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
        cpu = crf_refine(images, proba, method=method, backend="torch", device="cpu")
        gpu = crf_refine(
            images, torch.from_numpy(proba).cuda(), method=method, device="cuda"
        )
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu, atol=1e-3)
