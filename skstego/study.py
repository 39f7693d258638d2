"""The dimension sweep of the STEGO study, as one resumable function.

Koenig et al. (CVPR 2023 workshop) found that STEGO's head is mostly a
dimensionality reduction: they reduced DINO features with PCA, random
projection, h-NNE and STEGO itself to dims 3 ... 768, fitted a linear and a
cluster probe on the codes and compared validation mIoU and pixel accuracy
(Koenig, Schambach and Otterbach, "Uncovering the Inner Workings of STEGO for
Safe Unsupervised Semantic Segmentation", CVPR 2023 workshops,
https://arxiv.org/abs/2304.07314; code: ``src/mxm_dimred.py`` of
``merantix-momentum/stego-studies``). :func:`run_sweep` runs that grid for
any reducers, dims, probes and seeds, and returns a tidy table;
:func:`summarize_sweep` aggregates it over seeds and
:func:`save_sweep_figures` draws the paper's figures.

``run_sweep(..., standardize="batch", preset="cocostuff27", dims="study")``
reproduces the study's protocol for the baselines: tokens standardised as
the study's code does (reducers fitted on tokens standardised with the
training statistics, every forward batch standardised with its own
statistics), its dims plus STEGO's dim, and STEGO retrained with the
dataset's preset at every dim.

The study explains STEGO's results by two mechanisms: k-means converges
better in fewer dimensions, and the head's codes form more distinct
clusters. ``run_sweep(..., mechanisms=True)`` measures both for every cell
(:data:`MECHANISM_COLUMNS`): the cluster probe's inertia, iterations to
converge and inertia per iteration, the silhouette and Davies-Bouldin
indices of its test clustering, the calibration (ECE) of every probe's
probabilities and the agreement (adjusted Rand index) between seeds;
:func:`skstego.plotting.plot_mechanisms` draws them against the dimension.

The same comparison also runs through scikit-learn's own tools::

    GridSearchCV(
        Pipeline([("reduce", TorchPCA()), ("probe", KMeansProbe(k=27))]),
        {"reduce": [TorchPCA(), RandomProjection()], "reduce__dim": [3, 6, 12]},
        scoring=miou_scorer,
        cv=KFold(3),
    )

:func:`run_sweep` adds what a grid search does not: features computed once,
PCA fitted once and truncated per dim, a fixed train/validation split as in
the paper, several seeds per cell, and resumption after an interruption.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import time
import urllib.parse
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone, is_classifier

from ._calibration import calibration_bins, confidence_and_correct, ece_from_bins
from ._device import (
    apply_tokenwise,
    as_tensor,
    check_features,
    is_torch,
    iter_slices,
    resolve_device,
    rows_per_batch,
)
from .metrics import (
    clustering_stability,
    davies_bouldin_score,
    segmentation_report,
    silhouette_score,
)
from .plotting import plot_dimension_sweep, plot_mechanisms
from .probes import HNNEClusterProbe, KMeansProbe, LinearProbe
from .projection import (
    HNNEProjector,
    RandomProjection,
    StegoProjector,
    TokenStandardScaler,
    TorchPCA,
)
from .projection._stego import PRESETS

__all__ = [
    "DEFAULT_DIMS",
    "MECHANISM_COLUMNS",
    "RESULT_COLUMNS",
    "STANDARDIZE_OPTIONS",
    "STUDY_BATCH_IMAGES",
    "run_sweep",
    "save_sweep_figures",
    "summarize_sweep",
]

#: The study's dims (Koenig et al. 2023, figures 2 and 4; the list in
#: ``src/mxm_dimred.py`` of ``merantix-momentum/stego-studies``), without
#: STEGO's own dim, which ``dims="study"`` adds for the ``preset``.
DEFAULT_DIMS = (3, 6, 12, 24, 48, 96, 192, 384, 768)

#: Values of ``run_sweep(standardize=...)``.
STANDARDIZE_OPTIONS = ("train", "batch", "none")

#: Images per standardised batch of the study's code, (training, test), per
#: named reducer: PCA and random projection run in the forward pass of the
#: probe training (``batch_size: 16``) and validation (``val_batch_size:
#: 8``) of ``src/configs/train_config.yml``; h-NNE codes are precomputed in
#: batches of 512 images (``prepare_projected_dataset`` in
#: ``src/mxm_dimred.py``).
STUDY_BATCH_IMAGES = {"pca": (16, 8), "rp": (16, 8), "hnne": (512, 512)}

#: Columns of the table :func:`run_sweep` returns, in order.
RESULT_COLUMNS = (
    "reducer",
    "dim",
    "probe",
    "seed",
    "miou",
    "accuracy",
    "reduce_seconds",
    "probe_seconds",
    "n_train",
    "n_test",
)

#: Columns ``run_sweep(..., mechanisms=True)`` adds after
#: :data:`RESULT_COLUMNS`, in order (see :func:`run_sweep`).
MECHANISM_COLUMNS = (
    "inertia",
    "n_iter",
    "silhouette",
    "davies_bouldin",
    "ece",
    "stability_ari",
    "inertia_curve",
)

_KEYS = ("reducer", "dim", "probe", "seed", "fingerprint")
_RESULTS_FILE = "results.csv"
_MECHANISMS_FILE = "mechanisms.csv"
_LABELS_DIR = "labels"
_FEATURES_FILE = "features_{}.npy"
_FEATURES_META = "features_{}.json"
_SETTINGS_FILE = "settings.json"


# ------------------------------------------------------------------ specs
def _named_reducer(
    name: str,
    standardize: str = "train",
    batch_images: tuple[int, int] | None = None,
    preset: str | None = None,
) -> Any:
    """The estimator behind a reducer name, standardised as asked."""
    if name == "stego":  # the head is trained on raw features, as in STEGO
        return (
            StegoProjector() if preset is None else StegoProjector.from_preset(preset)
        )
    if name == "pca":
        est = TorchPCA()
    elif name == "rp":
        est = RandomProjection(kind="gaussian")
    elif name == "hnne":
        est = HNNEProjector(metric="cosine")
    else:
        raise ValueError(
            f"Unknown reducer {name!r}: use 'pca', 'rp', 'stego', 'hnne', 'none' "
            "or pass (name, estimator) pairs / a dict of estimators with a `dim` "
            "parameter."
        )
    sizes = batch_images if batch_images is not None else STUDY_BATCH_IMAGES[name]
    return _Standardized(est, standardize, sizes)


class _Standardized:
    """A reducer whose input is standardised as in the study's code.

    ``mode="none"``: the reducer alone. ``mode="train"``: fitted and applied
    on tokens standardised with the training statistics (PCA:
    ``TorchPCA(standardize=True)``, the same in one pass). ``mode="batch"``:
    fitted like that, but every forward batch of ``batch_images[0]``
    training / ``batch_images[1]`` test images is standardised with its
    own statistics before the reducer (``DimRedPCA.forward`` and friends
    in ``src/mxm_dimred.py``).
    """

    def __init__(self, reducer: Any, mode: str, batch_images: tuple[int, int]):
        self.reducer = reducer
        self.mode = mode
        self.batch_images = (int(batch_images[0]), int(batch_images[1]))

    def settings(self) -> dict:
        batch = list(self.batch_images) if self.mode == "batch" else None
        return {
            **_settings(self.reducer),
            "standardize": self.mode,
            "batch_images": batch,
        }

    def seeded(self, seed: int, device: Any, **params: Any) -> _Standardized:
        out = copy.copy(self)
        out.reducer = _seeded(self.reducer, seed, device, **params)
        out._device = device
        return out

    def _pca(self) -> bool:
        return isinstance(self.reducer, TorchPCA)

    def fit(self, F: Any) -> _Standardized:
        dev = getattr(self, "_device", None) or "auto"
        self.scaler_ = None
        if self.mode == "none":
            self.reducer.fit(F)
            return self
        if self._pca():  # StandardScaler + PCA, streamed, as DimRedPCA.compute
            self.reducer.set_params(standardize=True).fit(F)
            return self
        if self.mode == "train" or not isinstance(self.reducer, RandomProjection):
            self.scaler_ = TokenStandardScaler(device=dev).fit(F)
        if isinstance(self.reducer, RandomProjection):
            self.reducer.fit(F)  # data-independent: reads the shape only
        else:
            self.reducer.fit(self.scaler_.transform(F))
        return self

    def transform(self, F: Any, split: str) -> Any:
        if self.mode == "none":
            return self.reducer.transform(F)
        if self.mode == "train":
            if self._pca():
                return self.reducer.transform(F)
            return self.reducer.transform(self.scaler_.transform(F))
        size = self.batch_images[0 if split == "train" else 1]
        dev = getattr(self, "_device", None) or "auto"
        scaler = TokenStandardScaler(size, device=dev).fit(F[:1])
        if self._pca():
            # the study's torch path: batch-standardised tokens @ V[:, :dim];
            # the PCA was fitted on standardised tokens (mean 0)
            pca = self.reducer
            device = resolve_device(dev)
            comps = as_tensor(pca.components_, device)

            def reduce(Z: Any) -> Any:
                return apply_tokenwise(
                    lambda t: t @ comps.T,
                    Z,
                    device=device,
                    out_features=int(comps.shape[0]),
                )

        else:
            reduce = self.reducer.transform
        n_elem = int(np.prod(F.shape[1:]))
        step = size * max(1, rows_per_batch(n_elem * 4) // size)
        parts = [reduce(scaler.transform(F[sl])) for sl in iter_slices(len(F), step)]
        if is_torch(parts[0]):
            import torch

            return torch.cat(parts)
        return np.concatenate(parts)


def _named_probe(name: str, k: int) -> Any:
    if name == "kmeans":
        return KMeansProbe(k=k)
    if name == "linear":
        return LinearProbe()
    if name == "hnne_cluster":
        return HNNEClusterProbe(k=k)
    raise ValueError(
        f"Unknown probe {name!r}: use 'kmeans', 'linear', 'hnne_cluster' or pass "
        "(name, estimator) pairs / a dict of estimators."
    )


def _as_named(spec: Any, make: Any, what: str) -> list[tuple[str, Any]]:
    """Specs -> [(name, estimator or None)]; None marks raw features."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = [spec]
    else:
        items = list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, None if item == "none" else make(item)))
        elif isinstance(item, tuple) and len(item) == 2:
            name, est = str(item[0]), item[1]
            if isinstance(est, str):  # ("label", "pca")
                est = None if est == "none" else make(est)
            out.append((name, est))
        elif hasattr(item, "fit"):
            out.append((type(item).__name__, item))
        else:
            raise TypeError(
                f"Cannot read {what} {item!r}: give a name or an estimator."
            )
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique, got {names}.")
    if not out:
        raise ValueError(f"Give at least one {what}.")
    return out


