"""DinoFeaturizer: images in, frozen DINO ViT feature maps (N, C, h, w) out.

The backbone is a timm Vision Transformer, frozen and in eval mode. It is built
(and its weights loaded) once per process and device, in a module-level cache,
so that the clones scikit-learn makes (``clone``, ``GridSearchCV``) share it and
pickles of the estimator never contain it.

Images are preprocessed as in the STEGO reference (short side resized to
``resolution``, antialiased bilinear or the reference's exact nearest; center
crop; ImageNet normalisation for DINO weights) on the device, batch by batch,
under :func:`torch.inference_mode` (bf16 autocast on CUDA).
File paths, PIL images and lazy collections are decoded by a small pool of
background threads with a bounded prefetch, overlapping with the forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import re
import socket
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions

from .._device import (
    _DocLinkMixin,
    as_tensor,
    is_torch,
    module_to_host,
    resolve_device,
    same_device,
    to_device,
)
from .._precision import fast_bf16
from ..datasets._collection import _read_image
from ._store import FeatureStore, write_store

__all__ = ["DinoFeaturizer"]

#: Images per batch on the CPU with ``batch_size="auto"``.
CPU_BATCH_SIZE = 16
#: First batch tried on CUDA with ``batch_size="auto"`` at 224 px (scaled by
#: the number of pixels at other resolutions); halved on out-of-memory.
CUDA_BATCH_SIZE_224 = 256
#: Largest number of input values (pixels x channels) loaded at once.
MAX_LOAD_VALUES = 256 * 1024 * 1024
#: Seconds allowed to find out whether the Hugging Face hub is reachable.
HUB_PROBE_TIMEOUT = 3.0
#: Normalisation of every DINO backbone: the ImageNet channel statistics, as
#: in the STEGO reference's ``get_transform`` (``src/utils.py``) and DINO's
#: own training and evaluation transforms.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (model name, pretrained, weights path, weights mtime, device) -> module
_BACKBONES: dict[tuple, torch.nn.Module] = {}
# user module -> {device: the module or its copy on that device}
_MODULE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# (id(module), device, resolution) -> largest batch that ran without OOM
_CUDA_BATCH: dict[tuple, int] = {}
_LOCK = threading.RLock()
_HUB_REACHABLE: list[bool] = []
# (weights path, mtime) -> whether the file is laid out as a DINO checkpoint
_DINO_LAYOUT: dict[tuple[str, int], bool] = {}


class DinoFeaturizer(TransformerMixin, _DocLinkMixin, BaseEstimator):
    """Frozen DINO Vision Transformer feature maps of images.

    A stateless transformer: :meth:`fit` only validates the parameters, and
    :meth:`transform` turns images into the patch-token features of one block
    of a frozen timm ViT, after the final LayerNorm, prefix tokens (class,
    registers) dropped, as maps of shape ``(N, C, h, w)`` with
    ``h = H / p`` and ``w = W / p`` for patch size ``p``. This is the input of
    every reducer and probe of skstego and the backbone of STEGO.

    Parameters
    ----------
    model : str or torch.nn.Module, default="vit_small_patch8_224.dino"
        A timm ViT name (``"vit_small_patch8_224.dino"``,
        ``"vit_base_patch8_224.dino"``, ``"vit_small_patch16_224.dino"``,
        ``"vit_base_patch16_224.dino"``; DINOv2 names with patch 14 work too)
        or a timm ``VisionTransformer`` instance. A name without a tag stands
        for its DINO weights where timm has them: ``"vit_base_patch8_224"``
        is ``"vit_base_patch8_224.dino"`` (timm's own default tag for it is
        another training run, with other statistics); name a tag to get
        other weights, e.g. ``"vit_base_patch16_224.augreg_in21k"``. A module
        is used as given (never copied by :func:`~sklearn.base.clone`, moved
        to another device only through a cached copy, put in eval mode during
        the call); it must support ``forward_intermediates``.

    pretrained : bool, default=True
        Load timm's pretrained weights from the Hugging Face hub (or its local
        cache) for a model name. Offline without cached weights, building the
        backbone fails within seconds with an error explaining how to pass a
        local file instead. Ignored when ``weights`` is given or ``model`` is
        a module.

    weights : str or path-like, default=None
        A local checkpoint for a model name: a ``.safetensors`` file or a
        torch file loaded with ``weights_only=True`` (tensors and plain
        containers only; ``argparse.Namespace`` is allowed too, for the
        ``args`` of DINO training checkpoints, and nothing else). timm state
        dicts and the original DINO checkpoints (backbone weights, or a
        training checkpoint whose ``teacher`` is used; ``module.`` /
        ``backbone.`` prefixes are stripped and timm's conversion applied) are
        accepted. Not allowed with a module as ``model``: load the weights
        into the module instead.

    resolution : int, default=224
        Length the short side of each image is resized to (the reference
        protocol trains at 224 and evaluates at 320). With ``crop="center"``
        it must be a multiple of the model's patch size.

    crop : {"center", "none"}, default="center"
        ``"center"``: center crop ``resolution x resolution`` after the
        resize, so that every image gives an ``(h, w) = (r / p, r / p)`` map.
        ``"none"``: keep the whole image; the resized image's sides are
        rounded to the nearest multiple of the patch size (slightly changing
        the aspect ratio). Images whose maps differ in size then cannot be
        stacked and raise a ValueError.

    interpolation : {"bilinear", "nearest"}, default="bilinear"
        How images are resized. ``"bilinear"``: antialiased bilinear
        interpolation (smooth when shrinking large photos). ``"nearest"``:
        exactly the reference preprocessing, torchvision's
        ``Resize(resolution, NEAREST)`` of PIL images followed by
        ``CenterCrop``: each output pixel copies the input pixel PIL picks
        (the same pixels, bit for bit, for images of any size).

    mean : sequence of 3 floats, default=None
        Per-channel means the [0, 1] RGB images are normalised with,
        ``(x - mean) / std``, each in [0, 1]; give ``std`` too. Overrides the
        model's statistics. ``None``: ImageNet's ``(0.485, 0.456, 0.406)``
        for DINO weights (the reference's normalisation), else the model's
        timm data config; see Notes for which weights count as DINO.

    std : sequence of 3 floats, default=None
        Per-channel standard deviations (finite, positive) to divide by;
        given together with ``mean``. ``None``: ImageNet's
        ``(0.229, 0.224, 0.225)`` for DINO weights, else the model's timm
        data config.

    layer : int, default=-1
        Block whose tokens are returned, Python-style (-1 is the last block,
        -2 the one before). The final norm is applied to any block.

    batch_size : int or "auto", default="auto"
        Images per forward pass. ``"auto"``: 16 on the CPU; on CUDA start at
        256 (at 224 px, scaled by pixel count) and halve on out-of-memory,
        remembering the size that worked for later calls.

    precision : {"auto", "float32", "bfloat16"}, default="auto"
        Compute precision of the backbone: ``"auto"`` is bf16 autocast on
        CUDA GPUs with native bf16 (compute capability >= 8.0: A100, H100,
        L4...) and float32 elsewhere (T4 and V100, where bf16 is emulated and
        slow, and every CPU). ``"bfloat16"`` forces bf16 autocast; on a CPU
        that computes bf16 natively (AVX512-BF16 or AMX) that is an opt-in
        speed-up, about 1.5-1.7x for ViT-S/8 and ViT-B/8 on an AMD Zen 4,
        with features within about 1 % of float32 (of their largest value).
        Outputs are float32 in every case.

    max_tokens : int or None, default=8192
        Largest token grid one image may give (``h * w``). Attention costs
        memory quadratic in it: 8192 tokens (e.g. a 90 x 90 grid, 720 px at
        patch 8) keep one ViT-B image under about 3.2 GiB of attention scores.
        A larger image raises a ``ValueError`` naming its size and the grid
        it would give (with ``crop="none"`` a long, thin strip gives a huge
        grid: a 3 x 4000 px strip at ``resolution=224`` is 28 x 37,333
        tokens); lower ``resolution``, use ``crop="center"`` or raise
        ``max_tokens``. None disables the check.

    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` is CUDA when available.

    verbose : bool or int, default=False
        Show a tqdm progress bar over images.

    Attributes
    ----------
    mean_ : tuple of 3 floats
        The channel means images are normalised with (see ``mean``).

    std_ : tuple of 3 floats
        The channel standard deviations images are normalised with.

    normalization_ : str
        Where ``mean_`` and ``std_`` come from: ``"user"`` (the ``mean`` and
        ``std`` parameters), ``"imagenet (...)"`` (DINO weights; the reason in
        parentheses) or ``"timm data config (...)"`` (the model's own).

    See Also
    --------
    TorchPCA : Reduce the feature maps' channels.
    KMeansProbe : Cluster feature maps into label maps.

    Notes
    -----
    **Inputs.** ``transform`` accepts

    * a NumPy array ``(N, H, W, 3)`` of uint8 (also 1 or 4 channels);
    * a torch tensor ``(N, 3, H, W)``, uint8 or float in [0, 1] (it stays on
      its device if it is on the featurizer's device);
    * a sequence (list, or any lazy indexable collection) of PIL images, file
      paths (``str`` / :class:`pathlib.Path`), ``(H, W, 3)`` / ``(H, W)``
      uint8 arrays or ``(3, H, W)`` tensors, of possibly different sizes.
      Grayscale and RGBA images are converted to RGB (alpha dropped).

    **Output type.** NumPy for NumPy data (a batch array, or a sequence whose
    first image is an array, as a lazy collection of decoded images or the
    lists scikit-learn's splitters make), a torch tensor on the featurizer's
    device for anything else (tensors, PIL images, paths), as in the rest of
    skstego. Always float32.

    **Normalisation.** Unless ``mean`` and ``std`` are given, DINO weights
    are normalised with the ImageNet statistics (as the reference does for
    every backbone) and any other weights with their timm data config.
    Weights count as DINO when

    * ``model`` is a name whose timm tag is ``dino`` (``fb_dino``), given or
      resolved from an untagged name (see ``model``);
    * ``weights`` is a DINO checkpoint: a training checkpoint with ``teacher``
      / ``student`` entries, or a state dict whose keys carry DINO's
      ``backbone.`` (``module.backbone.``) prefix. DINO's released
      backbone-only files look like timm state dicts: name the architecture
      without a tag or with ``.dino`` for them;
    * ``model`` is a module whose timm ``pretrained_cfg`` has a DINO tag (as
      ``timm.create_model("vit_small_patch8_224.dino")`` sets). Other modules
      use :func:`timm.data.resolve_model_data_config` (ImageNet statistics for
      a bare ``VisionTransformer(...)``).

    DINOv2 names keep their timm data config, which is ImageNet's too.

    **Fitting.** Images have no feature count, so ``fit`` sets no
    ``n_features_in_``; it only resolves and records the normalisation
    (``mean_``, ``std_``, ``normalization_``) without building the backbone.
    The featurizer does not need fitting (its ``requires_fit`` tag is False:
    ``transform`` resolves the same statistics from the current parameters)
    and a pickle holds only parameters.

    **Sizes other than the model's.** A backbone loaded by name is created
    with ``dynamic_img_size=True`` (position embeddings resampled bicubically
    to the image's grid, as DINO does). A module passed without that option
    is switched to it only for the calls that need it.

    References
    ----------
    .. [1] M. Hamilton, Z. Zhang, B. Hariharan, N. Snavely and W. T. Freeman,
       "Unsupervised Semantic Segmentation by Distilling Feature
       Correspondences", ICLR 2022; preprocessing in ``get_transform`` of
       ``src/utils.py``, features in ``DinoFeaturizer`` of ``src/modules.py``
       of https://github.com/mhamilton723/STEGO.
    .. [2] M. Caron, H. Touvron, I. Misra, H. Jegou, J. Mairal, P. Bojanowski
       and A. Joulin, "Emerging Properties in Self-Supervised Vision
       Transformers", ICCV 2021 (DINO).

    Examples
    --------
    >>> import numpy as np
    >>> import timm
    >>> from skstego import DinoFeaturizer
    >>> vit = timm.models.VisionTransformer(
    ...     img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2
    ... )
    >>> images = np.zeros((2, 80, 96, 3), dtype=np.uint8)
    >>> featurizer = DinoFeaturizer(vit, resolution=64, device="cpu")
    >>> featurizer.fit_transform(images).shape
    (2, 32, 8, 8)
    >>> DinoFeaturizer(vit, resolution=64, crop="none", device="cpu").transform(
    ...     images
    ... ).shape
    (2, 32, 8, 10)

    The reference's exact preprocessing (nearest resize), and the statistics
    an untagged DINO name is normalised with (``fit`` builds no backbone):

    >>> DinoFeaturizer(
    ...     vit, resolution=64, interpolation="nearest", device="cpu"
    ... ).transform(images).shape
    (2, 32, 8, 8)
    >>> named = DinoFeaturizer("vit_base_patch8_224").fit(images)
    >>> named.mean_, named.std_
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    >>> named.normalization_
    'imagenet (DINO weights of vit_base_patch8_224.dino)'
    >>> DinoFeaturizer(vit, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).fit(
    ...     images
    ... ).normalization_
    'user'
    """

    _parameter_constraints: ClassVar[dict] = {
        "model": [str, torch.nn.Module],
        "pretrained": ["boolean"],
        "weights": [str, os.PathLike, None],
        "resolution": [Interval(Integral, 1, None, closed="left")],
        "crop": [StrOptions({"center", "none"})],
        "interpolation": [StrOptions({"bilinear", "nearest"})],
        "mean": ["array-like", None],
        "std": ["array-like", None],
        "layer": [Integral],
        "batch_size": [
            Interval(Integral, 1, None, closed="left"),
            StrOptions({"auto"}),
        ],
        "precision": [StrOptions({"auto", "float32", "bfloat16"})],
        "max_tokens": [Interval(Integral, 1, None, closed="left"), None],
        "device": [str, torch.device, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        model: str | torch.nn.Module = "vit_small_patch8_224.dino",
        *,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        resolution: int = 224,
        crop: str = "center",
        interpolation: str = "bilinear",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        layer: int = -1,
        batch_size: int | str = "auto",
        precision: str = "auto",
        max_tokens: int | None = 8192,
        device: str | torch.device | None = "auto",
        verbose: bool | int = False,
    ) -> None:
        self.model = model
        self.pretrained = pretrained
        self.weights = weights
        self.resolution = resolution
        self.crop = crop
        self.interpolation = interpolation
        self.mean = mean
        self.std = std
        self.layer = layer
        self.batch_size = batch_size
        self.precision = precision
        self.max_tokens = max_tokens
        self.device = device
        self.verbose = verbose

    def __sklearn_clone__(self) -> DinoFeaturizer:
        # A module passed as ``model`` is a frozen, shared resource: clones use
        # the same object (scikit-learn would deep-copy it at every clone).
        params = self.get_params(deep=False)
        new_params = {
            name: value
            if isinstance(value, torch.nn.Module)
            else clone(value, safe=False)
            for name, value in params.items()
        }
        return type(self)(**new_params)

    def __getstate__(self) -> dict:
        # A module passed as ``model`` travels on the CPU (a copy when it is
        # on a GPU; the user's module is never moved), so that the pickle
        # (a dask worker's copy, a joblib cache) loads on machines without
        # that device; transform moves it to the device resolved there.
        state = super().__getstate__()
        if isinstance(state.get("model"), torch.nn.Module):
            state = {**state, "model": module_to_host(state["model"])}
        return state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any = None) -> DinoFeaturizer:
        """Validate the parameters and resolve the normalisation statistics.

        Nothing is learnt and no backbone is built: ``fit`` records the
        statistics :meth:`transform` normalises images with in ``mean_``,
        ``std_`` and ``normalization_``.

        Parameters
        ----------
        X : Ignored
            Images; not used (the backbone is frozen).

        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : DinoFeaturizer
            The featurizer itself.
        """
        stats = _normalization(self)
        self.mean_, self.std_, self.normalization_ = stats
        return self

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Compute the feature maps of images.

        Parameters
        ----------
        X : ndarray of shape (N, H, W, 3), torch.Tensor of shape (N, 3, H, W) \
                or sequence of images
            uint8 NumPy images, uint8 or [0, 1] float tensors, or a sequence of
            PIL images, file paths or per-image arrays (sizes may differ).

        Returns
        -------
        maps : ndarray or torch.Tensor of shape (N, C, h, w), float32
            NumPy for NumPy input, torch on the featurizer's device otherwise.
        """
        self._validate_params()
        _check_dense_output(self)
        stats = _normalization(self)
        device = resolve_device(self.device)
        backbone = get_backbone(self.model, self.pretrained, self.weights, device)
        return _featurize(self, backbone, X, device, stats)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the output channels: ``dino0`` ... ``dino{C-1}``.

        ``C`` is the backbone's embedding width (``embed_dim``), read from
        the module, or for a model name from its architecture built on
        PyTorch's ``meta`` device (no weights loaded, no forward pass, no
        download). The featurizer needs no fit, so this works unfitted too,
        and ``Pipeline([DinoFeaturizer(), ...]).get_feature_names_out()``
        works through it.

        Parameters
        ----------
        input_features : None
            Ignored (images have no feature names); present for API
            consistency.

        Returns
        -------
        feature_names_out : ndarray of str objects of shape (C,)
            ``["dino0", ..., "dino{C-1}"]``: one name per channel of the maps.
        """
        self._validate_params()
        width = _embed_width(self.model)
        return np.asarray([f"dino{i}" for i in range(width)], dtype=object)

    def transform_to_store(
        self,
        images: Any,
        path: str | os.PathLike,
        *,
        dtype: str = "float16",
        chunk_images: int = 64,
        overwrite: bool = False,
        client: Any = None,
    ) -> FeatureStore:
        """Write the feature maps of images into a chunked zarr store on disk.

        Images are featurized ``chunk_images`` at a time and each chunk is
        written, then marked done, so the maps never need to fit in memory.
        After an interruption, calling again with the same arguments computes
        only the chunks not yet done. Needs zarr (``pip install
        skstego[store]``).

        Parameters
        ----------
        images : ndarray, torch.Tensor or sequence of images
            As for :meth:`transform`. A lazy collection (e.g.
            :class:`~skstego.datasets.ImageCollection`) is read chunk by
            chunk.
        path : str or path-like
            Directory of the store (created). The featurizer's parameters and
            the images' file paths (when the source has them; else None) and
            count are recorded as its attributes.
        dtype : {"float16", "float32"}, default="float16"
            Storage dtype; float16 halves the disk space (relative rounding
            error below 5e-4). Reads return float32.
        chunk_images : int, default=64
            Images per chunk: the unit of computation, of storage and of
            resumption.
        overwrite : bool, default=False
            Replace an existing store at ``path``. Without it, a store written
            with other featurizer parameters, images, ``dtype`` or
            ``chunk_images`` raises a ValueError (a path holding anything other
            than a feature store is never overwritten).
        client : distributed.Client, default=None
            Featurize on a Dask cluster: the unfinished chunks are split among
            the client's workers, each chunk a task that featurizes its images
            and writes them straight into the store, then marks the chunk done
            (a zarr chunk is the unit of work, so writes never overlap). The
            featurizer is sent once to each worker, which builds ONE backbone
            and reuses it for all its chunks. ``path`` and image files must be
            reachable by the workers under the same names (a shared file
            system); lists of paths travel chunk by chunk, other lazy sources
            once per worker. With ``device="auto"`` each worker uses its GPU
            when it has one: start one worker per GPU with
            ``dask_cuda.LocalCUDACluster()``. If chunks fail (an unreadable
            image, a lost worker), the others still finish and a RuntimeError
            names the first failure; rerunning resumes as on one machine.
            Needs zarr and distributed (``pip install
            "skstego[store,dask]"``).

        Returns
        -------
        store : FeatureStore
            The finished store, opened read-only.

        Examples
        --------
        >>> import tempfile
        >>> import numpy as np
        >>> import timm
        >>> from skstego import DinoFeaturizer, TorchPCA
        >>> vit = timm.models.VisionTransformer(
        ...     img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
        ... )
        >>> images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
        >>> featurizer = DinoFeaturizer(vit, resolution=32, device="cpu")
        >>> path = tempfile.mkdtemp() + "/features.zarr"
        >>> store = featurizer.transform_to_store(images, path, chunk_images=2)
        >>> store.shape
        (4, 16, 4, 4)
        >>> TorchPCA(dim=3, device="cpu").fit(store).components_.shape
        (3, 16)
        """
        if client is not None and is_torch(images) and images.device.type != "cpu":
            # chunks of images are pickled to the workers: on the CPU (one
            # synchronous copy), never with the device index of this process
            images = images.detach().cpu()
        return write_store(
            self,
            images,
            path,
            dtype=dtype,
            chunk_images=chunk_images,
            overwrite=overwrite,
            client=client,
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.transformer_tags.preserves_dtype = []
        tags.non_deterministic = False
        return tags


def _check_dense_output(estimator: Any) -> None:
    """Raise clearly when a container output (pandas, polars) is configured.

    ``set_output`` is available (so that pipelines can configure all their
    steps) but only applies to 2-D outputs, and the featurizer returns 4-D
    maps, which no DataFrame can hold.
    """
    from sklearn.utils._set_output import _get_output_config

    dense = _get_output_config("transform", estimator)["dense"]
    if dense != "default":
        raise ValueError(
            f"{type(estimator).__name__} returns 4-D feature maps (N, C, h, w), "
            f"which cannot be output as {dense!r} (set_output applies to 2-D "
            'outputs only). Use set_output(transform="default") for this step, '
            "and a container output on a later step that returns 2-D tokens."
        )


def _embed_width(model: str | torch.nn.Module) -> int:
    """Channel count ``C`` of the backbone's maps, without a forward pass."""
    if isinstance(model, torch.nn.Module):
        _check_vit(model, type(model).__name__)
        return int(getattr(model, "embed_dim", None) or model.num_features)
    return _named_width(resolve_model_name(model))


@functools.cache
def _named_width(name: str) -> int:
    with torch.device("meta"):
        net = _create(name, pretrained=False)
    return int(getattr(net, "embed_dim", None) or net.num_features)


# --------------------------------------------------------------------------
# backbone: building, loading, caching
# --------------------------------------------------------------------------
def get_backbone(
    model: str | torch.nn.Module,
    pretrained: bool,
    weights: str | os.PathLike | None,
    device: torch.device,
) -> torch.nn.Module:
    """Return the frozen backbone for these parameters, built once per process."""
    if isinstance(model, torch.nn.Module):
        if weights is not None:
            raise ValueError(_MODULE_WEIGHTS)
        _check_vit(model, type(model).__name__)
        current = next(model.parameters(), torch.empty(0)).device
        if same_device(current, device):
            return model
        with _LOCK:  # a frozen copy per other device (never referencing model)
            copies = _MODULE_COPIES.setdefault(model, {})
            if str(device) not in copies:
                copies[str(device)] = _frozen(_deepcopy(model).to(device))
            return copies[str(device)]
    model = resolve_model_name(model)
    if weights is not None:
        path = _weights_path(weights)
        key = (model, False, str(path), path.stat().st_mtime_ns, str(device))
    else:
        key = (model, bool(pretrained), None, None, str(device))
    with _LOCK:
        if key not in _BACKBONES:
            net = _create(model, pretrained=bool(pretrained) and weights is None)
            if weights is not None:
                load_weights(net, path)
            _BACKBONES[key] = _frozen(net.to(device))
        return _BACKBONES[key]


_MODULE_WEIGHTS = (
    "weights= applies to a model name; a module passed as model is used as "
    "given. Load the checkpoint into the module yourself (e.g. "
    "module.load_state_dict(...)), or pass the timm name of its architecture "
    "as model together with weights=."
)


def _weights_path(weights: str | os.PathLike) -> Path:
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(weights)!r} does not exist (resolved to {path})."
        )
    return path


def _deepcopy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


def _frozen(net: torch.nn.Module) -> torch.nn.Module:
    net.eval()
    net.requires_grad_(False)
    return net


def _check_vit(net: Any, what: str) -> None:
    needed = ("forward_intermediates", "patch_embed", "blocks", "num_prefix_tokens")
    missing = [name for name in needed if not hasattr(net, name)]
    if missing:
        raise ValueError(
            f"model {what} is not a timm Vision Transformer (it lacks "
            f"{', '.join(missing)}); pass a timm ViT name such as "
            "'vit_small_patch8_224.dino' or a timm.models.VisionTransformer."
        )


def _create(name: str, *, pretrained: bool) -> torch.nn.Module:
    import timm

    name = resolve_model_name(name)
    kwargs = {"num_classes": 0, "dynamic_img_size": True}
    if not pretrained:
        net = _create_model(timm, name, False, kwargs)
    else:
        offline = _hub_offline()
        try:
            with _forced_offline(offline):
                net = _create_model(timm, name, True, kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            why = (
                "the Hugging Face hub is unreachable (offline)"
                if offline
                else "downloading them failed"
            )
            raise RuntimeError(
                f"Could not load the pretrained weights of {name!r}: {why} and "
                "they are not in the local cache. Pass a local checkpoint with "
                'DinoFeaturizer(..., weights="path/to/file.pth" or ".safetensors"), '
                "or pretrained=False for a randomly initialised backbone. "
                f"(Cause: {type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
    _check_vit(net, repr(name))
    return net


def _create_model(timm: Any, name: str, pretrained: bool, kwargs: dict):
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:  # not a ViT: no dynamic_img_size option
        raise ValueError(
            f"model={name!r} is not a timm Vision Transformer ({exc})."
        ) from exc


def _hub_offline() -> bool:
    """True when the hub is off (HF_HUB_OFFLINE) or not reachable within seconds."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on it
        return False
    if constants.is_offline_mode():
        return True
    if not _HUB_REACHABLE:
        _HUB_REACHABLE.append(_probe(constants.ENDPOINT))
    return not _HUB_REACHABLE[0]


def _probe(endpoint: str) -> bool:
    """Can a TCP connection to the hub be opened within HUB_PROBE_TIMEOUT?"""
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or 443
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
            result.append(True)
        except OSError:
            result.append(False)

    # DNS lookups ignore socket timeouts: bound the whole probe with a thread.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _forced_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode (no retries) for the block."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# --------------------------------------------------------------------------
# model names and normalisation statistics
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def resolve_model_name(name: str) -> str:
    """The timm name a model name stands for: an untagged name -> its DINO tag.

    ``"vit_base_patch8_224"`` -> ``"vit_base_patch8_224.dino"``: timm's default
    tag of an untagged name is often another training run (augreg, with
    mean = std = 0.5), while a DINO featurizer means DINO's weights. Names
    without a DINO tag, and tagged names, are returned unchanged. Unknown
    names and unknown tags raise a ValueError.
    """
    import timm
    from timm.models import split_model_name_tag

    if not timm.is_model(name):
        raise ValueError(
            f"model={name!r} is not a timm model name; DINO backbones are "
            "'vit_small_patch8_224.dino', 'vit_base_patch8_224.dino', "
            "'vit_small_patch16_224.dino' and 'vit_base_patch16_224.dino' "
            "(see timm.list_models('*dino*'))."
        )
    arch, tag = split_model_name_tag(name)
    if tag:
        if timm.models.get_pretrained_cfg(arch) is not None and not (
            timm.list_pretrained(name)
        ):
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
            raise ValueError(
                f"model={name!r}: timm has no pretrained tag {tag!r} for {arch} "
                f"(its tags: {', '.join(tags) or 'none'})."
            )
        return name
    for dino_tag in ("dino", "fb_dino"):
        if timm.list_pretrained(f"{arch}.{dino_tag}"):
            return f"{arch}.{dino_tag}"
    return name


def _is_dino_tag(tag: str | None) -> bool:
    return tag in ("dino", "fb_dino")


class _Statistics(NamedTuple):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def _normalization(est: DinoFeaturizer) -> _Statistics:
    """The statistics ``est`` normalises images with, and where they come from.

    Cheap: reads model names' timm configs (and, for a weights file given
    with a name that is not DINO's, the file's keys), never builds a model.
    """
    model, weights = est.model, est.weights
    if isinstance(model, torch.nn.Module) and weights is not None:
        raise ValueError(_MODULE_WEIGHTS)
    user = _user_statistics(est.mean, est.std)
    path = None if weights is None else _weights_path(weights)
    name = None if isinstance(model, torch.nn.Module) else resolve_model_name(model)
    if user is not None:
        return _Statistics(*user, "user")
    if name is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if not isinstance(cfg, dict):  # a timm PretrainedCfg
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
        if _is_dino_tag(cfg.get("tag")):
            what = f"{cfg.get('architecture')}.{cfg.get('tag')}"
            source = f"imagenet (DINO weights of the {what} module)"
            return _Statistics(IMAGENET_MEAN, IMAGENET_STD, source)
        import timm.data

        config = timm.data.resolve_model_data_config(model)
        return _Statistics(
            _triple(config["mean"]),
            _triple(config["std"]),
            f"timm data config (module {type(model).__name__})",
        )
    import timm

    tag = name.split(".", 1)[1] if "." in name else None
    if _is_dino_tag(tag):
        return _Statistics(
            IMAGENET_MEAN, IMAGENET_STD, f"imagenet (DINO weights of {name})"
        )
    if path is not None and _is_dino_checkpoint(path):
        return _Statistics(
            IMAGENET_MEAN, IMAGENET_STD, f"imagenet (DINO checkpoint {path.name})"
        )
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:  # an architecture without pretrained weights: timm's default
        mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
        shown = name
    else:
        mean, std = cfg.mean, cfg.std
        shown = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    return _Statistics(_triple(mean), _triple(std), f"timm data config ({shown})")


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _user_statistics(
    mean: Any, std: Any
) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """Validate the ``mean`` / ``std`` parameters; None when neither is set."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise ValueError(
            f"{given} is set but {missing} is not: pass both mean and std (3 "
            "values each, for [0, 1] RGB images), or neither to use the model's "
            "statistics."
        )
    checked = []
    for what, value in (("mean", mean), ("std", std)):
        try:
            array = np.asarray(
                value.detach().cpu() if is_torch(value) else value, dtype=np.float64
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{what} must be 3 numbers (one per RGB channel), got {value!r}."
            ) from exc
        if array.shape != (3,):
            raise ValueError(
                f"{what} must be 3 numbers (one per RGB channel), got {value!r} "
                f"(shape {array.shape})."
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{what} must be finite, got {value!r}.")
        checked.append(_triple(array.tolist()))
    mean_t, std_t = checked
    if min(std_t) <= 0:
        raise ValueError(f"std must be positive, got {std!r}.")
    if not all(0.0 <= m <= 1.0 for m in mean_t):
        raise ValueError(
            f"mean must lie in [0, 1] (images are scaled to [0, 1] before they "
            f"are normalised), got {mean!r}; divide 0-255 statistics by 255."
        )
    return mean_t, std_t


def _is_dino_checkpoint(path: Path) -> bool:
    """Whether a weights file is laid out as a DINO checkpoint (cached).

    A DINO training checkpoint holds ``teacher`` / ``student`` state dicts;
    DINO's wrapped models name their backbone ``backbone.`` (``module.backbone.``
    under DistributedDataParallel). Backbone-only files look like timm's and
    are not recognised here.
    """
    key = (str(path), path.stat().st_mtime_ns)
    with _LOCK:
        if key not in _DINO_LAYOUT:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    with safe_open(str(path), framework="pt") as file:
                        keys = list(file.keys())
                except Exception as exc:
                    raise ValueError(
                        f"Could not read the weights file {str(path)!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                _DINO_LAYOUT[key] = _dino_layout({k: None for k in keys})
            else:
                _DINO_LAYOUT[key] = _dino_layout(_read_checkpoint(path, mmap=True))
        return _DINO_LAYOUT[key]


def _dino_layout(state: Any) -> bool:
    if not isinstance(state, dict):
        return False
    if isinstance(state.get("teacher"), dict) or isinstance(state.get("student"), dict):
        return True
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return any(
        isinstance(k, str) and k.startswith(("backbone.", "module.backbone."))
        for k in state
    )


def _read_checkpoint(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load`` a file safely: tensors, containers and argparse.Namespace."""
    _check_torch_file(path)
    try:
        # DINO training checkpoints pickle their command line as
        # argparse.Namespace under "args": the one class allowed besides
        # torch's weights-only set.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(
                    str(path), map_location="cpu", weights_only=True, mmap=mmap
                )
            except RuntimeError:
                if not mmap:
                    raise
                # files in the legacy (non-zip) format cannot be memory-mapped
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if not found:
            # not a checkpoint torch can parse; torch's message would advise
            # weights_only=False, which skstego never does
            raise ValueError(_not_a_checkpoint(path, _unpickler_reason(exc))) from None
        what = f" (it names {found.group(1)})"
        raise ValueError(
            f"Refusing to read the weights file {str(path)!r}: it holds objects "
            f"other than tensors, plain containers and argparse.Namespace{what}, "
            "and unpickling them could run code. Save the state dict alone "
            "(torch.save(model.state_dict(), path)) or as .safetensors; skstego "
            "never loads checkpoints with weights_only=False."
        ) from exc
    except Exception as exc:
        if isinstance(exc, (KeyError, EOFError, UnicodeDecodeError)):
            # what torch's unpickler raises on bytes that are no pickle
            raise ValueError(
                _not_a_checkpoint(path, f"{type(exc).__name__}: {exc}")
            ) from None
        raise ValueError(
            f"Could not read the weights file {str(path)!r}: {type(exc).__name__}: "
            f"{_without_torch_advice(str(exc))}"
        ) from exc


#: How the files torch.save writes begin: a zip archive (PyTorch >= 1.6) or
#: a pickle (protocol 2 or later: the legacy format)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _not_a_checkpoint(path: Path, why: str, what: str = "weights file") -> str:
    return (
        f"The {what} {str(path)!r} is not a PyTorch checkpoint "
        f"({why}): pass a file written by torch.save (.pth, .pt) or a "
        ".safetensors file, e.g. the DINO checkpoint downloaded from "
        "https://github.com/facebookresearch/dino (a Git LFS pointer or an "
        "HTML error page is not the file itself)."
    )


def _check_torch_file(path: Path, what: str = "weights file") -> None:
    """Refuse a file that cannot be a torch checkpoint, naming what it starts with."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return  # torch.load reports it
    if not head:
        raise ValueError(_not_a_checkpoint(path, "the file is empty", what))
    if not head.startswith(_TORCH_MAGIC):
        text = head.split(b"\n")[0][:40].decode("utf-8", "replace")
        raise ValueError(_not_a_checkpoint(path, f"it begins with {text!r}", what))


def _unpickler_reason(exc: BaseException) -> str:
    """The unpickler's own complaint in torch's weights-only error message."""
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", str(exc))
    return found.group(1).strip() if found else "it cannot be unpickled"


def _without_torch_advice(text: str) -> str:
    """``text`` without torch's advice to set weights_only=False."""
    if "weights_only" not in text:
        return text
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return found.group(1).strip() if found else "torch.load refused it"


def load_weights(net: torch.nn.Module, path: Path) -> None:
    """Load a local timm or DINO checkpoint into ``net`` (safely, strictly)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise ValueError(
                f"Could not read the weights file {str(path)!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    else:
        state = _read_checkpoint(path)
    with _LOCK:
        _DINO_LAYOUT[(str(path), path.stat().st_mtime_ns)] = _dino_layout(state)
    load_backbone_state(net, _unwrap_state_dict(state, path), repr(str(path)))


def load_backbone_state(
    net: torch.nn.Module, state: dict[str, torch.Tensor], where: str
) -> None:
    """Load a backbone state dict (DINO or timm key names) into ``net``.

    timm's ViT conversion is applied; DINO's projection head and a classifier
    are left out; every other missing or unexpected key raises a ValueError
    that names ``where`` (the file, or the file and the part of it).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(state, net)
    except Exception as exc:
        raise ValueError(f"The weights in {where} do not fit the model: {exc}") from exc
    expected = set(net.state_dict())
    # DINO's projection head (and a classifier) are not part of the backbone.
    state = {
        k: v for k, v in state.items() if k in expected or not k.startswith("head")
    }
    missing = sorted(expected - set(state) - {"head.weight", "head.bias"})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The weights in {where} do not match the model: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Check the model name."
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(
            f"The weights in {where} do not match the model: {exc}"
        ) from exc


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the backbone state dict in a checkpoint; strip wrapper prefixes."""
    for key in ("teacher", "state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(
            f"The weights file {str(path)!r} does not hold a state dict of tensors."
        )
    prefixes = ("module.", "backbone.", "_orig_mod.")
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if state and all(
                k.startswith(prefix) or k.startswith("head") for k in state
            ):
                if any(k.startswith(prefix) for k in state):
                    state = {
                        k.removeprefix(prefix): v
                        for k, v in state.items()
                        if k.startswith(prefix)
                    }
                    changed = True
    return state


# --------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------
def _check_batch(X: Any) -> np.ndarray | torch.Tensor:
    """Validate an image batch: (N, H, W, C) NumPy or (N, C, H, W) tensor."""
    if isinstance(X, np.ndarray):
        if X.ndim != 4 or X.shape[-1] not in (1, 3, 4):
            if X.ndim == 4 and X.shape[1] in (1, 3, 4):
                fix = "for channels-first images use X.transpose(0, 2, 3, 1)"
            elif X.ndim == 3 and X.shape[-1] in (1, 3, 4):
                fix = "for one image use X[None]"
            else:
                fix = "channels last: 3 (RGB), 1 (grey) or 4 (RGBA)"
            raise ValueError(
                "Expected NumPy images of shape (N, H, W, 3) (or 1 / 4 channels), "
                f"got an array of shape {X.shape}; {fix}."
            )
        if X.dtype != np.uint8:
            if X.dtype.kind == "f":
                fix = (
                    "convert [0, 1] floats with (X * 255).round().astype(np.uint8), "
                    "or pass a float torch tensor (N, 3, H, W) in [0, 1]"
                )
            elif X.dtype.kind == "b":
                fix = "convert a mask with X.astype(np.uint8) * 255"
            elif X.dtype.kind in "iu":
                fix = "convert 0-255 integers with X.astype(np.uint8)"
            else:
                fix = "pass uint8 RGB values in 0-255"
            raise ValueError(
                f"Expected uint8 NumPy images, got dtype {X.dtype}; {fix}."
            )
    else:
        if X.ndim != 4 or X.shape[1] not in (1, 3, 4):
            fix = (
                "; for channels-last images use X.permute(0, 3, 1, 2)"
                if X.ndim == 4 and X.shape[-1] in (1, 3, 4)
                else "; for one image use X[None]"
                if X.ndim == 3 and X.shape[0] in (1, 3, 4)
                else ""
            )
            raise ValueError(
                "Expected a tensor of images of shape (N, 3, H, W) (or 1 / 4 "
                f"channels), got shape {tuple(X.shape)}{fix}."
            )
        if X.dtype != torch.uint8 and not X.is_floating_point():
            raise ValueError(
                f"Expected a uint8 or floating-point tensor, got dtype {X.dtype}."
            )
    if X.shape[0] < 1 or X.shape[-1] < 1 or X.shape[-2] < 1:
        raise ValueError(f"Found no images (shape {tuple(X.shape)}).")
    return X


def _to_chw(image: Any, where: str) -> torch.Tensor:
    """One image (path, PIL, array, tensor) -> (3, H, W) uint8/float CPU tensor."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        # the collections' reader: RGB uint8, .mat and 16-bit files, the path
        # named in FileNotFoundError / OSError
        image = _read_image(os.fspath(image))
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"Expected uint8 image arrays, got dtype {image.dtype} ({where})."
            )
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(
                "Expected an image array of shape (H, W, 3), (H, W) or "
                f"(H, W, 1 / 4), got {image.shape} ({where})."
            )
        with warnings.catch_warnings():
            # read-only arrays (PIL buffers, memory maps) are never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not")
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return _rgb(chw)
    if is_torch(image):
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(
                "Expected an image tensor of shape (3, H, W), got "
                f"{tuple(image.shape)} ({where})."
            )
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"Expected a uint8 or float tensor, got {image.dtype}.")
        return _rgb(image)
    raise ValueError(
        f"Cannot read {type(image).__name__} as an image ({where}); pass file "
        "paths, PIL images, (H, W, 3) uint8 arrays or (3, H, W) tensors."
    )


def _rgb(chw: torch.Tensor) -> torch.Tensor:
    """Grayscale -> 3 channels; RGBA -> RGB (alpha dropped). Channels first."""
    if chw.shape[0] == 1:
        return chw.expand(3, -1, -1)
    return chw[:3]


# --------------------------------------------------------------------------
# preprocessing and forward
# --------------------------------------------------------------------------
def _target_size(
    h: int, w: int, resolution: int, crop: str, patch: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(resized size, crop box (top, left) or None) for one image.

    With ``crop="center"``, the sizes of torchvision's ``Resize(resolution)``
    (short side to ``resolution``, long side truncated) and the box of its
    ``CenterCrop(resolution)`` (offsets rounded half to even), as in the
    reference preprocessing.
    """
    short = min(h, w)
    if crop == "center":
        if h <= w:
            size = (resolution, int(resolution * w / h))
        else:
            size = (int(resolution * h / w), resolution)
        top = round((size[0] - resolution) / 2.0)
        left = round((size[1] - resolution) / 2.0)
        return size, (top, left)
    scale = resolution / short
    size = tuple(
        max(p, round(s * scale / p) * p) for s, p in zip((h, w), patch, strict=True)
    )
    return size, None


@functools.lru_cache(maxsize=1024)
def _nearest_index(n_in: int, n_out: int) -> tuple[int, ...]:
    """Input pixel copied to each output pixel by PIL's nearest resize.

    PIL (``ImagingScaleAffine``, used by ``Image.resize(..., NEAREST)`` and so
    by the reference's torchvision ``Resize``) starts at half a step and adds
    the step ``n_in / n_out`` once per output pixel in double precision,
    truncating each position. The accumulated rounding makes it differ from
    ``floor((i + 0.5) * n_in / n_out)`` (torch's ``"nearest-exact"``) at some
    sizes, so it is replayed here step by step.
    """
    step = n_in / n_out
    position = step * 0.5
    index = []
    for _ in range(n_out):
        index.append(min(int(position), n_in - 1))
        position += step
    return tuple(index)


@functools.lru_cache(maxsize=1024)
def _nearest_take(
    n_in: int, n_out: int, start: int, stop: int, device: str
) -> torch.Tensor | None:
    """Index tensor of output pixels ``start:stop`` (None: the identity)."""
    index = _nearest_index(n_in, n_out)[start:stop]
    if index == tuple(range(n_in)):
        return None
    return torch.tensor(index, dtype=torch.long, device=device)


def _check_tokens(
    image: tuple[int, int], size: tuple[int, int], runner: _Runner
) -> None:
    """Refuse an image whose token grid exceeds the runner's ``max_tokens``."""
    grid = (size[0] // runner.patch[0], size[1] // runner.patch[1])
    limit = runner.max_tokens
    if limit is not None and grid[0] * grid[1] > limit:
        raise ValueError(
            f"An image of {image[0]} x {image[1]} px would give a {grid[0]} x "
            f"{grid[1]} token grid ({grid[0] * grid[1]:,} tokens) at "
            f"resolution={runner.resolution}, crop={runner.crop!r}, more than "
            f"max_tokens={limit:,} (attention memory grows with its square): "
            "lower the resolution, use crop='center', or raise max_tokens."
        )


def _resize_crop(x: torch.Tensor, runner: _Runner) -> torch.Tensor:
    """(B, 3, H, W) uint8 or [0, 1] float on the device -> [0, 1] float32 at
    the target size: short side resized (bilinear antialiased, or PIL's
    nearest), then center cropped or rounded to multiples of the patch size."""
    h, w = x.shape[-2:]
    size, box = _target_size(h, w, runner.resolution, runner.crop, runner.patch)
    r = runner.resolution
    _check_tokens((h, w), size if box is None else (r, r), runner)
    if runner.interpolation == "nearest":
        # a gather of the pixels PIL copies, of the cropped part only
        top, left = box if box is not None else (0, 0)
        rows = size[0] if box is None else r
        cols = size[1] if box is None else r
        take_rows = _nearest_take(h, size[0], top, top + rows, str(x.device))
        take_cols = _nearest_take(w, size[1], left, left + cols, str(x.device))
        if take_rows is not None:
            x = x.index_select(-2, take_rows)
        if take_cols is not None:
            x = x.index_select(-1, take_cols)
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if size != (h, w):
        x = F.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=True
        )
    if box is not None:
        top, left = box
        x = x[..., top : top + r, left : left + r]
    return x


@contextlib.contextmanager
def _any_size(net: torch.nn.Module, size: tuple[int, int]) -> Iterator[None]:
    """Let a fixed-size timm ViT take ``size`` (as ``dynamic_img_size=True``)."""
    pe = net.patch_embed
    native = getattr(pe, "img_size", None)
    if (
        getattr(net, "dynamic_img_size", True)
        or native is None
        or tuple(native) == size
    ):
        yield
        return
    from timm.layers import Format

    saved = (net.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt)
    with _LOCK:
        net.dynamic_img_size = True
        pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format.NHWC
        try:
            yield
        finally:
            net.dynamic_img_size = saved[0]
            pe.strict_img_size, pe.flatten, pe.output_fmt = saved[1:]


class _Runner:
    """Forward passes of one backbone with the featurizer's settings."""

    def __init__(
        self,
        est: DinoFeaturizer,
        net: torch.nn.Module,
        device: torch.device,
        stats: _Statistics | None = None,
    ) -> None:
        self.net, self.device = net, device
        self.resolution, self.crop = int(est.resolution), est.crop
        self.interpolation = est.interpolation
        self.max_tokens = getattr(est, "max_tokens", 8192)
        patch = net.patch_embed.patch_size
        self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if self.crop == "center" and any(self.resolution % q for q in self.patch):
            q = self.patch[0]
            lower, upper = self.resolution // q * q, -(-self.resolution // q) * q
            # never suggest 0 (a resolution below one patch)
            choices = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(
                f"resolution={self.resolution} is not a multiple of the patch size "
                f"{q} of this model, so a center crop cannot be cut into patches; "
                f"use e.g. {choices} (or crop='none')."
            )
        n_blocks = len(net.blocks)
        layer = int(est.layer)
        if not -n_blocks <= layer < n_blocks:
            raise ValueError(
                f"layer={layer} is out of range for a model with {n_blocks} blocks "
                f"(use -{n_blocks} to {n_blocks - 1})."
            )
        self.layer = layer % n_blocks
        if stats is None:
            stats = _normalization(est)
        self.mean = torch.tensor(stats.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(stats.std, device=device).view(1, 3, 1, 1)
        bf16 = est.precision == "bfloat16" or (
            est.precision == "auto" and fast_bf16(device)
        )
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.auto_batch = est.batch_size == "auto"
        if not self.auto_batch:
            self.batch_size = int(est.batch_size)
        elif device.type == "cuda":
            self.batch_key = (id(net), str(device), self.resolution, self.crop)
            default = CUDA_BATCH_SIZE_224 * 224**2 // self.resolution**2
            self.batch_size = _CUDA_BATCH.get(self.batch_key, max(1, default))
        else:
            self.batch_size = CPU_BATCH_SIZE

    def run(
        self,
        n: int,
        prepare: Callable[[int, int], torch.Tensor],
        emit: Callable[[int, int, torch.Tensor], None],
    ) -> None:
        """Feature maps of items ``0:n`` in batches, with the OOM back-off.

        For each batch ``start:stop``, ``prepare(start, stop)`` puts its
        images on the device (upload, resize, crop), the backbone runs, and
        ``emit(start, stop, maps)`` stores the maps. With
        ``batch_size="auto"`` on CUDA an out-of-memory error in any of the
        three halves the batch and retries it, so every allocation of a
        batch (resize and output included) is covered.
        """
        start = 0
        while start < n:
            stop = min(start + self.batch_size, n)
            out_of_memory = False
            try:
                emit(start, stop, self._forward(prepare(start, stop)))
            except torch.cuda.OutOfMemoryError:
                auto = self.auto_batch and self.device.type == "cuda"
                if not auto or self.batch_size == 1:
                    raise
                out_of_memory = True
            if out_of_memory:  # outside the handler: the failed batch is freed
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                _CUDA_BATCH[self.batch_key] = self.batch_size
                continue
            start = stop

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Resized [0, 1] images (B, 3, H, W) on the device -> (B, C, h, w)."""
        outputs: list[torch.Tensor] = []
        self.run(
            x.shape[0],
            lambda start, stop: x[start:stop],
            lambda start, stop, maps: outputs.append(maps),
        )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.mean) / self.std).contiguous()
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        net = self.net
        training = net.training
        net.eval()
        try:
            with torch.inference_mode(), autocast, _any_size(net, tuple(x.shape[-2:])):
                (maps,) = net.forward_intermediates(
                    x,
                    indices=[self.layer],
                    norm=True,
                    stop_early=True,
                    output_fmt="NCHW",
                    intermediates_only=True,
                )
        finally:
            if training:
                net.train(training)
        return maps.float()


class _Load(NamedTuple):
    """Images read but not yet on the device, and where their maps go.

    ``prepare(start, stop)`` uploads images ``start:stop`` of the load to the
    device and resizes them: device work, run inside the OOM back-off.
    """

    positions: list[int]
    prepare: Callable[[int, int], torch.Tensor]


class _Output:
    """The (N, C, h, w) result, allocated once and filled batch by batch.

    NumPy output is a pageable host array: each batch is copied into it
    synchronously (no pinned memory, nothing to wait for later, no final
    concatenation holding the maps twice). Torch output is allocated on the
    device of the first batch and filled in place.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.numpy: np.ndarray | None = None
        self.tensor: torch.Tensor | None = None

    def write(self, positions: list[int], maps: torch.Tensor, numpy: bool) -> None:
        if self.tensor is None:
            shape = (self.n, *maps.shape[1:])
            if numpy:
                self.numpy = np.empty(shape, dtype=np.float32)
                self.tensor = torch.from_numpy(self.numpy)
            else:
                self.tensor = torch.empty(shape, dtype=maps.dtype, device=maps.device)
        elif tuple(maps.shape[1:]) != tuple(self.tensor.shape[1:]):
            raise ValueError(
                f"Images give feature maps of different sizes "
                f"({tuple(self.tensor.shape[-2:])} and {tuple(maps.shape[-2:])}) "
                "with crop='none', which cannot be stacked into one (N, C, h, w) "
                "array; use crop='center', or transform images of one aspect "
                "ratio at a time."
            )
        first = positions[0]
        if positions == list(range(first, first + len(positions))):
            # a synchronous copy (device-to-host for NumPy output)
            self.tensor[first : first + len(positions)].copy_(maps)
        else:
            index = torch.tensor(positions, device=self.tensor.device)
            self.tensor.index_copy_(0, index, maps.to(self.tensor.device))

    def result(self) -> np.ndarray | torch.Tensor:
        return self.numpy if self.numpy is not None else self.tensor


def _featurize(
    est: DinoFeaturizer,
    net: torch.nn.Module,
    X: Any,
    device: torch.device,
    stats: _Statistics | None = None,
) -> np.ndarray | torch.Tensor:
    runner = _Runner(est, net, device, stats)
    # Output type: NumPy for NumPy data (a batch array, or a sequence whose
    # first image is an array, known once it is read), else torch.
    info = {"numpy": isinstance(X, np.ndarray)}
    if isinstance(X, np.ndarray) or is_torch(X):
        X = _check_batch(X)
        n = X.shape[0]
        loads = _array_batches(X, runner, device)
    else:
        if isinstance(X, (str, Path, dict)) or not (
            isinstance(X, Sequence)
            or (hasattr(X, "__len__") and hasattr(X, "__getitem__"))
        ):
            raise ValueError(
                "Expected images as an (N, H, W, 3) uint8 array, an (N, 3, H, W) "
                "tensor or a sequence of images (paths, PIL images, arrays); got "
                f"{type(X).__name__}."
            )
        n = len(X)
        if n == 0:
            raise ValueError("Found no images (an empty sequence).")
        loads = _sequence_batches(X, runner, device, info)

    progress = None
    if est.verbose:
        from tqdm.auto import tqdm

        progress = tqdm(total=n, desc="DinoFeaturizer", unit="img")
    output = _Output(n)
    try:
        for load in loads:
            numpy_out = info["numpy"]

            def emit(
                start: int,
                stop: int,
                maps: torch.Tensor,
                load: _Load = load,
                numpy_out: bool = numpy_out,
            ) -> None:
                output.write(load.positions[start:stop], maps, numpy_out)

            runner.run(len(load.positions), load.prepare, emit)
            if progress is not None:
                progress.update(len(load.positions))
    finally:
        if progress is not None:
            progress.close()
    return output.result()


def _array_batches(
    X: np.ndarray | torch.Tensor, runner: _Runner, device: torch.device
) -> Iterator[_Load]:
    """Loads of an image batch array/tensor, not yet on the device.

    At most about 256 Mi values (1 GiB as float32) are loaded at a time, so
    large native images do not exhaust memory before they are resized. Each
    batch of a load is copied to the device synchronously (from pageable
    memory: nothing is pinned) when the runner prepares it.
    """
    pixels = int(np.prod(X.shape[1:]))
    load = max(1, min(runner.batch_size, MAX_LOAD_VALUES // pixels))
    for start in range(0, X.shape[0], load):
        xb = X[start : start + load]

        def prepare(a: int, b: int, xb=xb) -> torch.Tensor:
            part = xb[a:b]
            if isinstance(part, np.ndarray):
                part = as_tensor(part, device, dtype=None).permute(0, 3, 1, 2)
            else:
                part = to_device(part, device)
            if part.shape[1] == 1:
                part = part.expand(-1, 3, -1, -1)
            elif part.shape[1] == 4:
                part = part[:, :3]
            if part.is_floating_point():
                _check_unit_range(part)
            return _resize_crop(part, runner)

        yield _Load(list(range(start, start + xb.shape[0])), prepare)


def _check_unit_range(x: torch.Tensor) -> None:
    lo, hi = torch.aminmax(x)
    if not (float(lo) >= -1e-3 and float(hi) <= 1 + 1e-3):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                "Float images contain NaN or infinity; pass finite values in "
                "[0, 1] (or uint8 images in 0-255)."
            )
        hint = (
            "; for 0-255 values pass x.round().to(torch.uint8)"
            if float(lo) >= 0 and float(hi) <= 255
            else "; rescale them, e.g. (x - x.min()) / (x.max() - x.min()), "
            "or undo the normalisation first (the featurizer normalises "
            "itself)"
        )
        raise ValueError(
            "Float images must lie in [0, 1] (got values in "
            f"[{float(lo):.3g}, {float(hi):.3g}]){hint}."
        )


def _prepared_size(h: int, w: int, runner: _Runner) -> tuple[int, int]:
    """Size of an (h, w) image after :func:`_resize_crop`."""
    size, box = _target_size(h, w, runner.resolution, runner.crop, runner.patch)
    return size if box is None else (runner.resolution, runner.resolution)


def _sequence_batches(
    X: Any, runner: _Runner, device: torch.device, info: dict
) -> Iterator[_Load]:
    """Loads of a sequence of images, decoded in threads.

    Images are read by a thread pool with at most two loads in flight (on
    CUDA each decoded image is pinned, so that its upload is asynchronous;
    the pinned memory is that of the images in flight, freed as they are
    used). Within a load, images ending at one size form one group (one
    forward pass per size); each is uploaded and preprocessed on the device
    when the runner prepares its batch.
    """
    n = len(X)
    load = max(1, min(runner.batch_size, 64))
    workers = max(1, min(8, os.cpu_count() or 1))
    pin = device.type == "cuda"

    def read(i: int) -> tuple[torch.Tensor, bool]:
        item = X[i]
        if i == 0:
            info["numpy"] = isinstance(item, np.ndarray)
        image = _to_chw(item, f"image {i}")
        staged = pin and image.device.type == "cpu"
        if staged:
            image = image.contiguous().pin_memory()
        return image, staged

    def group_prepare(images: list[tuple[torch.Tensor, bool]]) -> Any:
        def prepare(a: int, b: int) -> torch.Tensor:
            prepared = []
            for image, staged in images[a:b]:
                image = to_device(image, device, staged=staged)
                if image.is_floating_point():
                    _check_unit_range(image)
                prepared.append(_resize_crop(image[None], runner))
            return prepared[0] if len(prepared) == 1 else torch.cat(prepared)

        return prepare

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        next_index = 0
        for start in range(0, n, load):
            stop = min(start + load, n)
            while next_index < min(n, stop + load):  # prefetch one load ahead
                pending.append(pool.submit(read, next_index))
                next_index += 1
            images = [pending.popleft().result() for _ in range(start, stop)]
            groups: dict[tuple, list[int]] = {}
            for offset, (image, _) in enumerate(images):
                size = _prepared_size(*image.shape[-2:], runner)
                groups.setdefault(size, []).append(offset)
            for offsets in groups.values():
                members = [images[k] for k in offsets]
                positions = [start + k for k in offsets]
                yield _Load(positions, group_prepare(members))
            del images
