"""Feature extraction: frozen DINO ViT backbones turning images into feature maps,
and a chunked on-disk store of feature maps (zarr) read lazily."""

from ._dino import DinoFeaturizer
from ._store import FeatureStore

__all__ = ["DinoFeaturizer", "FeatureStore"]
