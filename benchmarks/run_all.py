"""Run every benchmark of this folder at a bounded size; one table of ratios.

Each ``bench_*.py`` script runs in its own subprocess (its own timeout, its
log kept), at a size chosen so that the whole run finishes in under 8 minutes
on one H100 (``--device cuda``) or under 10 minutes on a 2-core CPU
(``--device cpu``); ``--quick`` runs three of them (PCA, random projection,
dense CRF) at tiny sizes, in seconds: a dry run of the machinery, not a
measurement. The peers run in the same process as the
skstego side, on the CPU of the same machine (scikit-learn, pydensecrf,
hnne, faiss-cpu for the k-means backend when importable) or, for the
featurizer and the STEGO head, as a plain timm / PyTorch loop on the same
device; so every ratio stands on its own, without a stored baseline. A peer
that is not installed is reported as ``n/a`` (not a failure).

The table (operation, skstego time, peer, peer time, ratio = peer time /
skstego time, so above 1 means skstego is faster; for the featurizer on
CUDA the fraction of the GPU's bf16 peak) is printed and, with ``--out``,
written as Markdown ready for ``benchmarks/RESULTS.md``. Exit status 1 when
a benchmark failed, timed out or printed nothing this script can read.

Run::

    python benchmarks/run_all.py --device cpu --out results-cpu.md
    python benchmarks/run_all.py --device cuda --out results-cuda.md --logs logs/
    python benchmarks/run_all.py --device cpu --quick        # seconds
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: bf16 dense peak of the GPU, TFLOP/s (about 790 measured on an H100).
PEAK_TFLOPS = 790.0
MODES = ("quick", "cpu", "cuda")


@dataclass
class Row:
    """One line of the table."""

    operation: str
    ours: str = "n/a"
    peer: str = "n/a"
    peer_time: str = "n/a"
    ratio: str = "n/a"
    note: str = ""


@dataclass
class Entry:
    """One benchmark script: its arguments per mode and how to read it."""

    name: str
    script: str
    args: dict[str, list[str]]
    parse: Callable[[str, str], list[Row]]
    timeout: dict[str, float]
    requires: tuple[str, ...] = ()
    rows_if_missing: list[str] = field(default_factory=list)
    na_rows: list[str] = field(default_factory=list)
    quick: bool = True


# --------------------------------------------------------------------------
# reading the scripts' output
# --------------------------------------------------------------------------
def _s(seconds: float) -> str:
    """Seconds, printed with a unit that keeps three significant digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _ratio(peer: float, ours: float) -> str:
    """Three significant digits, so a slow contender reads 0.00455x, not 0.00x."""
    if ours <= 0 or peer <= 0:
        return "n/a"  # a time below the printed resolution (quick sizes)
    ratio = peer / ours
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3g}x"


def _float(pattern: str, text: str, group: int = 1) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise ValueError(f"no line matches {pattern!r}")
    return float(match.group(group).replace(",", ""))


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows:
        raise ValueError("no JSON line in the output")
    return rows


def parse_pca(out: str, mode: str) -> list[Row]:
    size = re.search(r"== fit ([\d,]+) x (\d+) float32 -> (\d+)", out)
    ours = _float(r"^TorchPCA\(covariance_eigh\) \[.*?\]\s+([\d.]+) s", out)
    peer = _float(r"^sklearn PCA\(covariance_eigh\)\s+([\d.]+) s", out)
    diff = re.search(r"max rel\. diff explained_variance_ (\S+)", out)
    return [
        Row(
            f"TorchPCA fit, {size[1]} x {size[2]} -> {size[3]}",
            _s(ours),
            'sklearn PCA(svd_solver="covariance_eigh")',
            _s(peer),
            _ratio(peer, ours),
            f"explained variance rel. diff {diff[1]}" if diff else "",
        )
    ]


