"""The fused objective's compiled CPU kernel (grpo_rm_mm.core.backends.cpu_native) against
the reference implementation (the oracle) and the torch_chunked backend: every build the CPU
runs, every option the kernel covers, tile boundaries, threads, and which calls take it."""
from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from grpo_rm_mm.core.backends import cpu_native as native
from grpo_rm_mm.core.fused import grpo_rm_loss_fused
from grpo_rm_mm.core.objective import grpo_rm_loss
from grpo_rm_mm.core.rewards import (
    accuracy_reward,
    confidence_penalty_reward,
    uniformity_reward,
)
from grpo_rm_mm.models.rewards import AccuracyReward, UniformityReward

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason='the CPU kernel was not built')


def _builds() -> list[str]:
    """The kernel builds this CPU runs: the portable one and, where supported and built, AVX2 +
    FMA and AVX-512."""
    names = ['_objective_cpu']
    portable = importlib.import_module('grpo_rm_mm.core._objective_cpu')
    for name, supported in (('_objective_cpu_avx2', portable.cpu_has_avx2_fma),
                            ('_objective_cpu_avx512', portable.cpu_has_avx512)):
        if supported():
            try:
                importlib.import_module(f'grpo_rm_mm.core.{name}')
                names.append(name)
            except ImportError:
                pass
    return names


def test_the_widest_build_the_cpu_runs_is_imported() -> None:
    assert native._objective_cpu.__name__ == f'grpo_rm_mm.core.{_builds()[-1]}'


@pytest.fixture(params=_builds())
def build(request, monkeypatch):
    monkeypatch.setattr(native, '_objective_cpu',
                        importlib.import_module(f'grpo_rm_mm.core.{request.param}'))
    return request.param


@pytest.fixture(params=['tiles', 'rows'])
def layout(request, monkeypatch):
    """The kernel's layout where a query's outputs are adjacent (S == 1): tiles of queries or
    one query's outputs as vectors (rows; the default from native.ROW_MIN_VECTORS vectors)."""
    monkeypatch.setattr(native, 'ROW_MIN_VECTORS', 0 if request.param == 'rows' else 1 << 62)
    return request.param


def inputs(seed: int, b: int, c: int, spatial: tuple[int, ...], dtype: torch.dtype,
           old: bool, ref: bool, weight: bool, valid: bool):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((b, c) + spatial, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, c, (b, ) + spatial, generator=g)
    labels.view(-1)[::4] = 255
    return dict(
        logits=z, labels=labels,
        old_logits=z + 0.4 * torch.randn(z.shape, generator=g, dtype=dtype) if old else None,
        ref_logits=torch.randn(z.shape, generator=g, dtype=dtype) if ref else None,
        weight=torch.rand((b, ) + spatial, generator=g, dtype=dtype) if weight else None,
        valid=torch.rand((b, ) + spatial, generator=g) > 0.2 if valid else None)


def flat(x, queries=False):
    if x is None or x.ndim <= (1 if queries else 2):
        return x
    return x.reshape(-1) if queries else x.movedim(1, -1).reshape(-1, x.shape[1])


def reference(x: dict, rewards, **opts):
    za = flat(x['logits']).clone().requires_grad_(True)
    loss, diag = grpo_rm_loss(za, flat(x['labels'], True), rewards,
                              old_logits=flat(x['old_logits']), ref_logits=flat(x['ref_logits']),
                              weight=flat(x['weight'], True), valid=flat(x['valid'], True),
                              ignore_index=255, **opts)
    loss.backward()
    return loss.detach(), za.grad, diag


def fused(x: dict, rewards, backend: str, **opts):
    zb = x['logits'].clone().requires_grad_(True)
    loss, diag = grpo_rm_loss_fused(zb, x['labels'], rewards, old_logits=x['old_logits'],
                                    ref_logits=x['ref_logits'], weight=x['weight'],
                                    valid=x['valid'], ignore_index=255, backend=backend, **opts)
    loss.backward()
    return loss.detach(), flat(zb.grad), diag


def assert_close(got, want, rtol: float) -> None:
    (loss, grad, diag), (ref_loss, ref_grad, ref_diag) = got, want
    assert loss.dtype == ref_loss.dtype and grad.dtype == ref_grad.dtype
    scale = float(ref_grad.abs().max())
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=rtol * scale)
    # at ratio 1 the loss is sum_i w_i A_i = 0 up to rounding: compared at the terms' size
    assert abs(float(loss) - float(ref_loss)) <= rtol * max(1.0, abs(float(ref_loss)))
    assert set(diag) == set(ref_diag)
    for key, value in ref_diag.items():
        assert abs(float(diag[key]) - float(value)) <= 100 * rtol * max(1.0, abs(float(value))), \
            (key, float(diag[key]), float(value))


