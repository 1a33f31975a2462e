"""Shared start-up for ``tools/train.py`` and ``tools/test.py`` (mmpretrain and mmseg configs)."""
from __future__ import annotations

import argparse
import contextlib
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

__all__ = ['DictAction', 'add_launch_args', 'parse_launch_args', 'load_config', 'enable_amp',
           'build_runner', 'checkpoint_trust']

_AMP_TYPES = {'OptimWrapper': 'AmpOptimWrapper', 'GRPOOptimWrapper': 'GRPOAmpOptimWrapper'}


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """The flags every tool shares with the toolboxes' scripts: ``--cfg-options``,
    ``--launcher`` and ``--local_rank`` (set by ``torch.distributed.launch``)."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. train_cfg.max_iters=100')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_launch_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, and export ``LOCAL_RANK`` for launchers that only pass ``--local_rank``."""
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def load_config(path: str, cfg_options: dict | None, launcher: str,
                work_dir: str | None, checkpoint: str | None = None) -> Config:
    """Read a config, apply ``--cfg-options``/``--launcher``/``--work-dir`` like the toolboxes,
    and, for the test tools, load ``checkpoint`` (which must exist)."""
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist; pass the path of a '
                                f'config, e.g. configs/grpo_rm_voc.py')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    if checkpoint is not None:
        cfg.load_from = checkpoint
    return cfg


def enable_amp(cfg: Config) -> None:
    """``--amp``: switch the optimizer wrapper to its AMP version with a dynamic loss scale."""
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper in _AMP_TYPES.values():
        print(f'AMP is already on ({wrapper}); --amp changes nothing.')
        return
    if wrapper not in _AMP_TYPES:
        raise ValueError(f'--amp supports optim_wrapper types {sorted(_AMP_TYPES)}, '
                         f'got {wrapper!r}; set an AMP wrapper in the config instead')
    cfg.optim_wrapper.type = _AMP_TYPES[wrapper]
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def build_runner(cfg: Config) -> Runner:
    """Build the runner the config asks for (``runner_type``), else mmengine's Runner."""
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def checkpoint_trust(cfg: Config) -> contextlib.AbstractContextManager:
    """The context the tools run in: :func:`grpo_rm_mm.trusted_checkpoints` when the config (or
    ``--cfg-options trusted_checkpoints=True``) opts in to reading checkpoints that pickle
    Python objects (legacy mmengine files), else nothing (every checkpoint is read with
    ``weights_only=True``)."""
    from ..checkpoints import trusted_checkpoints
    trust = cfg.get('trusted_checkpoints', False)
    if not isinstance(trust, bool):
        raise ValueError(f'trusted_checkpoints={trust!r} must be True or False')
    return trusted_checkpoints() if trust else contextlib.nullcontext()
