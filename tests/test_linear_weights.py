"""``sample_weight`` and ``class_weight`` in ``LinearProbe.fit``.

References: scikit-learn's ``LogisticRegression`` with the same weights, and
fits on repeated rows / images for integer weights.

Tolerances. ``LinearProbe`` computes in float32 and stops L-BFGS on a
gradient of ``tol`` (float32 gradients bottom out near 1e-6 relative), while
``LogisticRegression(C=1e8)`` solves the (practically) unpenalised problem in
float64: on a non-separable, well-conditioned problem (no redundant
features, so the coefficients are identifiable) both reach the same optimum
up to about 1e-4 in the probabilities (float32 L-BFGS stalls there on the
flat directions of the loss) and 1e-3 relative in the coefficients; we allow
5e-4 / 2e-3. Coefficients are compared centred across classes
(softmax is blind to a shift shared by all classes; scikit-learn's penalty
centres them, ours keeps their sum at zero from the zero start). Repeated
rows give the same weighted objective up to float summation order; L-BFGS
paths then part at float32 precision and stop within 5e-4 of each other in
the probabilities. Adam, shuffled differently, is checked against the exact
optimum with a loose tolerance.
"""

import numpy as np
import pytest
import sklearn
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skstego import LinearProbe


def _lbfgs(**kw):
    params = {
        "solver": "lbfgs",
        "weight_decay": 0.0,
        "tol": 1e-8,
        "max_iter": 2000,
        "device": "cpu",
    }
    return LinearProbe(**{**params, **kw})


@pytest.fixture(scope="module")
def problem():
    X, y = make_classification(
        300,
        5,
        n_informative=4,
        n_redundant=0,
        n_classes=3,
        n_clusters_per_class=1,
        flip_y=0.2,
        random_state=0,
    )
    w = np.random.default_rng(0).integers(0, 4, size=len(y)).astype(float)
    return X, y, w


def _centred(coef):
    return coef - coef.mean(0)


@pytest.mark.parametrize(
    "class_weight", [None, "balanced", {0: 2.0, 1: 0.5, 2: 1.0}], ids=str
)
@pytest.mark.parametrize("binary", [False, True], ids=["multiclass", "binary"])
def test_equals_logistic_regression(problem, class_weight, binary):
    X, y, w = problem
    if binary:
        y = (y > 0).astype(int)
        if isinstance(class_weight, dict):
            class_weight = {0: 2.0, 1: 0.5}
    probe = _lbfgs(class_weight=class_weight).fit(X, y, sample_weight=w)
    ref_class_weight = class_weight
    if class_weight == "balanced":
        # "balanced" counts the sample weights (scikit-learn >= 1.7 does so;
        # 1.6 counted rows): n / (n_classes * n_c), n_c the weight of class c
        classes = np.unique(y)
        n_c = np.array([w[y == c].sum() for c in classes])
        ref_class_weight = dict(
            zip(
                classes.tolist(), (w.sum() / (len(classes) * n_c)).tolist(), strict=True
            )
        )
    ref = LogisticRegression(
        C=1e8, tol=1e-10, max_iter=10000, class_weight=ref_class_weight
    )
    ref.fit(X, y, sample_weight=w)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=5e-4)
    coef = _centred(probe.coef_)
    ref_coef = ref.coef_ if not binary else np.vstack([-ref.coef_, ref.coef_]) / 2
    ref_coef = _centred(ref_coef)
    np.testing.assert_allclose(coef, ref_coef, atol=2e-3 * np.abs(ref_coef).max())


def test_class_weight_alone_equals_logistic_regression(problem):
    X, y, _ = problem
    probe = _lbfgs(class_weight="balanced").fit(X, y)
    ref = LogisticRegression(C=1e8, tol=1e-10, max_iter=10000, class_weight="balanced")
    ref.fit(X, y)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=5e-4)
    unweighted = _lbfgs().fit(X, y)
    assert not np.allclose(probe.predict_proba(X), unweighted.predict_proba(X))


