"""LinearProbe: softmax regression on tokens or feature maps (Adam or L-BFGS)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d
from tqdm.auto import tqdm

from .._dask import lazy_output
from .._device import (
    LazyFeatures,
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    dask_source,
    is_torch,
    make_generator,
    maps_to_tokens,
)
from .._weights import check_weights, token_weights
from ..metrics import report_from_confusion
from ._base import (
    check_targets,
    check_upsample,
    predict_labels,
    score_maps,
    scored_confusion,
)
from ._linear_dask import DaskObjective
from ._linear_objective import (
    Adam,
    MapObjective,
    Objective,
    StreamedObjective,
    TokenObjective,
    adam_pass,
    map_standardization,
    positive,
    token_standardization,
)

__all__ = ["LinearProbe"]


class LinearProbe(ClassifierMixin, TorchEstimatorMixin, BaseEstimator):
    """Linear (softmax) probe on tokens or feature maps, trained with Adam.

    Multinomial logistic regression, i.e. the STEGO linear probe: a 1x1
    convolution ``n_features -> n_classes`` applied to every token of a feature
    map, trained with cross-entropy by Adam on mini-batches (or, with
    ``solver="lbfgs"``, by full-batch L-BFGS). It works on plain
    2-D data ``(n_samples, n_features)`` with 1-D labels like any scikit-learn
    classifier, and on feature maps ``(N, C, h, w)`` with label maps
    ``(N, H, W)``; when the label maps are larger or smaller than the feature
    maps, the logits are upsampled bilinearly to the label size before the loss
    (the STEGO protocol).

    Features are standardised internally (the model is trained in the
    standardised parametrisation and folded back into ``coef_`` and
    ``intercept_`` for raw features), which makes the default learning rate work
    on features of any scale. The weights start at zero and the intercept at the
    log class frequencies. :meth:`from_weights` wraps a trained 1x1 convolution
    (a STEGO checkpoint's ``linear_probe``) as a fitted probe.

    Parameters
    ----------
    lr : float, default=5e-3
        Adam learning rate (the STEGO value).

    max_iter : int, default=100
        Maximum number of epochs (passes over the training tokens or images)
        for Adam; maximum number of iterations for L-BFGS.

    batch_size : int or "auto", default="auto"
        Labelled tokens per Adam step. ``"auto"`` uses
        ``min(1024, max(32, n_labelled // 32))``: 1024 on large data, and about
        32 steps per epoch on small data (Adam with a small ``lr`` needs a few
        thousand steps whatever the data size). For 2-D input and for feature
        maps whose label maps have the maps' size, mini-batches are drawn from
        all labelled tokens; for label maps of another size, mini-batches hold
        whole images, ``max(1, batch_size // (H * W))`` of them, so memory
        stays bounded by the upsampled logits of one batch. Ignored by L-BFGS.

    weight_decay : float, default=0.0
        L2 penalty on the (standardised) weights, not on the intercept: the
        objective is the mean cross-entropy plus ``weight_decay / 2 * ||W||^2``.
        ``weight_decay = 1 / (C * n_samples)`` matches the penalty of
        :class:`~sklearn.linear_model.LogisticRegression` with inverse
        regularisation ``C`` (on standardised features); with
        ``sample_weight`` / ``class_weight`` the cross-entropy is the weighted
        mean, and ``n_samples`` becomes the sum of the weights.

    tol : float, default=1e-4
        Adam stops when the mean training loss of an epoch improves on the
        best loss so far by less than ``tol``. L-BFGS stops when no entry of
        the gradient exceeds ``tol`` in absolute value (as
        :class:`~sklearn.linear_model.LogisticRegression` does).

    solver : {"adam", "lbfgs"}, default="adam"
        ``"adam"``: mini-batch Adam, the STEGO probe; ``lr``, ``batch_size``
        and ``random_state`` apply. ``"lbfgs"``: full-batch L-BFGS (SciPy's
        L-BFGS-B, as :class:`~sklearn.linear_model.LogisticRegression` uses)
        on the same objective, with loss and gradient computed on ``device``
        in one memory-bounded pass over the data per evaluation;
        deterministic, and often the faster choice when a pass is cheap (small
        data, or a GPU). Without ``weight_decay``, on separable data the
        L-BFGS weights keep growing until ``max_iter``: use
        ``weight_decay=1 / n_samples`` for the objective of
        ``LogisticRegression(C=1)`` on standardised features.

    class_weight : dict, "balanced" or None, default=None
        Weights of the classes, multiplying ``sample_weight`` in the loss, as
        in :class:`~sklearn.linear_model.LogisticRegression`. A dict maps
        class labels (class ids for label maps) to weights, other classes
        weighing 1. ``"balanced"`` weighs class ``c`` by
        ``n / (n_classes * n_c)`` on the labelled training tokens or pixels
        (``n_c`` and ``n`` summing ``sample_weight`` when given, as
        :func:`sklearn.utils.class_weight.compute_class_weight` does, and
        ``n_classes`` counting the classes present), so that every class
        weighs alike in total. :meth:`partial_fit` takes a dict only.
        Needs in-memory input.

    ignore_index : int or None, default=None
        A label value excluded from training and scoring. For label maps every
        negative label is ignored anyway (the ``-1`` convention of
        skstego); ``ignore_index`` adds another one (e.g. 255). For 1-D labels
        every value is a class unless it equals ``ignore_index`` (numeric labels
        only); use ``ignore_index=-1`` for tokens flattened from label maps.
        The default keeps scikit-learn's semantics for 1-D labels, where ``-1``
        is an ordinary class.

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where to fit and predict; ``"auto"`` picks CUDA when available. Resolved
        at every call, so a model fitted on a GPU predicts on a CPU-only machine.

    random_state : int, RandomState instance or None, default=None
        Seeds the :class:`torch.Generator` that shuffles Adam's mini-batches.
        With an int, fits on one device are reproducible (CUDA kernels may
        add nondeterminism in the upsampling backward pass, for label maps
        of another size). The random stream depends on the device: for
        in-memory data the generator lives on ``device``, and a CUDA
        generator draws other shuffles than a CPU one from the same seed, so
        Adam fits on a GPU and on the CPU differ (by as much as two seeds
        do); for on-disk and dask input it lives on the CPU, so those fits
        shuffle alike on every device. ``solver="lbfgs"`` draws nothing.

    verbose : bool or int, default=False
        Show a progress bar with the running loss.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels: the sorted distinct labels of 1-D targets, or
        ``np.arange(max label + 1)`` for label maps.

    coef_ : ndarray of shape (n_classes, n_features), float32
        Weights on the raw features (the 1x1 convolution kernel).

    intercept_ : ndarray of shape (n_classes,), float32
        Intercepts, centred to sum to zero (softmax is blind to a common
        shift).

    n_features_in_ : int
        Number of features (channels) seen during fit.

    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit. Defined only when X has feature
        names that are all strings.

    n_iter_ : int
        Number of epochs (Adam) or iterations (L-BFGS) run.

    loss_curve_ : list of float
        Training loss (mean cross-entropy plus penalty): the running mean of
        each Adam epoch, or the loss after each L-BFGS iteration.

    See Also
    --------
    KMeansProbe : Unsupervised cluster probe, Hungarian-matched to classes.
    sklearn.linear_model.LogisticRegression : The same model fitted by L-BFGS.

    Notes
    -----
    ``score`` uses ``metric="auto"``: accuracy for 1-D labels (as any
    scikit-learn classifier, labels unseen in fit count as errors) and mean IoU
    for label maps. ``metric="miou"`` or ``"accuracy"`` pick one explicitly;
    both are computed from a confusion matrix with identity matching
    (:func:`skstego.metrics.report_from_confusion`).

    For binary problems on 2-D input, :meth:`decision_function` returns one
    score per sample (the log-odds of ``classes_[1]``) as scikit-learn does;
    ``coef_`` keeps one row per class.

    The training data go to ``device`` as one float32 tensor.

    Speed: Adam moves each weight by about ``lr`` per step, so with the default
    ``lr`` it needs a few thousand steps whatever the data size (about 30-50
    epochs of ``batch_size="auto"`` on 20k-200k tokens). Where one pass over
    the data is cheap, ``solver="lbfgs"`` with a small ``weight_decay``
    usually reaches the same accuracy in a few dozen passes; see
    ``benchmarks/bench_linear.py``.

    References
    ----------
    .. [1] Hamilton, M., Zhang, Z., Hariharan, B., Snavely, N. and Freeman,
       W. T. "Unsupervised Semantic Segmentation by Distilling Feature
       Correspondences." ICLR 2022.
    .. [2] Kingma, D. P. and Ba, J. "Adam: A Method for Stochastic
       Optimization." ICLR 2015.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from skstego import LinearProbe
    >>> X, y = load_iris(return_X_y=True)
    >>> probe = LinearProbe(device="cpu", random_state=0).fit(X, y)
    >>> probe.predict(X[:3])
    array([0, 0, 0])
    >>> probe.predict_proba(X[:1]).shape
    (1, 3)
    >>> bool(probe.score(X, y) > 0.9)
    True

    Feature maps with label maps twice as large:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> maps = rng.normal(size=(4, 8, 6, 6)).astype("float32")
    >>> labels = rng.integers(0, 3, size=(4, 12, 12))
    >>> probe = LinearProbe(device="cpu", max_iter=5, random_state=0)
    >>> probe.fit(maps, labels).predict(maps, size=(12, 12)).shape
    (4, 12, 12)
    """

    _parameter_constraints: ClassVar[dict] = {
        "lr": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [
            Interval(Integral, 1, None, closed="left"),
            StrOptions({"auto"}),
        ],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "solver": [StrOptions({"adam", "lbfgs"})],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "ignore_index": [Integral, None],
        "device": [StrOptions({"auto"}), str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        lr: float = 5e-3,
        max_iter: int = 100,
        batch_size: int | str = "auto",
        weight_decay: float = 0.0,
        tol: float = 1e-4,
        solver: str = "adam",
        class_weight: dict | str | None = None,
        ignore_index: int | None = None,
        device: str | torch.device = "auto",
        random_state: Any = None,
        verbose: bool = False,
    ):
        self.lr = lr
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.tol = tol
        self.solver = solver
        self.class_weight = class_weight
        self.ignore_index = ignore_index
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        tags.input_tags.three_d_array = False
        return tags

    # --------------------------------------------------------- constructors
    @classmethod
    def from_weights(
        cls,
        weight: Any,
        bias: Any = None,
        *,
        classes: Any = None,
        device: str | torch.device = "auto",
    ) -> LinearProbe:
        """A fitted probe from the weights of a 1x1 convolution, without fitting.

        For a probe trained elsewhere, e.g. the ``linear_probe`` of a STEGO
        checkpoint (``torch.nn.Conv2d(dim, n_classes, (1, 1))``):
        :meth:`decision_function` on maps then equals
        ``F.conv2d(codes, weight, bias)`` (up to float rounding), and
        :meth:`predict_log_proba` the reference's
        ``log_softmax(linear_probe(code), dim=1)``.

        Parameters
        ----------
        weight : array-like or torch.Tensor of shape (n_classes, n_features) \
                or (n_classes, n_features, 1, 1)
            The kernel (``Conv2d.weight``) or a linear layer's weight.
        bias : array-like or torch.Tensor of shape (n_classes,), default=None
            The bias; None for zeros. Kept as given (``fit`` centres its
            intercepts; the logits here stay those of the convolution).
        classes : array-like of shape (n_classes,), default=None
            Labels of the output channels, sorted; default
            ``np.arange(n_classes)`` (class ids, as label maps hold).
        device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, \
                default="auto"
            Where to compute.

        Returns
        -------
        probe : LinearProbe
            Fitted: ``coef_``, ``intercept_``, ``classes_``,
            ``n_features_in_``, ``n_iter_ = 0`` and an empty
            ``loss_curve_``. :meth:`partial_fit` continues training from these
            weights (on unstandardised features).

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import LinearProbe
        >>> probe = LinearProbe.from_weights(np.eye(3), [0.0, 1.0, 0.0])
        >>> probe.decision_function(np.array([[2.0, 0.0, 0.0]]))
        array([[2., 1., 0.]], dtype=float32)
        >>> probe.predict(np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]))
        array([0, 2])
        """

        def as_numpy(a: Any) -> np.ndarray:
            a = a.detach().cpu().numpy() if is_torch(a) else a
            return np.asarray(a, dtype=np.float32)

        w = as_numpy(weight)
        if w.ndim == 4 and w.shape[2:] == (1, 1):
            w = w[:, :, 0, 0]
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(
                "weight must have shape (n_classes, n_features) or (n_classes, "
                f"n_features, 1, 1) (a 1x1 convolution), got {w.shape}."
            )
        n_classes, n_features = w.shape
        b = np.zeros(n_classes, np.float32) if bias is None else as_numpy(bias)
        if b.shape != (n_classes,):
            raise ValueError(
                f"bias must have shape ({n_classes},) to match weight, got {b.shape}."
            )
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ValueError("weight or bias contains NaN or infinity.")
        if classes is None:
            classes = np.arange(n_classes)
        else:
            classes = np.asarray(_labels_to_numpy(classes))
            if classes.shape != (n_classes,) or np.any(np.unique(classes) != classes):
                raise ValueError(
                    f"classes must be {n_classes} sorted distinct labels, one per "
                    "output channel."
                )
        probe = cls(device=device)
        probe._validate_params()
        probe.coef_ = np.ascontiguousarray(w)
        probe.intercept_ = np.ascontiguousarray(b)
        probe.classes_ = classes
        probe.n_features_in_ = int(n_features)
        probe.n_iter_ = 0
        probe.loss_curve_ = []
        zeros = [np.zeros_like(w), np.zeros_like(b)]
        probe._adam_state = {
            "mean": np.zeros(n_features, np.float32),
            "scale": np.ones(n_features, np.float32),
            "params": [w.copy(), b.copy()],
            "m": zeros,
            "v": [z.copy() for z in zeros],
            "t": 0,
        }
        return probe

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> LinearProbe:
        """Fit the probe.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
(N, C, h, w)
            Tokens or feature maps. On-disk input (a
            :class:`~skstego.features.FeatureStore`, a zarr or dask array, a
            NumPy memmap) is streamed, never loaded whole: two passes for the
            standardisation, then every Adam epoch reads it chunk by chunk
            (shuffling within each chunk, chunks in order) and every L-BFGS
            evaluation sums the chunks' gradients. The labels stay in memory.

        y : array-like or torch.Tensor of shape (n_samples,) or (N, H, W)
            Labels of any type scikit-learn classifiers accept for tokens;
            integer class ids for label maps (negative ids and
            ``ignore_index`` are ignored). Label maps may have another size
            than the feature maps.

        sample_weight : array-like or torch.Tensor of shape (n_samples,), \
(N,) or (N, H, W), default=None
            Non-negative weight of every token (2-D input), of every image
            (feature maps: each of its labelled pixels weighs the image's
            weight) or of every pixel of the label maps. The loss is then the
            weighted mean cross-entropy (the weighted sum divided by the sum
            of the weights of the labelled tokens), so integer weights fit as
            repeated samples do, and the standardisation uses the weighted
            moments (per-image weights only, for label maps of another size).
            Multiplied by ``class_weight``. Needs in-memory ``X``: on-disk and
            dask input raise a ValueError.

        Returns
        -------
        self : LinearProbe
            The fitted probe.
        """
        X = check_features(self, X, reset=True, lazy=True)
        device = self._resolved_device()
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y "
                "is None."
            )
        if X.ndim == 2:
            classes, y_enc = self._encode_fit_labels(y, X.shape[0])
            labels = torch.as_tensor(y_enc)
            w = check_weights(sample_weight, X.shape[0])
        else:
            classes, labels = self._encode_fit_label_maps(X, y, device)
            w = check_weights(sample_weight, X.shape[0], tuple(labels.shape))
        _check_some_weight(w)
        n_classes = len(classes)
        class_weight = self._class_weights(classes, labels, w, X.shape)
        objective, counts = _build_objective(
            X,
            labels,
            n_classes,
            device,
            worker_device=self.device,
            sample_weight=w,
            class_weight=class_weight,
        )
        mean = objective.mean
        # Zero weights, intercept at the (smoothed) log class frequencies; both
        # in the standardised parametrisation.
        weight = torch.zeros(n_classes, mean.shape[0], device=device)
        prior = (counts.double() + 1.0) / (counts.sum().double() + n_classes)
        bias = prior.log().float()
        adam = Adam([weight, bias], lr=self.lr)
        if self.solver == "adam":
            gen = _shuffle_generator(self.random_state, X, device)
            self._fit_adam(objective, weight, bias, gen, device, adam)
        else:
            self._fit_lbfgs(objective, weight, bias)
        self.classes_ = classes
        self._set_coefficients(objective, weight, bias, adam)
        return self

    def _class_weights(
        self,
        classes: np.ndarray,
        labels: torch.Tensor,
        w: np.ndarray | None,
        X_shape: tuple,
        partial: bool = False,
    ) -> np.ndarray | None:
        """One weight per class from ``class_weight``; None when unweighted."""
        cw = self.class_weight
        if cw is None:
            return None
        if isinstance(cw, str):  # "balanced"
            if partial:
                raise ValueError(
                    "class_weight='balanced' is not supported by partial_fit: the "
                    "class frequencies of the whole stream are unknown. Pass a "
                    "dict of class weights (e.g. computed with sklearn's "
                    "compute_class_weight on all the labels)."
                )
            lab = labels.reshape(-1).cpu()
            weights = None
            if w is not None:
                weights = torch.as_tensor(w, dtype=torch.float64)
                if len(X_shape) == 4 and weights.ndim == 1:
                    per_image = labels.reshape(labels.shape[0], -1).shape[1]
                    weights = weights.repeat_interleave(per_image)
                weights = weights.reshape(-1)
            valid = lab >= 0
            counts = torch.bincount(
                lab[valid],
                weights=None if weights is None else weights[valid],
                minlength=len(classes),
            ).double()
            present = counts > 0
            out = torch.ones(len(classes), dtype=torch.float64)
            out[present] = counts.sum() / (int(present.sum()) * counts[present])
            return out.numpy()
        return compute_class_weight(cw, classes=classes, y=classes).astype(np.float64)

    def _set_coefficients(
        self,
        objective: Objective,
        weight: torch.Tensor,
        bias: torch.Tensor,
        adam: Adam,
    ) -> None:
        """``coef_`` / ``intercept_`` on raw features; the state partial_fit needs."""
        coef, intercept = objective.raw(weight, bias)
        # Softmax is blind to a shift shared by all intercepts: centre them (as
        # scikit-learn does) so that fits are comparable.
        intercept = intercept - intercept.mean()
        self.coef_ = coef.cpu().numpy()
        self.intercept_ = intercept.cpu().numpy()
        # Private: the standardised parameters and Adam's moments, so that
        # partial_fit continues from here.
        self._adam_state = {
            "mean": objective.mean.cpu().numpy(),
            "scale": objective.scale.cpu().numpy(),
            **adam.state(),
        }

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(
        self, X: Any, y: Any, classes: Any = None, sample_weight: Any = None
    ) -> LinearProbe:
        """One epoch of Adam over ``X``, continuing from the current state.

        The contract of :meth:`sklearn.linear_model.SGDClassifier.partial_fit`:
        the first call (on an unfitted probe) fixes the classes -- ``classes``
        is required there for 1-D labels; for label maps it defaults to
        ``0..max label`` of the first batch -- and the feature
        standardisation, taken from the (labelled tokens of the) first batch;
        the weights start at zero and the intercept at the log class
        frequencies of the first batch. Every call then shuffles the tokens
        of ``X`` (whole images for label maps of another size) and makes Adam
        steps of ``batch_size`` over them, Adam's moments carrying over
        between calls. After :meth:`fit` it continues from the fitted model.
        On-disk ``X`` is read chunk by chunk (shuffled within each chunk).
        ``solver`` does not apply: the steps are always Adam's.

        Parameters
        ----------
        X : array-like, torch.Tensor or on-disk array of shape \
(n_samples, n_features) or (N, C, h, w)
            One batch of tokens or feature maps. Not modified.
        y : array-like or torch.Tensor of shape (n_samples,) or (N, H, W)
            Its labels, all in ``classes`` (``ignore_index`` and, for label
            maps, negative labels are ignored).
        classes : array-like of shape (n_classes,), default=None
            Every class of the whole stream; required on the first call for
            1-D labels, checked against ``classes_`` afterwards.
        sample_weight : array-like or torch.Tensor of shape (n_samples,), \
(N,) or (N, H, W), default=None
            Weights of the batch's tokens, images or label pixels, as in
            :meth:`fit` (in-memory ``X`` only). A dict ``class_weight``
            multiplies them; ``"balanced"`` raises.

        Returns
        -------
        self : LinearProbe
            The updated probe; ``loss_curve_`` gains the batch's mean loss.

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import LinearProbe
        >>> rng = np.random.default_rng(0)
        >>> probe = LinearProbe(lr=0.05, device="cpu", random_state=0)
        >>> for _ in range(20):
        ...     X = rng.normal(size=(64, 3))
        ...     probe = probe.partial_fit(X, (X[:, 0] > 0).astype(int), classes=[0, 1])
        >>> X = rng.normal(size=(200, 3))
        >>> bool(probe.score(X, (X[:, 0] > 0).astype(int)) > 0.9)
        True
        """
        state = getattr(self, "_adam_state", None)
        first = state is None
        X = check_features(self, X, reset=first, lazy=True)
        device = self._resolved_device()
        if y is None:
            raise ValueError(
                f"{type(self).__name__}.partial_fit requires y; got y=None."
            )
        if X.ndim == 2:
            classes_, labels = self._encode_partial_labels(y, X.shape[0], classes)
            w = check_weights(sample_weight, X.shape[0])
        else:
            classes_, labels = self._encode_partial_label_maps(X, y, classes, device)
            w = check_weights(sample_weight, X.shape[0], tuple(labels.shape))
        _check_some_weight(w)
        n_classes = len(classes_)
        class_weight = self._class_weights(classes_, labels, w, X.shape, partial=True)
        moments = None
        if not first:
            moments = tuple(
                torch.as_tensor(state[key]).to(device) for key in ("mean", "scale")
            )
        objective, counts = _build_objective(
            X,
            labels,
            n_classes,
            device,
            moments,
            self.device,
            sample_weight=w,
            class_weight=class_weight,
        )
        if first:
            weight = torch.zeros(n_classes, objective.mean.shape[0], device=device)
            prior = (counts.double() + 1.0) / (counts.sum().double() + n_classes)
            bias = prior.log().float()
            adam = Adam([weight, bias], lr=self.lr)
        else:
            weight, bias = (torch.tensor(p, device=device) for p in state["params"])
            adam = Adam([weight, bias], lr=self.lr)
            adam.load(state)
        gen = _shuffle_generator(self.random_state, X, device)
        loss = self._adam_epoch(
            objective,
            weight,
            bias,
            adam,
            gen,
            device,
            self._batch(objective.n_labelled),
        )
        self.classes_ = classes_
        self._set_coefficients(objective, weight, bias, adam)
        self.loss_curve_ = (
            [*getattr(self, "loss_curve_", []), loss] if not first else [loss]
        )
        self.n_iter_ = len(self.loss_curve_)
        return self

    def _encode_partial_labels(
        self, y: Any, n_samples: int, classes: Any
    ) -> tuple[np.ndarray, torch.Tensor]:
        """1-D labels -> codes in ``classes_`` (fixed by the first call)."""
        known = getattr(self, "classes_", None)
        if known is None and classes is None:
            raise ValueError(
                "classes must be passed on the first call to partial_fit with 1-D "
                "labels: the classes of the whole stream, e.g. classes=np.unique(y)."
            )
        if classes is not None:
            given = np.unique(_labels_to_numpy(classes))
            if known is not None and not np.array_equal(given, known):
                raise ValueError(
                    f"classes={given.tolist()!r} differs from the classes_ of the "
                    f"earlier calls, {known.tolist()!r}."
                )
            known = given
        _check_n_classes(len(known), known)
        y = column_or_1d(_labels_to_numpy(y), warn=True)
        if y.shape[0] != n_samples:
            raise ValueError(
                f"X has {n_samples} samples but y has {y.shape[0]} labels; for 2-D "
                "X, y must be 1-D with one label per row."
            )
        keep = self._kept(y)
        unknown = ~np.isin(y[keep], known)
        if unknown.any():
            raise ValueError(
                f"y holds labels {np.unique(y[keep][unknown]).tolist()!r} that are "
                f"not in classes {known.tolist()!r}."
            )
        codes = np.full(n_samples, -1, dtype=np.int64)
        codes[keep] = np.searchsorted(known, y[keep])
        return known, torch.as_tensor(codes)

    def _encode_partial_label_maps(
        self, X: Any, y: Any, classes: Any, device: torch.device
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Label maps -> class ids below ``n_classes`` (fixed by the first call)."""
        known = getattr(self, "classes_", None)
        if known is None and classes is None:
            known, labels = self._encode_fit_label_maps(X, y, device)
            return known, labels
        if known is None:
            known = np.arange(int(np.max(_labels_to_numpy(classes))) + 1)
            _check_n_classes(len(known), known)
        labels = torch.as_tensor(check_targets(X, y)).to(device)
        valid = labels >= 0
        if self.ignore_index is not None:
            valid &= labels != self.ignore_index
        if bool((labels[valid] >= len(known)).any()):
            raise ValueError(
                f"y holds class ids >= {len(known)}, the number of classes fixed "
                "by the first partial_fit call (pass classes= covering them all)."
            )
        return known, torch.where(valid, labels, -1)

    def _batch(self, n_labelled: int) -> int:
        if self.batch_size == "auto":
            return min(1024, max(32, n_labelled // 32))
        return int(self.batch_size)

    def _encode_fit_labels(self, y: Any, n_samples: int) -> tuple[np.ndarray, Any]:
        y = _labels_to_numpy(y)
        y = column_or_1d(y, warn=True)
        if y.shape[0] != n_samples:
            raise ValueError(
                f"X has {n_samples} samples but y has {y.shape[0]} labels; for 2-D "
                "X, y must be 1-D with one label per row."
            )
        check_classification_targets(y)
        keep = self._kept(y)
        classes, codes = np.unique(y[keep], return_inverse=True)
        _check_n_classes(len(classes), classes)
        y_enc = np.full(n_samples, -1, dtype=np.int64)
        y_enc[keep] = codes.reshape(-1)
        return classes, y_enc

    def _kept(self, y: np.ndarray) -> np.ndarray:
        """Mask of 1-D labels that are not ``ignore_index``."""
        if self.ignore_index is None or y.dtype.kind not in "iuf":
            return np.ones(y.shape[0], dtype=bool)
        return y != self.ignore_index

    def _encode_fit_label_maps(
        self, X: Any, y: Any, device: torch.device
    ) -> tuple[np.ndarray, torch.Tensor]:
        labels = check_targets(X, y)
        labels = torch.as_tensor(labels).to(device)
        valid = labels >= 0
        if self.ignore_index is not None:
            valid &= labels != self.ignore_index
        if not bool(valid.any()):
            raise ValueError(
                "The label maps y hold no valid label: every pixel is negative or "
                f"equal to ignore_index={self.ignore_index!r}."
            )
        n_classes = int(labels[valid].max()) + 1
        classes = np.arange(n_classes)
        _check_n_classes(n_classes, classes)
        # A new tensor: the user's labels are never modified.
        return classes, torch.where(valid, labels, -1)

    def _fit_adam(
        self,
        objective: Objective,
        weight: torch.Tensor,
        bias: torch.Tensor,
        gen: torch.Generator,
        device: torch.device,
        adam: Adam,
    ) -> None:
        """Mini-batch Adam epochs, updating ``weight`` and ``bias`` in place."""
        batch_size = self._batch(objective.n_labelled)
        self.loss_curve_ = []
        best = np.inf
        converged = False
        bar = tqdm(
            range(self.max_iter),
            desc=type(self).__name__,
            disable=not self.verbose,
            leave=False,
        )
        for _ in bar:
            loss = self._adam_epoch(
                objective, weight, bias, adam, gen, device, batch_size
            )
            self.loss_curve_.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            if not np.isfinite(loss):
                raise ValueError(
                    "The training loss diverged; lower lr or check the input."
                )
            if best - loss < self.tol:
                converged = True
                break
            best = min(best, loss)
        bar.close()
        self.n_iter_ = len(self.loss_curve_)
        if not converged:
            warnings.warn(
                f"{type(self).__name__} reached max_iter={self.max_iter} epochs "
                f"before the loss improved by less than tol={self.tol}; increase "
                "max_iter or tol.",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _adam_epoch(
        self,
        objective: Objective,
        weight: torch.Tensor,
        bias: torch.Tensor,
        adam: Adam,
        gen: torch.Generator,
        device: torch.device,
        batch_size: int,
    ) -> float:
        """One shuffled pass of Adam steps; returns the epoch's mean loss."""
        wd = float(self.weight_decay)
        if objective.remote_steps:
            # dask: the steps of each chunk run where the chunk lives
            total, count = objective.adam_epoch(weight, bias, adam, gen, batch_size, wd)
        else:
            total, count = adam_pass(
                objective.epoch(gen, batch_size, device), weight, bias, adam, wd
            )
        loss = float(total / positive(float(count)))
        if wd:
            loss += 0.5 * wd * float(weight.square().sum())
        if not np.isfinite(loss):
            raise ValueError("The training loss diverged; lower lr or check the input.")
        return loss

    def _fit_lbfgs(
        self, objective: Objective, weight: torch.Tensor, bias: torch.Tensor
    ) -> None:
        """Full-batch L-BFGS (SciPy's L-BFGS-B, as scikit-learn uses).

        The loss and gradient are computed on the device; only the parameters
        (n_classes * (n_features + 1) values) cross to the host per evaluation.
        ``weight`` and ``bias`` are updated in place.
        """
        wd = float(self.weight_decay)
        n_w = weight.numel()
        last = [np.nan]

        def fun(x):
            with torch.no_grad():
                xt = torch.from_numpy(x).to(weight.device, torch.float32)
                weight.copy_(xt[:n_w].view_as(weight))
                bias.copy_(xt[n_w:])
                total, count, grad_w, grad_b = objective.full_loss_grad(weight, bias)
                count = positive(count)
                loss = total / count
                grad_w.div_(count)
                grad_b.div_(count)
                if wd:
                    grad_w.add_(weight, alpha=wd)
                    loss = loss + 0.5 * wd * weight.double().square().sum()
                grad = torch.cat([grad_w.reshape(-1), grad_b]).double().cpu().numpy()
            last[0] = float(loss)
            if not np.isfinite(last[0]):
                raise ValueError("The training loss diverged; check the input.")
            return last[0], grad

        self.loss_curve_ = []
        bar = tqdm(
            total=self.max_iter,
            desc=type(self).__name__,
            disable=not self.verbose,
            leave=False,
        )

        def callback(*args):
            self.loss_curve_.append(last[0])
            bar.update()
            bar.set_postfix(loss=f"{last[0]:.4f}")

        x0 = torch.cat([weight.reshape(-1), bias]).double().cpu().numpy()
        result = minimize(
            fun,
            x0,
            jac=True,
            method="L-BFGS-B",
            callback=callback,
            options={
                "maxiter": self.max_iter,
                "maxls": 50,
                "gtol": self.tol,
                "ftol": 64 * np.finfo(float).eps,
            },
        )
        bar.close()
        xt = torch.from_numpy(result.x).to(weight.device, torch.float32)
        weight.copy_(xt[:n_w].view_as(weight))
        bias.copy_(xt[n_w:])
        self.n_iter_ = int(result.nit)
        if result.nit >= self.max_iter:
            warnings.warn(
                f"{type(self).__name__} reached max_iter={self.max_iter} L-BFGS "
                f"iterations before the gradient fell below tol={self.tol}; "
                "increase max_iter or weight_decay.",
                ConvergenceWarning,
                stacklevel=4,
            )

    # -------------------------------------------------------------- predict
    def _score_fn(self, device: torch.device) -> Callable:
        coef = self._tensor("coef_", device)
        intercept = self._tensor("intercept_", device)
        return lambda t: torch.addmm(intercept, t, coef.T)

    def _checked(self, X: Any) -> tuple[Any, torch.device]:
        check_is_fitted(self)
        X = check_features(self, X, reset=False, lazy=True)
        return X, self._resolved_device()

    def decision_function(self, X: Any) -> np.ndarray | torch.Tensor:
        """Class scores (logits).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
(N, C, h, w)
            Tokens or feature maps.

        Returns
        -------
        scores : ndarray or torch.Tensor of shape (n_samples, n_classes) or \
(N, n_classes, h, w)
            Logits; ``(n_samples,)`` (log-odds of ``classes_[1]``) for binary
            problems on 2-D input.
        """
        check_is_fitted(self)
        binary_2d = getattr(X, "ndim", None) == 2 and len(self.classes_) == 2
        out = lazy_output(
            self, "decision_function", X, 0 if binary_2d else len(self.classes_)
        )
        if out is not None:
            return out
        X, device = self._checked(X)
        fn = self._score_fn(device)
        if X.ndim == 2 and len(self.classes_) == 2:

            def binary(t):
                s = fn(t)
                return s[:, 1] - s[:, 0]

            return apply_tokenwise(binary, X, device=device, out_features=0)
        return apply_tokenwise(fn, X, device=device, out_features=len(self.classes_))

    def predict_proba(
        self,
        X: Any,
        *,
        size: tuple[int, int] | None = None,
        upsample: str = "scores",
    ) -> np.ndarray | torch.Tensor:
        """Class probabilities (softmax of the logits).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
(N, C, h, w)
            Tokens or feature maps.

        size : tuple of int (H, W), optional
            For feature maps: upsample the logits bilinearly to (H, W) before
            the softmax, as :meth:`predict` does.

        upsample : {"scores", "codes"}, default="scores"
            With ``size``: upsample the logits, or the feature maps before
            the linear map, as :meth:`predict`.

        Returns
        -------
        proba : ndarray or torch.Tensor of shape (n_samples, n_classes) or \
(N, n_classes, h, w)
            Probabilities in the order of ``classes_``; (N, n_classes, H, W)
            with ``size``; a lazy dask array for dask input.
        """
        check_upsample(upsample)
        out = self._lazy("predict_proba", X, size, upsample)
        if out is not None:
            return out
        return self._proba(X, size, upsample, torch.softmax)

    def _lazy(
        self, method: str, X: Any, size: Any, upsample: str, dtype: Any = np.float32
    ) -> Any:
        """``method``'s lazy answer to dask input (None for other input):
        per-class columns, or one label per token for ``predict``."""
        check_is_fitted(self)
        kw = {} if size is None else {"size": size}
        if upsample != "scores":
            kw["upsample"] = upsample
        width = 0 if method == "predict" else len(self.classes_)
        return lazy_output(self, method, X, width, dtype=dtype, **kw)

    def _proba(self, X: Any, size: Any, upsample: str, post: Callable) -> Any:
        X, device = self._checked(X)
        n_classes = len(self.classes_)
        return score_maps(
            self._score_fn(device),
            X,
            device=device,
            n_outputs=n_classes,
            post=lambda scores: post(scores, dim=1),
            out_features=n_classes,
            size=size,
            upsample=upsample,
        )

    def predict_log_proba(
        self,
        X: Any,
        *,
        size: tuple[int, int] | None = None,
        upsample: str = "scores",
    ) -> np.ndarray | torch.Tensor:
        """Logarithm of the class probabilities (log-softmax of the logits).

        With ``size`` and ``upsample="codes"`` on maps this is the STEGO
        reference's ``log_softmax(linear_probe(code), dim=1)`` of codes
        upsampled to the label size.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
(N, C, h, w)
            Tokens or feature maps.

        size : tuple of int (H, W), optional
            For feature maps: upsample bilinearly to (H, W) first.

        upsample : {"scores", "codes"}, default="scores"
            With ``size``: what is upsampled, as in :meth:`predict`.

        Returns
        -------
        log_proba : ndarray or torch.Tensor of shape (n_samples, n_classes) or \
(N, n_classes, h, w)
            Log-probabilities in the order of ``classes_``; (N, n_classes, H, W)
            with ``size``.
        """
        check_upsample(upsample)
        out = self._lazy("predict_log_proba", X, size, upsample)
        if out is not None:
            return out
        return self._proba(X, size, upsample, torch.log_softmax)

    def predict(
        self,
        X: Any,
        *,
        size: tuple[int, int] | None = None,
        upsample: str = "scores",
    ) -> np.ndarray | torch.Tensor:
        """Predict the class of every token.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
(N, C, h, w)
            Tokens or feature maps.

        size : tuple of int (H, W), optional
            For feature maps: upsample the class scores bilinearly to (H, W)
            before the argmax (the STEGO protocol for label maps larger than the
            feature maps).

        upsample : {"scores", "codes"}, default="scores"
            With ``size``: upsample the logits, or the feature maps themselves
            before the linear map, as the STEGO reference does. The logits
            being affine in the features, both agree up to float rounding
            (argmax ties aside).

        Returns
        -------
        labels : ndarray or torch.Tensor of shape (n_samples,) or (N, h, w)
            Predicted classes, ``(N, H, W)`` with ``size``. Torch input gives
            a tensor on the probe's device, except for non-numeric classes,
            which come back as a NumPy array.
        """
        check_upsample(upsample)
        check_is_fitted(self)
        if self.classes_.dtype.kind in "iub":
            # non-numeric classes cannot travel in a dask array: computed
            out = self._lazy("predict", X, size, upsample, self.classes_.dtype)
            if out is not None:
                return out
        X, device = self._checked(X)
        if size is not None and X.ndim != 4:
            raise ValueError("size applies to 4-D feature maps only.")
        ids = predict_labels(
            self._score_fn(device),
            X,
            device=device,
            n_outputs=len(self.classes_),
            size=size,
            upsample=upsample,
        )
        if X.ndim == 4 and np.array_equal(self.classes_, np.arange(len(self.classes_))):
            return ids  # label maps: classes are their indices
        if not is_torch(ids):
            return self.classes_[ids]
        if self.classes_.dtype.kind in "iufb":
            dtype = torch.from_numpy(self.classes_[:1]).dtype
            return self._tensor("classes_", device, dtype)[ids]
        return self.classes_[ids.cpu().numpy()]

    def score(
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        metric: str = "auto",
        upsample: str = "scores",
    ) -> float:
        """Accuracy (1-D labels) or mean IoU (label maps) of the predictions.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
(N, C, h, w)
            Tokens or feature maps.

        y : array-like or torch.Tensor of shape (n_samples,) or (N, H, W)
            True labels. For label maps of another size than the feature maps
            (but their aspect ratio), scores are upsampled bilinearly to the
            label size first; negative labels and ``ignore_index`` are left
            out, and classes unseen in fit count as errors. For 1-D labels,
            labels equal to ``ignore_index`` are left out and labels unseen in
            fit count as errors.

        sample_weight : array-like of shape (n_samples,) or (N, H, W), \
                default=None
            Weight of every token (1-D labels), of every image (label maps:
            each of its pixels counts with the image's weight) or of every
            pixel of the label maps. Accuracy is then the weighted fraction
            of correct pixels (as :func:`sklearn.metrics.accuracy_score`),
            and IoUs are computed from the weighted confusion matrix.

        metric : {"auto", "accuracy", "miou"}, default="auto"
            ``"auto"`` is accuracy for 1-D labels (scikit-learn's classifier
            contract) and mean IoU for label maps.

        upsample : {"scores", "codes"}, default="scores"
            For label maps of another size: upsample the logits, or the
            feature maps, as in :meth:`predict`.

        Returns
        -------
        score : float
            The metric, in [0, 1]; NaN, with an
            :class:`~sklearn.exceptions.UndefinedMetricWarning`, when every
            label is ignored.
        """
        if metric not in ("auto", "accuracy", "miou"):
            raise ValueError(
                f"metric must be 'auto', 'accuracy' or 'miou', got {metric!r}."
            )
        check_upsample(upsample)
        X, device = self._checked(X)
        if metric == "auto":
            metric = "accuracy" if X.ndim == 2 else "miou"
        return float(self._report(X, y, device, upsample, sample_weight)[metric])

    def score_report(
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        upsample: str = "scores",
    ) -> dict[str, Any]:
        """All segmentation scores of the predictions on ``(X, y)``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features) or \
(N, C, h, w)
            Tokens or feature maps.

        y : array-like or torch.Tensor of shape (n_samples,) or (N, H, W)
            True labels, as in :meth:`score`.

        sample_weight : array-like of shape (n_samples,) or (N, H, W), \
                default=None
            As in :meth:`score`; the ``confusion`` is then float64.

        upsample : {"scores", "codes"}, default="scores"
            As in :meth:`score`.

        Returns
        -------
        report : dict
            As :func:`skstego.metrics.segmentation_report` with identity
            matching (class ``i`` of the rows is ``classes_[i]``): ``miou``,
            ``accuracy``, per-class ``iou``, ``precision``, ``recall``,
            ``support`` and the ``confusion`` matrix. Labels unseen in fit
            get rows of their own and count as errors.

        Examples
        --------
        >>> import numpy as np
        >>> from skstego import LinearProbe
        >>> X = np.array([[0.0], [0.1], [1.0], [1.1]], dtype=np.float32)
        >>> y = np.array([0, 0, 1, 1])
        >>> probe = LinearProbe(solver="lbfgs", device="cpu").fit(X, y)
        >>> report = probe.score_report(X, y)
        >>> float(report["accuracy"]), float(report["miou"])
        (1.0, 1.0)
        """
        check_upsample(upsample)
        X, device = self._checked(X)
        return self._report(X, y, device, upsample, sample_weight)

    def _report(
        self,
        X: Any,
        y: Any,
        device: torch.device,
        upsample: str = "scores",
        sample_weight: Any = None,
    ) -> dict[str, Any]:
        n_classes = len(self.classes_)
        fn = self._score_fn(device)
        if X.ndim == 2:
            y_enc = self._encode_score_labels(y, X.shape[0])
            w = check_weights(sample_weight, X.shape[0])
            rows = max(n_classes, int(y_enc.max(initial=-1)) + 1)
            conf = scored_confusion(
                fn,
                X,
                y_enc,
                device=device,
                n_outputs=rows,
                n_classes=rows,
                sample_weight=w,
            )
        else:
            labels = check_targets(X, y)
            w = check_weights(sample_weight, X.shape[0], labels.shape)
            ignore = -1 if self.ignore_index is None else self.ignore_index
            # classes unseen in fit get rows of their own: they count as errors
            kept = labels[labels != ignore]
            top = int(kept.max()) + 1 if kept.reshape(-1).shape[0] else 0
            rows = max(n_classes, top)
            conf = scored_confusion(
                fn,
                X,
                labels,
                device=device,
                n_outputs=rows,
                n_classes=rows,
                ignore_index=ignore,
                upsample=upsample,
                sample_weight=w,
            )
        return report_from_confusion(conf, matching="identity")

    def _encode_score_labels(self, y: Any, n_samples: int) -> np.ndarray:
        """1-D labels -> class index; unseen -> n_classes; ignored -> -1."""
        y = column_or_1d(_labels_to_numpy(y), warn=True)
        if y.shape[0] != n_samples:
            raise ValueError(
                f"X has {n_samples} samples but y has {y.shape[0]} labels."
            )
        n_classes = len(self.classes_)
        try:
            idx = np.searchsorted(self.classes_, y)
        except TypeError as exc:
            raise ValueError(
                f"y holds labels of another type than classes_ ({self.classes_.dtype})."
            ) from exc
        idx = np.clip(idx, 0, n_classes - 1)
        known = self.classes_[idx] == y
        y_enc = np.where(known, idx, n_classes).astype(np.int64)
        y_enc[~self._kept(y)] = -1
        return y_enc


def _shuffle_generator(
    random_state: Any, X: Any, device: torch.device
) -> torch.Generator:
    """The generator of Adam's shuffles: on the CPU for on-disk input.

    A dask fit carries the generator's state from chunk to chunk across the
    workers, whatever device each resolves; CPU state travels anywhere. The
    streamed fit of other on-disk input (memmap, zarr, FeatureStore) draws
    from a CPU generator too, so that it and the dask fit make the same
    shuffles on every device: a CUDA generator seeded alike draws other
    permutations than a CPU one (it drew them on CUDA before, and the dask
    fit stopped equalling the streamed one there). One ``randperm`` per
    chunk and epoch, so the host draw costs nothing next to the reads.
    In-memory fits keep the generator on ``device`` (a host draw and copy
    of every epoch's permutation would slow GPU fits of many tokens), so
    their shuffles, hence their fits, depend on the device.
    """
    if isinstance(X, LazyFeatures):
        return make_generator(random_state, torch.device("cpu"))
    return make_generator(random_state, device)


def _check_some_weight(w: np.ndarray | None) -> None:
    if w is not None and not np.any(w > 0):
        raise ValueError(
            "sample_weight is zero everywhere: no sample would count in the fit."
        )


def _check_n_classes(n_classes: int, classes: np.ndarray) -> None:
    if n_classes < 2:
        raise ValueError(
            "LinearProbe needs samples of at least 2 classes in the data, but the "
            f"data contain only one class: {classes.tolist()!r}."
        )


def _labels_to_numpy(y: Any) -> np.ndarray:
    if is_torch(y):
        return y.detach().cpu().numpy()
    return np.asarray(y)


def _maps_as_tokens(X: Any, device: torch.device) -> torch.Tensor:
    """(N, C, h, w) maps -> (N*h*w, C) float32 tokens on ``device`` (one copy)."""
    if is_torch(X):
        return maps_to_tokens(as_tensor(X, device))
    c = X.shape[1]
    tokens = np.ascontiguousarray(X.transpose(0, 2, 3, 1), dtype=np.float32)
    return as_tensor(tokens.reshape(-1, c), device)


def _build_objective(
    X: Any,
    labels: torch.Tensor,
    n_classes: int,
    device: torch.device,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    worker_device: Any = "auto",
    sample_weight: np.ndarray | None = None,
    class_weight: np.ndarray | None = None,
) -> tuple[Objective, torch.Tensor]:
    """The training objective of encoded ``labels`` and the class counts.

    ``sample_weight`` (checked by :func:`~._weights.check_weights`: one per
    row of 2-D ``X``, per image or per pixel of the label maps) and
    ``class_weight`` (one per class) multiply into one weight per labelled
    token or pixel; the counts are then the weighted class totals. Weights
    need in-memory ``X``.

    ``moments`` (mean, scale) fixes the standardisation; None measures it on
    the data (on the labelled tokens, or every pixel for label maps of
    another size). On-disk ``X`` gives a :class:`StreamedObjective`, a dask
    array a :class:`~._linear_dask.DaskObjective` whose tasks resolve
    ``worker_device`` (the estimator's ``device``) on each worker.
    """
    weighted = sample_weight is not None or class_weight is not None
    if isinstance(X, LazyFeatures) and weighted:
        raise ValueError(
            "sample_weight and class_weight need in-memory input (a NumPy array "
            "or a torch tensor); the streamed fit of on-disk or dask features "
            "does not weight samples. Load X into memory (e.g. np.asarray(X)) "
            "or fit without weights."
        )
    if isinstance(X, LazyFeatures):
        source = dask_source(X)
        if source is not None:
            objective = DaskObjective(
                source, labels, n_classes, device, worker_device, moments
            )
        else:
            objective = StreamedObjective(X, labels, n_classes, device, moments)
        return objective, objective.counts.to(device)
    labels = labels.to(device)
    cw = None
    if class_weight is not None:
        cw = torch.as_tensor(class_weight, dtype=torch.float64, device=device)
    if X.ndim == 2 or tuple(labels.shape[-2:]) == tuple(X.shape[-2:]):
        weights = token_weights(sample_weight, tuple(X.shape), device)
        if X.ndim == 2:
            tokens = as_tensor(X, device)
        else:
            tokens, labels = _maps_as_tokens(X, device), labels.reshape(-1)
        keep = labels >= 0
        if not bool(keep.all()):
            tokens, labels = tokens[keep], labels[keep]
            weights = None if weights is None else weights[keep]
        if cw is not None:
            weights = cw[labels] if weights is None else weights * cw[labels]
        if moments is None:
            mean, scale = token_standardization(tokens, weights)
        else:
            mean, scale = moments
        counts = torch.bincount(labels, weights=weights, minlength=n_classes)
        objective = TokenObjective(tokens, labels, mean, scale, n_classes, weights)
        return objective, counts
    maps = as_tensor(X, device)
    weights = image_weights = None
    if sample_weight is not None:
        weights = torch.as_tensor(sample_weight, dtype=torch.float64, device=device)
        if weights.ndim == 1:
            image_weights = weights
            weights = weights[:, None, None].expand(labels.shape)
    if cw is not None:
        per_class = cw[labels.clamp(min=0)]
        weights = per_class if weights is None else weights * per_class
    if moments is None:
        mean, scale = map_standardization(maps, image_weights)
    else:
        mean, scale = moments
    valid = labels >= 0
    counts = torch.bincount(
        labels[valid],
        weights=None if weights is None else weights[valid],
        minlength=n_classes,
    )
    return MapObjective(maps, labels, mean, scale, n_classes, weights), counts
