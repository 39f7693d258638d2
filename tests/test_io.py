"""skstego.io: pickle-free model files round-trip and refuse what is not theirs."""

import json
import pickle
import zipfile

import numpy as np
import pytest
import timm
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skstego import (
    DinoFeaturizer,
    KMeansProbe,
    LinearProbe,
    RandomProjection,
    StegoProjector,
    TorchPCA,
)
from skstego.datasets import make_scenes
from skstego.io import FORMAT_NAME, FORMAT_VERSION, load, save

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning"  # tiny max_iter on purpose
)

RNG = np.random.default_rng(0)
MAPS = RNG.normal(size=(6, 12, 5, 5)).astype(np.float32)
LABELS = RNG.integers(0, 3, size=(6, 10, 10))
TOKENS = RNG.normal(size=(60, 5)).astype(np.float32)


def _assert_same_state(a, b):
    """Every instance attribute of ``a`` equals ``b``'s (arrays, dicts, lists)."""
    assert set(vars(a)) == set(vars(b))
    for name, value in vars(a).items():
        _assert_equal(value, getattr(b, name), name)


def _assert_equal(x, y, where):
    if isinstance(x, np.ndarray):
        assert isinstance(y, np.ndarray), where
        assert x.dtype == y.dtype and x.shape == y.shape, where
        np.testing.assert_array_equal(x, y, err_msg=where)
    elif isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y), where
        for k in x:
            _assert_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_equal(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and np.isnan(x):
        assert np.isnan(y), where
    elif hasattr(x, "get_params"):
        _assert_same_state(x, y)
    else:
        assert x == y and type(x) is type(y), where


FITTED = {
    "pca": lambda: TorchPCA(dim=4, device="cpu").fit(MAPS),
    "pca-whiten-standardize": lambda: TorchPCA(
        dim=3, whiten=True, standardize=True, device="cpu"
    ).fit(MAPS),
    "random-projection": lambda: RandomProjection(
        dim=4, random_state=0, device="cpu"
    ).fit(MAPS),
    "stego": lambda: StegoProjector(
        dim=4, n_steps=3, batch_size=4, random_state=0, device="cpu"
    ).fit(MAPS),
    "kmeans": lambda: KMeansProbe(k=3, random_state=0, device="cpu").fit(MAPS),
    "kmeans-labels": lambda: KMeansProbe(
        k=4, metric="euclidean", random_state=0, device="cpu"
    ).fit(MAPS, LABELS),
    "linear": lambda: LinearProbe(max_iter=5, random_state=0, device="cpu").fit(
        MAPS, LABELS
    ),
}


def _outputs(est, X):
    out = {}
    for method in ("transform", "predict", "predict_proba", "decision_function"):
        if hasattr(est, method):
            out[method] = np.asarray(getattr(est, method)(X))
    return out


@pytest.mark.parametrize("name", sorted(FITTED))
def test_round_trip_equals_original(name, tmp_path):
    est = FITTED[name]()
    before = _outputs(est, MAPS)
    path = save(est, tmp_path / "model.skstego")
    loaded = load(path)
    assert type(loaded) is type(est)
    assert loaded.get_params() == est.get_params()
    _assert_same_state(est, loaded)
    after = _outputs(loaded, MAPS)
    assert set(after) == set(before) and before
    for method, value in before.items():
        np.testing.assert_array_equal(after[method], value, err_msg=method)


def test_loaded_models_keep_training_exactly(tmp_path):
    # private running statistics and Adam's state are saved: continuing the
    # fit from the file gives what continuing the original gives
    stego = FITTED["stego"]()
    stego_loaded = load(save(stego, tmp_path / "stego.skstego"))
    stego.partial_fit(MAPS)
    stego_loaded.partial_fit(MAPS)
    np.testing.assert_array_equal(stego_loaded.loss_curve_, stego.loss_curve_)
    for key, value in stego.head_state_.items():
        np.testing.assert_array_equal(stego_loaded.head_state_[key], value)

    pca = TorchPCA(dim=2, device="cpu").partial_fit(TOKENS[:30])
    pca_loaded = load(save(pca, tmp_path / "pca.skstego"))
    pca.partial_fit(TOKENS[30:])
    pca_loaded.partial_fit(TOKENS[30:])
    np.testing.assert_array_equal(pca_loaded.components_, pca.components_)
    # and both equal one fit on all the data, up to float rounding
    full = TorchPCA(dim=2, solver="covariance_eigh", device="cpu").fit(TOKENS)
    np.testing.assert_allclose(
        np.abs(pca_loaded.components_), np.abs(full.components_), atol=1e-5
    )


def test_string_classes_and_loss_list(tmp_path):
    y = np.where(TOKENS[:, 0] > 0, "sky", "ground")
    probe = LinearProbe(max_iter=3, random_state=0, device="cpu").fit(TOKENS, y)
    loaded = load(save(probe, tmp_path / "p.skstego"))
    assert loaded.classes_.dtype == probe.classes_.dtype
    assert isinstance(loaded.loss_curve_, list)
    np.testing.assert_array_equal(loaded.predict(TOKENS), probe.predict(TOKENS))


def test_pipeline_with_featurizer_round_trip(tmp_path):
    images, _ = make_scenes(3, size=32, random_state=0)
    pipe = Pipeline(
        [
            (
                "features",
                DinoFeaturizer(
                    "vit_tiny_patch16_224",
                    pretrained=False,
                    resolution=32,
                    device="cpu",
                ),
            ),
            ("skip", "passthrough"),
            ("reduce", TorchPCA(dim=4, device="cpu")),
            ("probe", KMeansProbe(k=3, random_state=0, device="cpu")),
        ]
    )
    pipe.fit(images)
    loaded = load(save(pipe, tmp_path / "pipe.skstego"))
    assert isinstance(loaded, Pipeline)
    assert [n for n, _ in loaded.steps] == ["features", "skip", "reduce", "probe"]
    assert loaded.steps[1][1] == "passthrough"
    assert loaded.get_params(deep=False)["verbose"] is False
    np.testing.assert_array_equal(loaded.predict(images), pipe.predict(images))
    assert loaded[0].get_params() == pipe[0].get_params()


def test_featurizer_parameters_round_trip(tmp_path):
    weights = tmp_path / "backbone.safetensors"  # a path: stored as its name
    featurizer = DinoFeaturizer(
        "vit_small_patch16_224.dino", weights=weights, resolution=448, layer=-2
    )
    loaded = load(save(featurizer, tmp_path / "f.skstego"))
    assert loaded.get_params() == {**featurizer.get_params(), "weights": str(weights)}


def test_cuda_models_load_on_cpu(tmp_path):
    pipe = Pipeline(
        [
            ("reduce", TorchPCA(dim=4, device="cpu")),
            ("probe", KMeansProbe(k=3, random_state=0, device="cpu")),
        ]
    ).fit(MAPS)
    expected = pipe.predict(MAPS)
    pipe.set_params(reduce__device=torch.device("cuda"), probe__device="cuda")
    path = save(pipe, tmp_path / "gpu.skstego")
    stored = load(path)
    # the parameter is kept as given (as a name): resolved only when computing
    assert stored[0].device == "cuda" and stored[1].device == "cuda"
    manifest = json.loads(zipfile.ZipFile(path).read("manifest.json"))
    assert manifest["root"]["steps"][1][1]["params"]["device"] == "cuda"
    on_cpu = load(path, device="auto")
    assert on_cpu[0].device == "auto" and on_cpu[1].device == "auto"
    if not torch.cuda.is_available():
        np.testing.assert_array_equal(on_cpu.predict(MAPS), expected)
        with pytest.raises(ValueError, match="CUDA"):
            stored.predict(MAPS)


def test_manifest_content(tmp_path):
    import skstego

    path = save(FITTED["kmeans"](), tmp_path / "m.skstego")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["arrays.safetensors", "manifest.json"]
        manifest = json.loads(zf.read("manifest.json"))
        from safetensors.numpy import load as load_arrays

        arrays = load_arrays(zf.read("arrays.safetensors"))
    assert manifest["format"] == FORMAT_NAME == "skstego-model"
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["skstego_version"] == skstego.__version__
    assert manifest["root"]["class"] == "skstego.KMeansProbe"
    assert manifest["root"]["params"]["k"] == 3
    key = manifest["root"]["state"]["cluster_centers_"]["__array__"]
    assert arrays[key].shape == (3, 12)


def test_file_mode_follows_umask(tmp_path):
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    path = save(FITTED["pca"](), tmp_path / "m.skstego")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_save_does_not_change_the_estimator(tmp_path):
    est = FITTED["stego"]()
    snapshot = {k: np.copy(v) for k, v in est.head_state_.items()}
    params = est.get_params()
    save(est, tmp_path / "s.skstego")
    assert est.get_params() == params
    for key, value in snapshot.items():
        np.testing.assert_array_equal(est.head_state_[key], value)


# --------------------------------------------------------------------------
# what cannot be saved
# --------------------------------------------------------------------------
def test_featurizer_with_module_is_refused(tmp_path):
    vit = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )
    with pytest.raises(TypeError, match="timm name"):
        save(DinoFeaturizer(vit), tmp_path / "f.skstego")
    assert not (tmp_path / "f.skstego").exists()


