"""Registered rewards and GRPORMLoss: mmengine / mmpretrain / mmseg faces."""

import numpy as np
import pytest
import torch
from conftest import one_hot_advantages
from mmengine.logging import MessageHub
from mmengine.registry import MODELS

from grpo_rm_mm.models.losses import GRPORMLoss
from grpo_rm_mm.models.rewards import UniformityReward

D = torch.float64


# the uniform weighting's closed forms: -A/(C N) at ratio 1
ACC_ONLY = dict(rewards=[dict(type='AccuracyReward')], adv_eps=0.0, group_weighting='uniform')


# ---------------------------------------------------------------------- rewards
def test_rewards_are_registered_and_weighted() -> None:
    from mmpretrain.registry import MODELS as CLS_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=D)
    y = torch.tensor([0])
    for registry in (MODELS, SEG_MODELS, CLS_MODELS):
        acc = registry.build(dict(type='AccuracyReward', weight=0.5))
        uni = registry.build(dict(type='UniformityReward', weight=2.0))
        conf = registry.build(dict(type='ConfidencePenaltyReward'))
        torch.testing.assert_close(acc(probs, y), torch.tensor([[0.5, 0, 0, 0]], dtype=D))
        torch.testing.assert_close(uni(probs, y), 2 * torch.tensor([[0, -1 / 6, 0, 1 / 6]],
                                                                   dtype=D))
        torch.testing.assert_close(conf(probs, y), torch.tensor([[0, -0.3, -0.2, -0.1]],
                                                                dtype=D))


@pytest.mark.parametrize('weight', [float('nan'), float('inf'), -1.0, 'one', True])
def test_bad_reward_weight_names_the_reward(weight) -> None:
    with pytest.raises(ValueError, match=f'UniformityReward: weight={weight!r}'):
        UniformityReward(weight=weight)
    with pytest.raises(ValueError, match='AccuracyReward'):
        GRPORMLoss(rewards=[dict(type='AccuracyReward', weight=weight)])


def test_unknown_reward_type_and_bad_reward_configs() -> None:
    with pytest.raises(ValueError, match="unknown reward type 'AccuracyRewrd'"):
        GRPORMLoss(rewards=[dict(type='AccuracyRewrd')])
    with pytest.raises(ValueError, match='wieght'):
        GRPORMLoss(rewards=[dict(type='AccuracyReward', wieght=1.0)])
    with pytest.raises(ValueError, match='rewards is empty'):
        GRPORMLoss(rewards=[])
    with pytest.raises(ValueError, match='every reward weight is 0'):
        GRPORMLoss(rewards=[dict(type='AccuracyReward', weight=0.0)])


# ---------------------------------------------------------------------- construction
def test_loss_builds_from_every_scope_with_defaults() -> None:
    from mmpretrain.registry import MODELS as CLS_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    for registry in (MODELS, SEG_MODELS, CLS_MODELS):
        loss = registry.build(dict(type='GRPORMLoss'))
        assert isinstance(loss, GRPORMLoss)
        assert loss.loss_name == 'loss_grpo'
        assert (loss.clip_eps, loss.beta, loss.adv_std, loss.adv_eps, loss.adv_scale,
                loss.loss_weight, loss.ignore_index) == (0.2, 0.0, 'population', 1e-6, 'std',
                                                          1.0, 255)
        assert [type(r).__name__ for r in loss.reward_fns] == ['AccuracyReward',
                                                               'UniformityReward']


@pytest.mark.parametrize('kwargs, match', [
    (dict(loss_name='grpo'), 'must start with "loss_"'),
    (dict(clip_eps=0.0), 'clip_eps=0.0'),
    (dict(beta=-0.1), 'beta=-0.1'),
    (dict(adv_std='sample'), "std='sample'"),
    (dict(adv_scale='max'), "scale='max'"),
    (dict(loss_weight=float('nan')), 'loss_weight=nan'),
])
def test_bad_loss_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GRPORMLoss(**kwargs)


