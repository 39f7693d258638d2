"""Streamed k-means from a zarr FeatureStore: chunk-aligned reads vs plain slices.

A store of synthetic float16 maps (``bench_store.py``'s writer) is fitted with
``KMeansProbe(max_samples=None, max_iter=2)``: every Lloyd iteration is a pass
of slices over the store. ``LazyFeatures`` reads the store in whole zarr
chunks and keeps the rows of a chunk beyond the current slice for the next
one; the reference is the same fit with plain slice reads (each slice asks
zarr for its rows, so a chunk that two slices share is decompressed twice),
which is what the streamed fits did before. Both run in this process, one
after the other, on the same store; the script prints both times, the number
of chunk decompressions per pass and the ratio.

Run::

    python benchmarks/bench_store_reads.py
    python benchmarks/bench_store_reads.py --images 256 --chunk 48
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench_store import write


def fit_time(store, aligned: bool, repeats: int) -> tuple[float, int]:
    """Best time of ``repeats`` fits, and the zarr reads of the last one."""
    import skstego._device as device_module
    from skstego import KMeansProbe

    reads = []
    original = type(store).__getitem__

    def counting(self, key):
        reads.append(key)
        return original(self, key)

    best = float("inf")
    saved = device_module.source_chunk_rows
    try:
        if not aligned:
            device_module.source_chunk_rows = lambda source: 1
        type(store).__getitem__ = counting
        for _ in range(repeats):
            reads.clear()
            probe = KMeansProbe(
                k=27,
                init="random",
                max_iter=2,
                tol=0.0,
                max_samples=None,
                compute_labels=False,
                device="cpu",
                random_state=0,
            )
            t0 = time.perf_counter()
            probe.fit(store)
            best = min(best, time.perf_counter() - t0)
    finally:
        device_module.source_chunk_rows = saved
        type(store).__getitem__ = original
    return best, len(reads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from skstego.features import FeatureStore

    folder = Path(tempfile.mkdtemp(prefix="skstego-bench-"))
    try:
        path = str(folder / "maps.zarr")
        write(path, args.images, args.features, args.grid, args.chunk)
        store = FeatureStore(path)
        plain, plain_reads = fit_time(store, aligned=False, repeats=args.repeats)
        aligned, aligned_reads = fit_time(store, aligned=True, repeats=args.repeats)
        tokens = args.images * args.grid * args.grid
        print(
            json.dumps(
                {
                    "tokens": tokens,
                    "features": args.features,
                    "chunk_images": args.chunk,
                    "plain_slices_s": round(plain, 2),
                    "plain_store_reads": plain_reads,
                    "aligned_s": round(aligned, 2),
                    "aligned_store_reads": aligned_reads,
                    "ratio": round(plain / aligned, 2),
                }
            )
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
