"""Shared fixtures: run the project's tools the way a user does (subprocesses)."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# Without a GPU the Triton backend's kernels run on CPU tensors in Triton's interpreter
# (tests/core/test_backends.py, test_triton_backend.py); the backend defines its kernels on
# first use, in the mode this variable then selects.
if not any(Path('/dev').glob('nvidia[0-9]*')):
    os.environ.setdefault('TRITON_INTERPRET', '1')

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tools/ is imported as a namespace package (its converters)
FIXTURE_CONFIGS = REPO / 'tests' / 'fixtures' / 'configs'


def one_hot_advantages(labels: list[int], c: int) -> np.ndarray:
    """The advantages in closed form for the one-hot accuracy reward, population std, eps = 0."""
    sigma = math.sqrt((1 / c) * (1 - 1 / c))
    a = np.full((len(labels), c), -(1 / c) / sigma)
    for q, y in enumerate(labels):
        a[q, y] = (1 - 1 / c) / sigma
    return a


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for a tool subprocess: this interpreter, the repo on PYTHONPATH, 1 thread."""
    env = dict(os.environ)
    env['PYTHON'] = sys.executable
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    env.setdefault('OMP_NUM_THREADS', '1')
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_cmd(cmd: list[str], cwd: Path | None = None, check: bool = True, timeout: int = 600,
            **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd``; on an unexpected exit code fail with the tail of its output."""
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=tool_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f'{" ".join(map(str, cmd))} exited {proc.returncode}:\n{out}')
    return proc


def run_gloo_workers(worker: Callable, tmp_path: Path, nprocs: int = 2,
                     timeout_s: float = 120) -> None:
    """Run ``worker(rank, nprocs, init_file, out_dir)`` in ``nprocs`` forked processes (they
    inherit the imported modules; spawn would re-import mmseg & co.) and wait; fail, stopping
    them, if they have not finished after ``timeout_s``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(nprocs, str(tmp_path / 'init'), str(tmp_path)),
                             nprocs=nprocs, start_method='fork', join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:  # our own children only
                proc.terminate()
            pytest.fail(f'the {nprocs}-process gloo run did not finish in {timeout_s:g} s')


@pytest.fixture
def run_tool() -> Callable[..., subprocess.CompletedProcess]:
    """``run_tool('train.py', CONFIG, '--work-dir', D)``, ``run_tool('dist_train.sh', ...)``."""

    def run(tool: str, *args: object, check: bool = True, **env: str):
        path = REPO / 'tools' / tool
        if tool.endswith('.sh'):
            env.setdefault('PORT', str(free_port()))
            cmd = ['bash', str(path)]
        else:
            cmd = [sys.executable, str(path)]
        return run_cmd(cmd + [str(a) for a in args], check=check, **env)

    return run


@pytest.fixture(autouse=True)
def _isolated_default_scope():
    """Each test ends with the default scope it started with. mmengine's ``DefaultScope`` is
    process-global (its latest instance wins), so a Runner, ``init_model`` or inferencer in
    one test would otherwise pick the registry that a later test's ``MODELS.build`` uses."""
    from mmengine.registry import DefaultScope

    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
