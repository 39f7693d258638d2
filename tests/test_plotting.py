"""Tests of skstego.plotting: figures drawn to PNG, their data checked against
palette indexing, alpha blending, pandas, sklearn and hand-worked numbers."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from skstego.datasets import default_palette
from skstego.metrics import segmentation_report
from skstego.plotting import (
    _expected_calibration_error,
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

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 200, 10]], np.uint8)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def render(fig, tmp_path, name="figure.png"):
    """Save ``fig`` as a PNG and read its RGB pixels back."""
    path = tmp_path / name
    fig.savefig(path, dpi=80)
    return np.asarray(Image.open(path).convert("RGB"))


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def has_colour(pixels, rgb):
    return bool(np.any(np.all(pixels == np.asarray(rgb, np.uint8), axis=-1)))


# --------------------------------------------------------------------------
# colorize, overlay
# --------------------------------------------------------------------------
def test_colorize_is_palette_indexing(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 4, size=(2, 6, 7))
    expected = np.zeros((2, 6, 7, 3), np.uint8)  # ignored pixels black
    for idx in np.ndindex(labels.shape):
        if labels[idx] >= 0:
            expected[idx] = PALETTE[labels[idx]]
    np.testing.assert_array_equal(colorize(labels, PALETTE), expected)
    # torch in, NumPy image out; one map
    out = colorize(torch.from_numpy(labels[0]), torch.from_numpy(PALETTE))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected[0])
    # what is written to a PNG is exactly that image
    plt.imsave(tmp_path / "c.png", out)
    png = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    np.testing.assert_array_equal(png, expected[0])


def test_colorize_default_palette():
    labels = np.array([[0, 2], [-1, 1]])
    np.testing.assert_array_equal(
        colorize(labels)[labels >= 0], default_palette(3)[labels[labels >= 0]]
    )


@pytest.mark.parametrize(
    ("labels", "palette", "match"),
    [
        (np.zeros(5, int), None, "label map"),
        (np.zeros((2, 2, 2, 2), int), None, "label map"),
        (np.array([[0.5, 1.0]]), None, "Unknown label type"),
        (np.array([[0, 4]]), PALETTE, "palette has 4 colours"),
        (np.array([[0, 1]]), PALETTE[:, :2], r"shape \(n_classes, 3\)"),
        (np.array([[0, 1]]), PALETTE * 2.0, r"\[0, 255\]"),
    ],
)
def test_colorize_rejects_bad_input(labels, palette, match):
    with pytest.raises(ValueError, match=match):
        colorize(labels, palette)


def test_overlay_is_the_alpha_blend():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = rng.integers(-1, 4, size=(5, 4))
    before = image.copy()
    alpha = 0.3
    expected = image.copy()
    for i, j in np.ndindex(labels.shape):
        if labels[i, j] >= 0:
            mix = (1 - alpha) * image[i, j] + alpha * PALETTE[labels[i, j]].astype(
                float
            )
            expected[i, j] = np.rint(mix)
    np.testing.assert_array_equal(
        overlay(image, labels, palette=PALETTE, alpha=alpha), expected
    )
    np.testing.assert_array_equal(image, before)  # input untouched
    # a channels-first float tensor in [0, 1] gives the same picture
    chw = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(
        overlay(chw, torch.from_numpy(labels), palette=PALETTE, alpha=alpha), expected
    )


def test_overlay_resizes_labels_by_nearest_neighbour():
    image = np.full((6, 4, 3), 40, np.uint8)
    small = np.array([[0, 1], [2, -1], [3, 0]])  # each label covers 2 x 2 pixels
    big = np.kron(small, np.ones((2, 2), int))
    np.testing.assert_array_equal(
        overlay(image, small, palette=PALETTE), overlay(image, big, palette=PALETTE)
    )


@pytest.mark.parametrize(
    ("image", "labels", "kwargs", "match"),
    [
        (np.zeros((4, 4, 3), np.uint8), np.zeros(4, int), {}, "label map"),
        (np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), int), {}, "RGB image"),
        (np.full((4, 4, 3), 2.0), np.zeros((4, 4), int), {}, r"\[0, 1\]"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), int), {"alpha": 2}, "alpha"),
    ],
)
def test_overlay_rejects_bad_input(image, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlay(image, labels, **kwargs)


# --------------------------------------------------------------------------
# plot_segmentation, plot_palette
# --------------------------------------------------------------------------
def test_plot_segmentation_panels_legend_and_pixels(tmp_path):
    image = np.full((16, 16, 3), 128, np.uint8)
    y_true = np.zeros((16, 16), int)
    y_true[8:] = 2
    y_true[0, 0] = -1
    y_pred = np.zeros((8, 8), int)  # another size: each panel shows its own map
    y_pred[4:] = 1
    names = ["sky", "grass", "road", "water"]
    fig = plot_segmentation(image, y_pred, y_true, palette=PALETTE, class_names=names)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["image", "ground truth", "prediction"]
    np.testing.assert_array_equal(axes[0].images[0].get_array(), image)
    np.testing.assert_array_equal(
        axes[1].images[0].get_array(), colorize(y_true, PALETTE)
    )
    np.testing.assert_array_equal(
        axes[2].images[0].get_array(), colorize(y_pred, PALETTE)
    )
    assert legend_texts(axes[2]) == ["sky", "grass", "road"]  # water is absent
    pixels = render(fig, tmp_path)
    for c in range(3):
        assert has_colour(pixels, PALETTE[c])
    assert not has_colour(pixels, PALETTE[3])


def test_plot_segmentation_confidence_torch_and_given_axes(tmp_path):
    proba = torch.softmax(torch.randn(3, 8, 8), dim=0)
    y_pred = proba.argmax(dim=0)
    fig, row = plt.subplots(2, 3)
    out = plot_segmentation(
        torch.rand(3, 8, 8), y_pred, confidence=proba, axes=row[1], legend=False
    )
    assert out is fig
    assert [ax.get_title() for ax in row[1]] == ["image", "prediction", "confidence"]
    np.testing.assert_allclose(
        row[1][2].images[0].get_array(), proba.max(dim=0).values.numpy(), rtol=1e-6
    )
    assert row[1][1].get_legend() is None
    assert len(fig.axes) == 7  # six panels and the confidence colour bar
    render(fig, tmp_path)
    with pytest.raises(ValueError, match="axes must hold 3 Axes"):
        plot_segmentation(
            np.zeros((8, 8, 3)), y_pred, confidence=proba, axes=row[0][:2]
        )
    with pytest.raises(ValueError, match="confidence"):
        plot_segmentation(np.zeros((8, 8, 3)), y_pred, confidence=2 * proba)
    with pytest.raises(ValueError, match="y_true must be a 2-D"):
        plot_segmentation(np.zeros((8, 8, 3)), y_pred, y_true=np.zeros((1, 8, 8)))


def test_plot_palette_swatches(tmp_path):
    names = ["sky", "grass", "road", "water"]
    ax = plot_palette(PALETTE, names, ncol=2)
    assert legend_texts(ax) == names
    faces = [h.get_facecolor()[:3] for h in ax.get_legend().legend_handles]
    np.testing.assert_allclose(faces, PALETTE / 255.0)
    pixels = render(ax.figure, tmp_path)
    for colour in PALETTE:
        assert has_colour(pixels, colour)
    with pytest.raises(ValueError, match="one name per colour"):
        plot_palette(PALETTE, names[:2])


# --------------------------------------------------------------------------
# plot_class_iou, plot_confusion_matrix
# --------------------------------------------------------------------------
Y_TRUE = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3, -1])
Y_PRED = np.array([0, 0, 1, 1, 1, 3, 3, 3, 1, 3])  # class 2 absent: IoU NaN


def test_plot_class_iou_bars_are_the_report(tmp_path):
    report = segmentation_report(Y_TRUE, Y_PRED, n_classes=4)
    assert np.isnan(report["iou"][2])
    names = ["a", "b", "c", "d"]
    ax = plot_class_iou(report, names)
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, 100 * report["iou"][[0, 1, 3]])
    centres = [p.get_x() + p.get_width() / 2 for p in ax.patches]
    np.testing.assert_allclose(centres, [0, 1, 3])  # no bar for the NaN class
    assert "n/a" in [t.get_text() for t in ax.texts]
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_ydata(), 100 * report["miou"])
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    render(ax.figure, tmp_path)


def test_plot_class_iou_sorted_array():
    iou = np.array([0.2, np.nan, 0.9, 0.5])
    ax = plot_class_iou(iou, ["a", "b", "c", "d"], sort=True)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c", "d", "a", "b"]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [90, 50, 20])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 100 * np.nanmean(iou))


@pytest.mark.parametrize(
    ("value", "names", "match"),
    [
        (np.ones((2, 2)), None, "1-D"),
        (np.array([0.5, 45.0]), None, r"fractions in \[0, 1\]"),
        ({"miou": 0.5}, None, "'iou'"),
        (np.array([0.5, 0.4]), ["a"], "class_names has 1"),
    ],
)
def test_plot_class_iou_rejects_bad_input(value, names, match):
    with pytest.raises(ValueError, match=match):
        plot_class_iou(value, names)


@pytest.mark.parametrize("normalize", [None, "true", "pred", "all"])
def test_plot_confusion_matrix_normalisations(tmp_path, normalize):
    rng = np.random.default_rng(2)
    y_true, y_pred = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    y_pred[y_pred == 2] = 1  # an empty column: 0 where "pred" divides by 0
    counts = sk_confusion_matrix(y_true, y_pred, labels=[0, 1, 2])
    ax = plot_confusion_matrix(counts, ["a", "b", "c"], normalize=normalize)
    shown = np.asarray(ax.images[0].get_array())
    if normalize == "true":
        expected = counts / counts.sum(axis=1, keepdims=True)
    elif normalize == "pred":
        col = counts.sum(axis=0, keepdims=True)
        expected = np.divide(counts, col, out=np.zeros(counts.shape), where=col > 0)
    elif normalize == "all":
        expected = counts / counts.sum()
    else:
        expected = counts
    np.testing.assert_allclose(shown, expected)
    # scikit-learn normalises the same way (rows true, columns predicted)
    np.testing.assert_allclose(
        shown,
        sk_confusion_matrix(y_true, y_pred, labels=[0, 1, 2], normalize=normalize),
    )
    fmt = ".0f" if normalize is None else ".2f"
    assert [t.get_text() for t in ax.texts] == [format(v, fmt) for v in expected.flat]
    assert ax.get_ylabel() == "True label"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    render(ax.figure, tmp_path)


def test_plot_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="normalize must be"):
        plot_confusion_matrix(np.eye(2), normalize="rows")
    with pytest.raises(ValueError, match="2-D"):
        plot_confusion_matrix(np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        plot_confusion_matrix(-np.eye(2))
    with pytest.raises(ValueError, match="2 rows"):
        plot_confusion_matrix(np.eye(2), ["a", "b", "c"])


# --------------------------------------------------------------------------
# plot_dimension_sweep
# --------------------------------------------------------------------------
def sweep_results():
    rng = np.random.default_rng(3)
    rows = [
        {
            "reducer": reducer,
            "dim": dim,
            "probe": probe,
            "seed": seed,
            "miou": rng.uniform(0.1, 0.6),
            "accuracy": rng.uniform(0.3, 0.9),
            "fit_seconds": rng.uniform(0, 1),  # extra column, ignored
        }
        for reducer in ("PCA", "RP", "STEGO")
        for dim in (8, 32, 128)
        for probe in ("kmeans", "linear")
        for seed in range(3)
    ]
    return pd.DataFrame(rows)


def assert_band(band, xs, lo, hi):
    """The filled polygon spans exactly [lo, hi] at each x."""
    vertices = band.get_paths()[0].vertices
    for x, low, high in zip(xs, lo, hi, strict=True):
        ys = vertices[np.isclose(vertices[:, 0], x), 1]
        np.testing.assert_allclose([ys.min(), ys.max()], [low, high])


@pytest.mark.parametrize("metric", ["miou", "accuracy"])
def test_plot_dimension_sweep_lines_are_groupby_means(tmp_path, metric):
    df = sweep_results()
    ax = plot_dimension_sweep(df, metric=metric, probe="linear")
    sub = df[df["probe"] == "linear"]
    means = sub.groupby(["reducer", "dim"])[metric].mean()
    sds = sub.groupby(["reducer", "dim"])[metric].std()
    assert [line.get_label() for line in ax.lines] == ["PCA", "RP", "STEGO"]
    for line, band in zip(ax.lines, ax.collections, strict=True):
        reducer = line.get_label()
        np.testing.assert_array_equal(line.get_xdata(), [8, 32, 128])
        np.testing.assert_allclose(line.get_ydata(), 100 * means[reducer].to_numpy())
        lo = 100 * (means[reducer] - sds[reducer]).to_numpy()
        hi = 100 * (means[reducer] + sds[reducer]).to_numpy()
        assert_band(band, [8, 32, 128], lo, hi)  # mean +- sd
    assert (
        ax.get_ylabel()
        == {"miou": "mIoU (%)", "accuracy": "Pixel accuracy (%)"}[metric]
    )
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "32", "128"]
    render(ax.figure, tmp_path)


def test_plot_dimension_sweep_one_subplot_per_probe_minmax(tmp_path):
    df = sweep_results()
    fig = plot_dimension_sweep(df.to_dict("records"), errorbar="minmax", logx=False)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["kmeans", "linear"]
    for ax in axes:
        sub = df[df["probe"] == ax.get_title()]
        stats = sub.groupby(["reducer", "dim"])["miou"].agg(["mean", "min", "max"])
        for line, band in zip(ax.lines, ax.collections, strict=True):
            reducer = line.get_label()
            np.testing.assert_allclose(
                line.get_ydata(), 100 * stats.loc[reducer, "mean"].to_numpy()
            )
            assert_band(
                band,
                [8, 32, 128],
                100 * stats.loc[reducer, "min"].to_numpy(),
                100 * stats.loc[reducer, "max"].to_numpy(),
            )
        assert ax.get_xscale() == "linear"
    render(fig, tmp_path)


# --------------------------------------------------------------------------
# plot_mechanisms
# --------------------------------------------------------------------------
def mechanism_results(seeds=(0, 1, 2)):
    """A sweep table as run_sweep(..., mechanisms=True) writes it: cluster
    columns for k-means, NaN for the linear probe, stability NaN at seed 0."""
    df = sweep_results()
    df = df[df["seed"].isin(seeds)].copy()
    rng = np.random.default_rng(4)
    kmeans = df["probe"] == "kmeans"
    for column, low, high in (
        ("n_iter", 3, 40),
        ("inertia", 10.0, 500.0),
        ("silhouette", -0.2, 0.8),
        ("stability_ari", 0.2, 1.0),
    ):
        df[column] = np.where(kmeans, rng.uniform(low, high, len(df)), np.nan)
    df["ece"] = rng.uniform(0.0, 0.3, len(df))  # every probe has probabilities
    df.loc[df["seed"] == 0, "stability_ari"] = np.nan
    df["inertia_curve"] = "[]"
    return df


def test_plot_mechanisms_panels_are_groupby_means(tmp_path):
    df = mechanism_results()
    fig = plot_mechanisms(df)  # the cluster probe (the one with n_iter)
    titles = ["miou", "n_iter", "inertia", "silhouette", "stability_ari"]
    assert [ax.get_title() for ax in fig.axes] == titles
    sub = df[df["probe"] == "kmeans"]
    for ax, column in zip(fig.axes, titles, strict=True):
        means = sub.groupby(["reducer", "dim"])[column].mean()  # NaN skipped
        scale = 100 if column == "miou" else 1
        assert [line.get_label() for line in ax.lines] == ["PCA", "RP", "STEGO"]
        for line in ax.lines:
            np.testing.assert_array_equal(line.get_xdata(), [8, 32, 128])
            np.testing.assert_allclose(
                line.get_ydata(), scale * means[line.get_label()].to_numpy()
            )
    assert fig.axes[0].get_legend() is not None  # one legend, on the first
    assert all(ax.get_legend() is None for ax in fig.axes[1:])
    assert fig.axes[1].get_ylabel() == "k-means iterations to converge"
    render(fig, tmp_path)


def test_plot_mechanisms_leaves_out_what_has_no_numbers(tmp_path):
    one_seed = mechanism_results(seeds=(0,)).drop(columns="inertia")
    _, axes = plt.subplots(1, 3)
    fig = plot_mechanisms(one_seed, axes=axes)  # no inertia, stability all NaN
    assert [ax.get_title() for ax in fig.axes] == ["miou", "n_iter", "silhouette"]
    linear = plot_mechanisms(mechanism_results(), probe="linear", columns=["ece"])
    with pytest.raises(ValueError, match="no numbers"):
        plot_mechanisms(mechanism_results(), probe="linear", columns=["n_iter"])
    assert [ax.get_title() for ax in linear.axes] == ["ece"]
    with pytest.raises(ValueError, match="probe='svm' is not in results"):
        plot_mechanisms(mechanism_results(), probe="svm")
    with pytest.raises(ValueError, match="lacks the column"):
        plot_mechanisms(mechanism_results().drop(columns="dim"))
    with pytest.raises(ValueError, match="5 panels to draw"):
        plot_mechanisms(mechanism_results(), axes=axes)
    render(fig, tmp_path)


def test_plot_dimension_sweep_rejects_bad_input():
    df = sweep_results()
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['seed'\]"):
        plot_dimension_sweep(df.drop(columns="seed"))
    with pytest.raises(ValueError, match="lacks the column"):
        plot_dimension_sweep(df, metric="f1")
    with pytest.raises(ValueError, match="probe='svm' is not in results"):
        plot_dimension_sweep(df, probe="svm")
    with pytest.raises(ValueError, match="errorbar"):
        plot_dimension_sweep(df, errorbar="ci")
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="2 probes"):
        plot_dimension_sweep(df, ax=ax)


# --------------------------------------------------------------------------
# plot_reliability_diagram
# --------------------------------------------------------------------------
# Hand-worked example: 10 labelled samples (one more ignored), 3 classes,
# 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1].
#
#   sample  proba              y   conf  pred  right  bin
#   1       .35 .33 .32        0   .35   0     yes    1
#   2       .30 .38 .32        2   .38   1     no     1
#   3       .50 .30 .20        0   .50   0     yes    2
#   4       .20 .55 .25        0   .55   1     no     2
#   5       .10 .15 .75        2   .75   2     yes    3
#   6       .70 .20 .10        0   .70   0     yes    3
#   7       .65 .30 .05        1   .65   0     no     3
#   8       .05 .90 .05        1   .90   1     yes    4
#   9       .95 .03 .02        0   .95   0     yes    4
#   10      .05 .05 .90        2   .90   2     yes    4
#   11      .90 .05 .05       -1   ignored
#
#   bin 1: n 2, accuracy 1/2, confidence .365
#   bin 2: n 2, accuracy 1/2, confidence .525
#   bin 3: n 3, accuracy 2/3, confidence .70
#   bin 4: n 3, accuracy 1,   confidence 2.75 / 3
#   ECE = (2 * .135 + 2 * .025 + 3 * (.70 - 2/3) + 3 * (1 - 2.75/3)) / 10
#       = (.27 + .05 + .10 + .25) / 10 = .067
# --------------------------------------------------------------------------
PROBA = np.array(
    [
        [0.35, 0.33, 0.32],
        [0.30, 0.38, 0.32],
        [0.50, 0.30, 0.20],
        [0.20, 0.55, 0.25],
        [0.10, 0.15, 0.75],
        [0.70, 0.20, 0.10],
        [0.65, 0.30, 0.05],
        [0.05, 0.90, 0.05],
        [0.95, 0.03, 0.02],
        [0.05, 0.05, 0.90],
        [0.90, 0.05, 0.05],
    ]
)
Y = np.array([0, 2, 0, 0, 2, 0, 1, 1, 0, 2, -1])


def test_reliability_diagram_by_hand(tmp_path):
    ax = plot_reliability_diagram(Y, PROBA, n_bins=5)
    bars = ax.patches
    np.testing.assert_allclose([b.get_x() for b in bars], [0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose([b.get_width() for b in bars], [0.2] * 4)
    np.testing.assert_allclose([b.get_height() for b in bars], [1 / 2, 1 / 2, 2 / 3, 1])
    assert ax.get_title() == "ECE 6.7%"
    assert _expected_calibration_error(Y, PROBA, n_bins=5) == pytest.approx(0.067)
    # scikit-learn's calibration curve of "top class right" against confidence
    keep = Y >= 0
    right = PROBA[keep].argmax(axis=1) == Y[keep]
    acc, _ = calibration_curve(right, PROBA[keep].max(axis=1), n_bins=5)
    np.testing.assert_allclose([b.get_height() for b in bars], acc)
    xs, ys = ax.lines[0].get_data()  # the diagonal
    np.testing.assert_array_equal(xs, ys)
    render(ax.figure, tmp_path)


def test_reliability_diagram_label_maps_equal_flat_samples():
    rng = np.random.default_rng(4)
    proba = torch.softmax(torch.from_numpy(rng.normal(size=(2, 4, 5, 6))), dim=1)
    labels = torch.from_numpy(rng.integers(-1, 4, size=(2, 5, 6)))
    flat_p = proba.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    flat_y = labels.reshape(-1).numpy()
    ax_maps = plot_reliability_diagram(labels, proba, n_bins=7)
    ax_flat = plot_reliability_diagram(flat_y, flat_p, n_bins=7)
    assert [b.get_height() for b in ax_maps.patches] == [
        b.get_height() for b in ax_flat.patches
    ]
    assert ax_maps.get_title() == ax_flat.get_title()
    assert _expected_calibration_error(labels, proba, n_bins=7) == pytest.approx(
        _expected_calibration_error(flat_y, flat_p, n_bins=7)
    )


@pytest.mark.parametrize(
    ("y", "proba", "match"),
    [
        (Y[:10], PROBA, "do not match"),
        (Y.reshape(1, 11, 1), PROBA, r"\(N, K, H, W\)"),
        (Y, PROBA * 3 - 1, r"probabilities in \[0, 1\]"),
        (np.where(Y == 2, 3, Y), PROBA, "only 3 classes"),
        (np.full(11, -1), PROBA, "no labelled pixels"),
    ],
)
def test_reliability_diagram_rejects_bad_input(y, proba, match):
    with pytest.raises(ValueError, match=match):
        plot_reliability_diagram(y, proba)


def test_reliability_diagram_rejects_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        plot_reliability_diagram(Y, PROBA, n_bins=0)


@pytest.mark.gpu
def test_cuda_tensors_plot_like_cpu_ones():
    proba = torch.softmax(torch.randn(2, 4, 5, 6), dim=1)
    labels = torch.randint(-1, 4, (2, 5, 6))
    ax_cpu = plot_reliability_diagram(labels, proba, n_bins=6)
    ax_gpu = plot_reliability_diagram(labels.cuda(), proba.cuda(), n_bins=6)
    np.testing.assert_allclose(
        [b.get_height() for b in ax_gpu.patches],
        [b.get_height() for b in ax_cpu.patches],
    )
    np.testing.assert_array_equal(
        colorize(labels.cuda(), torch.from_numpy(PALETTE).cuda()),
        colorize(labels, PALETTE),
    )
    image = torch.rand(3, 5, 6, device="cuda")
    np.testing.assert_array_equal(
        overlay(image, labels[0].cuda(), palette=PALETTE),
        overlay(image.cpu(), labels[0], palette=PALETTE),
    )
