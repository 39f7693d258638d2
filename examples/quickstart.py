"""Quickstart: unsupervised semantic segmentation, offline, on the CPU.

Runs the study's "features -> reducer -> probe" chain on synthetic data and prints
one table: validation mIoU and pixel accuracy of every reducer with the cluster
probe (k-means + Hungarian matching, the unsupervised protocol) and with the
linear probe.

1. *Scenes*: synthetic images with ground-truth label maps; features are raw 8x8
   pixel patches (a stand-in for DINO, which needs downloaded weights).
2. *DINO-like maps*: 384-channel feature maps whose class information lives in a
   few directions, buried under large nuisance variation. A random projection to
   few dimensions loses the classes; PCA keeps them. Whether raw k-means gets
   stuck depends on the seed: over many seeds it does so far more often than
   k-means after PCA, the study's first mechanism (tests/test_datasets.py
   measures it).

Run it with ``python examples/quickstart.py`` (about a minute on two CPU cores;
seconds on a GPU).
"""

# %%
import time

import numpy as np
from sklearn.pipeline import Pipeline

from skstego import KMeansProbe, LinearProbe, RandomProjection, TorchPCA
from skstego.datasets import make_feature_maps, make_scenes
from skstego.metrics import accuracy_scorer, miou_scorer

SEED = 0
N_CLASSES = 5


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
    Xtr, ytr, Xva, yva = (
        maps[:n_train],
        labels[:n_train],
        maps[n_train:],
        labels[n_train:],
    )
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
    return rows


# %% 1. Synthetic scenes, raw patch features
images, scene_labels = make_scenes(120, size=64, n_classes=N_CLASSES, random_state=SEED)
rows = evaluate("scenes", patch_features(images), scene_labels)

# %% 2. DINO-like feature maps
maps, map_labels = make_feature_maps(
    120, n_features=384, n_classes=N_CLASSES, label_size=64, random_state=SEED
)
rows += evaluate("DINO-like", maps, map_labels)

# %% Results
print(f"{'data':<10} {'reducer':<12} {'probe':<8} {'mIoU':>6} {'acc':>6} {'s':>6}")
for data, reducer, probe, miou, acc, seconds in rows:
    print(
        f"{data:<10} {reducer:<12} {probe:<8} {100 * miou:6.1f} {100 * acc:6.1f} "
        f"{seconds:6.2f}"
    )
