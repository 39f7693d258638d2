"""Streaming fits on synthetic tokens: memory flat from 10M to 1B tokens.

The tokens never exist as a whole, not even on disk: :class:`SyntheticTokens`
is a lazy array-like (``shape``, ``dtype``, ``ndim``, slicing, and the
``_skstego_lazy`` marker of :func:`skstego._device.is_lazy`) whose blocks of
65,536 tokens are made on demand, deterministically and cheaply (a window of
a fixed pool of Gaussian noise plus a window of a pool of ``--clusters``
blob centres, at offsets hashed from the block number: one addition per
value, so that generating a billion tokens costs less than fitting them).
For each token count, fresh subprocesses fit

* ours: ``TorchPCA(dim=8)`` (one streamed covariance pass),
  ``KMeansProbe(algorithm="lloyd", max_samples=...)`` (5 Lloyd iterations on
  a subsample gathered in one streamed pass, ``compute_labels=False``),
  ``KMeansProbe(max_samples=None, max_iter=2)`` (exact Lloyd of all
  tokens, from :func:`exact_init`'s centroids: read once and fitted in
  memory while they fit in a quarter of the free memory, else every
  iteration one streamed pass over all tokens plus the final pass; up to
  ``--exact-up-to`` tokens) and
  ``KMeansProbe(algorithm="minibatch", max_iter=1)`` (one mini-batch pass);
* the peers a user would stream with instead, in their own process:
  scikit-learn's ``IncrementalPCA(8).partial_fit`` and
  ``MiniBatchKMeans(8).partial_fit`` on the same blocks, one pass (no
  streaming peer exists for Lloyd), and, while the tokens fit in 4 GiB,
  scikit-learn's in-memory ``KMeans(8, max_iter=2)`` on all of them, from
  the same centroids (the exact Lloyd a user would run if memory allowed;
  its time excludes materialising the tokens);

and prints each process's resident memory after its imports and at its peak
(``ru_maxrss``), the CUDA peak with ``--device cuda``, the time per token of
each fit and the peer / ours time ratio. A contender whose projected time
(from its previous size) exceeds ``--budget`` seconds is not run; its
projection is printed instead.

Run::

    python benchmarks/bench_streaming.py                         # 1e7,1e8,1e9
    python benchmarks/bench_streaming.py --tokens 1e6,1e7 --budget 60
    python benchmarks/bench_streaming.py --device cuda
    python benchmarks/bench_streaming.py --tokens 1e9 --exact-up-to 1e9 \
        --only kmeans_exact                                      # one contender
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
POOL = 1 << 18
#: Lloyd iterations of the exact (``max_samples=None``) k-means contenders.
EXACT_ITER = 2
#: The in-memory peer of exact Lloyd (scikit-learn's KMeans) runs up to here.
IN_MEMORY_PEER_BYTES = 4 << 30


class SyntheticTokens:
    """(n, d) float32 tokens generated block by block; nothing is stored."""

    _skstego_lazy = True

    def __init__(self, n: int, d: int, clusters: int = 8, seed: int = 0) -> None:
        self.shape = (int(n), int(d))
        self.ndim = 2
        self.dtype = np.dtype(np.float32)
        rng = np.random.default_rng(seed)
        centres = rng.normal(scale=3.0, size=(clusters, d)).astype(np.float32)
        # pools of POOL + BLOCK rows, so that every window is contiguous
        self.noise = rng.standard_normal((POOL + BLOCK, d), dtype=np.float32)
        self.means = centres[rng.integers(clusters, size=POOL + BLOCK)]
        self.seed = seed

    def __len__(self) -> int:
        return self.shape[0]

    def _windows(self, b: int) -> tuple[int, int, int]:
        """Block ``b``: its rows and where its noise and means windows start."""
        rows = min(BLOCK, self.shape[0] - b * BLOCK)
        h = (b * 0x9E3779B97F4A7C15 + self.seed) % (1 << 64)
        return rows, h % POOL, (h >> 20) % POOL

    def _block(self, b: int) -> np.ndarray:
        rows, i, j = self._windows(b)
        return self.noise[i : i + rows] + self.means[j : j + rows]

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
        # One addition per value, straight into the slice's buffer (as a
        # reader fills its buffer from disk): no per-block temporaries.
        out = np.empty((stop - start, self.shape[1]), dtype=np.float32)
        pos = 0
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            lo = max(start - b * BLOCK, 0)
            hi = min(stop - b * BLOCK, BLOCK)
            _, i, j = self._windows(b)
            np.add(
                self.noise[i + lo : i + hi],
                self.means[j + lo : j + hi],
                out=out[pos : pos + hi - lo],
            )
            pos += hi - lo
        return out

    def blocks(self):
        """The blocks in order (what a peer's partial_fit loop reads)."""
        for b in range(-(-self.shape[0] // BLOCK)):
            yield self._block(b)


def exact_init(X: SyntheticTokens, k: int = 8) -> np.ndarray:
    """The initial centroids both sides of the exact Lloyd comparison start
    from: ``k`` tokens spread evenly over ``X`` (with each side's own random
    seeding, one side may meet an empty cluster the other does not, and pay
    for its re-seeding)."""
    return X[np.linspace(0, len(X) - 1, k).astype(np.int64)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(
    n: int, d: int, device: str, max_samples: int, exact_up_to: int, only: str
) -> dict:
    import torch

    from skstego import KMeansProbe, TorchPCA

    X = SyntheticTokens(n, d)
    out = {"rss_before_mib": round(peak_rss_mib(), 1)}
    # Euclidean, as the peers (KMeansProbe's default metric is cosine)
    km = dict(
        k=8, metric="euclidean", compute_labels=False, device=device, random_state=0
    )
    fits = {
        "pca": lambda: TorchPCA(dim=8, device=device),
        "kmeans_lloyd": lambda: KMeansProbe(max_iter=5, max_samples=max_samples, **km),
        "kmeans_exact": lambda: KMeansProbe(
            init=exact_init(X), max_iter=EXACT_ITER, tol=0.0, max_samples=None, **km
        ),
        "kmeans_minibatch": lambda: KMeansProbe(
            algorithm="minibatch", batch_size=BLOCK, max_iter=1, **km
        ),
    }
    # First-call costs (imports of the kernels' modules, thread pools) are
    # paid before timing, as the peers import theirs before theirs.
    warm = np.asarray(X[: 16 * BLOCK // 64])
    KMeansProbe(max_iter=1, max_samples=None, **km).fit(warm)
    for name, make in fits.items():
        if (name == "kmeans_exact" and n > exact_up_to) or (
            only and name not in only.split(",")
        ):
            continue
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        make().fit(X)
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        if device.startswith("cuda"):
            gpu = torch.cuda.max_memory_allocated() / 2**20
            out[f"{name}_gpu_peak_mib"] = round(gpu, 1)
    return out


def peers(n: int, d: int, only: str = "") -> dict:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import IncrementalPCA

    X = SyntheticTokens(n, d)
    out = {"rss_before_mib": round(peak_rss_mib(), 1)}
    wanted = only.split(",") if only else ["pca", "kmeans_minibatch", "kmeans_exact"]
    if "pca" in wanted:
        t0 = time.perf_counter()
        pca = IncrementalPCA(n_components=8)
        for xb in X.blocks():
            pca.partial_fit(xb)
        out["pca_s"] = round(time.perf_counter() - t0, 2)
    if "kmeans_minibatch" in wanted:
        t0 = time.perf_counter()
        km = MiniBatchKMeans(8, batch_size=BLOCK, n_init=1, random_state=0)
        for xb in X.blocks():
            km.partial_fit(xb)
        out["kmeans_minibatch_s"] = round(time.perf_counter() - t0, 2)
    # the in-memory peer of exact Lloyd
    if "kmeans_exact" in wanted and n * d * 4 <= IN_MEMORY_PEER_BYTES:
        from sklearn.cluster import KMeans

        tokens = np.concatenate(list(X.blocks()))
        t0 = time.perf_counter()
        init = exact_init(X)
        KMeans(8, init=init, n_init=1, max_iter=EXACT_ITER, tol=0.0).fit(tokens)
        out["kmeans_exact_s"] = round(time.perf_counter() - t0, 2)
        del tokens
    return out


def child(
    n: int,
    d: int,
    device: str,
    max_samples: int,
    who: str,
    exact_up_to: int,
    only: str,
) -> None:
    if who == "ours":
        out = ours(n, d, device, max_samples, exact_up_to, only)
    else:
        out = peers(n, d, only)
    out.update(tokens=n, who=who, peak_rss_mib=round(peak_rss_mib(), 1))
    print(json.dumps(out), flush=True)


def run(n: int, args: argparse.Namespace, who: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--who", who]
    cmd += ["--features", str(args.features), "--device", args.device]
    cmd += ["--max-samples", str(args.max_samples)]
    cmd += ["--exact-up-to", str(int(float(args.exact_up_to))), "--only", args.only]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1e7,1e8,1e9")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-samples", type=int, default=1_000_000)
    parser.add_argument("--budget", type=float, default=1800.0)
    parser.add_argument("--exact-up-to", default="1e8")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated subset of our contenders (pca, kmeans_lloyd, "
        "kmeans_exact, kmeans_minibatch); only their peers are run",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each side per size, interleaved (ours, peers, ours, "
        "...); the median of each time is reported",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--who", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(
            args.child,
            args.features,
            args.device,
            args.max_samples,
            args.who,
            int(float(args.exact_up_to)),
            args.only,
        )
        return
    rate = {"ours": None, "peers": None}  # seconds per token, last size run
    for n in sorted(int(float(s)) for s in args.tokens.split(",")):
        row = {"tokens": n, "data_float32_gib": round(n * args.features * 4 / 2**30, 2)}
        runs = {"ours": [], "peers": []}
        for _ in range(args.repeat):
            for who in ("ours", "peers"):
                if rate[who] is not None and rate[who] * n > args.budget:
                    row[who] = {"skipped": True, "projected_s": round(rate[who] * n)}
                    continue
                result = run(n, args, who)
                rate[who] = result.pop("wall_s") / n
                runs[who].append(result)
        for who, results in runs.items():
            if results:  # the median of every number over the runs
                row[who] = {
                    key: float(np.median([r[key] for r in results]))
                    if isinstance(results[0][key], (int, float))
                    else results[0][key]
                    for key in results[0]
                }
                if args.repeat > 1:
                    row[who]["runs"] = results
        for key in ("pca_s", "kmeans_minibatch_s", "kmeans_exact_s"):
            mine, theirs = row["ours"].get(key), row["peers"].get(key)
            if mine and theirs:
                row[key.replace("_s", "_ratio")] = round(theirs / mine, 2)
        for who in ("ours", "peers"):
            for key, value in list(row[who].items()):
                if key.endswith("_s") and value:
                    row[who][key.replace("_s", "_ns_per_token")] = round(
                        value / n * 1e9, 1
                    )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
