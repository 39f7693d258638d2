"""No op without a CUDA kernel: the package's numerics under the CPU harness.

Every test runs a public entry point on tiny synthetic data inside
:func:`_cuda_harness_ops.no_cuda_missing_ops`, which fails on an aten op
that the CPU runs for integer tensors but CUDA does not (integer matrix
products, bilinear/bicubic upsampling of integer images; see the harness's
docstring for the verified list). So a crash like
``"addmv_impl_cuda" not implemented for 'Long'`` is caught here, without a
GPU. The ops run on the CPU: branches taken only for CUDA tensors are the
business of the ``gpu``-marked tests.
"""

import numpy as np
import pytest
import torch
from _cuda_harness_ops import (
    CUDA_MISSING_INTEGER_KERNELS,
    CudaKernelMissing,
    no_cuda_missing_ops,
)

from skstego import (
    CRFProbe,
    DenseCRF,
    HNNEClusterProbe,
    KMeansProbe,
    LinearProbe,
    crf_refine,
)
from skstego import metrics as M
from skstego.datasets import make_feature_maps, make_scenes
from skstego.projection._knn import image_descriptors, nearest_neighbors

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def maps():
    X, y = make_feature_maps(6, n_features=8, n_classes=3, map_size=5, random_state=0)
    y = y.copy()
    y[:, 0, 0] = -1  # ignored pixels
    return X, y


@pytest.fixture(scope="module")
def tokens(maps):
    X, y = maps
    T = X.transpose(0, 2, 3, 1).reshape(-1, X.shape[1])
    return T, y.reshape(-1)


# --------------------------------------------------------------------------
# the harness itself
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op",
    [
        lambda a, v: a @ v,  # mv
        lambda a, v: a @ a,  # mm
        lambda a, v: torch.addmv(v, a, v),
        lambda a, v: torch.einsum("ij,jk->ik", a, a),  # bmm
        lambda a, v: v.dot(v),
        lambda a, v: torch.nn.functional.interpolate(
            a[None, None].to(torch.uint8), size=(6, 6), mode="bilinear"
        ),
    ],
)
def test_harness_fails_on_integer_ops_cuda_lacks(op):
    a = torch.arange(9).reshape(3, 3)
    v = torch.arange(3)
    op(a, v)  # the CPU runs it
    with pytest.raises(CudaKernelMissing, match="no CUDA kernel"):
        with no_cuda_missing_ops():
            op(a, v)


def test_harness_catches_swallowed_errors_and_passes_float_ops():
    a = torch.arange(9).reshape(3, 3)
    with pytest.raises(CudaKernelMissing, match=r"aten\.mv on \(int64, int64\)"):
        with no_cuda_missing_ops():
            try:
                a @ a[0]
            except CudaKernelMissing:
                pass  # code that swallows the error is still caught on exit
    with no_cuda_missing_ops() as mode:
        a.float() @ a[0].float()
        torch.nn.functional.interpolate(  # nearest has a CUDA uint8 kernel
            a[None, None].to(torch.uint8), size=(6, 6), mode="nearest"
        )
        torch.bincount(a.reshape(-1)).cumsum(0).sort()
    assert mode.saw("mv", torch.float32) and mode.saw("bincount", torch.int64)
    assert not mode.violations
    assert {"mm", "mv", "addmv", "bmm"} <= set(CUDA_MISSING_INTEGER_KERNELS)


# --------------------------------------------------------------------------
# cluster metrics and calibration
# --------------------------------------------------------------------------
def test_clustering_stability(maps):
    # Failed on the old code: its pair counts were int64 `table @ cols`
    # (aten.mv on int64), which CUDA lacks.
    _, y = maps
    rng = np.random.default_rng(0)
    other = np.where(rng.random(y.shape) < 0.2, 2, y)
    with no_cuda_missing_ops() as mode:
        result = M.clustering_stability(
            [torch.from_numpy(y), torch.from_numpy(other), y]
        )
    assert mode.saw("bincount")
    assert result["pairwise"][0, 2] == 1.0


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette(maps, tokens, metric):
    X, y = maps
    T, flat = tokens
    with no_cuda_missing_ops():
        M.silhouette_samples(X, y, metric=metric, device="cpu", chunk_size=7)
        M.silhouette_score(T, flat, metric=metric, sample_size=40, random_state=0)
        M.silhouette_score(torch.from_numpy(X), torch.from_numpy(y), device="cpu")


