"""
A tour of skstego.plotting
==========================

Every plotting function of :mod:`skstego.plotting` on synthetic data: a
segmentation next to its image and ground truth, overlays, per-class IoU, the
confusion matrix, a reliability diagram, and the study's sweep and mechanism
figures. The data are :func:`skstego.datasets.make_feature_maps` maps, whose
class information hides in a few of 64 channels, so that a reducer matters.
"""

# %%
# Data and two fitted pipelines: PCA + k-means (unsupervised) and PCA + the
# linear probe (supervised), on feature maps with label maps of 32 x 32.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.pipeline import Pipeline

from skstego import KMeansProbe, LinearProbe, TorchPCA
from skstego.datasets import default_palette, make_feature_maps, make_scenes
from skstego.metrics import confusion_matrix, hungarian_match, segmentation_report
from skstego.plotting import (
    colorize,
    overlay,
    plot_class_iou,
    plot_confusion_matrix,
    plot_dimension_sweep,
    plot_mechanisms,
    plot_palette,
    plot_reliability_diagram,
    plot_segmentation,
)
from skstego.study import run_sweep

n_classes = 5
X, y = make_feature_maps(
    36, n_features=64, n_classes=n_classes, label_size=32, random_state=0
)
train, test = slice(0, 24), slice(24, 36)
kmeans = Pipeline(
    [("reduce", TorchPCA(dim=8)), ("probe", KMeansProbe(k=n_classes, random_state=0))]
).fit(X[train])
clusters = kmeans.predict(X[test], size=y.shape[-2:])
# colour each cluster as the class the Hungarian algorithm matches it to
conf = confusion_matrix(y[test], clusters, n_classes=n_classes, n_pred=n_classes)
pred = hungarian_match(conf)[clusters]
palette = default_palette(n_classes)
names = [f"class {c}" for c in range(n_classes)]

# %%
# A segmentation next to its image and ground truth
# (:func:`~skstego.plotting.plot_segmentation`): synthetic scenes segmented by
# k-means on their pixel colours, clusters matched to classes.
images, scene_labels = make_scenes(6, size=64, n_classes=n_classes, random_state=0)
pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 255  # (N, 3, H, W)
colour_clusters = KMeansProbe(k=n_classes, random_state=0).fit(pixels).predict(pixels)
scene_conf = confusion_matrix(
    scene_labels, colour_clusters, n_classes=n_classes, n_pred=n_classes
)
scene_pred = hungarian_match(scene_conf)[colour_clusters]
fig = plot_segmentation(
    images[0], scene_pred[0], scene_labels[0], palette=palette, class_names=names
)

# %%
# Label maps as RGB (:func:`~skstego.plotting.colorize`), blended over the
# image (:func:`~skstego.plotting.overlay`), and the palette
# (:func:`~skstego.plotting.plot_palette`).
fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
axes[0].imshow(images[1])
axes[0].set_title("image")
axes[1].imshow(colorize(scene_pred[1], palette))
axes[1].set_title("colorize")
axes[2].imshow(overlay(images[1], scene_pred[1], palette=palette, alpha=0.5))
axes[2].set_title("overlay")
for ax in axes[:3]:
    ax.set_axis_off()
plot_palette(palette, names, ax=axes[3])
fig.tight_layout()

# %%
# Scores: per-class IoU (:func:`~skstego.plotting.plot_class_iou`) and the
# confusion matrix (:func:`~skstego.plotting.plot_confusion_matrix`).
report = segmentation_report(y[test], pred, n_classes=n_classes)
print(f"mIoU {report['miou']:.3f}, pixel accuracy {report['accuracy']:.3f}")
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
plot_class_iou(report, names, ax=axes[0])
plot_confusion_matrix(report["confusion"], names, normalize="true", ax=axes[1])
fig.tight_layout()

# %%
# Calibration of the linear probe's probabilities
# (:func:`~skstego.plotting.plot_reliability_diagram`).
linear = Pipeline(
    [
        ("reduce", TorchPCA(dim=8)),
        ("probe", LinearProbe(solver="lbfgs", max_iter=100, random_state=0)),
    ]
).fit(X[train], y[train])
proba = linear.predict_proba(X[test])  # (N, classes, h, w)
small = y[test][:, ::2, ::2]  # the labels at the maps' 16 x 16 resolution
ax = plot_reliability_diagram(small, proba)

# %%
# The study's figures from a small sweep (:func:`skstego.study.run_sweep`):
# mIoU against the dim (:func:`~skstego.plotting.plot_dimension_sweep`) and
# the mechanisms (:func:`~skstego.plotting.plot_mechanisms`).
results = run_sweep(
    X[train],
    y[train],
    X[test],
    y[test],
    reducers=("pca", "rp"),
    dims=[2, 4, 8],
    probes=("kmeans",),
    seeds=[0, 1],
    mechanisms=True,
    silhouette_sample_size=1000,
    device="cpu",
)
ax = plot_dimension_sweep(results)
fig = plot_mechanisms(results)
