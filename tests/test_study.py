"""Tests for skstego.study: the sweep's cells against the estimators run by hand."""

import numpy as np
import pandas as pd
import pytest

from skstego import KMeansProbe, LinearProbe, RandomProjection, TorchPCA
from skstego.datasets import make_feature_maps
from skstego.study import RESULT_COLUMNS, run_sweep, summarize_sweep


@pytest.fixture(scope="module")
def data():
    X_train, y_train = make_feature_maps(
        12, n_features=24, n_classes=4, map_size=6, random_state=0
    )
    X_test, y_test = make_feature_maps(
        6, n_features=24, n_classes=4, map_size=6, random_state=1
    )
    return X_train, y_train, X_test, y_test


def _run(data, **kwargs):
    X_train, y_train, X_test, y_test = data
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("seeds", [0, 1])
    return run_sweep(X_train, y_train, X_test, y_test, **kwargs)


def _row(table, reducer, dim, probe, seed):
    hit = table[
        (table.reducer == reducer)
        & (table.dim == dim)
        & (table.probe == probe)
        & (table.seed == seed)
    ]
    assert len(hit) == 1, hit
    return hit.iloc[0]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_cells_equal_the_estimators_run_by_hand(data):
    X_train, y_train, X_test, y_test = data
    table = _run(data, reducers=["pca", "rp", "none"], dims=[2, 5, 100])
    assert list(table.columns) == list(RESULT_COLUMNS)
    # dims above the 24 features are skipped; "none" is one cell at dim 24
    assert sorted(set(table.dim)) == [2, 5, 24]
    assert len(table) == 2 * (2 + 2 + 1) * 2
    for seed in (0, 1):
        for dim in (2, 5):
            # PCA is fitted once at the largest dim and truncated: the same
            # codes as a PCA fitted at this dim
            pca = TorchPCA(dim, standardize=True, device="cpu").fit(X_train)
            rp = RandomProjection(dim, kind="gaussian", device="cpu", random_state=seed)
            rp.fit(X_train)
            for name, red in (("pca", pca), ("rp", rp)):
                tr, te = red.transform(X_train), red.transform(X_test)
                km = KMeansProbe(k=4, device="cpu", random_state=seed).fit(tr)
                rep = km.score_report(te, y_test)
                row = _row(table, name, dim, "kmeans", seed)
                assert row.miou == pytest.approx(rep["miou"], abs=1e-6)
                assert row.accuracy == pytest.approx(rep["accuracy"], abs=1e-6)
                lin = LinearProbe(device="cpu", random_state=seed).fit(tr, y_train)
                rep = lin.score_report(te, y_test)
                row = _row(table, name, dim, "linear", seed)
                assert row.miou == pytest.approx(rep["miou"], abs=1e-6)
        km = KMeansProbe(k=4, device="cpu", random_state=seed).fit(X_train)
        assert _row(table, "none", 24, "kmeans", seed).miou == pytest.approx(
            km.score(X_test, y_test), abs=1e-6
        )
    assert (table.n_train == 12).all() and (table.n_test == 6).all()
    assert ((table.miou >= 0) & (table.miou <= 1)).all()


def test_custom_estimators_and_default_test_split(data):
    X_train, y_train, _, _ = data
    table = run_sweep(
        X_train,
        y_train,
        reducers={"gauss": RandomProjection(kind="gaussian")},
        probes={"km3": KMeansProbe(k=3)},
        dims=[4],
        seeds=[7],
        device="cpu",
    )
    rp = RandomProjection(4, kind="gaussian", device="cpu", random_state=7)
    codes = rp.fit_transform(X_train)
    expected = KMeansProbe(k=3, device="cpu", random_state=7).fit(codes)
    assert table.miou.iloc[0] == pytest.approx(expected.score(codes, y_train))
    assert table.reducer.tolist() == ["gauss"] and table.probe.tolist() == ["km3"]


class CountingPCA(TorchPCA):
    fits = 0

    def fit(self, X, y=None):
        type(self).fits += 1
        return super().fit(X, y)


class FailingProbe(KMeansProbe):
    """Fails on the first cell at dim 4: an interruption mid-sweep."""

    armed = True

    def fit(self, X, y=None):
        if type(self).armed and X.shape[1] == 4:
            raise KeyboardInterrupt
        return super().fit(X, y)