def test_centroid_scores(maps, tokens):
    X, y = maps
    T, flat = tokens
    with no_cuda_missing_ops():
        for data, labels in ((X, y), (T, flat), (torch.from_numpy(X), y)):
            M.davies_bouldin_score(data, labels, device="cpu")
            M.calinski_harabasz_score(data, labels, device="cpu")


def test_calibration():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=(2, 4, 4)).transpose(0, 3, 1, 2)
    y = rng.integers(-1, 3, size=(2, 4, 4))
    with no_cuda_missing_ops():
        M.expected_calibration_error(y, proba, n_bins=5)
        M.expected_calibration_error(torch.from_numpy(y), torch.from_numpy(proba))


def test_confusion_and_segmentation_metrics(maps):
    _, y = maps
    pred = (y + 1) % 3
    with no_cuda_missing_ops():
        conf = M.confusion_matrix(torch.from_numpy(y), torch.from_numpy(pred))
        M.hungarian_match(conf)
        M.segmentation_report(y, pred, matching="hungarian")
        M.segmentation_report(torch.from_numpy(y), torch.from_numpy(pred))
        M.mean_iou(y, pred)
        M.pixel_accuracy(y, pred)


# --------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeans_probe(maps, metric):
    X, y = maps
    with no_cuda_missing_ops():
        probe = KMeansProbe(
            k=3, metric=metric, backend="torch", device="cpu", random_state=0
        )
        probe.fit(X, y)
        probe.predict(X, size=(10, 10))
        probe.predict_proba(X)
        probe.score(X, y)
        probe.score(X, np.kron(y, np.ones((2, 2), dtype=y.dtype)), upsample="codes")


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_linear_probe(maps, solver):
    X, y = maps
    big = np.kron(y, np.ones((2, 2), dtype=y.dtype))  # labels of another size
    with no_cuda_missing_ops():
        for labels in (y, big):
            probe = LinearProbe(solver=solver, max_iter=3, device="cpu", random_state=0)
            probe.fit(X, labels)
            probe.predict(X, size=(10, 10))
            probe.predict_proba(X)
            probe.score(X, labels)
        T = X.transpose(0, 2, 3, 1).reshape(-1, X.shape[1])
        probe = LinearProbe(solver=solver, max_iter=3, ignore_index=-1, device="cpu")
        probe.fit(T, y.reshape(-1)).score(T, y.reshape(-1))


def test_hnne_cluster_probe(maps):
    X, y = maps
    with no_cuda_missing_ops():
        probe = HNNEClusterProbe(device="cpu").fit(X)
        probe.predict(X)
        probe.score(X, y)


def test_crf_refine_and_probe():
    images, _ = make_scenes(2, size=16, n_classes=3, random_state=0)
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=(2, 4, 4)).transpose(0, 3, 1, 2)
    codes = (images.transpose(0, 3, 1, 2)[:, :, ::4, ::4] / 255.0).astype(np.float32)
    with no_cuda_missing_ops():
        for method in ("exact", "approx"):
            crf_refine(
                images, proba, n_iter=2, method=method, device="cpu", backend="torch"
            )
        crf_refine(
            torch.from_numpy(images).permute(0, 3, 1, 2), proba, n_iter=2, device="cpu"
        )
        km = KMeansProbe(
            k=3, metric="euclidean", backend="torch", device="cpu", random_state=0
        )
        crf = CRFProbe(km, DenseCRF(n_iter=2, device="cpu")).fit(codes)
        crf.predict(codes, images=images)


# --------------------------------------------------------------------------
# k-NN and the sweep
# --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_nearest_neighbors(maps, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    X, _ = maps
    g = torch.Generator().manual_seed(0)
    with no_cuda_missing_ops():
        desc = image_descriptors(X, device="cpu", dropout=0.1, generator=g)
        nearest_neighbors(desc, 3, backend=backend)


def test_run_sweep_with_mechanisms():
    from skstego.study import run_sweep

    X, y = make_feature_maps(6, n_features=8, n_classes=3, map_size=4, random_state=0)
    with no_cuda_missing_ops():
        table = run_sweep(
            X,
            y,
            reducers=["pca", "rp"],
            dims=[2],
            probes={
                "km": KMeansProbe(k=3, backend="torch"),
                "lin": LinearProbe(solver="lbfgs", max_iter=5),
            },
            seeds=[0, 1],
            mechanisms=True,
            silhouette_sample_size=40,
            device="cpu",
        )
    assert table["stability_ari"].notna().any()
