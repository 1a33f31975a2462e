"""The toolboxes' own training, testing, resuming and distributed launch work through this package.

Each config inherits `mmseg::` / `mmpretrain::` bases and reads data written in the real on-disk
formats (Pascal VOC 2012 folder, CIFAR-10 python pickles). Tools run as subprocesses, as users run
them.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import FIXTURE_CONFIGS

from grpo_rm_mm.testing import make_cifar10, make_voc2012

SEG_CFG = FIXTURE_CONFIGS / 'seg_voc_tiny.py'
CLS_CFG = FIXTURE_CONFIGS / 'cls_cifar_tiny.py'


def last_metric(log: str, name: str) -> float:
    values = re.findall(rf'{re.escape(name)}: ([0-9.]+)', log)
    assert values, f'no {name} in the output:\n{log[-3000:]}'
    return float(values[-1])


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory) -> str:
    return str(make_voc2012(tmp_path_factory.mktemp('voc'), n_train=16, n_val=8))


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory) -> str:
    return str(make_cifar10(tmp_path_factory.mktemp('cifar'), n_train=200, n_test=100))


class TestSegmentationToolchain:

    def test_train_test_resume(self, run_tool, voc_root, tmp_path: Path) -> None:
        work = tmp_path / 'work'
        out = run_tool('train.py', SEG_CFG, '--work-dir', work, VOC_ROOT=voc_root).stdout
        assert (work / 'iter_6.pth').is_file()
        val_miou = last_metric(out, 'mIoU')

        test_out = run_tool('test.py', SEG_CFG, work / 'iter_6.pth', '--work-dir',
                            tmp_path / 'test', '--out', tmp_path / 'pred',
                            VOC_ROOT=voc_root).stdout
        # test.py on the checkpoint reproduces the last validation numbers
        assert last_metric(test_out, 'mIoU') == pytest.approx(val_miou, abs=0.01)
        assert 'aAcc' in test_out and '|  background |' in test_out  # per-class table
        pngs = sorted((tmp_path / 'pred').glob('*.png'))
        assert len(pngs) == 8

        resumed = run_tool('train.py', SEG_CFG, '--work-dir', work, '--resume',
                           '--cfg-options', 'train_cfg.max_iters=9', VOC_ROOT=voc_root).stdout
        assert 'resumed epoch: 0, iter: 6' in resumed
        assert 'Iter(train) [7/9]' in resumed and 'Iter(train) [1/9]' not in resumed
        assert (work / 'iter_9.pth').is_file()

    def test_dist_train_two_cpu_processes(self, run_tool, voc_root, tmp_path: Path) -> None:
        proc = run_tool('dist_train.sh', SEG_CFG, 2, '--work-dir', tmp_path, VOC_ROOT=voc_root)
        out = proc.stdout + proc.stderr
        assert 'Distributed training: True' in out
        assert 'using the gloo backend instead of nccl' in out  # CPU fallback, see compat
        assert last_metric(out, 'mIoU') >= 0.0
        assert (tmp_path / 'iter_6.pth').is_file()
        # the 8 validation images are split 4/4 over the two ranks (batch 2 -> 2 iterations)
        assert 'Iter(val) [2/2]' in out

    def test_dist_test_two_cpu_processes(self, run_tool, voc_root, tmp_path: Path) -> None:
        run_tool('train.py', SEG_CFG, '--work-dir', tmp_path, '--cfg-options',
                 'train_cfg.max_iters=3', VOC_ROOT=voc_root)
        single = run_tool('test.py', SEG_CFG, tmp_path / 'iter_3.pth', '--work-dir',
                          tmp_path / 't1', VOC_ROOT=voc_root).stdout
        proc = run_tool('dist_test.sh', SEG_CFG, tmp_path / 'iter_3.pth', 2, '--work-dir',
                        tmp_path / 't2', VOC_ROOT=voc_root)
        assert last_metric(proc.stdout + proc.stderr, 'mIoU') == pytest.approx(
            last_metric(single, 'mIoU'), abs=0.01)


class TestClassificationToolchain:

    def test_train_test_resume(self, run_tool, cifar_root, tmp_path: Path) -> None:
        work = tmp_path / 'work'
        out = run_tool('train.py', CLS_CFG, '--work-dir', work, CIFAR_ROOT=cifar_root).stdout
        assert (work / 'epoch_2.pth').is_file()
        top1 = last_metric(out, 'accuracy/top1')
        assert top1 > 30.0  # 10 colour-coded classes: chance is 10%

        test_out = run_tool('test.py', CLS_CFG, work / 'epoch_2.pth', '--work-dir',
                            tmp_path / 'test', '--out', tmp_path / 'preds.pkl',
                            CIFAR_ROOT=cifar_root).stdout
        assert last_metric(test_out, 'accuracy/top1') == pytest.approx(top1, abs=0.01)
        assert (tmp_path / 'preds.pkl').stat().st_size > 0

        resumed = run_tool('train.py', CLS_CFG, '--work-dir', work, '--resume',
                           '--cfg-options', 'train_cfg.max_epochs=3',
                           CIFAR_ROOT=cifar_root).stdout
        assert 'resumed epoch: 2' in resumed
        assert 'Epoch(train) [3]' in resumed and 'Epoch(train) [1]' not in resumed
        assert (work / 'epoch_3.pth').is_file()

    def test_dist_train_two_cpu_processes(self, run_tool, cifar_root, tmp_path: Path) -> None:
        proc = run_tool('dist_train.sh', CLS_CFG, 2, '--work-dir', tmp_path,
                        CIFAR_ROOT=cifar_root)
        out = proc.stdout + proc.stderr
        assert 'Distributed training: True' in out
        assert last_metric(out, 'accuracy/top1') > 0.0
        assert (tmp_path / 'epoch_2.pth').is_file()

    def test_amp_flag_trains_on_cpu(self, run_tool, cifar_root, tmp_path: Path) -> None:
        run_tool('train.py', CLS_CFG, '--work-dir', tmp_path, '--amp', '--cfg-options',
                 'train_cfg.max_epochs=1', CIFAR_ROOT=cifar_root)
        assert (tmp_path / 'epoch_1.pth').is_file()
        dumped = (tmp_path / 'cls_cifar_tiny.py').read_text()  # the config the run used
        assert "type='AmpOptimWrapper'" in dumped
