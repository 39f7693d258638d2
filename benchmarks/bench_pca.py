"""TorchPCA against scikit-learn's PCA, and TorchPCA's streaming memory.

Part 1 fits the same float32 tokens with
``TorchPCA(solver="covariance_eigh")`` and scikit-learn's
``PCA(svd_solver="covariance_eigh")`` and, on a subset when the data are large,
``PCA(svd_solver="full")``; it prints each time (best of ``--repeats``) and the
ratio sklearn / skstego, with the agreement of the explained variances.

Part 2 streams growing numbers of tokens through ``TorchPCA.partial_fit``, each
count in a fresh subprocess, and prints the peak resident memory: it stays flat
as the token count grows, since only one chunk and the float64 statistics are
ever held.

Run::

    python benchmarks/bench_pca.py                      # 1M x 384 -> 70
    python benchmarks/bench_pca.py --data zero-mean     # the same, centred
    python benchmarks/bench_pca.py --n 50000 --stream 100000,200000,400000
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from sklearn.decomposition import PCA

from skstego import TorchPCA


def make_tokens(n: int, features: int, seed: int = 0) -> np.ndarray:
    """Float32 tokens with a decaying spectrum and a DINO-like offset."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, features), dtype=np.float32)
    X *= np.geomspace(3.0, 0.1, features, dtype=np.float32)
    X += rng.uniform(-1.0, 1.0, features).astype(np.float32)
    return X


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def compare(X: np.ndarray, dim: int, device: str, repeats: int, full_n: int) -> None:
    n, d = X.shape
    print(f"== fit {n:,} x {d} float32 -> {dim}  (best of {repeats}) ==")
    # Warm up both (thread pools, LAPACK) so that no timing pays first calls.
    warm = X[: max(10 * d, 2 * dim)]
    PCA(dim, svd_solver="covariance_eigh").fit(warm)
    PCA(dim, svd_solver="full").fit(warm)
    TorchPCA(dim, solver="covariance_eigh", device=device).fit(warm)
    t_sk, sk = best_time(lambda: PCA(dim, svd_solver="covariance_eigh").fit(X), repeats)
    t_tp, tp = best_time(
        lambda: TorchPCA(dim, solver="covariance_eigh", device=device).fit(X),
        repeats,
    )
    err = np.max(np.abs(tp.explained_variance_ - sk.explained_variance_)) / np.max(
        sk.explained_variance_
    )
    print(f"sklearn PCA(covariance_eigh)     {t_sk:8.3f} s")
    print(f"TorchPCA(covariance_eigh) [{device}] {t_tp:8.3f} s")
    print(f"ratio sklearn / skstego          {t_sk / t_tp:8.2f}x")
    print(f"max rel. diff explained_variance_ {err:.1e}")

    m = min(n, full_n)
    Xs = X[:m]
    note = "" if m == n else f" (subset: first {m:,} tokens; full SVD is slow)"
    print(f"-- vs sklearn PCA(svd_solver='full') on {m:,} tokens{note} --")
    t_full, full = best_time(lambda: PCA(dim, svd_solver="full").fit(Xs), repeats)
    t_tps, tps = best_time(
        lambda: TorchPCA(dim, solver="covariance_eigh", device=device).fit(Xs),
        repeats,
    )
    err = np.max(np.abs(tps.explained_variance_ - full.explained_variance_)) / np.max(
        full.explained_variance_
    )
    print(f"sklearn PCA(full)                {t_full:8.3f} s")
    print(f"TorchPCA(covariance_eigh)        {t_tps:8.3f} s")
    print(f"ratio sklearn / skstego          {t_full / t_tps:8.2f}x")
    print(f"max rel. diff explained_variance_ {err:.1e}")


def accuracy_on_offsets(n: int, dim: int) -> None:
    """Float32 data far from the origin: error against a float64 reference.

    scikit-learn's covariance solver forms ``X.T @ X`` in the input's float32
    and subtracts the mean afterwards, so it loses precision as the offset
    grows; TorchPCA shifts each chunk first (the price of one extra pass).
    """
    rng = np.random.default_rng(2)
    base = rng.standard_normal((n, 64)) * np.geomspace(2.0, 0.2, 64)
    k = min(dim, 8)
    print(
        f"== accuracy, {n:,} x 64 float32 -> {k}: max relative error of "
        "explained_variance_ vs float64 sklearn =="
    )
    print(f"{'offset':>8} {'sklearn f32 covariance_eigh':>28} {'TorchPCA':>10}")
    for offset in (0.0, 10.0, 100.0):
        X = (base + offset).astype(np.float32)
        ref = PCA(k, svd_solver="covariance_eigh").fit(X.astype(np.float64))
        sk = PCA(k, svd_solver="covariance_eigh").fit(X)
        tp = TorchPCA(k, solver="covariance_eigh").fit(X)

        def err(p, ref=ref):
            diff = np.abs(p.explained_variance_ - ref.explained_variance_)
            return np.max(diff / ref.explained_variance_)

        print(f"{offset:>8.0f} {err(sk):>28.1e} {err(tp):>10.1e}")


