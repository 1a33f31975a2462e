"""Numerical and checkpoint guards.

``NonFiniteLossHook`` stops a training run at the first non-finite loss or logged scalar (naming
the iteration, the key and the value) and refuses to write a checkpoint that holds a non-finite
tensor. ``CheckpointCheckHook`` checks the checkpoint that ``load_from``, ``--resume`` or
``tools/test.py`` will load, before the runner loads it: a truncated or corrupt file, or one
whose parameter shapes differ from the model's (mmengine only warns and goes on with random
weights), stops the run with an error naming the file. Add both to a config with::

    custom_hooks = [dict(type='NonFiniteLossHook'), dict(type='CheckpointCheckHook')]

``check_checkpoint_file`` reads a checkpoint (``weights_only=True``; this project's checkpoints
are plain data, see :mod:`grpo_rm_mm.checkpoints`) and turns a truncated/corrupt file into an
error that names the file; ``check_state_dict_shapes`` names every parameter whose shape
differs from the model's.
"""
from __future__ import annotations

import math
import os.path as osp
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from mmengine.dist import (
    all_gather_object,
    get_comm_device,
    get_rank,
    get_world_size,
    is_distributed,
)
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import Tensor, nn

__all__ = ['CheckpointCheckHook', 'NonFiniteLossHook', 'check_checkpoint_file',
           'check_state_dict_shapes', 'first_non_finite']

_CAUSES = ('Usual causes: the learning rate is too high (lower optimizer.lr or add '
           'optim_wrapper.clip_grad=dict(max_norm=1.0)); fp16 overflow (use bfloat16: '
           "optim_wrapper.dtype='bfloat16', or a dynamic loss scale loss_scale='dynamic'); "
           'bad inputs (NaN/Inf in the images or features, labels outside the classes).')


def _scalars(outputs: Any, prefix: str = '') -> Iterable[tuple[str, Any]]:
    """(key, value) of every tensor / number in a (nested) dict or list of outputs."""
    if isinstance(outputs, Mapping):
        for key, value in outputs.items():
            yield from _scalars(value, f'{prefix}{key}' if not prefix else f'{prefix}.{key}')
    elif isinstance(outputs, (list, tuple)):
        for i, value in enumerate(outputs):
            yield from _scalars(value, f'{prefix}[{i}]')
    elif torch.is_tensor(outputs) or isinstance(outputs, (int, float)):
        yield prefix or 'output', outputs


def _non_finite_value(value: Any) -> float | None:
    """The first non-finite element of a tensor / number, else None."""
    if torch.is_tensor(value):
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            return None
        bad = ~torch.isfinite(value.detach())
        if bool(bad.any()):
            return float(value.detach()[bad].flatten()[0].float())
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return None


def _epoch_of(runner) -> str:
    """', epoch E' (1-based) for epoch-based loops, else ''."""
    from mmengine.runner import EpochBasedTrainLoop
    loop = getattr(runner, '_train_loop', None)
    return f', epoch {runner.epoch + 1}' if isinstance(loop, EpochBasedTrainLoop) else ''


def _gather_non_finite(found: tuple[str, float] | None) -> list[tuple[int, tuple[str, float]]]:
    """(rank, (key, value)) of every rank whose ``found`` is not None, the same on all ranks.

    One all-reduce of a (world_size,) flag tensor per call (on the backend's device: CUDA for
    nccl); the keys and values are gathered only when some rank found one.
    """
    flags = torch.zeros(get_world_size(), device=get_comm_device())
    flags[get_rank()] = float(found is not None)
    torch.distributed.all_reduce(flags)
    if not bool(flags.any()):
        return []
    everything = all_gather_object(found)
    return [(rank, item) for rank, item in enumerate(everything) if item is not None]