# ---------------------------------------------------------------------- classification
def test_classification_gradient_is_minus_a_over_g() -> None:
    n, c, labels = 3, 5, [4, 0, 2]
    loss_fn = GRPORMLoss(loss_weight=2.0, log_diagnostics=False, **ACC_ONLY)
    z = torch.randn(n, c, dtype=D, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    loss = loss_fn(z, torch.tensor(labels), avg_factor=n)  # mmpretrain's call
    loss.backward()
    np.testing.assert_allclose(z.grad.numpy(), -2.0 * one_hot_advantages(labels, c) / (c * n),
                               rtol=1e-12, atol=1e-15)
    d = loss_fn.last_diagnostics
    assert {'grpo_reward', 'grpo_adv_abs', 'grpo_clip_frac', 'grpo_kl', 'grpo_entropy',
            'grpo_acc'} <= set(d)
    assert not any('loss' in k for k in d)
    assert all(v.ndim == 0 and not v.requires_grad for v in d.values())


def test_classification_label_255_is_a_class_unless_asked() -> None:
    loss_fn = GRPORMLoss(log_diagnostics=False, **ACC_ONLY)
    z = torch.zeros(2, 300, dtype=D, requires_grad=True)
    loss_fn(z, torch.tensor([255, 3])).backward()
    assert z.grad[0, 255] < 0  # class 255 of 300 is rewarded, not ignored
    z.grad = None
    loss_fn(z, torch.tensor([255, 3]), ignore_index=255).backward()
    assert torch.equal(z.grad[0], torch.zeros(300, dtype=D))


def test_soft_targets_from_mixup_are_refused() -> None:
    loss_fn = GRPORMLoss(log_diagnostics=False)
    with pytest.raises(ValueError, match=r'hard labels.*\(4, 3\).*Mixup'):
        loss_fn(torch.zeros(4, 3), torch.full((4, 3), 1 / 3))


def test_mmpretrain_linear_head_with_grpo_loss() -> None:
    from mmpretrain.registry import MODELS as CLS_MODELS
    from mmpretrain.structures import DataSample

    head = CLS_MODELS.build(dict(type='LinearClsHead', num_classes=3, in_channels=4,
                                 loss=dict(type='GRPORMLoss', log_diagnostics=False)))
    feats = (torch.randn(2, 4), )
    samples = [DataSample().set_gt_label(1), DataSample().set_gt_label(2)]
    losses = head.loss(feats, samples)
    assert torch.isfinite(losses['loss'])
    losses['loss'].backward()
    assert head.fc.weight.grad is not None and torch.isfinite(head.fc.weight.grad).all()
    mixed = [DataSample().set_gt_score(torch.tensor([0.5, 0.5, 0.0])) for _ in range(2)]
    with pytest.raises(ValueError, match='Mixup'):
        head.loss(feats, mixed)


# ---------------------------------------------------------------------- segmentation
def _seg_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 3, 3, dtype=D, generator=g)
    label = torch.randint(0, 4, (2, 3, 3), generator=g)
    label[0, 0, :] = 255
    label[1, 2, 1] = 255
    return logits, label


