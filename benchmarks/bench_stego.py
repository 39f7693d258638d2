"""StegoProjector training against a plain PyTorch loop, and K-NN memory.

Part 1 trains the STEGO head on the same feature maps twice: with
``StegoProjector.fit`` and with a plain PyTorch loop written the way the STEGO
reference code is organised (``nn.Conv2d`` head with ``Dropout2d``,
``grid_sample`` sampling, each negative read from the permuted full maps,
einsum correlations, a full N x N similarity matrix for the K-NN positives,
the loss read back with ``.item()`` at every step). Both run the same loss
(Hamilton et al., ICLR 2022, section 3) with the same hyperparameters; the
script prints steps/s of each and the ratio.

Part 2 measures the peak resident memory of the K-NN step as the number of
images grows, each count in a fresh subprocess: skstego's chunked search
(:func:`skstego.projection._knn.nearest_neighbors`) against the N x N matrix of
the plain approach (run only up to ``--naive-max`` images; beyond, the matrix
alone is printed as what it would need).

Run::

    python benchmarks/bench_stego.py                       # CPU defaults
    python benchmarks/bench_stego.py --device cuda --images 2000 --channels 768 \\
        --size 40 --batch 32 --steps 200                   # ViT-B/8 at 320 px
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skstego import StegoProjector

# The active ViT-S/8 settings of the reference's train_config.yml (STEGO's
# src/configs), which are StegoProjector's defaults.
W_INTRA, W_INTER, W_NEG = 0.67, 0.25, 0.63
B_INTRA, B_INTER, B_NEG = 0.18, 0.12, 0.46
SAMPLES, NEG_SAMPLES, NEIGHBORS = 11, 5, 7


# ---------------------------------------------------------------- plain loop
class PlainHead(nn.Module):
    def __init__(self, c: int, dim: int) -> None:
        super().__init__()
        self.drop1, self.drop2 = nn.Dropout2d(0.1), nn.Dropout2d(0.1)
        self.linear = nn.Conv2d(c, dim, 1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop1(x)) + self.nonlinear(self.drop2(x))


def plain_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(
        maps, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True
    )


def plain_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum(
        "nchw,ncij->nhwij", F.normalize(a, dim=1), F.normalize(b, dim=1)
    )


def plain_term(f1, f2, c1, c2, shift):
    with torch.no_grad():
        fd = plain_corr(f1, f2)
        old_mean = fd.mean()
        fd = fd - fd.mean(dim=(3, 4), keepdim=True) + old_mean
    cd = plain_corr(c1, c2)
    return (-cd.clamp(min=0) * (fd - shift)).mean()


def plain_train(X: np.ndarray, dim: int, steps: int, batch: int, device) -> float:
    """The loop, timed from the K-NN step to the last optimiser step."""
    gen = torch.Generator().manual_seed(0)
    n, c = X.shape[:2]
    t0 = time.perf_counter()
    pooled = F.normalize(torch.from_numpy(X).mean(dim=(2, 3)), dim=1).to(device)
    sims = pooled @ pooled.T  # the N x N matrix
    knn = torch.topk(sims, 30, dim=1).indices[:, 1:].cpu()
    del sims
    head = PlainHead(c, dim).to(device).train()
    opt = torch.optim.Adam(head.parameters(), lr=5e-4)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        pos = knn[idx, torch.randint(NEIGHBORS, (batch,), generator=gen)]
        f1 = torch.from_numpy(X[idx.numpy()]).to(device)
        f2 = torch.from_numpy(X[pos.numpy()]).to(device)
        c1, c2 = head(f1), head(f2)
        co1 = torch.rand(batch, SAMPLES, SAMPLES, 2, device=device) * 2 - 1
        co2 = torch.rand(batch, SAMPLES, SAMPLES, 2, device=device) * 2 - 1
        s1, s2 = plain_sample(f1, co1), plain_sample(f2, co2)
        k1, k2 = plain_sample(c1, co1), plain_sample(c2, co2)
        loss = W_INTRA * plain_term(s1, s1, k1, k1, B_INTRA)
        loss = loss + W_INTER * plain_term(s1, s2, k1, k2, B_INTER)
        neg = 0.0
        for _ in range(NEG_SAMPLES):
            perm = torch.randperm(batch, generator=gen).to(device)
            sn, kn = plain_sample(f1[perm], co2), plain_sample(c1[perm], co2)
            neg = neg + plain_term(s1, sn, k1, kn, B_NEG)
        loss = loss + W_NEG * neg / NEG_SAMPLES
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # logged every step
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def skstego_train(X: np.ndarray, dim: int, steps: int, batch: int, device) -> float:
    # the plain loop correlates clean features: compare the same work
    est = StegoProjector(
        dim,
        n_steps=steps,
        batch_size=batch,
        feature_dropout=False,
        device=device,
        random_state=0,
    )
    t0 = time.perf_counter()
    est.fit(X)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    X = rng.standard_normal(
        (args.images, args.channels, args.size, args.size), dtype=np.float32
    )
    X += rng.uniform(0, 1, (1, args.channels, 1, 1)).astype(np.float32)
    print(
        f"== training: {args.images} maps of {args.channels} x {args.size} x "
        f"{args.size}, dim {args.dim}, batch {args.batch}, {args.steps} steps, "
        f"{device} =="
    )
    # warm-up (allocator, kernels)
    plain_train(X[: 4 * args.batch], args.dim, 2, args.batch, device)
    skstego_train(X[: 4 * args.batch], args.dim, 2, args.batch, device)
    # Marginal rate: time fits of s and 2s steps; their difference is s
    # training steps, free of the one-off setup (validation, K-NN step).
    # The two alternate (plain, skstego, plain, ...) so that both see the
    # same load on a shared machine; one ratio per repeat, and their median.
    with open("/proc/loadavg") as f:
        print("load average before:", " ".join(f.read().split()[:3]))
    rates = {"plain": [], "skstego": []}
    setups = {"plain": [], "skstego": []}
    for _ in range(max(1, args.repeats)):
        for name, train in (("plain", plain_train), ("skstego", skstego_train)):
            short = train(X, args.dim, args.steps, args.batch, device)
            long = train(X, args.dim, 2 * args.steps, args.batch, device)
            rates[name].append(args.steps / max(long - short, 1e-9))
            setups[name].append(max(2 * short - long, 0.0))
    for label, name in (("plain PyTorch loop", "plain"), ("StegoProjector", "skstego")):
        print(
            f"{label:<19} {max(rates[name]):8.2f} steps/s (best)   setup "
            f"{min(setups[name]):6.2f} s"
        )
    ratios = [s / p for s, p in zip(rates["skstego"], rates["plain"], strict=True)]
    print("ratio of each repeat:", " ".join(f"{r:.2f}" for r in ratios))
    print(
        "median ratio (skstego steps/s / plain steps/s): "
        f"{statistics.median(ratios):.2f}x"
    )
    with open("/proc/loadavg") as f:
        print("load average after:", " ".join(f.read().split()[:3]))


# ----------------------------------------------------------------- K-NN memory
def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _knn_child(n: int, features: int, naive: bool) -> None:
    base = _rss_kib()
    rng = np.random.default_rng(0)
    D = rng.standard_normal((n, features), dtype=np.float32)
    after_data = _rss_kib()
    t0 = time.perf_counter()
    if naive:
        Dt = F.normalize(torch.from_numpy(D), dim=1)
        torch.topk(Dt @ Dt.T, 31, dim=1)
    else:
        from skstego.projection._knn import nearest_neighbors

        nearest_neighbors(D, 30, backend="torch", device="cpu")
    dt = time.perf_counter() - t0
    # ru_maxrss is the process peak (KiB on Linux); the search's own buffers
    # are what it adds above the current footprint with the data loaded
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = max(0, peak - after_data)
    print(f"{(after_data - base) / 1024:.0f} {extra / 1024:.0f} {dt:.1f}")


def knn_memory(sizes: list[int], features: int, naive_max: int) -> None:
    print(f"== K-NN step memory, {features}-d descriptors, top 30 ==")
    print(
        f"{'images':>9} {'method':>8} {'data MiB':>9} {'extra peak MiB':>15} {'s':>6}"
    )
    for n in sizes:
        for naive in (False, True):
            name = "N x N" if naive else "chunked"
            if naive and n > naive_max:
                need = n * n * 4 / 2**20
                print(
                    f"{n:>9,} {name:>8} {'':>9} {need:>15,.0f} (matrix alone, not run)"
                )
                continue
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--knn-child",
                    str(n),
                    str(features),
                    str(int(naive)),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            print(
                f"{n:>9,} {name:>8} {float(out[0]):>9,.0f} {float(out[1]):>15,.0f} "
                f"{float(out[2]):>6.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--dim", type=int, default=70)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating timed pairs of fits"
    )
    parser.add_argument(
        "--knn",
        default="10000,30000,100000",
        help="comma-separated image counts for the K-NN memory part",
    )
    parser.add_argument("--naive-max", type=int, default=30000)
    parser.add_argument("--knn-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.knn_child:
        _knn_child(
            int(args.knn_child[0]), int(args.knn_child[1]), bool(int(args.knn_child[2]))
        )
        return
    compare(args)
    if args.knn:
        knn_memory([int(s) for s in args.knn.split(",")], args.channels, args.naive_max)


if __name__ == "__main__":
    main()