def parse_kmeans(out: str, mode: str) -> list[Row]:
    head = re.search(r"k-means, (\d+) x (\d+) float32, k=(\d+), (\d+) iterations", out)
    size = f"{int(head[1]):,} x {head[2]}, k={head[3]}"
    peer = re.search(
        r"^sklearn KMeans\s+([\d.]+) ms\s+[\d.]+ ms/iteration\s+inertia \S+\s+"
        r"accuracy (\S+)\s+iterations (\d+)",
        out,
        re.MULTILINE,
    )
    if peer is None:
        raise ValueError("no sklearn KMeans line")
    t_peer = float(peer[1]) / 1e3
    rows = []
    # 1. Lloyd from one shared k-means++ init: the main rows, one per backend
    for match in re.finditer(
        r"^skstego \((\w+)\s*\)\s+([\d.]+) ms\s+[\d.]+ ms/iteration\s+"
        r"inertia \S+\s+accuracy (\S+)\s+iterations (\d+)\s+"
        r"inertia rel\. diff (\S+)",
        out,
        re.MULTILINE,
    ):
        ours = float(match[2]) / 1e3
        rows.append(
            Row(
                f"KMeansProbe Lloyd from a shared k-means++ init, {size}, "
                f"{head[4]} it. ({match[1]} backend)",
                _s(ours),
                "sklearn KMeans (same init)",
                _s(t_peer),
                _ratio(t_peer, ours),
                f"{match[4]} vs {peer[3]} iterations, inertia rel. diff "
                f"{match[5]}, accuracy {match[3]} vs {peer[2]}",
            )
        )
    if not rows:
        raise ValueError("no skstego k-means line")
    # 2. k-means++ seeding (+ 1 Lloyd iteration), each library its own
    t_pp = _float(r"^sklearn kmeans_plusplus\s+([\d.]+) ms", out) / 1e3
    t_peer1 = _float(r"^sklearn KMeans seed\+1\s+([\d.]+) ms", out) / 1e3
    seed = re.search(r"^skstego \((\w+)\s*\) seed\+1\s+([\d.]+) ms", out, re.MULTILINE)
    if seed is None:
        raise ValueError("no skstego seeding line")
    ours1 = float(seed[2]) / 1e3
    rows.append(
        Row(
            f"KMeansProbe k-means++ seeding + 1 Lloyd it., {size} ({seed[1]} backend)",
            _s(ours1),
            'sklearn KMeans(init="k-means++", max_iter=1)',
            _s(t_peer1),
            _ratio(t_peer1, ours1),
            f"sklearn kmeans_plusplus alone {_s(t_pp)}",
        )
    )
    return rows


def parse_cluster_metrics(out: str, mode: str) -> list[Row]:
    rows = []
    section = size = ""
    for line in out.splitlines():
        head = re.match(
            r"== (silhouette_score|Davies-Bouldin).*?([\d,]+) x (\d+)", line
        )
        if head:
            section, size = head[1], f"{head[2]} x {head[3]}"
            continue
        match = re.match(
            r"^(\S.*?)\s+sklearn\s+([\d.]+) s\s+skstego\s+([\d.]+) s\s+ratio", line
        )
        if match is None:
            continue
        peer, ours = float(match[2]), float(match[3])
        name = match[1].strip()
        if section == "silhouette_score":  # "euclidean (20,000 tokens)"
            op, peer_name = f"silhouette_score, {name}", "sklearn silhouette_score"
        else:
            op, peer_name = f"{name}, {size}", f"sklearn {name}"
        rows.append(Row(op, _s(ours), peer_name, _s(peer), _ratio(peer, ours)))
    if not rows:
        raise ValueError("no metric line")
    return rows


def parse_random_projection(out: str, mode: str) -> list[Row]:
    head = re.search(r"X: (\d+) x (\d+) float32 -> (\d+)", out)
    rows = []
    for match in re.finditer(
        r"^(gaussian|sparse)( \*)?\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.MULTILINE
    ):
        peer, ours = float(match[3]), float(match[4])
        cls = "Gaussian" if match[1] == "gaussian" else "Sparse"
        note = "input already on the GPU" if match[2] else ""
        rows.append(
            Row(
                f"RandomProjection({match[1]}) fit_transform, "
                f"{int(head[1]):,} x {head[2]} -> {head[3]}",
                _s(ours),
                f"sklearn {cls}RandomProjection",
                _s(peer),
                _ratio(peer, ours),
                note,
            )
        )
    if not rows:
        raise ValueError("no projection line")
    return rows


