"""kNN and SR representation probes against independent computations on fixed feature sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import grpo_rm_mm  # noqa: F401  (registers the metrics)
from grpo_rm_mm.evaluation.representation import (
    KNNAccuracy,
    SoftmaxRegressionAccuracy,
    knn_predict,
    softmax_regression_predict,
)


def clusters(n: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian class clusters that overlap (so probes make some mistakes); the centres depend
    on (num_classes, dim) only, so train and test sets drawn with two seeds share them."""
    centres = np.random.default_rng(1000 + num_classes * dim).normal(0, 1, (num_classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = centres[y] + rng.normal(0, spread, (n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """Weighted kNN written out per query in float64 (DINO eval_knn.py, one query at a time)."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    preds = []
    for q in test_x:
        sims = tr @ (q / np.linalg.norm(q))
        votes = np.zeros(num_classes)
        for j in np.argsort(-sims, kind='stable')[:k]:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def lbfgs_softmax_regression(train_x, train_y, test_x, C):
    """Minimise ``C * sum CE + ||W||^2 / 2`` (bias unpenalised) on standardised features with
    torch's LBFGS in float64 -- the objective scikit-learn's LogisticRegression documents."""
    mean, std = train_x.mean(0), train_x.std(0)
    std[std == 0] = 1
    xtr = torch.tensor((train_x - mean) / std, dtype=torch.float64)
    xte = torch.tensor((test_x - mean) / std, dtype=torch.float64)
    ytr = torch.tensor(train_y)
    num_classes = int(train_y.max()) + 1
    w = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=5000, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = C * torch.nn.functional.cross_entropy(xtr @ w + b, ytr, reduction='sum') \
            + 0.5 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (xte @ w + b).argmax(1).numpy()


def samples(x, y, key='rep_pre_logits'):
    return [{key: torch.from_numpy(f), 'gt_label': torch.tensor([int(t)])} for f, t in zip(x, y)]


def run_metric(metric, train, test):
    metric.dataset_meta = dict(classes=tuple(str(i) for i in range(int(train[1].max()) + 1)))
    metric.set_reference(samples(*train, metric.key), size=len(train[1]))
    metric.process({}, samples(*test, metric.key))
    return metric.evaluate(size=len(test[1]))


class TestKNN:

    @pytest.mark.parametrize('k,temperature', [(20, 0.07), (5, 0.5), (1, 0.07)])
    def test_matches_reference_implementation(self, k, temperature) -> None:
        train = clusters(300, 6, 16, spread=1.2, seed=0)
        test = clusters(200, 6, 16, spread=1.2, seed=1)
        expected = knn_reference(*train, test[0], k, temperature, 6)
        pred = knn_predict(torch.from_numpy(train[0]), torch.from_numpy(train[1]),
                           torch.from_numpy(test[0]), k, temperature, 6).numpy()
        np.testing.assert_array_equal(pred, expected)
        acc = (expected == test[1]).mean() * 100
        assert 30 < acc < 100  # overlapping clusters: a meaningful, imperfect probe

        metrics = run_metric(KNNAccuracy(k=k, temperature=temperature), train, test)
        assert metrics['knn_pre_logits/top1'] == pytest.approx(acc)
        assert metrics['knn_pre_logits/num_train'] == 300
        assert metrics['knn_pre_logits/num_test'] == 200

    def test_k1_on_the_train_set_itself_is_perfect(self) -> None:
        train = clusters(250, 5, 8, spread=3.0, seed=2)  # heavily overlapping classes
        metrics = run_metric(KNNAccuracy(k=1, representation='backbone'), train, train)
        assert metrics['knn_backbone/top1'] == 100.0
        # ... while a flat 20-neighbour vote does make mistakes on the same data
        flat = run_metric(KNNAccuracy(k=20, temperature=1.0), train, train)
        assert flat['knn_pre_logits/top1'] < 100.0

    def test_k_larger_than_reference_uses_all(self) -> None:
        train = (np.eye(3, dtype=np.float32), np.array([0, 1, 1]))
        test = (np.array([[1.0, 0.0, 0.0]], dtype=np.float32), np.array([0]))
        # k=3 >= 3 samples: votes exp(1/T) for class 0 vs 2 * exp(0) for class 1
        assert knn_predict(torch.from_numpy(train[0]), torch.from_numpy(train[1]),
                           torch.from_numpy(test[0]), k=50, temperature=1.0).item() == 0
        assert knn_predict(torch.from_numpy(train[0]), torch.from_numpy(train[1]),
                           torch.from_numpy(test[0]), k=50, temperature=100.0).item() == 1

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match='k=0'):
            KNNAccuracy(k=0)
        with pytest.raises(ValueError, match='temperature'):
            KNNAccuracy(temperature=0)
        with pytest.raises(ValueError, match="representation='logits'"):
            KNNAccuracy(representation='logits')

    def test_without_reference_set_says_which_hook_to_add(self) -> None:
        metric = KNNAccuracy()
        metric.process({}, samples(*clusters(4, 2, 3, 1.0, 0)))
        with pytest.raises(RuntimeError, match='RepresentationReferenceHook'):
            metric.evaluate(4)

    def test_missing_representation_field(self) -> None:
        metric = KNNAccuracy(representation='backbone')
        with pytest.raises(KeyError, match='GRPORMClassifier'):
            metric.process({}, samples(*clusters(4, 2, 3, 1.0, 0)))  # rep_pre_logits only


class TestSoftmaxRegression:

    def test_matches_independent_lbfgs(self) -> None:
        train = clusters(240, 4, 12, spread=1.5, seed=3)
        test = clusters(160, 4, 12, spread=1.5, seed=4)
        C = 0.05
        expected = lbfgs_softmax_regression(*train, test[0], C)
        acc = (expected == test[1]).mean() * 100
        assert 40 < acc < 100
        pred = softmax_regression_predict(*train, test[0], C=C, max_iter=10000, tol=1e-10)
        np.testing.assert_array_equal(pred, expected)
        metrics = run_metric(SoftmaxRegressionAccuracy(C=C, tol=1e-10, max_iter=10000),
                             train, test)
        assert metrics['sr_pre_logits/top1'] == pytest.approx(acc)
        assert metrics['sr_pre_logits/num_train'] == 240
        assert metrics['sr_pre_logits/num_test'] == 160

    def test_regularisation_matters(self) -> None:
        # a strong penalty shrinks the probe towards the class prior: a different answer
        train = clusters(240, 4, 12, spread=1.5, seed=3)
        test = clusters(160, 4, 12, spread=1.5, seed=4)
        strong = lbfgs_softmax_regression(*train, test[0], 1e-4)
        metrics = run_metric(SoftmaxRegressionAccuracy(C=1e-4, tol=1e-10), train, test)
        assert metrics['sr_pre_logits/top1'] == pytest.approx((strong == test[1]).mean() * 100)

    def test_single_class_reference_is_an_error(self) -> None:
        x, _ = clusters(10, 2, 3, 1.0, 0)
        with pytest.raises(ValueError, match='at least 2 classes'):
            run_metric(SoftmaxRegressionAccuracy(), (x, np.zeros(10, np.int64)),
                       (x, np.zeros(10, np.int64)))

    def test_bad_C(self) -> None:
        with pytest.raises(ValueError, match='C=0'):
            SoftmaxRegressionAccuracy(C=0)
