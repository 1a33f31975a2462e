"""Hooks for classification evaluation: reference representations, class-count check."""
from __future__ import annotations

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .representation import RepresentationMetric


def _metrics_of(loop) -> list[RepresentationMetric]:
    evaluator = getattr(loop, 'evaluator', None)
    return [m for m in getattr(evaluator, 'metrics', []) if isinstance(m, RepresentationMetric)]


@HOOKS.register_module()
class RepresentationReferenceHook(Hook):
    """Feed train-set (reference) representations to the kNN / SR metrics of the val and test
    evaluators before each val/test epoch.

    The model runs in eval mode (``val_step``) over ``dataloader`` -- typically the train split
    with the *test* pipeline -- on every rank (a distributed sampler splits it); each metric
    gathers the pieces itself. Representations are cached per training iteration, so a test
    right after the last validation (or several test sets in ``tools/test_ood.py``) reuses them.

    Args:
        dataloader: dataloader config (or object) of the reference set.

    Example::

        custom_hooks = [dict(type='RepresentationReferenceHook', dataloader=dict(
            batch_size=256, num_workers=4, sampler=dict(type='DefaultSampler', shuffle=False),
            dataset=dict(type='CIFAR10', data_root='data/cifar10', split='train',
                         pipeline=test_pipeline)))]
    """

    priority = 'LOW'

    def __init__(self, dataloader: dict) -> None:
        self.dataloader_cfg = dataloader
        self._loader = None
        self._cache: tuple[int, list[dict]] | None = None

    def before_val_epoch(self, runner) -> None:
        self._feed(runner, _metrics_of(runner.val_loop))

    def before_test_epoch(self, runner) -> None:
        self._feed(runner, _metrics_of(runner.test_loop))

    def _feed(self, runner, metrics: list[RepresentationMetric]) -> None:
        if not metrics:
            return
        if self._loader is None:
            cfg = self.dataloader_cfg
            self._loader = cfg if not isinstance(cfg, dict) else runner.build_dataloader(
                cfg, seed=runner.seed)
        if self._cache is None or self._cache[0] != runner.iter:
            self._cache = (runner.iter, self.extract(runner.model, self._loader))
        size = len(self._loader.dataset)
        for metric in metrics:
            metric.set_reference(self._cache[1], size)

    @staticmethod
    @torch.no_grad()
    def extract(model, loader) -> list[dict]:
        """Run ``model.val_step`` over ``loader``; return the samples' ``rep_*`` and labels."""
        was_training = model.training
        model.eval()
        out = []
        try:
            for batch in loader:
                for sample in model.val_step(batch):
                    sample = sample.to_dict()
                    out.append({k: v.cpu() for k, v in sample.items()
                                if k.startswith('rep_') or k == 'gt_label'})
        finally:
            model.train(was_training)
        return out


@HOOKS.register_module()
class NumClassesCheckHook(Hook):
    """Fail early, with the fix, when ``model.head.num_classes`` differs from the number of
    ``classes`` of the train/val/test dataset."""

    def before_train(self, runner) -> None:
        self._check(runner, runner.train_dataloader.dataset, 'train')

    def before_val(self, runner) -> None:
        self._check(runner, runner.val_loop.dataloader.dataset, 'val')

    def before_test(self, runner) -> None:
        self._check(runner, runner.test_loop.dataloader.dataset, 'test')

    @staticmethod
    def _check(runner, dataset, split: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        head = getattr(model, 'head', None)
        num_classes = getattr(head, 'num_classes', None)
        classes = (getattr(dataset, 'metainfo', None) or {}).get('classes')
        if num_classes is None or classes is None:
            return
        if len(classes) != num_classes:
            shown = ', '.join(map(str, list(classes)[:5])) + (', ...' if len(classes) > 5 else '')
            raise ValueError(
                f'model.head.num_classes={num_classes} but the {split} dataset '
                f'{type(dataset).__name__} has {len(classes)} classes ({shown}); set '
                f'model.head.num_classes={len(classes)} in the config (or use a dataset with '
                f'{num_classes} classes)')
