"""A GRPO-RM classification run (deterministic, GRPOOptimWrapper inner_steps=2, beta > 0 so the
reference head exists) killed with SIGKILL mid-way and resumed with ``--resume`` ends with the
same weights, reference head, optimizer state and counters, and metric as an uninterrupted run.

pi_old is recomputed from the current weights at the start of every batch and the inner-step
cache is cleared after each optimizer step, so at a checkpoint (an iteration boundary) the
pre-update policy *is* the saved head: restoring the head restores it. The segmentation
counterpart is tests/seg/test_seg_resume.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from reliability_common import TRAIN, cls_config, env_for, load, output, run, write_cifar

from grpo_rm_mm.engine.optim_wrappers import STATE_KEY

EPOCHS = 4  # 10 iterations each


@pytest.fixture(scope='module')
def setup(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp('resume')
    cfg = cls_config(root / 'cfg.py', hooks="dict(type='PaceHook', from_epoch=2)",
                     max_epochs=EPOCHS)
    return cfg, write_cifar(root)


def kill_after_first_checkpoint(cfg: Path, work: Path, env: dict[str, str]) -> None:
    """Start training in its own process group; SIGKILL it as soon as the first checkpoint is
    complete (``last_checkpoint`` is written after the save); the pace hook keeps the later
    epochs slow enough that this is mid-way."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), str(cfg), '--work-dir', str(work)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (work / 'last_checkpoint').exists():
            assert proc.poll() is None, f'training exited early with {proc.returncode}'
            assert time.monotonic() < deadline, 'no checkpoint after 240 s'
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / f'epoch_{EPOCHS}.pth').exists(), 'the run finished before the kill'


def val_top1(log: str) -> str:
    lines = [line for line in log.splitlines() if 'Epoch(val)' in line]
    assert lines, log[-3000:]
    return lines[-1].split('accuracy/top1:')[1].split()[0]


def test_sigkill_and_resume_equals_uninterrupted_run(setup, tmp_path: Path) -> None:
    cfg, data = setup
    straight = run(TRAIN, cfg, '--work-dir', tmp_path / 'straight', env=env_for(data))
    assert straight.returncode == 0, output(straight)[-6000:]

    work = tmp_path / 'killed'
    kill_after_first_checkpoint(cfg, work, env_for(data, RELIABILITY_PACE_S='0.15'))
    latest = Path((work / 'last_checkpoint').read_text().strip())
    done = int(latest.stem.split('_')[1])
    assert 1 <= done < EPOCHS
    assert load(latest)['optimizer'][STATE_KEY] == dict(
        outer_steps=10 * done, inner_steps_taken=10 * done, inner_steps=2)

    resumed = run(TRAIN, cfg, '--work-dir', work, '--resume', env=env_for(data))
    log = output(resumed)
    assert resumed.returncode == 0, log[-6000:]
    assert f'resumed epoch: {done}, iter: {10 * done}' in log
    assert f'Epoch(train) [{done}]' not in log  # no epoch was trained twice
    assert val_top1(log) == val_top1(output(straight))

    a = load(tmp_path / 'straight' / f'epoch_{EPOCHS}.pth')
    b = load(work / f'epoch_{EPOCHS}.pth')
    sa, sb = a['state_dict'], b['state_dict']
    assert sa.keys() == sb.keys()
    assert any(k.startswith('head.ref_mlp.') for k in sa)  # the reference head is saved
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # the reference head is the *starting* head, restored on resume, never trained
    first = load(latest)['state_dict']
    for key in (k for k in sa if k.startswith('head.ref_mlp.')):
        assert torch.equal(sb[key], first[key]), key
    assert not torch.equal(sa['head.mlp.fc2.weight'], sa['head.ref_mlp.fc2.weight'])
    # optimizer wrapper's counters and Adam state
    assert a['optimizer'][STATE_KEY] == b['optimizer'][STATE_KEY] == dict(
        outer_steps=10 * EPOCHS, inner_steps_taken=10 * EPOCHS, inner_steps=2)
    for pid, state in a['optimizer']['state'].items():
        for name, value in state.items():
            other = b['optimizer']['state'][pid][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (pid, name)
    assert a['meta']['iter'] == b['meta']['iter'] == 10 * EPOCHS