def parse_linear(out: str, mode: str) -> list[Row]:
    head = re.search(r"train \((\d+), (\d+)\), test .*?, (\d+) classes", out)
    table = {}
    for match in re.finditer(
        r"^((?:skstego|sklearn) .*?)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", out, re.MULTILINE
    ):
        table[match[1].strip()] = (float(match[2]), float(match[3]))
    pairs = [
        ("skstego LinearProbe (adam, defaults)", "sklearn LogisticRegression"),
        ("skstego LinearProbe (lbfgs, wd=1/n)", "sklearn LogisticRegression"),
        (
            "skstego LinearProbe (adam, defaults)",
            "sklearn StandardScaler+SGDClassifier(5 ep)",
        ),
    ]
    rows = []
    for mine, peer in pairs:
        if mine in table and peer in table:
            (acc, t), (acc_p, t_p) = table[mine], table[peer]
            rows.append(
                Row(
                    f"{mine.removeprefix('skstego ')} fit, {int(head[1]):,} x "
                    f"{head[2]}, {head[3]} classes",
                    _s(t),
                    peer.removeprefix("sklearn "),
                    _s(t_p),
                    _ratio(t_p, t),
                    f"accuracy {acc:.3f} vs {acc_p:.3f}",
                )
            )
    if not rows:
        raise ValueError("no estimator line")
    return rows


def parse_hnne(out: str, mode: str) -> list[Row]:
    head = re.search(r"== ([\d,]+) x (\d+) float32 tokens -> (\d+)", out)
    ours = _float(r"^HNNEProjector\s+([\d.]+)", out)
    rows = []
    for peer_name in ("hnne fit_transform", "hnne fit + transform"):
        peer = _float(rf"^{re.escape(peer_name)}\s+([\d.]+)", out)
        rows.append(
            Row(
                f"HNNEProjector fit_transform, {head[1]} x {head[2]} -> {head[3]}",
                _s(ours),
                peer_name,
                _s(peer),
                _ratio(peer, ours),
            )
        )
    return rows


def parse_crf(out: str, mode: str) -> list[Row]:
    head = re.search(r"(\d+) images (\d+)x\d+, K=(\d+), (\d+) iterations", out)
    op = f"dense CRF, {head[2]}x{head[2]}, K={head[3]}, {head[4]} it., per image"
    rows = []
    auto = re.search(
        r"skstego auto \((\w+), ([\w:]+)\)\s+([\d.]+) ms/image wall", out, re.MULTILINE
    )
    peer = re.search(r"pydensecrf \(STEGO dense_crf\)\s+([\d.]+) ms/image wall", out)
    torch_cpu = re.search(
        r"skstego torch lattice \(cpu, (\d+) thr\)\s+([\d.]+) ms/image wall", out
    )
    if auto is None or peer is None:
        if "pydensecrf is not installed" in out:
            return [Row(op, note="pydensecrf not installed")]
        raise ValueError("no CRF line")
    t_peer = float(peer[1]) / 1e3
    t_auto = float(auto[3]) / 1e3
    rows.append(
        Row(
            f"{op}, auto ({auto[1]} on {auto[2]})",
            _s(t_auto),
            "pydensecrf (STEGO's dense_crf, 1 thread)",
            _s(t_peer),
            _ratio(t_peer, t_auto),
        )
    )
    if torch_cpu is not None:
        t_torch = float(torch_cpu[2]) / 1e3
        rows.append(
            Row(
                f"{op}, torch lattice on the CPU ({torch_cpu[1]} threads)",
                _s(t_torch),
                "pydensecrf (STEGO's dense_crf, 1 thread)",
                _s(t_peer),
                _ratio(t_peer, t_torch),
            )
        )
    return rows


def parse_featurize(out: str, mode: str) -> list[Row]:
    head = re.search(
        r"== (\S+) @ (\d+)px, (\d+) images, device (\S+), ([\d.]+) GFLOP/image", out
    )
    plain = _float(r"^plain timm loop \(fp32, batch \d+\)\s+([\d.]+) img/s", out)
    ours = _float(r"^DinoFeaturizer \(batch \S+\)\s+([\d.]+) img/s", out)
    n = int(head[3])
    ratio = _float(r"^median ratio DinoFeaturizer / plain\s+([\d.]+)x", out)
    peak = re.search(r"= ([\d.]+%) of the", out)
    note = f"{ours:.1f} vs {plain:.1f} images/s"
    if peak:
        note += f"; {peak[1]} of the {PEAK_TFLOPS:.0f} TFLOP/s bf16 peak"
    return [
        Row(
            f"DinoFeaturizer {head[1]} @ {head[2]} px, {n} images",
            _s(n / ours),
            f"plain timm loop (fp32, {head[4]})",
            _s(n / plain),
            f"{ratio:.2f}x",
            note,
        )
    ]


