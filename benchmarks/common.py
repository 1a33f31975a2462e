"""The benchmarks' harness: seeding, threads, command line printing, a tee of stdout,
interleaved timing, mean/std, and the demo models as ``configs/demo`` builds them.

Models and optimizer wrappers come from ``configs/demo/fashion_mnist_{grpo_rm,ce}.py``
(``Config.fromfile``, the toolbox's ``MODELS``, mmengine's ``build_optim_wrapper``); a benchmark
overrides only the options it varies.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from tqdm import tqdm

import grpo_rm_mm  # noqa: F401  (registers the models, rewards, wrappers, transforms)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the data converters, imported as tools.dataset_converters.*
RESULTS = REPO / 'benchmarks' / 'results'
DEFAULT_DATA_DIR = 'data/demo'
CONFIGS = {'grpo': 'configs/demo/fashion_mnist_grpo_rm.py',
           'ce': 'configs/demo/fashion_mnist_ce.py'}


def setup(threads: int) -> None:
    """Torch threads, mmengine logging at WARNING, no warning about read-only IDX arrays."""
    from mmengine.logging import MMLogger
    torch.set_num_threads(threads)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    warnings.filterwarnings('ignore', message='The given NumPy array is not writable')


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """``--data-dir``, ``--out``, ``--threads``."""
    parser.add_argument('--data-dir', default=DEFAULT_DATA_DIR, help='demo data, converted '
                        'weights and cached features (default: %(default)s)')
    parser.add_argument('--out', default=out_default, help='copy of the printed output')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1: '
                        'on a shared machine one thread per process gives steadier timings)')


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)


@contextlib.contextmanager
def tee_stdout(path: str | Path | None) -> Iterator[None]:
    """Copy everything printed to stdout into ``path`` (progress bars go to stderr)."""
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f, contextlib.redirect_stdout(_Tee(sys.stdout, f)):
        yield


def relative(path: str | Path) -> str:
    """``path`` relative to the current directory when it lies below it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def print_header(title: str) -> None:
    """The exact command line, the title, torch version, threads and time."""
    print(f'$ {shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))}\n# {title}')
    print(f'# torch {torch.__version__}, {torch.get_num_threads()} thread(s), '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}')


def prepare_demo(data_dir: str | Path) -> Path:
    """Fashion-MNIST and the converted EfficientNet-Lite0 weights under ``data_dir`` (both
    idempotent); the demo configs' ``$GRPO_RM_DEMO_DATA`` points there. Returns it resolved."""
    from tools.dataset_converters.fashion_mnist import prepare_fashion_mnist

    data_dir = Path(data_dir).resolve()
    prepare_fashion_mnist(data_dir / 'fashion_mnist')
    weights = data_dir / 'pretrained' / 'efficientnet_lite0.pth'
    if not weights.is_file():
        subprocess.run([sys.executable, str(REPO / 'tools/model_converters/'
                                            'efficientnet_lite0_to_mmpretrain.py'), str(weights)],
                       check=True)
    os.environ['GRPO_RM_DEMO_DATA'] = str(data_dir)
    return data_dir


def demo_config(path: str, loss: dict | None = None, inner_steps: int | None = None,
                lr: float | None = None) -> Config:
    """The config at ``path`` (relative to the repository, e.g. ``CONFIGS['grpo']``) with its
    head loss updated by ``loss`` and its optimizer wrapper's ``inner_steps`` / ``lr`` set.
    Its ``feature_cache`` is off: the demo's cache file is the demo's, and a benchmark that
    caches features says where."""
    cfg = Config.fromfile(str(REPO / path))
    cfg.model.feature_cache = False
    cfg.model.head.loss.update(copy.deepcopy(loss or {}))
    if inner_steps is not None:
        cfg.optim_wrapper.inner_steps = inner_steps
    if lr is not None:
        cfg.optim_wrapper.optimizer.lr = lr
    return cfg


def build(cfg: Config, seed: int = 0):
    """``(model, optim_wrapper)`` of ``cfg``, the global seed set to ``seed`` first: models
    built with one seed start with equal heads whatever their loss."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    seed_everything(seed)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    return model, build_optim_wrapper(model, cfg.optim_wrapper)


@dataclass
class Timings:
    """Per-repetition wall and process-CPU seconds of one timed function."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
                desc: str = 'timing') -> dict[str, Timings]:
    """Time every function ``reps`` times, interleaved (A, B, C, then C, B, A, ...), after
    ``warmup`` untimed rounds: wall (``perf_counter``) and process CPU (``process_time``)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, out = list(fns), {n: Timings() for n in fns}
    for r in tqdm(range(reps), desc=desc, file=sys.stderr, leave=False):
        for n in (names if r % 2 == 0 else names[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            out[n].cpu.append(time.process_time() - c0)
            out[n].wall.append(time.perf_counter() - w0)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
