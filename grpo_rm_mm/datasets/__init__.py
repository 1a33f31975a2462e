"""Datasets, dataset wrappers and on-disk writers."""
from . import cifar  # noqa: F401  (registers LocalCIFAR10/100)

# isort: split
from . import long_tail, tiny_imagenet  # noqa: F401  (LongTailDataset, TinyImageNet)

# isort: split
from . import voc_checks  # noqa: F401  (CheckedPascalVOCDataset, CheckSegAnnotation)

# isort: split
from . import transforms  # noqa: F401  (registers GrayToRGB)
