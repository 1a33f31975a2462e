"""GRPORMLoss's inverse-odds query weights and logit adjustment, LogitAdjustedCrossEntropyLoss,
ClassPriorHook: against closed forms and hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS

from grpo_rm_mm.core.prior import inverse_odds_weights, log_prior_from_counts
from grpo_rm_mm.datasets.class_counts import dataset_class_counts
from grpo_rm_mm.models.losses import GRPORMLoss
from grpo_rm_mm.models.prior_losses import LogitAdjustedCrossEntropyLoss

D = torch.float64
IMPLEMENTATIONS = ['auto', 'torch_chunked', 'reference']
ACC = [dict(type='AccuracyReward')]


def _batch(n: int = 6, c: int = 5, seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, c, dtype=D, generator=g)
    y = torch.randint(0, c, (n, ), generator=g)
    return z, y


def _grad(loss_fn, z, y, **kw) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    loss_fn(z, y, **kw).backward()
    return z.grad


def _ce_grad(z: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Cross-entropy's gradient (softmax(z) - onehot(y)) / N, by hand."""
    zn = z.numpy()
    p = np.exp(zn - zn.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y.numpy()] -= 1
    return p / len(y)


def _odds(z: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """sqrt((1 - p_y) / p_y) of softmax(z), by hand."""
    zn = z.numpy()
    p = np.exp(zn - zn.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p[np.arange(len(y)), y.numpy()]
    return np.sqrt((1 - py) / py)


# ---------------------------------------------------------------------- inverse-odds weights
@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_inverse_odds_first_update_is_cross_entropys_gradient(implementation) -> None:
    """pi_old weighting, accuracy reward, ratio 1: the raw weights cancel the sqrt(p/(1-p))
    factor exactly; the mean-normalised ones give CE's gradient times N / sum_q u_q."""
    z, y = _batch()
    opts = dict(rewards=ACC, adv_eps=0.0, group_weighting='pi_old', log_diagnostics=False,
                backend=implementation, query_weighting='inverse_odds')
    raw = _grad(GRPORMLoss(query_weight_norm='none', **opts), z, y)
    np.testing.assert_allclose(raw.numpy(), _ce_grad(z, y), rtol=1e-9, atol=1e-13)
    mean = _grad(GRPORMLoss(query_weight_norm='mean', **opts), z, y)
    u = _odds(z, y)
    np.testing.assert_allclose(mean.numpy(), _ce_grad(z, y) * len(y) / u.sum(), rtol=1e-9,
                               atol=1e-13)
    # without the weights the factor is there: CE's gradient times sqrt(p_y / (1 - p_y))
    plain = _grad(GRPORMLoss(**dict(opts, query_weighting='none')), z, y)
    np.testing.assert_allclose(plain.numpy(), _ce_grad(z, y) / u[:, None], rtol=1e-9,
                               atol=1e-13)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_inverse_odds_weights_come_from_pi_old_and_keep_rewards_and_clip(implementation) -> None:
    """Later inner step (old logits != logits), accuracy + uniformity rewards, dual clip: the
    loss equals the unweighted loss given the hand-made weights u(pi_old) / mean(u), and the
    weights carry no gradient."""
    z, y = _batch(8, 4, seed=1)
    old = z + 0.7 * torch.randn(z.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    opts = dict(group_weighting='pi_old', surrogate='dual_clip', log_diagnostics=False,
                backend=implementation)
    corrected = GRPORMLoss(query_weighting='inverse_odds', **opts)
    plain = GRPORMLoss(**opts)
    u = torch.from_numpy(_odds(old, y))
    u = u / u.mean()
    got = _grad(corrected, z, y, old_logits=old)
    want = _grad(plain, z, y, old_logits=old, weight=u)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert float(corrected.last_diagnostics['grpo_clip_frac']) > 0  # the clip acts here
    zz = z.clone().requires_grad_(True)
    torch.testing.assert_close(corrected(zz, y, old_logits=old), plain(z, y, old_logits=old,
                                                                          weight=u))


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_inverse_odds_dense_multiplies_seg_weight_over_valid_pixels(implementation) -> None:
    g = torch.Generator().manual_seed(3)
    z = 2 * torch.randn(2, 4, 3, 3, dtype=D, generator=g)
    label = torch.randint(0, 4, (2, 3, 3), generator=g)
    label[0, 0, :] = 255
    w = torch.rand(2, 3, 3, dtype=D, generator=g) + 0.5
    opts = dict(group_weighting='pi_old', log_diagnostics=False, backend=implementation)
    got = _grad(GRPORMLoss(query_weighting='inverse_odds', **opts), z, label, weight=w,
                ignore_index=255)
    valid = label != 255
    flat_z = z.movedim(1, -1)[valid]
    u = _odds(flat_z, label[valid])
    u_map = torch.zeros(2, 3, 3, dtype=D)
    u_map[valid] = torch.from_numpy(u / u.mean())
    want = _grad(GRPORMLoss(**opts), z, label, weight=w * u_map, ignore_index=255)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert torch.all(got[0, :, 0, :] == 0)


def test_inverse_odds_weight_is_capped_when_the_true_class_underflows() -> None:
    z = torch.tensor([[0.0, 200.0], [0.0, 0.0]])  # p_y = exp(-200) = 0 in float32
    y = torch.tensor([0, 0])
    u = inverse_odds_weights(z, y, torch.tensor([True, True]), cap=100.0, norm='none')
    torch.testing.assert_close(u, torch.tensor([100.0, 1.0]))
    u = inverse_odds_weights(z, y, torch.tensor([True, False]), cap=7.0, norm='mean')
    torch.testing.assert_close(u, torch.tensor([1.0, 0.0]))
    loss = GRPORMLoss(query_weighting='inverse_odds', log_diagnostics=False)
    zz = z.clone().requires_grad_(True)
    loss(zz, y).backward()
    assert torch.isfinite(zz.grad).all()


# ---------------------------------------------------------------------- logit adjustment
COUNTS = [40, 20, 10, 5, 1]


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_logit_adjusted_grpo_is_the_objective_on_shifted_logits(implementation) -> None:
    z, y = _batch(7, 5, seed=4)
    g = torch.Generator().manual_seed(5)
    old = z + 0.5 * torch.randn(z.shape, dtype=D, generator=g)
    ref = z + 0.5 * torch.randn(z.shape, dtype=D, generator=g)
    tau = 1.5
    shift = tau * torch.log(torch.tensor(COUNTS, dtype=D) / sum(COUNTS))
    opts = dict(group_weighting='pi_old', beta=0.1, log_diagnostics=False,
                backend=implementation)
    adjusted = GRPORMLoss(logit_adjust_tau=tau, **opts)
    adjusted.set_class_counts(COUNTS)
    got = _grad(adjusted, z, y, old_logits=old, ref_logits=ref)
    want = _grad(GRPORMLoss(**opts), z + shift, y, old_logits=old + shift, ref_logits=ref + shift)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(got, _grad(GRPORMLoss(**opts), z, y, old_logits=old,
                                         ref_logits=ref))


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_adjusted_and_corrected_first_update_is_logit_adjusted_ce(implementation) -> None:
    """Both options, accuracy reward, raw weights, ratio 1: the gradient of the logit-adjusted
    cross-entropy, (softmax(z + tau log prior) - onehot(y)) / N, by hand."""
    z, y = _batch(9, 5, seed=6)
    tau = 1.0
    loss = GRPORMLoss(rewards=ACC, adv_eps=0.0, group_weighting='pi_old',
                      query_weighting='inverse_odds', query_weight_norm='none',
                      logit_adjust_tau=tau, log_diagnostics=False, backend=implementation)
    loss.set_class_counts(COUNTS)
    shift = tau * np.log(np.array(COUNTS) / sum(COUNTS))
    want = _ce_grad(z + torch.from_numpy(shift), y)
    np.testing.assert_allclose(_grad(loss, z, y).numpy(), want, rtol=1e-9, atol=1e-13)
    la_ce = LogitAdjustedCrossEntropyLoss(tau=tau)
    la_ce.set_class_counts(COUNTS)
    np.testing.assert_allclose(_grad(la_ce, z, y, avg_factor=len(y)).numpy(), want, rtol=1e-12,
                               atol=1e-15)


def test_logit_adjusted_ce_value_by_hand_dense_and_plain_ce_at_tau_0() -> None:
    z, y = _batch(6, 5, seed=7)
    loss = LogitAdjustedCrossEntropyLoss(tau=2.0, loss_weight=0.5)
    loss.set_class_counts(COUNTS)
    prior = np.array(COUNTS) / sum(COUNTS)
    s = z.numpy() + 2.0 * np.log(prior)
    logp = s - np.log(np.exp(s).sum(1, keepdims=True))
    want = -0.5 * logp[np.arange(6), y.numpy()].mean()
    assert math.isclose(float(loss(z, y)), want, rel_tol=1e-12)
    torch.testing.assert_close(LogitAdjustedCrossEntropyLoss(tau=0.0)(z, y),
                               F.cross_entropy(z, y))
    # dense, with ignored pixels and mmseg's per-pixel weights
    g = torch.Generator().manual_seed(8)
    zd = torch.randn(2, 5, 3, 3, dtype=D, generator=g)
    yd = torch.randint(0, 5, (2, 3, 3), generator=g)
    yd[1, 2, :] = 255
    wd = torch.rand(2, 3, 3, dtype=D, generator=g)
    valid = yd != 255
    flat = zd.movedim(1, -1)[valid]
    per = F.cross_entropy(flat + torch.from_numpy(2.0 * np.log(prior)), yd[valid],
                          reduction='none')
    torch.testing.assert_close(loss(zd, yd, weight=wd, ignore_index=255),
                               0.5 * (per * wd[valid]).mean())


def test_prior_options_are_checked_with_the_fix() -> None:
    with pytest.raises(ValueError, match="query_weighting='odds' is unknown"):
        GRPORMLoss(query_weighting='odds')
    with pytest.raises(ValueError, match="query_weight_norm='sum' is unknown"):
        GRPORMLoss(query_weight_norm='sum')
    with pytest.raises(ValueError, match='query_weight_cap=0.5 must be'):
        GRPORMLoss(query_weight_cap=0.5)
    for tau in (-1.0, float('nan'), 'one'):
        with pytest.raises(ValueError, match='tau='):
            GRPORMLoss(logit_adjust_tau=tau)
        with pytest.raises(ValueError, match='tau='):
            LogitAdjustedCrossEntropyLoss(tau=tau)
    z, y = _batch()
    for loss in (GRPORMLoss(logit_adjust_tau=1.0), LogitAdjustedCrossEntropyLoss()):
        with pytest.raises(ValueError, match="ClassPriorHook"):
            loss(z, y)
        with pytest.raises(ValueError, match=r'class\(es\) \[1\] have 0 training samples'):
            loss.set_class_counts([3, 0, 2])
    loss = GRPORMLoss(logit_adjust_tau=1.0)
    loss.set_class_counts([1, 2, 3])
    with pytest.raises(ValueError, match='prior has 3 classes'):
        loss(z, y)
    assert 'class_log_prior' not in loss.state_dict()  # recomputed each run by the hook


def test_loss_builds_from_the_toolbox_registries() -> None:
    from mmpretrain.registry import MODELS as CLS_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    for registry in (MODELS, CLS_MODELS, SEG_MODELS):
        assert registry.build(dict(type='LogitAdjustedCrossEntropyLoss', tau=1.0)).tau == 1.0
        built = registry.build(dict(type='GRPORMLoss', query_weighting='inverse_odds',
                                    logit_adjust_tau=1.0))
        assert built.query_weighting == 'inverse_odds' and built.logit_adjust_tau == 1.0


# ---------------------------------------------------------------------- the prior of a dataset
def test_class_prior_hook_sets_the_counts_of_a_real_long_tailed_training_set(tmp_path) -> None:
    """A real mmengine run: CIFAR-format files written here, LongTailDataset around them,
    ClassPriorHook; the loss's prior is the log frequency of the labels the loader reads."""
    from conftest import REPO
    from mmengine.config import Config
    from mmengine.runner import Runner

    from grpo_rm_mm.testing import make_cifar10

    make_cifar10(tmp_path / 'cifar', n_train=200, n_test=20, seed=0)
    cfg = Config.fromfile(str(REPO / 'tests' / 'cls' / 'configs' / 'grpo_rm_cifar10_tiny.py'))
    inner = dict(cfg.train_dataloader.dataset, data_root=str(tmp_path / 'cifar'))
    cfg.train_dataloader.dataset = dict(type='LongTailDataset', imbalance_ratio=10, seed=0,
                                        dataset=inner)
    cfg.model.head.loss = dict(type='GRPORMLoss', logit_adjust_tau=1.0,
                               query_weighting='inverse_odds')
    cfg.custom_hooks = [dict(type='ClassPriorHook')]
    cfg.train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=10)
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10)
    cfg.work_dir = str(tmp_path / 'work')
    runner = Runner.from_cfg(cfg)
    runner.train()
    ds = runner.train_dataloader.dataset
    labels = [int(ds[i]['data_samples'].gt_label) for i in range(len(ds))]
    counts = np.bincount(labels, minlength=10)
    assert counts[0] == 20 and counts[-1] == 2  # the long tail itself
    assert dataset_class_counts(ds) == counts.tolist()
    loss = runner.model.head.loss_module
    np.testing.assert_allclose(loss.class_log_prior.numpy(), np.log(counts / counts.sum()),
                               rtol=1e-12)
    torch.testing.assert_close(log_prior_from_counts(counts), loss.class_log_prior)


def test_class_prior_hook_refuses_a_model_without_a_prior_loss() -> None:
    from types import SimpleNamespace

    from grpo_rm_mm.engine.prior_hook import ClassPriorHook

    runner = SimpleNamespace(model=torch.nn.Sequential(GRPORMLoss(),
                                                       LogitAdjustedCrossEntropyLoss(tau=0.0)))
    with pytest.raises(ValueError, match='no loss that uses a class prior'):
        ClassPriorHook().before_train(runner)


# ---------------------------------------------------------------------- class-balanced weights
@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_class_balanced_weights_scale_each_query_by_its_inverse_prior(implementation) -> None:
    """Raw inverse-odds and class-balanced weights, accuracy reward, ratio 1: each row of the
    gradient is CE's times 1 / (C prior_y), and so is the balanced CE's."""
    z, y = _batch(8, 5, seed=9)
    w_class = sum(COUNTS) / (len(COUNTS) * np.array(COUNTS, dtype=float))
    want = _ce_grad(z, y) * w_class[y.numpy()][:, None]
    loss = GRPORMLoss(rewards=ACC, adv_eps=0.0, group_weighting='pi_old',
                      query_weighting='inverse_odds', query_weight_norm='none',
                      class_weighting='balanced', log_diagnostics=False,
                      backend=implementation)
    assert loss.uses_class_prior
    loss.set_class_counts(COUNTS)
    np.testing.assert_allclose(_grad(loss, z, y).numpy(), want, rtol=1e-9, atol=1e-13)
    ce = LogitAdjustedCrossEntropyLoss(tau=0.0, class_weighting='balanced')
    ce.set_class_counts(COUNTS)
    np.testing.assert_allclose(_grad(ce, z, y).numpy(), want, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="class_weighting='inverse' is unknown"):
        GRPORMLoss(class_weighting='inverse')
    with pytest.raises(ValueError, match='ClassPriorHook'):
        GRPORMLoss(class_weighting='balanced')(z, y)
