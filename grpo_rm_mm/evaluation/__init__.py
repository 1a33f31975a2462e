"""Registered evaluation components: representation probes (kNN, SR), their reference hook, the
class-count check, and out-of-distribution test sets."""
from .hooks import NumClassesCheckHook, RepresentationReferenceHook
from .ood import NpyImageDataset
from .representation import KNNAccuracy, SoftmaxRegressionAccuracy, knn_predict

__all__ = ['KNNAccuracy', 'SoftmaxRegressionAccuracy', 'knn_predict', 'RepresentationReferenceHook',
           'NumClassesCheckHook', 'NpyImageDataset']
