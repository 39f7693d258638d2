"""Bad and odd inputs, one table: every case names the exception and a fragment
of its message that says what to fix.

The table covers every public estimator (fit, transform, predict, score),
:mod:`skstego.metrics`, :mod:`skstego.io`, the dataset loaders,
:class:`~skstego.DinoFeaturizer` and each command of the command line (exit
code 2 and one line on stderr). A case whose expected exception is a
``Warning`` is a documented result that must warn.

Everything is tiny: 40 tokens of 6 features, 3 maps of 4 x 5, a 1-block
timm ViT of width 16 and 32 px images.
"""

from __future__ import annotations

import functools
import json
import warnings
import zipfile

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.pipeline import make_pipeline
from sklearn.utils._param_validation import InvalidParameterError

from skstego import (
    CRFProbe,
    DinoFeaturizer,
    HNNEClusterProbe,
    HNNEProjector,
    KMeansProbe,
    LinearProbe,
    RandomProjection,
    StegoProjector,
    TokenStandardScaler,
    TorchPCA,
    io,
    metrics,
)
from skstego.cli import main
from skstego.datasets import (
    ImageCollection,
    load_cityscapes27,
    load_cocostuff27,
    load_image_folder,
    load_potsdam3,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]

RNG = np.random.default_rng(0)
X2 = RNG.normal(size=(40, 6)).astype(np.float32)
X4 = RNG.normal(size=(3, 6, 4, 5)).astype(np.float32)
Y1 = RNG.integers(0, 3, 40)
Y3 = RNG.integers(0, 3, (3, 4, 5))
IMGS = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
CLI_BACKBONE = ["--model", "vit_tiny_patch16_224", "--random-weights"]
CLI_RUN = ["--resolution", "32", "--device", "cpu", "--quiet"]


class CliError(Exception):
    """A command that exited with code 2; the message is its one stderr line."""


# --------------------------------------------------------------------------
# makers
# --------------------------------------------------------------------------
MAKERS = {
    "TorchPCA": lambda: TorchPCA(dim=3, device="cpu"),
    "RandomProjection": lambda: RandomProjection(dim=3, device="cpu", random_state=0),
    "TokenStandardScaler": lambda: TokenStandardScaler(device="cpu"),
    "StegoProjector": lambda: StegoProjector(
        dim=3, n_steps=2, batch_size=2, device="cpu", random_state=0
    ),
    "HNNEProjector": lambda: HNNEProjector(dim=2, device="cpu", random_state=0),
    "KMeansProbe": lambda: KMeansProbe(k=3, device="cpu", random_state=0),
    "LinearProbe": lambda: LinearProbe(max_iter=2, device="cpu", random_state=0),
    "HNNEClusterProbe": lambda: HNNEClusterProbe(k=3, device="cpu", random_state=0),
    "CRFProbe": lambda: CRFProbe(KMeansProbe(k=3, device="cpu", random_state=0)),
}
REDUCERS = [
    "TorchPCA",
    "RandomProjection",
    "TokenStandardScaler",
    "StegoProjector",
    "HNNEProjector",
]
PROBES = ["KMeansProbe", "LinearProbe", "HNNEClusterProbe", "CRFProbe"]
MAP_PROBES = ["KMeansProbe", "LinearProbe", "HNNEClusterProbe"]  # predict(size=)


def _fit(name, X, y=None):
    est = MAKERS[name]()
    if name == "LinearProbe" and y is None:
        y = Y1 if X.ndim == 2 else Y3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(X) if y is None else est.fit(X, y)


@functools.cache
def fitted(name, layout=2):
    return _fit(name, X2 if layout == 2 else X4)


def _with(X, index, value):
    X = X.copy()
    X[index] = value
    return X


def _vit():
    return timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0
    )