def test_integer_weights_equal_repeated_rows_lbfgs(problem):
    X, y, w = problem
    reps = w.astype(int)
    for cw in [None, "balanced"]:
        weighted = _lbfgs(class_weight=cw).fit(X, y, sample_weight=w)
        repeated = _lbfgs(class_weight=cw).fit(
            np.repeat(X, reps, 0), np.repeat(y, reps)
        )
        np.testing.assert_allclose(
            weighted.predict_proba(X), repeated.predict_proba(X), atol=5e-4
        )
        np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=2e-3)


def test_integer_weights_equal_repeated_rows_adam(problem):
    # Adam's shuffles (and mini-batches) differ between the weighted rows and
    # the repeated ones; after convergence both sit near the same optimum.
    X, y, w = problem
    reps = w.astype(int)
    kw = {"lr": 0.05, "max_iter": 300, "tol": 1e-6, "batch_size": 64}
    kw.update(device="cpu", random_state=0)
    weighted = LinearProbe(**kw).fit(X, y, sample_weight=w)
    repeated = LinearProbe(**kw).fit(np.repeat(X, reps, 0), np.repeat(y, reps))
    exact = _lbfgs().fit(X, y, sample_weight=w)
    for probe in (weighted, repeated):
        diff = np.abs(probe.predict_proba(X) - exact.predict_proba(X))
        assert diff.max() < 0.1 and diff.mean() < 0.02


def test_scaling_weights_changes_nothing(problem):
    # the loss divides by the weight sum, also when it is below 1
    X, y, w = problem
    a = _lbfgs().fit(X, y, sample_weight=w)
    b = _lbfgs().fit(X, y, sample_weight=w * 1e-3)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-4)
    c = _lbfgs().fit(X, y, sample_weight=np.ones(len(y)))
    d = _lbfgs().fit(X, y)
    np.testing.assert_allclose(c.coef_, d.coef_, atol=2e-3)


def _maps(size):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 4, 4, 4)).astype(np.float32)
    proj = rng.normal(size=(3, 4))
    logits = np.einsum("kc,nchw->nkhw", proj, X)
    labels = logits.argmax(1)
    flip = rng.random(labels.shape) < 0.25
    labels = np.where(flip, rng.integers(0, 3, labels.shape), labels)
    if size != 4:
        labels = labels.repeat(size // 4, 1).repeat(size // 4, 2)
    return X, labels


@pytest.mark.parametrize("size", [4, 8], ids=["same-size", "upsampled"])
def test_maps_image_weights_equal_repeated_images(size):
    X, labels = _maps(size)
    w = np.array([1, 2, 0, 3, 1, 2])
    weighted = _lbfgs().fit(X, labels, sample_weight=w.astype(float))
    repeated = _lbfgs().fit(np.repeat(X, w, 0), np.repeat(labels, w, 0))
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=1e-3)
    # per-pixel weights constant over each image: the same fit
    pix = np.broadcast_to(w[:, None, None], labels.shape).astype(float)
    per_pixel = _lbfgs().fit(X, labels, sample_weight=pix)
    np.testing.assert_allclose(per_pixel.coef_, repeated.coef_, atol=1e-3)


@pytest.mark.parametrize("size", [4, 8], ids=["same-size", "upsampled"])
def test_maps_zero_pixel_weight_equals_ignored_pixel(size):
    X, labels = _maps(size)
    drop = np.random.default_rng(2).random(labels.shape) < 0.3
    ignored = _lbfgs().fit(X, np.where(drop, -1, labels))
    zero = _lbfgs().fit(X, labels, sample_weight=(~drop).astype(float))
    if size == 4:  # the standardisation is weighted too: the same problem
        np.testing.assert_allclose(zero.coef_, ignored.coef_, atol=1e-3)
    proba = zero.predict_proba(X, size=labels.shape[1:])
    ref = ignored.predict_proba(X, size=labels.shape[1:])
    np.testing.assert_allclose(proba, ref, atol=1e-3)


