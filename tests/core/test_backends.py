"""Every closed-form backend against the reference, one matrix and one tolerance policy.

Each case is run through ``grpo_rm_loss_fused(..., backend=name)`` for every registered
closed-form backend that runs on this machine and compared with
the reference objective computed in float64 on the same (upcast) inputs: loss, gradient and
every diagnostic. A new backend registered in grpo_rm_mm/core/backends joins the
matrix. The tolerance depends on the input dtype alone (:func:`tolerance`). Cases a
backend does not run (say, float64 on Triton) are skipped with the backend's own reason; the
last test checks that each backend runs the cases it is documented to run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from grpo_rm_mm.core import backends
from grpo_rm_mm.core.dispatch import BACKENDS
from grpo_rm_mm.core.fused import grpo_rm_loss_fused
from grpo_rm_mm.core.objective import grpo_rm_loss
from grpo_rm_mm.core.rewards import (
    accuracy_reward,
    confidence_penalty_reward,
    uniformity_reward,
)
from grpo_rm_mm.models.rewards import AccuracyReward, ConfidencePenaltyReward, UniformityReward

CLOSED_FORM = [name for name, b in BACKENDS.items() if b.closed_form]
REWARDS = {
    'acc': [accuracy_reward],
    'acc+uni': [accuracy_reward, uniformity_reward],
    # the registered classes with their coefficients
    'weighted three': [AccuracyReward(weight=1.0), UniformityReward(weight=0.5),
                       ConfidencePenaltyReward(weight=0.25)],
    'uni+conf': [uniformity_reward, confidence_penalty_reward],
}


@dataclass
class Case:
    """Inputs of one call: ``shape`` (N, C) or (B, C, *S); the options of the objective."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    rewards: str = 'acc+uni'
    old: float | None = 0.5        # scale of pi_old's offset from the logits (None: ratio 1)
    ref: bool = False
    ignored: float = 0.0           # fraction of queries labelled 255
    weight: bool = False
    valid: bool = False
    logit_scale: float = 2.0
    options: dict = field(default_factory=dict)