def _featurizer(**params):
    params.setdefault("resolution", 32)
    params.setdefault("device", "cpu")
    return DinoFeaturizer(_vit(), pretrained=False, **params)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Files on disk: images, an empty folder, a text file, a saved model."""
    root = tmp_path_factory.mktemp("bad")
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.fromarray(IMGS[i]).save(imgs / f"a{i}.png")
    (root / "empty").mkdir()
    (root / "text.txt").write_text("hello")
    (root / "text.pth").write_text("hello")
    (root / "lfs.pth").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"
    )
    (root / "bad").mkdir()
    (root / "bad" / "broken.png").write_text("not a png")
    model = root / "km.skstego"
    io.save(fitted("KMeansProbe"), model)
    with zipfile.ZipFile(model) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    # a dataset in the image-folder layout, with one unreadable image
    ds = root / "ds"
    (ds / "imgs" / "val").mkdir(parents=True)
    (ds / "labels" / "val").mkdir(parents=True)
    (ds / "imgs" / "val" / "broken.png").write_text("not a png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(ds / "labels/val/broken.png")
    (root / "empty_split" / "imgs" / "val").mkdir(parents=True)
    (root / "coco" / "images" / "val2017").mkdir(parents=True)
    (root / "coco" / "annotations" / "val2017").mkdir(parents=True)
    Image.fromarray(IMGS[0]).save(root / "coco/images/val2017/a.jpg")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(
        root / "coco/annotations/val2017/a.png"
    )
    return {"root": root, "imgs": imgs, "model": model, "parts": parts}


def edited(ctx, edit, tag):
    """The saved k-means model with its manifest changed by ``edit``."""
    manifest = json.loads(ctx["parts"]["manifest.json"])
    edit(manifest)
    path = ctx["root"] / f"edited_{tag}.skstego"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in ctx["parts"].items():
            z.writestr(name, json.dumps(manifest) if name == "manifest.json" else data)
    return path


def _params(tag, edit):
    return lambda c: io.load(edited(c, edit, tag))


def cli(ctx, *argv):
    """Run the command line; raise CliError(stderr) on exit code 2."""
    args = [
        str(a).format(**{k: v for k, v in ctx.items() if k != "parts"}) for a in argv
    ]
    capsys = ctx["capsys"]
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("skstego: warn")]
    if code == 2:
        assert len(lines) == 1, err
        assert "Traceback" not in err
        raise CliError(lines[0])
    return code


# --------------------------------------------------------------------------
# the table: (id, call(ctx), expected exception or warning, message fragment)
# --------------------------------------------------------------------------
CASES = []


def case(id_, call, exc, fragment):
    CASES.append(pytest.param(call, exc, fragment, id=id_))


# ---- every estimator: layout, values, sizes
for name in REDUCERS + PROBES:
    case(f"{name}-fit-1d", lambda c, n=name: _fit(n, X2[:, 0]), ValueError, "Reshape")
    case(f"{name}-fit-3d", lambda c, n=name: _fit(n, X4[0]), ValueError, "4-D maps")
    case(f"{name}-fit-5d", lambda c, n=name: _fit(n, X4[None]), ValueError, "4-D maps")
    case(
        f"{name}-fit-nan",
        lambda c, n=name: _fit(n, _with(X2, (3, 2), np.nan)),
        ValueError,
        "NaN or infinity; remove or impute",
    )
    case(
        f"{name}-fit-complex",
        lambda c, n=name: _fit(n, X2.astype(np.complex64)),
        ValueError,
        "X.real",
    )
    case(
        f"{name}-fit-empty",
        lambda c, n=name: _fit(n, X2[:0]),
        ValueError,
        "0 sample",
    )

for name in [*REDUCERS, "KMeansProbe", "HNNEClusterProbe"]:
    case(
        f"{name}-fit-strings",
        lambda c, n=name: _fit(n, np.array([["a", "b"], ["c", "d"]])),
        ValueError,
        "could not convert string",
    )
    case(
        f"{name}-fit-inf-tensor",
        lambda c, n=name: _fit(n, torch.from_numpy(_with(X2, (1, 1), np.inf))),
        ValueError,
        "NaN or infinity",
    )

for name in REDUCERS:
    case(
        f"{name}-transform-wrong-features",
        lambda c, n=name: fitted(n).transform(X2[:, :4]),
        ValueError,
        "expecting 6 features",
    )
    case(
        f"{name}-transform-tensor-wrong-features",
        lambda c, n=name: fitted(n).transform(torch.from_numpy(X2[:, :4].copy())),
        ValueError,
        "expecting 6 features",
    )

for name in PROBES:
    case(
        f"{name}-predict-wrong-features",
        lambda c, n=name: fitted(n).predict(X2[:, :4]),
        ValueError,
        "expecting 6 features",
    )
    case(
        f"{name}-predict-1d",
        lambda c, n=name: fitted(n).predict(X2[0]),
        ValueError,
        "reshape(1, -1)",
    )
    case(
        f"{name}-score-wrong-length",
        lambda c, n=name: fitted(n).score(X2, Y1[:10]),
        ValueError,
        "labels",
    )
    case(
        f"{name}-score-transposed-maps",
        lambda c, n=name: fitted(n, 4).score(X4, Y3.transpose(0, 2, 1)),
        ValueError,
        "aspect ratio",
    )
    # LinearProbe ignores -1 in label maps; in 1-D labels only with
    # ignore_index=-1 (documented: other unseen labels count as errors)
    layout = 4 if name == "LinearProbe" else 2
    case(
        f"{name}-score-all-ignored",
        lambda c, n=name, d=layout: fitted(n, d).score(
            X4 if d == 4 else X2, np.full((3, 4, 5) if d == 4 else 40, -1)
        ),
        UndefinedMetricWarning,
        "No valid pixel",
    )

for name in MAP_PROBES:
    for size in [(0, 0), (-1, 3), 5]:
        case(
            f"{name}-predict-size-{size}",
            lambda c, n=name, s=size: fitted(n, 4).predict(X4, size=s),
            ValueError,
            "two positive integers",
        )
    case(
        f"{name}-proba-size-0",
        lambda c, n=name: fitted(n, 4).predict_proba(X4, size=(0, 0)),
        ValueError,
        "two positive integers",
    )

for name in ["KMeansProbe", "HNNEClusterProbe", "CRFProbe"]:
    case(
        f"{name}-score-huge-label-id",
        lambda c, n=name: fitted(n).score(X2, np.where(np.arange(40) == 0, 10**9, Y1)),
        ValueError,
        "LabelRemap",
    )
    case(
        f"{name}-score-float-labels",
        lambda c, n=name: fitted(n).score(X2, Y1 + 0.5),
        ValueError,
        "integer labels",
    )
    case(
        f"{name}-score-string-labels",
        lambda c, n=name: fitted(n).score(X2, np.array(["a"] * 40)),
        ValueError,
        "integer labels",
    )

# ---- parameters
case("TorchPCA-dim-0", lambda c: TorchPCA(dim=0).fit(X2), InvalidParameterError, "dim")
case(
    "TorchPCA-dim-str",
    lambda c: TorchPCA(dim="3").fit(X2),
    InvalidParameterError,
    "'dim' parameter",
)
case(
    "TorchPCA-dim-beyond-features",
    lambda c: TorchPCA(dim=100, device="cpu").fit(X2),
    ValueError,
    "must be between 1 and",
)
case(
    "RandomProjection-dim-beyond-features-warns",
    lambda c: RandomProjection(dim=100, device="cpu").fit(X2),
    UserWarning,
    "higher than the number of features",
)
case(
    "HNNEProjector-dim-beyond-features",
    lambda c: HNNEProjector(dim=100, device="cpu").fit(X2),
    ValueError,
    "Pass dim <= n_features",
)
case(
    "KMeansProbe-k-beyond-samples",
    lambda c: KMeansProbe(k=100, device="cpu").fit(X2[:5]),
    ValueError,
    "at least as many",
)
case(
    "KMeansProbe-k-0", lambda c: KMeansProbe(k=0).fit(X2), InvalidParameterError, "'k'"
)
case(
    "KMeansProbe-k-float",
    lambda c: KMeansProbe(k=2.5).fit(X2),
    InvalidParameterError,
    "'k'",
)
case(
    "HNNEClusterProbe-k-beyond-samples-warns",
    lambda c: HNNEClusterProbe(k=100, device="cpu").fit(X2[:8]),
    UserWarning,
    "outside the range",
)
case(
    "KMeansProbe-score-metric",
    lambda c: fitted("KMeansProbe").score(X2, Y1, metric="f1"),
    ValueError,
    "'miou' or 'accuracy'",
)
case(
    "KMeansProbe-score-upsample",
    lambda c: fitted("KMeansProbe", 4).score(X4, Y3, upsample="nearest"),
    ValueError,
    "'scores' or 'codes'",
)
case(
    "KMeansProbe-fit-labels-all-negative",
    lambda c: KMeansProbe(k=3, device="cpu").fit(X2, np.full(40, -1)),
    ValueError,
    "no valid label",
)
case(
    "device-nonsense",
    lambda c: TorchPCA(dim=2, device="gpu0").fit(X2),
    ValueError,
    "'auto', 'cpu', 'cuda'",
)


# ---- NaN made by a step of a pipeline names that step, not the input
def _codes_of_a_broken_head(c):
    stego = StegoProjector(dim=3, n_steps=2, batch_size=4, device="cpu").fit(X2)
    stego.head_state_["linear.bias"] = np.full(3, np.nan, np.float32)  # damaged
    return KMeansProbe(k=3, device="cpu").fit(stego.transform(X2))


case(
    "nan-codes-blame-the-step-that-made-them",
    _codes_of_a_broken_head,
    ValueError,
    "produced by StegoProjector.transform",
)
case(
    "pipeline-with-a-diverging-step",
    lambda c: make_pipeline(
        StegoProjector(dim=3, lr=1e30, n_steps=5, batch_size=4, device="cpu"),
        KMeansProbe(k=3, device="cpu"),
    ).fit(X2),
    ValueError,
    "training diverged",
)
case(
    "StegoProjector-diverges-at-fit",
    lambda c: StegoProjector(dim=3, lr=1e30, n_steps=5, batch_size=4, device="cpu").fit(
        X2
    ),
    ValueError,
    "Lower lr",
)
case(
    "TorchPCA-huge-values",
    lambda c: TorchPCA(dim=2, device="cpu").fit(X2 * np.float32(1e37)),
    ValueError,
    "Rescale",
)
# LinearProbe.score on 1-D labels never seen in fit counts them as errors,
# silently: scikit-learn's classifier contract (accuracy_score does the same).

# ---- metrics
cm = metrics.confusion_matrix
case("cm-huge-true-id", lambda c: cm([0, 10**9], [0, 1]), ValueError, "LabelRemap")
case(
    "mean_iou-huge-id-reported",
    lambda c: metrics.mean_iou([0, 10**9], [0, 1]),
    ValueError,
    "Labels up to 1000000000",
)
case(
    "mean_iou-huge-pred",
    lambda c: metrics.mean_iou([0, 1], [0, 10**9]),
    ValueError,
    "predictions up to 1000000000",
)
case(
    "cm-n_classes-too-small",
    lambda c: cm([0, 5], [0, 1], n_classes=3),
    ValueError,
    "pass n_classes >= 6",
)
case(
    "cm-n_pred-too-small",
    lambda c: cm([0, 1], [0, 5], n_pred=2),
    ValueError,
    "pass n_pred >= 6",
)
case(
    "cm-n_classes-float",
    lambda c: cm([0, 1], [0, 1], n_classes=2.5),
    ValueError,
    "int >= 1",
)
case("cm-n_classes-0", lambda c: cm([0], [0], n_classes=0), ValueError, "int >= 1")
case("cm-sizes", lambda c: cm([0, 1, 1], [0, 1]), ValueError, "different sizes")
case(
    "cm-transposed-maps",
    lambda c: cm(np.zeros((2, 3), int), np.zeros((3, 2), int)),
    ValueError,
    "transposed?",
)
case("cm-float-labels", lambda c: cm([0.5, 1], [0, 1]), ValueError, "integer labels")
case("cm-nan-labels", lambda c: cm([np.nan, 1], [0, 1]), ValueError, "integer labels")
case("cm-string-labels", lambda c: cm(["a", "b"], [0, 1]), ValueError, "integer")
case(
    "cm-complex-labels",
    lambda c: cm(np.array([0, 1], complex), [0, 1]),
    ValueError,
    "integer labels",
)
case(
    "report-empty-warns",
    lambda c: metrics.segmentation_report([], []),
    UndefinedMetricWarning,
    "No valid pixel",
)
case(
    "report-all-ignored-warns",
    lambda c: metrics.segmentation_report([-1, -1], [0, 1]),
    UndefinedMetricWarning,
    "No valid pixel",
)
case(
    "report-matching",
    lambda c: metrics.segmentation_report([0], [0], matching="greedy"),
    ValueError,
    "'identity' or 'hungarian'",
)
case(
    "report-extra-clusters",
    lambda c: metrics.segmentation_report([0], [0], extra_clusters="drop"),
    ValueError,
    "'errors' or 'reference'",
)
case(
    "hungarian-1d",
    lambda c: metrics.hungarian_match([1, 2, 3]),
    ValueError,
    "2-D matrix (n_classes, n_pred)",
)
case(
    "hungarian-3d",
    lambda c: metrics.hungarian_match(np.zeros((2, 2, 2))),
    ValueError,
    "2-D matrix",
)
case(
    "hungarian-nan",
    lambda c: metrics.hungarian_match([[np.nan, 1], [1, 0]]),
    ValueError,
    "pixel counts",
)
case(
    "report_from_confusion-negative",
    lambda c: metrics.report_from_confusion([[1, -2], [0, 3]]),
    ValueError,
    "negative counts",
)
case(
    "scorer-metric",
    lambda c: metrics.make_segmentation_scorer("f1"),
    ValueError,
    "'miou' or 'accuracy'",
)

# ---- skstego.io
case(
    "io-missing-file",
    lambda c: io.load(c["root"] / "nope.skstego"),
    FileNotFoundError,
    "does not exist",
)
case("io-folder", lambda c: io.load(c["root"]), IsADirectoryError, ".skstego file")
case(
    "io-text-file",
    lambda c: io.load(c["root"] / "text.txt"),
    ValueError,
    "written by skstego.io.save",
)


def _zip_without_manifest(c):
    path = c["root"] / "no_manifest.skstego"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.txt", "x")
    return io.load(path)


case("io-zip-without-manifest", _zip_without_manifest, ValueError, "no manifest.json")
case(
    "io-k-string",
    _params("k_str", lambda m: m["root"]["params"].update(k="abc")),
    ValueError,
    "The 'k' parameter",
)
case(
    "io-k-disagrees-with-centres",
    _params("k_99", lambda m: m["root"]["params"].update(k=99)),
    ValueError,
    "cluster_centers_ has shape (3, 6)",
)
case(
    "io-unknown-parameter",
    _params("cls", lambda m: m["root"]["params"].update(__class__=1)),
    ValueError,
    "do not fit KMeansProbe",
)
case(
    "io-class-not-allowed",
    _params("os", lambda m: m["root"].update({"class": "os.system"})),
    ValueError,
    "not one that skstego.io loads",
)
case(
    "io-newer-format",
    _params("v99", lambda m: m.update(format_version=99)),
    ValueError,
    "Upgrade skstego",
)
case(
    "io-missing-array",
    _params(
        "arr",
        lambda m: m["root"]["state"].update(cluster_centers_={"__array__": "nope"}),
    ),
    ValueError,
    "is missing",
)
case(
    "io-malformed-state",
    _params("dict", lambda m: m["root"]["state"].update(__dict__=1)),
    ValueError,
    "manifest is malformed",
)
case(
    "io-n_features-disagrees",
    _params("nf", lambda m: m["root"]["state"].update(n_features_in_=7)),
    ValueError,
    "imply (3, 7)",
)
case(
    "io-save-into-missing-folder",
    lambda c: io.save(fitted("KMeansProbe"), c["root"] / "no" / "m.skstego"),
    FileNotFoundError,
    "does not exist",
)
case(
    "io-save-foreign-object",
    lambda c: io.save(object(), c["root"] / "o.skstego"),
    TypeError,
    "joblib.dump",
)

# ---- dataset loaders and collections
case(
    "folder-missing",
    lambda c: load_image_folder(c["root"] / "nope"),
    FileNotFoundError,
    "does not exist",
)
case(
    "folder-root-is-a-file",
    lambda c: load_image_folder(c["root"] / "text.txt"),
    NotADirectoryError,
    "is a file",
)
case(
    "folder-without-split",
    lambda c: load_image_folder(c["root"] / "empty"),
    FileNotFoundError,
    "'val' split",
)
case(
    "folder-empty-split",
    lambda c: load_image_folder(c["root"] / "empty_split"),
    FileNotFoundError,
    "exists but is empty",
)
case(
    "cocostuff-missing",
    lambda c: load_cocostuff27(c["root"] / "nope"),
    FileNotFoundError,
    "does not exist",
)
case(
    "cocostuff-missing-curated-list-warns",
    lambda c: load_cocostuff27(c["root"] / "coco"),
    UserWarning,
    "curated=False",
)
case(
    "cityscapes-empty-root",
    lambda c: load_cityscapes27(c["root"] / "empty"),
    FileNotFoundError,
    "leftImg8bit",
)
case(
    "potsdam-empty-root",
    lambda c: load_potsdam3(c["root"] / "empty"),
    FileNotFoundError,
    "Potsdam",
)
case(
    "dataset-unreadable-image-named",
    lambda c: load_image_folder(c["root"] / "ds")[0],
    OSError,
    "broken.png",
)
case(
    "collection-missing-file",
    lambda c: ImageCollection([str(c["root"] / "nope.png")])[0],
    FileNotFoundError,
    "nope.png",
)

# ---- DinoFeaturizer
case(
    "dino-resolution-below-patch",
    lambda c: _featurizer(resolution=4).fit_transform(IMGS),
    ValueError,
    "use e.g. 8 (or crop='none')",
)
case(
    "dino-resolution-not-multiple",
    lambda c: _featurizer(resolution=12).fit_transform(IMGS),
    ValueError,
    "use e.g. 8 or 16",
)
case(
    "dino-resolution-0",
    lambda c: _featurizer(resolution=0).fit_transform(IMGS),
    InvalidParameterError,
    "'resolution'",
)
case(
    "dino-text-file-as-weights",
    lambda c: DinoFeaturizer(
        "vit_tiny_patch16_224", weights=c["root"] / "text.pth", device="cpu"
    ).fit_transform(IMGS),
    ValueError,
    "is not a PyTorch checkpoint (it begins with 'hello')",
)
case(
    "dino-lfs-pointer-as-weights",
    lambda c: DinoFeaturizer(
        "vit_tiny_patch16_224", weights=c["root"] / "lfs.pth", device="cpu"
    ).fit_transform(IMGS),
    ValueError,
    "Git LFS pointer",
)
case(
    "dino-missing-weights",
    lambda c: DinoFeaturizer(
        "vit_tiny_patch16_224", weights=c["root"] / "nope.pth", device="cpu"
    ).fit_transform(IMGS),
    FileNotFoundError,
    "does not exist",
)
case(
    "dino-module-and-weights",
    lambda c: _featurizer(weights=c["root"] / "text.pth").fit_transform(IMGS),
    ValueError,
    "load_state_dict",
)
case(
    "dino-float-0-255",
    lambda c: _featurizer().fit_transform(torch.rand(1, 3, 32, 32) * 255),
    ValueError,
    "to(torch.uint8)",
)
case(
    "dino-float-normalised",
    lambda c: _featurizer().fit_transform(torch.rand(1, 3, 32, 32) - 0.5),
    ValueError,
    "undo the normalisation",
)
case(
    "dino-float-nan",
    lambda c: _featurizer().fit_transform(torch.full((1, 3, 32, 32), float("nan"))),
    ValueError,
    "NaN",
)
case(
    "dino-float-numpy",
    lambda c: _featurizer().fit_transform(IMGS.astype(np.float32) / 255),
    ValueError,
    "(X * 255).round().astype(np.uint8)",
)
case(
    "dino-int64-numpy",
    lambda c: _featurizer().fit_transform(IMGS.astype(np.int64)),
    ValueError,
    "X.astype(np.uint8)",
)
case(
    "dino-two-channels",
    lambda c: _featurizer().fit_transform(IMGS[..., :2]),
    ValueError,
    "channels last: 3 (RGB)",
)
case(
    "dino-five-channel-tensor",
    lambda c: _featurizer().fit_transform(torch.rand(1, 5, 32, 32)),
    ValueError,
    "(N, 3, H, W)",
)
case(
    "dino-channels-last-tensor",
    lambda c: _featurizer().fit_transform(torch.rand(1, 32, 32, 3)),
    ValueError,
    "X.permute(0, 3, 1, 2)",
)
case(
    "dino-channels-first-numpy",
    lambda c: _featurizer().fit_transform(IMGS.transpose(0, 3, 1, 2)),
    ValueError,
    "X.transpose(0, 2, 3, 1)",
)
case(
    "dino-one-image",
    lambda c: _featurizer().fit_transform(IMGS[0]),
    ValueError,
    "X[None]",
)
case(
    "dino-no-images",
    lambda c: _featurizer().fit_transform([]),
    ValueError,
    "no images",
)
case(
    "dino-unreadable-path",
    lambda c: _featurizer().fit_transform([str(c["root"] / "bad" / "broken.png")]),
    OSError,
    "broken.png",
)
case(
    "dino-layer-out-of-range",
    lambda c: _featurizer(layer=5).fit_transform(IMGS),
    ValueError,
    "use -1 to 0",
)
case(
    "dino-max-tokens",
    lambda c: _featurizer(crop="none", max_tokens=4).fit_transform(IMGS),
    ValueError,
    "raise max_tokens",
)
case(
    "dino-unknown-model",
    lambda c: DinoFeaturizer("not_a_model", device="cpu").fit_transform(IMGS),
    ValueError,
    "vit_small_patch8_224.dino",
)

# ---- the command line: exit code 2 and one line
SEG = ("segment", "{imgs}", "--out", "{root}/out")
case("cli-no-command", lambda c: cli(c), CliError, "choose a command")
case(
    "cli-segment-missing-folder",
    lambda c: cli(c, "segment", "{root}/nope", "--out", "{root}/o", *CLI_RUN),
    CliError,
    "does not exist",
)
case(
    "cli-segment-empty-folder",
    lambda c: cli(c, "segment", "{root}/empty", "--out", "{root}/o", *CLI_RUN),
    CliError,
    "holds no image files",
)
case(
    "cli-segment-unreadable-image",
    lambda c: cli(
        c, "segment", "{root}/bad", "--out", "{root}/o", *CLI_BACKBONE, *CLI_RUN
    ),
    CliError,
    "broken.png",
)
case("cli-segment-k-0", lambda c: cli(c, *SEG, "--k", "0"), CliError, "positive")
case(
    "cli-segment-k-text",
    lambda c: cli(c, *SEG, "--k", "abc"),
    CliError,
    "expected an integer",
)
case("cli-segment-alpha", lambda c: cli(c, *SEG, "--alpha", "2"), CliError, "[0, 1]")
case(
    "cli-segment-resolution-0",
    lambda c: cli(c, *SEG, "--resolution", "0"),
    CliError,
    "--resolution: expected a positive integer",
)
case(
    "cli-segment-projector",
    lambda c: cli(c, *SEG, "--projector", "tsne:3", *CLI_BACKBONE, *CLI_RUN),
    CliError,
    "expected pca:DIM",
)
case(
    "cli-segment-projector-dim",
    lambda c: cli(c, *SEG, "--projector", "pca:0", *CLI_BACKBONE, *CLI_RUN),
    CliError,
    "DIM must be a positive integer",
)
case(
    "cli-segment-k-beyond-tokens",
    lambda c: cli(c, *SEG, "--k", "200", *CLI_BACKBONE, *CLI_RUN),
    CliError,
    "--projector pca:N",
)
case(
    "cli-segment-device",
    lambda c: cli(c, *SEG, *CLI_BACKBONE, "--device", "gpu"),
    CliError,
    "'auto', 'cpu', 'cuda'",
)
case(
    "cli-segment-missing-pipeline",
    lambda c: cli(c, *SEG, "--pipeline", "{root}/nope.skstego"),
    CliError,
    "--pipeline '",
)
case(
    "cli-segment-text-pipeline",
    lambda c: cli(c, *SEG, "--pipeline", "{root}/text.txt", "--device", "cpu"),
    CliError,
    "not a skstego model file",
)
case(
    "cli-segment-text-checkpoint",
    lambda c: cli(c, *SEG, "--checkpoint", "{root}/text.txt"),
    CliError,
    "--checkpoint: The checkpoint",
)
case(
    "cli-segment-missing-weights",
    lambda c: cli(c, *SEG, "--weights", "{root}/nope.pth"),
    CliError,
    "--weights '",
)
case(
    "cli-segment-text-weights",
    lambda c: cli(c, *SEG, "--weights", "{root}/text.pth"),
    CliError,
    "not a PyTorch checkpoint",
)
case(
    "cli-segment-weights-and-random",
    lambda c: cli(c, *SEG, "--weights", "{root}/text.pth", "--random-weights"),
    CliError,
    "exclude each other",
)
case(
    "cli-segment-out-is-a-file",
    lambda c: cli(c, "segment", "{imgs}", "--out", "{root}/text.txt", *CLI_RUN),
    CliError,
    "is not a folder",
)
case(
    "cli-fit-missing-images",
    lambda c: cli(c, "fit", "{root}/nope", "--out", "{root}/m.skstego"),
    CliError,
    "does not exist",
)
case(
    "cli-fit-linear-without-labels",
    lambda c: cli(c, "fit", "{imgs}", "--out", "{root}/m.skstego", "--probe", "linear"),
    CliError,
    "needs --labels DIR",
)
case(
    "cli-fit-missing-labels",
    lambda c: cli(
        c, "fit", "{imgs}", "--out", "{root}/m.skstego", "--labels", "{root}/nope"
    ),
    CliError,
    "no label file",
)
case(
    "cli-fit-out-folder-missing",
    lambda c: cli(c, "fit", "{imgs}", "--out", "{root}/no/m.skstego"),
    CliError,
    "does not exist",
)
case(
    "cli-fit-steps-0",
    lambda c: cli(c, "fit", "{imgs}", "--out", "{root}/m.skstego", "--steps", "0"),
    CliError,
    "--steps",
)
EV = ("--dataset", "folder", "--root", "{root}/ds", "--device", "cpu")
case(
    "cli-evaluate-missing-model",
    lambda c: cli(c, "evaluate", "{root}/nope.skstego", *EV),
    CliError,
    "does not exist",
)
case(
    "cli-evaluate-no-model",
    lambda c: cli(c, "evaluate", *EV),
    CliError,
    "give a model file",
)
case(
    "cli-evaluate-text-model",
    lambda c: cli(c, "evaluate", "{root}/text.txt", *EV),
    CliError,
    "not a skstego model file",
)
case(
    "cli-evaluate-bare-probe",
    lambda c: cli(c, "evaluate", "{model}", *EV),
    CliError,
    "make one with `skstego fit`",
)
case(
    "cli-evaluate-dataset",
    lambda c: cli(c, "evaluate", "{model}", "--dataset", "imagenet", "--root", "x"),
    CliError,
    "invalid choice: 'imagenet'",
)
case(
    "cli-evaluate-missing-weights",
    lambda c: cli(c, "evaluate", "{model}", *EV, "--weights", "{root}/nope.pth"),
    CliError,
    "--weights '",
)
SW = ("sweep", "--dataset", "folder", "--root", "{root}/ds", "--out", "{root}/sw")
case(
    "cli-sweep-dims",
    lambda c: cli(c, *SW, "--dims", "a,b"),
    CliError,
    "comma-separated integers",
)
case(
    "cli-sweep-reducers",
    lambda c: cli(c, *SW, "--reducers", "pca,tsne"),
    CliError,
    "choose among pca",
)
case("cli-sweep-probes", lambda c: cli(c, *SW, "--probes", "svm"), CliError, "kmeans")
case("cli-sweep-seeds", lambda c: cli(c, *SW, "--seeds", "x"), CliError, "integers")
case(
    "cli-sweep-missing-root",
    lambda c: cli(
        c,
        "sweep",
        "--dataset",
        "folder",
        "--root",
        "{root}/nope",
        "--out",
        "x",
        *CLI_BACKBONE,
        *CLI_RUN,
    ),
    CliError,
    "does not exist",
)


@pytest.mark.parametrize(("call", "exc", "fragment"), CASES)
def test_bad_input(call, exc, fragment, ctx, capsys):
    ctx["capsys"] = capsys
    if issubclass(exc, Warning):
        with pytest.warns(exc, match=_escaped(fragment)):
            call(ctx)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=_escaped(fragment)):
            call(ctx)


def _escaped(fragment):
    import re

    return re.escape(fragment)


def test_the_table_is_large_enough():
    assert len(CASES) >= 80


# --------------------------------------------------------------------------
# inputs are never modified in place
# --------------------------------------------------------------------------
def _unchanged(fn, *arrays):
    before = [a.copy() if isinstance(a, np.ndarray) else a.clone() for a in arrays]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*arrays)
    for a, b in zip(arrays, before, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "fn",
    [
        lambda X: TokenStandardScaler(device="cpu").fit_transform(X),
        lambda X: TorchPCA(dim=2, whiten=True, device="cpu").fit_transform(X),
        lambda X: KMeansProbe(k=3, device="cpu", random_state=0).fit(X).predict(X),
    ],
    ids=["scaler", "pca-whiten", "kmeans"],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_estimators_leave_their_input_alone(fn, kind):
    X = X2.copy() if kind == "numpy" else torch.from_numpy(X2.copy())
    _unchanged(fn, X)


def test_labels_and_images_are_left_alone():
    y = (Y3 - 1).astype(np.float64)  # whole floats and -1 (ignored)
    _unchanged(
        lambda t, p: metrics.segmentation_report(t, p, matching="hungarian"),
        y,
        Y3.copy(),
    )
    probe = KMeansProbe(k=3, device="cpu", random_state=0)
    _unchanged(lambda X, lab: probe.fit(X, lab).score(X, lab), X4.copy(), Y3 - 1)
    images = torch.rand(1, 3, 32, 32)
    _unchanged(lambda im: _featurizer().fit_transform(im), images)
