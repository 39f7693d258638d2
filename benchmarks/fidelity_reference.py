"""How much each remaining difference from the STEGO reference moves results.

Not a speed benchmark: a measurement of the differences listed on the
"Reproducing STEGO" docs page, each against the reference's own formula
written out here, on a randomly initialised ViT-S/8 (no weights offline; rerun
with ``--weights`` for a DINO checkpoint) and synthetic scenes:

* position-embedding resampling at 320 px: DINO's ``interpolate_pos_encoding``
  (bicubic with ``scale_factor = (side + 0.1) / 28``) against timm's
  ``resample_abs_pos_embed`` (bicubic to the exact size), which skstego uses;
* flip averaging of the codes (the reference evaluation) against one pass;
* bilinear-antialiased against nearest resizing (the reference's);
* mean = std = 0.5 against ImageNet statistics (the reference's).

Each row prints the mean token cosine and the share of k-means (spherical, k=5)
labels that agree after Hungarian matching.

    HF_HUB_OFFLINE=1 python benchmarks/fidelity_reference.py [--images 6]
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from skstego import DinoFeaturizer, FlipAveraged
from skstego.datasets import make_scenes

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def dino_pos_embed(pos_embed: torch.Tensor, side: int) -> torch.Tensor:
    """DINO's interpolate_pos_encoding for a ``side x side`` token grid."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    n = grid.shape[1]
    old = int(math.sqrt(n))
    scale = (side + 0.1) / math.sqrt(n)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)
    return torch.cat([cls, grid], dim=1)


def agreement(a: np.ndarray, b: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Mean token cosine, and k-means label agreement under Hungarian matching."""
    ta = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])
    tb = b.transpose(0, 2, 3, 1).reshape(-1, b.shape[1])
    cos = (ta * tb).sum(1) / (
        np.linalg.norm(ta, axis=1) * np.linalg.norm(tb, axis=1) + 1e-12
    )

    def labels(t: np.ndarray) -> np.ndarray:
        unit = t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-12)
        return KMeans(k, n_init=4, random_state=0).fit_predict(unit)

    la, lb = labels(ta), labels(tb)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (la, lb), 1)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    return float(cos.mean()), float(conf[rows, cols].sum() / len(la))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--weights", default=None, help="a DINO ViT-S/8 file")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    name = "vit_small_patch8_224.dino"
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True
    )
    if args.weights:
        from pathlib import Path

        from skstego.features._dino import load_weights

        load_weights(vit, Path(args.weights))
    vit.eval()
    images, _ = make_scenes(args.images, size=(360, 480), random_state=0)
    rows = []

    def featurize(model, res, **kw):
        return DinoFeaturizer(model, resolution=res, device="cpu", **kw).transform(
            images
        )

    # 1. position embeddings at 320 px: DINO's resampling vs timm's
    ref = featurize(vit, 320, interpolation="nearest", **IMAGENET)
    fixed = timm.create_model(name, pretrained=False, num_classes=0, img_size=320)
    state = {k: v for k, v in vit.state_dict().items() if k != "pos_embed"}
    fixed.load_state_dict(state, strict=False)
    with torch.no_grad():
        fixed.pos_embed.copy_(dino_pos_embed(vit.pos_embed, 40))
    fixed.eval()
    dino = featurize(fixed, 320, interpolation="nearest", **IMAGENET)
    rows.append(("pos. embeddings at 320 px: timm vs DINO", *agreement(ref, dino)))
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        a = dino_pos_embed(vit.pos_embed, 40)[0, 1:]
        b = resample_abs_pos_embed(vit.pos_embed, (40, 40), num_prefix_tokens=1)[0, 1:]
    pe_cos = float(F.cosine_similarity(a, b, dim=-1).mean())

    # 2. flip averaging (features; the head is linear-equivariant here)
    flipped = FlipAveraged(
        DinoFeaturizer(
            vit, resolution=224, interpolation="nearest", device="cpu", **IMAGENET
        )
    ).transform(images)
    one = featurize(vit, 224, interpolation="nearest", **IMAGENET)
    rows.append(("one pass vs flip-averaged", *agreement(flipped, one)))

    # 3. resize filter, 4. normalisation
    bilinear = featurize(vit, 224, interpolation="bilinear", **IMAGENET)
    rows.append(("bilinear-antialiased vs nearest resize", *agreement(one, bilinear)))
    half = featurize(vit, 224, interpolation="nearest", mean=(0.5,) * 3, std=(0.5,) * 3)
    rows.append(("mean = std = 0.5 vs ImageNet statistics", *agreement(one, half)))

    print(f"{'difference':<44} {'token cosine':>12} {'k-means agree':>14}")
    for label, cos, agree in rows:
        print(f"{label:<44} {cos:>12.4f} {agree:>14.3f}")
    print(f"(the position embeddings themselves: mean cosine {pe_cos:.4f})")


if __name__ == "__main__":
    main()
