"""KMeansProbe(backend="sklearn"): Lloyd with scikit-learn's compiled E-step.

Checked against independent references (scikit-learn's ``KMeans`` from the
same initial centroids, a float64 NumPy Lloyd loop, float64 inertia) and
against the torch backend, on the cases where the kernel's Euclidean
arithmetic must be adapted: cosine k-means, a centroid of zero norm, zero
tokens, token weights, empty clusters and data far from the origin.
"""

import numpy as np
import pytest
import torch
from _references import numpy_lloyd
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans

from skstego import KMeansProbe
from skstego.probes import _kmeans_cpu_kernels


def _blobs(seed, n=1500, d=8, k=5, spread=2.0, offset=0.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(k, d))
    X = centres[rng.integers(k, size=n)] + rng.normal(scale=spread, size=(n, d))
    return (X + offset).astype(np.float32)


def _fit(X, backend, **kw):
    fit_params = kw.pop("fit", {})
    kw.setdefault("tol", 0.0)
    kw.setdefault("max_iter", 50)
    kw.setdefault("max_samples", None)
    return KMeansProbe(backend=backend, device="cpu", **kw).fit(X, **fit_params)


def _inertia64(X, centres, labels, w=None, cosine=False):
    X = np.asarray(X, np.float64)
    C = np.asarray(centres, np.float64)
    if cosine:  # 2 - 2 cos, and 2 for a zero token
        Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        d = 2.0 - 2.0 * np.einsum("ij,ij->i", Xn, C[labels])
    else:
        d = ((X - C[labels]) ** 2).sum(axis=1)
    return float(d.sum() if w is None else d @ w)


def test_compiled_kernel_is_found_and_checked():
    assert _kmeans_cpu_kernels.compiled_lloyd_available()
    assert KMeansProbe(k=2, device="cpu").fit(_blobs(0, 200)).n_iter_ >= 1


@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_euclidean_equals_sklearn_kmeans_from_the_same_init(tol):
    X = _blobs(1)
    init = X[[0, 1, 2, 3, 4]].copy()  # poor seeds: several iterations
    probe = _fit(X, "sklearn", k=5, metric="euclidean", init=init, tol=tol)
    ref = KMeans(5, init=init, n_init=1, max_iter=50, tol=tol).fit(X)
    assert probe.n_iter_ == ref.n_iter_ > 2
    np.testing.assert_array_equal(probe.labels_, ref.labels_)
    np.testing.assert_allclose(probe.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    exact = _inertia64(X, probe.cluster_centers_, probe.labels_)
    assert probe.inertia_ == pytest.approx(exact, rel=1e-5)
    np.testing.assert_array_equal(probe.counts_, np.bincount(ref.labels_))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_equals_the_torch_backend_step_for_step(metric):
    X = _blobs(2)
    init = X[::300][:5].copy()
    for n_iter in (1, 3, 8):
        a = _fit(X, "sklearn", k=5, metric=metric, init=init, max_iter=n_iter)
        b = _fit(X, "torch", k=5, metric=metric, init=init, max_iter=n_iter)
        C = numpy_lloyd(X, init, n_iter, spherical=metric == "cosine")
        np.testing.assert_allclose(a.cluster_centers_, C, atol=1e-5)
        np.testing.assert_array_equal(a.labels_, b.labels_)
        assert a.n_iter_ == b.n_iter_
        np.testing.assert_allclose(a.inertia_curve_, b.inertia_curve_, rtol=1e-5)
        assert a.inertia_curve_[-1] == pytest.approx(a.inertia_, rel=1e-12)
    if metric == "cosine":
        np.testing.assert_allclose(
            np.linalg.norm(a.cluster_centers_, axis=1), 1.0, rtol=2e-7
        )


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_weighted_fit_equals_repeated_tokens(metric):
    X = _blobs(3, n=600)
    reps = np.random.default_rng(3).integers(1, 4, size=len(X))
    init = X[::120][:5].copy()
    kw = dict(k=5, metric=metric, init=init)
    a = _fit(X, "sklearn", fit=dict(sample_weight=reps.astype(float)), **kw)
    b = _fit(np.repeat(X, reps, axis=0), "sklearn", **kw)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-5)
    np.testing.assert_allclose(a.counts_, b.counts_)
    exact = _inertia64(
        X, a.cluster_centers_, a.labels_, reps, cosine=metric == "cosine"
    )
    assert a.inertia_ == pytest.approx(exact, rel=1e-5)


