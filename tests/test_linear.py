"""Tests of LinearProbe: numerics against scikit-learn, layouts, labels, errors."""

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, jaccard_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from skstego import LinearProbe
from skstego._device import maps_to_tokens
from skstego.metrics import make_segmentation_scorer


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _blobs(n=600, n_features=6, n_classes=3, seed=0):
    X, y = make_classification(
        n_samples=n,
        n_features=n_features,
        n_informative=n_features - 1,
        n_redundant=0,
        n_classes=n_classes,
        n_clusters_per_class=1,
        class_sep=2.0,
        random_state=seed,
    )
    return X.astype(np.float32), y


def _scenes(n=6, h=6, w=6, factor=2, n_features=8, n_classes=3, seed=0):
    """Feature maps (n, C, h, w), their label maps (n, h, w) and (n, H, W)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, n_classes, size=(n, h // 2, w // 2))
    small = blocks.repeat(2, axis=1).repeat(2, axis=2)
    large = small.repeat(factor, axis=1).repeat(factor, axis=2)
    centers = rng.normal(size=(n_classes, n_features)) * 3.0
    maps = centers[small].transpose(0, 3, 1, 2)
    maps = maps + 0.5 * rng.normal(size=maps.shape)
    return maps.astype(np.float32), small, large


# --------------------------------------------------------------- numerics
def test_digits_accuracy_matches_logistic_regression():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    ref = LogisticRegression(max_iter=1000).fit(Xtr, ytr).score(Xte, yte)
    probe = LinearProbe(device="cpu", random_state=0).fit(Xtr, ytr)
    assert probe.score(Xte, yte) >= ref - 0.02
    assert probe.coef_.shape == (10, 64) and probe.intercept_.shape == (10,)
    assert probe.n_features_in_ == 64


def test_make_classification_accuracy_matches_logistic_regression():
    X, y = make_classification(
        n_samples=4000,
        n_features=30,
        n_informative=15,
        n_classes=5,
        random_state=0,
    )
    # Badly scaled, offset features: the probe standardises internally.
    X = (X * np.geomspace(10, 0.1, 30) + 5).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    ref = LogisticRegression(max_iter=1000).fit(Xtr, ytr).score(Xte, yte)
    probe = LinearProbe(random_state=0).fit(Xtr, ytr)
    assert probe.score(Xte, yte) >= ref - 0.02


def test_lbfgs_reaches_the_logistic_regression_optimum():
    # Same objective as LogisticRegression(C=1) on standardised features:
    # weight_decay = 1 / (C * n_samples). An independent float64 reference.
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    ref = LogisticRegression(C=1.0, tol=1e-8, max_iter=2000).fit(X, y)
    probe = LinearProbe(
        solver="lbfgs", weight_decay=1.0 / len(y), tol=1e-6, max_iter=1000
    ).fit(X, y)
    assert_allclose(probe.coef_, ref.coef_, atol=1e-2)
    assert_allclose(probe.intercept_, ref.intercept_, atol=1e-2)
    assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=2e-3)
    assert len(probe.loss_curve_) == probe.n_iter_ < 1000


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_solvers_fit_maps_of_both_sizes(solver):
    maps, small, large = _scenes()
    for labels in (small, large):
        probe = LinearProbe(solver=solver, random_state=0).fit(maps, labels)
        assert probe.score(maps, labels) > 0.8
        assert probe.n_iter_ == len(probe.loss_curve_) >= 1


def test_probabilities_and_scores_are_consistent():
    X, y = _blobs()
    probe = LinearProbe(random_state=0).fit(X, y)
    proba = probe.predict_proba(X)
    assert proba.shape == (len(y), 3)
    assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    pred = probe.predict(X)
    assert_array_equal(probe.classes_[proba.argmax(axis=1)], pred)
    assert_array_equal(probe.classes_[probe.decision_function(X).argmax(1)], pred)
    assert_allclose(probe.predict_log_proba(X), np.log(proba), atol=1e-5)
    # The fitted model is the stated linear map on raw features.
    logits = X.astype(np.float64) @ probe.coef_.T + probe.intercept_
    assert_allclose(probe.decision_function(X), logits, rtol=1e-4, atol=1e-4)


def test_predict_proba_on_maps_upsamples_like_predict():
    maps, _, large = _scenes(seed=2)
    probe = LinearProbe(random_state=0).fit(maps, large)
    small = probe.predict_proba(maps)
    assert small.shape == (6, 3, 6, 6)
    proba = probe.predict_proba(maps, size=(12, 12))
    assert proba.shape == (6, 3, 12, 12)
    assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert_array_equal(proba.argmax(axis=1), probe.predict(maps, size=(12, 12)))
    # independent reference: logits of the stated linear map, upsampled, softmaxed
    logits = (
        np.einsum("kc,nchw->nkhw", probe.coef_, maps)
        + probe.intercept_[None, :, None, None]
    )
    up = F.interpolate(torch.from_numpy(logits).float(), size=(12, 12), mode="bilinear")
    assert_allclose(proba, torch.softmax(up, dim=1).numpy(), atol=1e-4)
    tproba = probe.predict_proba(torch.from_numpy(maps), size=(12, 12))
    assert isinstance(tproba, torch.Tensor)
    assert_allclose(tproba.numpy(), proba, atol=1e-6)
    with pytest.raises(ValueError, match="4-D"):
        probe.predict_proba(maps[:, :, 0, 0], size=(3, 3))


def test_maps_predict_classes_of_a_token_fit():
    # fitted on tokens with labels 3 and 7, predictions on maps are 3 and 7
    maps, small, _ = _scenes(n_classes=2, seed=4)
    tokens = maps_to_tokens(torch.from_numpy(maps)).numpy()
    y = np.where(small.reshape(-1) == 0, 3, 7)
    probe = LinearProbe(random_state=0).fit(tokens, y)
    pred = probe.predict(maps)
    assert set(np.unique(pred)) <= {3, 7}
    assert_array_equal(pred.reshape(-1), probe.predict(tokens))
    tpred = probe.predict(torch.from_numpy(maps))
    assert_array_equal(tpred.numpy(), pred)


def test_binary_decision_function_is_log_odds():
    X, y = _blobs(n_classes=2)
    probe = LinearProbe(random_state=0).fit(X, y)
    dec = probe.decision_function(X)
    assert dec.shape == (len(y),)
    assert_array_equal(probe.classes_[(dec > 0).astype(int)], probe.predict(X))
    proba = probe.predict_proba(X)
    assert_allclose(np.log(proba[:, 1] / proba[:, 0]), dec, rtol=1e-4, atol=1e-4)
    assert probe.coef_.shape == (2, X.shape[1])


def test_string_labels():
    X, y = _blobs()
    names = np.array(["sky", "grass", "road"])[y]
    probe = LinearProbe(random_state=0).fit(X, names)
    assert_array_equal(probe.classes_, ["grass", "road", "sky"])
    pred = probe.predict(X)
    assert pred.dtype.kind == "U"
    assert probe.score(X, names) == accuracy_score(names, pred) > 0.9
    # Torch input, non-numeric classes: labels come back as NumPy.
    assert_array_equal(probe.predict(torch.from_numpy(X)), pred)


def test_minus_one_is_a_class_for_1d_labels_by_default():
    X, y = _blobs(n_classes=2)
    y = np.where(y == 0, -1, 1)
    probe = LinearProbe(random_state=0).fit(X, y)
    assert_array_equal(probe.classes_, [-1, 1])


def test_score_metrics_on_tokens():
    X, y = _blobs()
    probe = LinearProbe(random_state=0).fit(X, y)
    pred = probe.predict(X)
    assert probe.score(X, y) == pytest.approx(accuracy_score(y, pred))
    assert probe.score(X, y, metric="accuracy") == pytest.approx(
        accuracy_score(y, pred)
    )
    assert probe.score(X, y, metric="miou") == pytest.approx(
        jaccard_score(y, pred, average="macro")
    )
    # Labels unseen in fit count as errors, as in accuracy_score.
    y_new = y.copy()
    y_new[:50] = 7
    assert probe.score(X, y_new) == pytest.approx(accuracy_score(y_new, pred))
    scorer = make_segmentation_scorer("miou")
    assert scorer(probe, X, y) == probe.score(X, y, metric="miou")
    with pytest.raises(ValueError, match="metric"):
        probe.score(X, y, metric="f1")


def test_score_report_matches_sklearn_on_maps_and_tokens():
    from sklearn.metrics import jaccard_score as jac

    maps, _, large = _scenes(seed=3)
    probe = LinearProbe(random_state=0).fit(maps, large)
    report = probe.score_report(maps, large)
    pred = probe.predict(maps, size=large.shape[1:])
    assert report["accuracy"] == pytest.approx(
        accuracy_score(large.ravel(), pred.ravel())
    )
    per_class = jac(large.ravel(), pred.ravel(), average=None, labels=[0, 1, 2])
    assert_allclose(report["iou"], per_class)
    assert report["miou"] == pytest.approx(probe.score(maps, large))
    X, y = _blobs()
    tokens = LinearProbe(random_state=0).fit(X, y)
    assert tokens.score_report(X, y)["accuracy"] == pytest.approx(tokens.score(X, y))


# ------------------------------------------------------------------- maps
def test_maps_with_same_size_labels_are_the_token_problem():
    maps, small, _ = _scenes()
    probe = LinearProbe(device="cpu", random_state=0).fit(maps, small)
    tokens = maps_to_tokens(torch.from_numpy(maps)).numpy()
    ref = LinearProbe(device="cpu", random_state=0).fit(tokens, small.reshape(-1))
    assert_array_equal(probe.classes_, [0, 1, 2])
    assert_allclose(probe.coef_, ref.coef_, rtol=1e-6, atol=1e-6)
    assert_allclose(probe.intercept_, ref.intercept_, rtol=1e-6, atol=1e-6)

    scores = probe.decision_function(maps)
    assert scores.shape == (maps.shape[0], 3, 6, 6)
    assert_allclose(
        scores.transpose(0, 2, 3, 1).reshape(-1, 3),
        ref.decision_function(tokens),
        rtol=1e-5,
        atol=1e-5,
    )
    assert probe.predict_proba(maps).shape == scores.shape
    pred = probe.predict(maps)
    assert pred.shape == small.shape
    assert_array_equal(pred, scores.argmax(axis=1))
    assert probe.score(maps, small) > 0.9  # mIoU
    assert probe.score(maps, small, metric="accuracy") > 0.9


def test_maps_with_larger_labels_upsample_logits():
    maps, small, large = _scenes(factor=2)
    probe = LinearProbe(random_state=0).fit(maps, large)
    assert_array_equal(probe.classes_, [0, 1, 2])
    size = large.shape[-2:]
    pred = probe.predict(maps, size=size)
    assert pred.shape == large.shape
    # Independent check of the protocol: bilinear upsampling, then argmax.
    scores = torch.from_numpy(probe.decision_function(maps))
    ref = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    assert_array_equal(pred, ref.argmax(dim=1).numpy())
    assert probe.score(maps, large) > 0.8
    assert probe.score(maps, small) > 0.8
    # Smaller label maps work too.
    coarse = small[:, ::2, ::2]
    assert LinearProbe(random_state=0).fit(maps, coarse).score(maps, coarse) > 0.6


def test_ignored_tokens_do_not_influence_fit():
    X, y = _blobs()
    rng = np.random.default_rng(0)
    drop = rng.random(len(y)) < 0.3
    y_ign = np.where(drop, -1, y)
    probe = LinearProbe(ignore_index=-1, device="cpu", random_state=0)
    a = clone(probe).fit(X, y_ign)
    b = clone(probe).fit(X[~drop], y[~drop])
    assert_array_equal(a.classes_, [0, 1, 2])
    assert_array_equal(a.coef_, b.coef_)
    assert_array_equal(a.intercept_, b.intercept_)
    # Ignored labels are left out of the score as well.
    assert a.score(X, y_ign) == pytest.approx(a.score(X[~drop], y[~drop]))


def test_ignored_pixels_do_not_influence_fit():
    maps, small, large = _scenes()
    rng = np.random.default_rng(1)
    # Same-size label maps: the fit equals the token fit on labelled pixels.
    ign = rng.random(small.shape) < 0.3
    probe = LinearProbe(device="cpu", random_state=0)
    a = clone(probe).fit(maps, np.where(ign, -1, small))
    tokens = maps_to_tokens(torch.from_numpy(maps)).numpy()
    b = clone(probe).fit(tokens[~ign.ravel()], small.ravel()[~ign.ravel()])
    assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-6)
    # Upsampled path: the ignored value does not matter, whatever it is.
    ign = rng.random(large.shape) < 0.3
    c = clone(probe).fit(maps, np.where(ign, -1, large))
    d = clone(probe).fit(maps, np.where(ign, -5, large))
    e = clone(probe).set_params(ignore_index=255).fit(maps, np.where(ign, 255, large))
    assert_array_equal(c.coef_, d.coef_)
    assert_array_equal(c.coef_, e.coef_)
    assert_array_equal(e.classes_, [0, 1, 2])
    assert e.score(maps, np.where(ign, 255, large)) == pytest.approx(
        c.score(maps, np.where(ign, -1, large))
    )


# ------------------------------------------------------- estimator contract
def test_determinism_per_random_state():
    X, y = _blobs()
    a = LinearProbe(device="cpu", random_state=3).fit(X, y)
    b = LinearProbe(device="cpu", random_state=3).fit(X, y)
    c = LinearProbe(device="cpu", random_state=4).fit(X, y)
    assert_array_equal(a.coef_, b.coef_)
    assert a.loss_curve_ == b.loss_curve_
    assert not np.array_equal(a.coef_, c.coef_)


def test_output_type_follows_input():
    X, y = _blobs()
    probe = LinearProbe(random_state=0).fit(torch.from_numpy(X), torch.from_numpy(y))
    assert isinstance(probe.coef_, np.ndarray)
    assert isinstance(probe.classes_, np.ndarray)
    Xt = torch.from_numpy(X)
    for method in (
        "predict",
        "predict_proba",
        "predict_log_proba",
        "decision_function",
    ):
        out_t = getattr(probe, method)(Xt)
        out_n = getattr(probe, method)(X)
        assert isinstance(out_t, torch.Tensor), method
        assert isinstance(out_n, np.ndarray), method
        assert out_t.device.type == probe._resolved_device().type
        assert_allclose(out_t.cpu().numpy(), out_n, rtol=1e-6, atol=1e-6)
    maps, small, _ = _scenes()
    probe.fit(torch.from_numpy(maps), torch.from_numpy(small))
    pred = probe.predict(torch.from_numpy(maps), size=(12, 12))
    assert isinstance(pred, torch.Tensor) and pred.shape == (6, 12, 12)


def test_input_is_not_modified():
    X, y = _blobs()
    maps, small, large = _scenes()
    y_ign = np.where(np.arange(len(y)) % 5 == 0, -1, y)
    cases = [
        (X, y_ign, {"ignore_index": -1}),
        (maps, small, {}),
        (maps, large, {}),
        (torch.from_numpy(maps), torch.from_numpy(np.where(small == 1, -1, small)), {}),
    ]
    for Xi, yi, params in cases:
        X0 = Xi.clone() if isinstance(Xi, torch.Tensor) else Xi.copy()
        y0 = yi.clone() if isinstance(yi, torch.Tensor) else yi.copy()
        probe = LinearProbe(max_iter=3, random_state=0, **params).fit(Xi, yi)
        probe.predict(Xi)
        probe.score(Xi, yi)
        assert_array_equal(np.asarray(Xi), np.asarray(X0))
        assert_array_equal(np.asarray(yi), np.asarray(y0))


def test_pickle_and_clone():
    X, y = _blobs()
    probe = LinearProbe(lr=1e-2, random_state=0).fit(X, y)
    probe.predict(X)  # fill the device cache
    restored = pickle.loads(pickle.dumps(probe))
    assert b"torch" not in pickle.dumps(probe)  # no device state in the pickle
    assert_array_equal(restored.predict(X), probe.predict(X))
    assert_allclose(restored.predict_proba(X), probe.predict_proba(X))
    fresh = clone(probe)
    assert fresh.get_params() == probe.get_params()
    assert not hasattr(fresh, "coef_")


def test_early_stopping_and_loss_curve():
    X, y = _blobs()
    probe = LinearProbe(tol=10.0, random_state=0).fit(X, y)
    assert probe.n_iter_ == 2  # the second epoch cannot improve by 10
    assert len(probe.loss_curve_) == probe.n_iter_
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        probe = LinearProbe(max_iter=3, tol=0.0, random_state=0).fit(X, y)
    assert probe.n_iter_ == 3
    assert probe.loss_curve_[-1] < probe.loss_curve_[0]


def test_weight_decay_shrinks_weights():
    X, y = _blobs()
    free = LinearProbe(random_state=0).fit(X, y)
    decayed = LinearProbe(weight_decay=0.1, random_state=0).fit(X, y)
    assert np.linalg.norm(decayed.coef_) < np.linalg.norm(free.coef_)


def test_verbose_shows_a_progress_bar(capsys):
    X, y = _blobs()
    LinearProbe(max_iter=2, verbose=True, random_state=0).fit(X, y)
    assert "loss" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_bad_input():
    X, y = _blobs()
    maps, small, _ = _scenes()
    probe = LinearProbe(max_iter=2)
    X_nan = X.copy()
    X_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        probe.fit(X_nan, y)
    with pytest.raises(ValueError, match="NaN"):
        probe.fit(torch.from_numpy(X_nan), y)
    with pytest.raises(ValueError, match="NaN"):
        probe.fit(X, np.where(y == 0, np.nan, y))
    with pytest.raises(ValueError, match="labels"):
        probe.fit(X, y[:-1])
    with pytest.raises(ValueError):
        probe.fit(X, np.stack([y, y], axis=1))
    with pytest.raises(ValueError, match="one class"):
        probe.fit(X, np.zeros(len(y)))
    with pytest.raises(ValueError, match="y is None"):
        probe.fit(X, None)
    with pytest.raises(ValueError, match="label maps"):
        probe.fit(maps, small.reshape(-1))
    with pytest.raises(ValueError, match="label maps"):
        probe.fit(maps, small[:-1])
    with pytest.raises(ValueError, match="no valid label"):
        probe.fit(maps, -np.ones_like(small))
    with pytest.raises(ValueError, match="one class"):
        probe.fit(maps, np.zeros_like(small))
    with pytest.raises(ValueError, match="y must hold integer labels"):
        probe.fit(maps, small + 0.5)
    with pytest.raises(ValueError):
        probe.fit(X[:, :, None], y)  # 3-D input
    with pytest.raises(ValueError, match="lr"):
        LinearProbe(lr=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="batch_size"):
        LinearProbe(batch_size="big").fit(X, y)

    probe.fit(X, y)
    with pytest.raises(ValueError, match="features"):
        probe.predict(X[:, :3])
    with pytest.raises(ValueError, match="size"):
        probe.predict(X, size=(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        probe.predict_proba(X_nan)


def test_on_disk_fits_shuffle_with_a_cpu_generator_on_every_device(
    monkeypatch, tmp_path
):
    # The dask fit carries a CPU generator across its tasks; the streamed fit
    # of a memmap drew its shuffles from a generator on the fit device, so on
    # CUDA the two made other shuffles and stopped being equal. Both now draw
    # on the CPU; in-memory fits keep theirs on the device (documented).
    import dask.array as da

    import skstego.probes._linear as linear
    from skstego._device import LazyFeatures

    asked = []

    def make_generator(random_state, device):
        asked.append(torch.device(device))
        return torch.Generator().manual_seed(0)

    monkeypatch.setattr(linear, "make_generator", make_generator)
    X, _ = _blobs(n=40)
    np.save(tmp_path / "x.npy", X.astype(np.float32))
    memmap = np.load(tmp_path / "x.npy", mmap_mode="r")
    cuda = torch.device("cuda:0")
    for source in (memmap, da.from_array(X, chunks=10)):
        linear._shuffle_generator(0, LazyFeatures(source), cuda)
    linear._shuffle_generator(0, X, cuda)
    assert asked == [torch.device("cpu"), torch.device("cpu"), cuda]


@pytest.mark.gpu
def test_cuda_fit_predict_and_pickle_to_cpu():
    X, y = _blobs()
    Xc = torch.from_numpy(X).cuda()
    cpu = LinearProbe(device="cpu", random_state=0).fit(X, y)
    gpu = LinearProbe(device="cuda", random_state=0).fit(Xc, torch.from_numpy(y))
    pred = gpu.predict(Xc)
    assert pred.device.type == "cuda"
    assert (pred.cpu().numpy() == cpu.predict(X)).mean() > 0.95
    assert isinstance(gpu.predict(X), np.ndarray)
    # Full-batch L-BFGS is deterministic: CPU and CUDA fits agree.
    lb_cpu = LinearProbe(solver="lbfgs", weight_decay=1e-3, device="cpu").fit(X, y)
    lb_gpu = LinearProbe(solver="lbfgs", weight_decay=1e-3, device="cuda").fit(X, y)
    assert_allclose(lb_gpu.coef_, lb_cpu.coef_, atol=1e-3)
    # Upsampled label maps on the GPU.
    maps, _, large = _scenes()
    probe = LinearProbe(device="cuda", random_state=0).fit(maps, large)
    assert probe.score(maps, large) > 0.8
    # A CUDA-fitted model unpickles and predicts on the CPU.
    restored = pickle.loads(pickle.dumps(gpu)).set_params(device="cpu")
    assert (restored.predict(X) == gpu.predict(X)).mean() > 0.99


def test_map_labels_unseen_in_fit_count_as_errors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=(6, 3, 3))
    probe = LinearProbe(max_iter=20, random_state=0).fit(X, y)
    pred = probe.predict(X)
    y_new = y.copy()
    y_new[0] = 5  # a class the probe never saw: every such pixel is an error
    # independent count: accuracy over valid pixels with unseen ones as misses
    expected = np.mean(np.where(y_new == 5, False, pred == y_new))
    assert probe.score(X, y_new, metric="accuracy") == pytest.approx(expected)
    assert probe.score(X, y_new, metric="accuracy") < probe.score(
        X, y, metric="accuracy"
    )
