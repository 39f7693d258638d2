"""The command line, through ``main([...])`` (and once through ``python -m``).

A tiny randomly initialised timm ViT at 64 px keeps every call fast; the
backbone is built once per process and shared by the in-process references.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import skstego.cli as cli_module
from skstego import DinoFeaturizer, KMeansProbe, TorchPCA
from skstego._device import maps_to_tokens
from skstego.cli import main
from skstego.datasets import (
    ImageCollection,
    default_palette,
    load_image_folder,
    make_scenes,
)
from skstego.io import load
from skstego.metrics import segmentation_report

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

MODEL = "vit_tiny_patch16_224"
RES = 64
BACKBONE = ["--model", MODEL, "--random-weights", "--resolution", str(RES)]
RUN = ["--device", "cpu", "--quiet"]
N_IMAGES, N_CLASSES = 4, 3


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """4 scene PNGs (48 x 56) in ``imgs/``, label PNGs (255 = ignore) in
    ``labels/``; also laid out as an image-folder dataset in ``dataset/``."""
    root = tmp_path_factory.mktemp("scenes")
    images, labels = make_scenes(
        N_IMAGES, size=(48, 56), n_classes=N_CLASSES, random_state=0
    )
    for sub in ("imgs", "labels", "dataset/imgs/val", "dataset/labels/val"):
        (root / sub).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        stored = np.where(label < 0, 255, label).astype(np.uint8)
        for folder in ("imgs", "dataset/imgs/val"):
            Image.fromarray(image).save(root / folder / f"scene{i}.png")
        for folder in ("labels", "dataset/labels/val"):
            Image.fromarray(stored).save(root / folder / f"scene{i}.png")
    return root, images, labels


@pytest.fixture(scope="module")
def fitted_model(scenes, tmp_path_factory):
    """A model from ``skstego fit`` (PCA 4, k-means 3), and its path."""
    root, _, _ = scenes
    path = tmp_path_factory.mktemp("model") / "model.skstego"
    args = ["fit", str(root / "imgs"), "--out", str(path), *BACKBONE, *RUN]
    assert main([*args, "--projector", "pca:4", "--k", "3"]) == 0
    return path


def _featurizer():
    return DinoFeaturizer(
        MODEL, pretrained=False, resolution=RES, crop="none", device="cpu"
    )


def _read_png(path):
    with Image.open(path) as img:
        return img.mode, np.asarray(img), img.getpalette()


def _labels_of(out, images):
    """Label maps written for scene0..N (255 -> -1) and the PNG modes."""
    maps = []
    for i in range(len(images)):
        mode, arr, _ = _read_png(out / "imgs" / f"scene{i}_label.png")
        assert mode == "P"
        maps.append(np.where(arr == 255, -1, arr.astype(np.int64)))
    return np.stack(maps)


def _summary(out):
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "summary.json") as f:
        assert json.load(f) == [
            {**r, "classes": [int(c) for c in r["classes"].split()]} for r in rows
        ]
    return {os.path.basename(r["image"]): r for r in rows}


# --------------------------------------------------------------------------
# segment
# --------------------------------------------------------------------------
def test_segment_fits_on_the_images_and_writes_their_labels(scenes, tmp_path):
    root, images, _ = scenes
    out = tmp_path / "out"
    args = ["segment", str(root / "imgs"), "--out", str(out), *BACKBONE, *RUN]
    assert main([*args, "--projector", "pca:4", "--k", "3"]) == 0

    # reference: featurize once (whole images), PCA, k-means, predict at size
    maps = _featurizer().transform(images)
    tokens = maps_to_tokens(torch.from_numpy(maps)).numpy()
    pca = TorchPCA(dim=4, random_state=0, device="cpu").fit(tokens)
    probe = KMeansProbe(k=3, random_state=0, device="cpu").fit(pca.transform(tokens))
    expected = probe.predict(pca.transform(maps), size=images.shape[1:3])
    written = _labels_of(out, images)
    np.testing.assert_array_equal(written, expected)

    # palette PNG with default_palette; overlay = alpha blend, alpha 0.5
    palette = default_palette(3)
    _, _, png_palette = _read_png(out / "imgs" / "scene0_label.png")
    assert png_palette[:9] == palette.reshape(-1).tolist()
    for i, image in enumerate(images):
        mode, overlay, _ = _read_png(out / "imgs" / f"scene{i}_overlay.png")
        blend = 0.5 * image.astype(np.float64) + 0.5 * palette[written[i]]
        assert mode == "RGB"
        np.testing.assert_allclose(overlay, np.rint(blend), atol=1)

    rows = _summary(out)
    assert sorted(rows) == [f"scene{i}.png" for i in range(N_IMAGES)]
    for i in range(N_IMAGES):
        row = rows[f"scene{i}.png"]
        assert row["status"] == "ok" and row["error"] == ""
        assert [int(c) for c in row["classes"].split()] == np.unique(
            written[i]
        ).tolist()
    # the fitted model is kept and predicts the same labels
    pipe = load(out / "pipeline.skstego")
    np.testing.assert_array_equal(pipe[-1].cluster_centers_, probe.cluster_centers_)


def test_segment_resumes_and_overwrites(scenes, tmp_path, fitted_model):
    root, _, _ = scenes
    out = tmp_path / "out"
    args = [
        "segment",
        str(root / "imgs"),
        "--out",
        str(out),
        "--pipeline",
        str(fitted_model),
        *RUN,
    ]
    assert main(args) == 0
    files = sorted(p for p in out.rglob("*.png"))
    assert len(files) == 2 * N_IMAGES
    stamps = {p: p.stat().st_mtime_ns for p in files}

    assert main(args) == 0  # nothing to do: every output exists
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert {r["status"] for r in _summary(out).values()} == {"skipped"}

    (out / "imgs" / "scene2_overlay.png").unlink()  # an interrupted image
    assert main(args) == 0
    rows = _summary(out)
    assert rows["scene2.png"]["status"] == "ok"
    assert [rows[f"scene{i}.png"]["status"] for i in (0, 1, 3)] == ["skipped"] * 3
    for p in files:
        if "scene2" not in p.name:
            assert p.stat().st_mtime_ns == stamps[p]

    assert main([*args, "--overwrite"]) == 0
    assert {r["status"] for r in _summary(out).values()} == {"ok"}


def test_output_folder_inside_the_input_folder_is_not_an_input(
    scenes, tmp_path, fitted_model
):
    root, _, _ = scenes
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        data = (root / "imgs" / f"scene{i}.png").read_bytes()
        (folder / f"scene{i}.png").write_bytes(data)
    args = ["segment", str(folder), "--out", str(folder / "seg")]
    for _ in range(2):
        assert main([*args, "--pipeline", str(fitted_model), *RUN]) == 0
    rows = _summary(folder / "seg")
    assert sorted(rows) == ["scene0.png", "scene1.png"]
    assert {r["status"] for r in rows.values()} == {"skipped"}


def test_segment_with_pipeline_predicts_what_the_model_predicts(
    scenes, tmp_path, fitted_model
):
    root, images, _ = scenes
    out = tmp_path / "out"
    args = ["segment", str(root / "imgs"), "--out", str(out)]
    assert main([*args, "--pipeline", str(fitted_model), *RUN]) == 0
    pipe = load(fitted_model)
    maps = _featurizer().transform(images)
    expected = pipe[-1].predict(pipe[1].transform(maps), size=images.shape[1:3])
    np.testing.assert_array_equal(_labels_of(out, images), expected)


def test_corrupt_files_are_reported_and_the_rest_written(
    scenes, tmp_path, fitted_model, capsys
):
    root, images, _ = scenes
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(2):
        (folder / f"scene{i}.png").write_bytes(
            (root / "imgs" / f"scene{i}.png").read_bytes()
        )
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good = (root / "imgs" / "scene3.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(
        [
            *("segment", str(folder), str(tmp_path / "missing.png")),
            *("--out", str(out), "--pipeline", str(fitted_model), *RUN),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    for name in ("broken.jpg", "truncated.png", "missing.png"):
        assert f"failed: {tmp_path}" in err and name in err
    rows = _summary(out)
    assert rows["scene0.png"]["status"] == rows["scene1.png"]["status"] == "ok"
    for name in ("broken.jpg", "truncated.png", "missing.png"):
        assert rows[name]["status"] == "failed" and rows[name]["error"]
    assert sorted(p.name for p in (out / "mixed").iterdir()) == [
        "scene0_label.png",
        "scene0_overlay.png",
        "scene1_label.png",
        "scene1_overlay.png",
    ]
    pipe = load(fitted_model)
    expected = pipe[-1].predict(
        pipe[1].transform(_featurizer().transform(images[:2])), size=(48, 56)
    )
    for i in range(2):
        _, arr, _ = _read_png(out / "mixed" / f"scene{i}_label.png")
        np.testing.assert_array_equal(arr, expected[i])


def test_crf_gets_softmax_of_twice_the_cosine_similarities(
    scenes, tmp_path, fitted_model, monkeypatch
):
    calls = []

    def recording_crf(images, proba, **kwargs):
        calls.append((images.copy(), proba.copy(), kwargs))
        return proba[:, ::-1]  # labels must come from what the CRF returns

    monkeypatch.setattr(cli_module, "crf_refine", recording_crf)
    _, images, _ = scenes
    image = np.ascontiguousarray(images[1][:24, :32])
    Image.fromarray(image).save(tmp_path / "small.png")
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "small.png"), "--out", str(out)]
    assert main([*args, "--pipeline", str(fitted_model), "--crf", *RUN]) == 0

    pipe = load(fitted_model)
    codes = pipe[1].transform(_featurizer().transform(image[None]))
    centers = pipe[-1].cluster_centers_
    unit_codes = codes / np.linalg.norm(codes, axis=1, keepdims=True)
    unit_centers = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    cosine = np.einsum("nchw,kc->nkhw", unit_codes, unit_centers)
    scores = F.interpolate(
        torch.from_numpy(2.0 * cosine).float(), size=(24, 32), mode="bilinear"
    )
    expected = torch.softmax(scores, dim=1).numpy()
    ((crf_images, proba, kwargs),) = calls
    np.testing.assert_array_equal(crf_images, image[None])
    np.testing.assert_allclose(proba, expected, atol=1e-5)
    assert kwargs == {"device": "cpu"}
    _, written, _ = _read_png(out / "small_label.png")
    np.testing.assert_array_equal(written, 2 - expected.argmax(1)[0])


def _grey_levels(values):
    """The quantisation the CLI promises: round(255 * v) as uint8."""
    return np.clip(np.round(255.0 * values), 0, 255).astype(np.uint8)


def test_confidence_maps_are_the_quantised_predict_proba(
    scenes, tmp_path, fitted_model
):
    root, images, _ = scenes
    out = tmp_path / "out"
    args = ["segment", str(root / "imgs"), "--out", str(out), "--confidence"]
    assert main([*args, "--pipeline", str(fitted_model), *RUN]) == 0

    pipe = load(fitted_model)
    codes = pipe[1].transform(_featurizer().transform(images))
    proba = pipe[-1].predict_proba(codes, size=images.shape[1:3])
    ranked = np.sort(proba.astype(np.float64), axis=1)
    top1, top2 = ranked[:, -1], ranked[:, -2]
    with open(out / "summary.json") as f:
        rows = {os.path.basename(r["image"]): r for r in json.load(f)}
    for i in range(N_IMAGES):
        mode, conf, _ = _read_png(out / "imgs" / f"scene{i}_confidence.png")
        _, margin, _ = _read_png(out / "imgs" / f"scene{i}_margin.png")
        assert mode == "L" and conf.shape == images.shape[1:3]
        # float32 noise may move a value across a rounding boundary: 1 level
        diff = np.abs(conf.astype(int) - _grey_levels(top1[i]))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        diff = np.abs(margin.astype(int) - _grey_levels(top1[i] - top2[i]))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        row = rows[f"scene{i}.png"]
        assert row["mean_confidence"] == pytest.approx(top1[i].mean(), abs=1e-5)
        assert row["confidence"].endswith(f"scene{i}_confidence.png")
    with open(out / "summary.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[0]["mean_confidence"]) == pytest.approx(
        rows[os.path.basename(csv_rows[0]["image"])]["mean_confidence"]
    )

    # a rerun skips the images and reads their confidence back from the PNGs
    (out / "imgs" / "scene1_margin.png").unlink()  # redone: an output is missing
    assert main([*args, "--pipeline", str(fitted_model), *RUN]) == 0
    with open(out / "summary.json") as f:
        rows = {os.path.basename(r["image"]): r for r in json.load(f)}
    assert rows["scene1.png"]["status"] == "ok"
    assert rows["scene0.png"]["status"] == "skipped"
    assert rows["scene0.png"]["mean_confidence"] == pytest.approx(
        top1[0].mean(), abs=1 / 255
    )


def test_confidence_comes_after_the_crf(scenes, tmp_path, fitted_model, monkeypatch):

    def sharpening_crf(images, proba, **kwargs):
        sharp = proba.astype(np.float64) ** 3
        return (sharp / sharp.sum(axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(cli_module, "crf_refine", sharpening_crf)
    _, images, _ = scenes
    image = np.ascontiguousarray(images[2][:24, :32])
    Image.fromarray(image).save(tmp_path / "small.png")
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "small.png"), "--out", str(out)]
    flags = ["--pipeline", str(fitted_model), "--crf", "--confidence", *RUN]
    assert main([*args, *flags]) == 0

    pipe = load(fitted_model)
    codes = pipe[1].transform(_featurizer().transform(image[None]))
    refined = sharpening_crf(None, pipe[-1].predict_proba(codes, size=(24, 32)))[0]
    ranked = np.sort(refined.astype(np.float64), axis=0)
    _, conf, _ = _read_png(out / "small_confidence.png")
    _, margin, _ = _read_png(out / "small_margin.png")
    np.testing.assert_allclose(conf, _grey_levels(ranked[-1]), atol=1)
    np.testing.assert_allclose(margin, _grey_levels(ranked[-1] - ranked[-2]), atol=1)
    _, written, _ = _read_png(out / "small_label.png")
    np.testing.assert_array_equal(written, refined.argmax(0))


# --------------------------------------------------------------------------
# fit and evaluate
# --------------------------------------------------------------------------
def test_fit_saves_the_pipeline_it_fits(scenes, fitted_model):
    root, _, _ = scenes
    pipe = load(fitted_model)
    assert [type(s).__name__ for _, s in pipe.steps] == [
        "DinoFeaturizer",
        "TorchPCA",
        "KMeansProbe",
    ]
    features = pipe[0]
    assert (features.model, features.pretrained, features.resolution) == (
        MODEL,
        False,
        RES,
    )
    # reference: the collections' center crops (as the dataset loaders'),
    # featurized, PCA 4, k-means 3
    crops = ImageCollection(sorted(map(str, (root / "imgs").iterdir())), resolution=RES)
    featurizer = DinoFeaturizer(MODEL, pretrained=False, resolution=RES, device="cpu")
    maps = featurizer.transform(np.stack(list(crops)))
    pca = TorchPCA(dim=4, random_state=0, device="cpu").fit(maps)
    probe = KMeansProbe(k=3, random_state=0, device="cpu").fit(pca.transform(maps))
    np.testing.assert_allclose(pipe[1].components_, pca.components_, atol=1e-6)
    np.testing.assert_allclose(
        pipe[2].cluster_centers_, probe.cluster_centers_, atol=1e-5
    )


def test_fit_linear_probe_with_labels(scenes, tmp_path):
    root, images, _ = scenes
    path = tmp_path / "linear.skstego"
    args = ["fit", str(root / "imgs"), "--out", str(path), *BACKBONE, *RUN]
    assert main([*args, "--labels", str(root / "labels"), "--probe", "linear"]) == 0
    pipe = load(path)
    assert type(pipe[-1]).__name__ == "LinearProbe"
    np.testing.assert_array_equal(pipe[-1].classes_, np.arange(N_CLASSES))
    # segmenting with it writes class ids (classes_ of the argmax)
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(root / "imgs"),
                "--out",
                str(out),
                "--pipeline",
                str(path),
                *RUN,
            ]
        )
        == 0
    )
    codes = pipe[1].transform(_featurizer().transform(images))
    expected = pipe[-1].classes_[pipe[-1].predict(codes, size=(48, 56))]
    np.testing.assert_array_equal(_labels_of(out, images), expected)


def test_evaluate_equals_segmentation_report(scenes, fitted_model, tmp_path, capsys):
    root, _, _ = scenes
    report_file = tmp_path / "scores.json"
    capsys.readouterr()
    code = main(
        [
            *("evaluate", str(fitted_model), "--dataset", "folder"),
            *("--root", str(root / "dataset"), "--json", str(report_file), *RUN),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    # reference: the loader's center crops, the pipeline's raw clusters,
    # Hungarian matching on the evaluation data
    pipe = load(fitted_model)
    coll = load_image_folder(root / "dataset", resolution=RES)
    y = np.stack(list(coll.labels))
    images = np.stack(list(coll))
    clusters = pipe.predict(images, size=y.shape[1:])
    expected = segmentation_report(
        y, clusters, n_classes=N_CLASSES, n_pred=3, matching="hungarian"
    )
    scores = json.loads(report_file.read_text())
    assert scores["miou"] == pytest.approx(expected["miou"], abs=1e-12)
    assert scores["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    np.testing.assert_allclose(
        np.array(scores["iou"], dtype=float), expected["iou"], atol=1e-12
    )
    assert scores["support"] == expected["support"].tolist()
    assert scores["mapping"] == expected["mapping"].tolist()
    assert f"mIoU: {100 * expected['miou']:.2f}" in printed
    assert f"pixel accuracy: {100 * expected['accuracy']:.2f}" in printed
    assert (
        len([line for line in printed.splitlines() if line[:5].strip().isdigit()])
        == N_CLASSES
    )


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
def test_offline_default_model_exits_2_with_one_line(scenes, tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    root, _, _ = scenes
    capsys.readouterr()
    code = main(["segment", str(root / "imgs"), "--out", str(tmp_path / "o"), *RUN])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("skstego: error: ") and "Traceback" not in err
    assert "vit_small_patch8_224.dino" in err and "--weights" in err
    assert not (tmp_path / "o" / "imgs").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "choose a command"),
        (["segment", "{tmp}/nothing-here", "--out", "{tmp}/o"], "no images found"),
        (
            ["segment", "{imgs}", "--out", "{tmp}/o", "--projector", "svd:3"],
            "--projector",
        ),
        (
            ["segment", "{imgs}", "--out", "{tmp}/o", "--pipeline", "{tmp}/x.txt"],
            "x.txt",
        ),
        (["segment", "{imgs}", "--out", "{tmp}/o", "--device", "nonsense"], "--device"),
        (
            ["fit", "{imgs}", "--out", "{tmp}/m.skstego", "--probe", "linear"],
            "--labels",
        ),
        (
            ["fit", "{imgs}", "--out", "{tmp}/m", "--random-weights", "--weights", "w"],
            "exclude",
        ),
        (["segment", "--out"], "expected one argument"),
    ],
)
def test_usage_errors_exit_2(argv, message, scenes, tmp_path, capsys):
    root, _, _ = scenes
    (tmp_path / "x.txt").write_text("not a model")
    argv = [a.format(tmp=tmp_path, imgs=root / "imgs") for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_python_m_skstego_help():
    result = subprocess.run(
        [sys.executable, "-m", "skstego", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for word in ("segment", "fit", "evaluate", "exit codes", "2  usage"):
        assert word in result.stdout


# --------------------------------------------------------------------------
# run identity: one output folder never mixes models or settings
# --------------------------------------------------------------------------
def _model_labels(model_path, image_path):
    """What the saved model predicts for one image file, at its full size."""
    from skstego.cli import _predict, _reduce, _split_pipeline
    from skstego.io import load

    featurizer, reducer, probe = _split_pipeline(load(model_path, device="cpu"), "m")
    featurizer.set_params(crop="none", device="cpu")
    image = np.asarray(Image.open(image_path).convert("RGB"))
    codes = _reduce(reducer, featurizer.transform(image[None]))
    return _predict(probe, codes, image.shape[:2])[0]


def _stored_labels(path):
    labels = np.asarray(Image.open(path)).astype(np.int64)
    return np.where(labels == 255, -1, labels)


def test_segment_rerun_never_mixes_models(scenes, tmp_path, capsys):
    _, images, _ = scenes
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(folder / f"scene{i}.png")
    out = tmp_path / "out"
    args = ["segment", str(folder), "--out", str(out), *BACKBONE, *RUN]
    assert main([*args, "--k", "3", "--projector", "pca:4"]) == 0
    model = out / "pipeline.skstego"
    model_bytes = model.read_bytes()

    # another --k on the same folder: refused, naming the setting; nothing moves
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main([*args, "--k", "2", "--projector", "pca:4"]) == 2
    assert "k: 3 then, 2 now" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps

    # an added image is predicted with the saved model, without a refit
    Image.fromarray(images[3]).save(folder / "scene3.png")
    assert main([*args, "--k", "3", "--projector", "pca:4"]) == 0
    assert model.read_bytes() == model_bytes
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for i in range(4):
        np.testing.assert_array_equal(
            _stored_labels(out / "imgs" / f"scene{i}_label.png"),
            _model_labels(model, folder / f"scene{i}.png"),
        )

    # a changed input file is redone, with the same saved model
    Image.fromarray(images[0][:, ::-1].copy()).save(folder / "scene1.png")
    assert main([*args, "--k", "3", "--projector", "pca:4"]) == 0
    rows = _summary(out)
    assert rows["scene1.png"]["status"] == "ok"
    assert rows["scene0.png"]["status"] == "skipped"
    np.testing.assert_array_equal(
        _stored_labels(out / "imgs" / "scene1_label.png"),
        _model_labels(model, folder / "scene1.png"),
    )

    # --overwrite starts clean under the new settings: every output from it
    assert main([*args, "--k", "2", "--projector", "pca:4", "--overwrite"]) == 0
    assert model.read_bytes() != model_bytes
    for i in range(4):
        labels = _stored_labels(out / "imgs" / f"scene{i}_label.png")
        assert labels.max() < 2
        np.testing.assert_array_equal(
            labels, _model_labels(model, folder / f"scene{i}.png")
        )

    # --refit redoes every output with a model fitted on all images
    assert main([*args, "--k", "2", "--projector", "pca:4", "--refit"]) == 0
    assert {r["status"] for r in _summary(out).values()} == {"ok"}


def test_segment_outputs_without_a_run_record_are_not_trusted(scenes, tmp_path, capsys):
    root, _, _ = scenes
    out = tmp_path / "out"
    args = ["segment", str(root / "imgs"), "--out", str(out), *BACKBONE, *RUN]
    assert main([*args, "--k", "3", "--projector", "pca:4"]) == 0
    (out / "run.json").unlink()  # e.g. outputs of an older skstego
    assert main([*args, "--k", "3", "--projector", "pca:4"]) == 2
    assert "run record" in capsys.readouterr().err
    assert main([*args, "--k", "3", "--projector", "pca:4", "--overwrite"]) == 0
    assert (out / "run.json").is_file()


def test_cli_messages_for_settings_the_user_can_fix(scenes, tmp_path, capsys):
    root, _, _ = scenes
    out = tmp_path / "out"
    seg = ["segment", str(root / "imgs"), "--out", str(out), *BACKBONE, *RUN]
    # the default --projector pca:64 on images too small for 64 dimensions
    small = [*seg[:-3], "--resolution", "16", *RUN]
    assert main([*small, "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "--projector pca:64" in err and "pca:N" in err
    # --random-weights warns at run time, as one line without source lines
    assert main([*seg, "--k", "2", "--projector", "pca:4"]) == 0
    err = capsys.readouterr().err
    assert "skstego: warning: --random-weights" in err
    assert "warnings.warn" not in err and ".py:" not in err


def test_evaluate_weights_override_the_stored_path(scenes, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    root, _, _ = scenes
    weights = tmp_path / "w.safetensors"
    vit = timm.create_model(MODEL, pretrained=False)
    save_file(vit.state_dict(), str(weights))
    model = tmp_path / "m.skstego"
    fit = ["fit", str(root / "imgs"), "--out", str(model), "--model", MODEL]
    fit += ["--weights", str(weights), "--resolution", str(RES), *RUN]
    assert main([*fit, "--projector", "pca:4", "--k", "3"]) == 0
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    ev = ["evaluate", str(model), "--dataset", "folder"]
    ev += ["--root", str(root / "dataset"), *RUN]
    assert main(ev) == 2
    assert "w.safetensors" in capsys.readouterr().err
    assert main([*ev, "--weights", str(moved)]) == 0


def test_segment_reports_a_huge_strip_instead_of_hanging(scenes, tmp_path, capsys):
    _, images, _ = scenes
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "photo.png")
    Image.fromarray(np.zeros((3, 4000, 3), np.uint8)).save(folder / "strip.png")
    out = tmp_path / "out"
    args = ["segment", str(folder), "--out", str(out), *BACKBONE, *RUN]
    assert main([*args, "--k", "2", "--projector", "pca:4"]) == 1
    err = capsys.readouterr().err
    assert "strip.png" in err and "max_tokens" in err
    assert (out / "imgs" / "photo_label.png").is_file()


def test_segment_featurizes_each_image_once(scenes, tmp_path, monkeypatch):
    from skstego import cli
    from skstego.features import DinoFeaturizer as Featurizer

    root, _, _ = scenes
    seen = []
    forward = Featurizer.transform

    def counting(self, X):
        seen.append(len(X))
        return forward(self, X)

    monkeypatch.setattr(Featurizer, "transform", counting)
    args = ["segment", str(root / "imgs"), *BACKBONE, *RUN, "--k", "3"]
    args += ["--projector", "pca:4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    once = sum(seen) - 1  # one 8 x 8 image checks the backbone
    assert once == N_IMAGES
    # predictions from the kept maps equal a fresh forward pass
    seen.clear()
    monkeypatch.setattr(cli, "FEATURE_CACHE_BYTES", 0)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert sum(seen) - 1 == 2 * N_IMAGES
    for i in range(N_IMAGES):
        name = f"imgs/scene{i}_label.png"
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "a" / name)),
            np.asarray(Image.open(tmp_path / "b" / name)),
        )


def test_interrupted_segment_leaves_a_summary(scenes, tmp_path, monkeypatch):
    from skstego import cli

    root, _, _ = scenes
    calls = []
    write = cli._write_outputs

    def interrupt_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(a[0].path)
        return write(*a, **k)

    monkeypatch.setattr(cli, "_write_outputs", interrupt_after_two)
    out = tmp_path / "out"
    args = ["segment", str(root / "imgs"), "--out", str(out), *BACKBONE, *RUN]
    assert main([*args, "--k", "3", "--projector", "pca:4", "--batch-size", "2"]) == 130
    rows = _summary(out)
    assert sorted(r["status"] for r in rows.values()).count("ok") == 2
