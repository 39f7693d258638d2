"""Data: synthetic scenes and synthetic DINO-like feature maps."""

from ._synthetic import make_feature_maps, make_scenes

__all__ = ["make_feature_maps", "make_scenes"]
