"""The Triton backend (grpo_rm_mm.core.backends.triton_cuda) against the reference objective.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by tests/conftest.py before anything is imported, and here as a
fallback); with one they run on it. The interpreter costs per program instance, so the cases
use few, large tiles (``block_q``), with a smaller one where a case needs partial tiles.

The reference is :func:`grpo_rm_mm.core.objective.grpo_rm_loss` with autograd, on the inputs
cast to float64 (float32 where a case depends on a pi_old probability underflowing to 0).
"""
from __future__ import annotations

import math
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before the backend module: Triton picks the interpreter when a kernel is made
    os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402

from grpo_rm_mm.core.backends import triton_cuda  # noqa: E402
from grpo_rm_mm.core.objective import DIAGNOSTIC_KEYS, grpo_rm_loss  # noqa: E402
from grpo_rm_mm.core.problem import Problem  # noqa: E402
from grpo_rm_mm.core.rewards import accuracy_reward as acc  # noqa: E402
from grpo_rm_mm.core.rewards import confidence_penalty_reward as conf  # noqa: E402
from grpo_rm_mm.core.rewards import uniformity_reward as uni  # noqa: E402
from grpo_rm_mm.models import rewards as mm_rewards  # noqa: E402

pytestmark = pytest.mark.skipif(
    not triton_cuda.AVAILABLE or not (CUDA or os.environ.get('TRITON_INTERPRET') == '1'),
    reason='needs triton, and a CUDA device or TRITON_INTERPRET=1')

DEVICE = torch.device('cuda' if CUDA else 'cpu')
BACKEND = triton_cuda.BACKEND
#: queries per tile in the cases: one or two programs (the interpreter's cost is per program)
BIG_BLOCK = 1024

#: reward specs: the core rewards (coefficient 1) and the registered classes with weights
REWARDS = {
    'acc': [acc],
    'acc+uni': [acc, uni],
    'weighted': [mm_rewards.AccuracyReward(weight=2.0), mm_rewards.UniformityReward(weight=0.5),
                 mm_rewards.ConfidencePenaltyReward(weight=0.3)],
    'uni': [uni],
    'acc+conf': [acc, conf],
}


# ----------------------------------------------------------------------------- helpers
def make_problem(logits: torch.Tensor, labels: torch.Tensor, rewards, old=None, ref=None,
                 valid=None, weight=None, ignore_index=None, *, clip_eps: float = 0.2,
                 clip_eps_low: float | None = None, clip_eps_high: float | None = None,
                 beta: float = 0.0, group_weighting: str = 'uniform', surrogate: str = 'clip',
                 adv_std: str = 'population', adv_eps: float = 1e-6, adv_scale: str = 'std',
                 dual_clip_c: float = 3.0, validated: bool = False,
                 diagnostics: bool = True) -> Problem:
    """The :class:`Problem` of a call as the fused entry point builds it: (B, C, S) / (B, S)
    views of the (N, C) or (B, C, *S) inputs."""
    b, c = logits.shape[0], logits.shape[1]

    def view3(x):
        return None if x is None else x.detach().reshape(b, c, -1)

    def view2(x):
        return None if x is None else x.detach().reshape(b, -1)

    return Problem(
        z=view3(logits), y=view2(labels), old=view3(old), ref=view3(ref), rewards=rewards,
        reward_tensor=view3(rewards) if torch.is_tensor(rewards) else None,
        valid=view2(valid), weight=view2(weight), shape=logits.shape,
        ignore_index=ignore_index,
        cdt=torch.float64 if logits.dtype == torch.float64 else torch.float32, beta=beta,
        eps_low=clip_eps if clip_eps_low is None else clip_eps_low,
        eps_high=clip_eps if clip_eps_high is None else clip_eps_high,
        dual_clip_c=float(dual_clip_c), weighting=group_weighting, surrogate=surrogate,
        adv_std=adv_std, adv_eps=float(adv_eps), adv_scale=adv_scale, group_size=8,
        generator=None, validated=validated, diagnostics=diagnostics, logits=logits)


