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


def test_save_sweep_figures_draws_the_table(data, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from PIL import Image

    from skstego.study import save_sweep_figures

    table = _run(data, reducers=["pca", "rp"], probes=["kmeans"], dims=[2, 4])
    paths = save_sweep_figures(table, tmp_path / "figs", formats=("png", "svg"))
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == [
        "sweep_accuracy.png",
        "sweep_accuracy.svg",
        "sweep_miou.png",
        "sweep_miou.svg",
    ]
    png = np.asarray(Image.open(tmp_path / "figs" / "sweep_miou.png"))
    assert png.ndim == 3 and png.std() > 0  # something was drawn
    svg = (tmp_path / "figs" / "sweep_miou.svg").read_text()
    assert "pca" in svg and "rp" in svg  # one labelled line per reducer


# --------------------------------------------------------------------------
# mechanisms
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mech_data(data):
    """The training split, and a test split with larger, partly ignored labels."""
    X_test, y_test = make_feature_maps(
        5,
        n_features=24,
        n_classes=4,
        map_size=6,
        label_size=(9, 12),
        ignore_fraction=0.1,
        random_state=1,
    )
    return data[0], data[1], X_test, y_test


def _tokens(maps):
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _test_class_proba(km, codes, y):
    """Cluster probabilities summed into classes by the Hungarian matching of
    the clusters predicted at the label size (scipy), + unmatched column."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import confusion_matrix

    size = y.shape[1:]
    pred = km.predict(codes, size=size)
    valid = y >= 0
    n_classes, k = 4, km.k
    conf = confusion_matrix(y[valid], pred[valid], labels=np.arange(k))[:n_classes]
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(k, n_classes)  # unmatched -> the extra column
    mapping[cols] = rows
    proba = km.predict_proba(codes, size=size)
    out = np.zeros((len(codes), n_classes + 1, *size))
    for cluster in range(k):
        out[:, mapping[cluster]] += proba[:, cluster]
    return out


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mechanism_columns_equal_the_metrics_by_hand(mech_data):
    import json

    from sklearn.metrics import adjusted_rand_score, davies_bouldin_score
    from sklearn.metrics import silhouette_score as sk_silhouette
    from sklearn.preprocessing import normalize

    from skstego.metrics import expected_calibration_error
    from skstego.study import MECHANISM_COLUMNS

    X_train, y_train, X_test, y_test = mech_data
    linear = LinearProbe(solver="lbfgs", max_iter=30)
    table = run_sweep(
        X_train,
        y_train,
        X_test,
        y_test,
        reducers=["pca"],
        dims=[3],
        probes={"km": KMeansProbe(k=5), "lin": linear},
        seeds=[0, 1, 2],
        mechanisms=True,
        silhouette_sample_size=60,
        device="cpu",
    )
    assert list(table.columns) == [*RESULT_COLUMNS, *MECHANISM_COLUMNS]
    pca = TorchPCA(3, standardize=True, device="cpu").fit(X_train)
    tr, te = pca.transform(X_train), pca.transform(X_test)
    clusters = {}
    for seed in (0, 1, 2):
        km = KMeansProbe(k=5, device="cpu", random_state=seed).fit(tr)
        row = _row(table, "pca", 3, "km", seed)
        assert row.inertia == pytest.approx(km.inertia_, rel=1e-6)
        assert row.n_iter == km.n_iter_
        np.testing.assert_allclose(json.loads(row.inertia_curve), km.inertia_curve_)
        ids = km.predict(te).ravel()  # clusters, channel-last token order
        clusters[seed] = ids
        expected = sk_silhouette(
            _tokens(te), ids, metric="cosine", sample_size=60, random_state=seed
        )
        assert row.silhouette == pytest.approx(expected, abs=1e-5)
        unit = normalize(_tokens(te).astype(np.float64))
        assert row.davies_bouldin == pytest.approx(
            davies_bouldin_score(unit, ids), rel=1e-5
        )
        proba = _test_class_proba(km, te, y_test)
        assert row.ece == pytest.approx(
            expected_calibration_error(y_test, proba), abs=1e-6
        )
        lin = LinearProbe(solver="lbfgs", max_iter=30, device="cpu", random_state=seed)
        lin.fit(tr, y_train)
        lrow = _row(table, "pca", 3, "lin", seed)
        assert lrow.ece == pytest.approx(
            expected_calibration_error(
                y_test, lin.predict_proba(te, size=y_test.shape[1:])
            ),
            abs=1e-6,
        )
        for column in ("inertia", "n_iter", "silhouette", "stability_ari"):
            assert np.isnan(lrow[column])  # cluster columns: not a cluster probe
    ari = adjusted_rand_score
    assert np.isnan(_row(table, "pca", 3, "km", 0).stability_ari)
    assert _row(table, "pca", 3, "km", 1).stability_ari == pytest.approx(
        ari(clusters[1], clusters[0])
    )
    assert _row(table, "pca", 3, "km", 2).stability_ari == pytest.approx(
        (ari(clusters[2], clusters[0]) + ari(clusters[2], clusters[1])) / 2
    )

    summary = summarize_sweep(table)
    km_rows = table[table.probe == "km"]
    got = summary.loc[("km", "pca", 3)]
    assert got.silhouette_mean == pytest.approx(km_rows.silhouette.mean())
    assert got.n_iter_std == pytest.approx(km_rows.n_iter.std(ddof=1))
    assert got.stability_ari_mean == pytest.approx(km_rows.stability_ari.mean())
    assert "inertia_curve_mean" not in summary


class InterruptedKMeans(KMeansProbe):
    """Fails on the seed-1 cells: an interruption between seeds."""

    armed = True

    def fit(self, X, y=None):
        if type(self).armed and self.random_state == 1:
            raise KeyboardInterrupt
        return super().fit(X, y)


def test_mechanisms_resume_with_the_earlier_seeds_labels(data, tmp_path):
    from sklearn.metrics import adjusted_rand_score

    X_train, _, X_test, _ = data
    args = dict(
        reducers=["pca"],
        probes={"km": InterruptedKMeans(k=4)},
        dims=[2, 3],
        mechanisms=True,
    )
    InterruptedKMeans.armed = True
    with pytest.raises(KeyboardInterrupt):
        _run(data, **args, cache_dir=tmp_path)
    assert len(pd.read_csv(tmp_path / "mechanisms.csv")) == 2  # seed 0 finished
    pca = TorchPCA(3, standardize=True, device="cpu").fit(X_train)
    te = pca.transform(X_test)
    seed0 = KMeansProbe(k=4, device="cpu", random_state=0).fit(pca.transform(X_train))
    stored = np.load(tmp_path / "labels" / "pca__3__km__seed0.npy")
    np.testing.assert_array_equal(stored, seed0.predict(te))

    InterruptedKMeans.armed = False
    resumed = _run(data, **args, cache_dir=tmp_path)  # a new process's view
    seed1 = KMeansProbe(k=4, device="cpu", random_state=1).fit(pca.transform(X_train))
    expected = adjusted_rand_score(seed0.predict(te).ravel(), seed1.predict(te).ravel())
    assert _row(resumed, "pca", 3, "km", 1).stability_ari == pytest.approx(expected)
    full = _run(data, **args)  # the same sweep without interruption
    cols = ["reducer", "dim", "probe", "seed", "miou", "silhouette", "stability_ari"]
    pd.testing.assert_frame_equal(full[cols], resumed[cols], atol=1e-9)
    # read back from the files alone, the table is the same
    again = _run(data, **args, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(again, resumed, check_dtype=False)


def test_cells_without_mechanisms_are_recomputed_with_them(data, tmp_path):
    args = dict(reducers=["pca"], probes=["kmeans"], dims=[2], seeds=[0])
    plain = _run(data, **args, cache_dir=tmp_path)
    assert list(plain.columns) == list(RESULT_COLUMNS)
    assert not (tmp_path / "mechanisms.csv").exists()
    more = _run(data, **args, cache_dir=tmp_path, mechanisms=True)
    assert len(more) == 1 and more.n_iter.notna().all()
    assert more.miou.iloc[0] == pytest.approx(plain.miou.iloc[0])
    assert len(_run(data, **args, cache_dir=tmp_path)) == 1  # no duplicate rows
    with pytest.raises(ValueError, match="silhouette_sample_size"):
        _run(data, **args, mechanisms=True, silhouette_sample_size=1)


def test_save_sweep_figures_draws_the_mechanisms(data, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from PIL import Image

    from skstego.study import save_sweep_figures

    table = _run(
        data, reducers=["pca", "rp"], probes=["kmeans"], dims=[2, 4], mechanisms=True
    )
    paths = save_sweep_figures(table, tmp_path, formats=("png", "svg"))
    assert str(tmp_path / "sweep_mechanisms.png") in paths
    png = np.asarray(Image.open(tmp_path / "sweep_mechanisms.png"))
    assert png.ndim == 3 and png.std() > 0
    svg = (tmp_path / "sweep_mechanisms.svg").read_text()
    for title in ("n_iter", "silhouette", "stability_ari"):
        assert title in svg
    assert not any(
        "mechanisms" in p
        for p in save_sweep_figures(table, tmp_path / "b", mechanisms=False)
    )


@pytest.mark.gpu
def test_mechanisms_on_cuda_match_cpu(mech_data):
    import torch

    X_train, y_train, X_test, y_test = mech_data
    # CUDA and CPU generators differ: start k-means from given centroids
    codes = TorchPCA(3, standardize=True, device="cpu").fit_transform(X_train)
    init = _tokens(codes)[::31][:5]
    kwargs = dict(
        reducers=["pca"],
        dims=[3],
        probes={"km": KMeansProbe(k=5, init=init)},
        seeds=[0, 1],
        mechanisms=True,
        silhouette_sample_size=60,
    )
    cpu = run_sweep(X_train, y_train, X_test, y_test, device="cpu", **kwargs)
    tensors = [torch.from_numpy(a).cuda() for a in (X_train, y_train, X_test, y_test)]
    gpu = run_sweep(*tensors, device="cuda", **kwargs)
    cols = ["miou", "n_iter", "silhouette", "davies_bouldin", "ece", "stability_ari"]
    pd.testing.assert_frame_equal(gpu[cols], cpu[cols], atol=1e-4, check_dtype=False)
