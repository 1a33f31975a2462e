"""Registered hooks."""
from __future__ import annotations

import os
import os.path as osp

import numpy as np
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..datasets.voc import save_voc_mask


@HOOKS.register_module()
class SegPalettePredictionHook(Hook):
    """Write every test prediction of an mmseg model as a VOC-palette PNG.

    ``tools/test.py --out DIR`` adds this hook. File names follow the input images
    (``<stem>.png``); label values are class indices, shown in the Pascal VOC colours.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def before_test(self, runner) -> None:
        os.makedirs(self.out_dir, exist_ok=True)

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        for sample in outputs or []:
            pred = sample.pred_sem_seg.data.squeeze(0).cpu().numpy()
            if pred.max(initial=0) > 255:
                raise ValueError(f'cannot write {pred.max()} classes into an 8-bit PNG')
            stem = osp.splitext(osp.basename(sample.img_path))[0]
            save_voc_mask(pred.astype(np.uint8), osp.join(self.out_dir, f'{stem}.png'))


@HOOKS.register_module()
class FeatureCacheHook(Hook):
    """Load and save a model's frozen-feature cache file (``GRPORMClassifier(feature_cache=
    dict(file=...))``): loaded before the run, saved after the first training epoch, after
    each validation and after testing, whenever it has new entries. In distributed runs each
    rank uses its own file (``<file>.rank<r>``)."""

    priority = 'LOW'

    @staticmethod
    def _model(runner):
        model = runner.model
        return getattr(model, 'module', model)

    def before_run(self, runner) -> None:
        model = self._model(runner)
        if getattr(model, 'feature_cache_file', None) and runner.world_size > 1:
            model.feature_cache_file = f'{model.feature_cache_file}.rank{runner.rank}'

    def _save(self, runner) -> None:
        model = self._model(runner)
        if hasattr(model, 'save_feature_cache') and model.save_feature_cache():
            runner.logger.info(f'feature cache: {len(model.feature_cache)} entries saved to '
                               f'{model.feature_cache_file} (hits {model.feature_cache.hits}, '
                               f'misses {model.feature_cache.misses})')

    def after_train_epoch(self, runner) -> None:
        self._save(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._save(runner)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._save(runner)
