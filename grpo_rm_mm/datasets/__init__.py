"""Datasets, dataset wrappers and on-disk writers."""
from . import cifar  # noqa: F401  (registers LocalCIFAR10/100)