def test_an_empty_cluster_is_reseeded_as_scikit_learn_does():
    X = _blobs(4, n=800)
    init = X[[0, 0, 400, 600]].copy()  # a duplicate: one cluster starts empty
    probe = _fit(X, "sklearn", k=4, metric="euclidean", init=init, max_iter=20)
    ref = KMeans(4, init=init, n_init=1, max_iter=20, tol=0.0).fit(X)
    torch_probe = _fit(X, "torch", k=4, metric="euclidean", init=init, max_iter=20)
    np.testing.assert_allclose(probe.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    np.testing.assert_array_equal(probe.labels_, torch_probe.labels_)
    assert (probe.counts_ > 0).all()


def test_inertia_far_from_the_origin_is_exact_to_float32():
    # sum |x|^2 is ~1e4 times the inertia: the inertia is not taken from the
    # cluster sums there (which would lose ~1e-3), but from a pass
    X = _blobs(5, spread=1.0, offset=300.0)
    init = X[::300][:5].copy()
    for n_iter in (1, 2, 6):
        probe = _fit(X, "sklearn", k=5, metric="euclidean", init=init, max_iter=n_iter)
        exact = _inertia64(X, probe.cluster_centers_, probe.labels_)
        assert probe.inertia_ == pytest.approx(exact, rel=2e-5)


def test_cosine_with_zero_tokens_counts_them_at_distance_two():
    X = _blobs(6, n=900)
    X[::30] = 0.0  # 30 zero tokens: cosine distance 2 to every centroid
    init = X[1::300][:3].copy()
    a = _fit(X, "sklearn", k=3, init=init, max_iter=10)
    b = _fit(X, "torch", k=3, init=init, max_iter=10)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-5)
    exact = _inertia64(X, a.cluster_centers_, a.labels_, cosine=True)
    assert a.inertia_ == pytest.approx(exact, rel=1e-5)


def test_cosine_centroid_of_zero_norm_starts_over_on_torch(monkeypatch):
    # Two tokens tie between the three centroids (cosine 0 to each) and go to
    # the first, which becomes their mean: zero. The Euclidean kernel would
    # no longer rank centroids by cosine, so the run restarts on torch.
    X = np.array(
        [[0, 1, 0], [0, -1, 0], [1, 0.1, 0], [1, -0.1, 0], [-1, 0.1, 0]],
        dtype=np.float32,
    )
    init = np.array([[0, 0, 1], [1, 0, 0], [-1, 0, 0]], dtype=np.float32)
    restarts = []
    real = _kmeans_cpu_kernels._lloyd

    def counting(*args, **kw):
        restarts.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(_kmeans_cpu_kernels, "_lloyd", counting)
    a = _fit(X, "sklearn", k=3, init=init, max_iter=5)
    assert restarts  # the zero-norm centroid was met and the run restarted
    b = _fit(X, "torch", k=3, init=init, max_iter=5)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert a.n_iter_ == b.n_iter_


def test_without_the_compiled_kernel_auto_runs_torch(monkeypatch):
    X = _blobs(7, n=500)
    init = X[::100][:5].copy()
    monkeypatch.setattr(_kmeans_cpu_kernels, "_compiled_kernels", lambda: None)
    a = _fit(X, "auto", k=5, metric="euclidean", init=init)
    b = _fit(X, "torch", k=5, metric="euclidean", init=init)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    # and the compiled loop itself falls back to the torch kernels
    Xt = torch.from_numpy(X)
    args = dict(max_iter=5, tol=0.0, cosine=False, verbose=False, desc="")
    c = _kmeans_cpu_kernels._compiled_lloyd(
        Xt, (Xt * Xt).sum(1), torch.from_numpy(init), **args
    )
    five = _fit(X, "torch", k=5, metric="euclidean", init=init, max_iter=5)
    np.testing.assert_array_equal(c[0].numpy(), five.cluster_centers_)
    np.testing.assert_array_equal(c[1].numpy(), five.labels_)


def test_labels_are_those_of_the_nearest_final_centroid():
    X = _blobs(8)
    probe = KMeansProbe(5, metric="euclidean", random_state=0, device="cpu").fit(X)
    C = probe.cluster_centers_.astype(np.float64)
    nearest = cdist(X.astype(np.float64), C, "sqeuclidean").argmin(axis=1)
    assert (probe.labels_ == nearest).mean() > 0.999
    assert (probe.predict(X) == probe.labels_).all()
