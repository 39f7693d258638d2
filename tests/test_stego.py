"""Tests for StegoProjector: head, layouts, training, determinism, pickling."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from skstego.datasets import make_feature_maps
from skstego.losses import derangement
from skstego.projection._stego import PRESETS, StegoProjector


def _stego(**params):
    params.setdefault("dim", 4)
    params.setdefault("n_steps", 3)
    params.setdefault("batch_size", 4)
    params.setdefault("feature_samples", 5)
    params.setdefault("device", "cpu")
    params.setdefault("random_state", 0)
    return StegoProjector(**params)


def _maps(n=6, c=8, h=5, w=4, seed=0):
    return np.random.RandomState(seed).standard_normal((n, c, h, w)).astype(np.float32)


def _reference_head(state, maps):
    """The head written with torch modules: linear + (conv, ReLU, conv)."""
    c = maps.shape[1]
    dim = state["linear.weight"].shape[0]
    linear = torch.nn.Conv2d(c, dim, 1)
    nonlinear = torch.nn.Sequential(
        torch.nn.Conv2d(c, c, 1), torch.nn.ReLU(), torch.nn.Conv2d(c, dim, 1)
    )
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(state["linear.weight"])[:, :, None, None])
        linear.bias.copy_(torch.from_numpy(state["linear.bias"]))
        for i in (0, 2):
            w = torch.from_numpy(state[f"nonlinear.{i}.weight"])[:, :, None, None]
            nonlinear[i].weight.copy_(w)
            nonlinear[i].bias.copy_(torch.from_numpy(state[f"nonlinear.{i}.bias"]))
        x = torch.from_numpy(maps)
        return (linear(x) + nonlinear(x)).numpy()


def test_head_matches_torch_modules():
    X = _maps()
    est = _stego().fit(X)
    state = est.head_state_
    assert state["linear.weight"].shape == (4, 8)
    assert state["nonlinear.0.weight"].shape == (8, 8)
    assert state["nonlinear.2.weight"].shape == (4, 8)
    assert all(v.dtype == np.float32 for v in state.values())
    np.testing.assert_allclose(
        est.transform(X), _reference_head(state, X), rtol=1e-5, atol=1e-5
    )


def test_maps_and_tokens_agree():
    X = _maps()
    est = _stego().fit(X)
    codes = est.transform(X)
    assert codes.shape == (6, 4, 5, 4)
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, 8)
    codes_tok = est.transform(tokens)
    assert codes_tok.shape == (6 * 5 * 4, 4)
    np.testing.assert_allclose(
        codes.transpose(0, 2, 3, 1).reshape(-1, 4), codes_tok, rtol=1e-5, atol=1e-5
    )


def test_fit_on_tokens():
    X = _maps().transpose(0, 2, 3, 1).reshape(-1, 8)
    est = _stego(n_steps=4).fit(X)
    assert est.transform(X).shape == (X.shape[0], 4)
    assert est.loss_curve_.shape == (4,)
    assert np.isfinite(est.loss_curve_).all()


def test_output_types_follow_input():
    X = _maps()
    est = _stego().fit(X)
    out_np = est.transform(X)
    out_t = est.transform(torch.from_numpy(X))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-6, atol=1e-6)
    # float64 input gives float32 codes too
    assert est.transform(X.astype(np.float64)).dtype == np.float32


def test_fit_on_tensor_equals_fit_on_numpy():
    X = _maps()
    a = _stego().fit(X)
    b = _stego().fit(torch.from_numpy(X))
    for k in a.head_state_:
        np.testing.assert_allclose(a.head_state_[k], b.head_state_[k], atol=1e-6)


def test_memmap_input(tmp_path):
    X = _maps()
    path = tmp_path / "maps.npy"
    np.save(path, X)
    mm = np.load(path, mmap_mode="r")
    a = _stego().fit(mm)
    b = _stego().fit(X)
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-6)


def test_determinism_per_random_state():
    X = _maps()
    a = _stego(random_state=1).fit(X)
    b = _stego(random_state=1).fit(X)
    c = _stego(random_state=2).fit(X)
    for k in a.head_state_:
        np.testing.assert_array_equal(a.head_state_[k], b.head_state_[k])
    np.testing.assert_array_equal(a.loss_curve_, b.loss_curve_)
    assert not np.array_equal(
        a.head_state_["linear.weight"], c.head_state_["linear.weight"]
    )


def test_training_reduces_loss():
    X, _ = make_feature_maps(16, n_features=32, n_classes=4, map_size=8, random_state=0)
    est = _stego(dim=6, n_steps=60, batch_size=8, lr=5e-3).fit(X)
    curve = est.loss_curve_
    assert curve.shape == (60,)
    assert est.n_steps_ == est.n_iter_ == 60
    assert curve[-10:].mean() < curve[:10].mean() - 0.01


def test_dropout_only_in_training():
    # transform is deterministic (eval mode): two calls agree exactly
    X = _maps()
    est = _stego(dropout=0.5).fit(X)
    np.testing.assert_array_equal(est.transform(X), est.transform(X))


def test_small_batches_and_no_negatives():
    X = _maps(n=3)
    # batch_size larger than the data: capped at 3 images
    est = _stego(batch_size=16).fit(X)
    assert np.isfinite(est.loss_curve_).all()
    # batch of one image: the negative term is dropped, training still runs
    est = _stego(batch_size=1).fit(X)
    assert np.isfinite(est.loss_curve_).all()
    est = _stego(neg_samples=0, n_steps=0).fit(X)
    assert est.loss_curve_.shape == (0,)


def test_pickle_has_no_torch_objects():
    X = _maps()
    est = _stego().fit(X)
    expected = est.transform(X)
    blob = pickle.dumps(est)
    assert b"torch" not in blob
    est2 = pickle.loads(blob)
    np.testing.assert_array_equal(est2.transform(X), expected)
    # a refit invalidates the cached device weights
    est2.set_params(random_state=5).fit(X)
    assert not np.array_equal(est2.transform(X), expected)


def test_save_and_load_head_round_trip(tmp_path):
    from safetensors.numpy import load_file

    X = _maps()
    est = _stego(neg_shift=0.31, pointwise=False).fit(X)
    path = tmp_path / "head.safetensors"
    est.save_head(path)
    # the file holds the six weight matrices and nothing else
    arrays = load_file(str(path))
    assert sorted(arrays) == sorted(est.head_state_)
    for k, v in est.head_state_.items():
        np.testing.assert_array_equal(arrays[k], v)
    loaded = StegoProjector.load_head(path, random_state=3)
    assert loaded.neg_shift == 0.31 and loaded.pointwise is False
    assert loaded.random_state == 3 and loaded.dim == 4
    assert loaded.n_features_in_ == 8
    np.testing.assert_array_equal(loaded.transform(X), est.transform(X))
    # training continues from the loaded head
    before = loaded.head_state_["linear.weight"].copy()
    loaded.partial_fit(X)
    assert loaded.n_steps_ == 3
    assert not np.array_equal(loaded.head_state_["linear.weight"], before)


@pytest.mark.parametrize("wrap", [False, True])
def test_load_head_reads_reference_state_dicts(tmp_path, wrap):
    # The STEGO reference names the head cluster1 (linear) and cluster2
    # (conv, ReLU, conv) inside its model ("net."), with 4-D conv weights.
    torch.manual_seed(0)
    c, dim = 8, 5
    cluster1 = torch.nn.Conv2d(c, dim, 1)
    cluster2 = torch.nn.Sequential(
        torch.nn.Conv2d(c, c, 1), torch.nn.ReLU(), torch.nn.Conv2d(c, dim, 1)
    )
    state = {f"net.cluster1.{k}": v for k, v in cluster1.state_dict().items()}
    state.update({f"net.cluster2.{k}": v for k, v in cluster2.state_dict().items()})
    state["net.other.weight"] = torch.zeros(3)
    path = tmp_path / "stego.pt"
    torch.save({"state_dict": state} if wrap else state, path)
    est = StegoProjector.load_head(path, device="cpu")
    assert est.dim == dim and est.n_features_in_ == c
    X = _maps(c=c)
    with torch.no_grad():
        x = torch.from_numpy(X)
        expected = (cluster1(x) + cluster2(x)).numpy()
    np.testing.assert_allclose(est.transform(X), expected, rtol=1e-5, atol=1e-5)


class _Unsafe:
    pass


def test_load_head_refuses_bad_files(tmp_path):
    with pytest.raises(ValueError, match="No head weights file"):
        StegoProjector.load_head(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="Could not read head weights from"):
        StegoProjector.load_head(text)
    pickled = tmp_path / "obj.pt"
    torch.save({"state_dict": _Unsafe()}, pickled)
    with pytest.raises(ValueError, match="refused for safety"):
        StegoProjector.load_head(pickled)
    partial = tmp_path / "partial.pt"
    torch.save({"cluster1.weight": torch.zeros(4, 8, 1, 1)}, partial)
    with pytest.raises(ValueError, match=r"incomplete head.*\['cluster1\.bias'\]"):
        StegoProjector.load_head(partial)
    bad = tmp_path / "bad.pt"
    torch.save(
        {
            "cluster1.weight": torch.zeros(4, 8, 1, 1),
            "cluster1.bias": torch.zeros(4),
            "cluster2.0.weight": torch.zeros(8, 8, 1, 1),
            "cluster2.0.bias": torch.zeros(8),
            "cluster2.2.weight": torch.zeros(3, 8, 1, 1),
            "cluster2.2.bias": torch.zeros(4),
        },
        bad,
    )
    with pytest.raises(ValueError, match=r"nonlinear\.2\.weight has shape"):
        StegoProjector.load_head(bad)


def test_save_head_needs_a_fitted_estimator(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        _stego().save_head(tmp_path / "h.safetensors")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_from_preset(name):
    est = StegoProjector.from_preset(name, device="cpu", random_state=3)
    params = est.get_params()
    for key, value in PRESETS[name].items():
        assert params[key] == value
    assert params["device"] == "cpu" and params["random_state"] == 3
    clone(est)


def test_preset_values():
    coco = StegoProjector.from_preset("cocostuff27")
    assert (coco.dim, coco.n_steps, coco.batch_size, coco.pointwise) == (
        90,
        7000,
        32,
        True,
    )
    assert (coco.neg_weight, coco.pos_inter_weight, coco.pos_intra_weight) == (
        0.1538,
        1.0,
        0.1,
    )
    assert (coco.neg_shift, coco.pos_inter_shift, coco.pos_intra_shift) == (
        1.0,
        0.2,
        0.12,
    )
    city = StegoProjector.from_preset("cityscapes")
    assert (city.dim, city.pointwise, city.neg_shift) == (100, False, 0.3136)
    potsdam = StegoProjector.from_preset("potsdam")
    assert (potsdam.dim, potsdam.batch_size, potsdam.neg_shift) == (70, 16, 0.76)
    with pytest.raises(ValueError, match="Unknown preset"):
        StegoProjector.from_preset("ade20k")


def test_bad_input():
    est = _stego()
    with pytest.raises(ValueError, match="1 sample"):
        est.fit(_maps(n=1))
    with pytest.raises(ValueError, match="Expected"):
        est.fit(np.zeros((4, 3, 2), dtype=np.float32))
    bad = _maps()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        est.fit(bad)
    with pytest.raises(ValueError):
        _stego(dim=0).fit(_maps())
    with pytest.raises(ValueError):
        _stego(dropout=1.0).fit(_maps())
    est.fit(_maps())
    with pytest.raises(ValueError, match="features"):
        est.transform(_maps(c=5))


def test_verbose_progress_bar(capsys):
    _stego(verbose=True).fit(_maps())
    err = capsys.readouterr().err
    assert "StegoProjector" in err and "loss=" in err


def test_partial_fit_continues_training():
    X = _maps()
    est = _stego()
    est.partial_fit(X)
    first = {k: v.copy() for k, v in est.head_state_.items()}
    np.testing.assert_array_equal(
        first["linear.weight"], _stego().fit(X).head_state_["linear.weight"]
    )
    est.partial_fit(X)
    assert est.n_steps_ == est.n_iter_ == 6
    assert est.loss_curve_.shape == (6,)
    assert int(est.optimizer_state_["step"]) == 6
    assert not np.array_equal(first["linear.weight"], est.head_state_["linear.weight"])
    # reproducible sequence of calls
    other = _stego().partial_fit(X).partial_fit(X)
    for k in est.head_state_:
        np.testing.assert_array_equal(est.head_state_[k], other.head_state_[k])
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(_maps(c=5))


def test_warm_start():
    X = _maps()
    est = _stego(warm_start=True).fit(X)
    state = {k: v.copy() for k, v in est.head_state_.items()}
    est.set_params(n_steps=0).fit(X)
    for k in state:
        np.testing.assert_array_equal(est.head_state_[k], state[k])
    est.set_params(n_steps=2).fit(X)
    assert est.n_steps_ == 5 and est.loss_curve_.shape == (5,)
    cold = _stego(warm_start=False).fit(X)
    cold.set_params(n_steps=2).fit(X)
    assert cold.n_steps_ == 2
    with pytest.raises(ValueError, match="same dim"):
        est.set_params(dim=3).fit(X)


def test_stego_codes_beat_kmeans_on_raw_maps():
    # The paper's mechanism: on maps whose class information lives in a few
    # directions under large nuisance, k-means on the trained codes finds the
    # classes better than k-means on the raw maps. The shifts are thresholds
    # on feature cosine similarity; on these maps same-class tokens have mean
    # cosine 0.25 and different-class tokens 0.08 (measured), so the DINO
    # defaults (neg 0.46) would push every pair apart. Shifts between the two
    # levels (see StegoProjector's Notes) give codes on which the best of 5
    # k-means runs scores mIoU 0.74-0.99 on seeds 0-8 (mean 0.86) with the
    # default feature_dropout=True; one k-means run (k-means++ from the same
    # seed) scores 0.52-0.99 (mean 0.80): on seeds 2 and 5 it stops in a
    # local minimum (0.52, 0.55). One k-means run on the raw maps scores
    # 0.44-1.0 (0.65-0.70 on seeds 0-2); its local minima are the raw
    # maps' difficulty (5 runs reach 0.70-1.0). Measured with the
    # derangements drawn on the device (issue 21); the random
    # stream before (rejection on the host) gave 0.74-0.94 for one run.
    # Whether one k-means run lands in a local minimum flips with the last
    # bits of the codes (reading the maps at the points by embedding_bag
    # instead of grid_sample: the same float64 loss to 1e-10, seed 2 then
    # gives 0.45 instead of 0.52, seed 5 0.55 instead of 0.90, while the
    # best of 5 runs stays at a mean of 0.86 on seeds 0-8): hence the
    # median over five seeds, which one such flip does not move.
    from skstego.probes import KMeansProbe

    raw, stego, best = [], [], []
    for seed in range(5):
        X, y = make_feature_maps(
            32, n_features=64, n_classes=5, map_size=12, random_state=seed
        )
        est = _stego(
            dim=8,
            n_steps=300,
            batch_size=8,
            lr=5e-3,
            neg_shift=0.3,
            pos_intra_shift=0.1,
            pos_inter_shift=0.1,
            random_state=seed,
        )
        codes = est.fit_transform(X)
        probe = KMeansProbe(k=5, device="cpu", random_state=seed)
        raw.append(probe.fit(X).score(X, y))
        stego.append(clone(probe).fit(codes).score(codes, y))
        best.append(clone(probe).set_params(n_init=5).fit(codes).score(codes, y))
    assert min(best) > 0.7, best
    assert np.median(stego) > np.median(raw) + 0.1, (raw, stego)


# The active (uncommented) values of the reference's
# src/configs/train_config.yml, under the reference's names, with the
# StegoProjector parameter each one sets.
REFERENCE_TRAIN_CONFIG = {
    ("dim", "dim"): 70,
    ("max_steps", "n_steps"): 5000,
    ("batch_size", "batch_size"): 16,
    ("lr", "lr"): 5e-4,
    ("projection_type", "projection_type"): "nonlinear",
    ("dropout", "feature_dropout"): True,
    ("feature_samples", "feature_samples"): 11,
    ("neg_samples", "neg_samples"): 5,
    ("num_neighbors", "n_neighbors"): 7,
    ("neg_inter_weight", "neg_weight"): 0.63,
    ("pos_inter_weight", "pos_inter_weight"): 0.25,
    ("pos_intra_weight", "pos_intra_weight"): 0.67,
    ("neg_inter_shift", "neg_shift"): 0.46,
    ("pos_inter_shift", "pos_inter_shift"): 0.12,
    ("pos_intra_shift", "pos_intra_shift"): 0.18,
    ("pointwise", "pointwise"): True,
    ("zero_clamp", "zero_clamp"): True,
    ("stabalize", "stabilize"): False,
}


def test_defaults_are_the_active_train_config_values():
    params = StegoProjector().get_params()
    for (ref_name, name), value in REFERENCE_TRAIN_CONFIG.items():
        assert params[name] == value, (ref_name, name, params[name], value)
    # the reference's Dropout2d(p=.1) in DinoFeaturizer
    assert params["dropout"] == 0.1


def _conv(weight, bias):
    """A 1x1 torch convolution holding a 2-D weight matrix."""
    conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1))
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight)[:, :, None, None])
        conv.bias.copy_(torch.from_numpy(bias))
    return conv


def test_linear_head_matches_a_single_convolution(tmp_path):
    X = _maps()
    est = _stego(projection_type="linear").fit(X)
    assert sorted(est.head_state_) == ["linear.bias", "linear.weight"]
    assert np.isfinite(est.loss_curve_).all()
    cluster1 = _conv(est.head_state_["linear.weight"], est.head_state_["linear.bias"])
    with torch.no_grad():
        expected = cluster1(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(est.transform(X), expected, rtol=1e-5, atol=1e-5)
    # tokens give the same codes
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, 8)
    np.testing.assert_allclose(
        est.transform(tokens),
        expected.transpose(0, 2, 3, 1).reshape(-1, 4),
        rtol=1e-5,
        atol=1e-5,
    )
    # round trip through a head file keeps the projection type
    path = tmp_path / "linear.safetensors"
    est.save_head(path)
    loaded = StegoProjector.load_head(path)
    assert loaded.projection_type == "linear"
    np.testing.assert_array_equal(loaded.transform(X), est.transform(X))
    # training continues with the same structure only
    est.partial_fit(X)
    assert sorted(est.head_state_) == ["linear.bias", "linear.weight"]
    with pytest.raises(ValueError, match="same projection_type"):
        est.set_params(projection_type="nonlinear").partial_fit(X)


def test_linear_and_nonlinear_fits_differ():
    X = _maps()
    lin = _stego(projection_type="linear").fit(X)
    non = _stego().fit(X)
    assert len(non.head_state_) == 6
    assert not np.allclose(lin.transform(X), non.transform(X))


def _spy_training(monkeypatch):
    """Record the head's input and the three masks of every training step."""
    import skstego.projection._stego as mod

    calls = []
    loss = mod._train_loss

    def spy(params, x, drop1, drop2, drop_target, **kw):
        calls.append((x.detach().clone(), drop1, drop2, drop_target))
        return loss(params, x, drop1, drop2, drop_target, **kw)

    monkeypatch.setattr(mod, "_train_loss", spy)
    return calls


