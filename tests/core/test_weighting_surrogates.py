"""Group weightings x surrogates of the GRPO-RM objective against independent expectations:
hand-written weighted statistics, closed-form gradients at ratio 1, float64 finite differences
with clips active, Monte-Carlo convergence of the sampled group, the dual clip's bound."""
import itertools
import math

import numpy as np
import pytest
import torch

from grpo_rm_mm.core import (
    GROUP_WEIGHTINGS,
    SURROGATES,
    accuracy_reward,
    group_advantages,
    group_weights,
    grpo_rm_loss,
    uniformity_reward,
)

D = torch.float64
REWARDS = [accuracy_reward, uniformity_reward]
WEIGHTINGS = ('uniform', 'pi_old', 'sampled')


def spec_rewards(p: np.ndarray, labels: list[int]) -> np.ndarray:
    """r = r_acc + r_uni written out with loops (method.md section 2)."""
    n, c = p.shape
    r = np.zeros((n, c))
    for q in range(n):
        y = labels[q]
        for i in range(c):
            r[q, i] = 1.0 if i == y else -(p[q, i] / (1 - p[q, y]) - 1 / (c - 1))
    return r


def weighted_stats_advantages(r: np.ndarray, w: np.ndarray, eps: float = 0.0,
                              unbiased_n: np.ndarray | None = None) -> np.ndarray:
    """(r - mean_w) / (sd_w + eps) with loops; ``unbiased_n`` multiplies var by n / (n - 1)."""
    adv = np.zeros_like(r)
    for q in range(r.shape[0]):
        mean = sum(w[q, j] * r[q, j] for j in range(r.shape[1]))
        var = sum(w[q, j] * (r[q, j] - mean) ** 2 for j in range(r.shape[1]))
        if unbiased_n is not None:
            var *= unbiased_n[q] / (unbiased_n[q] - 1)
        adv[q] = (r[q] - mean) / (math.sqrt(var) + eps)
    return adv


def weights_for(name: str, p: np.ndarray, seed: int = 0, group_size: int = 8) -> np.ndarray:
    if name == 'uniform':
        return np.full_like(p, 1 / p.shape[1])
    if name == 'pi_old':
        return p
    g = torch.Generator().manual_seed(seed)
    return group_weights('sampled', torch.tensor(p), group_size=group_size,
                         generator=g).weights.numpy()


def test_every_weighting_and_surrogate_is_registered() -> None:
    assert set(WEIGHTINGS) <= set(GROUP_WEIGHTINGS)
    assert {'clip', 'dual_clip'} <= set(SURROGATES)


def test_weighted_advantages_hand_values() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0]], dtype=D)
    w = torch.tensor([[0.5, 0.25, 0.25]], dtype=D)
    # mean 0.5, var 0.25, sd 0.5
    a = group_advantages(r, eps=0.0, weights=w, sample_size=torch.tensor([[1 / 0.375]], dtype=D))
    np.testing.assert_allclose(a.numpy(), [[1.0, -1.0, -1.0]], rtol=1e-14)
    # unbiased with Kish's n = 1 / sum w^2 = 8/3: var * n / (n - 1) = 0.25 * 1.6
    a = group_advantages(r, std='unbiased', eps=0.0, weights=w,
                         sample_size=torch.tensor([[8 / 3]], dtype=D))
    np.testing.assert_allclose(a.numpy(), [[0.5, -0.5, -0.5]] / np.sqrt(0.4), rtol=1e-14)
    # Dr.GRPO: centred under w only
    a = group_advantages(r, scale='none', weights=w)
    np.testing.assert_allclose(a.numpy(), [[0.5, -0.5, -0.5]], rtol=1e-14)


def test_uniform_weights_reproduce_the_unweighted_advantages() -> None:
    r = torch.randn(6, 7, dtype=D, generator=torch.Generator().manual_seed(3))
    for std in ('population', 'unbiased'):
        groups = group_weights('uniform', torch.softmax(r, -1))
        a = group_advantages(r, std=std, weights=groups.weights, sample_size=groups.sample_size)
        np.testing.assert_allclose(a.numpy(), group_advantages(r, std=std).numpy(), rtol=1e-12)


