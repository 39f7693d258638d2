"""Reducers: feature maps or tokens in, lower-dimensional codes out.

Each keeps the layout of its input (4-D maps in, 4-D codes out; 2-D in, 2-D out).
"""

from ._hnne import HNNEProjector
from ._pca import TorchPCA
from ._random import RandomProjection
from ._standardize import TokenStandardScaler
from ._stego import StegoProjector

__all__ = [
    "HNNEProjector",
    "RandomProjection",
    "StegoProjector",
    "TokenStandardScaler",
    "TorchPCA",
]