def parse_stego(out: str, mode: str) -> list[Row]:
    head = re.search(r"== training: (\d+) maps of (\d+) x (\d+) x \d+, dim (\d+)", out)
    plain = _float(r"^plain PyTorch loop\s+([\d.]+) steps/s", out)
    ours = _float(r"^StegoProjector\s+([\d.]+) steps/s", out)
    if max(plain, ours) >= 1e8:
        # bench_stego floors a marginal time (long fit - short fit) at 1e-9 s:
        # a rate this high means noise swamped the steps, not a measurement
        raise ValueError("a marginal step time at or below zero: more --steps")
    return [
        Row(
            f"StegoProjector training step, {head[1]} maps {head[2]} x {head[3]}^2 "
            f"-> {head[4]}",
            _s(1 / ours),
            "plain PyTorch loop, same loss and device",
            _s(1 / plain),
            _ratio(1 / plain, 1 / ours),
            "time per step",
        )
    ]


def parse_streaming(out: str, mode: str) -> list[Row]:
    peers = {
        "pca_s": ("TorchPCA streamed fit", "sklearn IncrementalPCA.partial_fit"),
        "kmeans_minibatch_s": (
            "KMeansProbe(minibatch) streamed fit",
            "sklearn MiniBatchKMeans.partial_fit",
        ),
        "kmeans_exact_s": (
            "KMeansProbe exact Lloyd of on-disk tokens (max_samples=None)",
            "sklearn KMeans in memory (same init)",
        ),
    }
    rows = []
    for line in _json_lines(out):
        if "ours" not in line:
            continue
        n = line["tokens"]
        for key, (op, peer_name) in peers.items():
            mine = line["ours"].get(key)
            theirs = line.get("peers", {}).get(key)
            if mine is None:
                continue
            rows.append(
                Row(
                    f"{op}, {n:,} tokens",
                    _s(mine),
                    peer_name,
                    _s(theirs) if theirs else "n/a",
                    _ratio(theirs, mine) if theirs else "n/a",
                )
            )
    if not rows:
        raise ValueError("no streaming result")
    return rows


def parse_store(out: str, mode: str) -> list[Row]:
    rows = []
    for match in re.finditer(
        r"^\s*([\d,]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s*$",
        out,
        re.MULTILINE,
    ):
        rows.append(
            Row(
                f"TorchPCA.fit(FeatureStore), {match[1]} tokens",
                _s(float(match[4])),
                "none (no peer reads a FeatureStore)",
                "n/a",
                "n/a",
                f"peak RSS {match[7]} MiB, {match[5]} ns/token",
            )
        )
    if not rows:
        raise ValueError("no store line")
    return rows


def parse_store_reads(out: str, mode: str) -> list[Row]:
    row = _json_lines(out)[-1]
    return [
        Row(
            f"KMeansProbe.fit(FeatureStore), chunk-aligned reads, "
            f"{row['tokens']:,} tokens",
            _s(row["aligned_s"]),
            "the same fit with unaligned slices",
            _s(row["plain_slices_s"]),
            # the script's ratio, from its unrounded times (it rounds the
            # times to 10 ms, all they have at small sizes)
            _ratio(row["ratio"], 1.0)
            if "ratio" in row
            else _ratio(row["plain_slices_s"], row["aligned_s"]),
            f"store reads {row['aligned_store_reads']} vs {row['plain_store_reads']}",
        )
    ]