def test_weighted_flat_group_is_exactly_zero() -> None:
    # all the weight on outputs with equal rewards: A = 0, even though other rewards differ
    r = torch.tensor([[0.3, 0.3, 5.0], [2.0, 2.0, 2.0]], dtype=D)
    w = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=D)
    a = group_advantages(r, eps=0.0, weights=w, sample_size=torch.full((2, 1), 2.0, dtype=D))
    assert torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize('weighting', WEIGHTINGS)
def test_gradient_at_ratio_one_is_minus_w_a_over_n(weighting: str) -> None:
    n, c, labels = 4, 5, [4, 0, 2, 2]
    z0 = torch.randn(n, c, dtype=D, generator=torch.Generator().manual_seed(1)) * 1.5
    p = z0.softmax(-1).numpy()
    w = weights_for(weighting, p, seed=11)
    expected = -w * weighted_stats_advantages(spec_rewards(p, labels), w) / n
    z = z0.clone().requires_grad_(True)
    loss, _ = grpo_rm_loss(z, torch.tensor(labels), REWARDS, adv_eps=0.0,
                           group_weighting=weighting,
                           generator=torch.Generator().manual_seed(11))
    loss.backward()
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-10, atol=1e-14)
    assert abs(loss.item()) < 1e-14  # sum_i w_i A_i = 0


def test_pi_old_gradient_closed_form_is_minus_p_a_over_n() -> None:
    # method.md: for 'pi_old', d loss / d z_k = -p_k A_k / N at ratio 1
    n, c, labels = 3, 4, [1, 3, 0]
    z0 = torch.randn(n, c, dtype=D, generator=torch.Generator().manual_seed(5))
    p = z0.softmax(-1).numpy()
    a = weighted_stats_advantages(spec_rewards(p, labels), p)
    z = z0.clone().requires_grad_(True)
    grpo_rm_loss(z, torch.tensor(labels), REWARDS, adv_eps=0.0,
                 group_weighting='pi_old')[0].backward()
    np.testing.assert_allclose(z.grad.numpy(), -p * a / n, rtol=1e-10, atol=1e-14)


def test_pi_old_accuracy_reward_gradient_is_scaled_cross_entropy() -> None:
    # accuracy reward alone, pi_old weights: A_y = sqrt((1-p_y)/p_y), A_i = -sqrt(p_y/(1-p_y)),
    # so the gradient is CE's (p - onehot) times sqrt(p_y / (1 - p_y)) / N
    n, c = 5, 6
    z0 = torch.randn(n, c, dtype=D, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 5, 3, 3])
    z = z0.clone().requires_grad_(True)
    grpo_rm_loss(z, y, accuracy_reward, adv_eps=0.0, group_weighting='pi_old')[0].backward()
    p = z0.softmax(-1)
    py = p.gather(1, y[:, None])
    ce_grad = p - torch.nn.functional.one_hot(y, c).to(D)
    np.testing.assert_allclose(z.grad.numpy(), (ce_grad * (py / (1 - py)).sqrt() / n).numpy(),
                               rtol=1e-10, atol=1e-14)


def _loss_fn(weighting: str, surrogate: str, old: torch.Tensor, y: torch.Tensor, **kw):
    def f(z: torch.Tensor) -> torch.Tensor:
        return grpo_rm_loss(z, y, REWARDS, old_logits=old, group_weighting=weighting,
                            surrogate=surrogate, generator=torch.Generator().manual_seed(7),
                            **kw)[0]
    return f


@pytest.mark.parametrize('weighting,surrogate,eps', [
    (w, s, e) for w, s, e in itertools.product(WEIGHTINGS, ('clip', 'dual_clip'),
                                                ((0.2, 0.2), (0.1, 0.3)))])
