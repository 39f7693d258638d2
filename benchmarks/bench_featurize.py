"""DinoFeaturizer against a plain timm loop, and against the physical bound.

Both contenders run the same ViT module (random weights by default, so the
script runs offline) on the same uint8 images, already at ``--resolution``
(so neither pays a resize): the plain loop converts each batch to float,
normalises with the model's data config and calls ``forward_features`` under
``torch.no_grad`` in float32, then drops the prefix tokens and reshapes to
(N, C, h, w) on the CPU, as a user would write it. The featurizer runs with its
defaults (bf16 autocast on CUDA, inference mode, batch size "auto" unless
``--batch-size`` is given; ``--precision bfloat16`` opts into bf16 autocast on
the CPU too, worth it only where the CPU computes bf16 natively: AVX512-BF16 or
AMX). Each is timed ``--repeats`` times, alternating
(plain, featurizer, plain, ...), so that both see the same load. Printed:
the load average, images/s of each (best run), the ratio featurizer / plain
loop of each pair of runs and their median (above 1: the featurizer is
faster) and, on CUDA, the fraction of the bf16 peak that the featurizer's
throughput amounts to, from the model's FLOPs per image (ViT-S/8 at 224 px:
44.9 GFLOP, ViT-B/8: 156).

Run::

    python benchmarks/bench_featurize.py                       # ViT-S/8, 224 px
    python benchmarks/bench_featurize.py --model vit_base_patch8_224 --n 512
    python benchmarks/bench_featurize.py --n 8 --resolution 64  # smoke run
    python benchmarks/bench_featurize.py --threads 1 --cpu-time  # robust on a
                                                                 # shared CPU
    python benchmarks/bench_featurize.py --n 8 --precision bfloat16  # bf16 CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import timm
import torch

from skstego import DinoFeaturizer
from skstego._device import resolve_device


def vit_gflop(net: torch.nn.Module, resolution: int) -> float:
    """Forward GFLOP per image (2 per multiply-add) of a timm ViT."""
    p = net.patch_embed.patch_size[0]
    c = net.embed_dim
    t = (resolution // p) ** 2 + net.num_prefix_tokens
    depth = len(net.blocks)
    mlp = net.blocks[0].mlp.fc1.out_features / c
    per_block = t * (8 + 4 * mlp) * c * c + 4 * t * t * c
    embed = 2 * (t - net.num_prefix_tokens) * c * 3 * p * p
    return (depth * per_block + embed) / 1e9


def plain_timm_loop(net, images: np.ndarray, batch_size: int, device) -> torch.Tensor:
    cfg = timm.data.resolve_model_data_config(net)
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
    p = net.patch_embed.patch_size[0]
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).to(device)
            x = x.permute(0, 3, 1, 2).float() / 255
            x = (x - mean) / std
            tokens = net.forward_features(x)[:, net.num_prefix_tokens :]
            n, _, h, w = x.shape
            maps = tokens.reshape(n, h // p, w // p, -1).permute(0, 3, 1, 2)
            out.append(maps.cpu())
    return torch.cat(out)


def timed(fn, device, clock=time.perf_counter) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0, out


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def feat_batch_size(feat: DinoFeaturizer, net, device) -> int:
    """The batch size the featurizer runs with (resolved from "auto")."""
    from skstego.features._dino import _Runner

    return _Runner(feat, net, device).batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch8_224")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument(
        "--batch-size", default="auto", help='images per batch, or "auto"'
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="load timm's pretrained weights (needs the hub or its cache)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each, alternating"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: default)"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time CPU seconds of this process instead of wall-clock seconds "
        "(with --threads 1: insensitive to other jobs on a shared machine)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the featurizer's precision (the plain loop stays float32)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=790.0, help="bf16 peak of the GPU"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    device = resolve_device(args.device)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    plain_batch = (
        (64 if device.type == "cuda" else 16) if batch_size == "auto" else batch_size
    )
    net = timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=0, dynamic_img_size=True
    )
    net = net.eval().requires_grad_(False).to(device)
    rng = np.random.default_rng(0)
    shape = (args.n, args.resolution, args.resolution, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    feat = DinoFeaturizer(
        net,
        resolution=args.resolution,
        batch_size=batch_size,
        device=device,
        precision=args.precision,
    )

    # warm-up (kernels, allocator, thread pools) on a few images
    warm = images[: min(len(images), 4)]
    plain_timm_loop(net, warm, plain_batch, device)
    feat.transform(warm)

    load_before = load_average()
    plain_times, feat_times = [], []
    for _ in range(max(1, args.repeats)):
        t_plain, ref = timed(
            lambda: plain_timm_loop(net, images, plain_batch, device), device, clock
        )
        t_feat, out = timed(lambda: feat.transform(images), device, clock)
        plain_times.append(t_plain)
        feat_times.append(t_feat)
    err = float(np.abs(out - ref.numpy()).max() / ref.abs().max())
    ratios = [p / f for p, f in zip(plain_times, feat_times, strict=True)]
    t_plain, t_feat = min(plain_times), min(feat_times)
    runner_batch = feat_batch_size(feat, net, device)

    gflop = vit_gflop(net, args.resolution)
    name = f"{args.model} @ {args.resolution}px"
    print(
        f"== {name}, {args.n} images, device {device}, {gflop:.1f} GFLOP/image, "
        f"{args.repeats} alternating runs, {torch.get_num_threads()} threads, "
        f"{'CPU' if args.cpu_time else 'wall'} time, precision {args.precision} =="
    )
    print(f"load average before / after        {load_before} / {load_average()}")
    print(f"plain timm loop (fp32, batch {plain_batch})  {args.n / t_plain:9.2f} img/s")
    print(f"DinoFeaturizer (batch {runner_batch})         {args.n / t_feat:9.2f} img/s")
    print(f"ratio of each run                  {' '.join(f'{r:.2f}' for r in ratios)}")
    print(f"median ratio DinoFeaturizer / plain {statistics.median(ratios):9.2f}x")
    print(f"max rel. diff of the feature maps  {err:9.1e}")
    if device.type == "cuda":
        achieved = args.n * gflop / t_feat / 1e3
        print(
            f"DinoFeaturizer: {achieved:.0f} TFLOP/s = "
            f"{achieved / args.peak_tflops:.1%} of the {args.peak_tflops:.0f} TFLOP/s "
            "bf16 peak"
        )


if __name__ == "__main__":
    main()
