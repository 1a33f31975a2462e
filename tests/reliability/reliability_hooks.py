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


@HOOKS.register_module()
class NaNLossOnRankHook(Hook):
    """Replace the loss of iteration ``at_iter`` (1-based) by NaN on rank ``rank`` only, as a
    bad batch on one process would; the other ranks' losses and every weight stay finite.

    Runs before ``NonFiniteLossHook`` (priority ABOVE_NORMAL) sees the outputs."""

    priority = 'VERY_HIGH'

    def __init__(self, at_iter: int, rank: int = 1) -> None:
        self.at_iter, self.rank = at_iter, rank

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.at_iter and runner.rank == self.rank:
            outputs['loss'] = torch.tensor(float('nan'))


@HOOKS.register_module()
class NaNWeightOnRankHook(Hook):
    """Write NaN into parameter ``param`` before iteration ``at_iter`` (1-based) on rank
    ``rank`` only: that rank's forward pass then meets non-finite logits inside its train step
    while the other ranks' do not."""

    priority = 'VERY_HIGH'

    def __init__(self, at_iter: int, rank: int = 1, param: str = 'head.mlp.fc2.weight') -> None:
        self.at_iter, self.rank, self.param = at_iter, rank, param

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if runner.iter + 1 == self.at_iter and runner.rank == self.rank:
            model = getattr(runner.model, 'module', runner.model)
            with torch.no_grad():
                dict(model.named_parameters())[self.param].fill_(float('nan'))
