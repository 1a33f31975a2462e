"""Numerical safety: extreme logits stay finite; huge / tiny learning rates and bfloat16 autocast
on CPU never write NaN into a checkpoint; a non-finite loss stops the run naming the iteration
(NonFiniteLossHook); a checkpoint with a non-finite weight is refused before it is written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_common import (
    TRAIN,
    cls_config,
    env_for,
    load,
    non_finite_tensors,
    output,
    run,
    write_cifar,
)

from grpo_rm_mm.models.losses import GRPORMLoss


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict[str, str]:
    return write_cifar(tmp_path_factory.mktemp('num'))


def checkpoints(work: Path) -> list[Path]:
    return sorted(work.glob('*.pth'))


def assert_all_finite(work: Path) -> None:
    for ckpt in checkpoints(work):
        assert non_finite_tensors(ckpt) == [], ckpt


@pytest.mark.parametrize('scale', [1e2, 1e4, 3e4])
def test_extreme_logits_give_finite_loss_and_gradients(scale: float) -> None:
    """Logits of +-scale, pi_old/pi_ref far from the policy (ratio exp(+-2 scale) in log
    space): the loss and its gradient are finite."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randint(-1, 2, (16, 10), generator=gen).float() * scale).requires_grad_()
    y = torch.randint(0, 10, (16, ), generator=gen)
    loss = GRPORMLoss(beta=0.1)
    for old in (z.detach(), -z.detach(), torch.zeros(16, 10)):
        value = loss(z, y, old_logits=old, ref_logits=-z.detach())
        grad, = torch.autograd.grad(value, z)
        assert torch.isfinite(value) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize('lr', [1e6, 1e-12])
def test_huge_and_tiny_learning_rates_never_save_nan(data, tmp_path: Path, lr: float) -> None:
    cfg = cls_config(tmp_path / 'cfg.py', extra=f'optim_wrapper = dict(optimizer=dict(lr={lr}))\n')
    proc = run(TRAIN, cfg, '--work-dir', tmp_path / 'w', env=env_for(data))
    log = output(proc)
    # either training stays finite, or it stops with the hook's / the loss's message
    assert proc.returncode == 0 or 'iteration' in log and 'non-finite' in log, log[-4000:]
    assert_all_finite(tmp_path / 'w')
    if lr < 1e-9:  # a no-op learning rate: the head barely moves from its start
        ckpt = load(tmp_path / 'w' / 'epoch_2.pth')['state_dict']
        assert torch.allclose(ckpt['head.mlp.fc2.weight'], ckpt['head.ref_mlp.fc2.weight'],
                              atol=1e-6)


def test_bfloat16_autocast_on_cpu_trains_finitely(data, tmp_path: Path) -> None:
    cfg = cls_config(tmp_path / 'cfg.py')
    proc = run(TRAIN, cfg, '--work-dir', tmp_path / 'w', '--amp', env=env_for(data))
    log = output(proc)
    assert proc.returncode == 0, log[-4000:]
    assert 'loss_grpo' in log
    ckpt = load(tmp_path / 'w' / 'epoch_2.pth')
    assert ckpt['meta']['iter'] == 20
    assert_all_finite(tmp_path / 'w')


def test_nan_loss_stops_the_run_naming_the_iteration(data, tmp_path: Path) -> None:
    """Cross-entropy baseline head (its loss does not refuse NaN logits): NaN weights before
    iteration 13 give a NaN loss; NonFiniteLossHook stops at iteration 13 (epoch 2), before
    the epoch-2 checkpoint."""
    cfg = cls_config(tmp_path / 'cfg.py', hooks="dict(type='InjectNaNHook', at_iter=13)",
                     extra="model = dict(head=dict(loss=dict(_delete_=True, "
                           "type='CrossEntropyLoss')))\n"
                           "optim_wrapper = dict(inner_steps=1)\n")
    proc = run(TRAIN, cfg, '--work-dir', tmp_path / 'w', env=env_for(data))
    log = output(proc)
    assert proc.returncode != 0
    assert 'FloatingPointError: non-finite training value at iteration 13, epoch 2: loss = nan' \
        in log, log[-4000:]
    assert 'learning rate is too high' in log and 'bfloat16' in log
    assert [p.name for p in checkpoints(tmp_path / 'w')] == ['epoch_1.pth']
    assert_all_finite(tmp_path / 'w')


def test_nan_logits_in_the_grpo_loss_name_the_iteration(data, tmp_path: Path) -> None:
    """GRPO-RM head: the loss itself refuses non-finite logits; the hook adds the iteration."""
    cfg = cls_config(tmp_path / 'cfg.py', hooks="dict(type='InjectNaNHook', at_iter=13)")
    proc = run(TRAIN, cfg, '--work-dir', tmp_path / 'w', env=env_for(data))
    log = output(proc)
    assert proc.returncode != 0
    assert 'non-finite' in log and 'logits' in log, log[-4000:]
    assert 'raised in the train step of iteration 13, epoch 2' in log, log[-4000:]
    assert [p.name for p in checkpoints(tmp_path / 'w')] == ['epoch_1.pth']
    assert_all_finite(tmp_path / 'w')


def test_checkpoint_with_nan_weights_is_refused(data, tmp_path: Path) -> None:
    """With the loss check off, NaN weights written after the last iteration of epoch 1 reach
    the epoch-1 save: before_save_checkpoint refuses it, naming the parameter."""
    cfg = cls_config(tmp_path / 'cfg.py',
                     hooks="dict(type='InjectNaNHook', at_iter=10, when='after_iter')",
                     extra="custom_hooks[1] = dict(type='NonFiniteLossHook', "
                           "check_outputs=False)\n")
    proc = run(TRAIN, cfg, '--work-dir', tmp_path / 'w', env=env_for(data))
    log = output(proc)
    assert proc.returncode != 0
    assert "refusing to save a checkpoint at iteration 10: parameter 'head.mlp.fc2.weight' " \
           'holds a non-finite value (nan)' in log, log[-4000:]
    assert checkpoints(tmp_path / 'w') == []
