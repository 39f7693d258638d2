"""``skstego sweep``: the study runner from the command line."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skstego import DinoFeaturizer
from skstego.cli import main
from skstego.datasets import load_image_folder, make_scenes
from skstego.study import run_sweep

MODEL = "vit_tiny_patch16_224"
RES = 32
BACKBONE = ["--model", MODEL, "--random-weights", "--resolution", str(RES)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepdata")
    for split, seed in (("train", 0), ("val", 1)):
        images, labels = make_scenes(4, size=(40, 48), n_classes=3, random_state=seed)
        (root / "imgs" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image).save(root / "imgs" / split / f"s{i}.png")
            stored = np.where(label < 0, 255, label).astype(np.uint8)
            Image.fromarray(stored).save(root / "labels" / split / f"s{i}.png")
    return root


def _args(root, out, *extra):
    return [
        *("sweep", "--dataset", "folder", "--root", str(root), "--out", str(out)),
        *BACKBONE,
        *("--reducers", "pca,none", "--dims", "2,3", "--probes", "kmeans,linear"),
        *("--seeds", "0", "--device", "cpu", "--quiet", *extra),
    ]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_sweep_writes_the_table_of_run_sweep(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(dataset, out)) == 0
    table = pd.read_csv(out / "results.csv")
    # reference: run_sweep on the loader's crops with the same backbone
    feat = DinoFeaturizer(MODEL, pretrained=False, resolution=RES, device="cpu")
    train = load_image_folder(dataset, split="train", resolution=RES)
    val = load_image_folder(dataset, split="val", resolution=RES)
    expected = run_sweep(
        np.stack(list(train)),
        np.stack(list(train.labels)),
        np.stack(list(val)),
        np.stack(list(val.labels)),
        featurizer=feat,
        reducers=["pca", "none"],
        dims=[2, 3],
        probes=["kmeans", "linear"],
        seeds=[0],
        device="cpu",
    )
    cols = ["reducer", "dim", "probe", "seed"]
    got = table.sort_values(cols).reset_index(drop=True)
    ref = expected.sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[cols], ref[cols], check_dtype=False)
    np.testing.assert_allclose(got.miou, ref.miou, atol=1e-6)
    np.testing.assert_allclose(got.accuracy, ref.accuracy, atol=1e-6)
    for name in ("sweep_miou.png", "sweep_accuracy.svg", "features_train.npy"):
        assert (out / name).exists()
    assert "miou_mean" in capsys.readouterr().out
    # a rerun resumes: nothing left to compute, the table is unchanged
    assert main(_args(dataset, out)) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), table)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--reducers", "pca,tsne"), "--reducers: unknown"),
        (("--dims", "3,x"), "--dims: expected comma-separated integers"),
        (("--probes", "svm"), "--probes: unknown"),
    ],
)
def test_sweep_usage_errors(dataset, tmp_path, capsys, extra, message):
    args = _args(dataset, tmp_path / "o")
    for i in range(0, len(extra), 2):
        args[args.index(extra[i]) + 1] = extra[i + 1]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sweep_reproduction_flags_reach_run_sweep(dataset, tmp_path, monkeypatch):
    import skstego.cli

    seen = {}

    def fake_run_sweep(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(skstego.cli, "run_sweep", fake_run_sweep)
    argv = [
        *("sweep", "--dataset", "folder", "--root", str(dataset)),
        *("--out", str(tmp_path / "o"), *BACKBONE, "--device", "cpu", "--quiet"),
        *("--standardize", "batch", "--batch-images", "4,2", "--preset", "potsdam"),
        *("--reducers", "pca,stego", "--stego-steps", "3"),
    ]
    with pytest.raises(SystemExit):
        main(argv)
    assert seen["standardize"] == "batch" and seen["batch_images"] == (4, 2)
    assert seen["preset"] == "potsdam" and seen["dims"] == "study"
    stego = dict(r for r in seen["reducers"] if isinstance(r, tuple))["stego"]
    # the preset's settings with the requested steps (the reference's potsdam run)
    assert stego.n_steps == 3 and stego.neg_shift == 0.76 and stego.batch_size == 16
    assert main([*argv[:-4], "--batch-images", "0"]) == 2


def test_sweep_dims_beyond_the_features_are_a_usage_error(dataset, tmp_path, capsys):
    argv = [
        *("sweep", "--dataset", "folder", "--root", str(dataset)),
        *("--out", str(tmp_path / "o"), *BACKBONE, "--device", "cpu", "--quiet"),
        *("--dims", "3,1000", "--reducers", "pca", "--probes", "kmeans"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--dims 1000" in err and "192 features" in err