def _outputs(x, dtype):
    """(N, C) or (B, C, *S) -> (queries, C) in query order, as ``dtype``."""
    if x is None:
        return None
    if x.ndim > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.to(dtype)


def reference(logits, labels, rewards, old=None, ref=None, valid=None, weight=None,
              ignore_index=None, dtype=torch.float64, **options):
    """``(loss, gradient of the logits' shape, diagnostics)`` of :func:`grpo_rm_loss` on the
    inputs cast to ``dtype``."""
    c = logits.shape[1]
    flat = _outputs(logits.detach(), dtype).clone().requires_grad_(True)
    loss, diag = grpo_rm_loss(
        flat, labels.reshape(-1), rewards, old_logits=_outputs(old, dtype),
        ref_logits=_outputs(ref, dtype),
        valid=None if valid is None else valid.reshape(-1),
        weight=None if weight is None else weight.reshape(-1).to(dtype),
        ignore_index=ignore_index, **options)
    grad, = torch.autograd.grad(loss, flat)
    if logits.ndim > 2:
        grad = grad.reshape(logits.shape[0], *logits.shape[2:], c).movedim(-1, 1)
    return loss.detach(), grad.reshape(logits.shape), diag


def solve(logits, labels, rewards, block_q: int | None = BIG_BLOCK,
          max_programs: int = triton_cuda.MAX_PROGRAMS, **kwargs):
    options = {k: v for k, v in kwargs.items() if k not in ('old', 'ref', 'valid', 'weight',
                                                             'ignore_index')}
    problem = make_problem(logits, labels, rewards, kwargs.get('old'), kwargs.get('ref'),
                           kwargs.get('valid'), kwargs.get('weight'),
                           kwargs.get('ignore_index'), **options)
    assert BACKEND.supports(problem) is None, BACKEND.supports(problem)
    return BACKEND.solve(problem, block_q=block_q, max_programs=max_programs)


def final_grad(sol, grad_loss: float = 1.0) -> torch.Tensor:
    """d (grad_loss * loss) / d logits, as the backward forms it (the backend's scaling
    kernel on a copy of the solution's gradient)."""
    return BACKEND.backward(sol.grad.clone(), torch.tensor(grad_loss, device=DEVICE),
                            sol.grad_scale)


def ref_options(kwargs: dict) -> dict:
    """The reference's keyword arguments of a case's (make_problem's)."""
    return {k: v for k, v in kwargs.items() if k not in ('validated', 'diagnostics')}


def assert_matches(sol, logits, labels, rewards, *, rtol=1e-5, atol=1e-6, grad_tol=None,
                   ref_dtype=torch.float64, **kwargs):
    loss, grad, diag = reference(logits, labels, rewards, dtype=ref_dtype,
                                 **ref_options(kwargs))
    assert not sol.delegate
    assert sol.n_valid == int(diag['grpo_queries'])
    assert sol.loss.dtype == torch.float32 and sol.loss.ndim == 0
    assert math.isclose(float(sol.loss), float(loss), rel_tol=rtol, abs_tol=atol), (
        float(sol.loss), float(loss))
    assert sol.grad.shape == logits.shape and sol.grad.dtype == logits.dtype
    assert sol.grad.stride() == logits.stride()
    scale = float(grad.abs().max())
    tol = grad_tol if grad_tol is not None else 1e-5
    err = float((final_grad(sol).double() - grad.double()).abs().max())
    assert err <= tol * scale + 1e-9, (err, scale)
    if kwargs.get('diagnostics', True):
        for key in DIAGNOSTIC_KEYS:
            got, want = float(sol.diagnostics[key]), float(diag[key])
            assert math.isclose(got, want, rel_tol=max(rtol, 1e-5), abs_tol=max(atol, 1e-6)), (
                key, got, want)
    else:
        assert set(sol.diagnostics) == {'grpo_queries'}
    assert float(sol.diagnostics['grpo_queries']) == sol.n_valid


