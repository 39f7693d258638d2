"""RandomProjection vs scikit-learn's random projections: fit + transform time.

Same float32 tokens for everyone; each estimator's ``fit_transform`` (for
scikit-learn that is ``fit`` then ``transform``), best of ``--repeat`` runs after
one warm-up. Prints times and the ratio sklearn / skstego (above 1: skstego is
faster). On a GPU it also times torch input already on the device.

    python benchmarks/bench_random_projection.py --n 1_000_000 --features 384 --dim 70
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.random_projection import GaussianRandomProjection, SparseRandomProjection

from skstego import RandomProjection
from skstego._device import resolve_device


def best_time(fn, repeat: int, sync: bool = False) -> float:
    fn()  # warm-up (allocations, CUDA context, BLAS threads)
    best = float("inf")
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="tokens")
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--dim", type=int, default=70)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    X = rng.standard_normal((args.n, args.features), dtype=np.float32)
    print(
        f"X: {args.n} x {args.features} float32 -> {args.dim}; skstego on {device}; "
        f"torch threads {torch.get_num_threads()}"
    )

    peers = {
        "gaussian": GaussianRandomProjection(args.dim, random_state=args.seed),
        "sparse": SparseRandomProjection(
            args.dim, dense_output=True, random_state=args.seed
        ),
    }
    print(f"{'kind':<10}{'sklearn s':>12}{'skstego s':>12}{'ratio':>8}")
    for kind, peer in peers.items():
        ours = RandomProjection(
            args.dim, kind=kind, device=device, random_state=args.seed
        )
        t_ref = best_time(lambda peer=peer: peer.fit_transform(X), args.repeat)
        t_ours = best_time(
            lambda ours=ours: ours.fit_transform(X),
            args.repeat,
            sync=device.type == "cuda",
        )
        print(f"{kind:<10}{t_ref:>12.3f}{t_ours:>12.3f}{t_ref / t_ours:>8.2f}")

        if device.type == "cuda":
            Xd = torch.from_numpy(X).to(device)
            t_dev = best_time(
                lambda ours=ours, Xd=Xd: ours.fit_transform(Xd), 5, sync=True
            )
            print(
                f"{kind + ' *':<10}{t_ref:>12.3f}{t_dev:>12.3f}"
                f"{t_ref / t_dev:>8.2f}   (* torch input already on {device})"
            )


if __name__ == "__main__":
    main()
