"""CRFProbe: a probe + dense CRF as the last step of a pipeline."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError

from skstego import CRFProbe, DenseCRF, KMeansProbe, LinearProbe, TorchPCA, crf_refine
from skstego.datasets import make_scenes
from skstego.metrics import segmentation_report

CRF = DenseCRF(n_iter=3, device="cpu")


@pytest.fixture(scope="module")
def scenes():
    images, labels = make_scenes(4, size=32, n_classes=3, random_state=0)
    # codes: the image's colours on an 8 x 8 grid, plus noise
    rng = np.random.default_rng(0)
    codes = images.transpose(0, 3, 1, 2)[:, :, 2::4, 2::4] / 255.0
    codes = (codes + rng.normal(scale=0.05, size=codes.shape)).astype(np.float32)
    return images, labels, codes


def _kmeans(**kw):
    return KMeansProbe(k=3, metric="euclidean", device="cpu", random_state=0, **kw)


def test_pipeline_predict_equals_probe_then_crf(scenes):
    images, labels, codes = scenes
    pipe = Pipeline(
        [("reduce", TorchPCA(3, device="cpu")), ("probe", CRFProbe(_kmeans(), CRF))]
    ).fit(codes)
    pred = pipe.predict(codes, images=images)  # Pipeline passes images on
    # reference: the same steps by hand
    reduced = TorchPCA(3, device="cpu").fit_transform(codes)
    km = _kmeans().fit(reduced)
    proba = km.predict_proba(reduced, size=(32, 32))
    expected = crf_refine(images, proba, n_iter=3, device="cpu").argmax(1)
    np.testing.assert_array_equal(pred, expected)
    assert pred.shape == (4, 32, 32)
    # Pipeline.score drops keyword arguments: score the last step directly
    score = pipe[-1].score(pipe[:-1].transform(codes), labels, images=images)
    report = segmentation_report(labels, expected, matching="hungarian")
    assert score == pytest.approx(report["miou"])
    acc = pipe[-1].score(reduced, labels, images=images, metric="accuracy")
    assert acc == pytest.approx(report["accuracy"])
    # without images: the probe's own predictions and score
    np.testing.assert_array_equal(pipe.predict(codes), km.predict(reduced))
    assert pipe.score(codes, labels) == pytest.approx(km.score(reduced, labels))


def test_labels_follow_the_probe(scenes):
    images, labels, codes = scenes
    # cluster probe fitted with labels: classes, -1 for unmatched clusters
    mapped = CRFProbe(_kmeans(), CRF).fit(codes, labels)
    pred = mapped.predict(codes, images=images)
    proba = mapped.probe_.predict_proba(codes, size=(32, 32))
    ids = crf_refine(images, proba, n_iter=3, device="cpu").argmax(1)
    np.testing.assert_array_equal(pred, np.where(ids < 3, ids, -1))
    # linear probe fitted on tokens with labels 3 and 7: refined labels 3 / 7
    tokens = codes.transpose(0, 2, 3, 1).reshape(-1, 3)
    bright = (tokens.mean(1) > np.median(tokens.mean(1))).astype(int)
    y = np.where(bright, 7, 3)
    lin = CRFProbe(LinearProbe(device="cpu", random_state=0), CRF).fit(tokens, y)
    labels_lin = lin.predict(codes, images=images)
    assert set(np.unique(labels_lin)) <= {3, 7}
    proba = lin.probe_.predict_proba(codes, size=(32, 32))
    ids = crf_refine(images, proba, n_iter=3, device="cpu").argmax(1)
    np.testing.assert_array_equal(labels_lin, np.array([3, 7])[ids])
    # torch in, torch out
    out = lin.predict(
        torch.from_numpy(codes), images=torch.from_numpy(images).permute(0, 3, 1, 2)
    )
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), labels_lin)


def test_clone_default_crf_and_bad_input(scenes):
    images, _, codes = scenes
    probe = CRFProbe(_kmeans())
    assert clone(probe).get_params()["crf"] is None
    fitted = probe.fit(codes)
    with pytest.raises(ValueError, match="images must be a batch"):
        fitted.predict(codes, images=images[0])
    with pytest.raises(ValueError, match="X has 4 maps but images has 2"):
        fitted.predict(codes, images=images[:2])
    with pytest.raises(InvalidParameterError):
        CRFProbe(TorchPCA()).fit(codes)
    with pytest.raises(ValueError, match="metric"):
        fitted.score(codes, np.zeros((4, 32, 32), int), images=images, metric="f1")
