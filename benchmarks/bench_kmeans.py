"""KMeansProbe against scikit-learn's KMeans: same data, same work.

Two comparisons on the same float32 Gaussian-blob tokens, Euclidean metric:

1. **Lloyd from one shared initialisation** (the main ratio). One set of
   initial centroids is drawn once, with
   ``sklearn.cluster.kmeans_plusplus(X, k, random_state=seed)``, and passed
   as ``init=`` to both ``sklearn.cluster.KMeans(init=init, n_init=1,
   max_iter=iters, tol=0, algorithm="lloyd")`` and
   ``KMeansProbe(metric="euclidean", init=init, n_init=1, max_iter=iters,
   tol=0)`` (once per ``--backends`` entry: torch, faiss). Both then run the
   same Lloyd iterations (``tol=0``: they stop early only on strict
   convergence, no label change), so each side's ``n_iter_`` and
   ``inertia_`` are printed and should agree (inertia to ~1e-5 relative).
   Timed: ``fit`` alone (for skstego: from host data, device copies
   included), and the time per Lloyd iteration (``fit`` time / ``n_iter_``,
   so it carries the fit's fixed costs too).
2. **k-means++ seeding** (a separate ratio, never mixed with the first).
   ``KMeansProbe`` has no seeding-only call (``max_iter`` must be at least
   1), so the compared work is *k-means++ seeding plus one Lloyd
   iteration*, each library with its own seeding from ``seed``:
   ``KMeans(init="k-means++", n_init=1, max_iter=1, tol=0,
   algorithm="lloyd")`` against ``KMeansProbe(init="k-means++", n_init=1,
   max_iter=1, tol=0)`` with the first backend of ``--backends`` (all
   backends seed with the same torch code). scikit-learn's
   ``kmeans_plusplus`` alone (seeding only) is timed too and printed for
   reference, without a ratio.

Every contender first fits once on a small slice (thread pools, first-call
costs), then the contenders alternate, ``--repeats`` times (sklearn, skstego,
sklearn, ...), so that all see the same load on a shared machine; the
printed times are medians, and the ratio sklearn / skstego (above 1:
skstego is faster) is the median of the per-repeat ratios. Labels are then
matched to the synthetic classes with the Hungarian algorithm on the
training confusion matrix (the same code for both sides, not timed) to show
equal quality.

Usage::

    python benchmarks/bench_kmeans.py                 # 1M x 70, k=27, 20 iterations
    python benchmarks/bench_kmeans.py --n 50000 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from skstego import KMeansProbe
from skstego._device import resolve_device


def make_data(
    n: int, features: int, k: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs in float32 with their blob ids as labels.

    Parameters
    ----------
    n, features, k : int
        Tokens, channels and blobs.
    seed : int, default=0
        Seed of the NumPy generator.

    Returns
    -------
    X : ndarray of shape (n, features), float32
        C-contiguous tokens.
    y : ndarray of shape (n,), int64
        The blob of each token.
    """
    rng = np.random.default_rng(seed)
    # Overlapping blobs: Lloyd keeps moving for all iterations (no early stop).
    centers = rng.normal(scale=0.5, size=(k, features)).astype(np.float32)
    y = rng.integers(0, k, size=n)
    X = centers[y] + rng.normal(size=(n, features)).astype(np.float32)
    return np.ascontiguousarray(X, dtype=np.float32), y.astype(np.int64)


