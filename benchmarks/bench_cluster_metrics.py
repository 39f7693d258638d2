"""skstego's cluster-quality metrics against scikit-learn's.

Part 1 times :func:`skstego.metrics.silhouette_score` against
:func:`sklearn.metrics.silhouette_score` on float32 tokens with ``k`` clusters
(best of ``--repeats``) and prints the ratio sklearn / skstego and the
difference of the scores. scikit-learn's silhouette is quadratic and single
threaded in its per-row reduction, so on ``--sil-n`` larger than
``--sklearn-max`` it runs on the first ``--sklearn-max`` tokens only; skstego
is then timed on both sizes and the ratio is taken on the same tokens.

Part 2 does the same for :func:`~skstego.metrics.davies_bouldin_score` and
:func:`~skstego.metrics.calinski_harabasz_score` on ``--n`` tokens.

Run::

    python benchmarks/bench_cluster_metrics.py                 # CPU: 20k / 1M x 70
    python benchmarks/bench_cluster_metrics.py --device cuda --sil-n 100000
    python benchmarks/bench_cluster_metrics.py --only centroid  # DB and CH only
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn import metrics as skm

from skstego import metrics


def make_tokens(n: int, features: int, k: int, seed: int = 0):
    """Float32 tokens around ``k`` centres (overlapping), and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.5, size=(k, features)).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    X = rng.standard_normal((n, features), dtype=np.float32)
    X += centres[labels]
    return X, labels


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def row(name: str, t_sk: float, t_ours: float, s_sk: float, s_ours: float) -> None:
    print(
        f"{name:<28} sklearn {t_sk:8.3f} s   skstego {t_ours:8.3f} s   "
        f"ratio {t_sk / t_ours:5.1f}x   score {s_sk:.6g}, rel. diff "
        f"{abs(s_sk - s_ours) / abs(s_sk):.1e}"
    )


def silhouette(args) -> None:
    X, y = make_tokens(args.sil_n, args.features, args.k, seed=1)
    m = min(args.sil_n, args.sklearn_max)
    print(
        f"== silhouette_score, {args.sil_n:,} x {args.features} float32, "
        f"k={args.k}, device={args.device} (best of {args.repeats}) =="
    )
    metrics.silhouette_score(X[:500], y[:500], device=args.device)  # warm up
    for metric in ("euclidean", "cosine"):
        t_sk, s_sk = best_time(
            lambda metric=metric: skm.silhouette_score(X[:m], y[:m], metric=metric),
            args.repeats,
        )
        t_ours, s_ours = best_time(
            lambda metric=metric: metrics.silhouette_score(
                X[:m], y[:m], metric=metric, device=args.device
            ),
            args.repeats,
        )
        row(f"{metric} ({m:,} tokens)", t_sk, t_ours, s_sk, s_ours)
        if m < args.sil_n:
            t_all, _ = best_time(
                lambda metric=metric: metrics.silhouette_score(
                    X, y, metric=metric, device=args.device
                ),
                args.repeats,
            )
            print(
                f"{'':<28} skstego on all {args.sil_n:,} tokens: {t_all:.3f} s "
                "(sklearn not run at this size)"
            )


def centroid_scores(args) -> None:
    X, y = make_tokens(args.n, args.features, args.k, seed=2)
    print(
        f"== Davies-Bouldin and Calinski-Harabasz, {args.n:,} x {args.features} "
        f"float32, k={args.k}, device={args.device} (best of {args.repeats}) =="
    )
    metrics.davies_bouldin_score(X[:500], y[:500], device=args.device)  # warm up
    for name in ("davies_bouldin_score", "calinski_harabasz_score"):
        ours, theirs = getattr(metrics, name), getattr(skm, name)
        t_sk, s_sk = best_time(lambda theirs=theirs: theirs(X, y), args.repeats)
        t_ours, s_ours = best_time(
            lambda ours=ours: ours(X, y, device=args.device), args.repeats
        )
        row(name, t_sk, t_ours, s_sk, s_ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sil-n", type=int, default=20_000, help="silhouette tokens")
    parser.add_argument(
        "--sklearn-max",
        type=int,
        default=20_000,
        help="at most this many tokens for scikit-learn's silhouette",
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="DB / CH tokens")
    parser.add_argument("--features", type=int, default=70)
    parser.add_argument("--k", type=int, default=27)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=("silhouette", "centroid"),
        default=None,
        help="run one part only (centroid: Davies-Bouldin and Calinski-Harabasz)",
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CUDA available: {torch.cuda.is_available()}"
    )
    if args.only in (None, "silhouette"):
        silhouette(args)
    if args.only in (None, "centroid"):
        centroid_scores(args)


if __name__ == "__main__":
    main()