def inputs(shape, *, layout: str = 'contiguous', old: bool = True, ref: bool = False,
           dtype=torch.float32, seed: int = 0, spread: float = 2.0):
    """Random logits of ``shape`` (N, C) or (B, C, *S), labels, pi_old / pi_ref logits near
    them, in ``layout`` ('contiguous' or 'channels_last': classes innermost in memory)."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]

    def make(x):
        x = x.to(dtype)
        if layout == 'channels_last':
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        return x.to(DEVICE)

    z = torch.randn(shape, generator=gen) * spread
    out = {'logits': make(z)}
    label_shape = (shape[0], ) + tuple(shape[2:])
    out['labels'] = torch.randint(0, c, label_shape, generator=gen).to(DEVICE)
    if old:
        out['old'] = make(z + 0.5 * torch.randn(shape, generator=gen))
    if ref:
        out['ref'] = make(z + 0.7 * torch.randn(shape, generator=gen))
    return out


# ----------------------------------------------------------------------------- the matrix
CASES = {
    # id: (shape, layout, old, ref, rewards, options, block_q)
    'uniform-clip-acc-ratio1-nc21': ((40, 21), 'contiguous', False, False, 'acc', {}, None),
    'piold-clip-accuni-old-refbeta0-dense21': (
        (2, 21, 5, 7), 'contiguous', True, True, 'acc+uni',
        dict(group_weighting='pi_old'), 16),
    'piold-dual-weighted-old-refbeta-cl21': (
        (2, 21, 6, 5), 'channels_last', True, True, 'weighted',
        dict(group_weighting='pi_old', surrogate='dual_clip', beta=0.1), 8),
    'uniform-asym-accuni-old-refbeta-nc2': (
        (50, 2), 'contiguous', True, True, 'acc+uni',
        dict(clip_eps_low=0.1, clip_eps_high=0.3, beta=0.1), 16),
    'uniform-dual-weighted-old-dense1000': (
        (2, 1000, 3), 'contiguous', True, False, 'weighted', dict(surrogate='dual_clip'), None),
    'piold-clip-acc-ratio1-refbeta-cl2': (
        (2, 2, 4, 5), 'channels_last', False, True, 'acc',
        dict(group_weighting='pi_old', beta=0.1), None),
    'uniform-clip-accuni-old-scalenone-nc21': (
        (30, 21), 'contiguous', True, False, 'acc+uni', dict(adv_scale='none'), None),
    'piold-clip-accuni-old-unbiased-nc21': (
        (30, 21), 'contiguous', True, False, 'acc+uni',
        dict(group_weighting='pi_old', adv_std='unbiased'), None),
    'uniform-dual-accconf-old-unbiased-nc1000': (
        (5, 1000), 'contiguous', True, True, 'acc+conf',
        dict(adv_std='unbiased', surrogate='dual_clip', beta=0.1), None),
    'piold-asym-weighted-old-ref-nodiag-dense21': (
        (2, 21, 3, 3), 'contiguous', True, True, 'weighted',
        dict(group_weighting='pi_old', clip_eps_low=0.1, clip_eps_high=0.28, beta=0.1,
             diagnostics=False), None),
    'piold-clip-acc-ratio1-dense1000-cl': (
        (1, 1000, 2, 2), 'channels_last', False, False, 'acc',
        dict(group_weighting='pi_old', adv_scale='none'), None),
    'uniform-clip-uni-flat-nc2': ((20, 2), 'contiguous', True, False, 'uni', {}, None),
}


@pytest.mark.parametrize('case', list(CASES))
def test_matches_reference(case):
    shape, layout, old, ref, rewards, options, block_q = CASES[case]
    x = inputs(shape, layout=layout, old=old, ref=ref)
    logits, labels = x.pop('logits'), x.pop('labels')
    sol = solve(logits, labels, REWARDS[rewards], block_q=block_q or BIG_BLOCK, **x,
                **options)
    assert_matches(sol, logits, labels, REWARDS[rewards], **x, **options)


def test_large_ratios_and_partial_tiles():
    """Log ratios beyond the clamp (no gradient there), clipped outputs on both sides, and
    queries that do not fill the last tile."""
    x = inputs((2, 21, 37), old=True, ref=True, spread=6.0)
    x['old'] = x['old'] + 30.0 * (torch.rand(x['old'].shape, device=DEVICE) > 0.9)
    logits, labels = x.pop('logits'), x.pop('labels')
    kwargs = dict(group_weighting='uniform', surrogate='dual_clip', beta=0.05, **x)
    sol = solve(logits, labels, REWARDS['acc+uni'], block_q=16, **kwargs)
    assert 0 < float(sol.diagnostics['grpo_clip_frac']) < 1
    assert_matches(sol, logits, labels, REWARDS['acc+uni'], **kwargs)


def test_ignore_index_valid_mask_and_weights():
    x = inputs((2, 21, 5, 7), old=True, ref=True)
    logits, labels = x.pop('logits'), x.pop('labels')
    gen = torch.Generator().manual_seed(3)
    labels = labels.clone()
    labels[torch.rand(labels.shape, generator=gen).to(DEVICE) < 0.2] = 255
    valid = (torch.rand(labels.shape, generator=gen) < 0.8).to(DEVICE)
    weight = torch.rand(labels.shape, generator=gen).to(DEVICE) * 2
    kwargs = dict(valid=valid, weight=weight, ignore_index=255, group_weighting='pi_old',
                  beta=0.1, **x)
    sol = solve(logits, labels, REWARDS['weighted'], block_q=16, **kwargs)
    assert 0 < sol.n_valid < labels.numel()
    assert_matches(sol, logits, labels, REWARDS['weighted'], **kwargs)
    uncounted = ~valid | (labels == 255)
    assert bool((sol.grad.movedim(1, -1)[uncounted] == 0).all())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    x = inputs((2, 21, 4, 6), old=True, ref=True, dtype=dtype)
    logits, labels = x.pop('logits'), x.pop('labels')
    kwargs = dict(group_weighting='pi_old', beta=0.1, **x)
    sol = solve(logits, labels, REWARDS['acc+uni'], **kwargs)
    # the reference on the upcast values; the gradient is rounded to the logits' dtype
    assert_matches(sol, logits, labels, REWARDS['acc+uni'], rtol=1e-4, grad_tol=1e-2, **kwargs)


def test_validated_labels_skip_the_check():
    x = inputs((16, 21), old=True)
    logits, labels = x.pop('logits'), x.pop('labels')
    sol = solve(logits, labels, REWARDS['acc+uni'], validated=True, **x)
    assert_matches(sol, logits, labels, REWARDS['acc+uni'], validated=True, **x)
    bad = labels.clone()
    bad[3] = 21
    assert not solve(logits, bad, REWARDS['acc'], validated=True, **x).delegate


# ----------------------------------------------------------------------------- edge cases
def test_underflowing_pi_old_weights_and_flat_groups():
    """pi_old probabilities exactly 0 (logit gaps of 200): a query whose only weighted output
    is its label is flat (A = 0) although its rewards differ; another keeps two weighted
    outputs. The reference in float32, which underflows alike."""
    c = 21
    logits = torch.randn(4, c, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels = torch.tensor([3, 5, 7, 0], device=DEVICE)
    old = torch.zeros(4, c, device=DEVICE)
    old[0, 3] = 200.0                                   # only the label has weight: flat
    old[1, 5] = old[1, 6] = 200.0                       # two weighted outputs: not flat
    old[2] = torch.randn(c, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    old[3, 0] = 200.0
    for rewards in (REWARDS['acc'], REWARDS['weighted']):
        kwargs = dict(old=old, group_weighting='pi_old', adv_std='unbiased')
        sol = solve(logits, labels, rewards, **kwargs)
        assert_matches(sol, logits, labels, rewards, ref_dtype=torch.float32, rtol=1e-4,
                       atol=1e-5, **kwargs)
    # p_old_y = 1 (the uniformity reward's wrong-class mass is 0) under uniform weights
    kwargs = dict(old=old)
    sol = solve(logits, labels, REWARDS['acc+uni'], **kwargs)
    assert_matches(sol, logits, labels, REWARDS['acc+uni'], ref_dtype=torch.float32,
                   rtol=1e-4, atol=1e-5, **kwargs)


def test_all_ignored_batch():
    x = inputs((2, 21, 3, 3), old=True)
    labels = torch.full_like(x['labels'], 255)
    sol = solve(x['logits'], labels, REWARDS['acc'], old=x['old'], ignore_index=255)
    assert sol.n_valid == 0 and not sol.delegate
    assert float(sol.loss) == 0.0
    assert bool((sol.grad == 0).all())


def test_bad_label_delegates():
    x = inputs((12, 21), old=True)
    labels = x['labels'].clone()
    labels[4] = 21
    assert solve(x['logits'], labels, REWARDS['acc'], old=x['old']).delegate
    labels[4] = -3
    assert solve(x['logits'], labels, REWARDS['acc'], old=x['old']).delegate
    # an ignored out-of-range label is not checked
    assert not solve(x['logits'], labels, REWARDS['acc'], old=x['old'],
                     ignore_index=-3).delegate


# the interpreter's numpy arithmetic warns about the non-finite values
@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')
@pytest.mark.parametrize('where', ['logits', 'old', 'ref', 'weight'])
def test_non_finite_input_of_a_counted_query_delegates(where):
    x = inputs((2, 21, 4), old=True, ref=True)
    weight = torch.ones(x['labels'].shape, device=DEVICE)
    target = weight if where == 'weight' else x[where]
    if where == 'weight':
        target[1, 2] = float('inf')
    else:
        target[1, 5, 2] = float('nan')
    sol = solve(x['logits'], x['labels'], REWARDS['acc+uni'], old=x['old'], ref=x['ref'],
                weight=weight, beta=0.0)
    assert sol.delegate


@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')
def test_non_finite_logit_of_an_ignored_query_delegates_as_the_reference_raises():
    """The reference checks every logit, ignored queries' too: the backend hands such a call
    to it (delegate), as the other backends do."""
    x = inputs((2, 21, 4), old=True, ref=True)
    logits, labels = x.pop('logits').clone(), x.pop('labels').clone()
    logits[1, 5, 2] = float('nan')
    labels[1, 2] = labels[0, 1] = 255
    kwargs = dict(ignore_index=255, beta=0.1, group_weighting='pi_old', **x)
    assert solve(logits, labels, REWARDS['acc+uni'], **kwargs).delegate


def test_gradient_layout_follows_the_logits():
    x = inputs((2, 5, 3, 4), layout='channels_last', old=False)
    sol = solve(x['logits'], x['labels'], REWARDS['acc'])
    assert sol.grad.stride() == x['logits'].stride()
    assert sol.grad.is_contiguous(memory_format=torch.channels_last)
    y = inputs((2, 5, 3, 4), old=False)
    assert solve(y['logits'], y['labels'], REWARDS['acc']).grad.is_contiguous()


def test_default_tiles():
    """The default tile size (several programs, merged (N, C) queries)."""
    x = inputs((300, 21), old=True)
    logits, labels = x.pop('logits'), x.pop('labels')
    sol = solve(logits, labels, REWARDS['acc+uni'], block_q=None, **x)
    assert_matches(sol, logits, labels, REWARDS['acc+uni'], **x)


def test_programs_loop_over_their_tiles():
    """Fewer programs than tiles: each takes every programs-th tile (19 tiles of 16 queries
    over 2 and 3 programs, dense and (N, C)); the same values as one program per tile."""
    x = inputs((2, 21, 10, 15), old=True, ref=True)
    logits, labels = x.pop('logits'), x.pop('labels')
    options = dict(group_weighting='pi_old', beta=0.1, **x)
    for programs in (2, 3):
        sol = solve(logits, labels, REWARDS['weighted'], block_q=16, max_programs=programs,
                    **options)
        assert_matches(sol, logits, labels, REWARDS['weighted'], **options)
    y = inputs((300, 7), old=True)
    logits, labels = y.pop('logits'), y.pop('labels')
    sol = solve(logits, labels, REWARDS['acc+uni'], block_q=16, max_programs=3, **y)
    assert_matches(sol, logits, labels, REWARDS['acc+uni'], **y)


# ----------------------------------------------------------------------------- supports
def test_supports_reasons(monkeypatch):
    x = inputs((4, 21), old=True)
    logits, labels = x['logits'], x['labels']

    def reason(**kwargs):
        rewards = kwargs.pop('rewards', REWARDS['acc'])
        return BACKEND.supports(make_problem(kwargs.pop('logits', logits), labels, rewards,
                                             **kwargs))

    assert reason() is None
    assert reason(logits=logits.double()) == 'float64 logits run on the torch path'
    assert 'group_weighting' in reason(group_weighting='sampled')
    assert 'reward tensor' in reason(rewards=torch.zeros_like(logits))
    assert 'rewards of grpo_rm_mm.core.rewards' in reason(
        rewards=[lambda p, y: torch.zeros_like(p)])
    wide = torch.zeros(1, triton_cuda.MAX_CLASSES + 1, device=DEVICE)
    assert 'C <=' in BACKEND.supports(make_problem(wide, labels[:1], REWARDS['acc']))
    if not CUDA:
        monkeypatch.setenv('TRITON_INTERPRET', '0')
        assert 'CUDA tensors' in reason()
    monkeypatch.setattr(triton_cuda, 'AVAILABLE', False)
    assert reason() == 'triton is not installed'


def test_self_check_passes():
    assert triton_cuda._self_check(DEVICE) is None


def test_failed_self_check_warns_once_and_declines(monkeypatch):
    monkeypatch.setattr(triton_cuda, '_SELF_CHECKS', {})
    real = triton_cuda.launch

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(grad=out.grad * 2)

    monkeypatch.setattr(triton_cuda, 'launch', broken)
    with pytest.warns(RuntimeWarning, match='self-check failed on'):
        first = triton_cuda._device_check(DEVICE)
    assert first.startswith(f'the Triton self-check failed on {DEVICE}')
    assert 'gradient' in first
    # cached: no second run, no second warning
    monkeypatch.setattr(triton_cuda, '_self_check', lambda device: pytest.fail('rerun'))
    assert triton_cuda._device_check(DEVICE) == first

    def raising(*args, **kwargs):
        raise RuntimeError('no kernel image')

    monkeypatch.undo()
    monkeypatch.setattr(triton_cuda, '_SELF_CHECKS', {})
    monkeypatch.setattr(triton_cuda, 'launch', raising)
    with pytest.warns(RuntimeWarning, match='no kernel image'):
        assert 'RuntimeError' in triton_cuda._device_check(DEVICE)


def test_backward_scales_once_and_refuses_a_second_pass():
    """Through the shared autograd Function: the backward's scaling kernel forms
    ``grad_loss / n_valid`` times the stored gradient, and advances its version, so that a
    second backward through the graph is refused instead of scaling it again."""
    from grpo_rm_mm.core.fused import grpo_rm_loss_fused

    x = inputs((2, 21, 4, 3), old=True)
    labels = x['labels'].clone()
    labels[0, 0] = 255
    z = x['logits'].clone().requires_grad_(True)
    loss, _ = grpo_rm_loss_fused(z, labels, REWARDS['acc+uni'], old_logits=x['old'],
                                 ignore_index=255, group_weighting='pi_old', backend='triton')
    (2.5 * loss).backward(retain_graph=True)
    _, grad, _ = reference(x['logits'], labels, REWARDS['acc+uni'], old=x['old'],
                           ignore_index=255, group_weighting='pi_old')
    torch.testing.assert_close(z.grad.double(), 2.5 * grad, rtol=1e-5,
                               atol=1e-6 * float(grad.abs().max()))
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        loss.backward()
