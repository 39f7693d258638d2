"""LinearProbe against scikit-learn's softmax regressions.

One synthetic token set shaped like reduced DINO codes: Gaussian class clusters
with unequal class sizes, correlated features with decaying scales and offsets
(as PCA codes have), float32, and a held-out split. Times the fit of

* ``LinearProbe`` with its defaults (mini-batch Adam), and with
  ``solver="lbfgs", weight_decay=1/n`` (the objective of
  ``LogisticRegression(C=1)`` on standardised features),
* ``LogisticRegression`` (defaults, lbfgs) on the raw features, and with a
  ``StandardScaler`` in front (what the scikit-learn docs recommend),
* ``SGDClassifier(loss="log_loss")``, 5 epochs, with a ``StandardScaler``,

and prints each one's held-out accuracy, fit time and the ratio
``sklearn time / skstego time`` (above 1: skstego is faster).

Usage::

    python benchmarks/bench_linear.py --n 200_000 --features 70 --classes 27
    python benchmarks/bench_linear.py --n 20_000 --threads 1   # smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skstego import LinearProbe


def make_codes(
    n: int, n_features: int, n_classes: int, *, sep: float = 0.55, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters, correlated, scaled and shifted like PCA codes."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, 2.0))
    y = rng.choice(n_classes, size=n, p=probs)
    centers = rng.normal(size=(n_classes, n_features)) * sep
    X = centers[y] + rng.normal(size=(n, n_features))
    X = X @ (rng.normal(size=(n_features, n_features)) / np.sqrt(n_features))
    X *= np.geomspace(3.0, 0.3, n_features)
    X += rng.normal(size=n_features)
    return X.astype(np.float32), y


def _sync(device: str) -> None:
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=lambda s: int(s.replace("_", "")), default=200_000)
    parser.add_argument("--features", type=int, default=70)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="limit torch and BLAS threads for every contender (fair timings "
        "on a shared machine)",
    )
    args = parser.parse_args()

    limiter = None
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limiter = threadpool_limits(args.threads)

    n_test = max(1, args.n // 5)
    X, y = make_codes(args.n + n_test, args.features, args.classes, seed=args.seed)
    Xtr, ytr, Xte, yte = X[: args.n], y[: args.n], X[args.n :], y[args.n :]
    print(
        f"train {Xtr.shape}, test {Xte.shape}, {args.classes} classes, "
        f"device={args.device}, torch threads={torch.get_num_threads()}"
    )

    def timed(make, sync=False):
        est = make()
        _sync(args.device) if sync else None
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(Xtr, ytr)
        _sync(args.device) if sync else None
        return est, time.perf_counter() - t0

    # Warm-up (torch kernels, lazy imports) on a slice, not timed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for solver in ("adam", "lbfgs"):
            LinearProbe(solver=solver, device=args.device, max_iter=2).fit(
                Xtr[:2048], ytr[:2048]
            )

    ours = {
        "skstego LinearProbe (adam, defaults)": lambda: LinearProbe(
            device=args.device, random_state=args.seed
        ),
        "skstego LinearProbe (lbfgs, wd=1/n)": lambda: LinearProbe(
            solver="lbfgs", weight_decay=1.0 / args.n, device=args.device
        ),
    }
    peers = {
        "sklearn LogisticRegression": lambda: LogisticRegression(),
        "sklearn StandardScaler+LogisticRegression": lambda: make_pipeline(
            StandardScaler(), LogisticRegression()
        ),
        "sklearn StandardScaler+SGDClassifier(5 ep)": lambda: make_pipeline(
            StandardScaler(),
            SGDClassifier(
                loss="log_loss", max_iter=5, tol=None, random_state=args.seed
            ),
        ),
    }
    rows = {}
    for name, make in {**ours, **peers}.items():
        est, t = timed(make, sync=name in ours)
        last = est[-1] if hasattr(est, "steps") else est
        rows[name] = (est.score(Xte, yte), t, int(np.max(last.n_iter_)))

    print(f"{'estimator':44s} {'accuracy':>8s} {'time s':>8s} {'iters':>6s}")
    for name, (acc, t, iters) in rows.items():
        print(f"{name:44s} {acc:8.4f} {t:8.2f} {iters:6d}")
    print("\nratio = sklearn time / skstego time (above 1: skstego is faster)")
    for mine in ours:
        for peer in peers:
            ratio = rows[peer][1] / rows[mine][1]
            print(f"  {peer:44s} / {mine.removeprefix('skstego '):36s} {ratio:6.2f}")
    if limiter is not None:
        limiter.unregister() if hasattr(limiter, "unregister") else None


if __name__ == "__main__":
    main()