def test_foreign_estimators_are_refused(tmp_path):
    with pytest.raises(TypeError, match="StandardScaler"):
        save(StandardScaler().fit(TOKENS), tmp_path / "s.skstego")
    with pytest.raises(TypeError, match="StandardScaler"):
        save(Pipeline([("scale", StandardScaler())]), tmp_path / "s.skstego")


@pytest.mark.parametrize("name", ["HNNEProjector", "HNNEClusterProbe"])
def test_hnne_estimators_are_refused_by_name(name, tmp_path):
    import skstego

    cls = getattr(skstego, name, None)
    if cls is None:
        pytest.skip(f"skstego has no {name}")
    with pytest.raises(TypeError, match=name):
        save(cls(), tmp_path / "h.skstego")


def test_state_without_plain_form_names_class_and_attribute(tmp_path):
    probe = FITTED["kmeans"]()
    probe.index_ = object()  # as an estimator holding a foreign fitted model
    with pytest.raises(TypeError, match=r"KMeansProbe.*'index_'"):
        save(probe, tmp_path / "x.skstego")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_param_without_plain_form_warns_and_uses_default(tmp_path):
    est = KMeansProbe(k=2, random_state=np.random.RandomState(0)).fit(TOKENS)
    with pytest.warns(UserWarning, match="random_state"):
        path = save(est, tmp_path / "r.skstego")
    loaded = load(path)
    assert loaded.random_state is None
    np.testing.assert_array_equal(loaded.predict(TOKENS), est.predict(TOKENS))


