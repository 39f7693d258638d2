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


def _tokens(maps):
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _maps(tokens, like):
    n, _, h, w = like.shape
    return tokens.reshape(n, h, w, -1).transpose(0, 3, 1, 2).astype(np.float32)


def _standardized(fit_on, X):
    """sklearn's StandardScaler fitted on the tokens of ``fit_on``."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(_tokens(fit_on))
    return _maps(scaler.transform(_tokens(X)), X)


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
            # standardize="train": StandardScaler of the training tokens first
            scaled = _standardized(X_train, X_train), _standardized(X_train, X_test)
            for name, red in (("pca", pca), ("rp", rp)):
                if name == "rp":
                    tr, te = red.transform(scaled[0]), red.transform(scaled[1])
                else:
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
    # named by cell and settings fingerprint
    (path,) = (tmp_path / "labels").glob("pca__3__km__seed0__*.npy")
    stored = np.load(path)
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


# --------------------------------------------------------------------------
# the study's protocol: standardize, preset, dims="study"
# --------------------------------------------------------------------------
def _per_batch(X, size):
    """The study's forward pass: StandardScaler().fit_transform per batch."""
    from sklearn.preprocessing import StandardScaler

    out = [
        _maps(StandardScaler().fit_transform(_tokens(X[i : i + size])), X[i : i + size])
        for i in range(0, len(X), size)
    ]
    return np.concatenate(out)


def _study_pca_codes(X_train, X, dim, size):
    """mxm_dimred's DimRedPCA by hand: StandardScaler + PCA fitted on the
    training tokens; forward: per-batch standardisation, then @ V[:, :dim]."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    pca = PCA().fit(StandardScaler().fit_transform(_tokens(X_train)))
    V = pca.components_.T[:, :dim]
    return _maps(_tokens(_per_batch(X, size)) @ V, X)


def _align_signs(codes, reference):
    """PCA components are defined up to sign: flip codes to the reference's."""
    a, b = _tokens(codes), _tokens(reference)
    signs = np.sign((a * b).sum(axis=0))
    return _maps(a * signs, codes)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_batch_standardization_equals_the_study_by_hand(data):
    from skstego.study import _named_reducer, _seeded

    X_train, y_train, X_test, y_test = data
    sizes = (5, 4)  # several batches per split, the last ones smaller
    table = _run(
        data,
        reducers=["pca", "rp"],
        dims=[3, 6],
        probes=["kmeans", "linear"],
        standardize="batch",
        batch_images=sizes,
    )
    assert len(table) == 2 * 2 * 2 * 2
    for dim in (3, 6):
        # codes of the sweep's reducer against the study's formula
        red = _seeded(_named_reducer("pca", "batch", sizes), 0, "cpu", dim=dim)
        red.fit(X_train)
        ref_tr = _study_pca_codes(X_train, X_train, dim, sizes[0])
        ref_te = _study_pca_codes(X_train, X_test, dim, sizes[1])
        got_tr = _align_signs(red.transform(X_train, "train"), ref_tr)
        got_te = _align_signs(red.transform(X_test, "test"), ref_te)
        np.testing.assert_allclose(got_tr, ref_tr, atol=1e-4)
        np.testing.assert_allclose(got_te, ref_te, atol=1e-4)
        for seed in (0, 1):
            # random projection: skstego's matrix, the study's standardisation
            rp = RandomProjection(dim, device="cpu", random_state=seed).fit(X_train)
            W = rp.components_.T
            rp_tr = _maps(_tokens(_per_batch(X_train, sizes[0])) @ W, X_train)
            rp_te = _maps(_tokens(_per_batch(X_test, sizes[1])) @ W, X_test)
            for name, tr, te in (("pca", ref_tr, ref_te), ("rp", rp_tr, rp_te)):
                km = KMeansProbe(k=4, device="cpu", random_state=seed).fit(tr)
                row = _row(table, name, dim, "kmeans", seed)
                assert row.miou == pytest.approx(km.score(te, y_test), abs=1e-6)
                lin = LinearProbe(device="cpu", random_state=seed).fit(tr, y_train)
                rep = lin.score_report(te, y_test)
                row = _row(table, name, dim, "linear", seed)
                assert row.miou == pytest.approx(rep["miou"], abs=1e-6)
                assert row.accuracy == pytest.approx(rep["accuracy"], abs=1e-6)