def test_dense_gradient_per_pixel_and_ignored_pixels() -> None:
    logits, label = _seg_batch()
    c = 4
    z = logits.clone().requires_grad_(True)
    loss_fn = GRPORMLoss(log_diagnostics=False, **ACC_ONLY)
    loss_fn(z, label, weight=None, ignore_index=255).backward()  # mmseg's call
    valid = label != 255
    n_valid = int(valid.sum())
    assert n_valid == 14
    expected = np.zeros((2, c, 3, 3))
    for b, i, j in zip(*np.nonzero(valid.numpy())):
        expected[b, :, i, j] = -one_hot_advantages([int(label[b, i, j])], c)[0] / (c * n_valid)
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-12, atol=1e-15)

    # the default ignore_index (255) applies when none is passed; (N, 1, H, W) labels work
    z.grad = None
    loss_fn(z, label.unsqueeze(1)).backward()
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_dense_per_pixel_weight_scales_the_pixel_gradient() -> None:
    logits, label = _seg_batch(1)
    w = torch.rand(2, 3, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    loss_fn = GRPORMLoss(log_diagnostics=False)
    za = logits.clone().requires_grad_(True)
    zb = logits.clone().requires_grad_(True)
    loss_fn(za, label, ignore_index=255).backward()
    loss_fn(zb, label, weight=w, ignore_index=255).backward()
    torch.testing.assert_close(zb.grad, za.grad * w.unsqueeze(1))


def test_dense_with_old_and_ref_logits_matches_flattened_pixels() -> None:
    logits, label = _seg_batch(3)
    g = torch.Generator().manual_seed(4)
    old = logits + 0.3 * torch.randn(logits.shape, dtype=D, generator=g)
    ref = torch.randn(logits.shape, dtype=D, generator=g)
    loss_fn = GRPORMLoss(beta=0.1, log_diagnostics=False)
    dense = loss_fn(logits, label, old_logits=old, ref_logits=ref)

    def flat(x):
        return x.permute(0, 2, 3, 1).reshape(-1, 4)

    pixels = loss_fn(flat(logits), label.reshape(-1), old_logits=flat(old),
                     ref_logits=flat(ref), ignore_index=255)
    assert dense.item() == pytest.approx(pixels.item(), rel=1e-12)


def test_dense_shape_errors_give_both_shapes() -> None:
    loss_fn = GRPORMLoss(log_diagnostics=False)
    logits = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r'\(2, 5, 5\).*\(2, 4, 3, 3\)'):
        loss_fn(logits, torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r'old_logits of shape \(2, 4, 3, 4\).*\(2, 4, 3, 3\)'):
        loss_fn(logits, torch.zeros(2, 3, 3, dtype=torch.long), old_logits=torch.zeros(2, 4, 3, 4))
    with pytest.raises(ValueError, match=r'weight of shape \(2, 3\)'):
        loss_fn(logits, torch.zeros(2, 3, 3, dtype=torch.long), weight=torch.ones(2, 3))
    with pytest.raises(ValueError, match='label 9 at query'):
        loss_fn(logits, torch.full((2, 3, 3), 9))


# ---------------------------------------------------------------------- logging
def test_diagnostics_pushed_to_message_hub_only_when_asked() -> None:
    hub = MessageHub.get_instance('test_grpo_loss_hub')
    logits, label = _seg_batch()
    loss_fn = GRPORMLoss()
    loss_fn(logits, label)
    for key, value in loss_fn.last_diagnostics.items():
        assert hub.get_scalar(f'train/{key}').current() == pytest.approx(value.item())
    quiet = MessageHub.get_instance('test_grpo_loss_quiet')
    GRPORMLoss(log_diagnostics=False)(logits, label)
    assert 'train/grpo_reward' not in quiet.log_scalars


def test_drop_in_loss_decode_of_fcn_head() -> None:
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS as SEG_MODELS
    from mmseg.structures import SegDataSample

    head = SEG_MODELS.build(dict(type='FCNHead', in_channels=4, channels=4, num_convs=1,
                                 num_classes=3, concat_input=False,
                                 loss_decode=dict(type='GRPORMLoss')))
    hub = MessageHub.get_instance('test_grpo_fcn')
    feats = [torch.randn(2, 4, 4, 4)]
    samples = []
    for _ in range(2):
        s = SegDataSample()
        lab = torch.randint(0, 3, (1, 8, 8))
        lab[0, :2] = 255
        s.gt_sem_seg = PixelData(data=lab)
        s.set_metainfo(dict(img_shape=(8, 8), pad_shape=(8, 8)))
        samples.append(s)
    losses = head.loss(feats, samples, train_cfg=dict())
    assert set(losses) >= {'loss_grpo', 'acc_seg'}
    assert torch.isfinite(losses['loss_grpo'])
    losses['loss_grpo'].backward()
    assert torch.isfinite(head.conv_seg.weight.grad).all()
    assert head.conv_seg.weight.grad.abs().sum() > 0
    assert hub.get_scalar('train/grpo_acc').current() >= 0.0


