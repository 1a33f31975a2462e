"""A batch whose pixels are all ``ignore_index`` never kills a run.

In process: through the segmentor's ``train_step`` with ``GRPOOptimWrapper`` such a batch gives
a zero loss still connected to the graph, every logged value finite (so ``NonFiniteLossHook``
lets it through), zero gradients, and an optimizer step that changes nothing: with SGD (no
momentum) at any step, and with Adam at its first step only (Adam's moment estimates of earlier
batches still move the weights on a zero gradient, so later Adam steps are not a no-op).
A label outside the classes stays an error.

With 2 processes (``tools/dist_train.sh``, gloo): rank 1's batch is all ignored at every
iteration. The run completes, and since DDP averages the gradients over the 2 ranks, the
weights are those of a 1-process run on rank 0's images alone with half the learning rate
(SGD: w <- w - lr (g_0 + 0) / 2), computed independently here.
"""
from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, tool_env
from mmengine.registry import init_default_scope
from seg_common import DATA_CLASSES, TINY_CFG
from test_seg_head import C, batch, samples, tiny_segmentor

from grpo_rm_mm.datasets.voc import save_voc_mask
from grpo_rm_mm.engine.guards import first_non_finite
from grpo_rm_mm.engine.optim_wrappers import GRPOOptimWrapper
from grpo_rm_mm.testing import make_voc2012


@pytest.fixture(autouse=True)
def mmseg_scope() -> None:
    init_default_scope('mmseg')


def ignored_batch(n: int = 2) -> dict:
    data = batch(n)
    labels = torch.full((n, 32, 32), 255)
    return dict(inputs=data['inputs'], data_samples=samples(labels))


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize('inner_steps', [1, 3])
@pytest.mark.parametrize('optimizer', ['SGD', 'Adam'])
def test_all_ignored_batch_leaves_the_weights_unchanged(optimizer: str,
                                                        inner_steps: int) -> None:
    """SGD without momentum, or Adam's first step: no state that could move the weights."""
    torch.manual_seed(0)
    model = tiny_segmentor()
    opt = getattr(torch.optim, optimizer)(trainable(model), lr=0.1)
    wrapper = GRPOOptimWrapper(opt, inner_steps=inner_steps)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match='is ignored'):
        log = model.train_step(ignored_batch(), wrapper)
    assert log['decode.loss_grpo'].item() == 0.0
    assert first_non_finite(log) is None, log  # NonFiniteLossHook would let it through
    # the log is the first step's; the loss module counts every call (each inner step too)
    assert log['decode.grpo_ignored_batches'].item() == 1
    assert model.decode_head.loss_decode.ignored_batches == inner_steps
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None or not p.grad.any() for p in trainable(model))


def test_loss_is_connected_and_gradients_are_zero() -> None:
    torch.manual_seed(0)
    model = tiny_segmentor()
    data = model.data_preprocessor(ignored_batch(), True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        losses = model(**data, mode='loss')
    loss = losses['decode.loss_grpo']
    assert loss.requires_grad and loss.grad_fn is not None  # DDP's all-reduce hooks fire
    loss.backward()
    grads = [p.grad for p in trainable(model)]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_adam_momentum_still_moves_weights_on_an_ignored_batch() -> None:
    """Documents the limit of "the step changes nothing": after an ordinary Adam step, the
    moment estimates move the weights even on a zero gradient (that is Adam, not a bug)."""
    torch.manual_seed(0)
    model = tiny_segmentor()
    wrapper = GRPOOptimWrapper(torch.optim.Adam(trainable(model), lr=0.1), inner_steps=1)
    model.train_step(batch(), wrapper)
    before = copy.deepcopy(model.decode_head.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.train_step(ignored_batch(), wrapper)
    moved = [k for k, v in model.decode_head.state_dict().items()
             if not torch.equal(v, before[k])]
    assert moved


def test_label_outside_the_classes_is_still_an_error() -> None:
    model = tiny_segmentor()
    labels = torch.full((2, 32, 32), 255)
    labels[1, 5, 5] = C + 3
    data = dict(inputs=batch()['inputs'], data_samples=samples(labels, ['a.png', 'b.png']))
    wrapper = GRPOOptimWrapper(torch.optim.SGD(trainable(model), lr=0.1))
    with pytest.raises(ValueError, match=rf'\[{C + 3}\].*b\.png'):
        model.train_step(data, wrapper)


# ------------------------------------------------------------------------------- 2 processes
ITERS = 3
OPTS = ['train_dataloader.batch_size=1', 'train_dataloader.sampler.shuffle=False',
        f'train_cfg.max_iters={ITERS}', f'train_cfg.val_interval={ITERS}',
        f'default_hooks.checkpoint.interval={ITERS}', 'default_hooks.logger.interval=1',
        'optim_wrapper.optimizer.type=SGD']


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory) -> Path:
    """train.txt = [A, B] with B all ignored (255), so that with 2 ranks and an unshuffled
    sampler rank 0 always gets A and rank 1 always B; only_a.txt = [A]."""
    voc = make_voc2012(tmp_path_factory.mktemp('voc_ignored'), n_train=2, n_val=4, size=64,
                       num_classes=DATA_CLASSES)
    split = voc / 'ImageSets' / 'Segmentation'
    a, b = split.joinpath('train.txt').read_text().split()
    save_voc_mask(np.full((64, 64), 255, np.uint8), voc / 'SegmentationClass' / f'{b}.png')
    split.joinpath('only_a.txt').write_text(f'{a}\n')
    return voc


def head_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    return {k: v for k, v in state.items() if k.startswith('decode_head.')}


def test_one_rank_all_ignored_matches_the_expected_weights(voc_root: Path,
                                                           tmp_path: Path) -> None:
    lr = 0.5
    env = tool_env(VOC_ROOT=str(voc_root), PYTHON=sys.executable)
    two = subprocess.run(
        ['bash', str(REPO / 'tools' / 'dist_train.sh'), str(TINY_CFG), '2', '--work-dir',
         str(tmp_path / 'two'), '--cfg-options', *OPTS, f'optim_wrapper.optimizer.lr={lr}'],
        cwd=REPO, env=dict(env, PORT=str(free_port())), capture_output=True, text=True,
        timeout=600)
    out = two.stdout + two.stderr
    assert two.returncode == 0, out[-6000:]
    assert f'Iter(train) [{ITERS}/{ITERS}]' in out
    # rank 1 warned once although all its ITERS batches were ignored
    assert len(re.findall(r'every query of a batch of shape .* is ignored', out)) == 1, out[-4000:]

    one = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), str(TINY_CFG), '--work-dir',
         str(tmp_path / 'one'), '--cfg-options', *OPTS, f'optim_wrapper.optimizer.lr={lr / 2}',
         'train_dataloader.dataset.ann_file=ImageSets/Segmentation/only_a.txt',
         'default_hooks.checkpoint.interval=1'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, (one.stdout + one.stderr)[-6000:]
    assert 'is ignored' not in one.stdout + one.stderr

    expected = head_state(tmp_path / 'one' / f'iter_{ITERS}.pth')
    got = head_state(tmp_path / 'two' / f'iter_{ITERS}.pth')
    assert expected.keys() == got.keys()
    first = head_state(tmp_path / 'one' / 'iter_1.pth')
    assert any(not torch.equal(first[k], expected[k]) for k in first), 'the head did not move'
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