# --------------------------------------------------------------------------
# the benchmarks and their sizes
# --------------------------------------------------------------------------
def entries(device: str) -> list[Entry]:
    """Every benchmark with its arguments in each mode (``quick`` runs on
    ``device`` too)."""
    faiss = importable("faiss")
    # k-means: "auto" is the compiled scikit-learn kernel on the CPU (torch
    # on CUDA, already timed as "torch")
    backends = ("auto," if device == "cpu" else "") + (
        "torch,faiss" if faiss else "torch"
    )
    return [
        Entry(
            "pca",
            "bench_pca.py",
            {
                "quick": [
                    "--n",
                    "4000",
                    "--features",
                    "32",
                    "--dim",
                    "4",
                    "--repeats",
                    "1",
                    "--full-n",
                    "1000",
                    "--stream",
                    "",
                ],
                "cpu": [
                    "--n",
                    "200000",
                    "--repeats",
                    "3",
                    "--full-n",
                    "10000",
                    "--stream",
                    "",
                ],
                "cuda": [
                    "--n",
                    "1000000",
                    "--repeats",
                    "3",
                    "--full-n",
                    "50000",
                    "--stream",
                    "",
                ],
            },
            parse_pca,
            {"quick": 60, "cpu": 180, "cuda": 120},
        ),
        Entry(
            "kmeans",
            "bench_kmeans.py",
            {
                "quick": [
                    "--n",
                    "3000",
                    "--features",
                    "8",
                    "--k",
                    "4",
                    "--iters",
                    "2",
                    "--repeats",
                    "1",
                    "--backends",
                    backends,
                ],
                "cpu": [
                    "--n",
                    "300000",
                    "--iters",
                    "20",
                    "--repeats",
                    "3",
                    "--backends",
                    backends,
                ],
                "cuda": [
                    "--n",
                    "1000000",
                    "--iters",
                    "20",
                    "--repeats",
                    "3",
                    "--backends",
                    backends,
                ],
            },
            parse_kmeans,
            {"quick": 60, "cpu": 120, "cuda": 120},
            quick=False,
            na_rows=(
                []
                if faiss
                else ["KMeansProbe Lloyd from a shared k-means++ init (faiss backend)"]
            ),
        ),
        Entry(
            "cluster_metrics",
            "bench_cluster_metrics.py",
            {
                "quick": [
                    "--sil-n",
                    "2000",
                    "--sklearn-max",
                    "2000",
                    "--n",
                    "200000",
                    "--features",
                    "8",
                    "--k",
                    "4",
                    "--repeats",
                    "1",
                ],
                "cpu": [
                    "--sil-n",
                    "10000",
                    "--sklearn-max",
                    "10000",
                    "--n",
                    "300000",
                    "--repeats",
                    "2",
                ],
                "cuda": ["--sil-n", "20000", "--n", "1000000", "--repeats", "3"],
            },
            parse_cluster_metrics,
            {"quick": 60, "cpu": 120, "cuda": 120},
            quick=False,
        ),
        Entry(
            "random_projection",
            "bench_random_projection.py",
            {
                "quick": [
                    "--n",
                    "100000",
                    "--features",
                    "64",
                    "--dim",
                    "4",
                    "--repeat",
                    "1",
                ],
                "cpu": ["--n", "300000", "--repeat", "2"],
                "cuda": ["--n", "1000000", "--repeat", "3"],
            },
            parse_random_projection,
            {"quick": 60, "cpu": 90, "cuda": 90},
        ),
        Entry(
            "linear",
            "bench_linear.py",
            {
                "quick": ["--n", "20000", "--features", "8", "--classes", "3"],
                "cpu": ["--n", "20000"],
                "cuda": ["--n", "200000"],
            },
            parse_linear,
            {"quick": 60, "cpu": 120, "cuda": 120},
            quick=False,
        ),
        Entry(
            "hnne",
            "bench_hnne.py",
            {
                "quick": ["--n", "2000", "--features", "16", "--dim", "4"],
                "cpu": ["--n", "20000"],
                "cuda": ["--n", "100000"],
            },
            parse_hnne,
            {"quick": 120, "cpu": 150, "cuda": 150},
            quick=False,
            requires=("hnne",),
            rows_if_missing=["HNNEProjector fit_transform"],
        ),
        Entry(
            "crf",
            "bench_crf.py",
            {
                "quick": [
                    "--size",
                    "40",
                    "--classes",
                    "4",
                    "--images",
                    "1",
                    "--repeat",
                    "1",
                ],
                "cpu": [
                    "--size",
                    "320",
                    "--classes",
                    "27",
                    "--images",
                    "2",
                    "--repeat",
                    "2",
                ],
                "cuda": [
                    "--size",
                    "320",
                    "--classes",
                    "27",
                    "--images",
                    "8",
                    "--repeat",
                    "3",
                ],
            },
            parse_crf,
            {"quick": 60, "cpu": 120, "cuda": 120},
        ),
        Entry(
            "featurize-vits8",
            "bench_featurize.py",
            {
                "quick": ["--n", "2", "--resolution", "32", "--repeats", "1"],
                "cpu": ["--n", "8", "--resolution", "224", "--repeats", "1"],
                "cuda": ["--n", "1024", "--resolution", "224", "--repeats", "3"],
            },
            parse_featurize,
            {"quick": 60, "cpu": 120, "cuda": 120},
            quick=False,
        ),
        Entry(
            "featurize-vitb8",
            "bench_featurize.py",
            {
                "quick": [
                    "--model",
                    "vit_base_patch8_224",
                    "--n",
                    "1",
                    "--resolution",
                    "16",
                    "--repeats",
                    "1",
                ],
                "cpu": [
                    "--model",
                    "vit_base_patch8_224",
                    "--n",
                    "4",
                    "--resolution",
                    "224",
                    "--repeats",
                    "1",
                ],
                "cuda": [
                    "--model",
                    "vit_base_patch8_224",
                    "--n",
                    "512",
                    "--resolution",
                    "224",
                    "--repeats",
                    "3",
                ],
            },
            parse_featurize,
            {"quick": 60, "cpu": 150, "cuda": 120},
            quick=False,
        ),
        Entry(
            "stego",
            "bench_stego.py",
            {
                "quick": [
                    "--images",
                    "32",
                    "--channels",
                    "16",
                    "--size",
                    "8",
                    "--dim",
                    "4",
                    "--batch",
                    "8",
                    "--steps",
                    "10",
                    "--knn",
                    "",
                ],
                "cpu": ["--steps", "10", "--knn", ""],
                "cuda": [
                    "--images",
                    "2000",
                    "--channels",
                    "768",
                    "--size",
                    "40",
                    "--batch",
                    "32",
                    "--steps",
                    "50",
                    "--knn",
                    "",
                ],
            },
            parse_stego,
            {"quick": 60, "cpu": 150, "cuda": 150},
            quick=False,
        ),
        Entry(
            "streaming",
            "bench_streaming.py",
            {
                "quick": ["--tokens", "2e5", "--exact-up-to", "2e5", "--budget", "30"],
                "cpu": ["--tokens", "2e6", "--exact-up-to", "2e6", "--budget", "100"],
                "cuda": ["--tokens", "1e7", "--exact-up-to", "1e7", "--budget", "100"],
            },
            parse_streaming,
            {"quick": 90, "cpu": 150, "cuda": 150},
            quick=False,
        ),
        Entry(
            "store",
            "bench_store.py",
            {
                "quick": [
                    "--tokens",
                    "6400",
                    "--features",
                    "16",
                    "--grid",
                    "8",
                    "--chunk-images",
                    "16",
                    "--dim",
                    "4",
                ],
                "cpu": ["--tokens", "1000000"],
                "cuda": ["--tokens", "1000000"],
            },
            parse_store,
            {"quick": 60, "cpu": 120, "cuda": 120},
            quick=False,
            requires=("zarr",),
            rows_if_missing=["TorchPCA.fit(FeatureStore)"],
        ),
        Entry(
            "store_reads",
            "bench_store_reads.py",
            {
                "quick": [
                    "--images",
                    "8",
                    "--features",
                    "16",
                    "--grid",
                    "8",
                    "--chunk",
                    "4",
                    "--repeats",
                    "1",
                ],
                "cpu": ["--images", "192", "--repeats", "1"],
                "cuda": ["--images", "192", "--repeats", "1"],
            },
            parse_store_reads,
            {"quick": 60, "cpu": 90, "cuda": 90},
            quick=False,
            requires=("zarr",),
            rows_if_missing=["KMeansProbe.fit(FeatureStore), chunk-aligned reads"],
        ),
    ]