REWARDS = {
    'acc+uni': [accuracy_reward, uniformity_reward],
    'weighted classes': [AccuracyReward(weight=0.5), UniformityReward(weight=2.0),
                         AccuracyReward(weight=0.25)],
    'all three': [accuracy_reward, uniformity_reward, confidence_penalty_reward],
    'acc': [accuracy_reward],
}


@pytest.mark.parametrize('dtype, rtol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('weighting', ['uniform', 'pi_old'])
@pytest.mark.parametrize('surrogate', ['clip', 'dual_clip'])
def test_kernel_equals_reference(build, layout, dtype, rtol, weighting, surrogate) -> None:
    for i, (shape, old, ref, weight, valid, adv, rewards) in enumerate(itertools.product(
            [(37, 5, ()), (3, 7, (9, 11)), (2, 21, (40, ))], [False, True], [False, True],
            [False, True], [False, True],
            [('population', 'std'), ('unbiased', 'std'), ('population', 'none')],
            ['acc+uni', 'weighted classes', 'all three', 'acc'])):
        if i % 3:  # a third of the grid, every option in it
            continue
        b, c, spatial = shape
        x = inputs(i, b, c, spatial, dtype, old, ref, weight, valid)
        opts = dict(group_weighting=weighting, surrogate=surrogate, beta=0.1 if ref else 0.0,
                    adv_std=adv[0], adv_scale=adv[1], clip_eps_low=0.1, clip_eps_high=0.28,
                    dual_clip_c=1.5)
        assert_close(fused(x, REWARDS[rewards], 'cpu_native', **opts),
                     reference(x, REWARDS[rewards], **opts), rtol)


@pytest.mark.parametrize('shape', [(1, 3), (17, 4), (300, 1000), (2, 3, 1), (2, 5, 77, 3),
                                   (1, 2, 1000), (9, 64), (9, 67), (5, 16), (5, 33)])
def test_tile_boundaries(build, layout, shape) -> None:
    """Partial tiles, one query, C = 1000 (the smallest tile), images shorter and longer
    than a tile; rows of whole vectors and rows with a partial last vector."""
    x = inputs(1, shape[0], shape[1], tuple(shape[2:]), torch.float64, True, True, True, False)
    opts = dict(group_weighting='pi_old', beta=0.05)
    assert_close(fused(x, REWARDS['acc+uni'], 'cpu_native', **opts),
                 reference(x, REWARDS['acc+uni'], **opts), 1e-12)


@pytest.mark.parametrize('old_layout', ['classes_last', 'contiguous'])
def test_classes_last_logits_are_read_in_place(build, layout, old_layout) -> None:
    """Channels-last dense logits (a head whose last layers run in that memory format) are
    read as rows of C adjacent outputs without a copy, and their gradient comes back in the
    same layout; pi_old / pi_ref in either layout."""
    x = inputs(6, 3, 21, (9, 11), torch.float64, True, True, True, True)
    last = dict(memory_format=torch.channels_last)
    x['logits'] = x['logits'].contiguous(**last)
    if old_layout == 'classes_last':
        x['old_logits'] = x['old_logits'].contiguous(**last)
        x['ref_logits'] = x['ref_logits'].contiguous(**last)
    opts = dict(group_weighting='pi_old', beta=0.05)
    got = fused(x, REWARDS['all three'], 'cpu_native', **opts)
    assert_close(got, reference(x, REWARDS['all three'], **opts), 1e-12)
    z = x['logits'].clone().requires_grad_(True)
    grpo_rm_loss_fused(z, x['labels'], REWARDS['acc'], ignore_index=255,
                       backend='cpu_native')[0].backward()
    assert z.grad.stride() == z.stride()
    b, c = z.shape[:2]
    kp = native.plan(z.detach().reshape(b, c, -1), x['labels'].reshape(b, -1), None, None,
                     None, None, REWARDS['acc'], 'pi_old', 'clip')
    assert kp.classes_last and kp.z.data_ptr() == z.data_ptr()  # no copy


@pytest.mark.parametrize('offset', [-1000.0, -60.0, 1000.0])
def test_logits_far_from_zero(build, layout, offset) -> None:
    """Logits (and pi_old's, pi_ref's) all far below or above 0: the softmax is
    shift-invariant, and the lanes of a partial last vector, which hold 0 - max there (up to
    1000, an overflowing exponential), are masked out."""
    x = inputs(8, 9, 67, (), torch.float32, True, True, False, False)
    for key in ('logits', 'old_logits', 'ref_logits'):
        x[key] = x[key] + offset
    opts = dict(group_weighting='pi_old', beta=0.05)
    assert_close(fused(x, REWARDS['acc+uni'], 'cpu_native', **opts),
                 reference(x, REWARDS['acc+uni'], **opts), 1e-5)


def test_kernel_equals_torch_implementation_float32(build) -> None:
    x = inputs(5, 4, 21, (30, 30), torch.float32, True, True, True, True)
    opts = dict(group_weighting='pi_old', beta=0.1)
    assert_close(fused(x, REWARDS['acc+uni'], 'cpu_native', **opts),
                 fused(x, REWARDS['acc+uni'], 'torch_chunked', **opts), 1e-5)


def test_threads_split_the_queries_without_changing_the_result(monkeypatch) -> None:
    x = inputs(2, 2, 21, (160, 160), torch.float32, True, False, False, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(x, REWARDS['acc+uni'], 'cpu_native', group_weighting='pi_old')
        torch.set_num_threads(3)
        calls = []
        run = native._objective_cpu.objective

        def counted(*args):
            calls.append(args[11:13])
            return run(*args)

        monkeypatch.setattr(native._objective_cpu, 'objective', counted, raising=False)
        three = fused(x, REWARDS['acc+uni'], 'cpu_native', group_weighting='pi_old')
    finally:
        torch.set_num_threads(threads)
    assert sorted(calls) == [(0, 17066), (17066, 34133), (34133, 51200)]
    torch.testing.assert_close(three[1], one[1], rtol=0, atol=0)  # per query: bit-identical
    assert abs(float(three[0]) - float(one[0])) <= 1e-6


def test_threads_split_the_rows_without_changing_the_result(monkeypatch) -> None:
    """The row layout split over threads."""
    monkeypatch.setattr(native, 'ROW_MIN_VECTORS', 0)
    x = inputs(4, 6000, 100, (), torch.float32, True, False, True, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(x, REWARDS['acc+uni'], 'cpu_native', group_weighting='pi_old')
        torch.set_num_threads(3)
        two = fused(x, REWARDS['acc+uni'], 'cpu_native', group_weighting='pi_old')
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two[1], one[1], rtol=0, atol=0)
    assert abs(float(two[0]) - float(one[0])) <= 1e-6


@pytest.mark.parametrize('c, dtype, spatial', [(1000, torch.float32, ()), (10, torch.float32, ()),
                                              (1000, torch.float32, (3, )),
                                              (1000, torch.float64, ())])
def test_the_layout_follows_the_row_length_in_vectors(monkeypatch, c, dtype, spatial) -> None:
    """Rows where a query's outputs are adjacent and fill ROW_MIN_VECTORS vectors of the
    build's width; tiles otherwise (images: S > 1)."""
    layouts = []
    run = native._objective_cpu.objective

    def recorded(*args):
        layouts.append(args[10])
        return run(*args)

    monkeypatch.setattr(native._objective_cpu, 'objective', recorded, raising=False)
    x = inputs(0, 4, c, spatial, dtype, False, False, False, False)
    fused(x, REWARDS['acc+uni'], 'cpu_native')
    row_bytes = c * torch.empty((), dtype=dtype).element_size()
    rows = not spatial and row_bytes >= (native.ROW_MIN_VECTORS
                                         * native._objective_cpu.vector_bytes())
    assert layouts == [rows] and rows == (c == 1000 and not spatial)


def test_which_calls_take_the_kernel(monkeypatch) -> None:
    calls = []
    run = native.run
    monkeypatch.setattr(native, 'run', lambda *a, **k: calls.append(1) or run(*a, **k))
    x = inputs(0, 6, 4, (), torch.float32, False, False, False, False)

    def takes(rewards=REWARDS['acc+uni'], backend='auto', logits=None, **opts) -> bool:
        calls.clear()
        y = dict(x, logits=x['logits'] if logits is None else logits)
        fused(y, rewards, backend, **opts)
        return bool(calls)

    assert takes() and takes(REWARDS['weighted classes'])
    assert takes(group_weighting='uniform') and takes(logits=x['logits'].double())
    assert not takes(group_weighting='sampled')
    assert not takes(backend='torch_chunked')
    assert not takes(logits=x['logits'].bfloat16())
    assert not takes([lambda p, y: torch.zeros_like(p)])        # a custom reward callable

    class Doubled(AccuracyReward):                             # its own __call__: not the core's
        def __call__(self, probs, labels, valid=None):
            return 2 * super().__call__(probs, labels, valid)

    assert Doubled().fused_term is None and not takes([Doubled()])
    assert AccuracyReward(weight=0.5).fused_term == ('accuracy', 0.5)
    with pytest.raises(ValueError, match="backend='cpu_native' cannot run this call: it "
                       "needs CPU float32/float64 logits, group_weighting in"):
        takes(backend='cpu_native', group_weighting='sampled')
    with pytest.raises(ValueError, match="backend='cuda' is unknown"):
        takes(backend='cuda')


@pytest.mark.parametrize('case', ['label', 'nan logit', 'inf old', 'nan weight'])
def test_bad_inputs_raise_the_reference_errors(build, layout, case) -> None:
    x = inputs(0, 5, 4, (), torch.float32, True, False, True, False)
    if case == 'label':
        x['labels'][2] = 7
    elif case == 'nan logit':
        x['logits'][1, 2] = float('nan')
    elif case == 'inf old':
        x['old_logits'][3, 0] = float('inf')
    else:
        x['weight'][0] = float('nan')
        x['labels'][0] = 1
    with pytest.raises(ValueError) as want:
        reference(x, REWARDS['acc+uni'])
    with pytest.raises(ValueError) as got:
        fused(x, REWARDS['acc+uni'], 'cpu_native')
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize('shape', [(2, 21, (8, 8)), (6, 100, ())])
def test_all_ignored_batch_is_a_connected_zero(build, layout, shape) -> None:
    x = inputs(0, shape[0], shape[1], shape[2], torch.float32, False, False, False, False)
    x['labels'].fill_(255)
    loss, grad, diag = fused(x, REWARDS['acc+uni'], 'cpu_native')
    assert float(loss) == 0.0 and not grad.any() and float(diag['grpo_queries']) == 0.0


@pytest.mark.parametrize('dtype, rtol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('surrogate', ['clip', 'dual_clip'])
def test_ratios_outside_the_clamp_or_of_underflowing_probabilities(build, layout, dtype, rtol,
                                                                   surrogate) -> None:
    """The ratio p / p_old is taken where every lane has both probabilities normal and the
    log ratio inside +-LOG_RATIO_CLAMP; vectors with a lane outside it (a pi_old far from the
    policy, or probabilities below the smallest normal number) are redone with the clamped
    log ratio, as the reference computes it. Queries of both kinds are mixed in one call."""
    g = torch.Generator().manual_seed(3)
    x = inputs(3, 64, 70, (), dtype, True, False, False, False)
    z, old = x['logits'], x['old_logits']
    old[8:16] = z[8:16] + 30 * torch.randn(8, 70, generator=g, dtype=dtype)   # |log ratio| > 20
    z[20:28] *= 60                                                             # p underflows
    old[20:28] = z[20:28] + 0.5 * torch.randn(8, 70, generator=g, dtype=dtype)
    old[40:44] *= 60                                                           # p_old does
    opts = dict(group_weighting='pi_old', surrogate=surrogate, dual_clip_c=2.0)
    assert_close(fused(x, REWARDS['acc+uni'], 'cpu_native', **opts),
                 reference(x, REWARDS['acc+uni'], **opts), rtol)


@pytest.mark.parametrize('adv_scale', ['std', 'none'])
def test_two_outputs_uniformity_is_exactly_flat(build, layout, adv_scale) -> None:
    """With C = 2 the uniformity reward's share p / mass is exactly 1 (reward 0) in the
    reference; the kernel divides as it does (a reciprocal would leave a rounding residue and
    with it a group that is not flat)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 2, generator=g, dtype=torch.float64) * 0.1
    x = dict(logits=z, labels=torch.randint(0, 2, (16, ), generator=g),
             old_logits=z + 40 * torch.randn(16, 2, generator=g, dtype=torch.float64),
             ref_logits=None, weight=None, valid=None)
    rewards = [uniformity_reward, confidence_penalty_reward]
    assert_close(fused(x, rewards, 'cpu_native', adv_scale=adv_scale),
                 reference(x, rewards, adv_scale=adv_scale), 1e-12)
