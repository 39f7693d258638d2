"""h-NNE as a scikit-learn reducer: hierarchy on the CPU, projection on the device.

:class:`HNNEProjector` wraps :class:`hnne.HNNE` (Sarfraz et al., CVPR 2022).
``fit`` builds a fresh ``HNNE`` on (a random subsample of) the tokens, so the
hierarchy (FINCH) and the layout are exactly hnne's (FINCH's loop runs here,
:func:`finch_hierarchy`, only to compute its exact cosine first neighbours
without two (n, n) copies: the same neighbours). ``transform`` then
re-implements hnne's out-of-sample projection in torch, batch by batch on the
estimator's device: exact nearest finest-level centroid, the preliminary PCA,
hnne's inflation steps (2-D and 3-D targets) and the placement around the
projected anchors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._dask import lazy_output
from .._device import (
    DEFAULT_BATCH_ELEMENTS,
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    is_torch,
    iter_slices,
    make_generator,
    rows_per_batch,
)
from .._tokens import gather_tokens, n_tokens, numpy_tokens, read_rows

__all__ = ["HNNEProjector"]

#: hnne clips inflated 2-D/3-D points to this norm (``MAX_NORM_ALLOWED``).
_MAX_NORM = 3.0

#: hnne's own message when no FINCH level has ``min_size_top_level`` clusters.
_TOO_FEW = "too few points"


# --------------------------------------------------------------------------
# shared with HNNEClusterProbe
# --------------------------------------------------------------------------


def hnne_seed(random_state: Any) -> int | None:
    """The ``random_state`` hnne gets: an int as is, None as is, else drawn."""
    if random_state is None or isinstance(random_state, Integral):
        return None if random_state is None else int(random_state)
    return int(check_random_state(random_state).randint(0, 2**31 - 1))


def numpy_seed(random_state: Any) -> int:
    """A NumPy seed drawn from ``random_state`` through a CPU torch generator.

    The subsample of ``fit`` and the reservoir of ``partial_fit`` draw from
    it, so neither depends on the device.
    """
    gen = make_generator(random_state, torch.device("cpu"))
    return int(torch.randint(2**62, (1,), generator=gen))


def sample_tokens(
    X: Any, max_samples: int | None, random_state: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens that hnne is fitted on, as a C-contiguous float32 NumPy array.

    All tokens when there are at most ``max_samples`` (or it is None), else a
    uniform draw without replacement of ``max_samples`` tokens, seeded from
    ``random_state`` on the CPU (so the sample does not depend on the
    device), in O(max_samples) memory whatever the number of tokens (NumPy's
    ``Generator.choice`` without replacement). Returns the tokens and the
    sorted flat indices of the drawn tokens (None when all are used). ``X``
    is never modified (a float32 2-D array may be shared, read-only).
    On-disk ``X`` (:class:`~skstego._device.LazyFeatures`) is read once,
    chunk by chunk, keeping only the drawn tokens: the same sample as from
    the same data in memory.
    """
    cpu = torch.device("cpu")
    if is_torch(X):
        X = X.detach()
    n = n_tokens(X)
    idx = None
    if max_samples is not None and n > max_samples:
        rng = np.random.default_rng(numpy_seed(random_state))
        idx = np.sort(rng.choice(n, size=max_samples, replace=False))
    tokens = gather_tokens(X, idx, cpu).numpy()
    return np.ascontiguousarray(tokens), idx


def iter_token_blocks(X: Any) -> Iterator[np.ndarray]:
    """The tokens of ``X``, in order, as float32 (rows, C) NumPy blocks.

    Tokens of 4-D maps come image by image, then row-major over the grid (the
    order of :func:`~skstego._device.maps_to_tokens`). Blocks are slices of
    :func:`~skstego._tokens.read_rows` rows, so on-disk input is read slice
    by slice and large in-memory input is never copied whole.
    """
    cpu = torch.device("cpu")
    for sl in iter_slices(X.shape[0], read_rows(X, cpu)):
        xb = X[sl]
        if is_torch(xb):
            xb = as_tensor(xb.detach(), cpu).numpy()
        xb = numpy_tokens(np.asarray(xb))
        yield np.ascontiguousarray(xb, dtype=np.float32)


class TokenReservoir:
    """A uniform random sample of at most ``size`` tokens of a token stream.

    Reservoir sampling (Vitter's algorithm R), vectorised per block: the first
    ``size`` tokens are kept in order; token number ``t`` (0-based) after
    them replaces the kept token in slot ``j``, drawn uniformly from
    ``0..t``, when ``j < size``. After ``n_seen`` tokens, ``tokens`` is a
    uniform draw without replacement of ``min(size, n_seen)`` of them,
    however the stream was split into blocks. ``size=None`` keeps every token.

    Parameters
    ----------
    size : int or None
        Most tokens kept.
    seed : int
        Seeds the slot draws (a NumPy generator, kept with the sample).

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.projection._hnne import TokenReservoir
    >>> res = TokenReservoir(3, seed=0)
    >>> res.add(np.arange(10, dtype=np.float32).reshape(5, 2))
    >>> res.n_seen, res.tokens.shape
    (5, (3, 2))
    """

    def __init__(self, size: int | None, seed: int) -> None:
        self.size = size
        self.n_seen = 0
        self.tokens: np.ndarray | None = None
        self.rng = np.random.default_rng(seed)

    def add(self, block: np.ndarray) -> None:
        """Offer the tokens of ``block`` (n, C) to the sample, in order."""
        n = block.shape[0]
        kept = 0 if self.tokens is None else self.tokens.shape[0]
        room = n if self.size is None else max(0, min(n, self.size - kept))
        if room or self.tokens is None:
            head = block[:room]
            self.tokens = (
                head.copy()
                if self.tokens is None
                else np.concatenate([self.tokens, head])
            )
        rest = block[room:]
        if rest.shape[0]:
            first = self.n_seen + room
            slots = self.rng.integers(0, np.arange(first, first + rest.shape[0]) + 1)
            hit = np.flatnonzero(slots < self.size)
            # Several tokens of the block may draw the same slot: the last one
            # wins, as in the sequential algorithm.
            order = hit[::-1]
            taken, last = np.unique(slots[order], return_index=True)
            self.tokens[taken] = rest[order[last]]
        self.n_seen += n