def test_resumes_after_an_interruption(data, tmp_path):
    args = dict(
        reducers={"pca": CountingPCA(standardize=True), "rp": RandomProjection()},
        probes={"kmeans": FailingProbe(k=4)},
        dims=[2, 4],
    )
    FailingProbe.armed = True
    with pytest.raises(KeyboardInterrupt):
        _run(data, **args, cache_dir=tmp_path)
    saved = pd.read_csv(tmp_path / "results.csv")
    assert len(saved) == 1  # pca dim 2 seed 0 finished before the failure
    FailingProbe.armed = False
    CountingPCA.fits = 0
    resumed = _run(data, **args, cache_dir=tmp_path)
    assert len(resumed) == 8
    # the finished cell is read back, not recomputed
    first = _row(resumed, "pca", 2, "kmeans", 0)
    assert first.probe_seconds == pytest.approx(saved.probe_seconds.iloc[0])
    # a second run computes nothing at all
    CountingPCA.fits = 0
    again = _run(data, **args, cache_dir=tmp_path)
    assert CountingPCA.fits == 0
    pd.testing.assert_frame_equal(again, resumed)
    # and equals a sweep run without interruption
    full = _run(data, **args)
    cols = ["reducer", "dim", "probe", "seed", "miou", "accuracy"]
    pd.testing.assert_frame_equal(full[cols], resumed[cols], atol=1e-9)


def test_features_are_computed_once_and_cached(data, tmp_path):
    import timm
    import torch

    from skstego import DinoFeaturizer
    from skstego.datasets import make_scenes

    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    ).eval()
    images, labels = make_scenes(6, size=32, n_classes=3, random_state=0)
    calls = []

    class Counting(DinoFeaturizer):
        def transform(self, X):
            calls.append(len(X))
            return super().transform(X)

    feat = Counting(vit, resolution=32, device="cpu")
    kwargs = dict(
        featurizer=feat,
        reducers=["pca"],
        probes=["kmeans"],
        dims=[3],
        seeds=[0],
        device="cpu",
    )
    table = run_sweep(images, labels, cache_dir=tmp_path, **kwargs)
    assert sum(calls) == 6
    cached = np.load(tmp_path / "features_train.npy")
    np.testing.assert_allclose(cached, feat.transform(images), atol=1e-5)
    calls.clear()
    # a new cell on the same images reads the cached features
    more = run_sweep(images, labels, cache_dir=tmp_path, **{**kwargs, "dims": [3, 5]})
    assert calls == []
    assert len(more) == 2 and more.miou.iloc[0] == table.miou.iloc[0]
    codes = TorchPCA(5, standardize=True, device="cpu").fit_transform(cached)
    km = KMeansProbe(k=3, device="cpu", random_state=0).fit(codes)
    assert more.miou.iloc[1] == pytest.approx(km.score(codes, labels), abs=1e-6)


def test_summarize_sweep_matches_numpy(data):
    table = _run(data, reducers=["pca"], probes=["kmeans"], dims=[2, 4])
    summary = summarize_sweep(table)
    for dim in (2, 4):
        values = table[table.dim == dim].miou.to_numpy()
        got = summary.loc[("kmeans", "pca", dim)]
        assert got.miou_mean == pytest.approx(values.mean())
        assert got.miou_std == pytest.approx(values.std(ddof=1))
        assert got.n_seeds == 2
    with pytest.raises(ValueError, match="lack the columns"):
        summarize_sweep(table.drop(columns=["miou"]))


def test_bad_input(data):
    X_train, y_train, X_test, _ = data
    with pytest.raises(ValueError, match="pass y_test or y_train"):
        run_sweep(X_train, reducers=["pca"], probes=["kmeans"])
    with pytest.raises(ValueError, match="Unknown reducer 'tsne'"):
        _run(data, reducers=["tsne"])
    with pytest.raises(ValueError, match="Unknown probe 'svm'"):
        _run(data, probes=["svm"])
    with pytest.raises(ValueError, match=r"need y_train"):
        run_sweep(X_train, None, X_test, data[3], reducers=["pca"], probes=["linear"])
    with pytest.raises(ValueError, match="names must be unique"):
        _run(data, reducers=[("a", TorchPCA()), ("a", TorchPCA())])
    with pytest.raises(ValueError, match="dims must be positive"):
        _run(data, dims=[0, 3])
    with pytest.raises(ValueError, match="Expected 2-D tokens"):
        run_sweep(X_train[0], y_train, reducers=["pca"], probes=["kmeans"])
    with pytest.raises(ValueError, match="features"):
        run_sweep(X_train, y_train, X_test[:, :5], reducers=["pca"])