def _status_mib(field: str) -> float | None:
    """A memory field (VmRSS, VmHWM) of /proc/self/status in MiB, if any."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so VmHWM is per phase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stream_child(n: int, features: int, dim: int, chunk: int, device: str) -> None:
    """Stream ``n`` generated tokens through partial_fit; print time and RSS.

    Prints: tokens seen, seconds in partial_fit, RSS before streaming, peak
    RSS while streaming (VmHWM after a reset; else getrusage's lifetime
    peak), and getrusage's lifetime peak (includes importing torch).
    """
    rng = np.random.default_rng(1)
    spectrum = np.geomspace(3.0, 0.1, features, dtype=np.float32)
    pca = TorchPCA(dim, device=device)
    reset = _reset_peak_rss()
    before = _status_mib("VmRSS") or 0.0
    elapsed = 0.0
    for start in range(0, n, chunk):
        batch = rng.standard_normal((min(chunk, n - start), features), dtype=np.float32)
        batch *= spectrum
        t0 = time.perf_counter()
        pca.partial_fit(batch)
        elapsed += time.perf_counter() - t0
        del batch
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    phase = _status_mib("VmHWM") if reset else None
    peak = lifetime if phase is None else phase
    print(f"{pca.n_samples_seen_} {elapsed:.3f} {before:.0f} {peak:.0f} {lifetime:.0f}")


def streaming(sizes, features, dim, chunk, device) -> None:
    batch_mib = chunk * features * 4 / 2**20
    print(
        f"== partial_fit streaming, {features} features -> {dim}, batches of "
        f"{chunk:,} tokens ({batch_mib:.0f} MiB), one subprocess per count =="
    )
    print(
        "(RSS before = resident memory after imports, before streaming; peak = "
        "highest RSS while streaming;\n lifetime = getrusage ru_maxrss, which "
        "includes the transient peak of importing torch)"
    )
    print(
        f"{'tokens':>12} {'data MiB':>9} {'partial_fit s':>14} {'RSS before':>11} "
        f"{'peak':>7} {'peak-before':>12} {'lifetime':>9}"
    )
    for n in sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--stream-child",
                str(n),
                "--features",
                str(features),
                "--dim",
                str(dim),
                "--chunk",
                str(chunk),
                "--device",
                device,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        seen, secs = int(out[0]), float(out[1])
        before, peak, lifetime = (float(v) for v in out[2:5])
        data_mib = seen * features * 4 / 2**20
        print(
            f"{seen:>12,} {data_mib:>9.0f} {secs:>14.2f} {before:>11.0f} "
            f"{peak:>7.0f} {peak - before:>12.0f} {lifetime:>9.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tokens to fit")
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--dim", type=int, default=70)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--full-n",
        type=int,
        default=100_000,
        help="at most this many tokens for sklearn's full SVD",
    )
    parser.add_argument(
        "--stream",
        default="1000000,2000000,4000000",
        help="comma-separated token counts for the streaming section ('' skips)",
    )
    parser.add_argument(
        "--data",
        choices=("offset", "zero-mean"),
        default="offset",
        help="tokens with a DINO-like per-feature offset (default), or the "
        "same tokens centred (TorchPCA then skips its shifted copy)",
    )
    parser.add_argument("--chunk", type=int, default=131_072, help="tokens per batch")
    parser.add_argument(
        "--stream-child", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.stream_child is not None:
        stream_child(
            args.stream_child, args.features, args.dim, args.chunk, args.device
        )
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CUDA available: {torch.cuda.is_available()}"
    )
    X = make_tokens(args.n, args.features)
    if args.data == "zero-mean":
        X -= X.mean(axis=0)
    print(f"data: {args.data}")
    compare(X, args.dim, args.device, args.repeats, args.full_n)
    del X
    accuracy_on_offsets(min(args.n, 100_000), args.dim)
    sizes = [int(s) for s in args.stream.split(",") if s.strip()]
    if sizes:
        streaming(sizes, args.features, args.dim, args.chunk, args.device)


if __name__ == "__main__":
    main()
