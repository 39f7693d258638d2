"""The STEGO segmentation head as a scikit-learn transformer.

``code = linear(drop(f)) + nonlinear(drop(f))`` (``STEGO.md`` section 2),
trained with the correspondence-distillation loss of
:func:`skstego.losses.stego_loss` and K-NN positives from
:mod:`skstego.projection._knn` (sections 3-4).
"""

from __future__ import annotations

import json
import math
import os
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
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from .._dask import map_method
from .._device import (
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    is_dask,
    is_torch,
    make_generator,
    resolve_device,
)
from ..losses import stego_loss
from ._knn import image_descriptors, nearest_neighbors

__all__ = ["StegoProjector"]

#: Neighbours kept per image by the K-NN step (STEGO.md section 4).
_KNN_POOL = 30

#: Steps between progress-bar updates (each update waits for the device).
_REPORT_EVERY = 20

#: Names of the head's parameters, in ``head_state_``; conv weights are
#: stored as 2-D (out, in) matrices (a 1x1 convolution is a matrix product).
_PARAM_NAMES = (
    "linear.weight",
    "linear.bias",
    "nonlinear.0.weight",
    "nonlinear.0.bias",
    "nonlinear.2.weight",
    "nonlinear.2.bias",
)

#: The same weights in the STEGO reference code's state dicts.
_REFERENCE_NAMES = {
    "linear.weight": "cluster1.weight",
    "linear.bias": "cluster1.bias",
    "nonlinear.0.weight": "cluster2.0.weight",
    "nonlinear.0.bias": "cluster2.0.bias",
    "nonlinear.2.weight": "cluster2.2.weight",
    "nonlinear.2.bias": "cluster2.2.bias",
}

#: Metadata tag of files written by StegoProjector.save_head.
_HEAD_FORMAT = "skstego.StegoProjector.head/1"

#: Settings that reproduce the released checkpoints (STEGO.md section 3).
PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff27": {
        "dim": 90,
        "n_steps": 7000,
        "batch_size": 32,
        "pointwise": True,
        "neg_weight": 0.1538,
        "pos_inter_weight": 1.0,
        "pos_intra_weight": 0.1,
        "neg_shift": 1.0,
        "pos_inter_shift": 0.2,
        "pos_intra_shift": 0.12,
    },
    "cityscapes": {
        "dim": 100,
        "n_steps": 7000,
        "batch_size": 32,
        "pointwise": False,
        "neg_weight": 0.9059,
        "pos_inter_weight": 0.5775,
        "pos_intra_weight": 1.0,
        "neg_shift": 0.3136,
        "pos_inter_shift": 0.1754,
        "pos_intra_shift": 0.4583,
    },
    "potsdam": {
        "dim": 70,
        "n_steps": 5000,
        "batch_size": 16,
        "pointwise": True,
        "neg_weight": 0.63,
        "pos_inter_weight": 0.25,
        "pos_intra_weight": 0.67,
        "neg_shift": 0.76,
        "pos_inter_shift": 0.02,
        "pos_intra_shift": 0.08,
    },
}


def _init_params(
    n_features: int, dim: int, generator: torch.Generator, device: torch.device
) -> dict[str, torch.Tensor]:
    """torch's default Conv2d initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    drawn from ``generator`` so that a seed fixes the whole fit."""
    bound = 1.0 / math.sqrt(n_features)
    shapes = {
        "linear.weight": (dim, n_features),
        "linear.bias": (dim,),
        "nonlinear.0.weight": (n_features, n_features),
        "nonlinear.0.bias": (n_features,),
        "nonlinear.2.weight": (dim, n_features),
        "nonlinear.2.bias": (dim,),
    }
    params = {}
    for name in _PARAM_NAMES:
        u = torch.rand(shapes[name], generator=generator, device=device)
        params[name] = ((u * 2 - 1) * bound).requires_grad_(True)
    return params


