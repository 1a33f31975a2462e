"""``ClassPriorHook``: the training set's class frequencies for logit-adjusted losses."""
from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..datasets.class_counts import dataset_class_counts


@HOOKS.register_module()
class ClassPriorHook(Hook):
    """Before training, count the classes of ``train_dataloader.dataset`` and hand the counts to
    every module of the model that uses a class prior (``uses_class_prior``, then
    ``set_class_counts``): ``GRPORMLoss(logit_adjust_tau > 0)`` and
    ``LogitAdjustedCrossEntropyLoss(tau > 0)``.

    Each rank counts the whole dataset (not its shard), so every rank gets the same prior. The
    prior is recomputed on every run (it is not saved in checkpoints); counting reads the
    dataset's label list, not its images.

    Example::

        custom_hooks = [dict(type='ClassPriorHook')]
    """

    priority = 'NORMAL'

    def before_train(self, runner) -> None:
        model = getattr(runner.model, 'module', runner.model)
        targets = [m for m in model.modules() if getattr(m, 'uses_class_prior', False)]
        if not targets:
            raise ValueError("ClassPriorHook: the model has no loss that uses a class prior; use "
                             "GRPORMLoss(logit_adjust_tau=1.0) or "
                             "dict(type='LogitAdjustedCrossEntropyLoss', tau=1.0), or remove "
                             "the hook")
        counts = dataset_class_counts(runner.train_dataloader.dataset)
        for module in targets:
            module.set_class_counts(counts)
        runner.logger.info(f'ClassPriorHook: class counts {counts} -> '
                           f'{len(targets)} loss module(s)')