@pytest.mark.parametrize("projection_type", ["nonlinear", "linear"])
def test_feature_dropout_drops_channels_of_the_correlation_target(
    monkeypatch, projection_type
):
    # The reference's DinoFeaturizer returns Dropout2d(p)(features) as the
    # correlation target when cfg.dropout: whole channels of each map are
    # zeroed with probability p and the others scaled by 1 / (1 - p), with a
    # mask of its own (not the branches' masks). That _train_loss uses the
    # mask as x * mask is checked against the reference formula in
    # test_train_loss_matches_the_reference_head_and_loss.
    p = 0.25
    calls = _spy_training(monkeypatch)
    X = np.abs(_maps(n=8, c=32)) + 0.5
    _stego(
        n_steps=12, dropout=p, projection_type=projection_type, feature_dropout=True
    ).fit(X)
    assert len(calls) == 12
    dropped = []
    for x, drop1, drop2, mask in calls:
        assert mask.shape == x.shape[:2]  # one factor per (image, channel)
        kept = mask != 0
        torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
        dropped.append((~kept).float().mean().item())
        assert not torch.equal(mask, drop1)
        if projection_type == "nonlinear":
            assert not torch.equal(mask, drop2)
        else:
            assert drop2 is None
    assert 0.18 < np.mean(dropped) < 0.32, np.mean(dropped)


