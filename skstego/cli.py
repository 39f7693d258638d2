"""The ``skstego`` command line: segment images, fit and evaluate models.

Four subcommands (``skstego COMMAND --help`` for all options)::

    skstego segment IMAGES... --out DIR      label + overlay PNG per image
    skstego fit IMAGES... --out MODEL.skstego
    skstego evaluate MODEL.skstego --dataset cocostuff27 --root DIR
    skstego evaluate --protocol stego --checkpoint STEGO.ckpt --dataset ... --root DIR
    skstego sweep --dataset cocostuff27 --root DIR --out DIR

``segment`` without ``--pipeline`` fits unsupervised on the images it is
given (DINO features, once; a reducer; k-means) and predicts them; with
``--pipeline`` (a file from ``skstego fit``) it only predicts. It is
resumable: images whose outputs exist are skipped (``--overwrite`` redoes
them); an unreadable image is reported and the others are still written.

Every error is one line on stderr. Exit codes: 0 success, 1 some images
failed (the others were written), 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from . import datasets
from ._device import maps_to_tokens, resolve_device
from ._version import __version__
from .datasets import ImageCollection, default_palette
from .datasets._collection import _read_image
from .datasets._loaders import _IMAGE_EXTENSIONS, _KeepBut255
from .features import DinoFeaturizer, FlipAveraged
from .features._dino import _check_torch_file
from .io import PUBLISHED_RESULTS, load, load_stego_checkpoint, save
from .metrics import confusion_matrix, report_from_confusion
from .postprocess import crf_refine
from .probes import KMeansProbe, LinearProbe
from .projection import RandomProjection, StegoProjector, TorchPCA
from .study import run_sweep, save_sweep_figures, summarize_sweep

__all__ = ["main"]

DEFAULT_MODEL = "vit_small_patch8_224.dino"
#: Image file extensions found in folders (the dataset loaders').
IMAGE_EXTENSIONS = _IMAGE_EXTENSIONS
#: Label value written for pixels without a class (unmatched clusters).
IGNORE_VALUE = 255

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2

EPILOG = """\
exit codes:
  0  success
  1  some images could not be read or segmented (listed on stderr; the
     others were written)
  2  usage or setup error (bad arguments, no images, unreadable model file,
     DINO weights unavailable offline: pass --weights FILE, or
     --random-weights for smoke tests)
