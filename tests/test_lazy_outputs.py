"""transform / predict / score read on-disk or generated input slice by slice.

Each estimator is fitted in memory, then applied to the same data behind a
lazy array-like that records its reads: outputs equal the in-memory ones, and
no read covers the whole input.
"""

import numpy as np
import pytest

from skstego import (
    HNNEClusterProbe,
    HNNEProjector,
    KMeansProbe,
    LinearProbe,
    RandomProjection,
    StegoProjector,
    TorchPCA,
)
from skstego.datasets import make_feature_maps


class Recorded:
    """The ``_skstego_lazy`` protocol over an array, recording read sizes."""

    _skstego_lazy = True

    def __init__(self, data):
        self.data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.reads = []

    def __getitem__(self, key):
        out = self.data[key]
        self.reads.append(len(out))
        return out

    def __len__(self):
        return len(self.data)


@pytest.fixture(scope="module")
def maps():
    X, y = make_feature_maps(24, n_features=16, map_size=6, random_state=0)
    return X, y


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    # a few images per read, so that streaming is visible on tiny data
    import skstego._device as device
    import skstego.probes._base as base
    import skstego.projection._hnne as hnne

    budget = 4 * 16 * 36 * 4
    monkeypatch.setattr(device.rows_per_batch, "__defaults__", (budget,))
    monkeypatch.setattr(device, "DEFAULT_BATCH_ELEMENTS", budget)
    monkeypatch.setattr(base, "DEFAULT_BATCH_ELEMENTS", budget)
    monkeypatch.setattr(hnne, "DEFAULT_BATCH_ELEMENTS", budget)
    for purpose in device.CPU_BATCH_ELEMENTS:
        monkeypatch.setitem(device.CPU_BATCH_ELEMENTS, purpose, budget)


def _check(method, est, X, **kw):
    expected = getattr(est, method)(X, **kw)
    lazy = Recorded(X)
    got = getattr(est, method)(lazy, **kw)
    assert lazy.reads and max(lazy.reads) < len(X), lazy.reads
    if isinstance(expected, float):
        assert got == pytest.approx(expected)
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize(
    "reducer",
    [
        TorchPCA(4, device="cpu"),
        RandomProjection(4, device="cpu", random_state=0),
        StegoProjector(4, n_steps=2, batch_size=4, device="cpu", random_state=0),
        HNNEProjector(4, device="cpu", random_state=0),
    ],
    ids=lambda e: type(e).__name__,
)
def test_reducers_transform_lazily(maps, reducer):
    X, _ = maps
    _check("transform", reducer.fit(X), X)


def test_probes_predict_and_score_lazily(maps):
    X, y = maps
    km = KMeansProbe(k=5, device="cpu", random_state=0).fit(X)
    for method in ("predict", "transform", "predict_proba"):
        _check(method, km, X)
    _check("predict", km, X, size=(12, 12))
    _check("score", km, X, y=y)
    hc = HNNEClusterProbe(k=5, device="cpu", random_state=0).fit(X)
    _check("predict", hc, X)
    lin = LinearProbe(device="cpu", random_state=0, max_iter=5).fit(X, y)
    for method in ("predict", "decision_function", "predict_proba"):
        _check(method, lin, X)
    _check("score", lin, X, y=y)


def test_hnne_fit_transform_streams(maps):
    X, _ = maps
    expected = HNNEProjector(4, device="cpu", random_state=0).fit_transform(X)
    lazy = Recorded(X)
    got = HNNEProjector(4, device="cpu", random_state=0).fit_transform(lazy)
    assert max(lazy.reads) < len(X)
    np.testing.assert_allclose(got, expected, atol=1e-5)