def nearest_rows(
    x: torch.Tensor, centers: torch.Tensor, cosine: bool, c_sq: torch.Tensor | None
) -> torch.Tensor:
    """Index of the nearest row of ``centers`` for every row of ``x``, exact.

    ``centers`` are unit rows for cosine; ``c_sq`` is ``-|c|^2`` for the
    Euclidean metric. Scores are computed in row chunks of at most
    ``DEFAULT_BATCH_ELEMENTS`` values, so no (n, k) matrix is ever formed.
    """
    if cosine:
        x = F.normalize(x, dim=1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for sl in iter_slices(x.shape[0], rows_per_batch(centers.shape[0])):
        if cosine:
            scores = x[sl] @ centers.T
        else:
            scores = torch.addmm(c_sq, x[sl], centers.T, alpha=2.0)
        out[sl] = scores.argmax(dim=1)
    return out


def new_hnne(**params: Any) -> Any:
    """A fresh :class:`hnne.HNNE` (imported here: it pulls in numba)."""
    from hnne import HNNE

    return HNNE(**params)


#: Rows of the cosine distance matrix post-processed at once by
#: :func:`_first_neighbours` (1024 x 10,000 float32: 40 MB).
_FINCH_ROWS = 1024


def _first_neighbours(mat: np.ndarray) -> np.ndarray:
    """FINCH's exact cosine first neighbours of the rows of ``mat``, faster.

    The same values as :func:`finch.finch.clust_rank` below its
    ``ann_threshold``: scikit-learn's ``cosine_similarity`` (one symmetric
    product, the very call its ``cosine_distances`` makes), then, as there,
    ``S *= -1; S += 1``, a clip to [0, 2], a float32 cast and the argmin
    with the diagonal excluded (the first index on ties), so the same
    neighbours bit for bit. Only the post-processing differs: in place, in
    row blocks, where ``cosine_distances`` allocates and fills two more
    (n, n) arrays (its array-API clip, FINCH's float32 copy). On the 10,141
    finest centroids of 100,000 tokens of 384 channels, FINCH's path took
    2.4 to 4.0 s in a fresh process (mostly first touches of those fresh
    arrays), this one 0.9 s, with the same neighbours.
    """
    from sklearn.metrics.pairwise import cosine_similarity

    S = cosine_similarity(mat)
    n = S.shape[0]
    out = np.empty(n, dtype=np.int32)
    for sl in iter_slices(n, _FINCH_ROWS):
        block = S[sl]
        block *= -1
        block += 1
        np.clip(block, 0.0, 2.0, out=block)
        dist = block.astype(np.float32, copy=False)
        rows = np.arange(sl.start, sl.stop)
        dist[rows - sl.start, rows] = np.float32(1e12)
        out[sl] = np.argmin(dist, axis=1)
    return out


def _clust_rank(mat: np.ndarray, model: Any, verbose: bool) -> Any:
    """FINCH's 1-NN graph of ``mat`` as :func:`finch.finch.clust_rank` makes
    it for ``model`` (its adjacency), with :func:`_first_neighbours` for its
    exact cosine regime; the approximate one and other metrics are its own."""
    import scipy.sparse as sp
    from finch.finch import clust_rank

    n = mat.shape[0]
    if model.metric != "cosine" or n > model.ann_threshold:
        return clust_rank(
            mat,
            None,
            model.metric,
            verbose=verbose,
            ann_threshold=model.ann_threshold,
            random_state=model.random_state,
            faiss_threshold=model.faiss_threshold,
            faiss_use_gpu=model.faiss_use_gpu,
        )[0]
    rows = np.arange(n, dtype=np.int32)
    ones = np.ones_like(rows, dtype=np.float32)
    return sp.csr_matrix((ones, (rows, _first_neighbours(mat))), shape=(n, n))


def finch_hierarchy(model: Any, X: np.ndarray, verbose: bool = False) -> tuple:
    """FINCH as :meth:`hnne.HNNE.fit_only_hierarchy` runs it for ``model``.

    The loop of :func:`finch.FINCH` (no required number of clusters, no
    early exit, meta labels returned: hnne's call), through
    :func:`_clust_rank`: the same partitions, sizes, labels and finest
    centroids as hnne's (the distances FINCH keeps beside the graph are
    not used by that call). Returns ``(partitions, sizes, labels,
    lowest_level_centroids)``; :func:`set_hierarchy` stores them.
    """
    from finch.finch import get_clust, get_merge

    data = np.asarray(X, dtype=np.float32, order="C")
    adj = _clust_rank(data, model, verbose)
    group, n_clusters = get_clust(adj, [], None)
    c, mat = get_merge([], group, data)
    lowest = mat
    sizes, labels, c_ = [n_clusters], [], c
    while True:
        adj = _clust_rank(mat, model, verbose)
        u, n_curr = get_clust(adj, None, None)
        labels.append(u)
        c_, mat = get_merge(c_, u, data)
        c = np.column_stack((c, c_))
        sizes.append(n_curr)
        if n_curr == 1 or sizes[-2] - n_curr <= 1:
            sizes, c = sizes[:-1], c[:, :-1]
            break
    return c, sizes, labels, lowest


def set_hierarchy(model: Any, hierarchy: tuple, verbose: bool = False) -> None:
    """Keep the levels of ``hierarchy`` (:func:`finch_hierarchy`) as
    :meth:`hnne.HNNE.fit_only_hierarchy` does: the finest levels up to the
    coarsest one with at least ``model.min_size_top_level`` clusters, in
    ``model.hierarchy_parameters``. Raises hnne's ValueError when none has.
    """
    from hnne.projector import HierarchyParameters

    partitions, sizes, labels, lowest = hierarchy
    large = np.argwhere(np.array(sizes) >= model.min_size_top_level)
    if len(large) == 0:
        raise ValueError(
            f"The dataset has {_TOO_FEW} resulting to a hierarchy with sizes "
            f"{sizes}. Please provide a larger amount of data till there "
            f"exists one partition of size {model.min_size_top_level}."
        )
    top = int(large.max()) + 1
    if verbose and top < len(sizes):
        print(f"Removing {len(sizes) - top} levels from the top.")
    model.hierarchy_parameters = HierarchyParameters(
        partitions[:, :top], None, sizes[:top], labels[:top], lowest, np.empty([0, 0])
    )


# --------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------


class HNNEProjector(
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """Reduce dimensionality with h-NNE, fitted on a token subsample.

    h-NNE [1]_ builds a hierarchy of clusters with FINCH (first-neighbour
    merges), projects the tokens with a PCA and moves them, level by level,
    into discs around their cluster's projected anchor. The STEGO study [2]_
    uses it as the non-linear reducer of its comparison (cosine metric, fitted
    on 1M random tokens).

    ``fit`` draws at most ``max_fit_samples`` tokens at random and fits a
    fresh :class:`hnne.HNNE` on them (on the CPU: that is where hnne runs).
    ``transform`` projects any tokens as :meth:`hnne.HNNE.transform` does,
    but in torch, in batches, on the estimator's device: each token goes to
    its nearest finest-level FINCH centroid (exact search, in chunks), through
    the PCA, hnne's inflation (2-D and 3-D targets) and the anchor placement.
    4-D maps (N, C, h, w) give codes (N, dim, h, w); 2-D tokens give (n, dim).
    For data that arrive in pieces, ``partial_fit`` keeps a uniform random
    sample (a reservoir) of all tokens seen and refits on it at each call.

    Parameters
    ----------
    dim : int, default=2
        Dimensionality of the codes (hnne's ``n_components``). At most
        ``n_features`` and the number of fit tokens (the projection starts
        with a PCA).

    metric : {"cosine", "euclidean"}, default="cosine"
        Distance of the FINCH hierarchy and of the nearest-centroid search
        in ``transform``.

    radius : float, default=0.4
        hnne's ``radius``: size of the disc around each anchor, as a fraction
        of the distance to the nearest other anchor.

    max_fit_samples : int or None, default=1_000_000
        Fit on a random subsample of at most this many tokens (drawn from
        ``random_state``); None fits on all tokens. FINCH's exact first
        neighbours cost O(n^2) memory below hnne's ``ann_threshold`` (20 000
        tokens) and approximate ones above.

    preliminary_embedding : {"pca", "pca_centroids"}, default="pca"
        hnne's first linear projection: a PCA of all fit tokens, or of the
        centroids of a FINCH level with more than 1000 clusters. (hnne's
        ``"random_linear"`` keeps no projection to apply to new tokens, so it
        cannot serve a reducer.)

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where :meth:`transform` runs; ``"auto"`` is CUDA when available,
        else the CPU. Resolved at ``fit`` and again at each call.

    random_state : int, RandomState instance or None, default=None
        Seeds the subsample (a CPU :class:`torch.Generator`) and is passed to
        hnne (its PCA and approximate neighbours): an int is passed as is, so
        without subsampling the result equals ``hnne.HNNE(...,
        random_state=seed)``.

    verbose : bool, default=False
        Let hnne print its progress.

    Attributes
    ----------
    hnne_ : hnne.HNNE
        The fitted h-NNE model: its ``hierarchy_parameters`` (FINCH
        ``partitions`` of the fit tokens, ``partition_sizes``,
        ``lowest_level_centroids``) and ``projection_parameters``.

    n_samples_seen_ : int
        Number of tokens the model was drawn from: all tokens of ``X`` for
        ``fit``, all tokens passed so far for ``partial_fit``.

    n_features_in_ : int
        Number of features (channels, axis 1) seen during :term:`fit`.

    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    hnne.HNNE : The wrapped model (NumPy, CPU, not a scikit-learn reducer).
    TorchPCA : Linear reduction; the study found h-NNE little better.
    HNNEClusterProbe : Uses the same FINCH hierarchy as a cluster probe.

    Notes
    -----
    ``fit_transform(X)`` is ``fit(X).transform(X)``, as scikit-learn expects
    of a transformer. hnne's own ``fit_transform`` returns its training
    layout instead, which differs from ``hnne.HNNE.transform`` on the same
    points: the layout places each point with its FINCH cluster and (hnne 2)
    scales its offset from the cluster mean robustly, ``transform`` uses
    the nearest centroid and the cluster's largest offset (on 20,000
    clustered tokens of 384 channels, ``dim=70``, they agree only for the
    28% of points farthest from their cluster's mean). So codes of training
    and validation tokens here come from one and the same function.

    ``fit_transform`` on tokens that were all fitted (at most
    ``max_fit_samples``) saves most of the nearest-centroid search: the best
    centroid of the group (at a coarser hierarchy level) of a token's FINCH
    cluster is kept where it is provably the centroid the search would pick
    (exact scores within the group, a triangle-inequality bound for the
    other groups, and a margin for float32 rounding), 92% of the tokens on
    100,000 clustered tokens of 384 channels; the others are searched. The
    codes are those of ``transform``.

    The hierarchy is hnne's own: :meth:`hnne.HNNE.fit_only_hierarchy`'s
    FINCH loop, run here (``finch_hierarchy``) so that its exact cosine
    first neighbours skip the two extra (n, n) arrays scikit-learn's
    ``cosine_distances`` and FINCH allocate (the same values, post-processed
    in place). On 100,000 tokens of 384 channels (``dim=70``, 2 CPU
    threads) that makes ``fit_transform`` (fit, then every token projected)
    5.5 s where hnne's ``fit_transform`` (its fit) takes 6.6 s, with a peak
    resident memory of 2.3 GB instead of 3.4 GB.

    Compared with :meth:`hnne.HNNE.transform` (float64 NumPy, approximate
    neighbours above 4e8 token-centroid pairs), the search here is always
    exact and runs in float32. For ``dim > 3`` codes agree with hnne's to
    float32 precision. For ``dim <= 3`` hnne's inflation divides by the
    spread of small clusters, which magnifies float32 rounding of the PCA
    (its own, as well): on sklearn's digits about 1% of tokens then differ
    by 1e-4 to a few 1e-2 (codes span about +-5), the rest agree to float32
    precision. hnne's ``transform`` fails for ``dim=1`` and for a
    hierarchy whose coarsest kept level has one cluster; here both work.

    When FINCH finds fewer than 3 clusters at every level (tiny or
    degenerate data), hnne refuses to fit; this estimator warns and keeps
    all levels instead (hnne's ``min_size_top_level=1``): the codes are then
    little more than a PCA.

    References
    ----------
    .. [1] M. S. Sarfraz, M. Koulakis, C. Seibold and R. Stiefelhagen,
           "Hierarchical Nearest Neighbor Graph Embedding for Efficient
           Dimensionality Reduction", CVPR 2022.
    .. [2] A. Koenig, M. Schambach and J. Otterbach, "Uncovering the Inner
           Workings of STEGO for Safe Unsupervised Semantic Segmentation",
           CVPR 2023 workshops.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_digits
    >>> from skstego import HNNEProjector
    >>> X = load_digits().data[:500].astype(np.float32)
    >>> proj = HNNEProjector(dim=2, device="cpu", random_state=0).fit(X)
    >>> proj.transform(X).shape
    (500, 2)
    >>> maps = X[:8, :48].reshape(8, 3, 4, 4)  # any (N, C, h, w) maps
    >>> HNNEProjector(dim=2, device="cpu", random_state=0).fit_transform(maps).shape
    (8, 2, 4, 4)
    """

    _parameter_constraints: ClassVar[dict] = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "metric": [StrOptions({"cosine", "euclidean"})],
        "radius": [Interval(Real, 0, None, closed="neither")],
        "max_fit_samples": [Interval(Integral, 1, None, closed="left"), None],
        "preliminary_embedding": [StrOptions({"pca", "pca_centroids"})],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        dim: int = 2,
        *,
        metric: str = "cosine",
        radius: float = 0.4,
        max_fit_samples: int | None = 1_000_000,
        preliminary_embedding: str = "pca",
        device: str | torch.device | None = "auto",
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.dim = dim
        self.metric = metric
        self.radius = radius
        self.max_fit_samples = max_fit_samples
        self.preliminary_embedding = preliminary_embedding
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> HNNEProjector:
        """Fit h-NNE on (a random subsample of) the tokens of ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps. Not modified. On-disk input (a
            :class:`~skstego.features.FeatureStore`, a zarr or dask array, a
            NumPy memmap) is read once, chunk by chunk, keeping only the
            ``max_fit_samples`` drawn tokens: never loaded as a whole.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : HNNEProjector
            Fitted estimator.
        """
        X = check_features(self, X, reset=True, lazy=True)
        self._fit(X, stacklevel=4)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray | torch.Tensor:
        """Fit h-NNE, then project every token of ``X``, validating ``X`` once.

        Equal to ``fit(X).transform(X)`` (see Notes of the class).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        X_new : ndarray, torch.Tensor or dask.array.Array of shape \
                (n_samples, dim) or (N, dim, h, w)
            Codes, float32; NumPy for NumPy input, torch (on the estimator's
            device) for torch input, a lazy dask array mapped over the chunks
            for dask input (computed on the workers).
        """
        source = X
        X = check_features(self, X, reset=True, lazy=True)
        device, every = self._fit(X, stacklevel=5)  # + the set_output wrapper
        out = lazy_output(self, "transform", source, int(self.dim))
        if out is not None:
            return out
        # When hnne was fitted on every token, the cluster it put each token
        # in is (almost always) the centroid transform finds: kept where
        # proven, searched for elsewhere, so the codes are transform's.
        own = self.hnne_.hierarchy_parameters.partitions[:, 0] if every else None
        return self._transform(X, device, own)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: Any, y: Any = None) -> HNNEProjector:
        """Add the tokens of ``X`` to the fit sample and refit h-NNE on it.

        The estimator keeps a uniform random sample of at most
        ``max_fit_samples`` of all the tokens passed to ``partial_fit`` so far
        (reservoir sampling, seeded by ``random_state``; the first
        ``max_fit_samples`` tokens are kept in order) and fits a fresh h-NNE
        on it at every call, so the model after any call is that of ``fit``
        on a uniform subsample of everything seen. While the tokens seen are
        at most ``max_fit_samples``, it equals ``fit`` on their
        concatenation. Each call costs an h-NNE fit on the sample; to stream
        a whole store once, ``fit(store)`` draws the sample in one pass and
        fits once.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            A batch of tokens or feature maps. Not modified; on-disk input is
            read slice by slice.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : HNNEProjector
            The refitted estimator; ``n_samples_seen_`` counts every token
            passed so far.

        Notes
        -----
        The sample is kept with the estimator (float32, at most
        ``max_fit_samples`` x ``n_features``: 1.5 GB for the default one
        million tokens of 384 channels) so that the next call can extend it;
        ``max_fit_samples=None`` keeps every token. ``fit`` keeps no sample:
        ``partial_fit`` after ``fit`` starts a new one.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.datasets import load_digits
        >>> from skstego import HNNEProjector
        >>> X = load_digits().data.astype(np.float32)
        >>> proj = HNNEProjector(dim=2, max_fit_samples=1000, device="cpu",
        ...                      random_state=0)
        >>> for batch in np.array_split(X, 3):
        ...     proj = proj.partial_fit(batch)
        >>> proj.n_samples_seen_, proj.transform(X).shape
        (1797, (1797, 2))
        """
        first = not hasattr(self, "_reservoir")
        X = check_features(self, X, reset=first, lazy=True)
        if first:
            seed = numpy_seed(self.random_state)
            self._reservoir = TokenReservoir(self.max_fit_samples, seed)
        reservoir = self._reservoir
        for block in iter_token_blocks(X):
            reservoir.add(block)
        n_fit = reservoir.tokens.shape[0]
        self._check_sizes(int(X.shape[1]), n_fit, reservoir.n_seen)
        self._fit_tokens(reservoir.tokens, reservoir.n_seen, stacklevel=4)
        return self

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Project tokens as :meth:`hnne.HNNE.transform`, on the device.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) \
                or (N, n_features, h, w)
            Tokens or feature maps.

        Returns
        -------
        X_new : ndarray, torch.Tensor or dask.array.Array of shape \
                (n_samples, dim) or (N, dim, h, w)
            Codes, float32; NumPy for NumPy input, torch (on the estimator's
            device) for torch input, a lazy dask array mapped over the chunks
            for dask input (computed on the workers).
        """
        check_is_fitted(self)
        out = lazy_output(self, "transform", X, int(self.dim))
        if out is not None:
            return out
        X = check_features(self, X, reset=False, lazy=True)
        return self._transform(X, self._resolved_device())

    # ------------------------------------------------------------ internals

    def _fit(self, X: Any, stacklevel: int) -> tuple[torch.device, bool]:
        """Fit on (a sample of) ``X``; the device, and whether every token
        of ``X`` was fitted, in order."""
        n_total = n_tokens(X)
        n_fit = (
            n_total
            if self.max_fit_samples is None
            else min(n_total, self.max_fit_samples)
        )
        self._check_sizes(int(X.shape[1]), n_fit, n_total)
        tokens, idx = sample_tokens(X, self.max_fit_samples, self.random_state)
        self.__dict__.pop("_reservoir", None)  # a later partial_fit starts afresh
        return self._fit_tokens(tokens, n_total, stacklevel + 1), idx is None

    def _check_sizes(self, n_features: int, n_fit: int, n_total: int) -> None:
        if n_fit < 2:
            raise ValueError(
                f"h-NNE needs at least 2 tokens to build its hierarchy; got "
                f"n_samples={n_fit} (1 sample). Pass more tokens"
                + (" or a larger max_fit_samples." if n_total > n_fit else ".")
            )
        if self.dim > n_features:
            raise ValueError(
                f"dim={self.dim} is larger than n_features={n_features}: h-NNE "
                "starts from a PCA of the tokens, which has at most n_features "
                "components. Pass dim <= n_features."
            )
        if self.dim > n_fit:
            raise ValueError(
                f"dim={self.dim} is larger than the number of fit tokens "
                f"n_samples={n_fit}: h-NNE's PCA has at most that many "
                "components. Pass more tokens or a smaller dim."
            )

    def _fit_tokens(
        self, tokens: np.ndarray, n_total: int, stacklevel: int
    ) -> torch.device:
        """Fit a fresh hnne model on ``tokens``, drawn from ``n_total`` tokens."""
        device = self._resolved_device()
        n_fit = tokens.shape[0]
        model = new_hnne(
            n_components=int(self.dim),
            metric=self.metric,
            radius=float(self.radius),
            preliminary_embedding=self.preliminary_embedding,
            random_state=hnne_seed(self.random_state),
        )
        verbose = bool(self.verbose)
        # hnne's fit_only_hierarchy, with FINCH's exact cosine neighbours
        # computed without its two extra (n, n) copies (finch_hierarchy):
        # the same hierarchy, 1.5 to 3 s sooner on 100,000 tokens (measured).
        hierarchy = finch_hierarchy(model, tokens, verbose=verbose)
        try:
            set_hierarchy(model, hierarchy, verbose=verbose)
        except ValueError as exc:
            if _TOO_FEW not in str(exc):
                raise
            warnings.warn(
                f"h-NNE's hierarchy of these {n_fit} tokens has fewer than "
                f"{model.min_size_top_level} clusters at every level, which hnne "
                "refuses; all levels are kept instead and the codes are little "
                "more than a PCA. Fit on more (or more varied) tokens.",
                UserWarning,
                stacklevel=stacklevel,
            )
            model.min_size_top_level = 1
            set_hierarchy(model, hierarchy, verbose=verbose)
        # Reuses the hierarchy just built (hnne skips it when already done);
        # the training layout it returns is not kept (see Notes).
        model.fit(tokens, verbose=verbose)
        self.hnne_ = model
        self.n_samples_seen_ = int(n_total)
        self._n_features_out = int(self.dim)
        return device

    def _params(self, device: torch.device) -> dict[str, Any]:
        """hnne's transform parameters as float32 tensors on ``device``, cached."""
        return self._cached(
            ("hnne", str(device)), self.hnne_, lambda: _tensors(self.hnne_, device)
        )

    def _transform(
        self, X: Any, device: torch.device, own: np.ndarray | None = None
    ) -> np.ndarray | torch.Tensor:
        """Project every token of ``X``; ``own`` (one finest cluster per
        token, in token order) is a guess of each one's nearest centroid
        that saves the search where it is certified (see :func:`_project`)."""
        p = self._params(device)
        cosine = self.metric == "cosine"
        groups, guess, done = None, None, 0
        if own is not None:
            guess = torch.as_tensor(np.asarray(own), dtype=torch.int64).to(device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            nonlocal done, groups
            if guess is None:
                return _project(x, p, cosine)
            start, done = done, done + x.shape[0]  # batches come in order
            if groups is None:
                groups = _groups(self.hnne_, p, x, guess[start:done], cosine)
            return _project(x, p, cosine, guess[start:done], groups)

        # Per token: the input, the output and a few (dim)-wide temporaries.
        per_row = int(np.prod(X.shape[1:])) + 4 * self.dim * (
            int(np.prod(X.shape[2:])) if X.ndim == 4 else 1
        )
        return apply_tokenwise(
            fn,
            X,
            device=device,
            out_features=int(self.dim),
            batch_size=rows_per_batch(per_row, DEFAULT_BATCH_ELEMENTS // 4),
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


# --------------------------------------------------------------------------
# hnne's out-of-sample projection in torch
# --------------------------------------------------------------------------


def _tensors(model: Any, device: torch.device) -> dict[str, Any]:
    """Everything :meth:`hnne.HNNE.transform` reads, as device tensors.

    Per-anchor arrays are reshaped to (K,) or (K, dim): hnne leaves some of
    them 0-d when the finest kept level has a single cluster.
    """
    hp, pp = model.hierarchy_parameters, model.projection_parameters
    dim = int(model.n_components)

    def t(a: Any, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        a = np.asarray(a, dtype=np.float64)
        if shape is not None:
            a = a.reshape(shape)
        return torch.as_tensor(a, dtype=torch.float32, device=device)

    centers = t(hp.lowest_level_centroids)
    k = centers.shape[0]
    pca = pp.pca
    components = t(pca.components_)
    inflation = []
    if dim <= 3 and pp.inflation_params_list:
        for rot, (m1, s1), (m2, s2) in pp.inflation_params_list[-1]:
            rot = np.asarray(rot, dtype=np.float64)
            inflation.append(
                (
                    t(m1, (k, dim)),
                    t(s1, (k, dim)),
                    t(rot),
                    t(m2, (k, dim)),
                    t(s2, (k, dim)),
                    t(np.linalg.inv(rot)),
                )
            )
    scaler = pp.scaler
    scale = np.ones(centers.shape[1]) if scaler.scale_ is None else scaler.scale_
    mean = np.zeros(centers.shape[1]) if scaler.mean_ is None else scaler.mean_
    return {
        "centers": F.normalize(centers, dim=1) if model.metric == "cosine" else centers,
        "neg_c_sq": -(centers * centers).sum(dim=1),
        "mean": t(mean),
        "scale": t(scale),
        "components_t": components.T.contiguous(),
        # As scikit-learn's PCA.transform: X @ W.T - mean @ W.T.
        "pca_shift": t(pca.mean_) @ components.T,
        "whiten": t(np.sqrt(pca.explained_variance_)) if pca.whiten else None,
        "inflation": inflation,
        "clip": dim <= 3,
        "anchors": t(pp.projected_centroids[-2], (k, dim)),
        "points_mean": t(pp.points_means[-1], (k, dim)),
        "max_radius": t(pp.points_max_radii[-1], (k, 1)),
        "anchor_radius": t(pp.projected_centroid_radii[-1], (k, 1)),
    }


def _project(
    x: torch.Tensor,
    p: dict[str, Any],
    cosine: bool,
    own: torch.Tensor | None = None,
    groups: dict[str, Any] | None = None,
) -> torch.Tensor:
    """hnne's ``transform`` of float32 tokens ``x`` (n, C) -> (n, dim).

    With ``own`` (a guess of every token's nearest finest centroid, e.g. the
    cluster hnne put it in) and ``groups`` (:func:`_group_tensors`), the
    guess is kept wherever :func:`_certified` proves it is the centroid the
    exact search picks, and only the other tokens are searched: the same
    indices, hence the same codes, as without a guess.
    """
    neg_c_sq = None if cosine else p["neg_c_sq"]
    if own is None:
        idx = nearest_rows(x, p["centers"], cosine, neg_c_sq)
    else:
        idx, ok = _certified(x, own, groups, cosine)
        redo = torch.nonzero(~ok).flatten()
        if redo.numel():
            idx[redo] = nearest_rows(x[redo], p["centers"], cosine, neg_c_sq)
    z = (x - p["mean"]) / p["scale"]
    z = z @ p["components_t"] - p["pca_shift"]
    if p["whiten"] is not None:
        z = z / p["whiten"]
    for m1, s1, rot, m2, s2, inv in p["inflation"]:
        z = (z - m1[idx]) / s1[idx]
        z = z @ rot
        z = (z - m2[idx]) / s2[idx]
        z = z @ inv
    if p["clip"]:
        norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        z = torch.where(norms > _MAX_NORM, _MAX_NORM * z / norms, z)
    z = (z - p["points_mean"][idx]) / p["max_radius"][idx]
    return p["anchors"][idx] + z * p["anchor_radius"][idx]


# --------------------------------------------------------------------------
# fit_transform: the nearest centroid of training tokens, certified
# --------------------------------------------------------------------------

#: Unit roundoff of float32.
_U32 = 2.0**-24

#: Tokens of the first batch that choose the level of the groups.
_LEVEL_SAMPLE = 1024


def _groups(
    model: Any, p: dict[str, Any], x: torch.Tensor, own: torch.Tensor, cosine: bool
) -> dict[str, Any]:
    """Groups of the finest centroids for :func:`_certify`, on ``x``'s device.

    The groups are the clusters of one coarser level of hnne's hierarchy
    (nested, so every finest cluster lies in one). Each level is tried on up
    to :data:`_LEVEL_SAMPLE` tokens ``x`` (spread over the batch) with their
    guesses ``own``; the level kept minimises the expected work per token:
    its number of groups, plus the expected size of the token's own group,
    plus the number of centroids times the share of tokens it fails.
    """
    parts = np.asarray(model.hierarchy_parameters.partitions)
    first = np.unique(parts[:, 0], return_index=True)[1]
    k = int(p["centers"].shape[0])
    step = max(1, x.shape[0] // _LEVEL_SAMPLE)
    xs, owns = x[::step][:_LEVEL_SAMPLE], own[::step][:_LEVEL_SAMPLE]
    best = None
    for level in range(parts.shape[1]):
        gid = np.unique(parts[first, level], return_inverse=True)[1].reshape(-1)
        groups = _level_groups(p["centers"], gid, cosine)
        sizes = np.bincount(gid).astype(np.float64)
        cost = sizes.size + float((sizes * sizes).sum()) / k
        if level or parts.shape[1] == 1:  # level 0: a search of every centroid
            ok = _certify(xs, owns, groups, cosine)[1]
            failed = 1.0 - float(ok.double().mean())
            cost += failed * k
        if best is None or cost < best[0]:
            best = (cost, groups)
    return best[1]


def _level_groups(centers: torch.Tensor, gid: np.ndarray, cosine: bool) -> dict:
    """The groups ``gid`` (one per centroid, 0..m-1) of ``centers``.

    Per group: its centre ``g`` (the mean of the members, float32) and the
    radius ``R`` of a ball around it that holds every member (float64,
    widened by the rounding of ``g``); the members listed group by group
    (``order``, ``starts``), as float64 rows that score a token in one
    product (``[c, -|c|^2]`` against ``[2x, 1]`` for the Euclidean score).
    """
    device = centers.device
    c = centers.double()
    m = int(gid.max()) + 1
    gid_t = torch.as_tensor(gid, dtype=torch.int64, device=device)
    count = torch.bincount(gid_t, minlength=m)
    g = torch.zeros(m, c.shape[1], dtype=torch.float64, device=device)
    g.index_add_(0, gid_t, c).div_(count[:, None])
    spread = torch.linalg.vector_norm(c - g[gid_t], dim=1)
    zeros = torch.zeros(m, dtype=torch.float64, device=device)
    radius = zeros.scatter_reduce(0, gid_t, spread, "amax")
    radius += 2.0 * _U32 * torch.linalg.vector_norm(g, dim=1)
    c_sq = (c * c).sum(dim=1)
    order = torch.argsort(gid_t, stable=True)
    starts = torch.zeros(m + 1, dtype=torch.int64, device=device)
    starts[1:] = torch.cumsum(count, 0)
    rows = c if cosine else torch.cat([c, -c_sq[:, None]], dim=1)
    g32 = g.float()
    return {
        "score_rows": rows[order],
        "order": order,
        "c_max": float(c_sq.max().sqrt()),
        "gid": gid_t,
        "g": g32,
        "g_sq": (g32 * g32).sum(dim=1),
        "g_sq_max": float((g32.double() ** 2).sum(dim=1).max()),
        "radius": radius,
        "r_max": float(radius.max()),
        "starts": starts,
        "sizes": count,
        "width": max(m, int(count.max())),
    }


def _certified(
    x: torch.Tensor, own: torch.Tensor, groups: dict[str, Any], cosine: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_certify` in row chunks of at most ``DEFAULT_BATCH_ELEMENTS // 8``
    scores (a row scores every group and the members of its own group)."""
    ok = torch.empty(x.shape[0], dtype=torch.bool, device=x.device)
    idx = torch.empty_like(own)
    rows = rows_per_batch(groups["width"], DEFAULT_BATCH_ELEMENTS // 8)
    for sl in iter_slices(x.shape[0], rows):
        idx[sl], ok[sl] = _certify(x[sl], own[sl], groups, cosine)
    return idx, ok


def _certify(
    x: torch.Tensor, own: torch.Tensor, groups: dict[str, Any], cosine: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best centroid of the group of centroid ``own``, and whether it is,
    provably, what :func:`nearest_rows` picks.

    :func:`nearest_rows` takes the argmax of float32 scores: ``x.c`` of the
    unit token and centroids (cosine), ``2 x.c - |c|^2`` (Euclidean); each
    is within ``e = (C + 3) u (2 |x| |c| + |c|^2)`` of the exact score (C
    channels, float32 unit roundoff ``u``). A token is certified when the
    exact score of the best centroid of its own group (the group of
    ``own``) beats every other centroid's by more than ``4 e`` (twice what
    two rounded scores need), so the float32 argmax cannot pick another:

    * the centroids of the own group are scored in float64;
    * every other group ``G`` of centre ``g`` and radius ``R`` is bounded by
      the triangle inequality, ``|x - c| >= |x - g| - R`` for each member
      ``c``, with ``|x - g|`` in float32 lowered by its rounding bound. As
      the score decreases with ``|x - c|`` (cosine: ``x.c = (|x|^2 + |c|^2
      - |x - c|^2) / 2``; Euclidean: ``|x|^2 - |x - c|^2``), the group
      loses when ``|x - g| - R`` exceeds a distance ``t`` set by the best
      score.
    """
    if cosine:
        x = F.normalize(x, dim=1)  # the tokens nearest_rows scores
    n, n_feat = x.shape
    xd = x.double()
    x_sq = (xd * xd).sum(dim=1)
    c_max = groups["c_max"]
    e = (n_feat + 3) * _U32 * (2.0 * x_sq.sqrt() * c_max + c_max * c_max)
    tol = 4.0 * e
    mine = groups["gid"][own]
    # the own group: float64 scores of its members, own and best other
    lhs = xd if cosine else torch.cat([2.0 * xd, torch.ones_like(xd[:, :1])], 1)
    rows_by_group = torch.argsort(mine, stable=True)
    xs = lhs[rows_by_group]
    first_two = torch.full((n, 2), -math.inf, dtype=torch.float64, device=x.device)
    which = torch.zeros((n, 2), dtype=torch.int64, device=x.device)
    starts, sizes = groups["starts"].tolist(), groups["sizes"].tolist()
    present = torch.unique(mine)
    edges = [*torch.searchsorted(mine[rows_by_group], present).tolist(), n]
    present = present.tolist()
    for j, grp in enumerate(present):
        a, b = edges[j], edges[j + 1]
        top = min(2, sizes[grp])
        scores = xs[a:b] @ groups["score_rows"][starts[grp] : starts[grp + 1]].T
        values, index = torch.topk(scores, top, dim=1)
        first_two[a:b, :top], which[a:b, :top] = values, index
    s_own = first_two[:, 0]  # the best of the group, from here on
    ok_sorted = s_own - first_two[:, 1] > tol[rows_by_group]
    ok = torch.empty_like(ok_sorted)
    ok[rows_by_group] = ok_sorted
    s_own = torch.empty_like(s_own).index_copy_(0, rows_by_group, s_own)
    best = groups["order"][groups["starts"][mine[rows_by_group]] + which[:, 0]]
    best = torch.empty_like(best).index_copy_(0, rows_by_group, best)
    # every other group, from above: the distance t the bound must exceed
    if cosine:
        t_sq = x_sq + c_max * c_max - 2.0 * (s_own - tol)
    else:
        t_sq = x_sq - s_own + tol
    t = torch.where(t_sq < 0, -1.0, t_sq.clamp_min(0.0).sqrt())
    err = 4.0 * (n_feat + 3) * _U32 * (x_sq + groups["g_sq_max"])
    d_sq = torch.addmm(groups["g_sq"][None, :], x, groups["g"].T, alpha=-2.0)
    d_sq += (x_sq - err).float()[:, None]
    lb = d_sq.clamp_min_(0.0).sqrt_().sub_(groups["radius"].float()[None, :])
    lb.scatter_(1, mine[:, None], math.inf)
    # float32 sqrt and subtraction: each off by at most u of its operands
    low = lb.min(dim=1).values.double()
    low = low * (1.0 - 4.0 * _U32) - 8.0 * _U32 * groups["r_max"]
    return best, ok & (low > t)