# the scripts that take --device (the others run on the CPU by design)
_DEVICE_SCRIPTS = {
    "bench_pca.py",
    "bench_kmeans.py",
    "bench_cluster_metrics.py",
    "bench_random_projection.py",
    "bench_linear.py",
    "bench_hnne.py",
    "bench_crf.py",
    "bench_featurize.py",
    "bench_stego.py",
    "bench_streaming.py",
}


def importable(module: str) -> bool:
    """Whether ``module`` imports in a fresh interpreter (numba and friends
    may be found yet fail to import)."""
    if importlib.util.find_spec(module) is None:
        return False
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        timeout=120,
        env=_env(),
    )
    return done.returncode == 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return env


def command(entry: Entry, mode: str, device: str) -> list[str]:
    """The command line that runs ``entry`` in ``mode`` on ``device``.

    Parameters
    ----------
    entry : Entry
        The benchmark.
    mode : {"quick", "cpu", "cuda"}
        Which of the entry's argument lists to use.
    device : str
        Passed as ``--device`` to the scripts that take it.

    Returns
    -------
    cmd : list of str
        This interpreter, the script's path and its arguments.
    """
    args = list(entry.args[mode])
    if entry.script in _DEVICE_SCRIPTS:
        args += ["--device", device]
    return [sys.executable, str(HERE / entry.script), *args]