def test_default_batch_sizes_and_none(data):
    from skstego.study import STUDY_BATCH_IMAGES, _named_reducer

    X_train, _, X_test, _ = data
    assert STUDY_BATCH_IMAGES["pca"] == (16, 8)
    red = _named_reducer("pca", "batch").fit(X_train)
    assert red.batch_images == (16, 8)
    got = _align_signs(
        red.transform(X_test, "test"), ref := _study_pca_codes(X_train, X_test, 24, 8)
    )
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # "none": raw features into PCA and RP
    table = _run(
        data,
        reducers=["pca"],
        dims=[3],
        probes=["kmeans"],
        seeds=[0],
        standardize="none",
    )
    codes = TorchPCA(3, device="cpu").fit(X_train)
    km = KMeansProbe(k=4, device="cpu", random_state=0).fit(codes.transform(X_train))
    assert table.miou.iloc[0] == pytest.approx(
        km.score(codes.transform(X_test), data[3]), abs=1e-6
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hnne_batch_standardization_equals_hnne_by_hand(data):
    hnne = pytest.importorskip("hnne")
    from skstego.study import _named_reducer, _seeded

    X_train, _, X_test, _ = data
    red = _seeded(_named_reducer("hnne", "batch", (5, 4)), 0, "cpu", dim=2)
    red.fit(X_train)
    from sklearn.preprocessing import StandardScaler

    ref = hnne.HNNE(n_components=2, metric="cosine", random_state=0)
    ref.fit(StandardScaler().fit_transform(_tokens(X_train)))
    expected = ref.transform(_tokens(_per_batch(X_test, 4)))
    got = _tokens(red.transform(X_test, "test"))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_preset_and_study_dims(data, monkeypatch):
    from skstego import StegoProjector
    from skstego.projection._stego import PRESETS

    seen = []

    class Stop(Exception):
        pass

    def fake_fit(self, X, y=None):
        seen.append(self.get_params())
        raise Stop

    monkeypatch.setattr(StegoProjector, "fit", fake_fit)
    with pytest.raises(Stop):
        _run(data, reducers=["stego"], dims=[5], probes=["kmeans"], preset="potsdam")
    expected = {**PRESETS["potsdam"], "dim": 5}
    assert {k: seen[0][k] for k in expected} == expected
    # dims="study": the study's dims and the preset's STEGO dim
    X, y = make_feature_maps(4, n_features=100, n_classes=3, map_size=3, random_state=0)
    table = run_sweep(
        X,
        y,
        reducers=["rp"],
        probes=["kmeans"],
        seeds=[0],
        preset="potsdam",
        device="cpu",
    )
    assert sorted(set(table.dim)) == [3, 6, 12, 24, 48, 70, 96]
    table = run_sweep(
        X, y, reducers=["rp"], probes=["kmeans"], seeds=[0], dims="study", device="cpu"
    )
    assert sorted(set(table.dim)) == [3, 6, 12, 24, 48, 96]
    with pytest.raises(ValueError, match="Unknown preset"):
        _run(data, preset="coco")
    with pytest.raises(ValueError, match="standardize must be"):
        _run(data, standardize="global")
    with pytest.raises(ValueError, match="batch_images"):
        _run(data, standardize="batch", batch_images=(8, 0))
    with pytest.raises(ValueError, match="'study'"):
        _run(data, dims="paper")


# --------------------------------------------------------------------------
# resumption keyed by settings (no stale scores)
# --------------------------------------------------------------------------
def test_changed_settings_are_recomputed_with_a_warning(data, tmp_path):
    import warnings

    args = dict(reducers=["pca"], probes=["kmeans"], dims=[2, 4], seeds=[0])
    first = _run(data, **args, cache_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"standardize: 'train' -> 'batch'"):
        batch = _run(data, **args, standardize="batch", cache_dir=tmp_path)
    fresh = _run(data, **args, standardize="batch")
    cols = ["reducer", "dim", "probe", "seed", "miou", "accuracy"]
    pd.testing.assert_frame_equal(batch[cols], fresh[cols])
    assert not np.allclose(batch.miou, first.miou)  # not the stale scores
    # both settings stay in the file; going back reuses the first rows
    assert len(pd.read_csv(tmp_path / "results.csv")) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _run(data, **args, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(again, first)
    # k of the cluster probe
    with pytest.warns(UserWarning, match=r"probe\.k: 4 -> 3"):
        k3 = _run(data, **args, n_clusters=3, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(k3[cols], _run(data, **args, n_clusters=3)[cols])
    # other features of the same shape (new weights, say)
    X_train, y_train, X_test, y_test = data
    other = (X_train[::-1].copy(), y_train[::-1].copy(), X_test, y_test)
    with pytest.warns(UserWarning, match=r"data\.X_train"):
        moved = _run(other, **args, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(moved[cols], _run(other, **args)[cols])
    # features_key: the user names the data, values are not sampled
    with pytest.warns(UserWarning, match=r"data\.features_key: '<unset>' -> 'v1'"):
        named = _run(data, **args, features_key="v1", cache_dir=tmp_path)
    same = _run(other, **args, features_key="v1", cache_dir=tmp_path)
    pd.testing.assert_frame_equal(same, named)


def test_only_the_requested_cells_are_returned(data, tmp_path):
    args = dict(reducers=["pca"], probes=["kmeans"], seeds=[0], cache_dir=tmp_path)
    _run(data, **args, dims=[2, 4])
    table = _run(data, **args, dims=[4])
    assert table.dim.tolist() == [4]


def test_results_without_fingerprints_are_set_aside(data, tmp_path):
    old = pd.DataFrame(
        {
            "reducer": ["pca"],
            "dim": [2],
            "probe": ["kmeans"],
            "seed": [0],
            "miou": [0.99],
            "accuracy": [0.99],
            "reduce_seconds": [0.0],
            "probe_seconds": [0.0],
            "n_train": [12],
            "n_test": [6],
        }
    )
    old.to_csv(tmp_path / "results.csv", index=False)
    args = dict(reducers=["pca"], probes=["kmeans"], dims=[2], seeds=[0])
    with pytest.warns(UserWarning, match="no settings fingerprints"):
        table = _run(data, **args, cache_dir=tmp_path)
    assert table.miou.iloc[0] != 0.99
    assert table.miou.iloc[0] == pytest.approx(_run(data, **args).miou.iloc[0])
    assert (tmp_path / "results.unversioned.csv").exists()


class _MeanFeaturizer:
    """A stand-in featurizer: 4x4 patches -> their mean colour (3 channels)."""

    calls = 0

    def transform(self, images):
        type(self).calls += 1
        x = np.asarray(images, dtype=np.float32)
        n, h, w, _ = x.shape
        x = x.reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __repr__(self):
        return "_MeanFeaturizer()"


@pytest.mark.filterwarnings("ignore:The results file holds")
def test_feature_cache_notices_other_images(tmp_path):
    from skstego.datasets import make_scenes

    images, labels = make_scenes(4, size=16, n_classes=3, random_state=0)
    others, other_labels = make_scenes(4, size=16, n_classes=3, random_state=1)
    args = dict(
        featurizer=_MeanFeaturizer(),
        reducers=["none"],
        probes=["kmeans"],
        seeds=[0],
        device="cpu",
        cache_dir=tmp_path,
    )
    run_sweep(images, labels, **args)
    _MeanFeaturizer.calls = 0
    run_sweep(images, labels, **args)
    assert _MeanFeaturizer.calls == 0  # cached
    table = run_sweep(others, other_labels, **args)
    assert _MeanFeaturizer.calls > 0  # same count, other images: recomputed
    expected = run_sweep(others, other_labels, **{**args, "cache_dir": None})
    assert table.miou.iloc[0] == pytest.approx(expected.miou.iloc[0])
