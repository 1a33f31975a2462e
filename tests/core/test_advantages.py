"""Group-relative advantages of method.md section 3, against closed forms."""
import math

import pytest
import torch

from grpo_rm_mm.core.advantages import group_advantages

D = torch.float64


def _one_hot_rewards(c: int = 10, y: int = 3) -> torch.Tensor:
    r = torch.zeros(2, c, dtype=D)
    r[0, y] = 1.0
    r[1, 0] = 1.0
    return r


def test_one_hot_accuracy_population_closed_form() -> None:
    # C=10: mean 0.1, population std sqrt(0.1 * 0.9) = 0.3 -> A_y = 0.9/0.3 = 3, else -1/3
    a = group_advantages(_one_hot_rewards(), std='population', eps=0.0)
    assert a[0, 3].item() == pytest.approx(3.0, rel=1e-12)
    others = torch.cat([a[0, :3], a[0, 4:]])
    torch.testing.assert_close(others, torch.full((9, ), -1 / 3, dtype=D))
    assert a[1, 0].item() == pytest.approx(3.0, rel=1e-12)


def test_one_hot_accuracy_unbiased_closed_form() -> None:
    # unbiased std sqrt(0.9 / 9) = sqrt(0.1) -> A_y = 0.9 / sqrt(0.1) = 2.846, else -0.316
    a = group_advantages(_one_hot_rewards(), std='unbiased', eps=0.0)
    assert a[0, 3].item() == pytest.approx(0.9 / math.sqrt(0.1), rel=1e-12)
    assert a[0, 3].item() == pytest.approx(2.846, abs=5e-4)
    assert a[0, 0].item() == pytest.approx(-0.1 / math.sqrt(0.1), rel=1e-12)
    assert a[0, 0].item() == pytest.approx(-0.316, abs=5e-4)


def test_default_eps_only_perturbs_slightly() -> None:
    a = group_advantages(_one_hot_rewards())  # eps = 1e-6
    assert a[0, 3].item() == pytest.approx(0.9 / (0.3 + 1e-6), rel=1e-12)


def test_hand_example_and_scale_none() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    pop = group_advantages(r, eps=0.0)
    torch.testing.assert_close(pop, torch.tensor([[-1.5 ** 0.5, 0.0, 1.5 ** 0.5]], dtype=D))
    unb = group_advantages(r, std='unbiased', eps=0.0)
    torch.testing.assert_close(unb, torch.tensor([[-1.0, 0.0, 1.0]], dtype=D))
    dr = group_advantages(r, scale='none')  # Dr.GRPO: mean-centred only
    torch.testing.assert_close(dr, torch.tensor([[-1.0, 0.0, 1.0]], dtype=D))
    dr2 = group_advantages(r * 5, scale='none')
    torch.testing.assert_close(dr2, torch.tensor([[-5.0, 0.0, 5.0]], dtype=D))


@pytest.mark.parametrize('scale', ['std', 'none'])
@pytest.mark.parametrize('std', ['population', 'unbiased'])
@pytest.mark.parametrize('eps', [0.0, 1e-6])
def test_equal_rewards_give_exact_zero(scale: str, std: str, eps: float) -> None:
    # 0.1 repeated: its float mean is not exactly 0.1, yet A must be exactly 0
    r = torch.tensor([[0.1] * 7, [0.0] * 7, [-3.3] * 7, [1.0, 0.0, 0, 0, 0, 0, 0]])
    a = group_advantages(r, std=std, eps=eps, scale=scale)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:3], torch.zeros(3, 7))
    assert a[3, 0] > 0


def test_advantages_sum_to_zero_and_are_affine_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    r = torch.randn(5, 6, generator=g, dtype=D)
    a = group_advantages(r, eps=0.0)
    torch.testing.assert_close(a.sum(-1), torch.zeros(5, dtype=D), atol=1e-12, rtol=0)
    # population-standardised values have unit population variance
    torch.testing.assert_close((a ** 2).mean(-1), torch.ones(5, dtype=D))
    torch.testing.assert_close(group_advantages(3.0 * r - 7.0, eps=0.0), a)


def test_bad_options_and_input() -> None:
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="std='sample'"):
        group_advantages(r, std='sample')
    with pytest.raises(ValueError, match="scale='mean'"):
        group_advantages(r, scale='mean')
    with pytest.raises(ValueError, match='eps=-1'):
        group_advantages(r, eps=-1.0)
    with pytest.raises(ValueError, match='eps=nan'):
        group_advantages(r, eps=float('nan'))
    with pytest.raises(ValueError, match=r'\(4,\)'):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match='C >= 2'):
        group_advantages(torch.zeros(4, 1))
    with pytest.raises(ValueError, match='2 non-finite'):
        group_advantages(torch.tensor([[0.0, float('nan')], [float('inf'), 1.0]]))
