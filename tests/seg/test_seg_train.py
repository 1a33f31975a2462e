"""The documented path at test size: ``tools/dist_train.sh`` (2 CPU processes) trains the GRPO-RM
config on a generated Pascal VOC 2012 folder, then ``tools/test.py`` on its checkpoint
reproduces the validation numbers, prints aAcc / per-class IoU and Acc / mIoU, and ``--out``
writes the predictions as VOC-palette PNGs."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from seg_common import (
    DATA_CLASSES,
    TINY_CFG,
    background_only_miou,
    last_metric,
    miou_from_pngs,
    read_masks,
)

from grpo_rm_mm.datasets.voc import VOC_CLASSES, voc_palette
from grpo_rm_mm.testing import make_voc2012


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory) -> str:
    return str(make_voc2012(tmp_path_factory.mktemp('voc'), n_train=32, n_val=8, size=64,
                            num_classes=DATA_CLASSES))


@pytest.fixture(scope='module')
def trained(voc_root: str, tmp_path_factory) -> tuple[Path, str]:
    """A 40-iteration GRPO-RM run with 2 processes (batch 4 each); (work dir, its output)."""
    import subprocess
    import sys

    from conftest import REPO, free_port, tool_env

    work = tmp_path_factory.mktemp('work')
    proc = subprocess.run(
        ['bash', str(REPO / 'tools' / 'dist_train.sh'), str(TINY_CFG), '2', '--work-dir',
         str(work)], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=tool_env(VOC_ROOT=voc_root, PORT=str(free_port()), PYTHON=sys.executable))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return work, out


def test_dist_train_learns_well_above_background_only(trained, voc_root: str) -> None:
    work, out = trained
    assert 'Distributed training: True' in out
    assert (work / 'iter_40.pth').is_file()
    # the 8 validation images are split over the two ranks (batch 4: 1 iteration each)
    assert 'Iter(val) [1/1]' in out
    losses = re.findall(r'decode\.loss_grpo: (-?[0-9.]+)', out)
    assert losses and 'decode.grpo_reward' in out and 'decode.acc_seg' in out
    floor = background_only_miou(voc_root)
    _, masks = read_masks(voc_root, 'val')
    labelled = np.concatenate([m[m != 255] for m in masks])
    assert last_metric(out, 'mIoU') > 2 * floor, f'background-only mIoU is {floor:.2f}'
    assert last_metric(out, 'aAcc') > 100 * float((labelled == 0).mean())
    rewards = [float(r) for r in re.findall(r'decode\.grpo_reward: ([0-9.]+)', out)]
    # the expected reward of pi_old (at most 1: p_y plus a non-positive uniformity term)
    # rises: its shortfall from 1 at least halves between the first and the last log
    assert rewards[-1] > rewards[0] and 1 - rewards[-1] < 0.5 * (1 - rewards[0]), rewards


def test_test_tool_reproduces_validation_and_writes_palette_pngs(
        trained, voc_root: str, run_tool, tmp_path: Path) -> None:
    work, train_out = trained
    pred = tmp_path / 'pred'
    out = run_tool('test.py', TINY_CFG, work / 'iter_40.pth', '--work-dir', tmp_path / 'test',
                   '--out', pred, VOC_ROOT=voc_root).stdout
    for name in ('aAcc', 'mIoU', 'mAcc'):
        assert last_metric(out, name) == pytest.approx(last_metric(train_out, name), abs=0.01)
    # the per-class table: every VOC class with its IoU and pixel accuracy
    assert re.search(r'\|\s+Class\s+\|\s+IoU\s+\|\s+Acc\s+\|', out)
    for cls in VOC_CLASSES:
        assert re.search(rf'\|\s+{cls}\s+\|\s+(nan|[0-9.]+)\s+\|\s+(nan|[0-9.]+)\s+\|', out), cls
    names, _ = read_masks(voc_root, 'val')
    assert sorted(p.stem for p in pred.glob('*.png')) == sorted(names)
    first = Image.open(pred / f'{names[0]}.png')
    assert first.mode == 'P' and first.getpalette()[:3 * 256] == voc_palette()
    # the printed numbers are those of the written PNGs against the ground-truth masks
    a_acc, miou = miou_from_pngs(pred, voc_root)
    assert last_metric(out, 'aAcc') == pytest.approx(a_acc, abs=0.01)
    assert last_metric(out, 'mIoU') == pytest.approx(miou, abs=0.01)


def test_stock_mmseg_inference_api_reads_the_checkpoint(trained, voc_root: str) -> None:
    """README, "Inference with the stock APIs": ``mmseg.apis.init_model`` / ``inference_model``
    on the ``tools/train.py`` checkpoint, with no trust wrapper (the file is plain data), predict
    what the run's own validation measured."""
    import tempfile

    import torch
    from mmseg.apis import inference_model, init_model

    from grpo_rm_mm.datasets.voc import save_voc_mask

    work, train_out = trained
    checkpoint = str(work / 'iter_40.pth')
    torch.load(checkpoint, map_location='cpu', weights_only=True)  # what torch >= 2.6 does

    model = init_model(str(TINY_CFG), checkpoint, device='cpu')
    names, _ = read_masks(voc_root, 'val')
    with tempfile.TemporaryDirectory() as pred:
        for name in names:
            result = inference_model(model, f'{voc_root}/JPEGImages/{name}.jpg')
            label_map = result.pred_sem_seg.data[0].numpy().astype(np.uint8)
            save_voc_mask(label_map, Path(pred) / f'{name}.png')
        a_acc, miou = miou_from_pngs(pred, voc_root)
    assert a_acc == pytest.approx(last_metric(train_out, 'aAcc'), abs=0.01)
    assert miou == pytest.approx(last_metric(train_out, 'mIoU'), abs=0.01)
