"""Through tools/train.py: Tiny-ImageNet folders, long-tailed training, bad configs."""
from __future__ import annotations

import math

import pytest
import torch
from cls_e2e_common import CIFAR_CFG, TIN_CFG, metrics_of, write_cifar_data

from grpo_rm_mm.testing import make_tiny_imagenet


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict[str, str]:
    return write_cifar_data(tmp_path_factory.mktemp('data'))


def test_tiny_imagenet_folders_train(run_tool, tmp_path) -> None:
    root = make_tiny_imagenet(tmp_path / 'tin', num_classes=5, n_train=100, n_val=50, size=32)
    out = run_tool('train.py', TIN_CFG, '--work-dir', tmp_path / 'w', TIN_ROOT=str(root)).stdout
    assert 'loss_grpo' in out
    assert metrics_of(out)['accuracy/top1'] >= 70.0  # chance: 20%


def test_long_tailed_training(run_tool, data, tmp_path) -> None:
    # 20 images per class, ratio 10 -> floor(20 * 10 ** (-c / 9)) images of class c
    n = sum(math.floor(20 * 10 ** (-c / 9) + 1e-9) for c in range(10))
    cfg = tmp_path / 'lt.py'
    cfg.write_text(
        f"_base_ = ['{CIFAR_CFG}']\n"
        "train_dataloader = dict(dataset=dict(_delete_=True, type='LongTailDataset',\n"
        "    imbalance_ratio=10, seed=0, dataset={{_base_.train_dataloader.dataset}}))\n"
        "train_cfg = dict(max_epochs=1, val_interval=1)\n")
    out = run_tool('train.py', cfg, '--work-dir', tmp_path / 'w', **data).stdout
    iters = math.ceil(n / 20)
    assert f'Epoch(train) [1][{iters}/{iters}]' in out
    assert metrics_of(out)['knn_pre_logits/num_train'] == 200  # probes use the full train set


@pytest.mark.parametrize('args,env,message', [
    (['--cfg-options', 'model.head.num_classes=7'], {},
     'model.head.num_classes=7 but the train dataset LocalCIFAR10 has 10 classes'),
    ([], {'CIFAR_ROOT': '/nonexistent/cifar10'}, "no 'cifar-10-batches-py' folder"),
])
def test_bad_config_errors(run_tool, data, tmp_path, args, env, message) -> None:
    proc = run_tool('train.py', CIFAR_CFG, '--work-dir', tmp_path, *args, check=False,
                    **{**data, **env})
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def test_inner_steps_train_through_the_head(run_tool, data, tmp_path) -> None:
    """inner_steps=3: two extra Adam steps per batch on the head's cached features."""
    out = run_tool('train.py', CIFAR_CFG, '--work-dir', tmp_path, '--cfg-options',
                   'optim_wrapper.inner_steps=3', 'train_cfg.max_epochs=2',
                   'train_cfg.val_interval=2', **data).stdout
    assert 'grpo_inner_last' in out
    assert metrics_of(out)['accuracy/top1'] >= 50.0  # chance: 10%
    ckpt = torch.load(tmp_path / 'epoch_2.pth', map_location='cpu', weights_only=False)
    # 20 batches, 2 inner steps after each
    assert ckpt['optimizer']['grpo_inner_steps']['inner_steps_taken'] == 40
