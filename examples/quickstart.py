"""Quickstart: unsupervised semantic segmentation, offline, on the CPU.

Part 1, images in, segmentation out: ``Pipeline([DinoFeaturizer, TorchPCA,
KMeansProbe])`` on synthetic scenes with ground truth; prints the unsupervised
mIoU and pixel accuracy (Hungarian-matched clusters, the STEGO protocol) and
writes a PNG with image | ground truth | prediction rows, plus scikit-learn's two
sample photos segmented by the same pipeline. DINO weights come from the hub when
it is reachable, from ``--weights FILE`` when given; offline without a file, one
line says so and a randomly initialised backbone is used.

Part 2, the study's comparison on features: every reducer with the cluster probe
and the linear probe, on raw pixel patches of the scenes and on DINO-like feature
maps whose class information hides in a few of 384 directions.

Run ``python examples/quickstart.py``, or segment your own images with
``python examples/quickstart.py --images DIR``. Each step prints a line when it
starts and its time when it ends, and the featurizer shows a progress bar.
Measured on a 2-core CPU machine (24 GiB): 28 s when idle (1.8 GB peak memory),
8 min 13 s while other jobs kept its load average near 6; part 1 is mostly the
ViT-S/8 forward passes, part 2 the 20 reducer x probe fits.
"""

# %%
import argparse
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from sklearn.pipeline import Pipeline

from skstego import DinoFeaturizer, KMeansProbe, LinearProbe, RandomProjection, TorchPCA
from skstego.datasets import (
    ImageCollection,
    default_palette,
    make_feature_maps,
    make_scenes,
)
from skstego.metrics import (
    accuracy_scorer,
    confusion_matrix,
    hungarian_match,
    miou_scorer,
)
from skstego.plotting import colorize, plot_palette, plot_segmentation

SEED = 0
N_CLASSES = 5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# %% Part 1: images -> DINO features -> PCA -> k-means
def make_featurizer(model: str, weights: str | None, resolution: int):
    """The DINO featurizer; a random backbone (said in one line) when offline."""
    featurizer = DinoFeaturizer(
        model, weights=weights, resolution=resolution, verbose=True
    )
    try:
        featurizer.fit_transform(np.zeros((1, resolution, resolution, 3), np.uint8))
    except RuntimeError:  # weights unreachable offline
        print(
            f"DINO weights for {model} not reachable offline: using a randomly "
            "initialised backbone (pass --weights FILE for real DINO features)."
        )
        featurizer.set_params(pretrained=False, weights=None)
    return featurizer


def square_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """The featurizer's geometry for display: short side resized, center crop."""
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    top = (resized.shape[0] - resolution) // 2
    left = (resized.shape[1] - resolution) // 2
    return resized[top : top + resolution, left : left + resolution]


