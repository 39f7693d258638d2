"""KMeansProbe: Lloyd k-means (spherical or Euclidean) as a cluster probe.

The STEGO cluster probe assigns every token to the centroid of highest cosine
similarity. The reference trains those centroids by gradient descent; here they
are fitted properly, by Lloyd's algorithm on the unit sphere (spherical
k-means), or by ordinary Euclidean k-means, which matches
:class:`sklearn.cluster.KMeans`. Clusters are mapped to classes with the
Hungarian algorithm, on the training labels (``fit(X, y)``) or on the
evaluation data itself (``score``, the unsupervised protocol).

This module validates and chooses a driver: Lloyd on tokens gathered on the
device (all of them or ``max_samples``), Lloyd passes over chunks (on-disk
slices or dask blocks), or mini-batch passes. The algorithms themselves are
in :mod:`skstego.probes._kmeans_kernels`.
"""

from __future__ import annotations

import importlib
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
from tqdm.auto import tqdm

from .._dask import chunks_of, lazy_output
from .._device import (
    LazyFeatures,
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    dask_source,
    fits_in_memory,
    is_torch,
    make_generator,
)
from .._tokens import gather_tokens, n_tokens, sample_indices, token_batches
from .._weights import check_weights, token_weights
from ._base import check_targets
from ._centroid import CentroidProbeMixin
from ._kmeans_cpu_kernels import _compiled_lloyd, compiled_lloyd_available
from ._kmeans_kernels import (
    _best_init,
    _chunked_lloyd,
    _counts,
    _evaluate,
    _evaluate_scaled,
    _init_centers,
    _label_pass,
    _lloyd,
    _mean_variance,
    _minibatch_step,
    _normalize_rows,
    _overflow_scale,
    _row_sq_norms,
    _warn_if_degenerate,
)

__all__ = ["KMeansProbe"]


def _import_faiss():
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:  # pragma: no cover - faiss is installed in CI
        raise ImportError(
            "KMeansProbe(backend='faiss') needs the faiss package "
            "(pip install faiss-cpu, or faiss-gpu for CUDA); or use "
            "backend='torch'."
        ) from exc


def _faiss_available() -> bool:
    try:
        importlib.import_module("faiss")
    except ImportError:  # pragma: no cover
        return False
    return True


#: Temporary GPU memory faiss may reserve for its distance tiles. faiss's
#: own default (``StandardGpuResources``) is a fraction of the card's total
#: memory, taken on top of what torch's caching allocator already holds.
_FAISS_GPU_TEMP_BYTES = 256 * 1024 * 1024


def _faiss_index(faiss: Any, d: int, cosine: bool, device: torch.device) -> tuple:
    """faiss's flat index for Lloyd's E-step, and its GPU resources.

    On the CPU for a CPU ``device`` (or when faiss sees no GPU). For a CUDA
    ``device``, on that one GPU (``cuda:N`` is GPU ``N``; ``cuda`` the current
    one) with at most :data:`_FAISS_GPU_TEMP_BYTES` of temporary memory, after
    torch's cached, unused blocks are released for it.
    ``faiss.Kmeans(gpu=True)`` instead replicates the index on every visible
    GPU, ignores ``cuda:N`` and reserves a share of each card. The resources
    (None on the CPU) must outlive the index.
    """
    index = faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)
    if device.type != "cuda" or faiss.get_num_gpus() == 0:
        return index, None
    gpu = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.empty_cache()  # give torch's unused cached blocks to faiss
    res = faiss.StandardGpuResources()
    res.setTempMemory(_FAISS_GPU_TEMP_BYTES)
    return faiss.index_cpu_to_gpu(res, gpu, index), res


