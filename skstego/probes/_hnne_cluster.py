"""HNNEClusterProbe: a level of h-NNE's FINCH hierarchy as the cluster probe.

The STEGO study's supplementary suggests, as future work, skipping k-means and
matching h-NNE's own clusters to classes with the Hungarian algorithm. This
probe does that: it builds hnne's FINCH hierarchy on (a subsample of) the
tokens, takes one level of it as the clustering, and assigns new tokens to the
nearest centroid of that level. Matching and scoring are KMeansProbe's.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._dask import lazy_output
from .._device import (
    TorchEstimatorMixin,
    apply_tokenwise,
    check_features,
    is_torch,
)
from ..projection._hnne import (
    finch_hierarchy,
    hnne_seed,
    new_hnne,
    sample_tokens,
    set_hierarchy,
)
from ._base import check_targets, predict_labels
from ._centroid import CentroidProbeMixin
from ._kmeans_kernels import _normalize_rows

__all__ = ["HNNEClusterProbe"]


class HNNEClusterProbe(
    CentroidProbeMixin,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    ClusterMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """Cluster probe from h-NNE's FINCH hierarchy, Hungarian-matched to classes.

    ``fit`` builds the FINCH hierarchy that :class:`hnne.HNNE` builds (that
    of a fresh ``HNNE``'s ``fit_only_hierarchy``) on at most ``max_fit_samples``
    random tokens, picks one level of it and stores the centroids of that
    level's clusters. :meth:`predict` assigns every token to the nearest
    centroid (cosine or Euclidean), on the device, as :class:`KMeansProbe`
    does; with ``y`` in ``fit`` it returns classes through the Hungarian
    mapping, and :meth:`score` / :meth:`score_report` follow KMeansProbe's
    unsupervised protocol exactly (unmatched clusters count as errors).

    Parameters
    ----------
    k : int or None, default=None
        Wanted number of clusters: the level whose number of clusters is
        closest to ``k`` is used (on a tie, the finer level). FINCH levels
        are few and far apart (each has a few times fewer clusters than the
        one below), so the number obtained is ``n_clusters_``, not ``k``; a
        warning says so when ``k`` lies outside the hierarchy's range.

    level : "auto" or int, default="auto"
        Level of the hierarchy, 0 being the finest. ``"auto"`` uses ``k``, or
        without ``k`` the coarsest level FINCH built (FINCH stops before
        merging everything, so that level has at least 2 clusters unless the
        tokens do not split at all). An int selects that level and excludes
        ``k``.

    metric : {"cosine", "euclidean"}, default="cosine"
        Distance of the FINCH hierarchy and of the nearest-centroid
        assignment. For cosine, centroids are the normalised means of the
        normalised tokens of each cluster (spherical means).

    max_fit_samples : int or None, default=1_000_000
        Build the hierarchy on a random subsample of at most this many tokens
        (drawn from ``random_state``); None uses all. FINCH uses exact first
        neighbours (an n x n distance matrix) up to hnne's ``ann_threshold``
        of 20 000 tokens, approximate ones (pynndescent) above.

    n_classes : int or None, default=None
        Number of classes the scores count, as in :class:`KMeansProbe`: a
        class absent from the evaluated labels still takes part in the
        Hungarian matching. None: the classes seen by ``fit(X, y)``, else the
        largest evaluated label + 1. Does not affect the clustering.

    temperature : float, default=0.5
        Softness of :meth:`predict_proba`, as in :class:`KMeansProbe`: a
        softmax of the cosine similarities (or negative squared distances)
        to the centroids divided by ``temperature``.

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where centroids, predictions and scores are computed; the hierarchy
        is built on the CPU by hnne. Resolved in :meth:`fit`.

    random_state : int, RandomState instance or None, default=None
        Seeds the subsample and is passed to hnne (its approximate
        neighbours); an int is passed as is.

    verbose : bool, default=False
        Let hnne/FINCH print their progress.

    Attributes
    ----------
    hnne_ : hnne.HNNE
        The model that built the hierarchy; ``hnne_.hierarchy_parameters``
        holds the FINCH ``partitions`` of the fit tokens (one column per
        level) and their ``partition_sizes``. All levels are kept (hnne's
        ``min_size_top_level`` is set to 1).

    levels_ : ndarray of shape (n_levels,), int64
        Number of clusters of every level, finest first.

    level_ : int
        Level used.

    n_clusters_ : int
        Number of clusters of that level, ``levels_[level_]``.

    cluster_centers_ : ndarray of shape (n_clusters_, n_features), float32
        Centroids of the level's clusters over the fit tokens; unit vectors
        for ``metric="cosine"``.

    labels_ : ndarray of int64, shape (n_samples,) or (N, h, w)
        Cluster of every token of the training data, in its layout: the
        FINCH partition for the tokens the hierarchy was built on, the
        nearest centroid for the others (when subsampled).

    inertia_ : float
        Sum of squared distances of every training token to its **nearest**
        centroid (as :attr:`sklearn.cluster.KMeans.inertia_`; on unit tokens
        and centroids for ``metric="cosine"``), so that ``score(X)`` without
        ``y`` on the training data is ``-inertia_``. FINCH clusters are not
        Voronoi cells (see Notes), so a few tokens may count towards another
        centroid than their ``labels_``.

    n_iter_ : int
        Number of FINCH rounds run, ``len(levels_)``: each round merges the
        clusters of the previous level through their first neighbours (the
        counterpart of KMeans' iterations; FINCH has no convergence loop).

    n_features_in_ : int
        Number of features (channels) seen during :meth:`fit`.

    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during :meth:`fit`, for 2-D input with string
        column names only.

    mapping_ : ndarray of shape (n_clusters_,), int64
        Only when ``fit`` got ``y``: class of every cluster by the Hungarian
        assignment on the training confusion matrix; -1 for unmatched clusters.

    n_classes_ : int
        Only when ``fit`` got ``y``: largest valid label + 1.

    See Also
    --------
    KMeansProbe : The same probe with k-means centroids.
    HNNEProjector : h-NNE as a reducer, on the same hierarchy.
    hnne.HNNE : Builds the hierarchy.

    Notes
    -----
    A FINCH cluster is a connected group of first-neighbour links, not a
    Voronoi cell: a few tokens of a cluster can lie nearer another cluster's
    centroid, so :meth:`predict` on the fit tokens may differ from
    ``labels_`` there (on well separated data it does not). Centroids are
    computed in float32 on the device. Building the hierarchy costs hnne's
    FINCH time and memory; it runs on the CPU.

    References
    ----------
    .. [1] M. S. Sarfraz, V. Sharma and R. Stiefelhagen, "Efficient
           Parameter-free Clustering Using First Neighbor Relations",
           CVPR 2019.
    .. [2] M. S. Sarfraz, M. Koulakis, C. Seibold and R. Stiefelhagen,
           "Hierarchical Nearest Neighbor Graph Embedding for Efficient
           Dimensionality Reduction", CVPR 2022.
    .. [3] A. Koenig, M. Schambach and J. Otterbach, "Uncovering the Inner
           Workings of STEGO for Safe Unsupervised Semantic Segmentation",
           CVPR 2023 workshops (supplementary: future work).

    Examples
    --------
    >>> import numpy as np
    >>> from skstego import HNNEClusterProbe
    >>> rng = np.random.default_rng(1)
    >>> means = rng.normal(size=(3, 8)) * 5
    >>> y = np.repeat([0, 1, 2], 100)
    >>> X = (means[y] + rng.normal(size=(300, 8))).astype(np.float32)
    >>> probe = HNNEClusterProbe(k=3, device="cpu", random_state=0).fit(X, y)
    >>> probe.levels_  # clusters per FINCH level, finest first
    array([67, 14,  3])
    >>> probe.n_clusters_, probe.score(X, y)
    (3, 1.0)
    """

    _parameter_constraints: ClassVar[dict] = {
        "k": [Interval(Integral, 1, None, closed="left"), None],
        "level": [StrOptions({"auto"}), Interval(Integral, 0, None, closed="left")],
        "metric": [StrOptions({"cosine", "euclidean"})],
        "max_fit_samples": [Interval(Integral, 1, None, closed="left"), None],
        "n_classes": [Interval(Integral, 1, None, closed="left"), None],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        k: int | None = None,
        *,
        level: str | int = "auto",
        metric: str = "cosine",
        max_fit_samples: int | None = 1_000_000,
        n_classes: int | None = None,
        temperature: float = 0.5,
        device: str | torch.device | None = "auto",
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.k = k
        self.level = level
        self.metric = metric
        self.max_fit_samples = max_fit_samples
        self.n_classes = n_classes
        self.temperature = temperature
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ---------------------------------------------------------------- fit

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> HNNEClusterProbe:
        """Build the hierarchy, pick a level, fit its centroids (and mapping).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps. Not modified. On-disk input (a
            :class:`~skstego.features.FeatureStore`, a zarr or dask array, a
            NumPy memmap) is never loaded whole: one pass gathers the
            ``max_fit_samples`` drawn tokens, a second labels every token.
        y : array-like or torch.Tensor of int, default=None
            Optional labels, (n_samples,) for tokens or label maps (N, H, W)
            for maps (any H, W; scores are upsampled bilinearly to it); -1 is
            ignored. When given, ``mapping_`` and ``n_classes_`` are fitted.

        Returns
        -------
        self : HNNEClusterProbe
            Fitted estimator.
        """
        if self.level != "auto" and self.k is not None:
            raise ValueError(
                f"Give either k (wanted number of clusters) or level (index in "
                f"the hierarchy), not both; got k={self.k}, level={self.level}."
            )
        X = check_features(self, X, reset=True, lazy=True)
        if is_torch(X):
            X = X.detach()
        if y is not None:
            y = check_targets(X, y)
        device = self._resolved_device()
        cosine = self.metric == "cosine"

        tokens, idx = sample_tokens(X, self.max_fit_samples, self.random_state)
        model = new_hnne(metric=self.metric, random_state=hnne_seed(self.random_state))
        model.min_size_top_level = 1  # keep every level FINCH builds
        # hnne's fit_only_hierarchy, with FINCH's exact cosine neighbours
        # computed in place (the same hierarchy; see HNNEProjector)
        verbose = bool(self.verbose)
        set_hierarchy(model, finch_hierarchy(model, tokens, verbose), verbose)
        hp = model.hierarchy_parameters
        levels = np.asarray(hp.partition_sizes, dtype=np.int64)
        level = self._choose_level(levels)
        partition = np.asarray(hp.partitions[:, level], dtype=np.int64)
        n_clusters = int(levels[level])

        xs = torch.as_tensor(tokens).to(device)
        if cosine:
            xs = _normalize_rows(xs)
        part = torch.as_tensor(partition, device=device)
        sums = torch.zeros(n_clusters, xs.shape[1], dtype=xs.dtype, device=device)
        sums.index_add_(0, part, xs)
        counts = torch.bincount(part, minlength=n_clusters).clamp_min(1)
        centers = sums / counts[:, None].to(sums.dtype)
        if cosine:
            centers = _normalize_rows(centers)
        del xs, sums

        self.hnne_ = model
        self.levels_ = levels
        self.level_ = int(level)
        self.n_clusters_ = n_clusters
        self.cluster_centers_ = centers.cpu().numpy().astype(np.float32)

        if idx is None:
            labels = partition
        else:  # nearest centroid for all, FINCH's own clusters where known
            labels = predict_labels(
                self._scorer(device), X, device=device, n_outputs=n_clusters
            ).reshape(-1)
            labels = (labels.cpu().numpy() if is_torch(labels) else labels).copy()
            labels[idx] = partition
        if X.ndim == 4:
            labels = labels.reshape(X.shape[0], X.shape[2], X.shape[3])
        self.labels_ = labels
        self.n_iter_ = len(levels)
        self.inertia_ = self._inertia(X)

        for name in ("mapping_", "n_classes_"):
            self.__dict__.pop(name, None)
        if y is not None:
            self._fit_mapping(X, y, labels, device)
        return self

    # ---------------------------------------------------------- transform

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Distances of every token to the centroids, as ``KMeans.transform``.

        Euclidean distances ``||x - c||`` to ``cluster_centers_``. With
        ``metric="cosine"`` they are the Euclidean distances between the
        unit-normalised token and the (unit) centroids, ``sqrt(2 - 2 cos)``:
        monotone in the cosine distance, nearest centroid = predicted
        cluster, and their squares sum to the inertia.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps. Not modified.

        Returns
        -------
        X_new : ndarray or torch.Tensor of shape (n_samples, n_clusters_) or \
                (N, n_clusters_, h, w), float32
            Distances, computed in float64 and returned as float32. NumPy for
            NumPy input; a tensor on ``device`` for tensor input; a lazy dask
            array mapped over the chunks for dask input.
        """
        check_is_fitted(self)
        out = lazy_output(self, "transform", X, self._n_outputs)
        if out is not None:
            return out
        X = self._check_X(X)
        device = self._resolved_device()
        centers = self._tensor("cluster_centers_", device, torch.float64)
        cosine = self.metric == "cosine"

        def fn(tokens: torch.Tensor) -> torch.Tensor:
            if cosine:
                tokens = _normalize_rows(tokens)
            d = torch.cdist(
                tokens, centers, compute_mode="donot_use_mm_for_euclid_dist"
            )
            return d.to(torch.float32)

        return apply_tokenwise(
            fn, X, device=device, out_features=self.n_clusters_, dtype=torch.float64
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    @property
    def _n_features_out(self) -> int:
        """Number of transformed output features (one per centroid)."""
        return self.cluster_centers_.shape[0]

    def _choose_level(self, levels: np.ndarray) -> int:
        """Index of the level to use (see ``k`` and ``level``)."""
        if self.level != "auto":
            if self.level >= len(levels):
                raise ValueError(
                    f"level={self.level} does not exist: the hierarchy of these "
                    f"tokens has {len(levels)} level(s) (0 to {len(levels) - 1}) "
                    f"with {levels.tolist()} clusters."
                )
            return int(self.level)
        if self.k is None:
            return len(levels) - 1
        level = int(np.argmin(np.abs(levels - self.k)))  # first = finer on ties
        if self.k > levels[0] or self.k < levels[-1]:
            warnings.warn(
                f"k={self.k} is outside the range of the FINCH hierarchy of these "
                f"tokens ({levels.tolist()} clusters per level); using level "
                f"{level} with {levels[level]} clusters.",
                UserWarning,
                stacklevel=3,
            )
        return level
