"""Streaming fits on synthetic tokens: memory flat as the token count grows.

The tokens never exist as a whole, not even on disk: :class:`SyntheticTokens`
is a lazy array-like (``shape``, ``dtype``, ``ndim``, slicing, and the
``_skstego_lazy`` marker of :func:`skstego._device.is_lazy`) whose slices are
generated on demand, deterministically, block by block (a mixture of
``--clusters`` Gaussian blobs). For each token count a fresh subprocess fits

* ``TorchPCA(dim=8)`` (streamed covariance pass),
* ``KMeansProbe(algorithm="lloyd", max_samples=...)`` on a subsample gathered
  in one streamed pass, ``compute_labels=False`` (no O(n) label array),
* ``KMeansProbe(algorithm="minibatch", max_iter=1)``: one mini-batch pass,

and prints its peak resident memory (``ru_maxrss``), the CUDA peak with
``--device cuda``, and the time per token of each fit. Sizes whose projected
run time exceeds ``--budget`` seconds are not run; their projected time is
printed instead (from the largest size run).

Run::

    python benchmarks/bench_streaming.py --tokens 1e6,1e7,3e7 --device cpu
    python benchmarks/bench_streaming.py --tokens 1e7,1e8,1e9 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

BLOCK = 1 << 16


class SyntheticTokens:
    """(n, d) float32 tokens generated block by block; nothing is stored."""

    _skstego_lazy = True

    def __init__(self, n: int, d: int, clusters: int = 8, seed: int = 0) -> None:
        self.shape = (int(n), int(d))
        self.ndim = 2
        self.dtype = np.dtype(np.float32)
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.centres = rng.normal(scale=3.0, size=(clusters, d)).astype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def _block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, b])
        rows = min(BLOCK, self.shape[0] - b * BLOCK)
        x = rng.standard_normal((rows, self.shape[1]), dtype=np.float32)
        x += self.centres[rng.integers(len(self.centres), size=rows)]
        return x

    def __getitem__(self, key):
        if isinstance(key, tuple):
            key = key[0]
        if not isinstance(key, slice):  # integer arrays: gather block by block
            idx = np.asarray(key).reshape(-1)
            out = np.empty((idx.size, self.shape[1]), dtype=np.float32)
            blocks = idx // BLOCK
            for b in np.unique(blocks):
                sel = blocks == b
                out[sel] = self._block(int(b))[idx[sel] - b * BLOCK]
            return out
        start, stop, _ = key.indices(self.shape[0])
        if stop <= start:
            return np.empty((0, self.shape[1]), dtype=np.float32)
        parts = []
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            lo = max(start - b * BLOCK, 0)
            hi = min(stop - b * BLOCK, BLOCK)
            parts.append(self._block(b)[lo:hi])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n: int, d: int, device: str, max_samples: int) -> None:
    import torch

    from skstego import KMeansProbe, TorchPCA

    X = SyntheticTokens(n, d)
    base = peak_rss_mib()
    out = {"tokens": n, "features": d, "rss_before_mib": round(base, 1)}
    fits = {
        "pca": lambda: TorchPCA(dim=8, device=device),
        "kmeans_lloyd": lambda: KMeansProbe(
            k=8,
            max_iter=5,
            max_samples=max_samples,
            compute_labels=False,
            device=device,
            random_state=0,
        ),
        "kmeans_minibatch": lambda: KMeansProbe(
            k=8,
            algorithm="minibatch",
            batch_size=65536,
            max_iter=1,
            compute_labels=False,
            device=device,
            random_state=0,
        ),
    }
    for name, make in fits.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        make().fit(X)
        dt = time.perf_counter() - t0
        out[f"{name}_s"] = round(dt, 2)
        out[f"{name}_ns_per_token"] = round(dt / n * 1e9, 2)
        if device.startswith("cuda"):
            gpu = torch.cuda.max_memory_allocated() / 2**20
            out[f"{name}_gpu_peak_mib"] = round(gpu, 1)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    out["data_float32_mib"] = round(n * d * 4 / 2**20, 1)
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1e6,1e7,3e7")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-samples", type=int, default=1_000_000)
    parser.add_argument("--budget", type=float, default=900.0)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.features, args.device, args.max_samples)
        return
    rate = None  # seconds per token of the largest size run
    for n in sorted(int(float(s)) for s in args.tokens.split(",")):
        if rate is not None and rate * n > args.budget:
            print(
                json.dumps(
                    {"tokens": n, "skipped": True, "projected_s": round(rate * n)}
                ),
                flush=True,
            )
            continue
        cmd = [sys.executable, __file__, "--child", str(n)]
        cmd += ["--features", str(args.features), "--device", args.device]
        cmd += ["--max-samples", str(args.max_samples)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        rate = (time.perf_counter() - t0) / n


if __name__ == "__main__":
    main()
