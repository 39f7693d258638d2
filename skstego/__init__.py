"""skstego: STEGO and its dimensionality-reduction baselines as sklearn estimators.

Chain a reducer and a probe on DINO feature maps (N, C, h, w) or on any 2-D
token matrix::

    from sklearn.pipeline import Pipeline
    from skstego import KMeansProbe, TorchPCA

    pipe = Pipeline([("reduce", TorchPCA(dim=24)), ("probe", KMeansProbe(k=27))])

Every estimator runs on the GPU when one is present (``device="auto"``) and
returns NumPy for NumPy input, torch for torch input.
"""

from ._version import __version__
from .features import DinoFeaturizer, FeatureStore, FlipAveraged
from .postprocess import DenseCRF, crf_refine
from .probes import CRFProbe, HNNEClusterProbe, KMeansProbe, LinearProbe
from .projection import (
    HNNEProjector,
    RandomProjection,
    StegoProjector,
    TokenStandardScaler,
    TorchPCA,
)

__all__ = [
    "CRFProbe",
    "DenseCRF",
    "DinoFeaturizer",
    "FeatureStore",
    "FlipAveraged",
    "HNNEClusterProbe",
    "HNNEProjector",
    "KMeansProbe",
    "LinearProbe",
    "RandomProjection",
    "StegoProjector",
    "TokenStandardScaler",
    "TorchPCA",
    "__version__",
    "crf_refine",
]
