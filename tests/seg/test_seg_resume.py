"""A GRPO-RM segmentation run killed mid-training and resumed with ``--resume`` ends where an
uninterrupted run with the same seed ends: same final mIoU, same head weights."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tool_env
from seg_common import DATA_CLASSES, TINY_CFG, last_metric

from grpo_rm_mm.testing import make_voc2012

TRAIN = [sys.executable, str(REPO / 'tools' / 'train.py'), str(TINY_CFG)]


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory) -> str:
    return str(make_voc2012(tmp_path_factory.mktemp('voc'), n_train=32, n_val=8, size=64,
                            num_classes=DATA_CLASSES))


def head_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    return {k: v for k, v in state.items() if k.startswith('decode_head.')}


def kill_after_first_checkpoint(work: Path, env: dict[str, str]) -> None:
    """Start training; SIGKILL it (its own process group) once a checkpoint is complete
    (``last_checkpoint`` is written after the save), well before the end."""
    proc = subprocess.Popen(TRAIN + ['--work-dir', str(work)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (work / 'last_checkpoint').exists():
            assert proc.poll() is None, f'training exited early with {proc.returncode}'
            assert time.monotonic() < deadline, 'no checkpoint after 300 s'
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / 'iter_40.pth').exists()


def test_resume_after_kill_matches_uninterrupted_run(voc_root: str, tmp_path: Path) -> None:
    env = tool_env(VOC_ROOT=voc_root)
    straight = subprocess.run(TRAIN + ['--work-dir', str(tmp_path / 'straight')], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-6000:]

    work = tmp_path / 'killed'
    kill_after_first_checkpoint(work, env)
    latest = Path((work / 'last_checkpoint').read_text().strip())
    resumed = subprocess.run(TRAIN + ['--work-dir', str(work), '--resume'], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-6000:]
    done = int(latest.stem.split('_')[1])
    assert f'resumed epoch: 0, iter: {done}' in out
    logged = [int(k) for k in re.findall(r'Iter\(train\) \[\s*(\d+)/40\]', out)]
    assert logged and min(logged) > done and max(logged) == 40

    assert last_metric(out, 'mIoU') == last_metric(straight.stdout, 'mIoU')
    assert last_metric(out, 'aAcc') == last_metric(straight.stdout, 'aAcc')
    a, b = head_state(tmp_path / 'straight' / 'iter_40.pth'), head_state(work / 'iter_40.pth')
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
