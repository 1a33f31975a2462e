"""Rewards of method.md section 2, against hand-computed values."""
import pytest
import torch

from grpo_rm_mm.core.rewards import (
    accuracy_reward,
    confidence_penalty_reward,
    uniformity_reward,
)

D = torch.float64


def test_accuracy_reward_is_one_hot_of_the_label() -> None:
    probs = torch.full((3, 4), 0.25, dtype=D)
    r = accuracy_reward(probs, torch.tensor([2, 0, 3]))
    expected = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=D)
    assert r.dtype == D
    assert torch.equal(r, expected)


def test_uniformity_reward_hand_computed() -> None:
    # y = 0, wrong mass 0.6, shares (0.5, 1/3, 1/6) against the uniform 1/3
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=D)
    r = uniformity_reward(probs, torch.tensor([0]))
    torch.testing.assert_close(r, torch.tensor([[0.0, -1 / 6, 0.0, 1 / 6]], dtype=D))
    # y = 2, wrong mass 0.8: shares (0.5, 0.375, 0.125)
    r = uniformity_reward(probs, torch.tensor([2]))
    torch.testing.assert_close(
        r, torch.tensor([[-(0.5 - 1 / 3), -(0.375 - 1 / 3), 0.0, -(0.125 - 1 / 3)]], dtype=D))


def test_uniformity_reward_zero_when_wrong_mass_is_uniform() -> None:
    probs = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=D)
    r = uniformity_reward(probs, torch.tensor([1, 3]))
    assert torch.allclose(r, torch.zeros_like(r), atol=1e-15)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16])
def test_uniformity_reward_safe_when_true_class_takes_all_mass(dtype: torch.dtype) -> None:
    # p_y == 1 exactly, p_y == 1 up to rounding, and a softmax of +-1e4 logits
    logits = torch.tensor([[1e4, 0.0, -1e4], [30.0, 0.0, 0.0]], dtype=torch.float32)
    probs = torch.cat([torch.tensor([[1.0, 0.0, 0.0]]), logits.softmax(-1)]).to(dtype)
    r = uniformity_reward(probs, torch.tensor([0, 0, 0]))
    assert torch.isfinite(r).all()
    assert r[0].abs().max() == 0  # all wrong mass 0: uniform by convention
    assert r[:, 0].abs().max() == 0
    # [30, 0, 0]: tiny but equal wrong probabilities -> uniform -> 0 (no cancellation)
    assert r[2].abs().max() < 1e-3


def test_uniformity_reward_bounds_and_zero_sum() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(20, 5, generator=g, dtype=D).mul(3).softmax(-1)
    labels = torch.randint(0, 5, (20, ), generator=g)
    r = uniformity_reward(probs, labels)
    c = 5
    assert (r <= 1 / (c - 1) + 1e-12).all() and (r >= -(c - 2) / (c - 1) - 1e-12).all()
    torch.testing.assert_close(r.sum(-1), torch.zeros(20, dtype=D), atol=1e-12, rtol=0)


def test_confidence_penalty_reward() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=D)
    r = confidence_penalty_reward(probs, torch.tensor([1]))
    torch.testing.assert_close(r, torch.tensor([[-0.4, 0.0, -0.2, -0.1]], dtype=D))


@pytest.mark.parametrize('fn', [accuracy_reward, uniformity_reward, confidence_penalty_reward])
def test_valid_mask_zeroes_rows_and_skips_their_labels(fn) -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=D)
    valid = torch.tensor([True, False])
    r = fn(probs, torch.tensor([1, 255]), valid)
    assert torch.equal(r[1], torch.zeros(4, dtype=D))
    torch.testing.assert_close(r[0], fn(probs[:1], torch.tensor([1]))[0])


@pytest.mark.parametrize('fn', [accuracy_reward, uniformity_reward, confidence_penalty_reward])
def test_reward_bad_input(fn) -> None:
    probs = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match=r'label 7 at query 1 is outside \[0, C=3\)'):
        fn(probs, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match='label -1 at query 0'):
        fn(probs, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match='C=1'):
        fn(torch.ones(2, 1), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r'\(2,\).*got \(3,\)'):
        fn(probs, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match='integer'):
        fn(probs, torch.tensor([0.0, 1.0]))
