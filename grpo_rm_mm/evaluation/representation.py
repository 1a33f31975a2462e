"""Representation probes: weighted kNN (DINO) and softmax regression (SR), as mmengine metrics.

Both score test-set representations against train-set (*reference*) representations. The test
set is the loop's own dataloader; the reference set is fed by
:class:`~grpo_rm_mm.evaluation.hooks.RepresentationReferenceHook`, which runs the model over a
train-split dataloader before each val/test epoch. Representations travel in the predicted data
samples as ``rep_<name>`` fields (``GRPORMClassifier`` attaches ``rep_backbone`` and
``rep_pre_logits``). Results are gathered over ranks (padding dropped) before scoring, so
distributed runs give the numbers of a single process.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dist import broadcast_object_list, collect_results, is_main_process
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

from ..models.feature_cache import sample_key

REPRESENTATIONS = ('backbone', 'pre_logits')


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor,
                test_feats: torch.Tensor, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 256) -> torch.Tensor:
    """DINO's weighted kNN classifier (``eval_knn.py``).

    Features are L2-normalised; for each test row the ``k`` most cosine-similar train rows vote
    for their label with weight ``exp(sim / temperature)``; the class with the largest summed
    weight wins (ties: the smaller label).

    Args:
        train_feats: (N, D); train_labels: (N,) int64; test_feats: (M, D).
    Returns:
        (M,) int64 predicted labels.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(f'features must be (N, D), got {tuple(train_feats.shape)} and '
                         f'{tuple(test_feats.shape)}')
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f'train features have {train_feats.shape[1]} dims, test features '
                         f'{test_feats.shape[1]}')
    if k < 1 or temperature <= 0:
        raise ValueError(f'need k >= 1 and temperature > 0, got k={k}, T={temperature}')
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, len(train_feats))
    ref = F.normalize(train_feats.float(), dim=1)
    preds = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ ref.T).topk(k, dim=1)                       # (B, k)
        votes = torch.zeros(len(q), num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def fit_softmax_regression(train_feats: np.ndarray, train_labels: np.ndarray,
                           C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4):
    """Fit SR: multinomial logistic regression (scikit-learn, lbfgs, L2 penalty ``1 / C``) on
    standardised train features. Returns ``(scaler, classifier)``.

    Objective: ``C * sum_n CE(W x_n + b, y_n) + ||W||^2 / 2`` with ``x`` standardised by the
    train mean and std.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_labels)) < 2:
        raise ValueError('softmax regression needs train representations of at least 2 '
                         f'classes, got labels {np.unique(train_labels).tolist()}')
    scaler = StandardScaler().fit(train_feats.astype(np.float64))
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol)
    clf.fit(scaler.transform(train_feats.astype(np.float64)), train_labels)
    return scaler, clf


def softmax_regression_predict(train_feats: np.ndarray, train_labels: np.ndarray,
                               test_feats: np.ndarray, C: float = 1.0,
                               max_iter: int = 1000, tol: float = 1e-4) -> np.ndarray:
    """SR probe (:func:`fit_softmax_regression`) scored on ``test_feats``: (M,) labels.

    The fit is memoised on the exact train features, labels and options, so several test sets
    against one reference set (``tools/test_ood.py``) fit the probe once.
    """
    key = (sample_key(torch.from_numpy(np.ascontiguousarray(train_feats))),
           sample_key(torch.from_numpy(np.ascontiguousarray(train_labels))), C, max_iter, tol)
    if key not in _SR_FITS:
        _SR_FITS.clear()  # keep one fit: the reference of the current evaluation
        _SR_FITS[key] = fit_softmax_regression(train_feats, train_labels, C, max_iter, tol)
    scaler, clf = _SR_FITS[key]
    return clf.predict(scaler.transform(test_feats.astype(np.float64)))


_SR_FITS: dict[tuple, tuple] = {}


class RepresentationMetric(BaseMetric):
    """Base of the reference-based probes: collects ``rep_<representation>`` and ``gt_label``
    of test samples (``process``) and of reference samples (:meth:`set_reference`).

    Reports ``top1`` (%), ``num_train`` (reference samples used) and ``num_test``, under the
    prefix ``<name>_<representation>`` (e.g. ``knn_pre_logits/top1``).
    """

    name = 'rep'

    def __init__(self, representation: str = 'pre_logits', collect_device: str = 'cpu',
                 prefix: str | None = None, collect_dir: str | None = None) -> None:
        if representation not in REPRESENTATIONS:
            raise ValueError(f'representation={representation!r}: use one of '
                             f'{REPRESENTATIONS} (backbone output or the head hidden layer)')
        super().__init__(collect_device=collect_device,
                         prefix=prefix or f'{self.name}_{representation}',
                         collect_dir=collect_dir)
        self.representation = representation
        self.key = f'rep_{representation}'
        self.reference: list[tuple[torch.Tensor, int]] | None = None
        self.reference_size: int | None = None

    def _item(self, sample: dict) -> tuple[torch.Tensor, int]:
        if self.key not in sample:
            raise KeyError(
                f'{type(self).__name__}: the predicted data samples carry no {self.key!r}; use '
                f"model type 'GRPORMClassifier' (it attaches rep_backbone and rep_pre_logits)")
        label = sample['gt_label']
        return sample[self.key].detach().float().cpu().reshape(-1), int(label.reshape(-1)[0])

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            self.results.append(self._item(sample))

    def set_reference(self, samples: Sequence[dict], size: int) -> None:
        """This rank's reference (train) samples and the reference dataset length."""
        self.reference = [self._item(s) for s in samples]
        self.reference_size = size

    def _gather(self, part: list, size: int) -> list:
        if self.collect_device == 'cpu':
            return collect_results(part, size, 'cpu', tmpdir=self.collect_dir)
        return collect_results(part, size, self.collect_device)

    def evaluate(self, size: int) -> dict:
        if self.reference is None:
            raise RuntimeError(
                f'{type(self).__name__} has no reference (train-set) representations: add '
                f"dict(type='RepresentationReferenceHook') to custom_hooks (it reads the "
                f'training set with the test pipeline; dataloader=... gives another set)')
        reference = self._gather(self.reference, self.reference_size)
        queries = self._gather(self.results, size)
        if is_main_process():
            metrics = self.compute_metrics(queries, reference)
            metrics = [{f'{self.prefix}/{k}': v for k, v in metrics.items()}]
        else:
            metrics = [None]
        broadcast_object_list(metrics)
        self.results.clear()
        return metrics[0]

    @staticmethod
    def _stack(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.stack([f for f, _ in items])
        labels = torch.tensor([y for _, y in items], dtype=torch.long)
        return feats, labels

    def compute_metrics(self, results: list, reference: list | None = None) -> dict:
        if not results or not reference:
            raise RuntimeError(f'{type(self).__name__}: {len(results)} test and '
                               f'{len(reference or [])} reference samples; need both')
        train_x, train_y = self._stack(reference)
        test_x, test_y = self._stack(results)
        pred = self.predict(train_x, train_y, test_x)
        top1 = (pred == test_y).float().mean().item() * 100
        return dict(top1=top1, num_train=len(train_y), num_test=len(test_y))

    def predict(self, train_x: torch.Tensor, train_y: torch.Tensor,
                test_x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@METRICS.register_module()
class KNNAccuracy(RepresentationMetric):
    """Top-1 of DINO's weighted kNN (cosine similarity of L2-normalised representations, the
    ``k`` nearest train samples vote with weight ``exp(sim / temperature)``).

    Example: ``dict(type='KNNAccuracy', k=20, temperature=0.07, representation='pre_logits')``
    reports ``knn_pre_logits/top1``, ``/num_train``, ``/num_test``.
    """

    name = 'knn'

    def __init__(self, k: int = 20, temperature: float = 0.07, **kwargs) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f'KNNAccuracy: k={k} must be a positive integer')
        if temperature <= 0:
            raise ValueError(f'KNNAccuracy: temperature={temperature} must be > 0')
        super().__init__(**kwargs)
        self.k, self.temperature = int(k), float(temperature)

    def predict(self, train_x, train_y, test_x):
        num_classes = len(self.dataset_meta['classes']) if self.dataset_meta and \
            self.dataset_meta.get('classes') else None
        num_classes = max(num_classes or 0, int(train_y.max()) + 1)
        return knn_predict(train_x, train_y, test_x, self.k, self.temperature, num_classes)


@METRICS.register_module()
class SoftmaxRegressionAccuracy(RepresentationMetric):
    """Top-1 of SR: a multinomial logistic-regression probe (scikit-learn, lbfgs) fitted on the
    standardised train representations and scored on the test representations.

    Example: ``dict(type='SoftmaxRegressionAccuracy', C=1.0, representation='pre_logits')``
    reports ``sr_pre_logits/top1``, ``/num_train``, ``/num_test``.
    """

    name = 'sr'

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                 **kwargs) -> None:
        if C <= 0:
            raise ValueError(f'SoftmaxRegressionAccuracy: C={C} must be > 0 (inverse L2 '
                             f'strength)')
        super().__init__(**kwargs)
        self.C, self.max_iter, self.tol = float(C), int(max_iter), float(tol)

    def predict(self, train_x, train_y, test_x):
        pred = softmax_regression_predict(train_x.numpy(), train_y.numpy(), test_x.numpy(),
                                          self.C, self.max_iter, self.tol)
        return torch.from_numpy(np.asarray(pred, dtype=np.int64))
