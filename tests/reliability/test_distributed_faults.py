"""Faults on one rank of a 2-process run (CPU, gloo, ``tools/dist_train.sh``) stop every rank
promptly, far below the collective timeout, and never leave a checkpoint of a later state.

- a non-finite loss on rank 1 only: ``NonFiniteLossHook`` all-reduces the finite flag, so both
  ranks raise the same ``FloatingPointError`` naming the iteration and the rank;
- an error inside rank 1's train step only (NaN weights there, which the GRPO-RM loss refuses):
  rank 1 names the iteration and exits at once, and the launcher stops rank 0.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port
from reliability_common import cls_config, env_for, output, write_cifar

DIST_TRAIN = REPO / 'tools' / 'dist_train.sh'
# a 2-epoch run takes well under a minute here; mmengine's collective timeout is 30 minutes and
# the exit barrier of patch_gloo_teardown 2 minutes: a hang of either would exceed this
PROMPT_S = 150
AT_ITER = 13  # epoch 2, iteration 3 of 10 (10 images per rank and batch, 100 per rank)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict[str, str]:
    return write_cifar(tmp_path_factory.mktemp('dist_faults'))


def dist_train(cfg: Path, work: Path, data: dict[str, str]) -> tuple[subprocess.CompletedProcess,
                                                                       float]:
    env = env_for(data, PORT=str(free_port()))
    start = time.monotonic()
    proc = subprocess.run(['bash', str(DIST_TRAIN), str(cfg), '2', '--work-dir', str(work),
                           '--cfg-options', 'train_dataloader.batch_size=10'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, time.monotonic() - start


def test_nan_loss_on_one_rank_stops_both_with_the_same_message(data, tmp_path: Path) -> None:
    cfg = cls_config(tmp_path / 'cfg.py',
                     hooks=f"dict(type='NaNLossOnRankHook', at_iter={AT_ITER}, rank=1)")
    proc, wall = dist_train(cfg, tmp_path / 'work', data)
    log = output(proc)
    assert proc.returncode != 0, log[-4000:]
    assert wall < PROMPT_S, f'took {wall:.0f} s'
    errors = re.findall(r'FloatingPointError: (.*)', log)
    # one traceback per rank, with the same message: the iteration, the rank and the value
    assert len(errors) == 2 and errors[0] == errors[1], log[-6000:]
    assert f'at iteration {AT_ITER}, epoch 2 on rank 1 of 2' in errors[0]
    assert 'rank 1: loss = nan' in errors[0]
    # epoch 1 was saved, nothing after the bad iteration
    assert sorted(p.name for p in (tmp_path / 'work').glob('*.pth')) == ['epoch_1.pth']


def test_error_in_one_ranks_train_step_stops_the_run_promptly(data, tmp_path: Path) -> None:
    cfg = cls_config(tmp_path / 'cfg.py',
                     hooks=f"dict(type='NaNWeightOnRankHook', at_iter={AT_ITER}, rank=1)")
    proc, wall = dist_train(cfg, tmp_path / 'work', data)
    log = output(proc)
    assert proc.returncode != 0, log[-4000:]
    assert wall < PROMPT_S, f'took {wall:.0f} s:\n{log[-4000:]}'
    assert 'non-finite' in log
    assert f'raised in the train step of iteration {AT_ITER}, epoch 2' in log
    assert sorted(p.name for p in (tmp_path / 'work').glob('*.pth')) == ['epoch_1.pth']
