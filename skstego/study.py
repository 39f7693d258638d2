"""The dimension sweep of the STEGO study, as one resumable function.

Koenig et al. (CVPR 2023 workshop) found that STEGO's head is mostly a
dimensionality reduction: they reduced DINO features with PCA, random
projection, h-NNE and STEGO itself to dims 3 ... 768, fitted a linear and a
cluster probe on the codes and compared validation mIoU and pixel accuracy
(``STEGO.md`` section 7). :func:`run_sweep` runs that grid for any reducers,
dims, probes and seeds, and returns a tidy table; :func:`summarize_sweep`
aggregates it over seeds and :func:`save_sweep_figures` draws the paper's
figures.

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
import json
import os
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone, is_classifier

from ._device import (
    apply_tokenwise,
    as_tensor,
    check_features,
    is_torch,
    iter_slices,
    resolve_device,
    rows_per_batch,
)

__all__ = [
    "DEFAULT_DIMS",
    "MECHANISM_COLUMNS",
    "RESULT_COLUMNS",
    "run_sweep",
    "save_sweep_figures",
    "summarize_sweep",
]

#: The study's dims (STEGO.md section 7).
DEFAULT_DIMS = (3, 6, 12, 24, 48, 96, 192, 384, 768)

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

_KEYS = ("reducer", "dim", "probe", "seed")
_RESULTS_FILE = "results.csv"
_MECHANISMS_FILE = "mechanisms.csv"
_LABELS_DIR = "labels"
_FEATURES_FILE = "features_{}.npy"
_FEATURES_META = "features_{}.json"


# ------------------------------------------------------------------ specs
def _named_reducer(name: str) -> Any:
    from .projection import RandomProjection, StegoProjector, TorchPCA

    if name == "pca":
        # the study standardised tokens before PCA
        return TorchPCA(standardize=True)
    if name == "rp":
        return RandomProjection(kind="gaussian")
    if name == "stego":
        return StegoProjector()
    if name == "hnne":
        from .projection import HNNEProjector

        return HNNEProjector(metric="cosine")
    raise ValueError(
        f"Unknown reducer {name!r}: use 'pca', 'rp', 'stego', 'hnne', 'none' or "
        "pass (name, estimator) pairs / a dict of estimators with a `dim` parameter."
    )


def _named_probe(name: str, k: int) -> Any:
    from .probes import KMeansProbe, LinearProbe

    if name == "kmeans":
        return KMeansProbe(k=k)
    if name == "linear":
        return LinearProbe()
    if name == "hnne_cluster":
        from .probes import HNNEClusterProbe

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
    from .projection import TorchPCA

    return isinstance(est, TorchPCA)


def _seeded(est: Any, seed: int, device: Any, **params: Any) -> Any:
    est = clone(est)
    own = est.get_params(deep=False)
    extra = {"random_state": seed} if "random_state" in own else {}
    if device is not None and "device" in own:
        extra["device"] = device
    extra.update({k: v for k, v in params.items() if k in own})
    return est.set_params(**extra)


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
    return (row["reducer"], int(row["dim"]), row["probe"], int(row["seed"]))


def _done_cells(path: str | None) -> tuple[list[dict], set]:
    """Rows of a results file (the last row of a recomputed cell) and keys."""
    if path is None or not os.path.exists(path):
        return [], set()
    import pandas as pd

    # names stay strings (a reducer called "1" is not the number 1)
    table = pd.read_csv(path, dtype={"reducer": str, "probe": str})
    rows = list({_key(r): r for r in table.to_dict("records")}.values())
    return rows, {_key(r) for r in rows}


def _append(path: str | None, row: dict) -> None:
    if path is None:
        return
    import csv

    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _evaluate(probe: Any, codes: Any, y: Any) -> dict:
    if hasattr(probe, "score_report"):
        return probe.score_report(codes, y)
    from .metrics import segmentation_report

    size = tuple(np.shape(y)[-2:]) if np.ndim(codes) == 4 else None
    pred = probe.predict(codes, size=size) if size else probe.predict(codes)
    return segmentation_report(y, pred)


def _slice_codes(codes: Any, dim: int) -> Any:
    return codes[:, :dim]


# ------------------------------------------------------------- mechanisms
def _labels_path(cache_dir: str, key: tuple) -> str:
    reducer, dim, probe, seed = key
    name = "__".join(
        [
            urllib.parse.quote(reducer, safe=""),
            str(dim),
            urllib.parse.quote(probe, safe=""),
        ]
    )
    return os.path.join(cache_dir, _LABELS_DIR, f"{name}__seed{seed}.npy")


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
    from ._cluster_metrics import (
        _calibration_bins,
        _confidence_and_correct,
        _ece_from_bins,
    )

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
        conf, correct = _confidence_and_correct(yb, proba)
        bins = _calibration_bins(conf, correct, n_bins)
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
    return _ece_from_bins(bins)


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
    from ._cluster_metrics import (
        clustering_stability,
        davies_bouldin_score,
        silhouette_score,
    )

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
    dims: Iterable[int] = DEFAULT_DIMS,
    probes: Any = ("kmeans", "linear"),
    seeds: Sequence[int] = (0, 1, 2),
    n_clusters: int | None = None,
    featurizer: Any = None,
    cache_dir: str | os.PathLike | None = None,
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
        and ``device`` set when they have them).
    dims : iterable of int, default=DEFAULT_DIMS
        Target dims; dims above the number of features are skipped.
    probes : iterable or dict, default=("kmeans", "linear")
        ``"kmeans"`` (:class:`~skstego.KMeansProbe`), ``"linear"``
        (:class:`~skstego.LinearProbe`), ``"hnne_cluster"``
        (:class:`~skstego.HNNEClusterProbe`), or named estimators.
    seeds : sequence of int, default=(0, 1, 2)
        ``random_state`` of reducers and probes in each repetition.
    n_clusters : int, optional
        ``k`` of the named cluster probes; default: the number of classes
        in the scored labels.
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
    reducer_specs = _as_named(reducers, _named_reducer, "reducer")
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

    def cells(name: str, est: Any) -> list[int]:
        if est is None:
            return [n_features]
        return [d for d in dims if d <= n_features]

    for seed in seeds:
        for name, est in reducer_specs:
            todo = [
                d
                for d in cells(name, est)
                if any((name, d, p, seed) not in done for p, _ in probe_specs)
            ]
            if not todo:
                continue
            shared = None
            if est is not None and _truncatable(est):
                t0 = time.perf_counter()
                top = _seeded(est, seed, device, dim=max(todo)).fit(F_train)
                shared = (
                    top.transform(F_train),
                    top.transform(F_test) if F_test is not F_train else None,
                    time.perf_counter() - t0,
                )
            for d in todo:
                t0 = time.perf_counter()
                if est is None:
                    C_train, C_test = F_train, F_test
                elif shared is not None:
                    C_train = _slice_codes(shared[0], d)
                    C_test = (
                        C_train if shared[1] is None else _slice_codes(shared[1], d)
                    )
                else:
                    red = _seeded(est, seed, device, dim=d).fit(F_train)
                    C_train = red.transform(F_train)
                    C_test = C_train if F_test is F_train else red.transform(F_test)
                reduce_seconds = time.perf_counter() - t0
                if shared is not None:
                    reduce_seconds += shared[2] / len(todo)
                for pname, probe in probe_specs:
                    if (name, d, pname, seed) in done:
                        continue
                    t1 = time.perf_counter()
                    fitted = _seeded(probe, seed, device).fit(C_train, y_train)
                    report = _evaluate(fitted, C_test, y_eval)
                    probe_seconds = time.perf_counter() - t1
                    key = (name, int(d), pname, seed)
                    if mechanisms:
                        mech = _mechanisms(
                            fitted,
                            C_test,
                            y_eval,
                            report,
                            key=key,
                            earlier=[
                                (name, int(d), pname, s)
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
                    }
                    rows.append(row)
                    done.add((name, d, pname, seed))
                    _append(results_path, row)
                    if verbose:
                        print(
                            f"{name:>8} dim {d:>4} {pname:>8} seed {seed}: "
                            f"mIoU {100 * row['miou']:.1f} "
                            f"acc {100 * row['accuracy']:.1f}",
                            flush=True,
                        )
    rows = list({_key(r): r for r in rows}.values())  # a recomputed cell: last
    table = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    if mechanisms:
        mech_rows = list({_key(r): r for r in mech_rows}.values())
        mech = pd.DataFrame(mech_rows, columns=[*_KEYS, *MECHANISM_COLUMNS])
        mech = mech.astype({"dim": table["dim"].dtype, "seed": table["seed"].dtype})
        table = table.merge(mech, on=list(_KEYS), how="left")
    wanted = {n for n, _ in reducer_specs}, {p for p, _ in probe_specs}, set(seeds)
    table = table[
        table["reducer"].isin(wanted[0])
        & table["probe"].isin(wanted[1])
        & table["seed"].isin(wanted[2])
    ]
    order = {n: i for i, (n, _) in enumerate(reducer_specs)}
    porder = {n: i for i, (n, _) in enumerate(probe_specs)}
    table = table.assign(
        _r=table["reducer"].map(order), _p=table["probe"].map(porder)
    ).sort_values(["seed", "_r", "dim", "_p"], kind="stable")
    return table.drop(columns=["_r", "_p"]).reset_index(drop=True)


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

    from .plotting import plot_dimension_sweep

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
        from .plotting import plot_mechanisms

        fig = plot_mechanisms(results)
        for fmt in formats:
            path = os.path.join(out_dir, f"sweep_mechanisms.{fmt}")
            fig.savefig(path, bbox_inches="tight")
            paths.append(path)
        plt.close(fig)
    return paths