def test_maps_class_weight_equals_tokens():
    X, labels = _maps(4)
    cw = {0: 3.0, 1: 1.0, 2: 0.5}
    tokens = X.transpose(0, 2, 3, 1).reshape(-1, 4)
    for class_weight in (cw, "balanced"):
        on_maps = _lbfgs(class_weight=class_weight).fit(X, labels)
        on_tokens = _lbfgs(class_weight=class_weight).fit(tokens, labels.reshape(-1))
        np.testing.assert_allclose(on_maps.coef_, on_tokens.coef_, atol=1e-4)


def test_partial_fit_weights(problem):
    X, y, w = problem
    kw = {"device": "cpu", "random_state": 0}
    a = LinearProbe(**kw).partial_fit(X, y, classes=[0, 1, 2], sample_weight=w)
    b = LinearProbe(**kw).partial_fit(X, y, classes=[0, 1, 2])
    assert not np.allclose(a.coef_, b.coef_)
    c = LinearProbe(class_weight={0: 2.0}, **kw)
    c.partial_fit(X, y, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="balanced"):
        LinearProbe(class_weight="balanced", **kw).partial_fit(X, y, classes=[0, 1, 2])


def test_errors(problem, tmp_path):
    X, y, w = problem
    probe = _lbfgs(max_iter=5)
    with pytest.raises(ValueError, match="sample_weight has shape"):
        probe.fit(X, y, sample_weight=w[:-1])
    with pytest.raises(ValueError, match="Negative"):
        probe.fit(X, y, sample_weight=-w)
    with pytest.raises(ValueError, match="class_weight"):
        LinearProbe(class_weight="bogus").fit(X, y)
    with pytest.raises(ValueError, match="not in class_weight"):
        LinearProbe(class_weight={0: 1.0, 7: 2.0}, device="cpu").fit(X, y)
    on_disk = np.lib.format.open_memmap(
        tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape
    )
    on_disk[:] = X
    for kw in ({"sample_weight": w}, {}):
        est = _lbfgs(max_iter=5, class_weight=None if kw else "balanced")
        with pytest.raises(ValueError, match="in-memory input"):
            est.fit(on_disk, y, **kw)
    # without weights the streamed fit still runs
    _lbfgs(max_iter=5).fit(on_disk, y)


def test_fit_request_routes_sample_weight(problem):
    X, y, w = problem
    expected = make_pipeline(StandardScaler(), _lbfgs()).fit(X, y)
    direct = _lbfgs().fit(StandardScaler().fit_transform(X), y, sample_weight=w)
    with sklearn.config_context(enable_metadata_routing=True):
        probe = _lbfgs().set_fit_request(sample_weight=True)
        probe.set_score_request(sample_weight=True)
        scaler = StandardScaler().set_fit_request(sample_weight=False)
        pipe = make_pipeline(scaler, probe).fit(X, y, sample_weight=w)
        np.testing.assert_allclose(pipe[-1].coef_, direct.coef_, atol=1e-4)
        assert not np.allclose(pipe[-1].coef_, expected[-1].coef_, atol=1e-3)
        search = GridSearchCV(
            _lbfgs()
            .set_fit_request(sample_weight=True)
            .set_score_request(sample_weight=True),
            {"class_weight": [None, "balanced"]},
            cv=3,
        ).fit(X, y, sample_weight=w)
        assert search.best_estimator_.coef_.shape == (3, 5)
        refit = _lbfgs(class_weight=search.best_params_["class_weight"])
        refit.fit(X, y, sample_weight=w)
        np.testing.assert_allclose(search.best_estimator_.coef_, refit.coef_, atol=1e-5)


def test_all_zero_weights_raise(problem):
    X, y, _ = problem
    with pytest.raises(ValueError, match="zero everywhere"):
        _lbfgs().fit(X, y, sample_weight=np.zeros(len(y)))
