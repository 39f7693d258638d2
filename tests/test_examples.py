"""The examples run as README says (the plain quickstart runs in .ci/run)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_segments_an_image_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 255, size=(40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "overlay.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--images",
            str(folder),
            "--resolution",
            "32",
            "--k",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "segmented 3 images" in result.stdout
    assert "randomly initialised backbone" in result.stdout  # offline, one line
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (3 * 32 * 2, 2 * 32 * 2, 3)  # 3 rows of 2 panels, x2


def test_quickstart_rejects_a_missing_folder(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--images",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "not a directory" in result.stderr


def test_plot_mechanisms_quick_writes_the_mechanism_table_and_figure(tmp_path):
    import pandas as pd

    cache = tmp_path / "cache"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "plot_mechanisms.py"),
            "--quick",
            "--out",
            str(tmp_path / "figs"),
            "--cache",
            str(cache),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for column in ("n_iter", "silhouette", "stability_ari", "ece"):
        assert column in result.stdout
    assert "1. k-means on the raw 64-d features" in result.stdout
    png = np.asarray(Image.open(tmp_path / "figs" / "sweep_mechanisms.png"))
    assert png.ndim == 3 and png.std() > 0
    # the printed table is the cached sweep's: 4 reducers' cells x 2 probes x 2 seeds
    results = pd.read_csv(cache / "results.csv")
    mechanisms = pd.read_csv(cache / "mechanisms.csv")
    assert len(results) == len(mechanisms) == (3 * 3 + 1) * 2 * 2
    kmeans = mechanisms[mechanisms.probe == "kmeans"]
    assert kmeans.n_iter.ge(1).all() and kmeans.silhouette.between(-1, 1).all()
    assert kmeans[kmeans.seed == 1].stability_ari.notna().all()
    assert mechanisms.ece.between(0, 1).all()


def test_scale_out_quick_featurizes_on_two_dask_workers(tmp_path):
    pytest.importorskip("distributed")
    zarr = pytest.importorskip("zarr")
    from skstego.features import FeatureStore

    store_path = tmp_path / "features.zarr"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "scale_out.py"),
            "--quick",
            "--store",
            str(store_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOMLY INITIALISED" in result.stdout  # offline default, said once
    # --quick: 48 scenes of 48 px, vit_tiny (patch 16, 192 channels): 3 x 3 maps
    assert "on 2 Dask workers" in result.stdout
    assert f"featurized 48 images ({48 * 3 * 3} tokens of 192 channels)" in (
        result.stdout
    )
    store = FeatureStore(store_path)
    assert store.shape == (48, 192, 3, 3) and store.attrs["chunk_images"] == 8
    assert np.asarray(zarr.open_group(str(store_path))["done"][:]).all()
    assert np.isfinite(store[:]).all() and store[:].std(axis=(0, 2, 3)).min() > 0
    miou = float(result.stdout.split("unsupervised mIoU ")[1].split(",")[0])
    assert 0.0 <= miou <= 100.0
    assert "peak RSS: client" in result.stdout


def test_quickstart_runs_without_its_docstring_as_the_docs_gallery_runs_it(
    monkeypatch, capsys
):
    # sphinx-gallery shows the module docstring as text and runs the rest
    # with __doc__ = "" and __name__ = "__main__"
    import ast

    path = ROOT / "examples" / "quickstart.py"
    module = ast.parse(path.read_text())
    assert isinstance(module.body[0], ast.Expr)  # the docstring
    module.body = module.body[1:]
    code = compile(module, str(path), "exec")
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        exec(code, {"__name__": "__main__", "__doc__": ""})
    assert exit_.value.code == 0
    assert "--images" in capsys.readouterr().out
