"""Data: synthetic scenes and feature maps, lazy image collections, and loaders
for the STEGO dataset layouts (COCO-Stuff-27, Cityscapes-27, Potsdam-3, any
image folder)."""

from ._collection import ImageCollection, LabelCollection, default_palette
from ._loaders import (
    CITYSCAPES27_CLASSES,
    COCOSTUFF27_CLASSES,
    COCOSTUFF27_FINE_TO_COARSE,
    COCOSTUFF27_LISTS,
    POTSDAM3_CLASSES,
    LabelRemap,
    load_cityscapes27,
    load_cocostuff27,
    load_image_folder,
    load_potsdam3,
)
from ._synthetic import make_feature_maps, make_scenes

__all__ = [
    "CITYSCAPES27_CLASSES",
    "COCOSTUFF27_CLASSES",
    "COCOSTUFF27_FINE_TO_COARSE",
    "COCOSTUFF27_LISTS",
    "POTSDAM3_CLASSES",
    "ImageCollection",
    "LabelCollection",
    "LabelRemap",
    "default_palette",
    "load_cityscapes27",
    "load_cocostuff27",
    "load_image_folder",
    "load_potsdam3",
    "make_feature_maps",
    "make_scenes",
]
