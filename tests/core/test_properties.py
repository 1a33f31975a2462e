"""Property tests: random logits up to +-1e4 never give NaN or Inf; invariants hold."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from grpo_rm_mm.core.advantages import group_advantages
from grpo_rm_mm.core.objective import grpo_rm_loss
from grpo_rm_mm.core.rewards import (
    accuracy_reward,
    confidence_penalty_reward,
    uniformity_reward,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

logit_values = st.one_of(
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([-1e4, 1e4, 0.0, -0.0, 1e-30]),
)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(2, 6))
    arr = hnp.arrays(np.float32, (n, c), elements=logit_values)
    logits = draw(arr)
    old = draw(st.one_of(st.none(), arr))
    ref = draw(arr)
    labels = draw(hnp.arrays(np.int64, (n, ), elements=st.integers(0, c - 1)))
    ignore = draw(hnp.arrays(np.bool_, (n, ), elements=st.booleans()))
    ignore[draw(st.integers(0, n - 1))] = False  # at least one valid query
    labels = np.where(ignore, 255, labels)
    weights = draw(st.tuples(st.floats(0, 10), st.floats(0, 10), st.floats(0, 10)))
    beta = draw(st.sampled_from([0.0, 0.04, 1.0]))
    clip_eps = draw(st.sampled_from([0.1, 0.2, 0.5]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    std = draw(st.sampled_from(['population', 'unbiased']))
    scale = draw(st.sampled_from(['std', 'none']))
    return logits, old, ref, labels, weights, beta, clip_eps, dtype, std, scale


@SETTINGS
@given(batches())
def test_loss_gradient_and_diagnostics_are_finite(batch) -> None:
    logits, old, ref, labels, weights, beta, clip_eps, dtype, std, scale = batch
    z = torch.from_numpy(logits).to(dtype).requires_grad_(True)
    w_acc, w_uni, w_conf = weights

    def rewards(p, y):
        return (w_acc * accuracy_reward(p, y) + w_uni * uniformity_reward(p, y)
                + w_conf * confidence_penalty_reward(p, y))

    loss, diag = grpo_rm_loss(
        z, torch.from_numpy(labels), rewards,
        old_logits=None if old is None else torch.from_numpy(old).to(dtype),
        ref_logits=torch.from_numpy(ref).to(dtype), beta=beta, clip_eps=clip_eps,
        ignore_index=255, adv_std=std, adv_scale=scale)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all()
    assert (z.grad[torch.from_numpy(labels == 255)] == 0).all()
    for key, value in diag.items():
        assert torch.isfinite(value), key
    assert 0.0 <= diag['grpo_clip_frac'].item() <= 1.0
    assert 0.0 <= diag['grpo_acc'].item() <= 100.0
    assert diag['grpo_kl'].item() >= -1e-4 and diag['grpo_entropy'].item() >= -1e-4


@SETTINGS
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 7)),
                  elements=st.floats(-1e6, 1e6)),
       st.sampled_from(['population', 'unbiased']), st.sampled_from([0.0, 1e-6]))
def test_advantages_finite_zero_sum_and_zero_on_flat_groups(r, std, eps) -> None:
    rewards = torch.from_numpy(r)
    rewards[0] = rewards[0, 0]  # one flat group
    a = group_advantages(rewards, std=std, eps=eps)
    assert torch.isfinite(a).all()
    assert torch.equal(a[0], torch.zeros_like(a[0]))
    c = r.shape[1]
    assert (a.abs() <= (c - 1) ** 0.5 + 1e-6).all()  # |z-score| <= sqrt(C - 1)
    assert torch.allclose(a.sum(-1), torch.zeros(a.shape[0], dtype=a.dtype), atol=1e-6)


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 6)),
                  elements=logit_values), st.data())
def test_rewards_finite_and_bounded(logits, data) -> None:
    n, c = logits.shape
    labels = data.draw(hnp.arrays(np.int64, (n, ), elements=st.integers(0, c - 1)))
    p = torch.from_numpy(logits).softmax(-1)
    y = torch.from_numpy(labels)
    uni = uniformity_reward(p, y)
    assert torch.isfinite(uni).all()
    assert (uni <= 1 / (c - 1) + 1e-6).all() and (uni >= -(c - 2) / (c - 1) - 1e-6).all()
    assert torch.allclose(uni.sum(-1), torch.zeros(n), atol=1e-5)
    conf = confidence_penalty_reward(p, y)
    assert torch.isfinite(conf).all() and (conf <= 0).all() and (conf >= -1).all()


@pytest.mark.parametrize('value', [1e4, -1e4, 1e30])
def test_extreme_constant_and_opposed_logits(value: float) -> None:
    z = torch.tensor([[value, -value, 0.0], [value, value, value]], requires_grad=True)
    old = torch.tensor([[-value, value, 0.0], [0.0, 0.0, 0.0]])
    loss, diag = grpo_rm_loss(z, torch.tensor([0, 2]), [accuracy_reward, uniformity_reward],
                              old_logits=old)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert all(torch.isfinite(v) for v in diag.values())