def test_without_feature_dropout_the_target_is_the_clean_features(monkeypatch):
    calls = _spy_training(monkeypatch)
    _stego(n_steps=3, dropout=0.3, feature_dropout=False).fit(_maps())
    for _, drop1, drop2, drop_target in calls:
        assert drop_target is None
        assert drop1 is not None and drop2 is not None  # the branches still drop


def _reference_train_loss(state, x, drops, kw, seed):
    """One training loss written the reference's way, in float64: torch
    Conv2d modules on channel-dropped whole maps, codes sampled with
    grid_sample, each negative read from permuted copies, einsum
    correlations (Hamilton et al., src/modules.py and
    src/train_segmentation.py)."""
    x = x.double()
    c = x.shape[1]
    dim = state["linear.weight"].shape[0]
    linear = torch.nn.Conv2d(c, dim, 1).double()
    modules = {"linear": linear}
    if "nonlinear.0.weight" in state:
        modules["nonlinear"] = torch.nn.Sequential(
            torch.nn.Conv2d(c, c, 1), torch.nn.ReLU(), torch.nn.Conv2d(c, dim, 1)
        ).double()
    named = dict(
        (f"{name}.{k}", v)
        for name, m in modules.items()
        for k, v in m.named_parameters()
    )
    with torch.no_grad():
        for name, value in named.items():
            named[name].copy_(torch.as_tensor(state[name]).double().view_as(value))
    d1, d2, dt = (None if d is None else d.double()[:, :, None, None] for d in drops)
    codes = linear(x if d1 is None else x * d1)
    if "nonlinear" in modules:
        codes = codes + modules["nonlinear"](x if d2 is None else x * d2)
    target = x if dt is None else x * dt
    b = x.shape[0] // 2
    g = torch.Generator().manual_seed(seed)
    s = kw["feature_samples"]
    coords1 = (torch.rand(b, s, s, 2, generator=g) * 2 - 1).double()
    coords2 = (torch.rand(b, s, s, 2, generator=g) * 2 - 1).double()
    perms = [derangement(b, generator=g) for _ in range(kw["neg_samples"])]

    def sample(maps, coords):
        return torch.nn.functional.grid_sample(
            maps, coords, padding_mode="border", align_corners=True
        )

    def term(f1, f2, c1, c2, shift):
        def corr(a, b):
            a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
            b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return torch.einsum("nchw,ncij->nhwij", a, b)

        fd = corr(f1, f2)
        if kw["flags"]["pointwise"]:
            fd = fd - fd.mean(dim=(3, 4), keepdim=True) + fd.mean()
        cd = corr(c1, c2)
        lo = 0.0 if kw["flags"]["zero_clamp"] else None
        hi = 0.8 if kw["flags"]["stabilize"] else None
        if lo is not None or hi is not None:
            cd = cd.clamp(lo, hi)
        return (-cd * (fd - shift)).mean()

    f_img, c_img = sample(target[:b], coords1), sample(codes[:b], coords1)
    f_knn, c_knn = sample(target[b:], coords2), sample(codes[b:], coords2)
    (w_intra, w_inter, w_neg), (s_intra, s_inter, s_neg) = kw["weights"], kw["shifts"]
    total = w_intra * term(f_img, f_img, c_img, c_img, s_intra)
    total = total + w_inter * term(f_img, f_knn, c_img, c_knn, s_inter)
    if perms:
        neg = [
            term(
                f_img,
                sample(target[:b][p], coords2),
                c_img,
                sample(codes[:b][p], coords2),
                s_neg,
            )
            for p in perms
        ]
        total = total + w_neg * torch.stack(neg).mean()
    total.backward()
    grads = {name: named[name].grad.reshape(state[name].shape) for name in state}
    return total.item(), grads


