"""Registered evaluation components: representation probes (kNN, SR), their reference hook and
the class-count check; :mod:`.ood` tests one checkpoint on several test sets."""
from .hooks import NumClassesCheckHook, RepresentationReferenceHook
from .representation import KNNAccuracy, SoftmaxRegressionAccuracy, knn_predict

__all__ = ['KNNAccuracy', 'SoftmaxRegressionAccuracy', 'knn_predict', 'RepresentationReferenceHook',
           'NumClassesCheckHook']
