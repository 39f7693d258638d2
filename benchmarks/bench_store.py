"""TorchPCA fitted from a zarr FeatureStore: peak memory stays flat in the size.

For each token count, a fresh subprocess writes a store of synthetic feature
maps (a decaying spectrum plus a DINO-like offset, ``--grid`` x ``--grid``
tokens per image) chunk by chunk through the same writer as
``DinoFeaturizer.transform_to_store``, so the maps never exist in memory as a
whole. Another fresh subprocess then opens the store and fits
``TorchPCA(solver="covariance_eigh")`` on it (the store itself, read chunk by
chunk with prefetch) and prints its peak resident memory (``ru_maxrss``) next
to the size of the data as float32, with the time per token. The peak stays
flat as the token count grows, far below the data's size.

Run::

    python benchmarks/bench_store.py                      # 1M, 4M, 16M x 384
    python benchmarks/bench_store.py --tokens 250000,1000000 --features 64
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class SyntheticFeaturizer:
    """Stands in for DinoFeaturizer: deterministic maps for images start:stop."""

    def __init__(self, features: int, grid: int) -> None:
        self.features, self.grid = features, grid

    def get_params(self, deep: bool = False) -> dict:
        return {"model": "synthetic", "features": self.features, "grid": self.grid}

    def _validate_params(self) -> None:
        pass

    def transform(self, images) -> np.ndarray:
        rng = np.random.default_rng(images.start)
        c, g = self.features, self.grid
        X = rng.standard_normal((len(images), g, g, c), dtype=np.float32)
        X *= np.geomspace(3.0, 0.1, c, dtype=np.float32)
        X += np.random.default_rng(0).uniform(-1.0, 1.0, c).astype(np.float32)
        return X.transpose(0, 3, 1, 2)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(path: str, n_images: int, features: int, grid: int, chunk: int) -> None:
    from skstego.features._store import write_store

    t0 = time.perf_counter()
    write_store(
        SyntheticFeaturizer(features, grid),
        range(n_images),
        path,
        dtype="float16",
        chunk_images=chunk,
        overwrite=True,
    )
    print(json.dumps({"write_s": time.perf_counter() - t0, "rss": peak_rss_mib()}))


def fit(path: str, dim: int) -> None:
    import torch

    from skstego import FeatureStore, TorchPCA

    torch.set_num_threads(torch.get_num_threads())  # load torch's pools first
    store = FeatureStore(path)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    pca = TorchPCA(dim=dim, solver="covariance_eigh", device="cpu").fit(store)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "fit_s": seconds,
                "base": base,
                "rss": peak_rss_mib(),
                "n": int(pca.n_samples_seen_),
                "ev0": float(pca.explained_variance_[0]),
            }
        )
    )


def run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1000000,4000000,16000000")
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--grid", type=int, default=28, help="tokens per side")
    parser.add_argument("--chunk-images", type=int, default=64)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dir", default=None, help="where stores are written")
    parser.add_argument("--_write", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_fit", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write:
        path, n_images, chunk, _ = args._write
        write(path, int(n_images), args.features, args.grid, int(chunk))
        return
    if args._fit:
        fit(args._fit, args.dim)
        return

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_store_"))
    per_image = args.grid * args.grid
    print(
        f"TorchPCA(dim={args.dim}).fit(FeatureStore) on CPU, {args.features} "
        f"features, {per_image} tokens/image, float16 store, "
        f"chunk_images={args.chunk_images}; each step in a fresh process"
    )
    print(
        f"{'tokens':>11} {'f32 data MiB':>12} {'write s':>8} {'fit s':>7} "
        f"{'ns/token':>9} {'RSS before MiB':>14} {'peak RSS MiB':>12}"
    )
    for tokens in (int(t) for t in args.tokens.split(",")):
        n_images = max(1, tokens // per_image)
        path = str(root / f"store_{tokens}.zarr")
        w = run(
            "--features", str(args.features), "--grid", str(args.grid),
            "--_write", path, str(n_images), str(args.chunk_images), "x",
        )  # fmt: skip
        f = run(
            "--features", str(args.features), "--grid", str(args.grid),
            "--dim", str(args.dim), "--_fit", path,
        )  # fmt: skip
        n = f["n"]
        print(
            f"{n:>11,} {n * args.features * 4 / 2**20:>12.0f} {w['write_s']:>8.1f} "
            f"{f['fit_s']:>7.2f} {f['fit_s'] / n * 1e9:>9.1f} {f['base']:>14.0f} "
            f"{f['rss']:>12.0f}",
            flush=True,
        )
        shutil.rmtree(path, ignore_errors=True)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