def save_rows(rows: list[list[np.ndarray]], path: Path, scale: int = 2) -> None:
    """Write rows of equally sized RGB panels as one PNG."""
    width = max(len(r) for r in rows)
    size = rows[0][0].shape[0]
    sheet = np.full((len(rows) * size, width * size, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            sheet[i * size : (i + 1) * size, j * size : (j + 1) * size] = panel
    image = Image.fromarray(sheet)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def segment_scenes(featurizer, resolution: int, out: Path) -> None:
    images, labels = make_scenes(
        48, size=resolution, n_classes=N_CLASSES, random_state=SEED
    )
    train, val = slice(0, 32), slice(32, 48)
    pipe = Pipeline(
        [
            ("features", featurizer),
            ("reduce", TorchPCA(dim=16)),
            ("probe", KMeansProbe(k=N_CLASSES, random_state=SEED)),
        ]
    )
    print(
        f"part 1: {len(images)} scenes of {resolution} px through the DINO "
        "backbone, PCA and k-means (the slowest step on a CPU)...",
        flush=True,
    )
    start = time.perf_counter()
    pipe.fit(images[train])  # no labels: unsupervised
    pred = pipe.predict(images[val], size=labels.shape[-2:])
    miou = miou_scorer(pipe, images[val], labels[val])
    acc = accuracy_scorer(pipe, images[val], labels[val])
    print(
        f"scenes: DINO -> PCA 16 -> k-means {N_CLASSES}: mIoU {100 * miou:.1f}, "
        f"accuracy {100 * acc:.1f} ({time.perf_counter() - start:.1f} s)"
    )
    # colour clusters by the class they are matched to on the validation images
    conf = confusion_matrix(labels[val], pred, n_classes=N_CLASSES, n_pred=N_CLASSES)
    mapped = hungarian_match(conf)[pred]
    palette = default_palette(N_CLASSES)
    names = [f"class {c}" for c in range(N_CLASSES)]
    # scikit-learn's two sample photos, segmented by the same pipeline
    photos = [square_crop(p, resolution) for p in load_sample_images().images]
    photo_pred = pipe.predict(np.stack(photos), size=(resolution, resolution))
    fig, axes = plt.subplots(6, 3, figsize=(6.6, 13.2))
    for i in range(4):
        plot_segmentation(
            images[val][i],
            mapped[i],
            labels[val][i],
            palette=palette,
            axes=axes[i],
            legend=False,
        )
    for row, photo, clusters in zip(axes[4:], photos, photo_pred, strict=True):
        plot_segmentation(photo, clusters, palette=palette, axes=row[:2], legend=False)
        row[0].set_title("sample photo")
        row[1].set_title("clusters")
        row[2].set_axis_off()
    plot_palette(palette, names, ax=axes[4, 2]).set_title("scene classes")
    for ax in axes[1:4].flat:
        ax.set_title("")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out} (rows: image | ground truth | prediction; sample photos)")


def segment_folder(featurizer, folder: Path, k: int, resolution: int, out: Path):
    paths = sorted(
        str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise SystemExit(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    images = ImageCollection(paths, resolution=resolution)
    pipe = Pipeline(
        [
            ("features", featurizer),
            ("reduce", TorchPCA(dim=16)),
            ("probe", KMeansProbe(k=k, random_state=SEED)),
        ]
    )
    pred = np.asarray(pipe.fit(images).predict(images, size=(resolution, resolution)))
    palette = default_palette(k)
    rows = [[images[i], colorize(pred[i], palette)] for i in range(min(8, len(images)))]
    save_rows(rows, out)
    print(f"segmented {len(images)} images of {folder} into {k} clusters; wrote {out}")


# %% Part 2: reducers x probes on features
def patch_features(images: np.ndarray, patch: int = 8) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, 3*patch*patch, H/patch, W/patch) maps."""
    n, h, w, _ = images.shape
    x = images.astype(np.float32) / 255.0
    x = x.reshape(n, h // patch, patch, w // patch, patch, 3)
    x = x.transpose(0, 5, 2, 4, 1, 3)  # (N, 3, p, p, h', w')
    return np.ascontiguousarray(x.reshape(n, 3 * patch * patch, h // patch, w // patch))


def reducers(n_features: int) -> dict:
    return {
        "none": "passthrough",
        "PCA 8": TorchPCA(dim=8),
        "PCA 8 (std)": TorchPCA(dim=8, standardize=True),
        "RP 8": RandomProjection(dim=8, random_state=SEED),
        "RP 64": RandomProjection(dim=min(64, n_features), random_state=SEED),
    }


def evaluate(name: str, maps: np.ndarray, labels: np.ndarray) -> list[tuple]:
    n_train = len(maps) * 3 // 4
    Xtr, ytr = maps[:n_train], labels[:n_train]
    Xva, yva = maps[n_train:], labels[n_train:]
    rows = []
    for reducer_name, reducer in reducers(maps.shape[1]).items():
        for probe_name, probe in [
            ("k-means", KMeansProbe(k=N_CLASSES, random_state=SEED)),
            ("linear", LinearProbe(random_state=SEED)),
        ]:
            pipe = Pipeline([("reduce", reducer), ("probe", probe)])
            start = time.perf_counter()
            # the cluster probe never sees labels; the linear probe is supervised
            pipe.fit(Xtr, ytr if probe_name == "linear" else None)
            miou = miou_scorer(pipe, Xva, yva)
            acc = accuracy_scorer(pipe, Xva, yva)
            seconds = time.perf_counter() - start
            rows.append((name, reducer_name, probe_name, miou, acc, seconds))
            print(
                f"{name:<10} {reducer_name:<12} {probe_name:<8} {100 * miou:6.1f} "
                f"{100 * acc:6.1f} {seconds:6.2f}",
                flush=True,
            )
    return rows


def compare_reducers() -> None:
    images, scene_labels = make_scenes(
        120, size=64, n_classes=N_CLASSES, random_state=SEED
    )
    print("part 2: every reducer with the cluster and the linear probe", flush=True)
    print(f"{'data':<10} {'reducer':<12} {'probe':<8} {'mIoU':>6} {'acc':>6} {'s':>6}")
    evaluate("scenes", patch_features(images), scene_labels)
    maps, map_labels = make_feature_maps(
        120, n_features=384, n_classes=N_CLASSES, label_size=64, random_state=SEED
    )
    evaluate("DINO-like", maps, map_labels)


# %%
def main() -> None:
    # __doc__ is empty when sphinx-gallery runs the script for the docs
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--images", type=Path, help="segment this folder instead")
    parser.add_argument("--weights", help="local DINO checkpoint (.pth/.safetensors)")
    parser.add_argument("--model", default="vit_small_patch8_224.dino")
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--k", type=int, default=N_CLASSES, help="clusters (--images)")
    parser.add_argument("--out", type=Path, default=Path("quickstart.png"))
    args = parser.parse_args()
    if args.images is not None and not args.images.is_dir():
        raise SystemExit(f"--images {args.images}: not a directory.")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    torch.manual_seed(SEED)  # a random backbone (offline) is the same every run
    featurizer = make_featurizer(args.model, args.weights, args.resolution)
    if args.images is not None:
        segment_folder(featurizer, args.images, args.k, args.resolution, args.out)
        return
    segment_scenes(featurizer, args.resolution, args.out)
    compare_reducers()


if __name__ == "__main__":
    main()
