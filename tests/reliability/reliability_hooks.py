"""Test-only mmengine hooks for tests/reliability (imported by the training subprocesses through
``custom_imports``; this folder is put on their ``PYTHONPATH``)."""
from __future__ import annotations

import os
import time

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class PaceHook(Hook):
    """Sleep ``$RELIABILITY_PACE_S`` seconds after every iteration from ``from_epoch`` on (0 or
    unset: no sleep), so that a test can kill the run mid-way. Changes nothing else."""

    def __init__(self, from_epoch: int = 2) -> None:
        self.from_epoch = from_epoch

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        pace = float(os.environ.get('RELIABILITY_PACE_S', '0') or 0)
        if pace > 0 and runner.epoch + 1 >= self.from_epoch:
            time.sleep(pace)


@HOOKS.register_module()
class InjectNaNHook(Hook):
    """Write NaN into the parameter ``param`` of the model: before iteration ``at_iter``
    (1-based) when ``when='before_iter'``, or after it when ``when='after_iter'``."""

    priority = 'VERY_HIGH'

    def __init__(self, at_iter: int, param: str = 'head.mlp.fc2.weight',
                 when: str = 'before_iter') -> None:
        assert when in ('before_iter', 'after_iter')
        self.at_iter, self.param, self.when = at_iter, param, when

    def _poison(self, runner) -> None:
        model = getattr(runner.model, 'module', runner.model)
        with torch.no_grad():
            dict(model.named_parameters())[self.param].fill_(float('nan'))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.when == 'before_iter' and runner.iter + 1 == self.at_iter:
            self._poison(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.when == 'after_iter' and runner.iter + 1 == self.at_iter:
            self._poison(runner)
