"""2-process training (CPU, gloo) gives the metrics and weights of 1 process with the same total
batch: the distributed sampler splits each batch of 20 into 2 x 10, DDP averages the
gradients, and the kNN/SR probes gather the representations of both ranks."""
from __future__ import annotations

import pytest
import torch
from cls_e2e_common import CIFAR_CFG, metrics_of, write_cifar_data


def test_two_processes_match_one_with_the_same_total_batch(run_tool, tmp_path) -> None:
    data = write_cifar_data(tmp_path / 'data')
    opts = ['train_cfg.max_epochs=2', 'train_cfg.val_interval=2']
    single = metrics_of(run_tool('train.py', CIFAR_CFG, '--work-dir', tmp_path / 'one',
                                 '--cfg-options', *opts, **data).stdout)
    proc = run_tool('dist_train.sh', CIFAR_CFG, 2, '--work-dir', tmp_path / 'two',
                    '--cfg-options', 'train_dataloader.batch_size=10', *opts, **data)
    out = proc.stdout + proc.stderr
    assert 'Distributed training: True' in out
    assert 'Epoch(train) [1][10/10]' in out  # 100 images per rank, 10 per batch
    dist = metrics_of(out)
    assert dist['knn_pre_logits/num_train'] == 200 and dist['sr_pre_logits/num_test'] == 100
    assert set(dist) == set(single)
    assert single['accuracy/top1'] >= 50.0  # trained (chance: 10%), not two initial states
    for key, value in single.items():
        assert dist[key] == pytest.approx(value, abs=1e-6), key
    one = torch.load(tmp_path / 'one' / 'epoch_2.pth', map_location='cpu', weights_only=False)
    two = torch.load(tmp_path / 'two' / 'epoch_2.pth', map_location='cpu', weights_only=False)
    head = [k for k in one['state_dict'] if k.startswith('head.')]
    assert head
    for name in head:
        torch.testing.assert_close(two['state_dict'][name], one['state_dict'][name],
                                   atol=1e-5, rtol=1e-4, msg=name)
