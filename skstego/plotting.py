"""Figures for segmentation research (matplotlib).

* :func:`colorize` and :func:`overlay` turn label maps into RGB images;
* :func:`plot_segmentation` shows image | ground truth | prediction
  (| confidence) side by side with a legend of the classes present;
* :func:`plot_palette` draws the class colours as legend swatches;
* :func:`plot_class_iou` and :func:`plot_confusion_matrix` show a
  :func:`skstego.metrics.segmentation_report`;
* :func:`plot_dimension_sweep` draws the study's figure: a score against the
  reduced dimension, one line per reducer, mean and spread over seeds;
* :func:`plot_mechanisms` puts the study's two mechanisms (k-means
  convergence, cluster quality and seed stability) next to mIoU, per dim;
* :func:`plot_reliability_diagram` compares confidence with accuracy.

Every function accepts NumPy arrays or torch tensors (on any device), takes
an optional ``ax`` (or ``axes``), returns what it drew on and never calls
``plt.show()``. The library does not choose a backend: scripts that only
write files call ``matplotlib.use("Agg")`` themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._calibration import (
    calibration_bins,
    check_n_bins,
    confidence_and_correct,
    ece_from_bins,
    expected_calibration_error,
)
from ._device import is_torch
from ._validation import integer_labels
from .datasets import default_palette

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "colorize",
    "overlay",
    "plot_class_iou",
    "plot_confusion_matrix",
    "plot_dimension_sweep",
    "plot_mechanisms",
    "plot_palette",
    "plot_reliability_diagram",
    "plot_segmentation",
]

#: Colour of ignored pixels (negative labels) in :func:`colorize`.
IGNORE_COLOR = (0, 0, 0)

_METRIC_LABELS = {"miou": "mIoU (%)", "accuracy": "Pixel accuracy (%)"}


# --------------------------------------------------------------------------
# conversions and checks (the one place that turns inputs into NumPy)
# --------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """NumPy view of an array-like or a torch tensor on any device (no copy kept)."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(labels: Any, name: str, ndim: tuple[int, ...] = (2,)) -> np.ndarray:
    """Integer label array of an accepted number of dimensions, as int64 NumPy."""
    arr = _to_numpy(integer_labels(labels, name))
    if arr.ndim not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(
            f"{name} must be a {want} label map (H, W) of class ids, got shape "
            f"{arr.shape}."
        )
    return arr


def _check_palette(palette: Any, n_needed: int) -> np.ndarray:
    """A (K, 3) uint8 palette with at least ``n_needed`` colours."""
    if palette is None:
        return default_palette(max(n_needed, 1))
    pal = _to_numpy(palette)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(
            f"palette must have shape (n_classes, 3) (RGB rows), got {pal.shape}."
        )
    if pal.dtype.kind not in "iuf" or (pal.size and (pal.min() < 0 or pal.max() > 255)):
        raise ValueError(
            "palette must hold RGB values in [0, 255] (uint8 colours, as the "
            "dataset loaders return)."
        )
    if len(pal) < n_needed:
        raise ValueError(
            f"palette has {len(pal)} colours but the labels go up to "
            f"{n_needed - 1}; pass a palette with at least {n_needed} rows "
            f"(e.g. skstego.datasets.default_palette({n_needed}))."
        )
    return np.rint(pal).astype(np.uint8)