CASES = {
    'cls pi_old clip': Case((64, 10), options=dict(group_weighting='pi_old')),
    'cls uniform dual_clip kl f64': Case(
        (48, 10), torch.float64, rewards='acc', ref=True,
        options=dict(group_weighting='uniform', surrogate='dual_clip', beta=0.1,
                     dual_clip_c=2.0)),
    'cls C=1000 asymmetric clip weighted': Case(
        (33, 1000), rewards='weighted three', weight=True,
        options=dict(group_weighting='pi_old', clip_eps_low=0.1, clip_eps_high=0.3)),
    'cls C=2 ratio 1 ignored': Case(
        (40, 2), old=None, ignored=0.3,
        options=dict(group_weighting='pi_old', surrogate='dual_clip')),
    'dense pi_old dual_clip kl': Case(
        (2, 21, 9, 11), ref=True, ignored=0.2, weight=True,
        options=dict(group_weighting='pi_old', surrogate='dual_clip', beta=0.05)),
    'dense channels-last': Case(
        (2, 21, 9, 11), channels_last=True, ref=True, ignored=0.2, weight=True,
        options=dict(group_weighting='pi_old', surrogate='dual_clip', beta=0.05)),
    'dense uniform valid f64': Case(
        (3, 5, 7, 5), torch.float64, valid=True, ignored=0.1,
        options=dict(group_weighting='uniform')),
    'dense C=1000': Case((1, 1000, 3, 5), rewards='uni+conf',
                         options=dict(group_weighting='pi_old')),
    'dense bf16': Case((2, 21, 8, 8), torch.bfloat16, options=dict(group_weighting='pi_old')),
    'cls fp16 kl beta 0': Case((50, 21), torch.float16, ref=True,
                               options=dict(group_weighting='pi_old')),
    'cls Dr.GRPO unbiased f64': Case(
        (30, 7), torch.float64, options=dict(group_weighting='pi_old', adv_scale='none',
                                             adv_std='unbiased')),
    'cls unbiased eps 0': Case((30, 7), options=dict(group_weighting='uniform',
                                                     adv_std='unbiased', adv_eps=0.0)),
    'dense no diagnostics validated': Case(
        (2, 21, 5, 6), ignored=0.2,
        options=dict(group_weighting='pi_old', diagnostics=False, validated=True)),
    # probabilities of pi_old underflowing to exactly 0: those outputs have no weight, and a
    # group whose weighted outputs share a reward is flat (float64: float32 inputs would
    # underflow where their float64 reference does not)
    'cls pi_old underflow f64': Case((24, 6), torch.float64, logit_scale=300.0, rewards='acc',
                                 options=dict(group_weighting='pi_old')),
}


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of a backend against the float64 reference, by input dtype:
    float64 is computed in float64, float32 / bf16 / fp16 in float32 (the half types' gradient
    is rounded to their precision)."""
    return {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 1e-2)


def make(case: Case, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = case.shape[1]
    z = torch.randn(case.shape, dtype=torch.float64, generator=g) * case.logit_scale
    if case.options.get('group_weighting') == 'pi_old' and case.logit_scale > 10:
        z[::2, 0] += 3 * case.logit_scale  # half the queries have one dominant class
    labels = torch.randint(0, c, (case.shape[0], ) + case.shape[2:], generator=g)
    labels[torch.rand(labels.shape, generator=g) < case.ignored] = 255
    x = dict(logits=z, labels=labels, old_logits=None, ref_logits=None, weight=None,
             valid=None)
    if case.old is not None:
        x['old_logits'] = z + case.old * torch.randn(case.shape, dtype=torch.float64,
                                                     generator=g)
    if case.ref:
        x['ref_logits'] = torch.randn(case.shape, dtype=torch.float64, generator=g)
    if case.weight:
        x['weight'] = torch.rand(labels.shape, dtype=torch.float64, generator=g) * 2
    if case.valid:
        x['valid'] = torch.rand(labels.shape, generator=g) > 0.25
    for key in ('logits', 'old_logits', 'ref_logits', 'weight'):
        if x[key] is not None:
            x[key] = x[key].to(case.dtype)
            if case.channels_last and x[key].ndim == 4:
                x[key] = x[key].contiguous(memory_format=torch.channels_last)
    return x


def flat(x: torch.Tensor | None, queries: bool = False) -> torch.Tensor | None:
    if x is None or x.ndim <= (1 if queries else 2):
        return x
    return x.reshape(-1) if queries else x.movedim(1, -1).reshape(-1, x.shape[1])


def run_reference(case: Case, x: dict):
    """The reference in float64 on the upcast inputs: (loss, grad (N, C), diagnostics)."""
    def up(t):
        return None if t is None else flat(t).detach().double().clone()

    z = up(x['logits']).requires_grad_(True)
    opts = {k: v for k, v in case.options.items() if k not in ('diagnostics', 'validated')}
    loss, diag = grpo_rm_loss(z, flat(x['labels'], True), REWARDS[case.rewards],
                              old_logits=up(x['old_logits']), ref_logits=up(x['ref_logits']),
                              weight=None if x['weight'] is None else flat(
                                  x['weight'], True).double(),
                              valid=flat(x['valid'], True), ignore_index=255, **opts)
    loss.backward()
    return loss.detach(), z.grad, diag


def run_backend(case: Case, x: dict, backend: str):
    z = x['logits'].clone().requires_grad_(True)
    if case.channels_last:
        z = x['logits'].detach().clone(memory_format=torch.channels_last).requires_grad_(True)
    loss, diag = grpo_rm_loss_fused(z, x['labels'], REWARDS[case.rewards],
                                    old_logits=x['old_logits'], ref_logits=x['ref_logits'],
                                    weight=x['weight'], valid=x['valid'], ignore_index=255,
                                    backend=backend, **case.options)
    loss.backward()
    return loss.detach(), z.grad, diag


def skip_unless_runs(backend: str, case: Case, x: dict) -> None:
    """Skip with the backend's own reason where it does not run the case."""
    try:
        grpo_rm_loss_fused(x['logits'], x['labels'], REWARDS[case.rewards],
                           old_logits=x['old_logits'], ignore_index=255, backend=backend,
                           **{k: v for k, v in case.options.items()
                              if k in ('group_weighting', 'surrogate')})
    except ValueError as err:
        if 'cannot run this call' in str(err):
            pytest.skip(str(err))
        raise


@pytest.mark.parametrize('name', list(CASES))
@pytest.mark.parametrize('backend', CLOSED_FORM)
def test_backend_equals_the_reference(backend: str, name: str) -> None:
    case = CASES[name]
    x = make(case)
    skip_unless_runs(backend, case, x)
    ref_loss, ref_grad, ref_diag = run_reference(case, x)
    loss, grad, diag = run_backend(case, x, backend)
    rtol = tolerance(case.dtype)
    assert grad.dtype == x['logits'].dtype and grad.shape == x['logits'].shape
    if case.channels_last:  # the gradient keeps the logits' memory layout
        assert grad.stride() == x['logits'].contiguous(
            memory_format=torch.channels_last).stride()
    n = int(ref_diag['grpo_queries'])
    scale = float(ref_grad.abs().max())
    torch.testing.assert_close(flat(grad).double(), ref_grad, rtol=rtol,
                               atol=rtol * max(scale, 1.0 / max(n, 1)))
    assert math.isclose(float(loss), float(ref_loss), rel_tol=rtol * 10,
                        abs_tol=rtol * max(scale * n, 1e-12)), (float(loss), float(ref_loss))
    assert float(diag['grpo_queries']) == n
    if not case.options.get('diagnostics', True):
        assert set(diag) == {'grpo_queries'}
        return
    assert set(diag) == set(ref_diag)
    for key, want in ref_diag.items():
        got = float(diag[key])
        if key in ('grpo_acc', 'grpo_clip_frac'):  # counts: a near-tie may round apart
            unit = (100.0 if key == 'grpo_acc' else 1.0) / max(n, 1)
            assert abs(got - float(want)) <= unit * (1 if rtol < 1e-3 else 3) + 1e-9, key
        else:
            assert math.isclose(got, float(want), rel_tol=rtol * 100,
                                abs_tol=rtol * 100), (key, got, float(want))


