"""KMeansProbe against scikit-learn's KMeans: same data, same work.

Both fit Euclidean k-means on the same float32 tokens from one k-means++
initialisation for a fixed number of Lloyd iterations (``tol=0``), then map
clusters to the synthetic classes with the Hungarian algorithm on the training
confusion matrix. skstego runs once per backend (torch, faiss). Prints the
times and the ratio sklearn / skstego (above 1: skstego is faster), plus the
inertia and the Hungarian pixel accuracy of each, to show equal quality.

Usage::

    python benchmarks/bench_kmeans.py                 # 1M x 70, k=27, 20 iterations
    python benchmarks/bench_kmeans.py --n 50000       # smoke run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from skstego import KMeansProbe
from skstego._device import resolve_device


def make_data(n: int, features: int, k: int, seed: int = 0):
    """Gaussian blobs in float32 with their blob ids as labels."""
    rng = np.random.default_rng(seed)
    # Overlapping blobs: Lloyd keeps moving for all iterations (no early stop).
    centers = rng.normal(scale=0.5, size=(k, features)).astype(np.float32)
    y = rng.integers(0, k, size=n)
    X = centers[y] + rng.normal(size=(n, features)).astype(np.float32)
    return np.ascontiguousarray(X, dtype=np.float32), y.astype(np.int64)


def run_sklearn(X, y, k, iters, seed):
    t0 = time.perf_counter()
    km = KMeans(
        n_clusters=k,
        n_init=1,
        max_iter=iters,
        tol=0,
        algorithm="lloyd",
        random_state=seed,
    ).fit(X)
    conf = sk_confusion_matrix(y, km.labels_, labels=np.arange(k))
    rows, cols = linear_sum_assignment(conf, maximize=True)
    elapsed = time.perf_counter() - t0
    accuracy = conf[rows, cols].sum() / conf.sum()
    return elapsed, km.inertia_, accuracy, km.n_iter_


def run_skstego(X, y, k, iters, seed, backend, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    probe = KMeansProbe(
        k=k,
        metric="euclidean",
        n_init=1,
        max_iter=iters,
        tol=0,
        backend=backend,
        device=device,
        random_state=seed,
    ).fit(X, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    accuracy = float(np.mean(probe.mapping_[probe.labels_] == y))
    return elapsed, probe.inertia_, accuracy, probe.n_iter_


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tokens")
    parser.add_argument("--features", type=int, default=70, help="channels")
    parser.add_argument("--k", type=int, default=27, help="clusters")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations")
    parser.add_argument("--device", default="auto", help="skstego device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every library (default: their own default)",
    )
    parser.add_argument(
        "--backends",
        default="torch,faiss",
        help="comma-separated skstego backends to time",
    )
    args = parser.parse_args(argv)

    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)  # sklearn's OpenMP and BLAS, faiss
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    X, y = make_data(args.n, args.features, args.k, args.seed)
    print(
        f"k-means, {args.n} x {args.features} float32, k={args.k}, "
        f"{args.iters} iterations, 1 init, tol=0; skstego on {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    t_sk, inertia_sk, acc_sk, it_sk = run_sklearn(X, y, args.k, args.iters, args.seed)
    print(
        f"sklearn KMeans        {t_sk:8.3f} s  inertia {inertia_sk:.6g}  "
        f"accuracy {acc_sk:.4f}  iterations {it_sk}"
    )
    for backend in args.backends.split(","):
        t, inertia, acc, it = run_skstego(
            X, y, args.k, args.iters, args.seed, backend, device
        )
        print(
            f"skstego ({backend:5s})       {t:8.3f} s  inertia {inertia:.6g}  "
            f"accuracy {acc:.4f}  iterations {it}  ratio sklearn/skstego "
            f"{t_sk / t:.2f}"
        )


if __name__ == "__main__":
    main()