def test_finite_differences_with_clips_active(weighting: str, surrogate: str,
                                              eps: tuple[float, float]) -> None:
    n, c = 6, 5
    gen = torch.Generator().manual_seed(13)
    old = torch.randn(n, c, dtype=D, generator=gen)
    z0 = old + 0.9 * torch.randn(n, c, dtype=D, generator=gen)
    y = torch.randint(0, c, (n, ), generator=gen)
    kw = dict(clip_eps_low=eps[0], clip_eps_high=eps[1], dual_clip_c=1.6, beta=0.1,
              ref_logits=old.flip(0))
    f = _loss_fn(weighting, surrogate, old, y, **kw)
    ratio = (z0.log_softmax(-1) - old.log_softmax(-1)).exp()
    # the point is generic: no ratio within 1e-4 of a kink, and both sides of each clip occur
    kinks = torch.tensor([1 - eps[0], 1 + eps[1], 1.6], dtype=D)
    assert (ratio[..., None] - kinks).abs().min() > 1e-4
    assert (ratio > 1 + eps[1]).any() and (ratio < 1 - eps[0]).any()
    if surrogate == 'dual_clip':
        assert (ratio > 1.6).any()
    z = z0.clone().requires_grad_(True)
    f(z).backward()
    h = 1e-6
    fd = torch.zeros_like(z0)
    for idx in itertools.product(range(n), range(c)):
        e = torch.zeros_like(z0)
        e[idx] = h
        fd[idx] = (f(z0 + e) - f(z0 - e)) / (2 * h)
    np.testing.assert_allclose(z.grad.numpy(), fd.numpy(), rtol=1e-6, atol=1e-9)


def test_sampled_weights_converge_to_pi_old() -> None:
    # n_i / G is a mean of G Bernoulli(p_i): within 5 standard errors, and the error of the
    # loss gradient at ratio 1 shrinks as G grows
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]], dtype=D)
    g = torch.Generator().manual_seed(0)
    for size in (100, 10_000, 200_000):
        w = group_weights('sampled', p, group_size=size, generator=g).weights
        assert torch.allclose(w.sum(-1), torch.ones(2, dtype=D))
        se = (p * (1 - p) / size).sqrt()
        assert ((w - p).abs() <= 5 * se).all(), (size, (w - p) / se)

    z0 = p.log()
    y = torch.tensor([1, 3])
    exact = torch.autograd.functional.jacobian(
        lambda z: grpo_rm_loss(z, y, REWARDS, group_weighting='pi_old')[0], z0)
    errors = []
    for size in (16, 4096):
        grads = []
        for seed in range(20):
            grads.append(torch.autograd.functional.jacobian(
                lambda z, s=seed, k=size: grpo_rm_loss(
                    z, y, REWARDS, group_weighting='sampled', group_size=k,
                    generator=torch.Generator().manual_seed(s))[0], z0))
        errors.append(float((torch.stack(grads).mean(0) - exact).abs().max()))
    assert errors[1] < 0.02
    assert errors[1] < errors[0] / 4


