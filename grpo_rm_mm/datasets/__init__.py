"""Datasets, dataset wrappers and on-disk writers."""