def _as_rgb(image: Any, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB from (H, W, 3|4), (3, H, W) or (H, W) input.

    uint8/integer values are taken in [0, 255], floats in [0, 1] (the
    featurizer's conventions). A (3, H, W) array is channels-first; when its
    last axis could be channels too (3 or 4), tensors are read channels-first
    and NumPy arrays channels-last.
    """
    arr = _to_numpy(image)
    if arr.ndim == 3 and arr.shape[0] == 3:
        # channels first, unless channels-last is as plausible and the input
        # is NumPy (NumPy images are (H, W, 3), tensors (3, H, W))
        if arr.shape[-1] not in (3, 4) or is_torch(image):
            arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(
            f"{name} must be one RGB image (H, W, 3), (3, H, W) or grayscale "
            f"(H, W), got shape {arr.shape}."
        )
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        if arr.size and not (
            np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0
        ):
            raise ValueError(
                f"Float {name} values must lie in [0, 1] (got values in "
                f"[{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]); pass uint8 for "
                "0-255 images."
            )
        return np.rint(arr * 255.0).astype(np.uint8)
    if arr.dtype.kind in "iub":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"Integer {name} values must lie in [0, 255].")
        return arr.astype(np.uint8)
    raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}.")


def _resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize sampling at pixel centres (exact for labels)."""
    h, w = labels.shape
    if (h, w) == tuple(size):
        return labels
    rows = np.minimum(((np.arange(size[0]) + 0.5) * (h / size[0])).astype(int), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * (w / size[1])).astype(int), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _class_names(class_names: Any, n: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(n)]
    names = [str(c) for c in class_names]
    if len(names) < n:
        raise ValueError(
            f"class_names has {len(names)} names but {n} classes are needed."
        )
    return names


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _patch(color: np.ndarray, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=np.asarray(color) / 255.0, edgecolor="0.3", label=label)


# --------------------------------------------------------------------------
# label maps as images
# --------------------------------------------------------------------------
def colorize(labels: Any, palette: Any = None) -> np.ndarray:
    """Colour a label map: class ``c`` gets ``palette[c]``, ignored pixels black.

    Parameters
    ----------
    labels : array-like or torch.Tensor of int, shape (H, W) or (N, H, W)
        Class (or cluster) ids; negative values (the ignore label -1) are
        drawn in :data:`IGNORE_COLOR`, black.
    palette : array-like of shape (n_colors, 3), optional
        RGB colours in [0, 255], one row per class, e.g. a loader's
        ``palette``; default :func:`skstego.datasets.default_palette` with
        ``max(labels) + 1`` colours.

    Returns
    -------
    rgb : ndarray of shape (H, W, 3) or (N, H, W, 3), uint8
        Always NumPy (an image for display), whatever the input type.

    Raises
    ------
    ValueError
        If the labels are not integers of 2 or 3 dimensions, or the palette
        has fewer colours than the labels need.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.plotting import colorize
    >>> colorize(np.array([[0, 1], [-1, 1]]), palette=[[255, 0, 0], [0, 0, 255]])
    array([[[255,   0,   0],
            [  0,   0, 255]],
    <BLANKLINE>
           [[  0,   0,   0],
            [  0,   0, 255]]], dtype=uint8)
    """
    lab = _labels(labels, "labels", ndim=(2, 3))
    valid = lab >= 0
    n_needed = int(lab.max()) + 1 if valid.any() else 0
    pal = _check_palette(palette, n_needed)
    out = np.empty((*lab.shape, 3), dtype=np.uint8)
    out[...] = IGNORE_COLOR
    out[valid] = pal[lab[valid]]
    return out


def overlay(
    image: Any, labels: Any, *, palette: Any = None, alpha: float = 0.5
) -> np.ndarray:
    """Blend a coloured label map over an RGB image.

    Each labelled pixel becomes ``(1 - alpha) * image + alpha * palette[label]``
    (rounded to uint8); ignored pixels (negative labels) keep the image.
    A label map of another size than the image (e.g. a prediction at patch
    resolution) is first resized to the image **by nearest neighbour**, so
    class ids are never blended with each other.

    Parameters
    ----------
    image : array-like or torch.Tensor, (H, W, 3), (3, H, W) or (H, W)
        uint8 values in [0, 255] or floats in [0, 1]; an alpha channel is
        dropped. When both readings fit (e.g. (3, 5, 4)), tensors are taken
        channels-first and NumPy arrays channels-last.
    labels : array-like or torch.Tensor of int, shape (h, w)
        Class ids, -1 to ignore.
    palette : array-like of shape (n_colors, 3), optional
        As :func:`colorize`.
    alpha : float in [0, 1], default=0.5
        Opacity of the label colours.

    Returns
    -------
    rgb : ndarray of shape (H, W, 3), uint8

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.plotting import overlay
    >>> image = np.full((2, 2, 3), 100, np.uint8)
    >>> overlay(image, [[0, -1], [0, 0]], palette=[[200, 0, 0]])[0]
    array([[150,  50,  50],
           [100, 100, 100]], dtype=uint8)
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}.")
    rgb = _as_rgb(image)
    lab = _resize_nearest(_labels(labels, "labels"), rgb.shape[:2])
    colours = colorize(lab, palette).astype(np.float64)
    blend = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colours
    out = rgb.copy()
    valid = lab >= 0
    out[valid] = np.clip(np.rint(blend[valid]), 0, 255).astype(np.uint8)
    return out


def plot_segmentation(
    image: Any,
    y_pred: Any,
    y_true: Any = None,
    *,
    palette: Any = None,
    class_names: Sequence[str] | None = None,
    confidence: Any = None,
    axes: Any = None,
    legend: bool = True,
) -> Figure:
    """Image | ground truth | prediction (| confidence) side by side.

    Parameters
    ----------
    image : array-like or torch.Tensor, (H, W, 3), (3, H, W) or (H, W)
        uint8 in [0, 255] or float in [0, 1].
    y_pred : array-like or torch.Tensor of int, shape (h, w)
        Predicted class ids (map clusters to classes first, e.g. with
        :func:`skstego.metrics.hungarian_match`); any size, each panel shows
        its own array.
    y_true : array-like or torch.Tensor of int, shape (h', w'), optional
        Ground truth, -1 to ignore (drawn black); its panel is left out when
        None.
    palette : array-like of shape (n_classes, 3), optional
        As :func:`colorize`; ground truth and prediction share it.
    class_names : sequence of str, optional
        Legend names; default the class ids.
    confidence : array-like or torch.Tensor, (h, w) or (K, h, w), optional
        A confidence map in [0, 1], or class probabilities whose maximum is
        shown, in a fourth panel with a colour bar.
    axes : sequence of matplotlib Axes, optional
        One per panel (2 to 4); a new figure when None. Pass a row of a
        larger grid to draw several images.
    legend : bool, default=True
        Add a legend (palette colour and name) of the classes present in the
        ground truth and the prediction, below the prediction panel.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skstego.datasets import make_scenes
    >>> from skstego.plotting import plot_segmentation
    >>> images, labels = make_scenes(1, size=32, n_classes=3, random_state=0)
    >>> fig = plot_segmentation(images[0], labels[0], labels[0],
    ...                         class_names=["sky", "grass", "road"])
    >>> len(fig.axes)
    3
    """
    rgb = _as_rgb(image)
    pred = _labels(y_pred, "y_pred")
    true = None if y_true is None else _labels(y_true, "y_true")
    conf = None
    if confidence is not None:
        conf = _to_numpy(confidence).astype(np.float64)
        if conf.ndim == 3:
            conf = conf.max(axis=0)
        if conf.ndim != 2:
            raise ValueError(
                "confidence must be a (h, w) map or (K, h, w) class probabilities, "
                f"got shape {conf.shape}."
            )
        if conf.size and not (
            np.isfinite(conf).all() and conf.min() >= 0 and conf.max() <= 1
        ):
            raise ValueError("confidence must hold finite values in [0, 1].")

    maps = [m for m in (true, pred) if m is not None]
    n_needed = max([int(m.max()) + 1 for m in maps if m.size] + [0])
    if class_names is not None:
        n_needed = max(n_needed, len(class_names))
    pal = _check_palette(palette, n_needed)
    names = _class_names(class_names, n_needed)

    panels = [("image", rgb)]
    if true is not None:
        panels.append(("ground truth", colorize(true, pal)))
    panels.append(("prediction", colorize(pred, pal)))
    n_panels = len(panels) + (conf is not None)
    if axes is None:
        _, axes = _pyplot().subplots(
            1, n_panels, figsize=(2.6 * n_panels, 3.0), squeeze=False
        )
    axes = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(axes) != n_panels:
        raise ValueError(
            f"axes must hold {n_panels} Axes (one per panel), got {len(axes)}."
        )
    for ax, (title, picture) in zip(axes, panels, strict=False):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    if conf is not None:
        ax = axes[-1]
        im = ax.imshow(conf, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title("confidence")
        ax.set_axis_off()
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if legend:
        present = np.unique(np.concatenate([m[m >= 0].ravel() for m in maps]))
        handles = [_patch(pal[c], names[c]) for c in present]
        if handles:
            axes[len(panels) - 1].legend(
                handles=handles,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.02),
                ncol=min(3, len(handles)),
                fontsize="small",
                frameon=False,
            )
    return axes[0].figure


def plot_palette(
    palette: Any,
    class_names: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    ncol: int = 1,
) -> Axes:
    """Draw class colours as legend swatches (colour patch and name).

    Parameters
    ----------
    palette : array-like of shape (n_classes, 3)
        RGB colours in [0, 255], e.g. a loader's ``palette``.
    class_names : sequence of str, optional
        One name per colour; default the class ids.
    ax : matplotlib Axes, optional
        Drawn on (its axis is turned off); a new figure when None.
    ncol : int, default=1
        Legend columns.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skstego.datasets import default_palette
    >>> from skstego.plotting import plot_palette
    >>> ax = plot_palette(default_palette(3), ["sky", "grass", "road"])
    >>> [t.get_text() for t in ax.get_legend().get_texts()]
    ['sky', 'grass', 'road']
    """
    pal = _check_palette(palette, 0)
    if class_names is not None and len(class_names) != len(pal):
        raise ValueError(
            f"palette has {len(pal)} colours but class_names has "
            f"{len(class_names)} names; pass one name per colour."
        )
    names = _class_names(class_names, len(pal))
    if ax is None:
        _, ax = _pyplot().subplots(
            figsize=(2.4 * ncol, 0.3 * (len(pal) / ncol + 1) + 0.4)
        )
    ax.set_axis_off()
    ax.legend(
        handles=[_patch(c, n) for c, n in zip(pal, names, strict=True)],
        loc="center",
        ncol=ncol,
        frameon=False,
    )
    return ax


# --------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------
def plot_class_iou(
    report_or_iou: Any,
    class_names: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    sort: bool = False,
) -> Axes:
    """Per-class IoU as a bar chart (in %), with the mIoU as a horizontal line.

    Parameters
    ----------
    report_or_iou : dict or array-like of shape (n_classes,)
        The dict of :func:`skstego.metrics.segmentation_report` (its ``iou``
        and ``miou``) or per-class IoU fractions in [0, 1]. NaN (a class
        absent from both ground truth and prediction) is drawn as a missing
        bar marked "n/a" and left out of the mean.
    class_names : sequence of str, optional
        Tick labels; default the class ids.
    ax : matplotlib Axes, optional
        A new figure when None.
    sort : bool, default=False
        Order the bars from best to worst class (NaN last).

    Returns
    -------
    matplotlib.axes.Axes
        Bars in ``ax.patches`` (heights in %), the mIoU line labelled in the
        legend.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skstego.metrics import segmentation_report
    >>> from skstego.plotting import plot_class_iou
    >>> report = segmentation_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 2])
    >>> ax = plot_class_iou(report, ["sky", "grass", "road"])
    >>> [round(float(p.get_height()), 1) for p in ax.patches]
    [50.0, 66.7, 100.0]
    """
    if isinstance(report_or_iou, dict):
        if "iou" not in report_or_iou:
            raise ValueError(
                "report_or_iou is a dict without an 'iou' entry; pass the dict of "
                "skstego.metrics.segmentation_report or an array of per-class IoU."
            )
        iou = _to_numpy(report_or_iou["iou"]).astype(np.float64)
        miou = report_or_iou.get("miou")
    else:
        iou = _to_numpy(report_or_iou).astype(np.float64)
        miou = None
    if iou.ndim != 1 or iou.size == 0:
        raise ValueError(f"IoU must be a non-empty 1-D array, got shape {iou.shape}.")
    defined = ~np.isnan(iou)
    if np.any((iou[defined] < 0) | (iou[defined] > 1)):
        raise ValueError(
            "IoU values must be fractions in [0, 1] (as segmentation_report "
            "returns); divide percentages by 100."
        )
    if miou is None:
        miou = float(iou[defined].mean()) if defined.any() else float("nan")
    if class_names is not None and len(class_names) != len(iou):
        raise ValueError(
            f"class_names has {len(class_names)} names but there are {len(iou)} "
            "IoU values."
        )
    names = _class_names(class_names, len(iou))
    order = np.arange(len(iou))
    if sort:
        order = np.argsort(np.where(defined, -iou, np.inf), kind="stable")
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(max(4.0, 0.35 * len(iou) + 1.5), 3.5))
    x = np.arange(len(order))
    heights = 100.0 * iou[order]
    ax.bar(x[defined[order]], heights[defined[order]], color="C0")
    for xi in x[~defined[order]]:
        ax.text(xi, 1.0, "n/a", ha="center", va="bottom", fontsize="small")
    if np.isfinite(miou):
        ax.axhline(100.0 * miou, color="C3", ls="--", label=f"mIoU {100 * miou:.1f}")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xticks(x, [names[i] for i in order], rotation=60, ha="right")
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    return ax


def plot_confusion_matrix(
    confusion: Any,
    class_names: Sequence[str] | None = None,
    *,
    normalize: str | None = None,
    ax: Axes | None = None,
    include_values: bool | None = None,
    cmap: str = "Blues",
) -> Axes:
    """Draw a confusion matrix: rows are true classes, columns predictions.

    Normalisation follows :func:`sklearn.metrics.confusion_matrix`: ``"true"``
    divides each row by its sum, ``"pred"`` each column, ``"all"`` the whole
    matrix; empty rows or columns give 0.

    Parameters
    ----------
    confusion : array-like of shape (n_classes, n_pred)
        Counts, e.g. :func:`skstego.metrics.confusion_matrix` or the
        ``confusion`` entry of a report. Rectangular matrices (more clusters
        than classes) are fine.
    class_names : sequence of str, optional
        Row names; also column names when the matrix is square.
    normalize : {None, "true", "pred", "all"}, default=None
        See above; None shows counts.
    ax : matplotlib Axes, optional
        A new figure when None.
    include_values : bool, optional
        Write each value in its cell; default only when the matrix has at
        most 15 rows and columns.
    cmap : str, default="Blues"
        Colour map.

    Returns
    -------
    matplotlib.axes.Axes
        The matrix shown is ``ax.images[0].get_array()``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skstego.plotting import plot_confusion_matrix
    >>> ax = plot_confusion_matrix([[3, 1], [0, 4]], ["sky", "road"],
    ...                            normalize="true")
    >>> ax.images[0].get_array().tolist()
    [[0.75, 0.25], [0.0, 1.0]]
    """
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(
            f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}."
        )
    cm = _to_numpy(confusion)
    if cm.ndim != 2 or cm.size == 0:
        raise ValueError(
            f"confusion must be a non-empty 2-D matrix (n_classes, n_pred), got "
            f"shape {cm.shape}."
        )
    if cm.dtype.kind not in "iuf" or not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError("confusion must hold finite, non-negative counts.")
    cm = cm.astype(np.float64)
    n_rows, n_cols = cm.shape
    if class_names is not None and len(class_names) != n_rows:
        raise ValueError(
            f"class_names has {len(class_names)} names but the matrix has "
            f"{n_rows} rows (true classes)."
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        if normalize == "true":
            cm = cm / cm.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            cm = cm / cm.sum(axis=0, keepdims=True)
        elif normalize == "all":
            cm = cm / cm.sum()
    cm = np.nan_to_num(cm)
    rows = _class_names(class_names, n_rows)
    cols = rows if n_cols == n_rows else [str(j) for j in range(n_cols)]
    if ax is None:
        side = max(3.5, 0.35 * max(n_rows, n_cols) + 2.0)
        _, ax = _pyplot().subplots(figsize=(side + 1.0, side))
    im = ax.imshow(cm, cmap=cmap, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if include_values is None:
        include_values = max(n_rows, n_cols) <= 15
    if include_values:
        fmt = ".0f" if normalize is None else ".2f"
        threshold = (cm.max() + cm.min()) / 2.0
        for i in range(n_rows):
            for j in range(n_cols):
                ax.text(
                    j,
                    i,
                    format(cm[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize="small",
                    color="white" if cm[i, j] > threshold else "black",
                )
    ax.set_xticks(np.arange(n_cols), cols, rotation=60, ha="right")
    ax.set_yticks(np.arange(n_rows), rows)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    return ax


def plot_dimension_sweep(
    results: Any,
    *,
    metric: str = "miou",
    probe: str | None = None,
    ax: Any = None,
    errorbar: str | None = "sd",
    logx: bool = True,
) -> Axes | Figure:
    """The study's figure: a score against the reduced dimension, per reducer.

    One line per reducer (in the order they first appear) through the mean
    over seeds at each dimension, with a band for the spread.

    Parameters
    ----------
    results : pandas.DataFrame or list of dict
        The study's tidy table, one row per run, with columns ``reducer``
        (str), ``dim`` (int), ``probe`` (str, e.g. "kmeans", "linear"),
        ``seed`` (int) and the ``metric`` column; extra columns are ignored.
    metric : str, default="miou"
        Column to plot. ``"miou"`` and ``"accuracy"`` are fractions in
        [0, 1] and are plotted x100 (axis "mIoU (%)", "Pixel accuracy (%)");
        any other numeric column is plotted as is.
    probe : str, optional
        Plot only this probe. With None and several probes in ``results``,
        one subplot per probe (sharing the y axis).
    ax : matplotlib Axes or sequence of Axes, optional
        One Axes per probe plotted; a new figure when None.
    errorbar : {"sd", "minmax", None}, default="sd"
        Band of mean +- standard deviation over seeds (pandas' ``std``,
        ddof=1; no band with one seed), of the min-max range, or none.
    logx : bool, default=True
        Log2 x axis with the dimensions as tick labels.

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The Axes for one probe, the Figure for several. ``ax.lines`` holds
        one mean line per reducer, labelled with its name.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skstego.plotting import plot_dimension_sweep
    >>> rows = [{"reducer": r, "dim": d, "probe": "kmeans", "seed": s,
    ...          "miou": 0.2 + 0.01 * d + 0.01 * s}
    ...         for r in ("PCA", "RP") for d in (8, 16, 32) for s in (0, 1)]
    >>> ax = plot_dimension_sweep(rows)
    >>> ax.lines[0].get_ydata().round(1).tolist()
    [28.5, 36.5, 52.5]
    """
    import pandas as pd

    if errorbar not in ("sd", "minmax", None):
        raise ValueError(f"errorbar must be 'sd', 'minmax' or None, got {errorbar!r}.")
    df = results if isinstance(results, pd.DataFrame) else pd.DataFrame(results)
    missing = [c for c in ("reducer", "dim", "probe", "seed", metric) if c not in df]
    if missing:
        raise ValueError(
            f"results lacks the column(s) {missing}; expected the tidy format "
            f"with columns reducer, dim, probe, seed and {metric!r} (got "
            f"{list(df.columns)})."
        )
    if df.empty:
        raise ValueError("results has no rows.")
    values = pd.to_numeric(df[metric], errors="coerce")
    dims = pd.to_numeric(df["dim"], errors="coerce")
    if dims.isna().any() or (dims <= 0).any():
        raise ValueError("results['dim'] must hold positive numbers.")
    if values.isna().all():
        raise ValueError(f"results[{metric!r}] holds no numbers.")
    scale = 100.0 if metric in _METRIC_LABELS else 1.0
    df = df.assign(_dim=dims, _value=values * scale)
    reducers = list(pd.unique(df["reducer"]))
    probes = list(pd.unique(df["probe"]))
    if probe is not None:
        if probe not in probes:
            raise ValueError(f"probe={probe!r} is not in results; found {probes}.")
        probes = [probe]
    if ax is None:
        fig, axes = _pyplot().subplots(
            1,
            len(probes),
            figsize=(4.5 * len(probes), 3.5),
            squeeze=False,
            sharey=True,
        )
        axes = list(axes.ravel())
    else:
        axes = list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != len(probes):
            raise ValueError(
                f"results hold {len(probes)} probes {probes}: pass probe=... or "
                f"one Axes per probe, got {len(axes)} Axes."
            )
        fig = axes[0].figure
    for axi, name in zip(axes, probes, strict=True):
        sub = df[df["probe"] == name]
        for i, reducer in enumerate(reducers):
            runs = sub[sub["reducer"] == reducer]
            if runs.empty:
                continue
            stats = runs.groupby("_dim")["_value"].agg(["mean", "std", "min", "max"])
            x = stats.index.to_numpy(dtype=float)
            color = f"C{i % 10}"
            axi.plot(
                x, stats["mean"].to_numpy(), marker="o", color=color, label=str(reducer)
            )
            if errorbar == "sd":
                sd = stats["std"].fillna(0.0).to_numpy()
                lo, hi = stats["mean"] - sd, stats["mean"] + sd
            elif errorbar == "minmax":
                lo, hi = stats["min"], stats["max"]
            if errorbar is not None:
                axi.fill_between(
                    x,
                    np.asarray(lo),
                    np.asarray(hi),
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
        ticks = np.sort(sub["_dim"].unique())
        if logx:
            axi.set_xscale("log", base=2)
            axi.minorticks_off()
        axi.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axi.set_xlabel("dim")
        axi.set_title(str(name))
        axi.grid(alpha=0.3)
        axi.legend(fontsize="small")
    axes[0].set_ylabel(_METRIC_LABELS.get(metric, metric))
    return axes[0] if len(axes) == 1 else fig


_MECHANISM_LABELS = {
    "miou": "mIoU (%)",
    "accuracy": "Pixel accuracy (%)",
    "n_iter": "k-means iterations to converge",
    "inertia": "k-means inertia (train)",
    "silhouette": "Silhouette (test)",
    "davies_bouldin": "Davies-Bouldin (test, lower is better)",
    "stability_ari": "Seed stability (ARI)",
    "ece": "ECE (test)",
}

#: The panels :func:`plot_mechanisms` draws by default.
MECHANISM_PANELS = ("miou", "n_iter", "inertia", "silhouette", "stability_ari")


def plot_mechanisms(
    results: Any,
    *,
    probe: str | None = None,
    columns: Sequence[str] = MECHANISM_PANELS,
    errorbar: str | None = "sd",
    logx: bool = True,
    axes: Any = None,
) -> Figure:
    """The study's two mechanisms against the dimension, next to mIoU.

    One panel per column of ``run_sweep(..., mechanisms=True)``'s table,
    one line per reducer (mean over seeds, band for the spread), each drawn
    by :func:`plot_dimension_sweep`: by default mIoU, k-means iterations to
    converge and inertia (mechanism 1: k-means converges better in fewer
    dimensions), silhouette and seed stability (mechanism 2: the codes form
    more distinct, reproducible clusters). Columns missing from
    ``results`` or without a number for ``probe`` (e.g. stability with one
    seed) are left out.

    Parameters
    ----------
    results : pandas.DataFrame or list of dict
        The table of :func:`skstego.study.run_sweep` with ``mechanisms=True``.
    probe : str, optional
        Probe whose rows are drawn; default: the first with a number in
        ``n_iter`` (a cluster probe), else the first probe.
    columns : sequence of str, default=MECHANISM_PANELS
        Columns to draw, one panel each, in order.
    errorbar : {"sd", "minmax", None}, default="sd"
        As :func:`plot_dimension_sweep`.
    logx : bool, default=True
        Log2 x axis with the dimensions as tick labels.
    axes : sequence of matplotlib Axes, optional
        One Axes per panel drawn; a new figure (one row) when None.

    Returns
    -------
    matplotlib.figure.Figure
        Its panels' titles are the columns drawn; each panel's ``lines``
        hold one mean line per reducer.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skstego.plotting import plot_mechanisms
    >>> rows = [{"reducer": r, "dim": d, "probe": "kmeans", "seed": s,
    ...          "miou": 0.5 - 0.01 * d, "n_iter": 5 + d, "inertia": 10.0 * d,
    ...          "silhouette": 0.4 - 0.01 * d, "stability_ari": 0.9}
    ...         for r in ("PCA", "RP") for d in (4, 8, 16) for s in (0, 1)]
    >>> fig = plot_mechanisms(rows)
    >>> [ax.get_title() for ax in fig.axes]
    ['miou', 'n_iter', 'inertia', 'silhouette', 'stability_ari']
    >>> fig.axes[1].lines[0].get_ydata().tolist()
    [9.0, 13.0, 21.0]
    """
    import pandas as pd

    df = results if isinstance(results, pd.DataFrame) else pd.DataFrame(results)
    if isinstance(columns, str):
        columns = [columns]
    missing = [c for c in ("reducer", "dim", "probe", "seed") if c not in df]
    if missing:
        raise ValueError(
            f"results lacks the column(s) {missing}; expected the table of "
            f"skstego.study.run_sweep (got {list(df.columns)})."
        )
    if df.empty:
        raise ValueError("results has no rows.")
    probes = list(pd.unique(df["probe"]))
    if probe is None:
        probe = probes[0]
        if "n_iter" in df:
            iters = pd.to_numeric(df["n_iter"], errors="coerce")
            clustered = df["probe"][iters.notna()]
            probe = clustered.iloc[0] if len(clustered) else probe
    elif probe not in probes:
        raise ValueError(f"probe={probe!r} is not in results; found {probes}.")
    rows = df[df["probe"] == probe]
    drawn = [
        c
        for c in columns
        if c in rows and pd.to_numeric(rows[c], errors="coerce").notna().any()
    ]
    if not drawn:
        raise ValueError(
            f"results hold no numbers in {list(columns)} for probe {probe!r}: run "
            "run_sweep(..., mechanisms=True) and pick a cluster probe."
        )
    if axes is None:
        fig, grid = _pyplot().subplots(
            1, len(drawn), figsize=(3.6 * len(drawn), 3.4), squeeze=False
        )
        axes = list(grid.ravel())
    else:
        axes = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(axes) != len(drawn):
            raise ValueError(
                f"{len(drawn)} panels to draw ({drawn}) but got {len(axes)} Axes."
            )
        fig = axes[0].figure
    for axi, column in zip(axes, drawn, strict=True):
        plot_dimension_sweep(
            rows, metric=column, probe=probe, ax=axi, errorbar=errorbar, logx=logx
        )
        axi.set_title(column)
        axi.set_ylabel(_MECHANISM_LABELS.get(column, column))
        if axi is not axes[0]:
            legend = axi.get_legend()
            if legend is not None:
                legend.remove()
    fig.suptitle(f"probe {probe}: mIoU and the two mechanisms against the dim")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------
# The computation lives in skstego._calibration (public as
# skstego.metrics.expected_calibration_error); the diagram draws its bins.
def _expected_calibration_error(y_true: Any, proba: Any, *, n_bins: int = 15) -> float:
    """ECE; see :func:`~skstego.metrics.expected_calibration_error`."""
    return expected_calibration_error(y_true, proba, n_bins=n_bins)


def plot_reliability_diagram(
    y_true: Any, proba: Any, *, n_bins: int = 15, ax: Axes | None = None
) -> Axes:
    """Reliability diagram: accuracy against confidence, ECE in the title.

    Pixels (or samples) are grouped in ``n_bins`` equal-width bins of their
    maximum probability; bin ``b`` holds confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (as
    :func:`sklearn.calibration.calibration_curve`). Each non-empty bin gets a
    bar as high as the fraction of its pixels whose top class is right; a
    perfectly calibrated model follows the diagonal. The title gives the
    expected calibration error ``sum_b (n_b / n) |accuracy_b - confidence_b|``
    in %.

    Parameters
    ----------
    y_true : array-like or torch.Tensor of int, (n,) or (N, H, W)
        True classes; negative labels (-1) are ignored.
    proba : array-like or torch.Tensor, (n, K) or (N, K, H, W)
        Class probabilities in [0, 1], e.g. ``LinearProbe.predict_proba``
        resized to the label size.
    n_bins : int, default=15
        Number of bins.
    ax : matplotlib Axes, optional
        A new figure when None.

    Returns
    -------
    matplotlib.axes.Axes
        One bar per non-empty bin in ``ax.patches``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skstego.plotting import plot_reliability_diagram
    >>> proba = [[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.42, 0.58]]
    >>> ax = plot_reliability_diagram([0, 1, 1, 1], proba, n_bins=5)
    >>> ax.get_title()
    'ECE 23.0%'
    >>> [float(p.get_height()) for p in ax.patches]
    [1.0, 0.5, 1.0]
    """
    n_bins = check_n_bins(n_bins)
    conf, correct = confidence_and_correct(y_true, proba)
    bins = calibration_bins(conf, correct, n_bins)
    ece = ece_from_bins(bins)
    filled = bins["counts"] > 0
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(3.8, 3.8))
    width = 1.0 / n_bins
    ax.bar(
        bins["edges"][:-1][filled],
        bins["accuracy"][filled],
        width=width,
        align="edge",
        color="C0",
        edgecolor="0.2",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("Confidence (max probability)")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"ECE {100 * ece:.1f}%")
    ax.legend(loc="upper left", fontsize="small")
    return ax
