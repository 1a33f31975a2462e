"""Hooks for classification evaluation: reference representations, class-count check."""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.utils.data import DataLoader

from .representation import RepresentationMetric


def _metrics_of(loop) -> list[RepresentationMetric]:
    evaluator = getattr(loop, 'evaluator', None)
    return [m for m in getattr(evaluator, 'metrics', []) if isinstance(m, RepresentationMetric)]


def _inner_datasets(dataset: Mapping) -> list[Mapping]:
    """The datasets a wrapper config holds (``dataset=`` or ``datasets=[...]``), else ``[]``."""
    if isinstance(dataset.get('dataset'), Mapping):
        return [dataset['dataset']]
    return [d for d in dataset.get('datasets') or () if isinstance(d, Mapping)]


def _pipeline_of(dataset: Mapping) -> list | None:
    """The first ``pipeline`` of a dataset config, looking inside wrappers."""
    if 'pipeline' in dataset:
        return dataset['pipeline']
    for inner in _inner_datasets(dataset):
        pipeline = _pipeline_of(inner)
        if pipeline is not None:
            return pipeline
    return None


#: Wrappers that resample one dataset (``dataset=``): the reference set is the dataset they draw
#: from, each image once (a long-tailed training set is probed against the whole split).
RESAMPLING_WRAPPERS = ('LongTailDataset', 'RepeatDataset', 'ClassBalancedDataset')


def _reference_dataset(dataset: Mapping, pipeline: list) -> dict:
    """A copy of a training dataset config without its resampling wrappers
    (:data:`RESAMPLING_WRAPPERS`) whose pipeline, every one inside other wrappers, is
    ``pipeline``."""
    name = str(dataset.get('type', '')).rsplit('.', 1)[-1]
    if name in RESAMPLING_WRAPPERS and isinstance(dataset.get('dataset'), Mapping):
        return _reference_dataset(dataset['dataset'], pipeline)
    out = copy.deepcopy(dataset)
    inner = _inner_datasets(out)
    if 'pipeline' in out or not inner:
        out['pipeline'] = copy.deepcopy(pipeline)
    elif 'dataset' in out:
        out['dataset'] = _reference_dataset(out['dataset'], pipeline)
    else:
        out['datasets'] = [_reference_dataset(d, pipeline) if isinstance(d, Mapping) else d
                           for d in out['datasets']]
    return out


def reference_dataloader_cfg(train_dataloader: Mapping, test_dataloader: Mapping) -> dict:
    """The dataloader config of the probes' default reference set: the training set with the
    test pipeline.

    It is ``test_dataloader`` (batch size, workers, collate function) with its dataset replaced
    by the dataset of ``train_dataloader`` (split, subset ``indices``, ``ConcatDataset`` parts)
    without the wrappers that resample it (:data:`RESAMPLING_WRAPPERS`), and with the test
    dataset's pipeline in place of every pipeline inside; the sampler does not shuffle, and
    workers are not kept between the passes (the set is read once per evaluation).

    Args:
        train_dataloader: the ``train_dataloader`` config.
        test_dataloader: the ``test_dataloader`` (or ``val_dataloader``) config.

    Returns:
        A dataloader config for ``Runner.build_dataloader``.
    """
    pipeline = _pipeline_of(test_dataloader['dataset'])
    if pipeline is None:
        raise ValueError('RepresentationReferenceHook: the test dataloader\'s dataset has no '
                         '`pipeline` to give the reference (training) set; pass the reference '
                         'set as dataloader=dict(...)')
    loader = copy.deepcopy(dict(test_dataloader))
    sampler = loader.get('sampler') or dict(type='DefaultSampler')
    loader.update(dataset=_reference_dataset(train_dataloader['dataset'], pipeline),
                  sampler=dict(sampler, shuffle=False), persistent_workers=False)
    return loader


@HOOKS.register_module()
class RepresentationReferenceHook(Hook):
    """Feed train-set (reference) representations to the kNN / SR metrics of the val and test
    evaluators before each val/test epoch.

    The model runs in eval mode (``val_step``) over the reference dataloader on every rank (a
    distributed sampler splits it); each metric gathers the pieces itself. By default the
    reference set is the training set (each image once: no long-tail or repeat wrapper) with the
    test pipeline, derived from the runner's config by :func:`reference_dataloader_cfg` (so an
    override of ``train_dataloader``, e.g. a subset with ``indices``, applies to it too);
    ``dataloader`` replaces it. Representations are cached
    per training iteration, so a test right after the last validation (or several test sets in
    ``tools/test_ood.py``) reuses them.

    Args:
        dataloader: dataloader config (or object) of the reference set; ``None``: the training
            set with the test pipeline.

    Example::

        custom_hooks = [dict(type='RepresentationReferenceHook')]  # train set, test pipeline
        custom_hooks = [dict(type='RepresentationReferenceHook', dataloader=dict(
            batch_size=256, num_workers=4, sampler=dict(type='DefaultSampler', shuffle=False),
            dataset=dict(type='CIFAR10', data_root='data/cifar10', split='train',
                         pipeline=test_pipeline)))]
    """

    priority = 'LOW'

    def __init__(self, dataloader: dict | DataLoader | None = None) -> None:
        self.dataloader_cfg = dataloader
        self._loader: DataLoader | None = None
        self._cache: tuple[int, list[dict]] | None = None

    @staticmethod
    def derived_dataloader_cfg(runner) -> dict:
        """:func:`reference_dataloader_cfg` of the runner's train and test (else val)
        dataloader configs."""
        def loader_cfg(name: str) -> Mapping | None:
            cfg = runner.cfg.get(name)
            if cfg is None:  # a runner built from arguments: its loaders, while still configs
                cfg = getattr(runner, f'_{name}', None)
            return cfg if isinstance(cfg, Mapping) else None

        train = loader_cfg('train_dataloader')
        test = loader_cfg('test_dataloader') or loader_cfg('val_dataloader')
        if train is None or test is None:
            raise ValueError('RepresentationReferenceHook needs the train_dataloader and the '
                             'test_dataloader (or val_dataloader) configs to derive the '
                             'reference set; pass it as dataloader=dict(...)')
        return reference_dataloader_cfg(train, test)

    def before_val_epoch(self, runner) -> None:
        self._feed(runner, _metrics_of(runner.val_loop))

    def before_test_epoch(self, runner) -> None:
        self._feed(runner, _metrics_of(runner.test_loop))

    def _feed(self, runner, metrics: list[RepresentationMetric]) -> None:
        if not metrics:
            return
        if self._loader is None:
            cfg = self.dataloader_cfg
            if cfg is None:
                cfg = self.derived_dataloader_cfg(runner)
            self._loader = cfg if not isinstance(cfg, Mapping) else runner.build_dataloader(
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