@pytest.mark.parametrize(
    ("size", "samples", "projection_type", "flags"),
    [
        ((12, 12), 3, "nonlinear", (True, True, False)),  # few points: taps
        ((5, 4), 5, "nonlinear", (True, True, False)),  # dense points: whole map
        ((6, 7), 4, "nonlinear", (False, False, True)),
        ((6, 7), 4, "linear", (True, False, True)),
        ((1, 1), 1, "nonlinear", (True, True, False)),  # tokens as 1x1 maps
    ],
)
@pytest.mark.parametrize("dropout", [True, False])
def test_train_loss_matches_the_reference_head_and_loss(
    size, samples, projection_type, flags, dropout
):
    # The training loss reads the head at the sampled points instead of
    # running it on whole maps: the same formula, checked in float64 with
    # its gradients against the reference's way of computing it.
    from skstego.projection._stego import _init_params, _train_loss

    b, c, dim = 3, 10, 4
    gen = torch.Generator().manual_seed(0)
    params = _init_params(c, dim, projection_type, gen, torch.device("cpu"))
    params = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    x = torch.randn(2 * b, c, *size, generator=gen, dtype=torch.float64)
    drops = [
        (torch.rand(2 * b, c, generator=gen) < 0.7).double() / 0.7 if dropout else None
        for _ in range(3)
    ]
    kw = {
        "weights": (0.6, 0.3, 0.9),
        "shifts": (0.1, 0.2, 0.4),
        "neg_samples": 2,
        "feature_samples": samples,
        "flags": dict(
            zip(("pointwise", "zero_clamp", "stabilize"), flags, strict=True)
        ),
    }
    total = _train_loss(
        params, x, *drops, generator=torch.Generator().manual_seed(7), **kw
    )
    total.backward()
    state = {k: v.detach() for k, v in params.items()}
    want, grads = _reference_train_loss(state, x, drops, kw, seed=7)
    np.testing.assert_allclose(total.item(), want, rtol=1e-10, atol=1e-12)
    for name, grad in grads.items():
        np.testing.assert_allclose(
            params[name].grad.numpy(), grad.numpy(), rtol=1e-9, atol=1e-12
        )