def test_sampled_draws_are_reproducible_and_seeded() -> None:
    p = torch.softmax(torch.randn(50, 10, generator=torch.Generator().manual_seed(0)), -1)
    a = group_weights('sampled', p, group_size=8, generator=torch.Generator().manual_seed(4))
    b = group_weights('sampled', p, group_size=8, generator=torch.Generator().manual_seed(4))
    c = group_weights('sampled', p, group_size=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
    assert torch.equal(a.weights * 8, (a.weights * 8).round())  # counts of 8 draws
    assert torch.equal(a.sample_size, torch.full((50, 1), 8.0))


@pytest.mark.parametrize('weighting', WEIGHTINGS)
def test_dual_clip_bounds_negative_advantage_terms(weighting: str) -> None:
    # one query: the true class has A > 0, the others A < 0; a wrong class whose pi_old was
    # small gets a ratio ~450. The plain clip's term grows with the ratio; the dual clip's is
    # floored at c A, so the loss is <= sum_i w_i max(c |A_i|, (1 + eps) |A_i|) and the two
    # differ by exactly w_1 |A_1| (r_1 - c).
    old = torch.tensor([[0.0, -5.0, 0.0, 0.0]], dtype=D)
    y = torch.tensor([0])
    z = torch.tensor([[0.0, 9.0, 0.0, 0.0]], dtype=D, requires_grad=True)
    kw = dict(rewards=accuracy_reward, old_logits=old, adv_eps=0.0, group_weighting=weighting,
              group_size=64)
    plain, _ = grpo_rm_loss(z, y, surrogate='clip', generator=torch.Generator().manual_seed(0),
                            **kw)
    dual, _ = grpo_rm_loss(z, y, surrogate='dual_clip', dual_clip_c=3.0,
                           generator=torch.Generator().manual_seed(0), **kw)
    p_old = old.softmax(-1)
    groups = group_weights(weighting, p_old, group_size=64,
                           generator=torch.Generator().manual_seed(0))
    a = group_advantages(accuracy_reward(p_old, y), eps=0.0, weights=groups.weights,
                         sample_size=groups.sample_size)
    w = groups.weights
    ratio = (z.detach().log_softmax(-1) - old.log_softmax(-1)).exp()
    assert ratio[0, 1] > 400 and (ratio[0, [0, 2, 3]] < 3).all()
    assert dual.item() <= (w * torch.maximum(3.0 * a.abs(), 1.2 * a.abs())).sum().item()
    np.testing.assert_allclose((plain - dual).item(),
                               (w[0, 1] * a[0, 1].abs() * (ratio[0, 1] - 3.0)).item(),
                               rtol=1e-10, atol=1e-14)
    if weighting == 'uniform':
        assert plain.item() > 50
    (g,) = torch.autograd.grad(dual, z)
    # closed form: g_i = -w_i A_i r_i where the unclipped branch is active, 0 where a clip
    # holds (A > 0: r <= 1.2; A < 0: 0.8 <= r <= c); dL/dz_k = g_k - p_k sum_i g_i
    active = torch.where(a > 0, ratio <= 1.2, (ratio >= 0.8) & (ratio <= 3.0))
    gi = torch.where(active, -w * a * ratio, torch.zeros_like(ratio))
    probs = z.detach().softmax(-1)
    np.testing.assert_allclose(g.numpy(), (gi - probs * gi.sum()).numpy(), rtol=1e-10,
                               atol=1e-14)
    assert not active[0, 1]  # the huge-ratio wrong class is floored


@pytest.mark.parametrize('kwargs,match', [
    (dict(group_weighting='softmax'), "group_weighting='softmax' is unknown; use one of"),
    (dict(surrogate='spo'), "surrogate='spo' is unknown; use one of"),
    (dict(clip_eps_low=1.0), 'clip_eps_low=1.0 must be < 1'),
    (dict(clip_eps_high=-0.1), 'clip_eps_high=-0.1 must be > 0'),
    (dict(surrogate='dual_clip', dual_clip_c=1.1), r'dual_clip_c=1.1 must be > 1 \+ '),
    (dict(group_weighting='sampled', group_size=1), 'group_size=1 must be an int >= 2'),
])
def test_bad_objective_options_name_the_value_and_the_choices(kwargs, match) -> None:
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        grpo_rm_loss(z, torch.tensor([0, 1, 2]), REWARDS, **kwargs)


@pytest.mark.parametrize('weighting', WEIGHTINGS)
def test_all_ignored_batch_is_a_connected_zero(weighting: str) -> None:
    z = torch.randn(5, 3, requires_grad=True)
    loss, diag = grpo_rm_loss(z, torch.full((5, ), 255), REWARDS, ignore_index=255,
                              group_weighting=weighting)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    assert diag['grpo_queries'].item() == 0
    assert all(torch.isfinite(v) for v in diag.values())
    # out-of-range labels stay an error
    with pytest.raises(ValueError, match='label 7 at query 0 is outside'):
        grpo_rm_loss(z, torch.tensor([7, 255, 255, 255, 255]), REWARDS, ignore_index=255)
