"""Registered datasets, dataset wrappers and transforms; the Pascal VOC format."""
from . import cifar  # noqa: F401  (registers LocalCIFAR10/100)

# isort: split
from . import long_tail, npy, tiny_imagenet  # noqa: F401  (LongTailDataset, NpyImageDataset, ...)

# isort: split
from . import voc  # noqa: F401  (CheckedPascalVOCDataset, VOCFormatDataset, CheckSegAnnotation)

# isort: split
from . import transforms  # noqa: F401  (registers GrayToRGB)
from .npy import NpyImageDataset
from .voc import CheckedPascalVOCDataset, VOCFormatDataset

__all__ = ['CheckedPascalVOCDataset', 'NpyImageDataset', 'VOCFormatDataset']
