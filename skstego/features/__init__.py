"""Feature extraction: frozen DINO ViT backbones turning images into feature maps,
flip-averaged encoding (STEGO's test-time augmentation), and a chunked on-disk
store of feature maps (zarr) read lazily."""

from ._dino import DinoFeaturizer
from ._flip import FlipAveraged
from ._store import FeatureStore

__all__ = ["DinoFeaturizer", "FeatureStore", "FlipAveraged"]