@pytest.mark.parametrize('backend', CLOSED_FORM)
def test_all_ignored_batch_is_a_connected_zero(backend: str) -> None:
    case = CASES['dense pi_old dual_clip kl']
    x = make(case)
    x['labels'].fill_(255)
    skip_unless_runs(backend, case, x)
    loss, grad, diag = run_backend(case, x, backend)
    assert float(loss) == 0.0 and float(diag['grpo_queries']) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize('backend', CLOSED_FORM)
@pytest.mark.parametrize('bad', ['label', 'nan logit', 'inf old logit', 'nan ignored'])
def test_bad_data_raises_the_reference_error(backend: str, bad: str) -> None:
    case = CASES['cls pi_old clip']
    x = make(case)
    skip_unless_runs(backend, case, x)
    if bad == 'label':
        x['labels'][5] = 10
    elif bad == 'nan logit':
        x['logits'][3, 2] = float('nan')
    elif bad == 'nan ignored':  # the reference checks every logit, ignored queries' too
        x['labels'][3] = 255
        x['logits'][3, 2] = float('nan')
    else:
        x['old_logits'][7, 1] = float('inf')
    with pytest.raises(ValueError) as want:
        run_reference(case, x)
    with pytest.raises(ValueError) as got:
        run_backend(case, x, backend)
    assert str(got.value) == str(want.value)


def test_each_backend_runs_what_it_documents() -> None:
    """supports(): the compiled kernel takes CPU float32/float64, the torch path every device
    and dtype; 'sampled' has the torch path only; a custom reward callable not the kernel."""
    def runs(name, dtype=torch.float32, weighting='pi_old', rewards=REWARDS['acc+uni']):
        try:
            grpo_rm_loss_fused(torch.randn(8, 5, dtype=dtype), torch.randint(0, 5, (8, )),
                               rewards, group_weighting=weighting, backend=name)
        except ValueError as err:
            assert 'cannot run this call' in str(err)
            return False
        return True

    assert runs('torch_chunked', torch.bfloat16) and runs('torch_chunked', weighting='sampled')
    custom = [lambda p, y: accuracy_reward(p, y)]
    assert not runs('cpu_native', weighting='sampled')
    assert not runs('cpu_native', rewards=custom)
    if backends.cpu_native.AVAILABLE:
        assert runs('cpu_native', torch.float64) and not runs('cpu_native', torch.bfloat16)


def test_torch_chunks_are_sized_for_the_device() -> None:
    """On CUDA every chunk costs the same hundred-odd launches, so the VOC config's shape is
    cut into a handful of chunks; on the CPU chunks stay within 2^20 elements (the caches)."""
    from grpo_rm_mm.core.backends import torch_chunked as tc

    b, c, s = 64, 21, 448 * 448
    cuda = tc.default_chunk_size(b * c * s, c, 'cuda')
    cpu = tc.default_chunk_size(b * c * s, c, 'cpu')
    n_cuda, n_cpu = (len(list(tc._chunks(b, s, q))) for q in (cuda, cpu))
    assert n_cuda <= 16 and n_cpu >= 10 * n_cuda
    assert cpu * c <= tc.CHUNK_ELEMENTS['cpu'][1] and cuda * c <= tc.CHUNK_ELEMENTS['cuda'][1]
    # small inputs: one chunk on either device
    assert len(list(tc._chunks(8, 112 * 112, tc.default_chunk_size(8 * c * 112 * 112, c,
                                                                  'cuda')))) == 1


@pytest.mark.parametrize('backend', CLOSED_FORM)
@pytest.mark.parametrize('shape', [(4096, 21), (65536, 2)])
def test_half_precision_gradient_under_an_amp_loss_scale(backend: str, shape) -> None:
    """float16 logits backpropagated with an AMP loss scale of 2^16 (inf in float16): the
    gradient is the float64 reference's times the scale, finite, to float16 precision, also
    where the unscaled gradient (about 1 / 65536 per element) is below float16's normal
    range."""
    case = Case(shape, torch.float16, options=dict(group_weighting='pi_old'))
    x = make(case)
    skip_unless_runs(backend, case, x)
    _, ref_grad, _ = run_reference(case, x)
    z = x['logits'].clone().requires_grad_(True)
    loss, _ = grpo_rm_loss_fused(z, x['labels'], REWARDS[case.rewards],
                                 old_logits=x['old_logits'], ignore_index=255, backend=backend,
                                 **case.options)
    loss.backward(torch.tensor(2.0 ** 16, dtype=loss.dtype))
    assert torch.isfinite(z.grad).all()
    want = ref_grad * 2.0 ** 16
    err = float((z.grad.double() - want).abs().max())
    assert err <= 1e-3 * float(want.abs().max()), err