def _faiss_centers(
    X: torch.Tensor,
    centers: torch.Tensor,
    *,
    max_iter: int,
    cosine: bool,
    seed: int,
    verbose: bool,
) -> tuple[torch.Tensor, np.ndarray]:
    """``max_iter`` Lloyd iterations of faiss from our initial centroids.

    ``faiss.Clustering`` with the index of :func:`_faiss_index` (on the GPU
    of ``X``'s device when it is CUDA), as ``faiss.Kmeans.train`` runs it.
    Also returns faiss's inertia after the first ``max_iter - 1`` iterations
    (the last is measured by the caller).
    """
    faiss = _import_faiss()
    n, d = X.shape
    k = centers.shape[0]
    cp = faiss.ClusteringParameters()
    cp.niter = max_iter
    cp.nredo = 1
    cp.spherical = cosine
    cp.seed = seed
    cp.verbose = bool(verbose)
    # faiss subsamples to 256 points per centroid by default; skstego has
    # already subsampled (max_samples), so train on everything given.
    cp.min_points_per_centroid = 1
    cp.max_points_per_centroid = max(1, -(-n // k))
    x_np = np.ascontiguousarray(X.detach().cpu().numpy(), dtype=np.float32)
    c_np = np.ascontiguousarray(centers.detach().cpu().numpy(), dtype=np.float32)
    clus = faiss.Clustering(d, k, cp)
    faiss.copy_array_to_vector(c_np.ravel(), clus.centroids)
    index, _resources = _faiss_index(faiss, d, cosine, X.device)
    clus.train(x_np, index)
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    # obj[i]: objective of the centroids after i updates (obj[0] the initial
    # ones); the sum of squared distances, or for spherical k-means (an
    # inner-product index) the sum of cosines, i.e. inertia n - obj / 2.
    stats = clus.iteration_stats
    obj = np.array([stats.at(i).obj for i in range(stats.size())], np.float64)
    if obj.size != max_iter:  # pragma: no cover - a faiss without the stats
        obj = np.full(max_iter, np.nan)
    elif cosine:
        obj = 2.0 * (n - obj)
    del index, _resources
    centroids = np.asarray(centroids, dtype=np.float32)
    return torch.from_numpy(centroids).to(X.device), obj[1:]


def _choose_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend="auto"`` and check an explicit choice.

    On the CPU, "auto" is scikit-learn's compiled Lloyd iteration
    (:mod:`._kmeans_cpu_kernels`) where it can be imported: one Cython loop
    over cache-sized blocks, where eager torch needs three kernels (a
    distance product, an argmax, ``index_add_``), each a pass over memory.
    Measured on the 2-core CPU of the development machine
    (``benchmarks/bench_kmeans.py``, 300k x 70 float32 tokens, k=27, one
    shared k-means++ start): torch 58.8 ms per iteration, scikit-learn's
    ``KMeans`` 27.1 ms, this kernel inside skstego's loop 20-24 ms.

    On CUDA, "auto" is torch: the loop keeps the tokens on the device, where
    faiss takes host arrays (a device-to-host copy of all tokens first) and
    needs GPU memory of its own beside torch's cache (its temporary memory,
    the tokens it pages in, the index). faiss stays available as
    ``backend="faiss"`` (on the CPU it was no faster than torch, and it
    always runs ``max_iter`` iterations), on the estimator's GPU only, with
    bounded temporary memory (:func:`_faiss_index`).
    """
    if backend == "sklearn":
        if device.type != "cpu":
            raise ValueError(
                f"backend='sklearn' runs scikit-learn's compiled Lloyd kernel on "
                f"the CPU, not on device={str(device)!r}; use backend='torch' "
                "(or 'auto') on a GPU."
            )
        if not compiled_lloyd_available():
            raise ImportError(
                "backend='sklearn' needs scikit-learn's compiled Lloyd kernel "
                "(sklearn.cluster._k_means_lloyd.lloyd_iter_chunked_dense), "
                "which this scikit-learn does not provide as expected; use "
                "backend='torch' (or 'auto')."
            )
    if backend != "auto":
        return backend
    if device.type == "cpu" and compiled_lloyd_available():
        return "sklearn"
    return "torch"


# --------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------


class KMeansProbe(
    CentroidProbeMixin,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """K-means cluster probe: spherical (STEGO) or Euclidean Lloyd k-means.

    Fits ``k`` centroids by Lloyd's algorithm on 2-D tokens ``(n, C)`` or on
    4-D feature maps ``(N, C, h, w)`` (every pixel is a token), on a GPU when
    one is available. With ``metric="cosine"`` (the default) tokens and
    centroids are L2-normalised and tokens go to the centroid of highest cosine
    similarity: spherical k-means, the STEGO cluster probe. With
    ``metric="euclidean"`` it is ordinary k-means, as
    :class:`sklearn.cluster.KMeans`.

    Clusters are mapped to classes by the Hungarian algorithm, which maximises
    the number of matched pixels: on the training labels when ``fit`` is given
    ``y`` (then :meth:`predict` returns classes), and on the evaluation data
    itself in :meth:`score` (the unsupervised segmentation protocol), over a
    fixed number of classes (``n_classes``). With more clusters than classes
    the extra clusters stay unmatched: they map to class -1 and by default
    **their pixels count as errors**. The STEGO reference code instead drops
    every pixel predicted as a cluster id ``>= n_classes`` before matching;
    ``score(..., extra_clusters="reference")`` reproduces that exactly (see
    :mod:`skstego.metrics`).

    :meth:`from_centroids` wraps centroids trained elsewhere (a STEGO
    checkpoint's ``cluster_probe.clusters``) as a fitted probe.

    Parameters
    ----------
    k : int, default=8
        Number of clusters. STEGO uses the number of classes (27 for
        COCO-Stuff) plus optional extra clusters.

    n_classes : int or None, default=None
        Number of classes the scores count (27 for COCO-Stuff), whatever
        classes the evaluated labels happen to contain: a class absent from
        them still takes part in the Hungarian matching and its IoU (0 when a
        cluster is matched to it) in the mean, as in the STEGO protocol.
        Labels must be below it. None: ``n_classes_`` when ``fit`` got ``y``,
        else the largest evaluated label + 1 (which forgets absent trailing
        classes). ``score(..., n_classes=...)`` overrides it. Does not affect
        the clustering.

    metric : {"cosine", "euclidean"}, default="cosine"
        ``"cosine"``: spherical k-means; inertia is then the sum of squared
        Euclidean distances between unit tokens and unit centroids,
        ``2 * sum(1 - cos)``. ``"euclidean"``: ordinary k-means.

    n_init : int, default=1
        Number of runs from different seeds; the run of lowest inertia wins.
        Ignored (one run) when ``init`` is an array.

    max_iter : int, default=100
        Most Lloyd iterations per run.

    tol : float, default=1e-4
        Relative tolerance on the squared centroid shift between two
        iterations, scaled by the mean feature variance of the (normalised,
        for cosine) training tokens, as in scikit-learn. A run also stops when
        no label changes. ``tol=0`` runs ``max_iter`` iterations unless the
        labels stop changing. The faiss backend always runs ``max_iter``
        iterations.

    init : {"k-means++", "random"} or array-like of shape (k, n_features), \
            default="k-means++"
        Initial centroids: greedy k-means++ seeding (as scikit-learn), ``k``
        distinct random tokens, or given centroids. Both backends start from
        these centroids.

    max_samples : int or None, default=1_000_000
        Fit on a random subsample of at most this many tokens (drawn from
        ``random_state``), then label every token. None uses all tokens.
        Up to ``max_samples`` tokens are gathered on ``device`` and iterated
        on there. With None, on-disk input (a FeatureStore, a zarr array, a
        memmap) is gathered too when its float32 tokens take at most a
        quarter of the free memory of ``device`` (read once: faster than a
        read per iteration); larger on-disk input and dask arrays are not
        gathered: each Lloyd iteration is one pass of per-chunk statistics
        (read slice by slice here, or computed on the dask workers), exact
        and in memory flat in the number of tokens; seeding uses at most
        262,144 of the tokens and the torch kernels run whatever
        ``backend`` says.

    algorithm : {"lloyd", "minibatch"}, default="lloyd"
        ``"lloyd"``: exact Lloyd iterations on all tokens (or ``max_samples``
        of them), gathered on ``device`` or, for on-disk and dask input with
        ``max_samples=None``, streamed chunk by chunk at every iteration.
        ``"minibatch"``: mini-batch k-means
        (as :class:`sklearn.cluster.MiniBatchKMeans`, without its
        reassignment of small clusters): ``fit`` initialises on a random
        sample of ``max(3 * batch_size, 3 * k)`` tokens, then makes up to
        ``max_iter`` passes over all tokens, in order, by batches of
        ``batch_size``; each batch moves every centroid it touches with a
        learning rate of 1 / (tokens the centroid has received so far).
        Passes stop when the squared centroid shift over a whole pass is at
        most ``tol`` (scaled as for Lloyd). Memory is one batch, whatever the
        number of tokens: the mode for on-disk input too large to gather.
        ``max_samples``, ``backend`` and ``n_init`` beyond the initial sample
        do not apply. :meth:`partial_fit` always makes mini-batch steps.

    batch_size : int, default=1024
        Tokens per mini-batch step of ``algorithm="minibatch"``.

    compute_labels : bool, default=True
        Label every training token after ``fit`` (``labels_``, ``inertia_``),
        one streamed pass. With False and more tokens than were fitted
        (``max_samples`` or ``"minibatch"``), that pass and the O(n_tokens)
        ``labels_`` array are skipped: ``labels_`` and ``inertia_`` are then
        not set, and ``fit`` refuses ``y``.

    backend : {"auto", "torch", "sklearn", "faiss"}, default="auto"
        Lloyd implementation. ``"torch"``: chunked fused distance/argmax and
        ``index_add_`` (CPU) or one-hot GEMM (GPU) updates, memory bounded,
        any device. ``"sklearn"`` (CPU only): each E-step (with its M-step)
        is scikit-learn's compiled Lloyd iteration, the Cython loop of
        :class:`sklearn.cluster.KMeans` (distances, argmin and sums over
        cache-sized blocks, 2.2-2.5x faster than the torch kernels on a
        2-core CPU); seeding, ``n_init``, ``tol``, cosine k-means, token
        weights and ``inertia_curve_`` stay skstego's, and the results
        equal the torch backend's up to float32 rounding. It needs the
        kernel's private module (scikit-learn 1.6-1.9 have it); where it is
        missing ``"sklearn"`` raises an ImportError. ``"faiss"``: faiss's
        Lloyd (``faiss.Clustering``, as :class:`faiss.Kmeans` runs it) from
        the same initial centroids;
        needs the ``faiss`` package; always runs ``max_iter`` iterations. On
        a CUDA ``device`` (and a faiss that sees GPUs) its index lives on
        that one GPU (``cuda:N`` is honoured, unlike
        ``faiss.Kmeans(gpu=True)``, which takes every GPU), with at most
        256 MiB of faiss temporary memory, after torch's unused cached
        blocks are released. ``"auto"`` picks ``"sklearn"`` on the CPU
        (``"torch"`` where scikit-learn's kernel is missing) and torch on
        CUDA: it honours ``tol``, keeps the tokens on the GPU and allocates
        through torch's caching allocator, where faiss-GPU needs memory
        beside it. Streamed passes and mini-batch steps always run the
        torch kernels.

    temperature : float, default=0.5
        Softness of :meth:`predict_proba`: a softmax of the cosine
        similarities (``metric="cosine"``) or of the negative squared
        distances (``"euclidean"``) to the centroids, divided by
        ``temperature``. The STEGO reference scales similarities by 2,
        i.e. ``temperature=0.5``. Does not affect fitting or
        :meth:`predict`.

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where to compute; ``"auto"`` is CUDA when available, else the CPU.
        Resolved in :meth:`fit`.

    random_state : int, RandomState instance or None, default=None
        Seeds the subsampling and the initialisation (through a
        :class:`torch.Generator` on ``device``). Pass an int for
        reproducible results on a given device type; random streams are
        device-dependent (see Notes).

    verbose : bool, default=False
        Show a tqdm progress bar over the Lloyd iterations of each run (faiss
        prints its own log instead), over the batches of each
        ``"minibatch"`` pass, and over the chunks labelled after a subsampled
        or mini-batch fit.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (k, n_features), float32
        Centroids; unit vectors for ``metric="cosine"``.

    labels_ : ndarray of int64, shape (n_samples,) or (N, h, w)
        Cluster of every token of the training data, in its layout.

    inertia_ : float
        Sum of squared distances of all training tokens to their centroid
        (normalised tokens and centroids for cosine).

    counts_ : ndarray of shape (k,), float64
        Tokens each centroid has been fitted on: the cluster sizes of the
        fitted tokens after a Lloyd fit, the tokens received by mini-batch
        steps otherwise. :meth:`partial_fit` continues from them.

    n_steps_ : int
        Mini-batch steps made (0 after a Lloyd fit).

    n_iter_ : int
        Lloyd iterations of the best run (``max_iter`` for faiss).

    inertia_curve_ : ndarray of shape (n_iter_,), float64
        Inertia of the best run after each Lloyd iteration (the centroids
        reached after iteration ``i + 1``, each token at its nearest one),
        on the tokens k-means was fitted on: non-increasing, and its last
        value is ``inertia_`` unless ``max_samples`` subsampled the tokens
        (``inertia_`` then covers every token). For the faiss backend, from
        faiss's per-iteration objective (``Kmeans.obj``; NaN where a faiss
        version lacks it), the last value measured as ``inertia_``.

    n_features_in_ : int
        Number of features (channels) seen during :meth:`fit`.

    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during :meth:`fit`, for 2-D input with string
        column names only.

    mapping_ : ndarray of shape (k,), int64
        Only when ``fit`` got ``y``: class of every cluster by the Hungarian
        assignment on the training confusion matrix; -1 for unmatched clusters.

    n_classes_ : int
        Only when ``fit`` got ``y``: the ``n_classes`` parameter, or without
        it the largest valid label + 1.

    See Also
    --------
    sklearn.cluster.KMeans : Euclidean k-means on the CPU.
    skstego.LinearProbe : Supervised probe on the same codes.
    skstego.metrics.segmentation_report : mIoU and accuracy of a segmentation.

    Notes
    -----
    Computation is in float32. The Euclidean distances use
    ``|x|^2 - 2 x.c + |c|^2`` in chunks with a fused argmax, and centroid sums
    use ``index_add_`` on the CPU and a one-hot matrix product on a GPU; empty
    clusters are re-seeded with the tokens farthest from their centroid, as
    scikit-learn does. Memory beyond the (sub)sampled tokens is O(n) plus one
    chunk. ``init`` and the input may be any float dtype (bfloat16 and
    float16 included); they are cast to float32.

    Random streams are device-dependent: the generator lives on ``device``,
    and CPU and CUDA generators give different numbers for one seed, so the
    ``max_samples`` subsample, the k-means++ / ``"random"`` seeding and the
    ``"minibatch"`` initial sample differ between a CPU and a CUDA fit with
    the same ``random_state`` (each is reproducible on its device type).
    Even from the same initial centroids, CUDA sums tokens in another order
    (a one-hot matrix product; ``index_add_`` with atomics elsewhere), so a
    token almost equidistant from two centroids may be labelled differently
    and the two fits can then drift apart by a few tokens: compare CPU and
    CUDA results by inertia, scores or agreement of labels, not by exact
    equality.

    On CUDA, fitting waits for the GPU once per Lloyd iteration (to test
    convergence; once more in an iteration that re-seeds an empty
    cluster) and once per ``"minibatch"`` pass, never per mini-batch step.

    ``mapping_`` comes from the confusion matrix of ``labels_`` against ``y``
    over all training tokens (for label maps of another size, from scores
    upsampled to the label size). :meth:`score` ignores ``mapping_`` and
    matches clusters to classes on the data it is given.

    For 4-D maps, :meth:`predict` with ``size`` and :meth:`score` against label
    maps of another size (but the same aspect ratio) upsample the per-cluster
    scores bilinearly before the argmax; ``upsample="codes"`` upsamples the
    feature maps instead, then scores every pixel, as the STEGO reference
    does. For Euclidean k-means the score ``2 x.c - |c|^2`` is affine in
    ``x``, so both agree up to float rounding; for cosine similarities they
    differ near cluster boundaries (each upsampled code is normalised first).

    References
    ----------
    .. [1] Arthur, D. and Vassilvitskii, S. "k-means++: the advantages of careful
       seeding". SODA 2007.
    .. [2] Dhillon, I. S. and Modha, D. S. "Concept decompositions for large
       sparse text data using clustering". Machine Learning 42, 2001.
    .. [3] Hamilton, M. et al. "Unsupervised Semantic Segmentation by
       Distilling Feature Correspondences". ICLR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego import KMeansProbe
    >>> rng = np.random.default_rng(0)
    >>> X = np.concatenate([rng.normal(5, 1, (50, 4)), rng.normal(-5, 1, (50, 4))])
    >>> y = np.repeat([0, 1], 50)
    >>> probe = KMeansProbe(k=2, metric="euclidean", device="cpu", random_state=0)
    >>> probe.fit(X, y).cluster_centers_.shape
    (2, 4)
    >>> probe.score(X, y)
    1.0
    >>> maps = rng.normal(size=(3, 4, 6, 6)).astype(np.float32)
    >>> KMeansProbe(k=3, random_state=0).fit(maps).labels_.shape
    (3, 6, 6)
    """

    _parameter_constraints: ClassVar[dict] = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "n_classes": [Interval(Integral, 1, None, closed="left"), None],
        "metric": [StrOptions({"cosine", "euclidean"})],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "init": [StrOptions({"k-means++", "random"}), "array-like"],
        "max_samples": [Interval(Integral, 1, None, closed="left"), None],
        "algorithm": [StrOptions({"lloyd", "minibatch"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "compute_labels": ["boolean"],
        "backend": [StrOptions({"auto", "torch", "sklearn", "faiss"})],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        k: int = 8,
        *,
        n_classes: int | None = None,
        metric: str = "cosine",
        n_init: int = 1,
        max_iter: int = 100,
        tol: float = 1e-4,
        init: Any = "k-means++",
        max_samples: int | None = 1_000_000,
        algorithm: str = "lloyd",
        batch_size: int = 1024,
        compute_labels: bool = True,
        backend: str = "auto",
        temperature: float = 0.5,
        device: str | torch.device | None = "auto",
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.k = k
        self.n_classes = n_classes
        self.metric = metric
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.max_samples = max_samples
        self.algorithm = algorithm
        self.batch_size = batch_size
        self.compute_labels = compute_labels
        self.backend = backend
        self.temperature = temperature
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # --------------------------------------------------------- constructors

    @classmethod
    def from_centroids(
        cls,
        centroids: Any,
        *,
        metric: str = "cosine",
        n_classes: int | None = None,
        temperature: float = 0.5,
        device: str | torch.device | None = "auto",
    ) -> KMeansProbe:
        """A fitted probe from given centroids, without fitting.

        For centroids trained elsewhere, e.g. the ``cluster_probe.clusters``
        of a STEGO checkpoint (the reference's ``ClusterLookup``, k = 27 +
        extra clusters): :meth:`predict` is then the argmax of the cosine
        similarity between normalised codes and normalised centroids, as
        ``ClusterLookup.forward`` computes, and :meth:`predict_log_proba` at
        the default ``temperature=0.5`` is its ``log_softmax(inner * 2)``.
        The probe has no ``mapping_``: :meth:`predict` returns cluster ids and
        :meth:`score` matches clusters to classes on the evaluated data, as
        the reference evaluation does (pass ``n_classes``).

        Parameters
        ----------
        centroids : array-like or torch.Tensor of shape (k, n_features)
            The centroids. For ``metric="cosine"`` they are L2-normalised
            (``cluster_centers_`` holds unit vectors), as the reference
            normalises its clusters at every call.
        metric : {"cosine", "euclidean"}, default="cosine"
            Assignment rule: highest cosine similarity, or nearest centroid.
        n_classes : int or None, default=None
            Number of classes the scores count, see the class parameters.
        temperature : float, default=0.5
            Softness of :meth:`predict_proba` (0.5 is the reference's alpha 2).
        device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, \
                default="auto"
            Where to compute.

        Returns
        -------
        probe : KMeansProbe
            Fitted: ``cluster_centers_``, ``n_features_in_``, ``counts_``
            (zeros: :meth:`partial_fit` starts from the centroids with a
            learning rate of 1), ``n_iter_ = n_steps_ = 0`` and an empty
            ``inertia_curve_``; no ``labels_`` nor ``inertia_``. ``k`` is the
            number of centroids and ``init`` the (normalised) centroids, so
            that a clone refits from them.

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import KMeansProbe
        >>> probe = KMeansProbe.from_centroids([[2.0, 0.0], [0.0, 0.5]])
        >>> probe.cluster_centers_
        array([[1., 0.],
               [0., 1.]], dtype=float32)
        >>> probe.predict(np.array([[3.0, 1.0], [0.1, 1.0]]))
        array([0, 1])
        """
        c = _as_float32(centroids)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(
                f"centroids must be a non-empty 2-D array (k, n_features), got "
                f"shape {c.shape}."
            )
        if not np.all(np.isfinite(c)):
            raise ValueError("centroids contain NaN or infinity.")
        if metric == "cosine":
            c = _normalize_rows(torch.from_numpy(c)).numpy()
        probe = cls(
            k=c.shape[0],
            n_classes=n_classes,
            metric=metric,
            init=c.copy(),
            temperature=temperature,
            device=device,
        )
        probe._validate_params()
        probe.cluster_centers_ = c
        probe.n_features_in_ = int(c.shape[1])
        probe.counts_ = np.zeros(c.shape[0], dtype=np.float64)
        probe.n_iter_ = 0
        probe.n_steps_ = 0
        probe.inertia_curve_ = np.empty(0, dtype=np.float64)
        return probe

    # ---------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> KMeansProbe:
        """Fit the centroids (and, given ``y``, the cluster-to-class mapping).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps. Not modified. On-disk input (a
            :class:`~skstego.features.FeatureStore`, a zarr or dask array, a
            NumPy memmap) is read chunk by chunk: only the tokens the Lloyd
            loop runs on (all, or ``max_samples`` of them) are gathered on
            ``device``, never a host copy of the whole input.
        y : array-like or torch.Tensor of int, default=None
            Optional labels, (n_samples,) for tokens or label maps (N, H, W)
            for maps (any H, W of the maps' aspect ratio; scores are
            upsampled bilinearly to it); -1 is ignored. When given,
            ``mapping_`` and ``n_classes_`` are fitted.
        sample_weight : array-like of shape (n_samples,), (N,) or (N, h, w), \
                default=None
            Non-negative, finite weight of every token (2-D input), of every
            image (4-D maps: each of its pixels gets it) or of every pixel of
            the feature maps (N, h, w). None weighs all tokens alike. The
            Lloyd centroids are weighted means (cosine: the weighted
            spherical mean), k-means++ and ``"random"`` seeding draw tokens
            in proportion to their weight, ``tol`` is relative to the
            weighted variance, mini-batch steps and ``counts_`` count weight,
            and ``inertia_`` is weighted, so an integer weight equals
            repeating the token. Needs in-memory input or, for on-disk input,
            a fit that gathers its tokens (``max_samples`` below the number
            of tokens, on-disk input that fits in memory, or
            ``algorithm="minibatch"``); dask arrays, streamed Lloyd passes
            and ``backend="faiss"`` raise a ValueError.

        Returns
        -------
        self : KMeansProbe
            Fitted estimator.
        """
        X = check_features(self, X, reset=True, lazy=True)
        if is_torch(X):
            X = X.detach()  # no autograd graph through the Lloyd loop
        if y is not None:
            y = check_targets(X, y)
        device = self._resolved_device()
        backend = _choose_backend(self.backend, device)
        if backend == "faiss":
            if sample_weight is not None:
                raise ValueError(
                    "backend='faiss' does not take sample_weight; use "
                    "backend='torch' (or 'auto')."
                )
            _import_faiss()
        n_total = n_tokens(X)
        subsample = self.max_samples is not None and n_total > self.max_samples
        n_fit = self.max_samples if subsample else n_total
        if n_fit < self.k:
            raise ValueError(
                f"n_samples={n_fit} should be >= k={self.k}: k-means needs at "
                f"least as many (sub)sampled tokens as clusters."
            )
        init = _check_init(self.init, self.k, self.n_features_in_)
        if y is not None and not self.compute_labels:
            raise ValueError(
                "fit(X, y) maps clusters to classes through labels_: pass "
                "compute_labels=True, or fit without y."
            )
        # Exact Lloyd passes over chunks for dask input, and for on-disk
        # input that neither max_samples asks to subsample nor fits in
        # memory (read once, Lloyd in memory is faster than a read per pass).
        streamed = (
            self.algorithm == "lloyd"
            and not subsample
            and (
                dask_source(X) is not None
                or (
                    isinstance(X, LazyFeatures)
                    and self.max_samples is None
                    and not fits_in_memory(4 * n_total * self.n_features_in_, device)
                )
            )
        )
        wt = self._token_weights(X, sample_weight, device, streamed=streamed)
        gen = make_generator(self.random_state, device)
        if self.algorithm == "minibatch":
            fitted = self._fit_minibatch(X, init, n_total, device, gen, wt)
        else:
            self.n_steps_ = 0
            if streamed:
                fitted = self._fit_streamed(X, init, n_total, device, gen)
            else:
                fitted = self._fit_gathered(
                    X, init, n_total, subsample, backend, device, gen, wt
                )
        return self._set_fitted(X, y, *fitted)

    def _fit_gathered(
        self,
        X: Any,
        init: Any,
        n_total: int,
        subsample: bool,
        backend: str,
        device: torch.device,
        gen: torch.Generator,
        wt: torch.Tensor | None,
    ) -> tuple:
        """Lloyd (or faiss) on tokens gathered on ``device``: all of them, or
        ``max_samples`` drawn with ``gen``, after which every token is
        labelled in one streamed pass."""
        cosine = self.metric == "cosine"
        idx = sample_indices(n_total, self.max_samples, gen) if subsample else None
        Xs = chunks_of(X, device).gather(idx, device)
        ws = wt if wt is None or idx is None else wt[idx.to(device)]
        if ws is not None:
            _check_positive(ws, self.k)
        scale = 1.0
        if cosine:
            Xs = _normalize_rows(Xs)
            x_sq = None
            x_sq_init = torch.ones(Xs.shape[0], dtype=Xs.dtype, device=device)
        else:
            # values >= ~1e19 overflow float32 squared norms: fit on X / 2^p
            scale = _overflow_scale(Xs)
            if scale != 1.0:
                Xs = Xs / scale
                if not isinstance(init, str):
                    init = init / scale
            x_sq = x_sq_init = _row_sq_norms(Xs)
        # As scikit-learn: tol relative to the mean feature variance.
        tol = _mean_variance(Xs, ws) * self.tol if self.tol > 0 else 0.0
        n_init = self.n_init if isinstance(init, str) else 1
        best = None
        for run in range(n_init):
            centers = _init_centers(Xs, x_sq_init, self.k, init, gen, cosine, ws)
            if backend == "faiss":
                seed = int(
                    torch.randint(2**31 - 1, (1,), generator=gen, device=gen.device)
                )
                centers, curve = _faiss_centers(
                    Xs,
                    centers,
                    max_iter=self.max_iter,
                    cosine=cosine,
                    seed=seed,
                    verbose=self.verbose,
                )
                labels, inertia = _evaluate(Xs, x_sq, centers, cosine)
                n_iter = self.max_iter
                curve = np.append(curve, inertia)
            else:
                lloyd = _compiled_lloyd if backend == "sklearn" else _lloyd
                centers, labels, inertia, n_iter, curve = lloyd(
                    Xs,
                    x_sq,
                    centers,
                    max_iter=self.max_iter,
                    tol=tol,
                    cosine=cosine,
                    verbose=self.verbose,
                    desc=f"k-means run {run + 1}/{n_init}",
                    w=ws,
                )
            if best is None or inertia < best[2]:
                best = (centers, labels, inertia, n_iter, curve)
        centers, labels, inertia, n_iter, curve = best
        del Xs, x_sq, x_sq_init
        counts = _counts(labels, self.k, torch.float64, ws)
        _warn_if_degenerate(counts, self.k, stacklevel=5)
        if scale != 1.0:
            centers, inertia, curve = (
                centers * scale,
                inertia * scale**2,
                curve * scale**2,
            )
        if subsample and not self.compute_labels:
            labels = None
        elif subsample:
            labels, inertia = self._label_all(X, centers, device, wt)
        return centers, counts, labels, inertia, n_iter, curve

    def _fit_streamed(
        self,
        X: Any,
        init: Any,
        n_total: int,
        device: torch.device,
        gen: torch.Generator,
    ) -> tuple:
        """Exact Lloyd on every token, one pass over the chunks per E-step:
        dask blocks reduced on the workers, or slices of on-disk input read
        here. Memory is flat in the number of tokens."""
        chunks = chunks_of(X, device, "k-means: chunks" if self.verbose else None)
        centers, labels, inertia, n_iter, curve, counts = _chunked_lloyd(
            chunks,
            init,
            k=self.k,
            n_init=self.n_init,
            max_iter=self.max_iter,
            tol=self.tol,
            cosine=self.metric == "cosine",
            device=device,
            gen=gen,
            n_total=n_total,
            keep_labels=bool(self.compute_labels),
            verbose=self.verbose,
        )
        _warn_if_degenerate(counts, self.k, stacklevel=5)
        return centers, counts.double(), labels, inertia, n_iter, curve

    def _token_weights(
        self,
        X: Any,
        sample_weight: Any,
        device: torch.device,
        streamed: bool = False,
    ) -> torch.Tensor | None:
        """Checked ``sample_weight`` as one float64 weight per token of ``X``
        on ``device`` (None without weights)."""
        if sample_weight is None:
            return None
        if dask_source(X) is not None or streamed:
            raise ValueError(
                "sample_weight needs in-memory input or gathered tokens: "
                "dask arrays and streamed Lloyd passes (on-disk input with "
                "max_samples=None) do not take it. Load the features in "
                "memory, set max_samples, or use algorithm='minibatch'."
            )
        pixel_shape = (X.shape[0], *X.shape[2:]) if X.ndim == 4 else None
        w = check_weights(sample_weight, X.shape[0], pixel_shape)
        if not np.any(w > 0):
            raise ValueError(
                "Sample weights must contain at least one non-zero number."
            )
        return token_weights(w, tuple(X.shape), device)

    def _set_fitted(
        self,
        X: Any,
        y: Any,
        centers: torch.Tensor,
        counts: torch.Tensor,
        labels: torch.Tensor | None,
        inertia: float,
        n_iter: int,
        curve: np.ndarray,
    ) -> KMeansProbe:
        """Store the fitted attributes (and, given ``y``, the class mapping)."""
        device = centers.device
        self.cluster_centers_ = centers.detach().cpu().numpy().astype(np.float32)
        self.counts_ = counts.detach().cpu().numpy().astype(np.float64)
        self.n_iter_ = int(n_iter)
        self.inertia_curve_ = np.asarray(curve, dtype=np.float64)
        for name in ("mapping_", "n_classes_", "labels_", "inertia_"):
            self.__dict__.pop(name, None)
        if labels is None:
            return self
        if X.ndim == 4:
            labels = labels.reshape(X.shape[0], X.shape[2], X.shape[3])
        self.labels_ = labels.cpu().numpy()
        self.inertia_ = float(inertia)
        if y is not None:
            self._fit_mapping(X, y, labels, device)
        return self

    def _fit_minibatch(
        self,
        X: Any,
        init: Any,
        n_total: int,
        device: torch.device,
        gen: torch.Generator,
        wt: torch.Tensor | None = None,
    ) -> tuple:
        """``fit`` with ``algorithm="minibatch"``: passes of mini-batch steps."""
        cosine = self.metric == "cosine"
        n_init_tokens = min(n_total, max(3 * self.batch_size, 3 * self.k))
        idx = sample_indices(n_total, n_init_tokens, gen)
        Xi = chunks_of(X, device).gather(idx, device)
        wi = None if wt is None else wt[idx.to(device)]
        if wt is not None:
            _check_positive(wt, self.k)
            if not bool((wi > 0).any()):
                wi = None  # no weight in the sample: seed unweighted
        centers = _best_init(Xi, self.k, init, self.n_init, gen, cosine, wi)
        tol = 0.0
        if self.tol > 0:  # relative to the variance, scaled as the tokens
            s = _overflow_scale(Xi)
            Xi = _normalize_rows(Xi) if cosine else Xi / s
            tol = _mean_variance(Xi, wi) * s * s * self.tol
        del Xi
        counts = torch.zeros(self.k, dtype=torch.float64, device=device)
        n_steps = n_iter = 0
        n_batches = -(-n_total // self.batch_size)
        for n_iter in range(1, self.max_iter + 1):
            before = centers
            offset = 0
            for xb in tqdm(
                token_batches(X, self.batch_size, device),
                total=n_batches,
                desc=f"mini-batch k-means pass {n_iter}",
                disable=not self.verbose,
                leave=False,
            ):
                if cosine:
                    xb = _normalize_rows(xb)
                wb = None if wt is None else wt[offset : offset + xb.shape[0]]
                offset += xb.shape[0]
                centers, counts = _minibatch_step(xb, centers, counts, cosine, wb)
                n_steps += 1
            if float(((centers.double() - before.double()) ** 2).sum()) <= tol:
                break
        labels, inertia = None, float("nan")
        if self.compute_labels:
            labels, inertia = self._label_all(X, centers, device, wt)
            _warn_if_degenerate(_counts(labels, self.k), self.k, stacklevel=5)
        else:
            _warn_if_degenerate(counts, self.k, stacklevel=5)
        self.n_steps_ = n_steps
        curve = np.asarray([inertia]) if labels is not None else np.empty(0)
        return centers, counts, labels, inertia, n_iter, curve

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(
        self, X: Any, y: Any = None, sample_weight: Any = None
    ) -> KMeansProbe:
        """One mini-batch k-means step on the tokens of ``X``.

        The first call (on an unfitted probe) initialises the centroids from
        ``X`` (``init``, best of ``n_init`` by inertia on ``X``); every call
        then moves each centroid to the running mean of the tokens it has
        received, as :meth:`sklearn.cluster.MiniBatchKMeans.partial_fit`:
        ``c <- (c * N + sum) / (N + n)`` over the ``n`` tokens of ``X``
        nearest to it, ``N`` its count so far (``counts_``), renormalised for
        ``metric="cosine"``. After a ``fit`` it continues from the fitted
        centroids and counts.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            One batch of tokens or feature maps (all of it is one step; on-disk
            input is gathered on ``device``). Not modified.
        y : None
            Ignored; present for API consistency. ``mapping_`` is dropped.
        sample_weight : array-like of shape (n_samples,), (N,) or (N, h, w), \
                default=None
            Weight of every token, image or feature-map pixel, as in
            :meth:`fit`: each centroid moves to the weighted running mean
            and ``counts_`` adds up weight (as ``MiniBatchKMeans``). Not
            for dask input.

        Returns
        -------
        self : KMeansProbe
            The updated estimator; ``labels_`` and ``inertia_`` (when
            ``compute_labels``) are those of this batch under the updated
            centroids.

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import KMeansProbe
        >>> rng = np.random.default_rng(0)
        >>> probe = KMeansProbe(k=2, metric="euclidean", device="cpu", random_state=0)
        >>> for _ in range(5):
        ...     batch = np.concatenate([rng.normal(5, 1, (20, 3)),
        ...                             rng.normal(-5, 1, (20, 3))])
        ...     probe = probe.partial_fit(batch)
        >>> probe.counts_.tolist(), probe.n_steps_
        ([100.0, 100.0], 5)
        """
        first = not hasattr(self, "counts_")
        X = check_features(self, X, reset=first, lazy=True)
        if is_torch(X):
            X = X.detach()
        device = self._resolved_device()
        cosine = self.metric == "cosine"
        wt = self._token_weights(X, sample_weight, device)
        tokens = gather_tokens(X, None, device)
        if first:
            if wt is not None:
                _check_positive(wt, self.k)
            if tokens.shape[0] < self.k:
                raise ValueError(
                    f"The first partial_fit batch has {tokens.shape[0]} tokens; "
                    f"it should have >= k={self.k} to initialise the centroids."
                )
            init = _check_init(self.init, self.k, self.n_features_in_)
            gen = make_generator(self.random_state, device)
            centers = _best_init(tokens, self.k, init, self.n_init, gen, cosine, wt)
            counts = torch.zeros(self.k, dtype=torch.float64, device=device)
            n_steps = 0
        else:
            centers = as_tensor(self.cluster_centers_, device)
            counts = torch.as_tensor(self.counts_, dtype=torch.float64).to(device)
            n_steps = getattr(self, "n_steps_", 0)
        if cosine:
            tokens = _normalize_rows(tokens)
        centers, counts = _minibatch_step(tokens, centers, counts, cosine, wt)
        _warn_if_degenerate(counts, self.k)
        labels, inertia = None, float("nan")
        if self.compute_labels:
            labels, inertia = _evaluate_scaled(tokens, centers, cosine, wt)
        self.n_steps_ = n_steps + 1
        curve = np.asarray([inertia]) if labels is not None else np.empty(0)
        return self._set_fitted(X, None, centers, counts, labels, inertia, 1, curve)

    def _label_all(
        self,
        X: Any,
        centers: torch.Tensor,
        device: torch.device,
        wt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Labels and inertia (weighted by token weights ``wt``) of every
        token of ``X``: one pass over its chunks (on the dask workers for
        dask input, slice by slice here otherwise)."""
        progress = "k-means labels" if self.verbose else None
        chunks = chunks_of(X, device, progress)
        keep = "labels" if wt is None else "labels+dist"
        cosine = self.metric == "cosine"
        step, labels, dist = _label_pass(chunks, centers, cosine, device, keep)
        inertia = float(step.inertia) if wt is None else float(dist @ wt)
        return labels, inertia

    # ------------------------------------------------------------ inference

    def transform(self, X: Any) -> Any:
        """Similarities (cosine) or distances (Euclidean) to every centroid.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
                (N, n_features, h, w)
            Tokens or feature maps.

        Returns
        -------
        X_new : ndarray or torch.Tensor of float32, shape (n_samples, k) or \
                (N, k, h, w)
            Cosine similarities for ``metric="cosine"``, Euclidean distances for
            ``metric="euclidean"``.
        """
        check_is_fitted(self)
        out = lazy_output(self, "transform", X, self._n_features_out)
        if out is not None:
            return out
        X = self._check_X(X)
        device = self._resolved_device()
        centers = self._tensor("cluster_centers_", device)
        if self.metric == "cosine":

            def fn(xb: torch.Tensor) -> torch.Tensor:
                return _normalize_rows(xb) @ centers.T

        else:
            c_sq = (centers * centers).sum(dim=1)

            def fn(xb: torch.Tensor) -> torch.Tensor:
                d = torch.addmm(c_sq, xb, centers.T, alpha=-2.0)
                return d.add_(_row_sq_norms(xb)[:, None]).clamp_min_(0).sqrt_()

        return apply_tokenwise(fn, X, device=device, out_features=self.k)

    # --------------------------------------------------------------- misc

    @property
    def _n_features_out(self) -> int:
        return self.cluster_centers_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _check_init(init: Any, k: int, n_features: int) -> Any:
    """``init`` checked: "k-means++", "random", or finite (k, n_features)
    centroids as float32 NumPy (any float dtype in, bf16 and fp16 included)."""
    if isinstance(init, str):
        return init
    arr = _as_float32(init)
    if arr.shape != (k, n_features):
        raise ValueError(
            f"init has shape {arr.shape}; expected (k, n_features) = "
            f"({k}, {n_features})."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            "init contains NaN or infinity; pass finite initial centroids."
        )
    return arr


def _check_positive(w: torch.Tensor, k: int) -> None:
    """Raise unless at least ``k`` tokens have a positive weight."""
    n_pos = int((w > 0).sum())
    if n_pos < k:
        raise ValueError(
            f"sample_weight has {n_pos} positive weights among the fitted "
            f"tokens; k-means needs at least k={k}."
        )


def _as_float32(a: Any) -> np.ndarray:
    """An array-like or tensor of any float dtype (bf16 and fp16 included) as
    float32 NumPy: NumPy has no bfloat16, so tensors are cast by torch."""
    if is_torch(a):
        return a.detach().to("cpu", torch.float32).numpy()
    return np.asarray(a, dtype=np.float32)