def run_entry(
    entry: Entry, mode: str, device: str, timeout: float, logs: Path
) -> tuple[list[Row], str]:
    """Run one script; its rows and a status (``ok``, ``failed``, ...)."""
    cmd = command(entry, mode, device)
    log = logs / f"{entry.name}.log"
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
        start_new_session=True,  # a timeout ends the script and its children
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    elapsed = time.perf_counter() - start
    log.write_text(f"$ {' '.join(cmd)}\n{out}\n[{status}, {elapsed:.1f} s]\n")
    if status == "ok":
        try:
            rows = entry.parse(out, mode)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            status = f"unreadable output ({exc})"
            rows = []
    else:
        rows = []
    if status != "ok":
        rows = [Row(entry.name, "n/a", note=f"{status}; see {log.name}")]
    return rows, status


def markdown(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| operation | skstego | peer | peer time | ratio | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.operation, r.ours, r.peer, r.peer_time, r.ratio, r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def describe_machine(device: str) -> str:
    try:
        import torch
    except ImportError:
        return f"device {device}"
    parts = [
        f"torch {torch.__version__}",
        f"{os.cpu_count()} CPU cores",
        f"{torch.get_num_threads()} torch threads",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name())
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="ratio = peer time / skstego time (above 1: skstego is faster)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a dry run in seconds"
    )
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument(
        "--logs", default=None, help="folder for each benchmark's log (default: temp)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated benchmark names (default: all)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (default 480 on CUDA, 600 on the CPU, "
        "240 with --quick); benchmarks left when it is spent are skipped",
    )
    args = parser.parse_args(argv)
    device = args.device
    if args.quick:
        mode = "quick"
    elif device.startswith("cuda"):
        mode = "cuda"
    elif device == "cpu":
        mode = "cpu"
    else:
        parser.error(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    budget = args.budget or {"quick": 240.0, "cpu": 600.0, "cuda": 480.0}[mode]
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="run_all_"))
    logs.mkdir(parents=True, exist_ok=True)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    selected = [e for e in entries(device) if not only or e.name in only]
    start = time.perf_counter()
    rows: list[Row] = []
    failures = []
    for entry in selected:
        left = budget - (time.perf_counter() - start)
        if mode == "quick" and not entry.quick:
            rows.append(
                Row(entry.name, note="not run with --quick (a dry run runs three)")
            )
            print(f"[{entry.name}] not run with --quick")
            continue
        missing = [m for m in entry.requires if not importable(m)]
        if missing:
            for op in entry.rows_if_missing or [entry.name]:
                rows.append(Row(op, note=f"n/a: {', '.join(missing)} not installed"))
            print(f"[{entry.name}] skipped: {', '.join(missing)} not installed")
            continue
        if left < 5:
            rows.append(Row(entry.name, note="skipped: the run's time budget is spent"))
            failures.append(entry.name)
            print(f"[{entry.name}] skipped: budget spent")
            continue
        timeout = min(entry.timeout[mode], left)
        t0 = time.perf_counter()
        entry_rows, status = run_entry(entry, mode, device, timeout, logs)
        print(
            f"[{entry.name}] {status} in {time.perf_counter() - t0:.1f} s", flush=True
        )
        rows += entry_rows
        for op in entry.na_rows if status == "ok" else []:
            rows.append(Row(op, note="n/a: faiss not installed"))
        if status != "ok":
            failures.append(entry.name)
    total = time.perf_counter() - start
    header = (
        f"`benchmarks/run_all.py --device {device}{' --quick' if args.quick else ''}`"
        f", {datetime.date.today().isoformat()}, {describe_machine(device)}, "
        f"{platform.machine()}; total {total:.0f} s. ratio = peer time / skstego "
        "time (above 1: skstego is faster)."
    )
    table = markdown(rows, header)
    print()
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    print(f"logs in {logs}")
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