"""


class _Formatter(argparse.HelpFormatter):
    """Wrapped descriptions; texts laid out by hand (the epilog) kept as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n  " in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(Exception):
    """A problem with the arguments or the setup: one line, exit code 2."""


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skstego`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    code : int
        0 on success, 1 when some images failed (the others were written),
        2 for usage and setup errors. Errors are printed as one line on
        stderr, without a traceback (``--debug`` shows it).

    Examples
    --------
    >>> from skstego.cli import main
    >>> main(["--version"])  # doctest: +ELLIPSIS
    skstego ...
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "command", None) is None:
        print(
            "skstego: error: choose a command: segment, fit, evaluate or sweep "
            "(see skstego --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        _check_files(args)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.run(args))
    except KeyboardInterrupt:
        print("skstego: interrupted", file=sys.stderr)
        return 130
    except (UsageError, OSError, ValueError, TypeError, RuntimeError) as exc:
        if args.debug:
            raise
        _error(exc)
        return EXIT_USAGE


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (and a pointer to --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {message} (see {self.prog} --help)\n",
        )


def _check_files(args: argparse.Namespace) -> None:
    """Refuse missing or unreadable --pipeline / --checkpoint / --weights files
    before any work, naming the option."""
    if getattr(args, "random_weights", False) and getattr(args, "weights", None):
        raise UsageError("--random-weights and --weights exclude each other.")
    for option in ("pipeline", "checkpoint", "weights"):
        value = getattr(args, option, None)
        if value is None:
            continue
        flag = f"--{option}"
        if os.path.isdir(value):
            raise UsageError(f"{flag} {value!r} is a folder; pass the file itself.")
        if not os.path.isfile(value):
            raise UsageError(
                f"{flag} {value!r} does not exist (paths are resolved from "
                f"{os.getcwd()!r})."
            )
        if option != "pipeline" and not value.endswith(".safetensors"):
            what = "checkpoint" if option == "checkpoint" else "weights file"
            try:
                _check_torch_file(Path(value), what)
            except ValueError as exc:
                raise UsageError(f"{flag}: {exc}") from None


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings as one line on stderr, without the source line behind them."""
    print(f"skstego: warning: {_one_line(str(message))}", file=sys.stderr)


def _error(exc: BaseException | str) -> None:
    text = str(exc) if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    print(f"skstego: error: {_one_line(text)}", file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parser() -> argparse.ArgumentParser:

    parser = _ArgumentParser(
        prog="skstego",
        description="Unsupervised semantic segmentation with DINO features "
        "(STEGO and its baselines).",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"skstego {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = _Formatter

    seg = sub.add_parser(
        "segment",
        help="segment images: a label PNG and an overlay PNG per image",
        description="Segment image files and folders (searched recursively). "
        "Without --pipeline, fit DINO features -> reducer -> k-means on the "
        "images themselves (unsupervised) and predict them; the fitted model "
        "is saved as OUT/pipeline.skstego. With --pipeline (a model file) or "
        "--checkpoint (a released STEGO .ckpt), only predict. "
        "Writes OUT/<name>_label.png (palette PNG of class ids, 255 = none), "
        "OUT/<name>_overlay.png and OUT/summary.csv / summary.json (with "
        "--confidence also OUT/<name>_confidence.png and OUT/<name>_margin.png). "
        "Outputs go to OUT/<folder name>/ for each folder given (OUT/ for "
        "files), with the size of the input images. OUT/run.json records the "
        "settings and the input files: a rerun skips images whose outputs "
        "exist and whose file is unchanged, predicts added or changed images "
        "with the saved model (no refit unless --refit), and refuses settings "
        "other than those OUT was made with (exit 2) unless --overwrite.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    seg.add_argument("images", nargs="+", metavar="IMAGES", help="files or folders")
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_backbone_args(seg, resolution_default=None)
    seg.add_argument(
        "--pipeline",
        metavar="FILE",
        help="a model from `skstego fit` (then --k and --projector are not "
        "used; --weights replaces the model's checkpoint path)",
    )
    seg.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a released STEGO checkpoint (.ckpt): its backbone, head and "
        "probe segment the images (read without running code from the file)",
    )
    seg.add_argument(
        "--probe",
        choices=("cluster", "linear"),
        default="cluster",
        help="with --checkpoint: its cluster probe (cluster ids) or its linear "
        "probe (classes) (default cluster)",
    )
    seg.add_argument(
        "--k", type=_positive_int, default=27, help="clusters (default 27)"
    )
    seg.add_argument(
        "--projector",
        default="pca:64",
        metavar="SPEC",
        help="reducer before k-means: pca:DIM, rp:DIM (random projection), "
        "none, or a FILE holding a fitted reducer (default pca:64)",
    )
    seg.add_argument(
        "--crf",
        action="store_true",
        help="refine with a dense CRF (skstego.postprocess.crf_refine)",
    )
    seg.add_argument(
        "--confidence",
        action="store_true",
        help="also write <name>_confidence.png (the top class probability of "
        "each pixel, x255 as 8-bit grey) and <name>_margin.png (top-1 minus "
        "top-2 probability), from the probe's predict_proba (after --crf), "
        "and each image's mean confidence in the summary",
    )
    seg.add_argument(
        "--alpha",
        type=_unit_float,
        default=0.5,
        help="opacity of the colours in the overlay (default 0.5)",
    )
    seg.add_argument(
        "--overwrite",
        action="store_true",
        help="start clean: redo every output (and refit), even under settings "
        "other than those OUT was made with",
    )
    seg.add_argument(
        "--refit",
        action="store_true",
        help="refit the model on all images and redo every output (a rerun "
        "otherwise predicts added images with the saved OUT/pipeline.skstego)",
    )
    _add_run_args(seg)
    seg.set_defaults(run=_segment)

    fit = sub.add_parser(
        "fit",
        help="fit a pipeline (featurizer, reducer, probe) and save it",
        description="Featurize the images (center crops), fit the reducer and "
        "the probe, and save the pipeline with skstego.io.save (no pickle). "
        "With --labels DIR (label PNGs named like the images: DIR/<name>.png, "
        "255 = ignore), k-means also learns its cluster-to-class mapping and "
        "--probe linear becomes possible.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    fit.add_argument("images", nargs="+", metavar="IMAGES", help="files or folders")
    fit.add_argument(
        "--out", required=True, metavar="MODEL.skstego", help="model file to write"
    )
    _add_backbone_args(fit, resolution_default=224)
    fit.add_argument(
        "--projector",
        default="pca:64",
        metavar="SPEC",
        help="pca:DIM, rp:DIM, stego:DIM (STEGO head) or none (default pca:64)",
    )
    fit.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="training steps of the STEGO head (default: StegoProjector's)",
    )
    fit.add_argument(
        "--k", type=_positive_int, default=27, help="k-means clusters (default 27)"
    )
    fit.add_argument("--labels", metavar="DIR", help="folder of label PNGs")
    fit.add_argument(
        "--probe", choices=("kmeans", "linear"), default="kmeans", help="probe"
    )
    _add_run_args(fit)
    fit.set_defaults(run=_fit)

    ev = sub.add_parser(
        "evaluate",
        help="score a model on a labelled dataset (mIoU, accuracy, per class)",
        description="Score a model from `skstego fit`, or a released STEGO "
        "checkpoint (--checkpoint), on a dataset in the STEGO layouts (see "
        "skstego.datasets). k-means models are scored as STEGO does, with "
        "clusters matched to classes by the Hungarian algorithm on the "
        "evaluation data; linear probes with their classes. --protocol stego "
        "is the reference evaluation (src/eval_segmentation.py of STEGO): "
        "320 px, nearest resize and centre crop of images and labels, codes "
        "averaged over the image and its mirror image, codes upsampled to the "
        "label size before the probe, the dataset's fixed class count, "
        "optional dense CRF; STEGO's published numbers are printed beside.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    ev.add_argument(
        "model",
        metavar="MODEL.skstego",
        nargs="?",
        default=None,
        help="model file from `skstego fit` (or give --checkpoint)",
    )
    ev.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a released STEGO checkpoint (.ckpt, read without running code)",
    )
    ev.add_argument(
        "--probe",
        choices=("cluster", "linear"),
        default="cluster",
        help="with --checkpoint: which of its probes to score (default cluster)",
    )
    ev.add_argument(
        "--weights",
        metavar="FILE",
        help="the backbone's weights file, replacing the path stored in "
        "MODEL.skstego (which moved, or was relative to another folder)",
    )
    ev.add_argument(
        "--protocol",
        choices=("skstego", "stego"),
        default="skstego",
        help="skstego: the model's resolution and preprocessing; stego: the "
        "reference evaluation (default skstego)",
    )
    ev.add_argument(
        "--extra-clusters",
        choices=("errors", "reference"),
        default=None,
        help="pixels of clusters beyond the classes: counted as errors, or "
        "dropped as the reference's UnsupervisedMetrics does (default: "
        "reference with --protocol stego, else errors)",
    )
    ev.add_argument(
        "--crf",
        action="store_true",
        help="refine the probabilities with a dense CRF before scoring",
    )
    ev.add_argument(
        "--dataset",
        required=True,
        choices=("cocostuff27", "cityscapes27", "potsdam3", "folder"),
    )
    ev.add_argument("--root", required=True, metavar="DIR", help="dataset folder")
    ev.add_argument(
        "--split",
        default=None,
        help="split (default: val; labelled_test for potsdam3)",
    )
    ev.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="center crop side (default: 320 with --protocol stego, else the "
        "model's featurizer resolution)",
    )
    ev.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    _add_run_args(ev)
    ev.set_defaults(run=_evaluate)

    sw = sub.add_parser(
        "sweep",
        help="the STEGO study's dimension sweep on a labelled dataset",
        description="Featurize the train and validation splits once, reduce "
        "them with each reducer at each dim, fit each probe on the training "
        "codes and score it on the validation split (skstego.study.run_sweep). "
        "Writes OUT/results.csv, one row per reducer x dim x probe x seed, "
        "the features cache and the figures sweep_miou/sweep_accuracy "
        "(.png, .svg); rerun the same command to resume after an interruption. "
        "Every row carries a fingerprint of the settings and data behind it "
        "(OUT/settings.json): rows made under other settings are recomputed, "
        "with a warning naming what changed, never reported as new. "
        "--standardize batch --preset DATASET reproduces the study's code "
        "(stego-studies, src/mxm_dimred.py).",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    sw.add_argument(
        "--dataset",
        required=True,
        choices=("cocostuff27", "cityscapes27", "potsdam3", "folder"),
    )
    sw.add_argument("--root", required=True, metavar="DIR", help="dataset folder")
    sw.add_argument("--out", required=True, metavar="DIR", help="output folder")
    sw.add_argument(
        "--train-split",
        default=None,
        help="training split (default: train; train2017 for cocostuff27; "
        "labelled_train for potsdam3)",
    )
    sw.add_argument(
        "--val-split",
        default=None,
        help="validation split (default: the loader's, e.g. val)",
    )
    sw.add_argument(
        "--reducers",
        default="pca,rp,stego,none",
        help="comma-separated among pca, rp, stego, hnne, none "
        "(default pca,rp,stego,none)",
    )
    sw.add_argument(
        "--dims",
        default="study",
        help="comma-separated dims, or 'study': 3..768 plus the preset's STEGO "
        "dim (default study)",
    )
    sw.add_argument(
        "--standardize",
        choices=("train", "batch", "none"),
        default="train",
        help="standardisation before pca, rp and hnne: training statistics, "
        "each forward batch's own (the study's code), or none (default train)",
    )
    sw.add_argument(
        "--batch-images",
        default=None,
        metavar="N[,M]",
        help="with --standardize batch: images per training[,test] batch "
        "(default: the study's, 16,8 for pca/rp and 512 for hnne)",
    )
    sw.add_argument(
        "--preset",
        choices=("cocostuff27", "cityscapes", "potsdam", "none"),
        default=None,
        help="StegoProjector preset of the stego cells (default: the dataset's; "
        "none: StegoProjector defaults)",
    )
    sw.add_argument(
        "--probes",
        default="kmeans,linear",
        help="comma-separated among kmeans, linear, hnne_cluster",
    )
    sw.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    sw.add_argument(
        "--k", type=_positive_int, default=None, help="clusters (default: classes)"
    )
    sw.add_argument(
        "--max-images",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use the first N images of each split",
    )
    sw.add_argument(
        "--stego-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training steps of each StegoProjector (default 5000)",
    )
    _add_backbone_args(sw, 224)
    _add_run_args(sw)
    sw.set_defaults(run=_sweep)
    return parser


def _add_backbone_args(p: argparse.ArgumentParser, resolution_default: Any) -> None:
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help=f"timm DINO ViT name (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--weights", metavar="FILE", help="local backbone checkpoint (offline use)"
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="randomly initialised backbone (pretrained=False): for smoke tests "
        "and offline demos only, the segmentations are meaningless",
    )
    default = (
        "the model's, else 320" if resolution_default is None else resolution_default
    )
    p.add_argument(
        "--resolution",
        type=_positive_int,
        default=resolution_default,
        metavar="PX",
        help=f"short side of the images fed to the backbone (default {default})",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="images per forward pass (default: automatic)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one line"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1], got {value}")
    return value


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------
class _Item:
    """One input image: its path and the name its outputs are derived from."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name  # relative, with the extension
        self.status = "pending"
        self.error = ""
        self.classes: list[int] = []
        self.label_path = ""
        self.overlay_path = ""
        self.confidence_path = ""
        self.margin_path = ""
        self.mean_confidence: float | None = None


def _collect(
    arguments: Iterable[str], exclude: str | os.PathLike | None = None
) -> tuple[list[_Item], list[_Item]]:
    """Images named by files and folders -> (items, missing arguments).

    A folder contributes the image files below it (recursively, by
    extension), named ``<folder name>/<relative path>``; a file is named by
    its file name. The same file named twice is kept once; files below
    ``exclude`` (the output folder) are left out of folders.
    """
    items, missing, seen = [], [], set()
    skip = None if exclude is None else os.path.join(os.path.realpath(exclude), "")
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            base = path.resolve().name or "images"
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not (skip and os.path.realpath(p).startswith(skip))
            )
            pairs = [(p, f"{base}/{p.relative_to(path).as_posix()}") for p in found]
        elif path.is_file():
            pairs = [(path, path.name)]
        else:
            item = _Item(str(path), path.name)
            item.status, item.error = "failed", "no such file or folder"
            missing.append(item)
            continue
        for p, name in pairs:
            key = os.path.realpath(p)
            if key in seen:
                continue
            seen.add(key)
            items.append(_Item(str(p), name))
    return items, missing


def _no_images(arguments: Iterable[str]) -> str:
    """Why the IMAGES arguments gave no image: missing paths differ from
    folders (or files) that exist but hold no image."""
    missing = [a for a in arguments if not os.path.exists(a)]
    if missing:
        return (
            "no images found: "
            + ", ".join(repr(a) for a in missing)
            + (" does" if len(missing) == 1 else " do")
            + f" not exist (paths are resolved from {os.getcwd()!r})."
        )
    return (
        "no images found in "
        + ", ".join(repr(a) for a in arguments)
        + f": the folder holds no image files (extensions: "
        f"{' '.join(IMAGE_EXTENSIONS)})."
    )


def _none_readable(items: list[_Item]) -> str:
    """The error when every image failed, naming the first one and why."""
    failed = [item for item in items if item.status == "failed"]
    first = f" (first: {failed[0].path}: {failed[0].error})" if failed else ""
    return f"none of the {len(items)} images could be read{first}; nothing to fit."


def _assign_outputs(items: list[_Item], out: Path) -> None:
    """Output paths ``out/<name without extension>_{label,overlay}.png``.

    Images whose names differ only by extension keep it (``a.jpg_label.png``).
    """
    stems: dict[str, list[_Item]] = {}
    for item in items:
        stems.setdefault(os.path.splitext(item.name)[0], []).append(item)
    taken: dict[str, str] = {}
    for stem, group in stems.items():
        for item in group:
            base = stem if len(group) == 1 else item.name
            if base in taken:
                raise UsageError(
                    f"{taken[base]!r} and {item.path!r} would both be written to "
                    f"{str(out / base)!r}_*.png; segment them in separate runs."
                )
            taken[base] = item.path
            item.label_path = str(out / f"{base}_label.png")
            item.overlay_path = str(out / f"{base}_overlay.png")
            item.confidence_path = str(out / f"{base}_confidence.png")
            item.margin_path = str(out / f"{base}_margin.png")


def _image_size(path: str) -> tuple[int, int] | None:
    """(height, width) from the file header, None when unknown."""
    if path.lower().endswith(".mat"):
        return None
    try:
        from PIL import Image

        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Exception:
        return None


def _read(path: str) -> np.ndarray:

    return _read_image(path)


# --------------------------------------------------------------------------
# building models
# --------------------------------------------------------------------------
def _featurizer(args: argparse.Namespace, resolution: int) -> Any:

    if args.random_weights and args.weights:
        raise UsageError("--random-weights and --weights exclude each other.")
    _warn_random_weights(args)
    return DinoFeaturizer(
        args.model or DEFAULT_MODEL,
        pretrained=not args.random_weights,
        weights=None if args.weights is None else os.path.abspath(args.weights),
        resolution=resolution,
        batch_size=args.batch_size or "auto",
        device=args.device,
    )


def _warn_random_weights(args: argparse.Namespace) -> None:
    if getattr(args, "random_weights", False):
        warnings.warn(
            "--random-weights: the backbone is randomly initialised, so the "
            "outputs are meaningless (a smoke test of the plumbing).",
            UserWarning,
            stacklevel=2,
        )


def _check_device(device: str) -> None:

    try:
        resolve_device(device)
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None


def _check_backbone(featurizer: Any) -> int:
    """Build the backbone now, so that setup errors are not per-image errors;
    return its number of feature channels."""
    try:
        return int(featurizer.transform(np.zeros((1, 8, 8, 3), np.uint8)).shape[1])
    except RuntimeError as exc:  # weights unavailable (offline)
        raise UsageError(
            f"{exc} On the command line: --weights FILE for a local checkpoint, "
            "or --random-weights for a smoke test."
        ) from None


def _reducer(spec: str, seed: int, device: str, steps: int | None = None) -> Any:
    """``pca:DIM``, ``rp:DIM``, ``stego:DIM``, ``none`` or a model file."""

    kind, _, dim = spec.partition(":")
    kinds = {"pca": TorchPCA, "rp": RandomProjection, "stego": StegoProjector}
    if kind in kinds and dim:
        try:
            n = int(dim)
            if n < 1:
                raise ValueError
        except ValueError:
            raise UsageError(
                f"--projector {spec!r}: DIM must be a positive integer."
            ) from None
        extra = {"n_steps": steps} if kind == "stego" and steps else {}
        return kinds[kind](n, random_state=seed, device=device, **extra)
    if spec == "none":
        return "passthrough"
    if os.path.isfile(spec):
        reducer = load(spec, device=device)
        if not hasattr(reducer, "transform") or hasattr(reducer, "steps"):
            raise UsageError(
                f"--projector {spec!r} holds a {type(reducer).__name__}, not a "
                "fitted reducer (TorchPCA, RandomProjection, StegoProjector)."
            )
        return reducer
    raise UsageError(
        f"--projector {spec!r}: expected pca:DIM, rp:DIM, none or an existing "
        "model file."
    )


def _split_pipeline(pipe: Any, where: str) -> tuple[Any, Any, Any]:
    """(featurizer, reducer or "passthrough", probe) of a saved pipeline."""
    from sklearn.pipeline import Pipeline

    steps = [s for _, s in pipe.steps] if isinstance(pipe, Pipeline) else []
    if (
        len(steps) < 2
        or not isinstance(steps[0], DinoFeaturizer)
        or not isinstance(steps[-1], (KMeansProbe, LinearProbe))
    ):
        raise UsageError(
            f"{where!r} is not a segmentation pipeline (DinoFeaturizer, "
            "reducers, KMeansProbe or LinearProbe); make one with `skstego fit`."
        )
    middle = [s for s in steps[1:-1] if s is not None and s != "passthrough"]
    if not middle:
        reducer: Any = "passthrough"
    elif len(middle) == 1:
        reducer = middle[0]
    else:
        reducer = Pipeline([(f"r{i}", s) for i, s in enumerate(middle)])
    return steps[0], reducer, steps[-1]


def _reduce(reducer: Any, maps: np.ndarray) -> np.ndarray:
    return maps if isinstance(reducer, str) else reducer.transform(maps)


# --------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------
def _label_ids(probe: Any) -> np.ndarray | None:
    """Class value of each argmax index, None when indices are the labels."""
    classes = getattr(probe, "classes_", None)
    if classes is None or classes.dtype.kind not in "iu":
        return None
    return classes.astype(np.int64)


def _n_labels(probe: Any) -> int:
    """Number of distinct label values a probe can output."""
    classes = getattr(probe, "classes_", None)
    if classes is not None:
        return int(classes.max()) + 1 if classes.dtype.kind in "iu" else len(classes)
    if hasattr(probe, "mapping_"):
        return int(max(probe.mapping_.max() + 1, 1))
    return int(probe.k)


def _predict(
    probe: Any, codes: np.ndarray, size: tuple[int, int], upsample: str = "scores"
) -> np.ndarray:
    """Label maps (N, H, W) at ``size``: class values, -1 for none."""
    ids = np.asarray(probe.predict(codes, size=size, upsample=upsample))
    table = _label_ids(probe)
    return table[ids] if table is not None else ids


def _probabilities(
    probe: Any, codes: np.ndarray, size: tuple[int, int], upsample: str = "scores"
) -> Any:
    """Class (or cluster) probabilities (N, K, H, W), a float32 NumPy array.

    The probe's ``predict_proba`` with scores (or, with
    ``upsample="codes"``, the codes) upsampled to ``size`` first:
    for KMeansProbe a softmax of twice the cosine similarities to the
    centroids (the STEGO reference's scale, ``temperature=0.5``), summed into
    classes when it was fitted with labels; for LinearProbe the softmax of
    the logits.
    """
    proba = probe.predict_proba(codes, size=size, upsample=upsample)
    return np.asarray(proba, dtype=np.float32)


def _proba_labels(probe: Any, proba: np.ndarray) -> np.ndarray:
    """Label maps from the argmax of (N, K, H, W) probabilities."""
    ids = proba.argmax(1)
    if hasattr(probe, "mapping_"):
        # columns are classes, then the mass of unmatched clusters (-1)
        return np.where(ids < probe.n_classes_, ids, -1)
    table = _label_ids(probe)
    return table[ids] if table is not None else ids


def _load_crf(device: str) -> Callable:
    """``crf_refine`` on ``device``: NumPy probabilities in, NumPy out."""
    return functools.partial(crf_refine, device=device)


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------
def _palette(n_labels: int) -> np.ndarray:

    return default_palette(max(1, min(n_labels, IGNORE_VALUE)))


def _save_png(image: Any, path: str) -> None:
    """Write through a temporary file, so that a crash leaves no partial PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.part"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_outputs(
    item: _Item,
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    alpha: float,
) -> None:
    from PIL import Image

    labels = np.asarray(labels)
    valid = labels >= 0
    stored = np.where(valid, labels, IGNORE_VALUE).astype(np.uint8)
    png = Image.fromarray(stored, mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    png.putpalette(flat.reshape(-1).tolist())
    _save_png(png, item.label_path)
    colours = flat[stored].astype(np.float32)
    blend = image.astype(np.float32)
    blend[valid] = (1.0 - alpha) * blend[valid] + alpha * colours[valid]
    overlay = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    _save_png(Image.fromarray(overlay, mode="RGB"), item.overlay_path)
    item.classes = sorted(int(c) for c in np.unique(labels[valid]))


def _grey(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as 8-bit grey levels: ``rint(255 * v)``."""
    return np.clip(np.rint(255.0 * values.astype(np.float64)), 0, 255).astype(np.uint8)


def _top_two(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second largest probability of each pixel of (K, H, W)."""
    k = proba.shape[0]
    if k == 1:
        return proba[0], np.zeros_like(proba[0])
    part = np.partition(proba, (k - 2, k - 1), axis=0)
    return part[k - 1], part[k - 2]


def _write_confidence(item: _Item, proba: np.ndarray) -> None:
    """``<name>_confidence.png`` (top-1) and ``<name>_margin.png`` (top-1 minus
    top-2) as grey PNGs; the mean top-1 probability goes to the summary."""
    from PIL import Image

    top1, top2 = _top_two(np.asarray(proba, dtype=np.float32))
    _save_png(Image.fromarray(_grey(top1), mode="L"), item.confidence_path)
    _save_png(Image.fromarray(_grey(top1 - top2), mode="L"), item.margin_path)
    item.mean_confidence = float(top1.mean(dtype=np.float64))


def _stored_confidence(path: str) -> float | None:
    """Mean confidence of an image done earlier, from its (quantised) PNG."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return float(np.asarray(img, dtype=np.float64).mean() / 255.0)
    except Exception:
        return None


def _classes_in(label_png: str) -> list[int]:
    from PIL import Image

    try:
        with Image.open(label_png) as img:
            values = np.unique(np.asarray(img))
    except Exception:
        return []
    return [int(v) for v in values if v != IGNORE_VALUE]


def _write_summary(items: list[_Item], out: Path, confidence: bool = False) -> None:
    rows = []
    for item in items:
        row = {
            "image": item.path,
            "label": item.label_path,
            "overlay": item.overlay_path,
            "status": item.status,
            "classes": item.classes,
            "error": item.error,
        }
        if confidence:
            row["confidence"] = item.confidence_path
            row["margin"] = item.margin_path
            row["mean_confidence"] = item.mean_confidence
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    with open(out / "summary.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["image"])
        writer.writeheader()
        for row in rows:
            row = {**row, "classes": " ".join(map(str, row["classes"]))}
            if row.get("mean_confidence") is None:
                row.pop("mean_confidence", None)  # an empty cell
            writer.writerow(row)


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr)


# --------------------------------------------------------------------------
# reading and featurizing in chunks, one failure at a time
# --------------------------------------------------------------------------
def _chunks(items: list[_Item], size: int) -> Iterable[list[_Item]]:
    """Chunks of items whose files have one size (one forward pass each)."""
    groups: dict[Any, list[_Item]] = {}
    for item in items:
        groups.setdefault(_image_size(item.path) or ("?", item.path), []).append(item)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _fail(item: _Item, exc: BaseException) -> None:
    item.status = "failed"
    item.error = _one_line(str(exc) or type(exc).__name__)


def _read_chunk(chunk: list[_Item]) -> list[tuple[_Item, np.ndarray]]:
    good = []
    for item in chunk:
        try:
            good.append((item, _read(item.path)))
        except (OSError, ValueError) as exc:
            _fail(item, exc)
    return good


def _featurize(
    featurizer: Any, pairs: list[tuple[_Item, np.ndarray]]
) -> Iterable[tuple[list[_Item], list[np.ndarray], np.ndarray]]:
    """(items, images, maps) per image shape; a failing group is retried image
    by image, so that one bad image does not take the others down."""
    shapes: dict[tuple, list[tuple[_Item, np.ndarray]]] = {}
    for item, image in pairs:
        shapes.setdefault(image.shape, []).append((item, image))
    for group in shapes.values():
        try:
            maps = featurizer.transform(np.stack([im for _, im in group]))
        except (ValueError, RuntimeError) as exc:
            if len(group) == 1:
                _fail(group[0][0], exc)
                continue
            for single in group:
                yield from _featurize(featurizer, [single])
            continue
        yield [it for it, _ in group], [im for _, im in group], maps


# --------------------------------------------------------------------------
# segment
# --------------------------------------------------------------------------
def _segment(args: argparse.Namespace) -> int:
    from sklearn.base import clone

    if args.pipeline and args.checkpoint:
        raise UsageError("--pipeline and --checkpoint exclude each other.")
    if args.checkpoint and (args.model or args.weights or args.random_weights):
        raise UsageError(
            "--model, --weights and --random-weights do not apply with "
            "--checkpoint (the checkpoint holds its backbone)."
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a folder.")
    items, missing = _collect(args.images, exclude=out)
    if not items:
        raise UsageError(_no_images(args.images))
    _assign_outputs(items, out)
    _check_device(args.device)
    crf = _load_crf(args.device) if args.crf else None
    settings = _segment_settings(args)
    inputs = {item.name: _file_stat(item.path) for item in items}
    previous = _previous_run(out, items, settings, args)
    redo = args.overwrite or args.refit
    known = {} if previous is None else previous.get("inputs", {})
    saved_model = out / "pipeline.skstego"
    reuse = (
        not (args.pipeline or args.checkpoint)
        and previous is not None
        and not redo
        and saved_model.is_file()
    )

    pending = []
    for item in items:
        outputs = [item.label_path, item.overlay_path]
        if args.confidence:
            outputs += [item.confidence_path, item.margin_path]
        done = all(os.path.isfile(path) for path in outputs)
        unchanged = known.get(item.name) == inputs[item.name]
        if done and unchanged and not redo:
            item.status = "skipped"
            item.classes = _classes_in(item.label_path)
            if args.confidence:
                item.mean_confidence = _stored_confidence(item.confidence_path)
        else:
            pending.append(item)

    if pending:
        cache: _FeatureCache | None = None
        if reuse:  # the model these outputs came from, not a refit
            args.pipeline = str(saved_model)
        if args.pipeline or args.checkpoint:
            if args.model and not reuse:
                raise UsageError(
                    "--model does not apply with --pipeline (the model file holds "
                    "its featurizer)."
                )
            if args.random_weights and args.weights:
                raise UsageError("--random-weights and --weights exclude each other.")
            if args.checkpoint:
                model = _checkpoint_pipeline(args)
            else:
                model = load(args.pipeline, device=args.device)
            featurizer, reducer, probe = _split_pipeline(
                model, args.checkpoint or args.pipeline
            )
            featurizer = clone(featurizer).set_params(device=args.device)
            if args.batch_size:
                featurizer.set_params(batch_size=args.batch_size)
            if args.weights:  # the checkpoint moved, or another copy of it
                featurizer.set_params(weights=os.path.abspath(args.weights))
            if args.random_weights:
                _warn_random_weights(args)
                featurizer.set_params(pretrained=False, weights=None)
            # a checkpoint stores its training resolution; STEGO evaluates at 320
            default = 320 if args.checkpoint else featurizer.resolution
            resolution = args.resolution or default
        else:
            resolution = args.resolution or 320
            featurizer = _featurizer(args, resolution)
            if args.projector.startswith("stego:"):
                raise UsageError(
                    "--projector stego:DIM is trained on whole feature maps: fit it "
                    "with `skstego fit --projector stego:DIM`, then segment with "
                    "--pipeline MODEL."
                )
            reducer = _reducer(args.projector, args.seed, args.device)
            probe = None
            if args.k > IGNORE_VALUE:
                raise UsageError(f"--k {args.k}: at most {IGNORE_VALUE} clusters.")
        # whole images, sides rounded to the patch size: one map per image
        featurizer.set_params(resolution=resolution, crop="none")
        _check_backbone(featurizer)
        chunk = args.batch_size or 16
        if probe is None:
            cache = _FeatureCache({item.path for item in pending})
            reducer, probe = _fit_on(featurizer, reducer, items, args, chunk, cache)
            _save_pipeline(featurizer, reducer, probe, resolution, saved_model)
            if not args.quiet:
                print(f"saved the fitted model as {saved_model}", file=sys.stderr)
        if args.confidence and not hasattr(probe, "predict_proba"):
            raise UsageError(
                f"--confidence needs a probe with predict_proba; the model's probe "
                f"is a {type(probe).__name__}. Leave out --confidence."
            )
        _write_run(out, settings, {**known, **inputs})
        try:
            _predict_items(
                featurizer,
                reducer,
                probe,
                pending,
                args,
                chunk,
                crf,
                cache=cache,
                after_chunk=lambda: _write_summary(
                    items + missing, out, confidence=args.confidence
                ),
            )
        finally:
            if cache is not None:
                cache.close()

    everything = items + missing
    _write_summary(everything, out, confidence=args.confidence)
    failed = [item for item in everything if item.status == "failed"]
    ok = sum(item.status == "ok" for item in everything)
    skipped = sum(item.status == "skipped" for item in everything)
    if not args.quiet:
        print(
            f"segmented {ok} image(s), skipped {skipped} already done, "
            f"{len(failed)} failed; summary in {out / 'summary.csv'}",
            file=sys.stderr,
        )
    for item in failed:
        print(f"skstego: failed: {item.path}: {item.error}", file=sys.stderr)
    return EXIT_FAILURES if failed else EXIT_OK


_RUN_FILE = "run.json"

#: Bytes of feature maps `segment` keeps on disk between fitting and
#: predicting, so that images are featurized once: about 600 ViT-S/8 maps of
#: a 320 px photo (3.3 MB each in float32). Beyond it, images are featurized
#: again for the prediction.
FEATURE_CACHE_BYTES = 2 * 1024**3


class _FeatureCache:
    """Feature maps of the images `segment` fits on, kept for its predictions.

    Only the images that will be predicted are kept, in float32 (predictions
    from the cache equal those from a fresh forward pass), in a temporary
    folder deleted by :meth:`close`, up to :data:`FEATURE_CACHE_BYTES`.
    """

    def __init__(self, wanted: set[str]) -> None:
        import tempfile

        self.wanted = wanted
        # removed by close(), or when garbage-collected after an error
        self._tmp = tempfile.TemporaryDirectory(prefix="skstego-features-")
        self.folder = self._tmp.name
        self.files: dict[str, str] = {}
        self.used = 0

    def __contains__(self, item: _Item) -> bool:
        return item.path in self.files

    def put(self, item: _Item, maps: np.ndarray) -> None:
        if item.path not in self.wanted or item.path in self.files:
            return
        if self.used + maps.nbytes > FEATURE_CACHE_BYTES:
            return
        path = os.path.join(self.folder, f"{len(self.files)}.npy")
        np.save(path, np.ascontiguousarray(maps, dtype=np.float32))
        self.files[item.path] = path
        self.used += maps.nbytes

    def get(self, item: _Item) -> np.ndarray:
        return np.load(self.files[item.path])

    def close(self) -> None:
        self._tmp.cleanup()
        self.files.clear()


def _file_stat(path: str | os.PathLike) -> list[int]:
    """(size, mtime in ns) of a file: what tells a changed input."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _segment_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every `segment` setting that changes its outputs."""
    settings: dict[str, Any] = {
        "resolution": args.resolution,
        "crf": bool(args.crf),
        "alpha": float(args.alpha),
    }
    if args.checkpoint:
        path = os.path.abspath(args.checkpoint)
        settings.update(checkpoint=[path, *_file_stat(path)], probe=args.probe)
    elif args.pipeline:
        path = os.path.abspath(args.pipeline)
        settings.update(pipeline=[path, *_file_stat(path)])
    else:
        settings.update(
            model=args.model or DEFAULT_MODEL,
            k=args.k,
            projector=args.projector,
            seed=args.seed,
        )
    if args.weights:
        path = os.path.abspath(args.weights)
        settings["weights"] = [path, *_file_stat(path)]
    if args.random_weights:
        settings["random_weights"] = True
    return settings


def _previous_run(
    out: Path, items: list, settings: dict, args: argparse.Namespace
) -> dict | None:
    """The run record of OUT; refuse (exit 2) a run under other settings."""
    path = out / _RUN_FILE
    if args.overwrite:
        return None
    if not path.is_file():
        if any(os.path.isfile(item.label_path) for item in items):
            raise UsageError(
                f"{str(out)!r} holds outputs without a run record ({_RUN_FILE}), "
                "so they cannot be checked against these settings: use another "
                "--out, or --overwrite to redo them."
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        before = record["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"cannot read the run record {str(path)!r} ({exc}); use --overwrite "
            "to redo the outputs."
        ) from None
    changed = [
        f"{key}: {before.get(key)!r} then, {settings.get(key)!r} now"
        for key in sorted(set(before) | set(settings))
        if before.get(key) != settings.get(key)
    ]
    if changed:
        raise UsageError(
            f"{str(out)!r} was made with other settings ("
            + "; ".join(changed)
            + "). Rerun with the same settings, use another --out, or --overwrite "
            "to start clean."
        )
    return record


def _write_run(out: Path, settings: dict, inputs: dict) -> None:
    """Record the run's settings and inputs before any output is written."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (_RUN_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "inputs": inputs}, f, indent=1)
    os.replace(tmp, out / _RUN_FILE)


def _fit_on(
    featurizer: Any,
    reducer: Any,
    items: list[_Item],
    args: argparse.Namespace,
    chunk: int,
    cache: _FeatureCache | None = None,
) -> tuple[Any, Any]:
    """Fit reducer and k-means on the tokens of every readable image (their
    feature maps kept in ``cache`` for the predictions that follow)."""
    import torch

    tokens = []
    bar = _progress(len(items), "featurize", args.quiet)
    for part in _chunks(items, chunk):
        for group, _, maps in _featurize(featurizer, _read_chunk(part)):
            tokens.append(maps_to_tokens(torch.from_numpy(maps)).numpy())
            if cache is not None:
                for j, item in enumerate(group):
                    cache.put(item, maps[j : j + 1])
        bar.update(len(part))
    bar.close()
    if not tokens:
        raise UsageError(_none_readable(items))
    X = np.concatenate(tokens)
    if not isinstance(reducer, str) and not _is_fitted(reducer):
        dim = getattr(reducer, "dim", None)
        if isinstance(dim, int) and dim > min(X.shape):
            raise UsageError(
                f"--projector {args.projector} reduces to {dim} dimensions, but "
                f"the images give {X.shape[0]} tokens of {X.shape[1]} features: "
                f"use --projector pca:N (or rp:N) with N <= {min(X.shape)}, or "
                "more or larger images."
            )
        reducer.fit(X)
    codes = _reduce(reducer, X)
    k = int(args.k)
    if codes.shape[0] < k:
        raise UsageError(
            f"the images give {codes.shape[0]} feature tokens, fewer than --k {k}; "
            "use more or larger images, a higher --resolution or a smaller --k."
        )
    probe = KMeansProbe(k, random_state=args.seed, device=args.device)
    probe.fit(codes)
    return reducer, probe


def _is_fitted(estimator: Any) -> bool:
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(estimator)
    except Exception:
        return False
    return True


def _save_pipeline(
    featurizer: Any, reducer: Any, probe: Any, resolution: int, path: Path
) -> None:
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    features = clone(featurizer).set_params(crop="center", resolution=resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(
        Pipeline([("features", features), ("reduce", reducer), ("probe", probe)]),
        path,
    )


def _predict_items(
    featurizer: Any,
    reducer: Any,
    probe: Any,
    pending: list[_Item],
    args: argparse.Namespace,
    chunk: int,
    crf: Callable | None,
    cache: _FeatureCache | None = None,
    after_chunk: Callable[[], None] | None = None,
) -> None:
    import itertools

    palette = _palette(_n_labels(probe))
    bar = _progress(len(pending), "segment", args.quiet)
    for part in _chunks(pending, chunk):
        pairs = _read_chunk(part)
        known = [(it, im) for it, im in pairs if cache is not None and it in cache]
        fresh = [(it, im) for it, im in pairs if cache is None or it not in cache]
        batches = itertools.chain(
            ((([it], [im], cache.get(it)) for it, im in known)),
            _featurize(featurizer, fresh),
        )
        for group, images, maps in batches:
            try:
                codes = _reduce(reducer, maps)
            except (ValueError, RuntimeError) as exc:
                for item in group:
                    _fail(item, exc)
                continue
            for i, (item, image) in enumerate(zip(group, images, strict=True)):
                try:
                    size = tuple(image.shape[:2])
                    proba = None
                    if crf is not None or args.confidence:
                        proba = _probabilities(probe, codes[i : i + 1], size)
                    if crf is not None:
                        proba = np.asarray(crf(image[None], proba))
                        labels = _proba_labels(probe, proba)[0]
                    else:
                        labels = _predict(probe, codes[i : i + 1], size)[0]
                    _write_outputs(item, image, labels, palette, args.alpha)
                    if args.confidence:
                        _write_confidence(item, proba[0])
                    item.status, item.error = "ok", ""
                except (OSError, ValueError, RuntimeError) as exc:
                    _fail(item, exc)
        bar.update(len(part))
        if after_chunk is not None:
            after_chunk()  # an interrupted run leaves a summary of its work
    bar.close()


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------
def _fit(args: argparse.Namespace) -> int:
    from sklearn.pipeline import Pipeline

    out = Path(args.out)
    if not out.parent.is_dir() and str(out.parent):
        raise UsageError(f"--out: the folder {str(out.parent)!r} does not exist.")
    if args.probe == "linear" and not args.labels:
        raise UsageError("--probe linear needs --labels DIR (a supervised probe).")
    items, missing = _collect(args.images)
    if not items:
        raise UsageError(_no_images(args.images))
    _check_device(args.device)
    label_files = None
    if args.labels:
        label_files = [_label_file(args.labels, item) for item in items]
    resolution = args.resolution
    coll = ImageCollection(
        [item.path for item in items],
        label_files,
        resolution=resolution,
        label_fn=_KeepBut255(),
    )
    featurizer = _featurizer(args, resolution)
    _check_backbone(featurizer)
    reducer = _reducer(args.projector, args.seed, args.device, args.steps)

    maps, labels = [], []
    chunk = args.batch_size or 16
    bar = _progress(len(items), "featurize", args.quiet)
    for start in range(0, len(items), chunk):
        batch = []
        for i in range(start, min(start + chunk, len(items))):
            try:
                image = coll[i]
                label = coll.labels[i] if label_files else None
            except (OSError, ValueError) as exc:
                _fail(items[i], exc)
                continue
            batch.append((items[i], image, label))
        if batch:
            maps.append(featurizer.transform(np.stack([b[1] for b in batch])))
            if label_files:
                labels.extend(b[2] for b in batch)
        bar.update(min(chunk, len(items) - start))
    bar.close()
    failed = [item for item in items + missing if item.status == "failed"]
    for item in failed:
        print(f"skstego: failed: {item.path}: {item.error}", file=sys.stderr)
    if not maps:
        raise UsageError(_none_readable(items))
    X = np.concatenate(maps)
    y = np.stack(labels) if label_files else None
    if not isinstance(reducer, str):
        codes = (
            reducer.transform(X) if _is_fitted(reducer) else reducer.fit_transform(X)
        )
    else:
        codes = X
    if args.probe == "kmeans":
        probe = KMeansProbe(args.k, random_state=args.seed, device=args.device)
    else:
        probe = LinearProbe(random_state=args.seed, device=args.device)
    probe.fit(codes, y)
    pipe = Pipeline([("features", featurizer), ("reduce", reducer), ("probe", probe)])
    save(pipe, out)
    if not args.quiet:
        print(
            f"fitted on {X.shape[0]} image(s) ({len(failed)} failed); saved {out}",
            file=sys.stderr,
        )
    return EXIT_FAILURES if failed else EXIT_OK


def _label_file(folder: str, item: _Item) -> str:
    """``folder/<name without extension>.png``, or ``folder/<file stem>.png``."""
    candidates = [
        os.path.join(folder, os.path.splitext(item.name)[0] + ".png"),
        os.path.join(folder, os.path.splitext(os.path.basename(item.path))[0] + ".png"),
    ]
    if "/" in item.name:  # folder inputs: also without the folder's own name
        rel = item.name.split("/", 1)[1]
        candidates.insert(1, os.path.join(folder, os.path.splitext(rel)[0] + ".png"))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UsageError(
        f"no label file for {item.path!r} in {folder!r} (looked for "
        f"{', '.join(repr(c) for c in candidates)})."
    )


# --------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------
_LOADERS = {
    "cocostuff27": "load_cocostuff27",
    "cityscapes27": "load_cityscapes27",
    "potsdam3": "load_potsdam3",
    "folder": "load_image_folder",
}


def _checkpoint_pipeline(args: argparse.Namespace) -> Any:
    """``--checkpoint FILE`` (with ``--probe``) as a fitted pipeline."""

    try:
        return load_stego_checkpoint(
            args.checkpoint, probe=args.probe, device=args.device
        )
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _evaluation_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The pipeline to score and its name: a model file or a STEGO checkpoint."""

    if (args.model is None) == (args.checkpoint is None):
        raise UsageError(
            "give a model file (MODEL.skstego) or --checkpoint FILE, not both "
            "or neither."
        )
    if args.checkpoint is not None:
        return _checkpoint_pipeline(args), args.checkpoint
    return load(args.model, device=args.device), args.model


def _evaluate(args: argparse.Namespace) -> int:
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    _check_device(args.device)
    stego = args.protocol == "stego"
    pipe, where = _evaluation_model(args)
    featurizer, reducer, probe = _split_pipeline(pipe, where)
    featurizer = clone(featurizer).set_params(device=args.device, crop="center")
    if args.batch_size:
        featurizer.set_params(batch_size=args.batch_size)
    if args.weights:
        if args.checkpoint:
            raise UsageError("--weights does not apply with --checkpoint.")
        featurizer.set_params(weights=os.path.abspath(args.weights))
    resolution = args.resolution or (320 if stego else featurizer.resolution)
    featurizer.set_params(resolution=resolution)
    if stego:
        featurizer.set_params(interpolation="nearest")
    loader = getattr(datasets, _LOADERS[args.dataset])
    split = {} if args.split is None else {"split": args.split}
    interpolation = "nearest" if stego else "bilinear"
    coll = loader(
        args.root, resolution=resolution, interpolation=interpolation, **split
    )
    if coll.labels is None:
        raise UsageError(
            f"the {args.dataset} data in {args.root!r} have no label maps to "
            "score against."
        )
    _check_backbone(featurizer)
    steps = [("featurize", featurizer)]
    if not isinstance(reducer, str):
        steps.append(("reduce", reducer))
    encoder: Any = Pipeline(steps)
    if stego:
        encoder = FlipAveraged(encoder)
    crf = _load_crf(args.device) if args.crf else None

    clusters = isinstance(probe, KMeansProbe)
    if clusters:  # raw cluster ids: matched on the evaluation data below
        probe = copy.copy(probe)
        probe.__dict__.pop("mapping_", None)
        probe.__dict__.pop("n_classes_", None)
    n_classes = coll.n_classes
    n_pred = int(probe.k) if clusters else _n_labels(probe)
    chunks = []
    failed: list[tuple[str, str]] = []
    chunk = args.batch_size or 16
    bar = _progress(len(coll), "evaluate", args.quiet)
    for start in range(0, len(coll), chunk):
        images, labels = [], []
        for i in range(start, min(start + chunk, len(coll))):
            try:
                images.append(coll[i])
                labels.append(coll.labels[i])
            except (OSError, ValueError) as exc:
                failed.append((coll.paths[i], _one_line(str(exc))))
                images = images[: len(labels)]
        bar.update(min(chunk, len(coll) - start))
        if not images:
            continue
        batch = np.stack(images)
        codes = np.asarray(encoder.transform(batch))
        y = np.stack(labels)
        size = tuple(y.shape[-2:])
        # the reference upsamples the codes, then applies the probe
        upsample = "codes" if stego else "scores"
        if crf is not None:
            proba = _probabilities(probe, codes, size, upsample)
            ids = crf(batch, proba).argmax(1)
            table = None if clusters else _label_ids(probe)
            pred = table[ids] if table is not None else ids
        elif clusters:
            pred = np.asarray(probe.predict(codes, size=size, upsample=upsample))
        else:
            pred = _predict(probe, codes, size, upsample)
        chunks.append((y, pred))
    bar.close()
    if not chunks:
        raise UsageError("none of the evaluation images could be read.")
    if n_classes is None:
        n_classes = max(int(y.max()) + 1 for y, _ in chunks)
    conf = np.zeros((n_classes, max(n_pred, 1)), dtype=np.int64)
    support = np.zeros(n_classes, dtype=np.int64)
    for y, pred in chunks:
        conf += confusion_matrix(y, pred, n_classes=n_classes, n_pred=conf.shape[1])
        valid = y[(y >= 0) & (y < n_classes)]
        support += np.bincount(valid, minlength=n_classes)
    extra = args.extra_clusters or ("reference" if stego else "errors")
    report = report_from_confusion(
        conf,
        matching="hungarian" if clusters else "identity",
        support=support,
        extra_clusters=extra if clusters else "errors",
    )
    names = coll.classes or [str(c) for c in range(n_classes)]
    _print_report(report, names, sum(len(y) for y, _ in chunks))
    if stego:
        _print_published(args.dataset, "cluster" if clusters else "linear", report)
    if args.json:
        _write_json_report(report, names, args, sum(len(y) for y, _ in chunks))
    for path, why in failed:
        print(f"skstego: failed: {path}: {why}", file=sys.stderr)
    return EXIT_FAILURES if failed else EXIT_OK


def _print_published(dataset: str, kind: str, report: dict) -> None:
    """STEGO's published numbers (with CRF) beside ours."""

    published = PUBLISHED_RESULTS.get(dataset, {}).get(kind)
    if not published:
        return
    print(f"STEGO published ({kind} probe, with CRF; Hamilton et al. 2022):")
    for key, label in (("accuracy", "pixel accuracy"), ("miou", "mIoU")):
        if key in published:
            print(
                f"  {label}: {published[key]:.1f} published, "
                f"{100 * report[key]:.2f} here"
            )


def _pct(value: float) -> str:
    return "   n/a" if value is None or math.isnan(value) else f"{100 * value:6.2f}"


def _print_report(report: dict, names: list[str], n_images: int) -> None:
    print(f"images: {n_images}")
    print(f"mIoU: {100 * report['miou']:.2f}")
    print(f"pixel accuracy: {100 * report['accuracy']:.2f}")
    width = max(5, *(len(n) for n in names))
    print(f"{'class':>5}  {'name':<{width}}  {'IoU':>6}  {'support':>10}")
    for c, name in enumerate(names):
        iou = float(report["iou"][c]) if c < len(report["iou"]) else float("nan")
        support = int(report["support"][c]) if c < len(report["support"]) else 0
        print(f"{c:>5}  {name:<{width}}  {_pct(iou)}  {support:>10}")


def _finite(values: Any) -> list[float | None]:
    return [None if math.isnan(float(v)) else float(v) for v in values]


def _write_json_report(
    report: dict, names: list[str], args: argparse.Namespace, n_images: int
) -> None:
    mapping = report.get("mapping")
    data = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "protocol": args.protocol,
        "crf": bool(args.crf),
        "dataset": args.dataset,
        "root": args.root,
        "split": args.split,
        "n_images": n_images,
        "miou": report["miou"],
        "accuracy": report["accuracy"],
        "classes": names,
        "iou": _finite(report["iou"]),
        "precision": _finite(report["precision"]),
        "recall": _finite(report["recall"]),
        "support": [int(v) for v in report["support"]],
        "confusion": np.asarray(report["confusion"]).tolist(),
        "mapping": None if mapping is None else np.asarray(mapping).tolist(),
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


# --------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------
_TRAIN_SPLITS = {
    "cocostuff27": "train2017",
    "cityscapes27": "train",
    "potsdam3": "labelled_train",
    "folder": "train",
}


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"{option}: expected comma-separated integers, got {text!r}."
        ) from None
    if not values:
        raise UsageError(f"{option}: give at least one value.")
    return values


def _names(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise UsageError(
            f"{option}: unknown {unknown or text!r}; choose among {', '.join(allowed)}."
        )
    return names


def _split_data(
    args: argparse.Namespace, split: str | None, resolution: int
) -> tuple[Any, np.ndarray]:

    loader = getattr(datasets, _LOADERS[args.dataset])
    kwargs = {} if split is None else {"split": split}
    coll = loader(args.root, resolution=resolution, **kwargs)
    if coll.labels is None:
        raise UsageError(
            f"the {args.dataset} split {split or '(default)'} in {args.root!r} has "
            "no label maps; the sweep scores against labels."
        )
    if args.max_images:
        coll = coll[: args.max_images]
    labels = np.stack([np.asarray(coll.labels[i]) for i in range(len(coll))])
    return coll, labels.astype(np.int64)


#: The StegoProjector preset of each dataset (the released checkpoints').
_SWEEP_PRESETS = {
    "cocostuff27": "cocostuff27",
    "cityscapes27": "cityscapes",
    "potsdam3": "potsdam",
}


def _sweep(args: argparse.Namespace) -> int:

    _check_device(args.device)
    reducers: list[Any] = _names(
        args.reducers, "--reducers", ("pca", "rp", "stego", "hnne", "none")
    )
    probes = _names(args.probes, "--probes", ("kmeans", "linear", "hnne_cluster"))
    dims: Any = "study" if args.dims == "study" else _int_list(args.dims, "--dims")
    seeds = _int_list(args.seeds, "--seeds")
    preset = _SWEEP_PRESETS.get(args.dataset) if args.preset is None else args.preset
    preset = None if preset == "none" else preset
    batch_images: Any = None
    if args.batch_images is not None:
        sizes = _int_list(args.batch_images, "--batch-images")
        if len(sizes) > 2 or min(sizes) < 1:
            raise UsageError("--batch-images: give N or N,M (positive integers).")
        batch_images = sizes[0] if len(sizes) == 1 else tuple(sizes)
    if args.stego_steps and "stego" in reducers:
        stego = (
            StegoProjector.from_preset(preset, n_steps=args.stego_steps)
            if preset
            else StegoProjector(n_steps=args.stego_steps)
        )
        reducers = [("stego", stego) if r == "stego" else r for r in reducers]
    resolution = args.resolution or 224
    featurizer = _featurizer(args, resolution)
    n_features = _check_backbone(featurizer)
    if not isinstance(dims, str):
        too_big = [d for d in dims if d > n_features]
        if too_big:
            raise UsageError(
                f"--dims {','.join(map(str, too_big))}: the backbone gives "
                f"{n_features} features, so no reducer can produce more; use "
                f"dims <= {n_features}."
            )
    train_split = args.train_split or _TRAIN_SPLITS[args.dataset]
    X_train, y_train = _split_data(args, train_split, resolution)
    X_val, y_val = _split_data(args, args.val_split, resolution)
    out = Path(args.out)
    results = run_sweep(
        X_train,
        y_train,
        X_val,
        y_val,
        reducers=reducers,
        dims=dims,
        probes=probes,
        seeds=seeds,
        n_clusters=args.k,
        standardize=args.standardize,
        batch_images=batch_images,
        preset=preset,
        featurizer=featurizer,
        cache_dir=out,
        device=args.device,
        verbose=not args.quiet,
    )
    summary = summarize_sweep(results)
    print((100 * summary[["miou_mean", "miou_std", "accuracy_mean"]]).round(2))
    import matplotlib

    matplotlib.use("Agg")
    for path in save_sweep_figures(results, out):
        print(f"wrote {path}")
    return EXIT_OK
