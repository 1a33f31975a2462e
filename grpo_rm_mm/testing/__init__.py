"""Data for tests in the public releases' exact on-disk formats.

- :mod:`.formats`: writers of Pascal VOC 2012 (+ the SBD aug set), CIFAR-10, Tiny-ImageNet and
  IDX (MNIST) folders, and the IDX reader; also what ``tools/dataset_converters/`` write with.
- :mod:`.synthetic`: small learnable data sets (one colour per class) written through them.

Not imported by ``import grpo_rm_mm``: nothing here is needed to train or test a model.
"""
from .formats import (
    CIFAR10_CLASSES,
    IDX_FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    read_idx,
    write_cifar10,
    write_idx,
    write_tiny_imagenet,
    write_voc2012,
    write_voc_aug,
)
from .synthetic import (
    balanced_labels,
    class_colours,
    colour_images,
    make_cifar10,
    make_tiny_imagenet,
    make_voc2012,
    segmentation_sample,
)

__all__ = ['CIFAR10_CLASSES', 'IDX_FILES', 'TEST_IMAGES', 'TEST_LABELS', 'TRAIN_IMAGES',
           'TRAIN_LABELS', 'balanced_labels', 'class_colours', 'colour_images', 'make_cifar10',
           'make_tiny_imagenet', 'make_voc2012', 'read_idx', 'segmentation_sample',
           'write_cifar10', 'write_idx', 'write_tiny_imagenet', 'write_voc2012', 'write_voc_aug']
