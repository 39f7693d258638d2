"""scripts/gpu_check.sh: the CPU dry run leaves every output in one folder.

The dry run (``--device cpu --quick``) runs the same steps as the GPU check
(setup, versions, ``pytest -m gpu`` on one test file, ``run_all.py --quick``)
at tiny sizes; on a machine without CUDA its GPU tests are skipped.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils' timeout",
)


def _run(*args, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env["SITE"] = str(tmp_path / "site")
    env.pop("OUT", None)
    return env


def test_dry_run_writes_every_output(tmp_path):
    out = tmp_path / "check"
    done = _run("--device", "cpu", "--quick", str(out), env=_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for name in (
        "summary.txt",
        "setup.log",
        "versions.txt",
        "nvidia-smi.txt",
        "pytest-gpu.log",
        "pytest-gpu.xml",
        "bench.log",
        "results.md",
    ):
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()
    for step in ("setup: ok", "versions: ok", "pytest: ok", "bench: ok"):
        assert step in summary
    assert "torch " in (out / "versions.txt").read_text()
    # the GPU tests were selected and skipped, none failed
    xml = (out / "pytest-gpu.xml").read_text()
    assert 'failures="0"' in xml and 'errors="0"' in xml and "<skipped" in xml
    # the table: a Markdown header and the rows of the three quick benchmarks,
    # each with a time, a peer and a ratio; the others listed as not run
    table = (out / "results.md").read_text().splitlines()
    assert "| operation | skstego | peer | peer time | ratio | note |" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table}
    measured = [
        ("TorchPCA fit", "sklearn PCA"),
        ("RandomProjection(gaussian) fit_transform", "GaussianRandomProjection"),
        ("RandomProjection(sparse) fit_transform", "SparseRandomProjection"),
        ("dense CRF", "pydensecrf"),
    ]
    ratios = []
    for operation, peer in measured:
        matches = [line for op, line in rows.items() if op.startswith(operation)]
        assert matches, operation
        if peer == "pydensecrf" and "not installed" in matches[0]:
            continue
        cells = [c.strip() for c in matches[0].strip("|").split("|")]
        assert peer in cells[2]
        # "n/a" only where a time was below the scripts' printed resolution
        if cells[4] != "n/a":
            assert cells[4].endswith("x") and float(cells[4][:-1]) > 0
            ratios.append(cells[4])
        else:
            assert "0 " in cells[1] or "0 " in cells[3] or cells[3] == "n/a"
    assert ratios, "no measured ratio in the table"
    for name in ("kmeans", "hnne", "stego", "featurize-vits8"):
        assert "not run with --quick" in rows[name]
    assert (out / "bench-logs" / "crf.log").is_file()


def test_failing_step_still_runs_the_rest_and_exits_nonzero(tmp_path):
    # a python that fails: every step fails, all are still run and reported
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    env = _env(tmp_path)
    env["PYTHON"] = str(fake)
    out = tmp_path / "check"
    done = _run("--device", "cpu", "--quick", str(out), env=env)
    assert done.returncode != 0
    summary = (out / "summary.txt").read_text()
    for step in ("versions: FAILED", "pytest: FAILED", "bench: FAILED"):
        assert step in summary
    assert "failed steps: versions pytest bench" in summary


def test_help_and_bad_arguments():
    done = _run("--help")
    assert done.returncode == 0
    assert "pip wheel --no-deps -w .whl hnne==2.0.1" in done.stdout
    assert "--quick" in done.stdout
    bad = _run("--device", "tpu")
    assert bad.returncode == 2 and "--device must be" in bad.stderr
