"""Feature extraction: frozen DINO ViT backbones turning images into feature maps."""

from ._dino import DinoFeaturizer

__all__ = ["DinoFeaturizer"]
