"""The GRPO-RM objective (method.md section 4) against closed forms and finite differences."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_hot_advantages

from grpo_rm_mm.core.objective import clipped_surrogate, exact_kl, grpo_rm_loss
from grpo_rm_mm.core.rewards import accuracy_reward, uniformity_reward

D = torch.float64


def spec_advantages(p_old: np.ndarray, labels: list[int], eps: float = 0.0) -> np.ndarray:
    """method.md sections 2-3 written out with loops: r = r_acc + r_uni, population std."""
    n, c = p_old.shape
    adv = np.zeros((n, c))
    for q in range(n):
        y = labels[q]
        r = np.zeros(c)
        for i in range(c):
            r[i] = 1.0 if i == y else -(p_old[q, i] / (1 - p_old[q, y]) - 1 / (c - 1))
        adv[q] = (r - r.mean()) / (r.std() + eps)
    return adv


# ---------------------------------------------------------------------- ratio = 1 gradient
def test_gradient_at_ratio_one_is_minus_a_over_g_accuracy_reward() -> None:
    n, c, labels = 3, 5, [4, 0, 2]
    z = torch.randn(n, c, dtype=D, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    loss, _ = grpo_rm_loss(z, torch.tensor(labels), accuracy_reward, adv_eps=0.0)
    loss.backward()
    expected = -one_hot_advantages(labels, c) / (c * n)
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert abs(loss.item()) < 1e-15  # sum_i A_i = 0: the surrogate at ratio 1 is 0


def test_gradient_at_ratio_one_autograd_and_finite_differences_default_rewards() -> None:
    n, c, labels = 2, 4, [1, 3]
    z0 = torch.randn(n, c, dtype=D, generator=torch.Generator().manual_seed(1)) * 2
    y = torch.tensor(labels)
    rewards = [accuracy_reward, uniformity_reward]
    expected = -spec_advantages(z0.softmax(-1).numpy(), labels) / (c * n)

    z = z0.clone().requires_grad_(True)  # old_logits=None: pi_old = current detached
    grpo_rm_loss(z, y, rewards, adv_eps=0.0)[0].backward()
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-10, atol=1e-14)

    def f(x: torch.Tensor) -> float:  # pi_old fixed at z0; ratio 1 at x = z0
        return grpo_rm_loss(x, y, rewards, old_logits=z0, adv_eps=0.0)[0].item()

    h, fd = 1e-6, np.zeros((n, c))
    for q in range(n):
        for k in range(c):
            e = torch.zeros(n, c, dtype=D)
            e[q, k] = h
            fd[q, k] = (f(z0 + e) - f(z0 - e)) / (2 * h)
    np.testing.assert_allclose(fd, expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- clip
# Hand-made second inner step: pi_old uniform over C=4 (old logits 0), one-hot accuracy reward.
# ratio_i = 4 p_i. A_y = sqrt(3), A_other = -1/sqrt(3).
#   q0: y=0, z=[.5, .3, -.2, 0]: ratio=[1.369, 1.121, 0.680, 0.830]: A>0 & r>1.2 clipped (o0),
#       A<0 & r<0.8 clipped (o2); o1, o3 inside the range.
#   q1: y=2, z=[.6, 0, 0, 0]: ratio_0=1.511 but A_0<0: PPO keeps the gradient (min picks r*A).
#   q2: y=0, z=[-.6, 0, 0, 0]: ratio_0=0.619 but A_0>0: gradient kept.
SECOND_Z = [[0.5, 0.3, -0.2, 0.0], [0.6, 0.0, 0.0, 0.0], [-0.6, 0.0, 0.0, 0.0]]
SECOND_Y = [0, 2, 0]
SECOND_FLOWS = np.array([[False, True, False, True], [True] * 4, [True] * 4])


def test_clip_zeroes_gradient_exactly_where_ppo_says() -> None:
    z1 = torch.tensor(SECOND_Z, dtype=D)
    logp = F.log_softmax(z1, -1).requires_grad_(True)
    old = torch.full_like(logp, math.log(0.25))
    adv = torch.tensor(one_hot_advantages(SECOND_Y, 4))
    ratio = np.exp(logp.detach().numpy() - old.numpy())
    np.testing.assert_allclose(ratio[0], [1.369, 1.121, 0.680, 0.830], atol=1e-3)

    clipped_surrogate(logp, old, adv, 0.2).sum().backward()
    g = logp.grad.numpy()
    assert (g[~SECOND_FLOWS] == 0).all()  # exactly zero
    expected = np.where(SECOND_FLOWS, adv.numpy() * ratio / 4, 0.0)
    np.testing.assert_allclose(g, expected, rtol=1e-12)


def test_second_inner_step_full_gradient_and_clip_fraction() -> None:
    n, c = 3, 4
    z1 = torch.tensor(SECOND_Z, dtype=D, requires_grad=True)
    old = torch.zeros(n, c, dtype=D)
    loss, diag = grpo_rm_loss(z1, torch.tensor(SECOND_Y), accuracy_reward, old_logits=old,
                              adv_eps=0.0)
    loss.backward()
    p = z1.detach().softmax(-1).numpy()
    ratio = p / 0.25
    adv = one_hot_advantages(SECOND_Y, c)
    # d/dz_k of -(1/(G n)) sum_i m_i A_i ratio_i, with d ratio_i/dz_k = ratio_i (d_ik - p_k)
    expected = np.zeros((n, c))
    for q in range(n):
        for k in range(c):
            expected[q, k] = -sum(SECOND_FLOWS[q, i] * adv[q, i] * ratio[q, i]
                                  * ((i == k) - p[q, k]) for i in range(c)) / (c * n)
    np.testing.assert_allclose(z1.grad.numpy(), expected, rtol=1e-10, atol=1e-15)
    # value: -(1/(G n)) sum min(r A, clip(r) A)
    value = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv).sum() / (c * n)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    assert diag['grpo_clip_frac'].item() == pytest.approx(2 / 12)


def test_literal_second_step_after_an_sgd_step() -> None:
    """Step 1 at ratio 1 (grad -A/(G n)), an SGD step with a large lr, then step 2: exactly
    the outputs PPO clips get zero gradient through the surrogate."""
    c, labels = 5, [2, 0]
    z0 = torch.randn(2, c, dtype=D, generator=torch.Generator().manual_seed(3))
    y = torch.tensor(labels)
    z = z0.clone().requires_grad_(True)
    grpo_rm_loss(z, y, accuracy_reward)[0].backward()
    z1 = (z0 - 4.0 * z.grad).detach()
    logp = F.log_softmax(z1, -1).requires_grad_(True)
    old = F.log_softmax(z0, -1)
    adv = torch.tensor(one_hot_advantages(labels, c))
    clipped_surrogate(logp, old, adv, 0.2).sum().backward()
    ratio = torch.exp(logp.detach() - old)
    clipped = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert clipped.any() and (~clipped).any()  # the step is large enough to clip some
    assert (logp.grad[clipped] == 0).all()
    assert (logp.grad[~clipped] != 0).all()


# ---------------------------------------------------------------------- KL
def test_exact_kl_hand_value_and_kl_div() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=D))
    ref = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=D))
    kl = exact_kl(logp, ref)
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-15)
    torch.testing.assert_close(
        kl, F.kl_div(ref, logp, log_target=True, reduction='none').sum(-1))


def test_kl_term_equals_beta_times_exact_kl_with_its_gradient() -> None:
    n, c, beta = 3, 4, 0.3
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(n, c, dtype=D, generator=g)
    old = torch.randn(n, c, dtype=D, generator=g) * 0.1 + z0
    ref = torch.randn(n, c, dtype=D, generator=g)
    y = torch.tensor([0, 3, 1])
    za = z0.clone().requires_grad_(True)
    zb = z0.clone().requires_grad_(True)
    la, da = grpo_rm_loss(za, y, accuracy_reward, old_logits=old, ref_logits=ref, beta=beta)
    lb, db = grpo_rm_loss(zb, y, accuracy_reward, old_logits=old, ref_logits=ref, beta=0.0)
    la.backward()
    lb.backward()
    p, q = z0.softmax(-1).numpy(), ref.softmax(-1).numpy()
    kl = (p * np.log(p / q)).sum(-1)
    assert (la - lb).item() == pytest.approx(beta * kl.mean(), rel=1e-10)
    assert da['grpo_kl'].item() == pytest.approx(kl.mean(), rel=1e-10)
    assert db['grpo_kl'].item() == pytest.approx(kl.mean(), rel=1e-10)  # logged even at beta 0
    # d KL(p||q) / d z_k = p_k (log p_k - log q_k - KL)
    dkl = p * (np.log(p / q) - kl[:, None])
    np.testing.assert_allclose((za.grad - zb.grad).numpy(), beta * dkl / n, rtol=1e-8,
                               atol=1e-14)


# ---------------------------------------------------------------------- masking and weights
def _second_step_batch(n: int = 5, c: int = 4, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, dtype=D, generator=g)
    old = z + 0.5 * torch.randn(n, c, dtype=D, generator=g)
    ref = torch.randn(n, c, dtype=D, generator=g)
    return z, old, ref


def test_masking_ignored_queries_changes_nothing_about_valid_ones() -> None:
    z, old, ref = _second_step_batch()
    labels = torch.tensor([1, 255, 0, 3, 255])
    keep = torch.tensor([0, 2, 3])
    kw = dict(old_logits=old, ref_logits=ref, beta=0.1)
    rewards = [accuracy_reward, uniformity_reward]

    zs = z[keep].clone().requires_grad_(True)
    ls, ds = grpo_rm_loss(zs, labels[keep], rewards, old_logits=old[keep],
                          ref_logits=ref[keep], beta=0.1)
    ls.backward()
    for garbage in (0.0, 1e3):
        for how in ('ignore_index', 'valid'):
            zf = z.clone()
            zf[[1, 4]] = garbage
            zf.requires_grad_(True)
            if how == 'ignore_index':
                lf, df = grpo_rm_loss(zf, labels, rewards, ignore_index=255, **kw)
            else:
                lf, df = grpo_rm_loss(zf, labels.masked_fill(labels == 255, 7), rewards,
                                      valid=labels != 255, **kw)
            lf.backward()
            assert lf.item() == pytest.approx(ls.item(), rel=1e-12)
            torch.testing.assert_close(zf.grad[keep], zs.grad, rtol=1e-12, atol=1e-15)
            assert torch.equal(zf.grad[[1, 4]], torch.zeros(2, 4, dtype=D))
            for key in ds:
                assert df[key].item() == pytest.approx(ds[key].item(), rel=1e-12, abs=1e-15)


def test_per_query_weight_scales_each_query() -> None:
    z, old, _ = _second_step_batch(n=3)
    y = torch.tensor([0, 1, 2])
    w = torch.tensor([0.0, 1.0, 2.5], dtype=D)
    lw, _ = grpo_rm_loss(z, y, accuracy_reward, old_logits=old, weight=w)
    singles = [grpo_rm_loss(z[q:q + 1], y[q:q + 1], accuracy_reward,
                            old_logits=old[q:q + 1])[0].item() for q in range(3)]
    assert lw.item() == pytest.approx(sum(wq * s for wq, s in zip(w.tolist(), singles)) / 3)


# ---------------------------------------------------------------------- diagnostics
def test_diagnostics_hand_values() -> None:
    z = torch.zeros(2, 4, dtype=D)  # uniform policy
    _, d = grpo_rm_loss(z, torch.tensor([0, 1]), accuracy_reward, adv_eps=0.0)
    assert d['grpo_reward'].item() == pytest.approx(0.25)  # mean p_old(y)
    assert d['grpo_adv_abs'].item() == pytest.approx(math.sqrt(3) / 2)  # (sqrt3 + 3/sqrt3)/4
    assert d['grpo_entropy'].item() == pytest.approx(math.log(4))
    assert d['grpo_acc'].item() == pytest.approx(50.0)  # argmax of ties = class 0
    assert d['grpo_clip_frac'].item() == 0.0
    assert d['grpo_kl'].item() == 0.0 and d['grpo_kl_old'].item() == 0.0
    assert not any('loss' in key for key in d)
    assert all(v.ndim == 0 and not v.requires_grad for v in d.values())
    assert {'grpo_reward', 'grpo_adv_abs', 'grpo_clip_frac', 'grpo_kl', 'grpo_entropy',
            'grpo_acc'} <= set(d)


def test_expected_reward_diagnostic_uses_old_policy() -> None:
    old = torch.log(torch.tensor([[0.7, 0.2, 0.1]], dtype=D))
    z = torch.zeros(1, 3, dtype=D)
    _, d = grpo_rm_loss(z, torch.tensor([0]), accuracy_reward, old_logits=old)
    assert d['grpo_reward'].item() == pytest.approx(0.7)
    # KL(pi_theta || pi_old) with pi_theta uniform
    assert d['grpo_kl_old'].item() == pytest.approx(
        sum(math.log((1 / 3) / p) / 3 for p in (0.7, 0.2, 0.1)))


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits_compute_in_float32(dtype: torch.dtype) -> None:
    z = (torch.randn(4, 3, generator=torch.Generator().manual_seed(6)) * 1e4).to(dtype)
    z.requires_grad_(True)
    old = torch.randn(4, 3).to(dtype)
    loss, d = grpo_rm_loss(z, torch.tensor([0, 1, 2, 0]), [accuracy_reward, uniformity_reward],
                           old_logits=old)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in d.values())


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_value() -> None:
    z = torch.zeros(3, 4)
    y = torch.tensor([0, 1, 2])
    acc = accuracy_reward
    with pytest.raises(ValueError, match=r'label 5 at query 1 is outside \[0, C=4\)'):
        grpo_rm_loss(z, torch.tensor([0, 5, 2]), acc)
    with pytest.raises(ValueError, match=r'label -1 at query 2.*ignore_index=255'):
        grpo_rm_loss(z, torch.tensor([0, 255, -1]), acc, ignore_index=255)
    with pytest.raises(ValueError, match='C >= 2'):
        grpo_rm_loss(torch.zeros(3, 1), y, acc)
    bad = z.clone()
    bad[0, 1] = float('nan')
    bad[2, 3] = float('inf')
    with pytest.raises(ValueError, match=r'logits has 2 non-finite'):
        grpo_rm_loss(bad, y, acc)
    with pytest.raises(ValueError, match=r'old_logits has 2 non-finite'):
        grpo_rm_loss(z, y, acc, old_logits=bad)
    with pytest.raises(ValueError, match=r'old_logits of shape \(3, 5\).*\(3, 4\)'):
        grpo_rm_loss(z, y, acc, old_logits=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r'labels of shape \(4,\).*\(3, 4\)'):
        grpo_rm_loss(z, torch.tensor([0, 1, 2, 3]), acc)
    with pytest.raises(ValueError, match='soft or one-hot'):
        grpo_rm_loss(z, torch.eye(4)[:3], acc)
    with pytest.raises(ValueError, match=r'rewards of shape \(3, 5\)'):
        grpo_rm_loss(z, y, torch.zeros(3, 5))
    for eps in (0.0, -0.1, float('nan')):
        with pytest.raises(ValueError, match='clip_eps'):
            grpo_rm_loss(z, y, acc, clip_eps=eps)
    with pytest.raises(ValueError, match='beta=-1'):
        grpo_rm_loss(z, y, acc, beta=-1.0)
    with pytest.raises(ValueError, match='beta=0.1 > 0 needs ref_logits'):
        grpo_rm_loss(z, y, acc, beta=0.1)
    with pytest.raises(ValueError, match='empty batch'):
        grpo_rm_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), acc)
    # no valid query is not an error: a zero loss (see test_weighting_surrogates.py)
    for loss, _ in (grpo_rm_loss(z, torch.full((3, ), 255), acc, ignore_index=255),
                    grpo_rm_loss(z, y, acc, valid=torch.zeros(3, dtype=torch.bool))):
        assert loss.item() == 0.0
