"""DinoFeaturizer against a plain timm loop, and against the physical bound.

Both contenders run the same ViT module (random weights by default, so the
script runs offline) on the same uint8 images, already at ``--resolution``
(so neither pays a resize): the plain loop converts each batch to float,
normalises with the model's data config and calls ``forward_features`` under
``torch.no_grad`` in float32, then drops the prefix tokens and reshapes to
(N, C, h, w) on the CPU, as a user would write it. The featurizer runs with its
defaults (bf16 autocast on CUDA, inference mode, batch size "auto" unless
``--batch-size`` is given). Each is timed ``--repeats`` times, alternating,
and the best time kept. Printed: images/s of each, the ratio
featurizer / plain loop (above 1: the featurizer is faster) and, on CUDA, the
fraction of the bf16 peak that the featurizer's throughput amounts to, from
the model's FLOPs per image (ViT-S/8 at 224 px: 44.9 GFLOP, ViT-B/8: 156).

Run::

    python benchmarks/bench_featurize.py                       # ViT-S/8, 224 px
    python benchmarks/bench_featurize.py --model vit_base_patch8_224 --n 512
    python benchmarks/bench_featurize.py --n 8 --resolution 64  # smoke run
"""

from __future__ import annotations

import argparse
import os
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


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


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
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    parser.add_argument(
        "--peak-tflops", type=float, default=790.0, help="bf16 peak of the GPU"
    )
    args = parser.parse_args()

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
        net, resolution=args.resolution, batch_size=batch_size, device=device
    )

    # warm-up (kernels, allocator, thread pools) on a few images
    warm = images[: min(len(images), 4)]
    plain_timm_loop(net, warm, plain_batch, device)
    feat.transform(warm)

    t_plain, ref = timed(
        lambda: plain_timm_loop(net, images, plain_batch, device), device
    )
    t_feat, out = timed(lambda: feat.transform(images), device)
    err = float(np.abs(out - ref.numpy()).max() / ref.abs().max())

    gflop = vit_gflop(net, args.resolution)
    name = f"{args.model} @ {args.resolution}px"
    print(
        f"== {name}, {args.n} images, device {device}, {gflop:.1f} GFLOP/image, "
        f"best of {args.repeats} =="
    )
    print(f"plain timm loop (fp32, batch {plain_batch})  {args.n / t_plain:9.1f} img/s")
    print(f"DinoFeaturizer (batch {batch_size})        {args.n / t_feat:9.1f} img/s")
    print(f"ratio DinoFeaturizer / plain loop     {t_plain / t_feat:9.2f}x")
    print(f"max rel. diff of the feature maps     {err:9.1e}")
    if device.type == "cuda":
        achieved = args.n * gflop / t_feat / 1e3
        print(
            f"DinoFeaturizer: {achieved:.0f} TFLOP/s = "
            f"{achieved / args.peak_tflops:.1%} of the {args.peak_tflops:.0f} TFLOP/s "
            "bf16 peak"
        )


if __name__ == "__main__":
    main()
