"""HNNEProjector against calling hnne.HNNE directly, on the same tokens.

Every side runs in a fresh subprocess on the same generated float32 tokens
(N x 384, a mixture of clusters like DINO tokens), after a warm-up fit that
compiles hnne's numba kernels, and prints its time and peak resident memory:

* ``hnne fit_transform``: ``hnne.HNNE(...).fit_transform(X)``, hnne's training
  layout (what a user of hnne would call);
* ``hnne fit + transform``: ``fit(X)`` then ``transform(X)``, the function
  HNNEProjector computes (its out-of-sample projection of every token);
* ``HNNEProjector``: ``HNNEProjector(...).fit_transform(X)``, the hnne fit
  plus the torch projection on ``--device``.

The ratios are hnne time / skstego time. Peak RSS is the kernel's high-water
mark while the timed call runs (VmHWM after a reset), with the resident memory
before it.

Run::

    python benchmarks/bench_hnne.py               # 1M x 384 -> 70, the study's size
    python benchmarks/bench_hnne.py --n 100000 --repeat 3   # interleaved, median
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

SIDES = ("hnne fit_transform", "hnne fit + transform", "HNNEProjector")


def make_tokens(n: int, features: int, seed: int = 0) -> np.ndarray:
    """Float32 tokens: 200 cluster modes, anisotropic noise, a common offset."""
    rng = np.random.default_rng(seed)
    modes = rng.standard_normal((200, features), dtype=np.float32) * 2.0
    X = modes[rng.integers(0, len(modes), n)]
    noise = rng.standard_normal((n, features), dtype=np.float32)
    noise *= np.geomspace(1.5, 0.2, features, dtype=np.float32)
    X += noise
    X += rng.uniform(0.0, 1.0, features).astype(np.float32)
    return X


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_side(side: str, X: np.ndarray, dim: int, device: str, seed: int):
    from hnne import HNNE

    from skstego import HNNEProjector

    if side == "hnne fit_transform":
        return HNNE(n_components=dim, random_state=seed).fit_transform(X)
    if side == "hnne fit + transform":
        model = HNNE(n_components=dim, random_state=seed)
        model.fit(X)
        return model.transform(X)
    proj = HNNEProjector(dim, max_fit_samples=None, device=device, random_state=seed)
    out = proj.fit_transform(X)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def child(side: str, n: int, features: int, dim: int, device: str) -> None:
    """Time one side in this process; print seconds, RSS before and peak."""
    warnings.simplefilter("ignore")
    X = make_tokens(n, features)
    # Warm-up: compile numba (pynndescent above hnne's 20 000-token threshold).
    warm = make_tokens(min(n, 25_000), features, seed=1)
    run_side(side, warm, dim, device, seed=0)
    del warm
    reset = _reset_peak_rss()
    before = _status_mib("VmRSS") or 0.0
    t0 = time.perf_counter()
    out = run_side(side, X, dim, device, seed=0)
    elapsed = time.perf_counter() - t0
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = _status_mib("VmHWM") if reset else None
    assert out.shape == (n, dim)
    print(f"{elapsed:.3f} {before:.0f} {lifetime if peak is None else peak:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tokens")
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--dim", type=int, default=70)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of every side, interleaved; the median time is reported",
    )
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help="comma-separated sides to run (HNNEProjector always runs)",
    )
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side is not None:
        child(args.side, args.n, args.features, args.dim, args.device)
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CUDA available: {torch.cuda.is_available()}, device={args.device}"
    )
    print(
        f"== {args.n:,} x {args.features} float32 tokens -> {args.dim}, one "
        "subprocess per side =="
    )
    print(f"{'side':<22} {'seconds':>9} {'RSS before MiB':>15} {'peak MiB':>9}")
    sides = [s for s in SIDES if s in args.sides.split(",") or s == SIDES[-1]]
    times = {side: [] for side in sides}
    for _ in range(args.repeat):
        for side in sides:
            cmd = [sys.executable, __file__, "--side", side, "--n", str(args.n)]
            cmd += ["--features", str(args.features), "--dim", str(args.dim)]
            cmd += ["--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            secs, before, peak = (float(v) for v in out.stdout.split()[-3:])
            times[side].append(secs)
            print(f"{side:<22} {secs:>9.2f} {before:>15.0f} {peak:>9.0f}", flush=True)
    results = {side: float(np.median(t)) for side, t in times.items()}
    if args.repeat > 1:
        for side in sides:
            print(f"median {side:<15} {results[side]:>9.2f}")
    ours = results["HNNEProjector"]
    for side in sides[:-1]:
        print(f"ratio {side} / HNNEProjector: {results[side] / ours:.2f}x")


if __name__ == "__main__":
    main()