def _head_maps(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    drop1: torch.Tensor | None = None,
    drop2: torch.Tensor | None = None,
) -> torch.Tensor:
    """The head on maps (B, C, h, w): 1x1 convolutions as channel products.

    ``drop1``/``drop2`` are channel-dropout masks (B, C, 1, 1), already scaled
    by ``1 / (1 - p)``, for the linear and nonlinear branch; None in eval mode.
    """
    x1 = x if drop1 is None else x * drop1
    x2 = x if drop2 is None else x * drop2
    lin = torch.einsum("dc,bchw->bdhw", params["linear.weight"], x1)
    lin = lin + params["linear.bias"][None, :, None, None]
    hid = torch.einsum("ec,bchw->behw", params["nonlinear.0.weight"], x2)
    hid = F.relu(hid + params["nonlinear.0.bias"][None, :, None, None])
    non = torch.einsum("de,behw->bdhw", params["nonlinear.2.weight"], hid)
    non = non + params["nonlinear.2.bias"][None, :, None, None]
    return lin + non


def _head_tokens(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The head (eval mode) on tokens (n, C) -> (n, dim)."""
    lin = torch.addmm(params["linear.bias"], x, params["linear.weight"].T)
    hid = F.relu(
        torch.addmm(params["nonlinear.0.bias"], x, params["nonlinear.0.weight"].T)
    )
    return lin + torch.addmm(
        params["nonlinear.2.bias"], hid, params["nonlinear.2.weight"].T
    )


def _dump_adam(
    optimizer: torch.optim.Adam, params: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Adam's per-parameter state as NumPy arrays (empty before any step)."""
    out: dict[str, np.ndarray] = {}
    step = 0
    for name, p in params.items():
        st = optimizer.state.get(p)
        if not st:
            continue
        step = int(st["step"])
        out[f"exp_avg.{name}"] = st["exp_avg"].detach().cpu().numpy().copy()
        out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().cpu().numpy().copy()
    out["step"] = np.asarray(step, dtype=np.int64)
    return out


def _load_adam(
    optimizer: torch.optim.Adam,
    params: dict[str, torch.Tensor],
    state: dict[str, np.ndarray],
    device: torch.device,
) -> None:
    """Restore what :func:`_dump_adam` saved."""
    step = int(state["step"])
    if step == 0:
        return
    for name, p in params.items():
        optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.as_tensor(state[f"exp_avg.{name}"]).to(device),
            "exp_avg_sq": torch.as_tensor(state[f"exp_avg_sq.{name}"]).to(device),
        }


