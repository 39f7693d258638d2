"""benchmarks/run_all.py: every entry's parser still reads its script's output.

The parsers of ``run_all.py`` are regular expressions over the lines the
``bench_*.py`` scripts print, so an edited ``print`` can silently turn a row
into "unreadable output" or, worse, a wrong number. For every entry of
``run_all.entries``, each test here runs the script as ``run_all`` would (the
command line of ``run_all.command`` with the entry's ``quick`` arguments and
``--device cpu``, ``run_all``'s environment, the entry's quick timeout,
stderr folded into stdout), feeds the output to ``entry.parse(out, "quick")``
and checks every row against the numbers read back from the raw output with
this file's own regular expressions: the skstego and peer times, and the ratio
= peer time / skstego time (or the ratio the script itself printed, where the
parser takes that). A ratio must be a measured value such as ``1.23x``;
``n/a`` is accepted only where no peer exists (``bench_store.py``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_run_all() -> Any:
    """``benchmarks/run_all.py`` as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "_skstego_bench_run_all", ROOT / "benchmarks" / "run_all.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


RUN_ALL = _load_run_all()
# The names only: no subprocess at collection (entries() asks one whether
# faiss imports; that changes arguments, not names).
with mock.patch.object(RUN_ALL, "importable", lambda module: False):
    NAMES = [entry.name for entry in RUN_ALL.entries("cpu")]
#: Entries whose quick run takes more than a few seconds of CPU (model
#: creation, numba imports, subprocesses per side).
SLOW = {"hnne", "featurize-vits8", "featurize-vitb8", "stego", "streaming", "store"}
M = re.MULTILINE


@pytest.fixture(scope="module")
def all_entries() -> dict[str, Any]:
    """``run_all.entries("cpu")`` by name, with its real import checks."""
    return {entry.name: entry for entry in RUN_ALL.entries("cpu")}