def test_feature_dropout_changes_training_reproducibly():
    X = _maps()
    on = _stego(feature_dropout=True).fit(X)
    again = _stego(feature_dropout=True).fit(X)
    off = _stego(feature_dropout=False).fit(X)
    np.testing.assert_array_equal(on.loss_curve_, again.loss_curve_)
    assert not np.array_equal(on.loss_curve_, off.loss_curve_)


def _spy_descriptors(monkeypatch):
    import skstego.projection._stego as mod

    seen = []
    search = mod.nearest_neighbors

    def spy(descriptors, *args, **kw):
        seen.append(descriptors.detach().clone())
        return search(descriptors, *args, **kw)

    monkeypatch.setattr(mod, "nearest_neighbors", spy)
    return seen


def test_knn_dropout(monkeypatch):
    # Reference src/precompute_knns.py: descriptors are
    # normalize(mean_hw(Dropout2d(p)(features))) with the dropout active.
    X = _maps(n=40, c=32)
    mean = X.astype(np.float64).mean(axis=(2, 3))
    clean = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    seen = _spy_descriptors(monkeypatch)

    _stego(n_steps=0, dropout=0.3).fit(X)  # knn_dropout off by default
    np.testing.assert_allclose(seen[-1].numpy(), clean, rtol=1e-5, atol=1e-6)

    _stego(n_steps=0, dropout=0.3, knn_dropout=True).fit(X)
    got = seen[-1].numpy().astype(np.float64)
    keep = got != 0
    assert 0.2 < 1 - keep.mean() < 0.4
    for row, kept, m in zip(got, keep, mean, strict=True):
        want = np.where(kept, m, 0.0)
        np.testing.assert_allclose(row, want / np.linalg.norm(want), atol=1e-5)

    # seeded: the same neighbours at every fit
    a = _stego(n_steps=0, knn_dropout=True).fit(X)
    first = seen[-1]
    _stego(n_steps=0, knn_dropout=True).fit(X)
    assert torch.equal(first, seen[-1])
    assert a.n_steps_ == 0