def hungarian_accuracy(y: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Pixel accuracy of ``labels`` after the best one-to-one cluster mapping.

    Parameters
    ----------
    y : ndarray of shape (n,)
        True classes in ``[0, k)``.
    labels : ndarray of shape (n,)
        Cluster ids in ``[0, k)``.
    k : int
        Number of classes and clusters.

    Returns
    -------
    accuracy : float
        Fraction of tokens whose mapped cluster is their class.
    """
    conf = sk_confusion_matrix(y, labels, labels=np.arange(k))
    rows, cols = linear_sum_assignment(conf, maximize=True)
    return float(conf[rows, cols].sum() / conf.sum())


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of ``fn()`` (CUDA work included) and its result.

    Parameters
    ----------
    fn : callable
        Called once without arguments.
    device : torch.device
        skstego's device; CUDA is synchronised before and after.

    Returns
    -------
    seconds : float
        Elapsed wall time.
    result : object
        What ``fn`` returned.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, result


def median_ratio(peer: list[float], ours: list[float]) -> float:
    """Median of the per-repeat ratios ``peer[i] / ours[i]``.

    Parameters
    ----------
    peer, ours : list of float
        Times of the same repeats, in the same order.

    Returns
    -------
    ratio : float
        Above 1: skstego was faster.
    """
    return statistics.median(p / o for p, o in zip(peer, ours, strict=True))


def sklearn_kmeans(init: Any, k: int, iters: int, seed: int) -> KMeans:
    """scikit-learn's Lloyd k-means, one run, ``tol=0``.

    Parameters
    ----------
    init : "k-means++" or ndarray of shape (k, n_features)
        Seeding, or the initial centroids.
    k, iters, seed : int
        Clusters, at most this many Lloyd iterations, seed of the seeding.

    Returns
    -------
    km : KMeans
        Unfitted estimator.
    """
    return KMeans(
        n_clusters=k,
        init=init,
        n_init=1,
        max_iter=iters,
        tol=0,
        algorithm="lloyd",
        random_state=seed,
    )


def skstego_kmeans(
    init: Any, k: int, iters: int, seed: int, backend: str, device: torch.device
) -> KMeansProbe:
    """skstego's Euclidean Lloyd k-means, one run, ``tol=0``, every token.

    Parameters
    ----------
    init : "k-means++" or ndarray of shape (k, n_features)
        Seeding, or the initial centroids.
    k, iters, seed : int
        Clusters, at most this many Lloyd iterations, seed of the seeding.
    backend : {"auto", "torch", "sklearn", "faiss"}
        Lloyd backend.
    device : torch.device
        Where the fit runs.

    Returns
    -------
    probe : KMeansProbe
        Unfitted estimator (``max_samples=None``: no subsampling).
    """
    return KMeansProbe(
        k=k,
        metric="euclidean",
        init=init,
        n_init=1,
        max_iter=iters,
        tol=0,
        max_samples=None,
        backend=backend,
        device=device,
        random_state=seed,
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run both comparisons and print the results.

    Parameters
    ----------
    argv : list of str, default=None
        Command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tokens")
    parser.add_argument("--features", type=int, default=70, help="channels")
    parser.add_argument("--k", type=int, default=27, help="clusters")
    parser.add_argument(
        "--iters", type=int, default=20, help="Lloyd iterations (at most)"
    )
    parser.add_argument("--device", default="auto", help="skstego device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="alternating timed runs of every contender (medians are printed)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for every library (default: their own default)",
    )
    parser.add_argument(
        "--backends",
        default="auto,torch,faiss",
        help="comma-separated skstego backends to time (auto: the compiled "
        "scikit-learn kernel on the CPU, torch on CUDA)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.iters < 1:
        parser.error("--repeats and --iters must be at least 1")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)  # sklearn's OpenMP and BLAS, faiss
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    k, iters, seed = args.k, args.iters, args.seed
    X, y = make_data(args.n, args.features, k, seed)
    print(
        f"k-means, {args.n} x {args.features} float32, k={k}, {iters} iterations, "
        f"1 init, tol=0, {args.repeats} repeats; skstego on {device}, "
        f"torch threads {torch.get_num_threads()}"
    )

    # One initialisation for both sides of the Lloyd comparison.
    init, _ = kmeans_plusplus(X, k, random_state=seed)
    init = np.ascontiguousarray(init, dtype=np.float32)

    # Warm-up: every contender once on a small slice (not timed).
    Xw = X[: min(len(X), max(50 * k, 1000))]
    sklearn_kmeans(init, k, 1, seed).fit(Xw)
    sklearn_kmeans("k-means++", k, 1, seed).fit(Xw)
    for backend in backends:
        skstego_kmeans(init, k, 1, seed, backend, device).fit(Xw)
    skstego_kmeans("k-means++", k, 1, seed, backends[0], device).fit(Xw)

    cpu = torch.device("cpu")
    lloyd: dict[str, list[float]] = {name: [] for name in ["peer", *backends]}
    seeding: dict[str, list[float]] = {"kmeans_plusplus": [], "sklearn": [], "ours": []}
    fitted: dict[str, Any] = {}
    for _ in range(args.repeats):
        km = sklearn_kmeans(init, k, iters, seed)
        t, fitted["peer"] = timed(lambda km=km: km.fit(X), cpu)
        lloyd["peer"].append(t)
        for backend in backends:
            probe = skstego_kmeans(init, k, iters, seed, backend, device)
            t, fitted[backend] = timed(lambda probe=probe: probe.fit(X), device)
            lloyd[backend].append(t)
        t, _ = timed(lambda: kmeans_plusplus(X, k, random_state=seed), cpu)
        seeding["kmeans_plusplus"].append(t)
        km = sklearn_kmeans("k-means++", k, 1, seed)
        t, fitted["seed sklearn"] = timed(lambda km=km: km.fit(X), cpu)
        seeding["sklearn"].append(t)
        probe = skstego_kmeans("k-means++", k, 1, seed, backends[0], device)
        t, fitted["seed ours"] = timed(lambda probe=probe: probe.fit(X), device)
        seeding["ours"].append(t)

    sk = fitted["peer"]
    t_sk = statistics.median(lloyd["peer"])
    print(
        f"== Lloyd from one shared k-means++ init (sklearn.cluster.kmeans_plusplus, "
        f"seed {seed}), median of {args.repeats} alternating runs"
    )
    print(
        f"sklearn KMeans          {t_sk * 1e3:10.2f} ms  "
        f"{t_sk * 1e3 / sk.n_iter_:8.3f} ms/iteration  inertia {sk.inertia_:.7g}  "
        f"accuracy {hungarian_accuracy(y, sk.labels_, k):.4f}  "
        f"iterations {sk.n_iter_}"
    )
    for backend in backends:
        probe = fitted[backend]
        t = statistics.median(lloyd[backend])
        diff = abs(probe.inertia_ - sk.inertia_) / sk.inertia_
        print(
            f"skstego ({backend:7s})       {t * 1e3:10.2f} ms  "
            f"{t * 1e3 / probe.n_iter_:8.3f} ms/iteration  "
            f"inertia {probe.inertia_:.7g}  "
            f"accuracy {hungarian_accuracy(y, probe.labels_, k):.4f}  "
            f"iterations {probe.n_iter_}  inertia rel. diff {diff:.1e}  "
            f"median ratio sklearn/skstego "
            f"{median_ratio(lloyd['peer'], lloyd[backend]):.2f}x"
        )

    sk1, ours1 = fitted["seed sklearn"], fitted["seed ours"]
    t_pp = statistics.median(seeding["kmeans_plusplus"])
    t_sk1 = statistics.median(seeding["sklearn"])
    t_ours1 = statistics.median(seeding["ours"])
    print(
        f"== k-means++ seeding + 1 Lloyd iteration, each library its own seeding "
        f"(seed {seed}), median of {args.repeats} alternating runs"
    )
    print(
        f"sklearn kmeans_plusplus {t_pp * 1e3:10.2f} ms  seeding alone, for "
        "reference (KMeansProbe has no seeding-only call: max_iter >= 1)"
    )
    print(
        f"sklearn KMeans seed+1   {t_sk1 * 1e3:10.2f} ms  inertia {sk1.inertia_:.7g}  "
        f"accuracy {hungarian_accuracy(y, sk1.labels_, k):.4f}  "
        f"iterations {sk1.n_iter_}"
    )
    print(
        f"skstego ({backends[0]:7s}) seed+1 {t_ours1 * 1e3:10.2f} ms  "
        f"inertia {ours1.inertia_:.7g}  "
        f"accuracy {hungarian_accuracy(y, ours1.labels_, k):.4f}  "
        f"iterations {ours1.n_iter_}  median ratio sklearn/skstego "
        f"{median_ratio(seeding['sklearn'], seeding['ours']):.2f}x"
    )


if __name__ == "__main__":
    main()