# --------------------------------------------------------------------------
# reading numbers back, independently of run_all's own helpers
# --------------------------------------------------------------------------
_UNIT = {"µs": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def _seconds(cell: str) -> float:
    """A table time such as ``"108 ms"`` in seconds."""
    match = re.fullmatch(rf"({_NUMBER}) (µs|ms|s)", cell)
    assert match is not None, f"not a time: {cell!r}"
    return float(match[1]) * _UNIT[match[2]]


def _ratio_value(cell: str) -> float:
    """A measured ratio such as ``"1.23x"`` as a positive float."""
    match = re.fullmatch(rf"({_NUMBER})x", cell)
    assert match is not None, f"not a measured ratio: {cell!r}"
    value = float(match[1])
    assert value > 0, cell
    return value


def _find(pattern: str, out: str) -> re.Match:
    """The first line of ``out`` that matches ``pattern``."""
    match = re.search(pattern, out, M)
    assert match is not None, f"no line matches {pattern!r}"
    return match


def _check_ratio(cell: str, expected: float) -> None:
    """``cell`` is ``expected`` as run_all prints a ratio: 2 decimals from
    0.1x up, 3 significant digits below (a hair more for float ties)."""
    step = 0.005 if expected >= 0.1 else 0.005 * expected
    assert abs(_ratio_value(cell) - expected) <= 1.01 * step, (cell, expected)


def _check_times(row: Any, ours: float, peer: float) -> None:
    """``row`` shows these two times (3 significant digits) and their ratio."""
    assert ours > 0 and peer > 0, (
        f"{row.operation}: a time below the script's printed resolution; "
        "raise this entry's quick sizes in run_all.py"
    )
    assert _seconds(row.ours) == pytest.approx(ours, rel=5.1e-3), row
    assert _seconds(row.peer_time) == pytest.approx(peer, rel=5.1e-3), row
    _check_ratio(row.ratio, peer / ours)


# --------------------------------------------------------------------------
# one checker per entry: (raw output, parsed rows, entry) -> None
# --------------------------------------------------------------------------
def check_pca(out: str, rows: list, entry: Any) -> None:
    head = _find(r"^== fit ([\d,]+) x (\d+) float32 -> (\d+)", out)
    peer = float(_find(r"^sklearn PCA\(covariance_eigh\) +(\S+) s$", out)[1])
    ours = float(_find(r"^TorchPCA\(covariance_eigh\) \[cpu\] +(\S+) s$", out)[1])
    (row,) = rows
    assert row.operation.startswith(f"TorchPCA fit, {head[1]} x {head[2]}")
    assert "covariance_eigh" in row.peer
    _check_times(row, ours, peer)


def check_kmeans(out: str, rows: list, entry: Any) -> None:
    head = _find(r"^k-means, (\d+) x (\d+) float32, k=(\d+), .* (\d+) repeats;", out)
    sk = _find(
        r"^sklearn KMeans +([\d.]+) ms +[\d.]+ ms/iteration +inertia (\S+) +"
        r"accuracy \S+ +iterations (\d+)$",
        out,
    )
    ours = re.findall(
        r"^skstego \((\w+) *\) +([\d.]+) ms +[\d.]+ ms/iteration +inertia (\S+) +"
        r"accuracy \S+ +iterations (\d+) +inertia rel\. diff \S+ +"
        r"median ratio sklearn/skstego ([\d.]+)x$",
        out,
        M,
    )
    backends = entry.args["quick"][entry.args["quick"].index("--backends") + 1]
    faiss = importlib.util.find_spec("faiss") is not None
    # on the CPU, "auto" (scikit-learn's compiled kernel) beside torch
    assert backends == ("auto,torch,faiss" if faiss else "auto,torch")
    assert [m[0] for m in ours] == backends.split(",")
    # one main row per backend, then the seeding row
    assert len(rows) == len(ours) + 1
    for row, (backend, ms, inertia, n_iter, script_ratio) in zip(
        rows[:-1], ours, strict=True
    ):
        assert "shared k-means++ init" in row.operation
        assert f"({backend} backend)" in row.operation
        assert row.peer == "sklearn KMeans (same init)"
        _check_times(row, float(ms) / 1e3, float(sk[1]) / 1e3)
        # same init, tol=0: the same Lloyd iterations, the same inertia
        assert int(n_iter) == int(sk[3])
        assert float(inertia) == pytest.approx(float(sk[2]), rel=1e-4)
        if head[4] == "1":  # one repeat: the median ratio is this run's
            ratio = float(sk[1]) / float(ms)
            assert float(script_ratio) == pytest.approx(ratio, rel=1e-2, abs=5e-3)
    seed_peer = float(_find(r"^sklearn KMeans seed\+1 +([\d.]+) ms", out)[1])
    seed = _find(r"^skstego \((\w+) *\) seed\+1 +([\d.]+) ms", out)
    assert float(_find(r"^sklearn kmeans_plusplus +([\d.]+) ms", out)[1]) > 0
    row = rows[-1]
    assert "seeding" in row.operation and f"({seed[1]} backend)" in row.operation
    assert "max_iter=1" in row.peer
    _check_times(row, float(seed[2]) / 1e3, seed_peer / 1e3)


def check_cluster_metrics(out: str, rows: list, entry: Any) -> None:
    lines = re.findall(
        r"^(\w+)(?: \(([\d,]+) tokens\))? +sklearn +([\d.]+) s +skstego +"
        r"([\d.]+) s +ratio",
        out,
        M,
    )
    assert [m[0] for m in lines] == [
        "euclidean",
        "cosine",
        "davies_bouldin_score",
        "calinski_harabasz_score",
    ]
    assert len(rows) == len(lines)
    for row, (name, _, peer, ours) in zip(rows, lines, strict=True):
        assert name in row.operation
        _check_times(row, float(ours), float(peer))


def check_random_projection(out: str, rows: list, entry: Any) -> None:
    lines = re.findall(r"^(gaussian|sparse) +([\d.]+) +([\d.]+) +[\d.]+$", out, M)
    assert [m[0] for m in lines] == ["gaussian", "sparse"]  # no "*" rows on a CPU
    assert len(rows) == 2
    for row, (kind, peer, ours) in zip(rows, lines, strict=True):
        assert row.operation.startswith(f"RandomProjection({kind})")
        assert row.peer == f"sklearn {kind.capitalize()}RandomProjection"
        _check_times(row, float(ours), float(peer))


def check_linear(out: str, rows: list, entry: Any) -> None:
    table = {
        m[0]: float(m[1])
        for m in re.findall(
            r"^((?:skstego|sklearn) \S.*?) {2,}[\d.]+ +([\d.]+) +\d+$", out, M
        )
    }
    assert len(table) == 5, table
    pairs = set()
    for row in rows:
        mine = "skstego " + row.operation.split(" fit, ")[0]
        peer = "sklearn " + row.peer
        assert mine in table and peer in table, (row, table)
        _check_times(row, table[mine], table[peer])
        pairs.add((mine, peer))
    assert len(pairs) == len(rows) == 3
    assert {
        ("skstego LinearProbe (adam, defaults)", "sklearn LogisticRegression"),
        ("skstego LinearProbe (lbfgs, wd=1/n)", "sklearn LogisticRegression"),
    } <= pairs


def check_hnne(out: str, rows: list, entry: Any) -> None:
    times = dict(
        re.findall(
            r"^(hnne fit_transform|hnne fit \+ transform|HNNEProjector) +([\d.]+) ",
            out,
            M,
        )
    )
    assert len(times) == 3, times
    assert [row.peer for row in rows] == ["hnne fit_transform", "hnne fit + transform"]
    for row in rows:
        _check_times(row, float(times["HNNEProjector"]), float(times[row.peer]))


def check_crf(out: str, rows: list, entry: Any) -> None:
    if importlib.util.find_spec("pydensecrf") is None:  # the peer is missing
        assert "pydensecrf is not installed" in out
        assert [(r.ratio, r.note) for r in rows] == [
            ("n/a", "pydensecrf not installed")
        ]
        return
    wall = r" +([\d.]+) ms/image wall"
    auto = _find(r"^ +skstego auto \((\w+), cpu\)" + wall, out)
    peer = float(_find(r"^ +pydensecrf \(STEGO dense_crf\)" + wall, out)[1]) / 1e3
    lattice = _find(r"^ +skstego torch lattice \(cpu, \d+ thr\)" + wall, out)
    assert len(rows) == 2
    assert f"auto ({auto[1]} on cpu)" in rows[0].operation
    assert "torch lattice" in rows[1].operation
    for row in rows:
        assert row.peer.startswith("pydensecrf")
    _check_times(rows[0], float(auto[2]) / 1e3, peer)
    _check_times(rows[1], float(lattice[1]) / 1e3, peer)


def check_featurize(out: str, rows: list, entry: Any) -> None:
    n = int(_find(r"^== \S+ @ \d+px, (\d+) images, device cpu", out)[1])
    plain = float(
        _find(r"^plain timm loop \(fp32, batch \d+\) +([\d.]+) img/s", out)[1]
    )
    ours = float(_find(r"^DinoFeaturizer \(batch \S+\) +([\d.]+) img/s", out)[1])
    median = _find(r"^median ratio DinoFeaturizer / plain +([\d.]+)x$", out)[1]
    each = _find(r"^ratio of each run +([\d. ]+)$", out)[1].split()
    (row,) = rows
    assert row.peer.startswith("plain timm loop")
    assert _seconds(row.ours) == pytest.approx(n / ours, rel=5.1e-3)
    assert _seconds(row.peer_time) == pytest.approx(n / plain, rel=5.1e-3)
    # the parser shows the script's median ratio (throughput ours / plain)
    assert row.ratio == f"{float(median):.2f}x"
    _ratio_value(row.ratio)
    if len(each) == 1:  # one run: that ratio is the printed rates' ratio
        assert float(median) == pytest.approx(ours / plain, rel=1e-2, abs=5e-3)


def check_stego(out: str, rows: list, entry: Any) -> None:
    plain = float(_find(r"^plain PyTorch loop +([\d.]+) steps/s", out)[1])
    ours = float(_find(r"^StegoProjector +([\d.]+) steps/s", out)[1])
    assert max(plain, ours) < 1e8, "a marginal step time floored at 1e-9 s"
    (row,) = rows
    assert row.peer.startswith("plain PyTorch loop")
    _check_times(row, 1 / ours, 1 / plain)


def check_streaming(out: str, rows: list, entry: Any) -> None:
    (result,) = [
        json.loads(line) for line in out.splitlines() if line.startswith('{"tokens"')
    ]
    keys = [
        k
        for k in ("pca_s", "kmeans_minibatch_s", "kmeans_exact_s")
        if k in result["ours"]
    ]
    assert len(rows) == len(keys) == 3
    for row, key in zip(rows, keys, strict=True):
        assert row.operation.endswith(f", {result['tokens']:,} tokens")
        assert key in result["peers"], key  # every quick contender has its peer
        _check_times(row, result["ours"][key], result["peers"][key])


def check_store(out: str, rows: list, entry: Any) -> None:
    lines = re.findall(r"^ +([\d,]+) +\d+ +[\d.]+ +([\d.]+) +[\d.]+ +\d+ +\d+$", out, M)
    assert len(lines) == len(rows) == 1
    (row,), ((tokens, fit_s),) = rows, lines
    assert row.operation.endswith(f"{tokens} tokens")
    assert _seconds(row.ours) == pytest.approx(float(fit_s), rel=5.1e-3)
    assert float(fit_s) > 0
    # no library reads a FeatureStore: the one row without a peer, by design
    assert row.peer.startswith("none") and row.peer_time == row.ratio == "n/a"


def check_store_reads(out: str, rows: list, entry: Any) -> None:
    result = json.loads(
        [line for line in out.splitlines() if line.startswith('{"tokens"')][-1]
    )
    (row,) = rows
    assert _seconds(row.ours) == pytest.approx(
        result["aligned_s"], rel=5.1e-3, abs=1e-9
    )
    ratio = _ratio_value(row.ratio)
    # the script's own ratio (from unrounded times) ...
    _check_ratio(row.ratio, result["ratio"])
    # ... consistent with its times, which it rounds to 10 ms
    plain, aligned = result["plain_slices_s"], result["aligned_s"]
    if aligned > 0.005:
        assert (plain - 0.005) / (aligned + 0.005) <= ratio + 5e-3
        assert ratio - 5e-3 <= (plain + 0.005) / (aligned - 0.005)


CHECKERS: dict[str, Callable[[str, list, Any], None]] = {
    "pca": check_pca,
    "kmeans": check_kmeans,
    "cluster_metrics": check_cluster_metrics,
    "random_projection": check_random_projection,
    "linear": check_linear,
    "hnne": check_hnne,
    "crf": check_crf,
    "featurize-vits8": check_featurize,
    "featurize-vitb8": check_featurize,
    "stego": check_stego,
    "streaming": check_streaming,
    "store": check_store,
    "store_reads": check_store_reads,
}


def test_every_entry_has_a_checker():
    assert sorted(CHECKERS) == sorted(NAMES)
    assert sorted(SLOW - set(NAMES)) == []


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES],
)
def test_quick_output_parses(name: str, all_entries: dict[str, Any]) -> None:
    entry = all_entries[name]
    missing = [m for m in entry.requires if not RUN_ALL.importable(m)]
    if missing:  # run_all does not run it and lists its rows as n/a
        assert entry.rows_if_missing
        pytest.skip(f"{', '.join(missing)} not installed")
    cmd = RUN_ALL.command(entry, "quick", "cpu")
    if entry.script in RUN_ALL._DEVICE_SCRIPTS:
        assert cmd[-2:] == ["--device", "cpu"]
    env = RUN_ALL._env()
    # Tiny sizes on a shared machine: one thread per library, or idle threads
    # spin-waiting for busy cores turn milliseconds into seconds.
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as run_all reads it
        text=True,
        timeout=entry.timeout["quick"],
    )
    out = done.stdout
    assert done.returncode == 0, out
    rows = entry.parse(out, "quick")
    assert rows, out
    try:
        for row in rows:
            assert row.operation and row.ours != "n/a", row
        CHECKERS[name](out, rows, entry)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- {' '.join(cmd)} ---\n{out}") from exc