def _read_head_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Head weights (skstego names, 2-D) and stored parameters of a file."""
    if not os.path.isfile(path):
        raise ValueError(f"No head weights file at {path!r}.")
    stored: dict[str, Any] = {}
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") == _HEAD_FORMAT:
                stored = json.loads(meta.get("params", "{}"))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise ValueError("it holds no state dict")
            raw = {
                k: v.detach().float().numpy()
                for k, v in obj.items()
                if isinstance(v, torch.Tensor)
            }
    except ValueError as exc:
        raise ValueError(f"Could not read head weights from {path!r}: {exc}") from exc
    except Exception as exc:  # safetensors / unpickler errors of many kinds
        raise ValueError(
            f"Could not read head weights from {path!r} ({type(exc).__name__}: "
            f"{exc}). Expected a safetensors file or a plain torch state dict; "
            "checkpoints that pickle other objects are refused for safety: "
            "extract their state_dict first."
        ) from exc
    state = {}
    for name in _PARAM_NAMES:
        aliases = (name, _REFERENCE_NAMES[name])
        hits = [k for k in raw for a in aliases if k == a or k.endswith("." + a)]
        if len(hits) != 1:
            raise ValueError(
                f"{path!r} has {'no' if not hits else 'several'} weight for the "
                f"head's {name!r} (or the reference's {_REFERENCE_NAMES[name]!r}); "
                f"keys found: {sorted(raw)[:12]}."
            )
        value = np.asarray(raw[hits[0]], dtype=np.float32)
        state[name] = value.reshape(value.shape[:2]) if value.ndim == 4 else value
    dim, c = state["linear.weight"].shape
    expected = {
        "linear.bias": (dim,),
        "nonlinear.0.weight": (c, c),
        "nonlinear.0.bias": (c,),
        "nonlinear.2.weight": (dim, c),
        "nonlinear.2.bias": (dim,),
    }
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(
                f"{path!r}: {name} has shape {state[name].shape}, expected {shape} "
                f"for a head with dim={dim} on {c} channels."
            )
    return state, stored


class StegoProjector(
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    TorchEstimatorMixin,
    BaseEstimator,
):
    """STEGO's segmentation head, trained by correspondence distillation.

    The head maps feature maps ``f`` of shape (N, C, h, w) to codes of shape
    (N, dim, h, w)::

        code = linear(drop(f)) + nonlinear(drop(f))

    where ``linear`` is a 1x1 convolution C -> dim, ``nonlinear`` is a 1x1
    convolution C -> C, ReLU, 1x1 convolution C -> dim, and ``drop`` is channel
    dropout (Dropout2d), drawn separately for each branch and used only in
    training. ``fit`` trains the head with Adam on
    :func:`skstego.losses.stego_loss`: each step draws ``batch_size`` distinct
    images, pairs each with one of its ``n_neighbors`` nearest images (cosine
    similarity of spatially pooled features, top 30 kept) and with other
    images of the batch (negatives). 2-D tokens (n, C) are treated as 1x1
    maps: neighbours are then searched over tokens, and the output is (n, dim).

    Parameters
    ----------
    dim : int, default=70
        Dimension of the codes.
    n_steps : int, default=5000
        Optimisation steps (mini-batches) per ``fit``.
    batch_size : int, default=16
        Images per step; capped at the number of images. The negative term
        needs at least 2 images per batch and is dropped (weight 0) when the
        effective batch is 1.
    lr : float, default=5e-4
        Adam learning rate.
    dropout : float in [0, 1), default=0.1
        Channel dropout probability of each branch during training.
    feature_samples : int, default=11
        Points per side sampled from each map by the loss (S x S points);
        1 for 2-D tokens, whose maps are 1x1.
    neg_samples : int, default=5
        Derangements of the batch averaged in the negative term; 0 drops it.
    n_neighbors : int, default=7
        The positive partner is drawn among this many nearest images
        (capped at the number of other images).
    pos_intra_weight, pos_inter_weight, neg_weight : float
        Weights of the intra, K-NN and negative terms (0.67, 0.25, 0.63).
    pos_intra_shift, pos_inter_shift, neg_shift : float
        Shifts of the three terms (0.08, 0.02, 0.66).
    pointwise, zero_clamp, stabilize : bool
        Flags of :func:`skstego.losses.correlation_loss`.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the head trains and runs; resolved at each call. On CUDA the
        forward pass and loss run under bf16 autocast.
    random_state : int, RandomState instance or None, default=None
        Seeds the :class:`torch.Generator` that draws the initial weights,
        batches, partners, dropout masks and loss samples: an int gives the
        same head at every fit on a given device type.
    verbose : bool, default=False
        Show a progress bar with the running loss.
    warm_start : bool, default=False
        When True and the estimator is fitted, ``fit`` continues training
        from the current head and Adam state (as :meth:`partial_fit` does)
        instead of starting afresh.

    Attributes
    ----------
    head_state_ : dict of str to ndarray (float32)
        Trained weights: ``"linear.weight"`` (dim, C), ``"linear.bias"``
        (dim,), ``"nonlinear.0.weight"`` (C, C), ``"nonlinear.0.bias"`` (C,),
        ``"nonlinear.2.weight"`` (dim, C), ``"nonlinear.2.bias"`` (dim,).
        NumPy only, so the fitted estimator pickles without device state.
    optimizer_state_ : dict of str to ndarray
        Adam's moments (``"exp_avg.<name>"``, ``"exp_avg_sq.<name>"``) and
        step count (``"step"``), so that :meth:`partial_fit` and
        ``warm_start`` continue the optimisation exactly.
    loss_curve_ : ndarray of shape (n_steps_,)
        Training loss at each step, over all continued fits.
    n_steps_, n_iter_ : int
        Number of steps run, over all continued fits.
    n_features_in_ : int
        Number of channels seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`, when all strings.

    See Also
    --------
    TorchPCA : Linear, data-dependent reduction.
    RandomProjection : Data-independent baseline.

    Notes
    -----
    The shifts are thresholds on the feature correlation ``F`` (cosine
    similarity of the sampled feature vectors, after ``pointwise``
    centring): code pairs whose features correlate above the shift are
    pulled together, those below are pushed apart. The defaults and the
    presets were tuned for DINO ViT features; features whose cosine
    similarities sit elsewhere need other shifts. A quick check: compute
    :func:`skstego.losses.correlation` on a few maps and put the negative
    shift between the typical same-object and different-object values.
    On :func:`skstego.datasets.make_feature_maps`, for instance, same-class
    tokens have mean cosine 0.25 and different-class tokens 0.08, so the
    DINO negative shift (0.66) pushes every pair apart; shifts of 0.3 (neg)
    and 0.1 (intra, inter) train codes on which k-means finds the classes.

    NumPy arrays and memory maps are streamed: only the images of the current
    batch (and their partners) are moved to the device; torch tensors
    already on the device are used in place. Output is float32; NumPy in
    gives NumPy out, torch in gives torch out on the estimator's device.

    References
    ----------
    .. [1] M. Hamilton, Z. Zhang, B. Hariharan, N. Snavely and W. T. Freeman,
           2022, "Unsupervised Semantic Segmentation by Distilling Feature
           Correspondences", ICLR.

    Examples
    --------
    >>> import numpy as np
    >>> from skstego.projection._stego import StegoProjector
    >>> rng = np.random.RandomState(0)
    >>> maps = rng.rand(8, 16, 6, 6).astype(np.float32)
    >>> stego = StegoProjector(dim=4, n_steps=3, batch_size=4, device="cpu",
    ...                        random_state=0)
    >>> stego.fit_transform(maps).shape
    (8, 4, 6, 6)
    >>> stego.loss_curve_.shape
    (3,)
    """

    _parameter_constraints: ClassVar[dict] = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "n_steps": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "feature_samples": [Interval(Integral, 1, None, closed="left")],
        "neg_samples": [Interval(Integral, 0, None, closed="left")],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "pos_intra_weight": [Real],
        "pos_inter_weight": [Real],
        "neg_weight": [Real],
        "pos_intra_shift": [Real],
        "pos_inter_shift": [Real],
        "neg_shift": [Real],
        "pointwise": ["boolean"],
        "zero_clamp": ["boolean"],
        "stabilize": ["boolean"],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        dim: int = 70,
        *,
        n_steps: int = 5000,
        batch_size: int = 16,
        lr: float = 5e-4,
        dropout: float = 0.1,
        feature_samples: int = 11,
        neg_samples: int = 5,
        n_neighbors: int = 7,
        pos_intra_weight: float = 0.67,
        pos_inter_weight: float = 0.25,
        neg_weight: float = 0.63,
        pos_intra_shift: float = 0.08,
        pos_inter_shift: float = 0.02,
        neg_shift: float = 0.66,
        pointwise: bool = True,
        zero_clamp: bool = True,
        stabilize: bool = False,
        device: str | torch.device | None = "auto",
        random_state: Any = None,
        verbose: bool = False,
        warm_start: bool = False,
    ) -> None:
        self.dim = dim
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.lr = lr
        self.dropout = dropout
        self.feature_samples = feature_samples
        self.neg_samples = neg_samples
        self.n_neighbors = n_neighbors
        self.pos_intra_weight = pos_intra_weight
        self.pos_inter_weight = pos_inter_weight
        self.neg_weight = neg_weight
        self.pos_intra_shift = pos_intra_shift
        self.pos_inter_shift = pos_inter_shift
        self.neg_shift = neg_shift
        self.pointwise = pointwise
        self.zero_clamp = zero_clamp
        self.stabilize = stabilize
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    @classmethod
    def from_preset(cls, name: str, **params: Any) -> StegoProjector:
        """Settings that reproduce a released STEGO checkpoint.

        Parameters
        ----------
        name : {"cocostuff27", "cityscapes", "potsdam"}
            Preset of STEGO.md's table (dim, steps, batch, pointwise,
            weights and shifts).
        **params
            Further parameters (``device``, ``random_state``...), which
            override the preset.

        Returns
        -------
        StegoProjector
            Unfitted estimator.

        Examples
        --------
        >>> from skstego.projection._stego import StegoProjector
        >>> StegoProjector.from_preset("cocostuff27").dim
        90
        """
        if name not in PRESETS:
            raise ValueError(
                f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}."
            )
        return cls(**{**PRESETS[name], **params})

    def save_head(self, path: str | os.PathLike) -> None:
        """Write the trained head to a safetensors file.

        The file holds the six weight matrices of ``head_state_`` under
        their names (1x1 convolution weights as 2-D matrices) and, as
        metadata, the estimator's parameters. It contains no code and no
        pickle: :meth:`load_head` (or any safetensors reader) can open it
        on any machine. Adam's state is not saved; pickle the estimator
        (it holds only NumPy arrays) to continue training later.

        Parameters
        ----------
        path : str or path-like
            Output file, conventionally ``*.safetensors``.

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> from skstego.projection._stego import StegoProjector
        >>> maps = np.random.RandomState(0).rand(6, 8, 4, 4).astype(np.float32)
        >>> stego = StegoProjector(dim=3, n_steps=2, batch_size=4, device="cpu",
        ...                        random_state=0).fit(maps)
        >>> path = os.path.join(tempfile.mkdtemp(), "head.safetensors")
        >>> stego.save_head(path)
        >>> loaded = StegoProjector.load_head(path, device="cpu")
        >>> np.allclose(loaded.transform(maps), stego.transform(maps))
        True
        """
        from safetensors.numpy import save_file

        check_is_fitted(self)
        params = {
            k: v
            for k, v in self.get_params(deep=False).items()
            if isinstance(v, bool | int | float | str) or v is None
        }
        metadata = {
            "format": _HEAD_FORMAT,
            "n_features_in": str(self.n_features_in_),
            "params": json.dumps(params),
        }
        arrays = {
            k: np.ascontiguousarray(self.head_state_[k], dtype=np.float32)
            for k in _PARAM_NAMES
        }
        save_file(arrays, os.fspath(path), metadata=metadata)

    @classmethod
    def load_head(cls, path: str | os.PathLike, **params: Any) -> StegoProjector:
        """A fitted StegoProjector from a saved or a reference head.

        Reads safetensors files written by :meth:`save_head` (their stored
        parameters are restored) and plain weight files of the STEGO
        reference code: a safetensors file or a ``torch.save``'d state dict
        (read with ``weights_only=True``, so no pickled code runs) whose keys
        end in ``cluster1.weight``, ``cluster1.bias``, ``cluster2.0.*`` and
        ``cluster2.2.*`` (any prefix such as ``net.``), or in skstego's names.

        Parameters
        ----------
        path : str or path-like
            Weights file.
        **params
            Estimator parameters (``device``...), overriding stored ones.

        Returns
        -------
        StegoProjector
            Fitted: ``transform`` works at once; ``partial_fit`` continues
            training with a fresh Adam state.

        Raises
        ------
        ValueError
            If the file cannot be read or lacks head weights (the message
            names the file and the keys found).
        """
        path = os.fspath(path)
        state, stored = _read_head_file(path)
        dim, n_features = state["linear.weight"].shape
        est = cls(**{**stored, "dim": int(dim), **params})
        est.head_state_ = state
        est.optimizer_state_ = {"step": np.asarray(0, dtype=np.int64)}
        est.loss_curve_ = np.empty(0, dtype=np.float64)
        est.n_steps_ = est.n_iter_ = 0
        est.n_features_in_ = int(n_features)
        est._n_features_out = int(dim)
        return est

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> StegoProjector:
        """Train the head on feature maps or tokens ``X``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w) or (n_samples, C)
            Feature maps (or tokens, as 1x1 maps); at least 2 samples (an
            image needs another image as its positive partner). On-disk
            input (a :class:`~skstego.features.FeatureStore`, a zarr or dask
            array, a NumPy memmap) is never loaded whole: the K-NN
            descriptors are computed in one chunked pass and every training
            step reads only its batch (and the partners) by fancy indexing.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : StegoProjector
            Fitted estimator.
        """
        first = not (self.warm_start and hasattr(self, "head_state_"))
        X = check_features(self, X, reset=first, min_samples=2, lazy=True)
        self._fit(X, continue_=not first)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: Any, y: Any = None) -> StegoProjector:
        """Train ``n_steps`` more steps on ``X``, from the current head.

        The first call trains from scratch (like :meth:`fit`); later calls
        keep the head and Adam's state, search the K-NN partners within
        ``X`` and append to ``loss_curve_``. Each call draws from a
        generator seeded by ``random_state`` and the number of steps already
        run, so a sequence of calls is reproducible.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w) or (n_samples, C)
            Feature maps or tokens; at least 2 samples.

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : StegoProjector
            The estimator, trained further.
        """
        first = not hasattr(self, "head_state_")
        X = check_features(self, X, reset=first, min_samples=2, lazy=True)
        self._fit(X, continue_=not first)
        return self

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Apply the trained head (no dropout).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (N, C, h, w) or (n_samples, C)
            Feature maps or tokens.

        Returns
        -------
        X_new : ndarray, torch.Tensor or dask.array.Array of shape \
                (N, dim, h, w) or (n_samples, dim)
            Codes, float32; NumPy for NumPy input, torch (on the estimator's
            device) for torch input, a lazy dask array mapped over the chunks
            for dask input (computed on the workers).
        """
        check_is_fitted(self)
        dim = int(self.head_state_["linear.bias"].shape[0])
        if is_dask(X):  # lazy: mapped over the chunks, on the workers
            return map_method(self, "transform", X, dim)
        X = check_features(self, X, reset=False, lazy=True)
        device = self._resolved_device()
        params = self._device_params(device)
        return apply_tokenwise(
            lambda x: _head_tokens(params, x),
            X,
            device=device,
            out_features=dim,
        )

    def _device_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        state = self.head_state_
        return self._cached(
            ("head_state", str(device)),
            state,
            lambda: {
                k: torch.as_tensor(np.asarray(v)).to(device, torch.float32)
                for k, v in state.items()
            },
        )

    def _fit(self, X: np.ndarray | torch.Tensor, continue_: bool = False) -> None:
        device = resolve_device(self.device)
        n, c = int(X.shape[0]), int(X.shape[1])
        generator = make_generator(self.random_state, device)
        done = self.n_steps_ if continue_ else 0
        if done:
            # a fresh, reproducible stream for each continuation
            generator.manual_seed((generator.initial_seed() + 7919 * done) % 2**63)
        if continue_ and int(self.dim) != self.head_state_["linear.bias"].shape[0]:
            raise ValueError(
                f"dim={self.dim} differs from the fitted head's "
                f"{self.head_state_['linear.bias'].shape[0]}; continuing training "
                "(partial_fit, warm_start) needs the same dim."
            )

        # K-NN positives (STEGO.md section 4): pooled, normalised descriptors.
        descriptors = image_descriptors(X, device=device)
        neighbors = nearest_neighbors(descriptors, _KNN_POOL, device=device)
        del descriptors
        n_pool = min(int(self.n_neighbors), neighbors.shape[1])
        neighbors_t = torch.as_tensor(neighbors[:, :n_pool], device=device)

        batch = min(int(self.batch_size), n)
        neg_samples = int(self.neg_samples) if batch >= 2 else 0
        samples = int(self.feature_samples) if X.ndim == 4 else 1
        keep = 1.0 - float(self.dropout)

        if continue_:
            params = {
                k: torch.as_tensor(self.head_state_[k])
                .to(device, torch.float32)
                .requires_grad_(True)
                for k in _PARAM_NAMES
            }
        else:
            params = _init_params(c, int(self.dim), generator, device)
        optimizer = torch.optim.Adam(list(params.values()), lr=float(self.lr))
        if continue_:
            _load_adam(optimizer, params, self.optimizer_state_, device)
        x_index_device = X.device if is_torch(X) else None
        autocast = device.type == "cuda"

        def load(idx: torch.Tensor) -> torch.Tensor:
            if x_index_device is not None:
                xb = X[idx.to(x_index_device)]
            else:
                xb = X[idx.cpu().numpy()]
            xb = as_tensor(xb, device)
            return xb if xb.ndim == 4 else xb[:, :, None, None]

        def masks(b: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if self.dropout == 0:
                return None, None
            u = torch.rand((2, b, c, 1, 1), generator=generator, device=device)
            m = (u < keep).to(torch.float32) / keep
            return m[0], m[1]

        # the loss stays on the device: reading it each step would wait for the
        # GPU; the progress bar reads it only every _REPORT_EVERY steps
        losses = torch.empty(int(self.n_steps), dtype=torch.float32, device=device)
        bar = tqdm(
            range(int(self.n_steps)), disable=not self.verbose, desc="StegoProjector"
        )
        for step in bar:
            idx = torch.randperm(n, generator=generator, device=device)[:batch]
            pick = torch.randint(n_pool, (batch,), generator=generator, device=device)
            partner = neighbors_t[idx, pick]
            both = load(torch.cat([idx, partner]))
            d1, d2 = masks(2 * batch)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                codes = _head_maps(params, both, d1, d2)
                total, _ = stego_loss(
                    both[:batch],
                    codes[:batch],
                    both[batch:],
                    codes[batch:],
                    pos_intra_weight=float(self.pos_intra_weight),
                    pos_inter_weight=float(self.pos_inter_weight),
                    neg_weight=float(self.neg_weight),
                    pos_intra_shift=float(self.pos_intra_shift),
                    pos_inter_shift=float(self.pos_inter_shift),
                    neg_shift=float(self.neg_shift),
                    neg_samples=neg_samples,
                    feature_samples=samples,
                    pointwise=bool(self.pointwise),
                    zero_clamp=bool(self.zero_clamp),
                    stabilize=bool(self.stabilize),
                    generator=generator,
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses[step] = total.detach()
            last = step + 1 == int(self.n_steps)
            if self.verbose and ((step + 1) % _REPORT_EVERY == 0 or last):
                recent = losses[max(0, step + 1 - _REPORT_EVERY) : step + 1]
                bar.set_postfix(loss=f"{float(recent.mean()):.4f}")
        bar.close()
        losses = losses.cpu().numpy().astype(np.float64)

        self.head_state_ = {
            k: v.detach().to("cpu", torch.float32).numpy().copy()
            for k, v in params.items()
        }
        self.optimizer_state_ = _dump_adam(optimizer, params)
        if continue_:
            losses = np.concatenate([self.loss_curve_, losses])
        self.loss_curve_ = losses
        self.n_steps_ = done + int(self.n_steps)
        self.n_iter_ = self.n_steps_
        self._n_features_out = int(self.dim)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        tags.non_deterministic = False
        return tags