def first_non_finite(tensors: Mapping[str, Any]) -> tuple[str, float] | None:
    """(name, value) of the first entry holding a NaN/Inf, else None."""
    for key, value in _scalars(tensors):
        bad = _non_finite_value(value)
        if bad is not None:
            return key, bad
    return None


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stop training at the first NaN/Inf loss or logged scalar; never save NaN weights.

    Errors raised inside ``model.train_step`` get a note naming the iteration (Python 3.11
    ``add_note``: printed under the error). After each training iteration the loss and every
    scalar in the model's ``outputs`` (the loss dict that ``train_step`` returns) are checked;
    a non-finite one raises ``FloatingPointError`` naming the iteration (1-based, as in the
    log), the key and the value. In a distributed run the finite flag of every rank is
    all-reduced after each iteration (one small tensor), so when any rank sees a non-finite
    value every rank raises the same error at the same iteration, naming the rank(s), key(s) and
    value(s): no rank goes on to wait for the others in the next collective, and no rank writes
    a later checkpoint. ``before_save_checkpoint`` scans the model's state dict and
    raises naming the first non-finite parameter/buffer, so no checkpoint with NaN is written.

    Args:
        check_outputs: check the logged scalars after each iteration.
        check_checkpoint: check the state dict before each checkpoint is saved.
    """

    # above CheckpointHook (VERY_LOW) and LoggerHook (BELOW_NORMAL): runs first after an iter
    priority = 'ABOVE_NORMAL'

    def __init__(self, check_outputs: bool = True, check_checkpoint: bool = True,
                 note_iteration: bool = True) -> None:
        self.check_outputs = check_outputs
        self.check_checkpoint = check_checkpoint
        self.note_iteration = note_iteration

    def before_train(self, runner) -> None:
        """Wrap ``model.train_step`` so that any error raised inside it (e.g. the GRPO-RM loss
        refusing non-finite logits) carries a note naming the iteration."""
        if not self.note_iteration:
            return
        model = runner.model
        train_step = model.train_step
        if getattr(train_step, '_grpo_rm_noted', False):
            return

        def noted_train_step(*args, **kwargs):
            try:
                return train_step(*args, **kwargs)
            except Exception as err:
                if hasattr(err, 'add_note'):  # Python >= 3.11
                    err.add_note(f'(raised in the train step of iteration {runner.iter + 1}'
                                 f'{_epoch_of(runner)}; NonFiniteLossHook)')
                raise

        noted_train_step._grpo_rm_noted = True  # type: ignore[attr-defined]
        model.train_step = noted_train_step

    def after_train(self, runner) -> None:
        model = runner.model
        if getattr(model.__dict__.get('train_step'), '_grpo_rm_noted', False):
            del model.train_step

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if not self.check_outputs:
            return
        found = None
        if outputs is not None:
            found = first_non_finite(outputs if isinstance(outputs, Mapping)
                                     else {'loss': outputs})
        iteration = runner.iter + 1  # runner.iter is incremented after the hooks
        where = f'iteration {iteration}{_epoch_of(runner)}'
        if is_distributed():
            # every rank takes part, found or not, so that all of them stop at this iteration
            # (a rank that stopped alone would leave the others waiting in the next collective)
            bad = _gather_non_finite(found)
            if not bad:
                return
            ranks = ', '.join(str(rank) for rank, _ in bad)
            values = '; '.join(f'rank {rank}: {key} = {value}' for rank, (key, value) in bad)
            raise FloatingPointError(
                f'non-finite training value at {where} on rank {ranks} of '
                f'{get_world_size()} ({values}). Every rank stops here, before any checkpoint '
                f'of this state is written. {_CAUSES}')
        if found is None:
            return
        key, value = found
        raise FloatingPointError(
            f'non-finite training value at {where}: {key} = {value}. '
            f'Training stopped before any checkpoint of this state is written. {_CAUSES}')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.check_checkpoint:
            return
        state = checkpoint.get('state_dict')
        if state is None:
            model = runner.model
            state = getattr(model, 'module', model).state_dict()
        found = first_non_finite(state)
        if found is None:
            return
        key, value = found
        raise FloatingPointError(
            f'refusing to save a checkpoint at iteration {runner.iter}: parameter {key!r} '
            f'holds a non-finite value ({value}). {_CAUSES}')


def check_checkpoint_file(path: str, map_location: str = 'cpu') -> dict:
    """Load a checkpoint file, turning a missing, truncated or corrupt file into a clear error
    that names it. Reads with ``weights_only=True`` (no code from the file runs), as
    :func:`grpo_rm_mm.checkpoints.load_checkpoint_file` does: a file that pickles objects raises
    :class:`~grpo_rm_mm.checkpoints.UntrustedCheckpointError` naming the opt-in, unless
    :func:`grpo_rm_mm.trusted_checkpoints` is active."""
    from ..checkpoints import UntrustedCheckpointError, load_checkpoint_file
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist; pass an existing .pth file '
                                f'(for --resume: a file in the work dir, or no value)')
    try:
        ckpt = load_checkpoint_file(path, map_location=map_location)
    except UntrustedCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001  (zip/pickle/EOF errors all mean a bad file)
        size = osp.getsize(path)
        raise RuntimeError(
            f'checkpoint {path!r} ({size} bytes) cannot be read: {type(err).__name__}: '
            f'{str(err).splitlines()[0] if str(err) else ""}. The file is truncated or corrupt '
            f'(e.g. the run was killed while saving it); use an earlier checkpoint, or delete '
            f'it and resume from the previous one') from err
    if not isinstance(ckpt, dict):
        raise RuntimeError(f'checkpoint {path!r} holds a {type(ckpt).__name__}, not a dict '
                           f'with a state_dict')
    return ckpt


def check_state_dict_shapes(model: nn.Module, state_dict: Mapping[str, Tensor],
                            source: str = 'checkpoint') -> None:
    """Raise naming every parameter of ``state_dict`` whose shape differs from ``model``'s."""
    own = model.state_dict()
    bad = [f'{k}: {tuple(v.shape)} in the file vs {tuple(own[k].shape)} in the model'
           for k, v in state_dict.items()
           if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f'{source} does not match the model: {len(bad)} shape mismatch(es): '
                         f'{"; ".join(bad[:5])}. The checkpoint was trained with another config '
                         f'(e.g. another num_classes / in_channels); use the matching config')


@HOOKS.register_module()
class CheckpointCheckHook(Hook):
    """Before the runner loads ``load_from`` (``tools/test.py CKPT``, ``--resume [CKPT]``),
    check that the file is readable and that its parameter shapes match the model; raise an
    error naming the file (and the mismatched parameters) otherwise.

    mmengine alone fails on a truncated file with ``OSError: [Errno 22] Invalid argument``
    (no file name), and on mismatched shapes only logs a warning and evaluates random weights.
    Remote checkpoints (``http(s)://`` ...) are left to mmengine.
    """

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        path = runner._load_from
        if getattr(runner, '_resume', False) and path is None:
            from mmengine.runner import find_latest_checkpoint
            path = find_latest_checkpoint(runner.work_dir)
        if not path or '://' in str(path):
            return
        ckpt = check_checkpoint_file(str(path))  # weights only, as the runner will read it
        state = ckpt.get('state_dict', ckpt)
        state = {k[len('module.'):] if k.startswith('module.') else k: v
                 for k, v in state.items()}
        model = getattr(runner.model, 'module', runner.model)
        check_state_dict_shapes(model, state, source=f'checkpoint {str(path)!r}')
