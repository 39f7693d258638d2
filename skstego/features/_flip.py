"""Flip-averaged codes: the STEGO evaluation's test-time augmentation.

The reference evaluation (``src/eval_segmentation.py`` of
mhamilton723/STEGO) encodes every image twice, as it is and mirrored left to
right, mirrors the second code map back and averages the two:
``code = (code(img) + flip(code(flip(img)))) / 2``. :class:`FlipAveraged`
does this for any image encoder: a :class:`DinoFeaturizer`, or a pipeline of
a featurizer and a head such as :class:`~skstego.StegoProjector`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import HasMethods
from sklearn.utils.validation import check_is_fitted

from .._device import _DocLinkMixin, is_torch
from ..datasets._collection import _read_image

__all__ = ["FlipAveraged"]


class _Mirrored(Sequence):
    """A lazy sequence of images, each mirrored left to right when read."""

    def __init__(self, images: Any) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: Any) -> Any:
        if not isinstance(i, int | np.integer):
            raise TypeError("mirrored images are read one index at a time")
        return _mirror_one(self.images[int(i)])


def _mirror_one(image: Any) -> Any:
    from PIL import Image, ImageOps

    if isinstance(image, str | Path | os.PathLike):
        # PIL out, as a path in: the featurizer returns torch for both
        return Image.fromarray(
            np.ascontiguousarray(_read_image(os.fspath(image))[:, ::-1])
        )
    if isinstance(image, Image.Image):
        return ImageOps.mirror(image)
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image[:, ::-1])
    if is_torch(image):
        return image.flip(-1)
    return image  # the featurizer names what it cannot read


def mirror_images(X: Any) -> Any:
    """Images mirrored left to right, in the form they came in.

    NumPy ``(N, H, W, C)`` and torch ``(N, C, H, W)`` batches are flipped
    along their width; sequences (paths, PIL images, per-image arrays, an
    :class:`~skstego.datasets.ImageCollection`) are mirrored lazily, one
    image at a time as the featurizer reads it. ``X`` is never modified.
    """
    if isinstance(X, np.ndarray) and X.ndim == 4:
        return np.ascontiguousarray(X[:, :, ::-1])
    if is_torch(X) and X.ndim == 4:
        return X.flip(-1)
    if isinstance(X, np.ndarray | torch.Tensor):
        raise ValueError(
            "Expected a batch of images (N, H, W, C) NumPy or (N, C, H, W) "
            f"torch, got shape {tuple(X.shape)}."
        )
    return _Mirrored(X)


class FlipAveraged(TransformerMixin, _DocLinkMixin, BaseEstimator):
    """Average an image encoder's maps over the image and its mirror image.

    ``transform(X) = (E(X) + flip(E(flip(X)))) / 2`` for the encoder ``E``,
    where ``flip`` mirrors along the width: the test-time augmentation of
    STEGO's evaluation (``src/eval_segmentation.py`` of the reference
    implementation). Because STEGO's head is not linear, ``E`` should include
    it: wrap ``Pipeline([featurizer, head])``, not the featurizer alone.

    Parameters
    ----------
    estimator : estimator
        Encoder from images to maps ``(N, C, h, w)``: a
        :class:`DinoFeaturizer` or a pipeline that starts with one. When it
        is already fitted (a loaded checkpoint, a fitted pipeline),
        :meth:`transform` uses it as it is and :meth:`fit` is not needed;
        :meth:`fit` fits a clone.

    Attributes
    ----------
    estimator_ : estimator
        The fitted clone (set by :meth:`fit` only).

    See Also
    --------
    DinoFeaturizer : The image encoder.
    skstego.io.load_stego_checkpoint : A released STEGO model as a pipeline.

    Notes
    -----
    The reference mirrors the *preprocessed* image (resized and cropped).
    Images that already have the featurizer's size, such as those of an
    :class:`~skstego.datasets.ImageCollection` with the same ``resolution``,
    reproduce it exactly; otherwise the mirror is taken before the resize,
    which can move a nearest-neighbour sample or an odd crop by one pixel.

    Examples
    --------
    >>> import numpy as np
    >>> import timm
    >>> from skstego import DinoFeaturizer, FlipAveraged
    >>> vit = timm.models.VisionTransformer(
    ...     img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    ... )
    >>> images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), np.uint8)
    >>> encoder = FlipAveraged(DinoFeaturizer(vit, resolution=32, device="cpu"))
    >>> maps = encoder.transform(images)
    >>> maps.shape
    (2, 16, 4, 4)
    >>> mirrored = encoder.transform(images[:, :, ::-1])
    >>> bool(np.allclose(mirrored, maps[..., ::-1], atol=1e-5))
    True
    """

    _parameter_constraints: ClassVar[dict] = {"estimator": [HasMethods(["transform"])]}

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X: Any, y: Any = None) -> FlipAveraged:
        """Fit a clone of the encoder on ``X`` (and ``y``).

        Parameters
        ----------
        X : images
            Whatever the encoder's ``fit`` takes.
        y : array-like, optional
            Passed on to the encoder's ``fit``.

        Returns
        -------
        self : FlipAveraged
            The fitted meta-transformer.
        """
        self.estimator_ = clone(self.estimator).fit(X, y)
        return self

    def _encoder(self) -> Any:
        if hasattr(self, "estimator_"):
            return self.estimator_
        if not hasattr(self.estimator, "transform"):
            raise TypeError(
                f"estimator must be an image encoder with transform, got "
                f"{type(self.estimator).__name__}."
            )
        try:
            check_is_fitted(self.estimator)
        except NotFittedError as exc:
            raise NotFittedError(
                "FlipAveraged: the encoder is not fitted; call fit first or "
                "wrap a fitted encoder."
            ) from exc
        return self.estimator

    def transform(self, X: Any) -> np.ndarray | torch.Tensor:
        """Maps of ``X`` averaged with the mirrored maps of its mirror image.

        Parameters
        ----------
        X : images
            A NumPy ``(N, H, W, C)`` or torch ``(N, C, H, W)`` batch, or a
            sequence of paths, PIL images or arrays.

        Returns
        -------
        maps : ndarray or torch.Tensor of shape (N, C, h, w)
            Same type as the encoder returns for ``X``.
        """
        encoder = self._encoder()
        direct = encoder.transform(X)
        mirrored = encoder.transform(mirror_images(X))
        if getattr(direct, "ndim", 0) != 4:
            raise ValueError(
                "FlipAveraged needs an encoder that returns maps (N, C, h, w); "
                f"got shape {tuple(getattr(direct, 'shape', ()))}."
            )
        if is_torch(direct):
            back = torch.as_tensor(mirrored, device=direct.device).flip(-1)
            return (direct + back) / 2
        back = np.asarray(mirrored.cpu() if is_torch(mirrored) else mirrored)[..., ::-1]
        return ((direct + back) / 2).astype(direct.dtype, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.transformer_tags.preserves_dtype = []
        return tags