# --------------------------------------------------------------------------
# files that are not ours
# --------------------------------------------------------------------------
def _write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _manifest(**changes):
    base = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "skstego_version": "0",
        "root": {"class": "skstego.TorchPCA", "params": {}, "state": {}},
    }
    base.update(changes)
    return json.dumps(base)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.skstego"):
        load(tmp_path / "nothing.skstego")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "not a zip archive"),
        ("pickle", "not a zip archive"),
        ("random-zip", "no manifest.json"),
        ("torch-save", "no manifest.json"),
        ("bad-json", "not valid JSON"),
        ("other-format", "format 'something-else'"),
        ("newer-version", "version 99.*Upgrade skstego"),
        ("unknown-class", "'sklearn.svm.SVC' is not one that skstego.io loads"),
        ("builtin", "'builtins.eval' is not one that skstego.io loads"),
        ("bad-params", "do not fit TorchPCA"),
    ],
)
def test_foreign_files_are_refused(kind, message, tmp_path):
    path = tmp_path / f"{kind}.skstego"
    if kind == "text":
        path.write_text("hello, I am not a model\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"a": 1}))
    elif kind == "random-zip":
        _write_zip(path, {"data.bin": RNG.bytes(64)})
    elif kind == "torch-save":
        torch.save({"w": torch.zeros(2)}, path)
    elif kind == "bad-json":
        _write_zip(path, {"manifest.json": "{not json"})
    elif kind == "other-format":
        _write_zip(path, {"manifest.json": _manifest(format="something-else")})
    elif kind == "newer-version":
        _write_zip(path, {"manifest.json": _manifest(format_version=99)})
    elif kind in ("unknown-class", "builtin"):
        cls = "sklearn.svm.SVC" if kind == "unknown-class" else "builtins.eval"
        root = {"class": cls, "params": {}, "state": {}}
        _write_zip(path, {"manifest.json": _manifest(root=root)})
    else:
        root = {"class": "skstego.TorchPCA", "params": {"nope": 1}, "state": {}}
        _write_zip(path, {"manifest.json": _manifest(root=root)})
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def _edited(tmp_path, estimator, edit):
    """Save ``estimator``, then rewrite its manifest / arrays with ``edit``."""
    from safetensors.numpy import load as load_arrays
    from safetensors.numpy import save as save_arrays

    path = save(estimator, tmp_path / "model.skstego")
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        arrays = dict(load_arrays(zf.read("arrays.safetensors")))
    edit(manifest["root"], arrays)
    out = tmp_path / "edited.skstego"
    _write_zip(
        out,
        {
            "manifest.json": json.dumps(manifest),
            "arrays.safetensors": save_arrays(arrays),
        },
    )
    return out


def _array_key(node, name):
    return node["state"][name]["__array__"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda n, a: n["params"].update(k="abc"), "parameter of KMeansProbe"),
        (lambda n, a: n["params"].update(k=99), r"cluster_centers_ has shape \(3, 5\)"),
        (lambda n, a: n["params"].update(metric="hamming"), "metric"),
        (
            lambda n, a: a.__setitem__(
                _array_key(n, "cluster_centers_"), np.full((3, 5), np.nan, np.float32)
            ),
            "NaN or infinite",
        ),
        (
            lambda n, a: a.__setitem__(
                _array_key(n, "cluster_centers_"), np.zeros((3, 4), np.float32)
            ),
            r"cluster_centers_ has shape \(3, 4\)",
        ),
        (lambda n, a: n["state"].update(n_features_in_=-2), "n_features_in_"),
        (lambda n, a: n["state"].update(__class__="x"), "__class__"),
    ],
    ids=["k-string", "k-99", "metric", "nan", "features", "n-features", "dunder"],
)
def test_edited_model_files_are_refused_at_load(tmp_path, edit, message):
    X = RNG.normal(size=(40, 5)).astype(np.float32)
    probe = KMeansProbe(k=3, random_state=0, device="cpu").fit(X)
    path = _edited(tmp_path, probe, edit)
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert "edited.skstego" in str(info.value)


def test_edited_head_and_linear_probe_shapes_are_refused(tmp_path):
    maps = RNG.normal(size=(6, 4, 3, 3)).astype(np.float32)
    stego = StegoProjector(dim=2, n_steps=2, batch_size=4, device="cpu").fit(maps)
    path = _edited(tmp_path, stego, lambda n, a: n["params"].update(dim=3))
    with pytest.raises(ValueError, match=r"linear\.weight has shape"):
        load(path)
    X, y = RNG.normal(size=(30, 4)).astype(np.float32), np.arange(30) % 3
    linear = LinearProbe(device="cpu").fit(X, y)
    path = _edited(
        tmp_path,
        linear,
        lambda n, a: a.__setitem__(
            _array_key(n, "coef_"), np.zeros((2, 4), np.float32)
        ),
    )
    with pytest.raises(ValueError, match="coef_ has shape"):
        load(path)