def test_all_ignored_dense_batch_gives_connected_zero_counted_and_warned_once() -> None:
    loss_fn = GRPORMLoss(log_diagnostics=False)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.full((2, 3, 3), 255)
    with pytest.warns(UserWarning, match=r'every query of a batch of shape \(2, 4, 3, 3\) is '
                      r'ignored \(ignore_index=255\).*grpo_ignored_batches'):
        loss = loss_fn(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    assert loss_fn.last_diagnostics['grpo_ignored_batches'].item() == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no second warning
        loss_fn(logits, labels)
    assert loss_fn.last_diagnostics['grpo_ignored_batches'].item() == 2
    labels[0, 0, 0] = 1  # one labelled pixel: an ordinary batch again, the count stays
    loss_fn(logits, labels)
    assert loss_fn.last_diagnostics['grpo_ignored_batches'].item() == 2
    assert loss_fn.last_diagnostics['grpo_queries'].item() == 1


# ---------------------------------------------------------------------- objective options
@pytest.mark.parametrize('weighting', ['uniform', 'pi_old', 'sampled'])
@pytest.mark.parametrize('surrogate', ['clip', 'dual_clip'])
def test_dense_each_weighting_matches_the_core_on_valid_pixels(weighting, surrogate) -> None:
    from grpo_rm_mm.core import accuracy_reward, grpo_rm_loss, uniformity_reward

    logits, label = _seg_batch(5)
    old = logits + 0.8 * torch.randn(logits.shape, dtype=D,
                                     generator=torch.Generator().manual_seed(6))
    opts = dict(group_weighting=weighting, surrogate=surrogate, clip_eps_high=0.28,
                dual_clip_c=2.0)
    loss_fn = GRPORMLoss(log_diagnostics=False, seed=9, **opts)
    z = logits.clone().requires_grad_(True)
    loss_fn(z, label, old_logits=old).backward()
    flat_z = logits.permute(0, 2, 3, 1).reshape(-1, 4).clone().requires_grad_(True)
    flat_old = old.permute(0, 2, 3, 1).reshape(-1, 4)
    gen = None
    if weighting == 'sampled':
        gen = torch.Generator().manual_seed(loss_fn.last_group_seed)
    expected, _ = grpo_rm_loss(flat_z, label.reshape(-1), [accuracy_reward, uniformity_reward],
                               old_logits=flat_old, ignore_index=255, generator=gen, **opts)
    expected.backward()
    grad = z.grad.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(grad, flat_z.grad, rtol=1e-12, atol=1e-15)
    ignored = label.reshape(-1) == 255
    assert int(ignored.sum()) == 4
    assert torch.equal(grad[ignored], torch.zeros(4, 4, dtype=D))


def test_sampled_draws_are_seeded_resumable_and_reusable() -> None:
    logits = torch.randn(64, 10, dtype=D, generator=torch.Generator().manual_seed(0))
    old = logits + 0.5
    y = torch.arange(64) % 10
    a = GRPORMLoss(group_weighting='sampled', seed=3, log_diagnostics=False)
    first = a(logits, y, old_logits=old).item()
    seed_1 = a.last_group_seed
    second = a(logits, y, old_logits=old).item()
    assert a.last_group_seed != seed_1 and first != second
    # the same seed gives the same sequence
    b = GRPORMLoss(group_weighting='sampled', seed=3, log_diagnostics=False)
    assert b(logits, y, old_logits=old).item() == first
    # resume: the draw counter is in the state dict
    state = {k: v.clone() for k, v in b.state_dict().items()}
    assert 'group_draws' in state
    resumed = GRPORMLoss(group_weighting='sampled', seed=3, log_diagnostics=False)
    resumed.load_state_dict(state)
    assert resumed(logits, y, old_logits=old).item() == second
    # an inner step passes the batch's group_seed back and gets the same draws
    assert a(logits, y, old_logits=old, group_seed=seed_1).item() == first
    assert a.last_group_seed == seed_1
    # other weightings have no draw counter in their state
    assert 'group_draws' not in GRPORMLoss(group_weighting='pi_old').state_dict()


@pytest.mark.parametrize('kwargs,match', [
    (dict(group_weighting='expected'), r"GRPORMLoss: group_weighting='expected' is unknown; "
                                       r"use one of \('uniform', 'pi_old', 'sampled'\)"),
    (dict(surrogate='ppo'), r"GRPORMLoss: surrogate='ppo' is unknown; use one of"),
    (dict(surrogate='dual_clip', dual_clip_c=1.0), r'dual_clip_c=1.0 must be > 1 \+'),
    (dict(clip_eps_low=0.0), r'clip_eps_low=0.0 must be > 0'),
    (dict(group_weighting='sampled', group_size=0), r'group_size=0 must be an int >= 2'),
    (dict(seed='0'), r"seed='0' must be an int"),
])
def test_bad_objective_options_in_the_loss_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GRPORMLoss(**kwargs)