def _truncatable(est: Any) -> bool:
    """PCA codes at dim d are the first d codes at any larger dim."""
    if isinstance(est, _Standardized):
        est = est.reducer
    return isinstance(est, TorchPCA)


def _transform(est: Any, F: Any, split: str) -> Any:
    if isinstance(est, _Standardized):
        return est.transform(F, split)
    return est.transform(F)


def _seeded(est: Any, seed: int, device: Any, **params: Any) -> Any:
    if isinstance(est, _Standardized):
        return est.seeded(seed, device, **params)
    est = clone(est)
    own = est.get_params(deep=False)
    extra = {"random_state": seed} if "random_state" in own else {}
    if device is not None and "device" in own:
        extra["device"] = device
    extra.update({k: v for k, v in params.items() if k in own})
    return est.set_params(**extra)


# ------------------------------------------------------------ fingerprints
#: Parameters that do not change a cell's numbers (seed and dim are keys).
_VOLATILE = frozenset({"device", "verbose", "random_state", "dim", "n_jobs"})


def _plain(value: Any) -> Any:
    """A JSON-able stand-in for a parameter value."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=str)}
    if hasattr(value, "get_params"):
        return _settings(value)
    if isinstance(value, np.ndarray) or is_torch(value):
        return "array:" + _data_id(value)
    return repr(value)


def _settings(est: Any) -> Any:
    """Everything about an estimator that can change a cell's numbers."""
    if est is None:
        return "none"
    if isinstance(est, _Standardized):
        return est.settings()
    params = est.get_params(deep=False)
    return {
        "class": f"{type(est).__module__}.{type(est).__qualname__}",
        **{k: _plain(v) for k, v in sorted(params.items()) if k not in _VOLATILE},
    }


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _data_id(X: Any, n_samples: int = 16) -> str:
    """Shape, dtype and the values of up to 16 evenly spaced samples.

    Cheap even for memory-mapped features of thousands of images, and
    different whenever the weights, the resolution, the images or their
    order change (a change confined to unsampled images goes unnoticed:
    pass ``features_key`` for certainty).
    """
    if X is None:
        return "none"
    shape = tuple(int(v) for v in X.shape)
    h = hashlib.sha1(repr((shape, str(X.dtype))).encode())
    n = shape[0] if shape else 0
    rows = 1 if len(shape) > 2 else max(1, min(64, n // n_samples))
    for i in np.unique(np.linspace(0, max(n - rows, 0), min(n, n_samples)).round()):
        block = X[int(i) : int(i) + rows]
        block = block.detach().cpu().numpy() if is_torch(block) else np.asarray(block)
        h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()[:16]


def _images_id(X: Any) -> str:
    """Identity of the images a featurizer reads, for the feature cache."""
    paths = getattr(X, "paths", None)
    if paths is not None:  # ImageCollection: its files and its settings
        return _hash([[str(p) for p in paths], repr(X)])
    if hasattr(X, "shape") and hasattr(X, "dtype"):
        return _data_id(X)
    items = list(X)
    if all(isinstance(p, (str, os.PathLike)) for p in items):
        return _hash([os.fspath(p) for p in items])
    h = hashlib.sha1()
    for item in items[:: max(1, len(items) // 16)]:
        h.update(np.ascontiguousarray(np.asarray(item)).tobytes())
    return h.hexdigest()[:16]


def _flat(obj: Any, prefix: str = "") -> dict:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _differences(old: Any, new: Any) -> list[str]:
    """Settings that differ between two fingerprinted settings, readable."""
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<unset>") != b.get(k, "<unset>")
    ]


# --------------------------------------------------------------- features
def _features(
    X: Any, featurizer: Any, cache_dir: str | None, split: str, verbose: bool
) -> Any:
    """Feature maps of ``X``: computed once, memory-mapped in ``cache_dir``."""
    if featurizer is None:
        return X
    if cache_dir is None:
        return featurizer.transform(X)
    path = os.path.join(cache_dir, _FEATURES_FILE.format(split))
    meta_path = os.path.join(cache_dir, _FEATURES_META.format(split))
    meta = {
        "featurizer": repr(featurizer),
        "n_images": len(X),
        "images": _images_id(X),
    }
    if os.path.exists(meta_path) and os.path.exists(path):
        with open(meta_path) as f:
            stored = json.load(f)
        if stored == meta:
            return np.load(path, mmap_mode="r")
    n, out, step = len(X), None, 64
    for start in range(0, n, step):
        feats = featurizer.transform(X[start : start + step])
        feats = feats.cpu().numpy() if is_torch(feats) else np.asarray(feats)
        if out is None:
            out = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.float32, shape=(n, *feats.shape[1:])
            )
        out[start : start + len(feats)] = feats
        if verbose:
            print(f"features {split}: {min(start + step, n)}/{n}", flush=True)
    out.flush()
    del out
    with open(meta_path, "w") as f:
        json.dump(meta, f)  # written last: marks the array as complete
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------- results
def _key(row: Mapping) -> tuple:
    return (
        row["reducer"],
        int(row["dim"]),
        row["probe"],
        int(row["seed"]),
        row["fingerprint"],
    )


def _set_aside_unversioned(path: str | None) -> None:
    """Move a results file without fingerprints out of the way, with a warning.

    Files of skstego versions before the fingerprints cannot say which
    settings made their rows, so none of them can be trusted for this sweep.
    """
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path) as f:
        header = f.readline().strip().split(",")
    if "fingerprint" in header:
        return
    root, ext = os.path.splitext(path)
    target, i = f"{root}.unversioned{ext}", 1
    while os.path.exists(target):
        target, i = f"{root}.unversioned{i}{ext}", i + 1
    os.replace(path, target)
    warnings.warn(
        f"{path} has no settings fingerprints (written by an older skstego): "
        f"its rows cannot be matched to settings and are not reused. Moved it "
        f"to {target}; every cell is recomputed.",
        UserWarning,
        stacklevel=3,
    )


def _done_cells(path: str | None) -> tuple[list[dict], set]:
    """Rows of a results file (the last row of a recomputed cell) and keys."""
    if path is None or not os.path.exists(path):
        return [], set()
    import pandas as pd

    # names stay strings (a reducer called "1" is not the number 1)
    table = pd.read_csv(path, dtype={"reducer": str, "probe": str, "fingerprint": str})
    rows = list({_key(r): r for r in table.to_dict("records")}.values())
    return rows, {_key(r) for r in rows}


def _read_settings(cache_dir: str | None) -> dict:
    if cache_dir is None:
        return {}
    path = os.path.join(cache_dir, _SETTINGS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_settings(cache_dir: str | None, known: dict) -> None:
    if cache_dir is None:
        return
    path = os.path.join(cache_dir, _SETTINGS_FILE)
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(known, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _warn_stale(rows: list[dict], todo: set, known: dict) -> None:
    """Warn about cells to compute that are stored under other settings.

    ``todo``: keys (with fingerprint) of the requested cells not yet done.
    The warning names every setting that differs.
    """
    todo_fp = {k[:4]: k[4] for k in todo}
    stale: dict[tuple, str] = {}  # (reducer, probe, fp) -> latest other fp
    for row in rows:
        key = _key(row)
        fp = todo_fp.get(key[:4])
        if fp is not None and fp != key[4]:
            stale[key[0], key[2], fp] = key[4]
    lines = []
    for (reducer, probe, fp), other in sorted(stale.items()):
        if other in known and fp in known:
            diffs = "; ".join(_differences(known[other], known[fp]))
        else:
            diffs = f"unrecorded settings (fingerprint {other})"
        lines.append(f"{reducer} x {probe} (latest stored vs now): {diffs}")
    if lines:
        warnings.warn(
            "The results file holds cells of this sweep computed with other "
            "settings: they are not reused (they stay in the file under their "
            "own fingerprint) and these cells are recomputed:\n  " + "\n  ".join(lines),
            UserWarning,
            stacklevel=3,
        )


def _append(path: str | None, row: dict) -> None:
    if path is None:
        return
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _evaluate(probe: Any, codes: Any, y: Any) -> dict:
    if hasattr(probe, "score_report"):
        return probe.score_report(codes, y)
    size = tuple(np.shape(y)[-2:]) if np.ndim(codes) == 4 else None
    pred = probe.predict(codes, size=size) if size else probe.predict(codes)
    return segmentation_report(y, pred)


def _slice_codes(codes: Any, dim: int) -> Any:
    return codes[:, :dim]


# ------------------------------------------------------------- mechanisms
def _labels_path(cache_dir: str, key: tuple) -> str:
    reducer, dim, probe, seed, fingerprint = key
    name = "__".join(
        [
            urllib.parse.quote(reducer, safe=""),
            str(dim),
            urllib.parse.quote(probe, safe=""),
        ]
    )
    return os.path.join(
        cache_dir, _LABELS_DIR, f"{name}__seed{seed}__{fingerprint}.npy"
    )


class _LabelStore:
    """Test clusterings of every cell, in memory and (with a cache) on disk."""

    def __init__(self, cache_dir: str | None) -> None:
        self.cache_dir = cache_dir
        self.memory: dict[tuple, np.ndarray] = {}

    def put(self, key: tuple, labels: np.ndarray) -> None:
        self.memory[key] = labels
        if self.cache_dir is None:
            return
        path = _labels_path(self.cache_dir, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        small = np.uint8 if labels.size == 0 or labels.max() < 256 else np.int32
        tmp = f"{path}.part.npy"
        np.save(tmp, labels.astype(small))
        os.replace(tmp, path)  # complete or absent, never half written

    def get(self, key: tuple) -> np.ndarray | None:
        if key in self.memory:
            return self.memory[key]
        if self.cache_dir is None:
            return None
        path = _labels_path(self.cache_dir, key)
        if not os.path.exists(path):
            return None
        labels = np.load(path).astype(np.int64)
        self.memory[key] = labels
        return labels


def _cluster_ids(probe: Any, codes: Any) -> Any:
    """Clusters (not classes) of the test codes: ``predict`` without a mapping."""
    unmapped = copy.copy(probe)
    for name in ("mapping_", "n_classes_"):
        unmapped.__dict__.pop(name, None)
    return unmapped.predict(codes)


def _probe_metric(probe: Any) -> str:
    metric = getattr(probe, "metric", "euclidean")
    return metric if metric in ("cosine", "euclidean") else "euclidean"


def _unit_codes(codes: Any, device: Any) -> Any:
    """Codes scaled to unit length per token (what spherical k-means sees)."""
    import torch.nn.functional as F

    n_out = int(codes.shape[1])
    dev = resolve_device(device)
    return apply_tokenwise(
        lambda t: F.normalize(t, dim=1), codes, device=dev, out_features=n_out
    )


def _class_probabilities(probe: Any, report: Mapping, cluster: bool) -> Any:
    """A probe whose ``predict_proba`` gives class columns 0, 1, ..., or None.

    Cluster probes: a copy whose ``mapping_`` is the Hungarian matching of
    ``report`` (on the test data), so that cluster probabilities sum into
    those classes (plus a column for unmatched clusters). Classifiers: the
    probe itself when ``classes_`` is 0..K-1.
    """
    if not hasattr(probe, "predict_proba"):
        return None
    if cluster:
        mapping = report.get("mapping")
        if mapping is None or not hasattr(probe, "mapping_"):
            return None
        mapped = copy.copy(probe)
        mapped.mapping_ = np.asarray(mapping, dtype=np.int64)
        mapped.n_classes_ = int(np.shape(report["confusion"])[0])
        return mapped
    return probe


def _ece(probe: Any, codes: Any, y: Any, n_bins: int = 15) -> float:
    """``expected_calibration_error(y, probe.predict_proba(codes))``, in chunks.

    Maps are scored at the label size; the bins are summed over image
    chunks so that the upsampled probabilities never exist all at once.
    """
    classes = getattr(probe, "classes_", None)
    columns = None
    if classes is not None and not np.array_equal(classes, np.arange(len(classes))):
        if classes.dtype.kind not in "iu" or classes.min() < 0:
            return float("nan")
        columns = classes.astype(np.int64)
    size = tuple(np.shape(y)[-2:]) if np.ndim(codes) == 4 else None
    n_cols = (
        len(classes) if classes is not None else len(getattr(probe, "mapping_", ()))
    )
    n_cols = max(n_cols, 1)
    per_row = n_cols * (int(np.prod(size)) if size else 1) * 3
    counts = np.zeros(n_bins, dtype=np.int64)
    hits = np.zeros(n_bins)
    sums = np.zeros(n_bins)
    for sl in iter_slices(len(codes), rows_per_batch(per_row)):
        yb = y[sl]
        if not bool((yb >= 0).any()):
            continue
        proba = (
            probe.predict_proba(codes[sl], size=size)
            if size
            else probe.predict_proba(codes[sl])
        )
        if columns is not None:  # classes_ -> columns of their class ids
            shape = (proba.shape[0], int(max(columns.max(), yb.max())) + 1)
            shape = shape + tuple(proba.shape[2:])
            full = proba.new_zeros(shape) if is_torch(proba) else np.zeros(shape)
            full[:, columns] = proba
            proba = full
        conf, correct = confidence_and_correct(yb, proba)
        bins = calibration_bins(conf, correct, n_bins)
        counts += bins["counts"]
        hits += np.nan_to_num(bins["accuracy"]) * bins["counts"]
        sums += np.nan_to_num(bins["confidence"]) * bins["counts"]
    if not counts.any():
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        bins = {
            "counts": counts,
            "accuracy": np.where(counts > 0, hits / counts, np.nan),
            "confidence": np.where(counts > 0, sums / counts, np.nan),
        }
    return ece_from_bins(bins)


def _mechanisms(
    probe: Any,
    codes: Any,
    y: Any,
    report: Mapping,
    *,
    key: tuple,
    earlier: list[tuple],
    labels: _LabelStore,
    sample_size: int | None,
    device: Any,
) -> dict:
    """The :data:`MECHANISM_COLUMNS` of one fitted probe on the test codes."""
    nan = float("nan")
    out = dict.fromkeys(MECHANISM_COLUMNS, nan)
    dev = "auto" if device is None else device
    seed = key[3]
    cluster = hasattr(probe, "cluster_centers_")
    if cluster:
        out["inertia"] = float(getattr(probe, "inertia_", nan))
        out["n_iter"] = float(getattr(probe, "n_iter_", nan))
        curve = getattr(probe, "inertia_curve_", None)
        if curve is not None:
            out["inertia_curve"] = json.dumps([float(v) for v in curve])
        ids = _cluster_ids(probe, codes)
        metric = _probe_metric(probe)
        try:
            out["silhouette"] = silhouette_score(
                codes,
                ids,
                metric=metric,
                sample_size=sample_size,
                random_state=seed,
                device=dev,
            )
        except ValueError:  # one cluster only: undefined
            pass
        try:
            scored = _unit_codes(codes, dev) if metric == "cosine" else codes
            out["davies_bouldin"] = davies_bouldin_score(scored, ids, device=dev)
        except ValueError:
            pass
        ids_np = as_tensor(ids, resolve_device("cpu"), dtype=None).numpy()
        ids_np = ids_np.astype(np.int64, copy=False)
        labels.put(key, ids_np)
        before = [lab for k in earlier if (lab := labels.get(k)) is not None]
        before = [lab for lab in before if lab.shape == ids_np.shape]
        if before:
            pairwise = clustering_stability([ids_np, *before])["pairwise"]
            out["stability_ari"] = float(pairwise[0, 1:].mean())
    scorer = _class_probabilities(probe, report, cluster)
    if scorer is not None:
        out["ece"] = _ece(scorer, codes, y)
    return out


# ------------------------------------------------------------------ sweep
def run_sweep(
    X_train: Any,
    y_train: Any = None,
    X_test: Any = None,
    y_test: Any = None,
    *,
    reducers: Any = ("pca", "rp", "stego", "none"),
    dims: Iterable[int] | str = "study",
    probes: Any = ("kmeans", "linear"),
    seeds: Sequence[int] = (0, 1, 2),
    n_clusters: int | None = None,
    standardize: str = "train",
    batch_images: int | tuple[int, int] | None = None,
    preset: str | None = None,
    featurizer: Any = None,
    cache_dir: str | os.PathLike | None = None,
    features_key: str | None = None,
    device: Any = None,
    mechanisms: bool = False,
    silhouette_sample_size: int | None = 10_000,
    verbose: bool = False,
):
    """Every reducer x dim x probe x seed, scored on held-out data.

    For each seed and reducer, the reducer is fitted on ``X_train`` at each
    dim (PCA once, at the largest dim, and truncated), both splits are
    transformed, and each probe is fitted on the training codes and scored
    on the test codes: cluster probes under Hungarian matching on the test
    split (the unsupervised protocol), the linear probe against
    ``y_train``-trained classes.

    ``standardize="batch", preset=<dataset>`` (with the default
    ``dims="study"``) is the protocol of the study's code for the baselines
    (``src/mxm_dimred.py`` of ``merantix-momentum/stego-studies``); see
    Notes for what still differs.

    Parameters
    ----------
    X_train : array-like of shape (N, C, h, w) or (n, C), or images
        Training feature maps (or tokens). With ``featurizer``, images in any
        form it accepts (array, paths, :class:`~skstego.datasets.ImageCollection`).
    y_train : array-like of int, optional
        Training labels: needed by the linear probe only.
    X_test, y_test : optional
        Held-out maps and their labels; default: the training split (the
        unsupervised protocol scores clusters on the data they came from).
        ``y_test`` (or ``y_train``) is required: it is what is scored.
    reducers : iterable or dict, default=("pca", "rp", "stego", "none")
        Names among ``"pca"`` (standardise + :class:`~skstego.TorchPCA`),
        ``"rp"`` (Gaussian :class:`~skstego.RandomProjection`), ``"stego"``
        (:class:`~skstego.StegoProjector`, retrained per dim), ``"hnne"``
        (:class:`~skstego.HNNEProjector`), ``"none"`` (raw features, one
        cell at the feature dim), or ``(name, estimator)`` pairs / a dict of
        estimators with a ``dim`` parameter (cloned per cell; ``random_state``
        and ``device`` set when they have them). ``standardize`` applies to
        the names ``"pca"``, ``"rp"`` and ``"hnne"`` only: estimators you
        pass run as given (chain a :class:`~skstego.TokenStandardScaler`
        yourself).
    dims : iterable of int or "study", default="study"
        Target dims; dims above the number of features are skipped.
        ``"study"``: the study's :data:`DEFAULT_DIMS` (3 ... 768) plus
        STEGO's dim of ``preset`` (90, 100 or 70) when one is given.
    probes : iterable or dict, default=("kmeans", "linear")
        ``"kmeans"`` (:class:`~skstego.KMeansProbe`), ``"linear"``
        (:class:`~skstego.LinearProbe`), ``"hnne_cluster"``
        (:class:`~skstego.HNNEClusterProbe`), or named estimators.
    seeds : sequence of int, default=(0, 1, 2)
        ``random_state`` of reducers and probes in each repetition.
    n_clusters : int, optional
        ``k`` of the named cluster probes; default: the number of classes
        in the scored labels.
    standardize : {"train", "batch", "none"}, default="train"
        How the named reducers ``"pca"``, ``"rp"`` and ``"hnne"`` see the
        tokens (STEGO always gets raw features).

        - ``"train"``: standardised per channel with the mean and (ddof=0)
          standard deviation of the training tokens, at fit and transform
          time (scikit-learn's ``StandardScaler`` then the reducer).
        - ``"batch"``: the study's code. The reducer is fitted on tokens
          standardised with the training statistics, but at transform time
          every batch of ``batch_images`` images is standardised with its
          own statistics, the training split too (the study standardised
          each training batch of its probes the same way). PCA codes are
          then ``z @ components_.T`` of the batch-standardised ``z``, as in
          the study's torch path.
        - ``"none"``: raw features.
    batch_images : int or (int, int), optional
        Images per standardised batch for ``standardize="batch"``, for the
        (training, test) split; an int for both. Default: the study's,
        :data:`STUDY_BATCH_IMAGES` (16 and 8 for PCA and random projection,
        512 for h-NNE). For 2-D tokens, rows per batch.
    preset : {"cocostuff27", "cityscapes", "potsdam"}, optional
        The dataset's STEGO preset: the ``"stego"`` reducer is
        ``StegoProjector.from_preset(preset)`` with the cell's dim (default
        :class:`~skstego.StegoProjector` defaults), and ``dims="study"``
        adds the preset's dim.
    featurizer : estimator, optional
        Turns ``X_train``/``X_test`` into feature maps, once.
    cache_dir : path, optional
        Makes the sweep resumable: features are stored there as ``.npy``
        memory maps and every finished cell is appended to
        ``results.csv`` at once; a rerun with the same directory skips
        finished cells and reuses the features. With ``mechanisms``, the
        mechanism columns go to ``mechanisms.csv`` (same keys) and each
        cluster probe's test clustering to ``labels/*.npy``, so that a
        resumed sweep still compares later seeds with earlier ones; a cell
        finished without mechanisms is recomputed when they are asked for.

        Every row carries a fingerprint of all settings that change its
        numbers: the reducer's and the probe's parameters (``k``,
        ``standardize`` and ``batch_images`` included; not ``device``,
        ``verbose``, the seed or the dim, which are keys) and the identity of
        the data (shape, dtype and sampled values of the features and labels
        of both splits, or ``features_key``). A cell is reused only under
        the same fingerprint. Cells stored under other settings stay in the
        file (a later sweep with those settings reuses them) and are
        recomputed, with a warning naming the differing settings
        (``settings.json`` records the settings of every fingerprint). A
        results file of an older skstego without fingerprints is moved to
        ``results.unversioned.csv`` with a warning. The features cache is
        keyed by the featurizer's repr, the number of images and their
        identity (paths, or sampled pixel values).
    features_key : str, optional
        Your name for the features and labels (e.g. ``"dino-vitb8-320"``),
        used in the fingerprints instead of their sampled values. Give a new
        key whenever they change.
    device : optional
        Overrides the ``device`` of every reducer and probe (and is where
        the mechanism metrics run; default "auto").
    mechanisms : bool, default=False
        Also measure the study's two mechanisms in every cell, on the test
        codes: the columns of :data:`MECHANISM_COLUMNS` (see Notes).
    silhouette_sample_size : int or None, default=10_000
        Tokens the ``silhouette`` column scores (drawn with the cell's seed
        as ``random_state``); None scores every token (quadratic cost).
    verbose : bool, default=False
        Print one line per finished cell.

    Returns
    -------
    results : pandas.DataFrame
        One row per cell with the columns of :data:`RESULT_COLUMNS`: ``miou``
        and ``accuracy`` are fractions in [0, 1]; ``dim`` of ``"none"`` is
        the feature dim; the ``*_seconds`` columns time fit + transform.
        With ``mechanisms``, followed by those of :data:`MECHANISM_COLUMNS`.

    Notes
    -----
    The mechanism columns, NaN where they do not apply:

    * ``inertia``, ``n_iter``: the fitted cluster probe's ``inertia_`` (on
      the training codes) and ``n_iter_`` (Lloyd iterations to converge);
      ``inertia_curve``: its ``inertia_curve_`` (inertia after each
      iteration) as a JSON list, e.g. ``json.loads(row.inertia_curve)``.
      Cluster probes are those with ``cluster_centers_``.
    * ``silhouette``: :func:`skstego.metrics.silhouette_score` of the test
      codes under the probe's test clustering (its clusters, not classes),
      in the probe's metric (cosine for spherical k-means), on
      ``silhouette_sample_size`` tokens; ``davies_bouldin``:
      :func:`skstego.metrics.davies_bouldin_score` of the same clustering,
      on unit-length codes for cosine probes. Both NaN when the test codes
      fall in one cluster.
    * ``ece``: :func:`skstego.metrics.expected_calibration_error` of
      ``predict_proba`` on the test codes (at the label size for maps)
      against the test labels, for every probe with ``predict_proba``. For
      a cluster probe the probabilities are class probabilities under the
      same Hungarian matching on the test data that its ``miou`` uses: the
      probe's ``mapping_`` is replaced by that matching in a copy, so each
      class column sums its clusters' probabilities and the mass of
      unmatched clusters forms one more column (whose argmax pixels count
      as wrong). A linear probe's classes are its ``classes_``.
    * ``stability_ari``: mean adjusted Rand index between this seed's test
      clustering and those of the seeds before it (in ``seeds`` order) in
      the same (reducer, dim, probe) cell; NaN for the first seed.

    The numbers are on the test codes at the codes' resolution, except
    ``ece`` (label resolution).

    With ``standardize="batch"`` and ``preset``, what still differs from the
    study's code: the reducers are fitted on all of ``X_train`` (the study:
    the first 5000 training images; h-NNE's standardisation statistics: on
    its 1M-token subsample, here on all training tokens); training batches
    are consecutive images in the given order (the study's were shuffled);
    the random projection is drawn with the cell's seed (the study's
    ``GaussianRandomProjection`` drew from NumPy's global state after
    ``seed_everything(0)``); the probes are skstego's, fitted on all
    training codes (the study trained its probes by Adam on mini-batches);
    a channel constant within a batch is centred and left at 0, as
    scikit-learn's ``StandardScaler`` does (the study's PCA path would
    divide by zero there).
    Without ``X_test``, the test codes are the training codes.

    Examples
    --------
    >>> from skstego.datasets import make_feature_maps
    >>> from skstego.study import run_sweep
    >>> X, y = make_feature_maps(16, n_features=32, map_size=8, random_state=0)
    >>> table = run_sweep(X, y, reducers=["pca", "none"], dims=[3, 6],
    ...                   probes=["kmeans"], seeds=[0], device="cpu")
    >>> table[["reducer", "dim", "probe"]].values.tolist()
    [['pca', 3, 'kmeans'], ['pca', 6, 'kmeans'], ['none', 32, 'kmeans']]
    """
    import pandas as pd

    y_eval = y_test if y_test is not None else y_train
    if y_eval is None:
        raise ValueError("run_sweep scores against labels: pass y_test or y_train.")
    if standardize not in STANDARDIZE_OPTIONS:
        raise ValueError(
            f"standardize must be one of {STANDARDIZE_OPTIONS}, got {standardize!r}."
        )
    batch_images = _check_batch_images(batch_images)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(
                f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}."
            )
    if isinstance(dims, str):
        if dims != "study":
            raise ValueError(f"dims must be integers or 'study', got {dims!r}.")
        dims = list(DEFAULT_DIMS)
        if preset is not None:
            dims.append(int(PRESETS[preset]["dim"]))
    reducer_specs = _as_named(
        reducers,
        lambda n: _named_reducer(n, standardize, batch_images, preset),
        "reducer",
    )
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 1:
        raise ValueError(f"dims must be positive integers, got {dims}.")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("Give at least one seed.")

    if silhouette_sample_size is not None and (
        isinstance(silhouette_sample_size, bool)
        or not isinstance(silhouette_sample_size, (int, np.integer))
        or silhouette_sample_size < 2
    ):
        raise ValueError(
            "silhouette_sample_size must be an integer >= 2 or None, got "
            f"{silhouette_sample_size!r}."
        )

    results_path = mechanisms_path = None
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        results_path = os.path.join(cache_dir, _RESULTS_FILE)
        mechanisms_path = os.path.join(cache_dir, _MECHANISMS_FILE)
        _set_aside_unversioned(results_path)
        _set_aside_unversioned(mechanisms_path)
    rows, done = _done_cells(results_path)
    mech_rows, mech_done = _done_cells(mechanisms_path) if mechanisms else ([], set())
    if mechanisms:  # a cell is finished when it has its mechanisms too
        done = done & mech_done
    labels = _LabelStore(cache_dir)

    F_train = _features(X_train, featurizer, cache_dir, "train", verbose)
    F_test = (
        F_train
        if X_test is None
        else _features(X_test, featurizer, cache_dir, "test", verbose)
    )
    # validate once here, so that every cell trusts its input
    probe_check = _Shape()
    F_train = check_features(probe_check, F_train, reset=True)
    F_test = check_features(probe_check, F_test, reset=False)
    n_features = probe_check.n_features_in_
    if y_train is not None and np.ndim(F_train) == 2 and len(y_train) != len(F_train):
        raise ValueError(
            f"X_train has {len(F_train)} samples but y_train has {len(y_train)}."
        )
    k = n_clusters
    if k is None:
        valid = np.asarray(y_eval.cpu() if is_torch(y_eval) else y_eval)
        k = int(valid.max()) + 1 if valid.size and valid.max() >= 0 else 1
    probe_specs = _as_named(probes, lambda n: _named_probe(n, k), "probe")
    if y_train is None:
        supervised = [n for n, p in probe_specs if _needs_labels(p)]
        if supervised:
            raise ValueError(f"Probes {supervised} need y_train.")

    # the fingerprint of every (reducer, probe) pair: all that changes a score
    if features_key is not None:
        data = {"features_key": str(features_key)}
    else:
        data = {
            "X_train": _data_id(F_train),
            "y_train": _data_id(y_train),
            "X_test": "X_train" if F_test is F_train else _data_id(F_test),
            "y_test": _data_id(y_test),
        }
    known = _read_settings(cache_dir)
    fingerprints = {}
    for name, est in reducer_specs:
        for pname, probe in probe_specs:
            settings = {
                "reducer": _settings(est),
                "probe": _settings(probe),
                "data": data,
            }
            fp = _hash(settings)
            fingerprints[name, pname] = fp
            known[fp] = settings
    _write_settings(cache_dir, known)

    def cells(name: str, est: Any) -> list[int]:
        if est is None:
            return [n_features]
        return [d for d in dims if d <= n_features]

    wanted = {
        (name, d, pname, seed, fingerprints[name, pname])
        for seed in seeds
        for name, est in reducer_specs
        for d in cells(name, est)
        for pname, _ in probe_specs
    }
    _warn_stale(rows, wanted - done, known)

    def codes(red: Any) -> tuple[Any, Any]:
        C_train = _transform(red, F_train, "train")
        if F_test is F_train:
            return C_train, C_train
        return C_train, _transform(red, F_test, "test")

    for seed in seeds:
        for name, est in reducer_specs:
            fps = {p: fingerprints[name, p] for p, _ in probe_specs}
            todo = [
                d
                for d in cells(name, est)
                if any((name, d, p, seed, fps[p]) not in done for p, _ in probe_specs)
            ]
            if not todo:
                continue
            shared = None
            if est is not None and _truncatable(est):
                t0 = time.perf_counter()
                top = _seeded(est, seed, device, dim=max(todo)).fit(F_train)
                shared = (*codes(top), time.perf_counter() - t0)
            for d in todo:
                t0 = time.perf_counter()
                if est is None:
                    C_train, C_test = F_train, F_test
                elif shared is not None:
                    C_train = _slice_codes(shared[0], d)
                    C_test = (
                        C_train
                        if shared[1] is shared[0]
                        else _slice_codes(shared[1], d)
                    )
                else:
                    red = _seeded(est, seed, device, dim=d).fit(F_train)
                    C_train, C_test = codes(red)
                reduce_seconds = time.perf_counter() - t0
                if shared is not None:
                    reduce_seconds += shared[2] / len(todo)
                for pname, probe in probe_specs:
                    key = (name, int(d), pname, seed, fps[pname])
                    if key in done:
                        continue
                    t1 = time.perf_counter()
                    fitted = _seeded(probe, seed, device).fit(C_train, y_train)
                    report = _evaluate(fitted, C_test, y_eval)
                    probe_seconds = time.perf_counter() - t1
                    if mechanisms:
                        mech = _mechanisms(
                            fitted,
                            C_test,
                            y_eval,
                            report,
                            key=key,
                            earlier=[
                                (name, int(d), pname, s, fps[pname])
                                for s in seeds[: seeds.index(seed)]
                            ],
                            labels=labels,
                            sample_size=silhouette_sample_size,
                            device=device,
                        )
                        mech_row = {**dict(zip(_KEYS, key, strict=True)), **mech}
                        mech_rows.append(mech_row)
                        _append(mechanisms_path, mech_row)
                    row = {
                        "reducer": name,
                        "dim": int(d),
                        "probe": pname,
                        "seed": seed,
                        "miou": float(report["miou"]),
                        "accuracy": float(report["accuracy"]),
                        "reduce_seconds": round(reduce_seconds, 4),
                        "probe_seconds": round(probe_seconds, 4),
                        "n_train": len(F_train),
                        "n_test": len(F_test),
                        "fingerprint": fps[pname],
                    }
                    rows.append(row)
                    done.add(key)
                    _append(results_path, row)
                    if verbose:
                        print(
                            f"{name:>8} dim {d:>4} {pname:>8} seed {seed}: "
                            f"mIoU {100 * row['miou']:.1f} "
                            f"acc {100 * row['accuracy']:.1f}",
                            flush=True,
                        )
    # only the cells asked for, under this sweep's settings; a recomputed
    # cell: its last row
    rows = list({_key(r): r for r in rows if _key(r) in wanted}.values())
    table = pd.DataFrame(rows, columns=[*RESULT_COLUMNS, "fingerprint"])
    if mechanisms:
        mech_rows = [r for r in mech_rows if _key(r) in wanted]
        mech_rows = list({_key(r): r for r in mech_rows}.values())
        mech = pd.DataFrame(mech_rows, columns=[*_KEYS, *MECHANISM_COLUMNS])
        mech = mech.astype({"dim": table["dim"].dtype, "seed": table["seed"].dtype})
        table = table.merge(mech, on=list(_KEYS), how="left")
    order = {n: i for i, (n, _) in enumerate(reducer_specs)}
    porder = {n: i for i, (n, _) in enumerate(probe_specs)}
    table = table.assign(
        _r=table["reducer"].map(order), _p=table["probe"].map(porder)
    ).sort_values(["seed", "_r", "dim", "_p"], kind="stable")
    table = table.drop(columns=["_r", "_p", "fingerprint"])
    return table.reset_index(drop=True)


def _check_batch_images(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if (
        len(pair) != 2
        or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair
        )
        or min(pair) < 1
    ):
        raise ValueError(
            "batch_images must be a positive int or a (training, test) pair of "
            f"them, got {value!r}."
        )
    return int(pair[0]), int(pair[1])


class _Shape(BaseEstimator):
    """A stand-in estimator for :func:`check_features`'s bookkeeping."""


def _needs_labels(probe: Any) -> bool:
    return is_classifier(probe)


def summarize_sweep(results: Any):
    """Mean, standard deviation and count over seeds of each cell.

    Parameters
    ----------
    results : pandas.DataFrame
        The table of :func:`run_sweep`.

    Returns
    -------
    summary : pandas.DataFrame
        Indexed by (probe, reducer, dim), with columns
        ``miou_mean, miou_std, accuracy_mean, accuracy_std``, then
        ``<column>_mean, <column>_std`` for every numeric mechanism column
        present (:data:`MECHANISM_COLUMNS` but ``inertia_curve``), then
        ``n_seeds``. Means and standard deviations (ddof=1) skip NaN.

    Examples
    --------
    >>> import pandas as pd
    >>> from skstego.study import summarize_sweep
    >>> t = pd.DataFrame({"reducer": ["pca", "pca"], "dim": [3, 3],
    ...                   "probe": ["kmeans"] * 2, "seed": [0, 1],
    ...                   "miou": [0.5, 0.7], "accuracy": [0.6, 0.8]})
    >>> round(float(summarize_sweep(t)["miou_mean"].iloc[0]), 3)
    0.6
    """
    import pandas as pd

    table = pd.DataFrame(results)
    missing = {"reducer", "dim", "probe", "seed", "miou", "accuracy"} - set(table)
    if missing:
        raise ValueError(f"results lack the columns {sorted(missing)}.")
    grouped = table.groupby(["probe", "reducer", "dim"], sort=True)
    extra = [c for c in MECHANISM_COLUMNS if c in table and c != "inertia_curve"]
    out = grouped[["miou", "accuracy", *extra]].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["n_seeds"] = grouped["seed"].nunique()
    return out


def save_sweep_figures(
    results: Any,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("png", "svg"),
    mechanisms: bool | None = None,
) -> list[str]:
    """The paper's figures: mIoU and accuracy vs dim, one line per reducer.

    One figure per metric (``sweep_miou.*``, ``sweep_accuracy.*``), one panel
    per probe, mean and standard deviation over seeds, drawn by
    :func:`skstego.plotting.plot_dimension_sweep`; and with mechanisms,
    ``sweep_mechanisms.*`` drawn by :func:`skstego.plotting.plot_mechanisms`
    (mIoU, k-means iterations and inertia, silhouette and seed stability
    against the dim, for the first cluster probe).

    Parameters
    ----------
    results : pandas.DataFrame
        The table of :func:`run_sweep`.
    out_dir : path
        Created if missing.
    formats : sequence of str, default=("png", "svg")
        File formats matplotlib writes.
    mechanisms : bool, optional
        Draw the mechanism figure; default: when ``results`` has the
        mechanism columns of ``run_sweep(..., mechanisms=True)``.

    Returns
    -------
    paths : list of str
        The files written.
    """
    import matplotlib.pyplot as plt

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for metric in ("miou", "accuracy"):
        drawn = plot_dimension_sweep(results, metric=metric)
        fig = drawn if hasattr(drawn, "savefig") else drawn.figure
        for fmt in formats:
            path = os.path.join(out_dir, f"sweep_{metric}.{fmt}")
            fig.savefig(path, bbox_inches="tight")
            paths.append(path)
        plt.close(fig)
    if mechanisms is None:
        mechanisms = "n_iter" in getattr(results, "columns", ())
    if mechanisms:
        fig = plot_mechanisms(results)
        for fmt in formats:
            path = os.path.join(out_dir, f"sweep_mechanisms.{fmt}")
            fig.savefig(path, bbox_inches="tight")
            paths.append(path)
        plt.close(fig)
    return paths