def test_load_head_refuses_contradicting_params(tmp_path):
    X = _maps()
    est = _stego().fit(X)
    path = tmp_path / "head.safetensors"
    est.save_head(path)
    with pytest.raises(ValueError, match=r"dim=4.*dim=5"):
        StegoProjector.load_head(path, dim=5)
    with pytest.raises(ValueError, match="projection_type='nonlinear'"):
        StegoProjector.load_head(path, projection_type="linear")
    assert StegoProjector.load_head(path, dim=4).dim == 4
    with pytest.raises(TypeError, match="path to a weights file or a mapping"):
        StegoProjector.load_head(3)


# ------------------------------------------------------ precision and devices


def test_fast_bf16_needs_compute_capability_8(monkeypatch):
    from skstego._precision import fast_bf16

    assert fast_bf16("cpu") is False
    assert fast_bf16(torch.device("cpu")) is False
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, want in [
        ((6, 0), False),  # P100
        ((7, 0), False),  # V100
        ((7, 5), False),  # T4
        ((8, 0), True),  # A100
        ((8, 6), True),  # RTX 30
        ((9, 0), True),  # H100
        ((10, 0), True),
    ]:

        def capability_of(device=None, capability=capability):
            asked.append(device)
            return capability

        monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
        assert fast_bf16("cuda:1") is want, capability
    assert all(torch.device(d) == torch.device("cuda:1") for d in asked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fast_bf16("cuda") is False


def test_autocast_only_on_cuda_with_fast_bf16(monkeypatch):
    from skstego.projection import _stego as mod

    monkeypatch.setattr(mod, "fast_bf16", lambda device: True)
    assert mod._autocast_bf16(torch.device("cuda:0"))
    assert not mod._autocast_bf16(torch.device("cpu"))
    monkeypatch.setattr(mod, "fast_bf16", lambda device: False)  # a T4, a V100
    assert not mod._autocast_bf16(torch.device("cuda:0"))


def test_bf16_autocast_covers_the_head_only(monkeypatch):
    # What a bf16 GPU runs, emulated by CPU autocast: the head's products in
    # bf16, the loss and its feature-correlation target in float32, so that
    # loss_curve_ is not rounded to bf16 (8 bits of mantissa).
    from skstego.projection import _stego as mod

    X = _maps(n=8)
    plain = _stego(n_steps=12, batch_size=4).fit(X)

    monkeypatch.setattr(mod, "_autocast_bf16", lambda device: True)
    in_head, in_loss = [], []
    head, loss = mod._head_points, mod._stacked_loss

    def spy_head(*args, **kwargs):
        in_head.append(torch.is_autocast_enabled("cpu"))
        return head(*args, **kwargs)

    def spy_loss(*args, **kwargs):
        dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
        in_loss.append((dtypes, torch.is_autocast_enabled("cpu")))
        return loss(*args, **kwargs)

    monkeypatch.setattr(mod, "_head_points", spy_head)
    monkeypatch.setattr(mod, "_stacked_loss", spy_loss)
    est = _stego(n_steps=12, batch_size=4).fit(X)
    assert in_head and all(in_head)
    assert in_loss and all(s == ({torch.float32}, False) for s in in_loss)

    curve = est.loss_curve_
    bf16 = torch.from_numpy(curve).to(torch.bfloat16).double().numpy()
    assert not np.array_equal(curve, bf16)  # not bf16-rounded
    # the emulation is real: bf16 head products change the numbers a little
    assert not np.array_equal(curve, plain.loss_curve_)
    np.testing.assert_allclose(curve, plain.loss_curve_, rtol=0.05, atol=1e-3)


def test_same_device():
    from skstego._device import same_device as _same_device

    cpu = torch.device("cpu")
    assert _same_device(cpu, torch.device("cpu"))
    assert not _same_device(cpu, torch.device("cuda:0"))
    assert not _same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert _same_device(torch.device("cuda:1"), torch.device("cuda:1"))


def test_batches_train_the_same_from_any_input_layout(tmp_path):
    # Batches of in-memory maps are gathered straight into channels-last
    # memory; other input (negative strides, on-disk maps) is gathered as
    # maps and transposed per batch. Both feed the same loss.
    X = _maps(n=10)
    ref = _stego(n_steps=6).fit(X).loss_curve_
    flipped = X[:, :, ::-1, :]  # negative strides: the per-batch copy
    np.testing.assert_allclose(
        _stego(n_steps=6).fit(flipped).loss_curve_,
        _stego(n_steps=6).fit(np.ascontiguousarray(flipped)).loss_curve_,
        rtol=1e-6,
    )
    np.save(tmp_path / "x.npy", X)
    on_disk = np.load(tmp_path / "x.npy", mmap_mode="r")
    np.testing.assert_allclose(
        _stego(n_steps=6).fit(on_disk).loss_curve_, ref, rtol=1e-6
    )
    tensor = torch.from_numpy(X).contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(
        _stego(n_steps=6).fit(tensor).loss_curve_, ref, rtol=1e-6
    )


def test_host_indices_for_input_off_the_training_device(monkeypatch):
    # CUDA training on NumPy (or host) input draws its batch indices on the
    # host with a generator seeded from the main one; emulated on the CPU.
    from skstego.projection import _stego as mod

    X = _maps(n=10)
    same = _stego(n_steps=6).fit(X)
    monkeypatch.setattr(mod, "same_device", lambda a, b: False)
    seen = []
    real = mod.as_tensor

    def spy(x, device, *args, **kwargs):
        seen.append(x.device.type if isinstance(x, torch.Tensor) else type(x))
        return real(x, device, *args, **kwargs)

    monkeypatch.setattr(mod, "as_tensor", spy)
    a = _stego(n_steps=6).fit(X)
    b = _stego(n_steps=6).fit(X)
    np.testing.assert_array_equal(a.loss_curve_, b.loss_curve_)  # seeded
    assert not np.array_equal(a.loss_curve_, same.loss_curve_)  # own stream
    # batches gathered on the host (from the array, by host indices), then
    # handed to the training device
    assert seen and set(seen) <= {"cpu", np.ndarray}
    t = _stego(n_steps=6).fit(torch.from_numpy(X))
    np.testing.assert_allclose(t.loss_curve_, a.loss_curve_, rtol=1e-6)
