"""GRPORMLoss with the default backend ('auto': closed form) against backend='reference':
dense and classification calls, the heads' inner steps (validated, pi_old = None on the first
update), options, and a 2-process gloo run equal to one process."""
import copy

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo_workers
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.registry import MODELS as SEG_MODELS
from mmseg.structures import SegDataSample
from torch import nn

import grpo_rm_mm  # noqa: F401  (registers the components)
from grpo_rm_mm.engine.optim_wrappers import GRPOOptimWrapper
from grpo_rm_mm.models.losses import GRPORMLoss

D = torch.float64


def seg_batch(seed: int, n: int = 2, c: int = 5, h: int = 6, w: int = 7, ignored: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, dtype=D, generator=g) * 2
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[torch.rand(labels.shape, generator=g) < ignored] = 255
    return logits, labels, g


def loss_pair(**kwargs) -> tuple[GRPORMLoss, GRPORMLoss]:
    return (GRPORMLoss(log_diagnostics=False, **kwargs),
            GRPORMLoss(log_diagnostics=False, backend='reference', **kwargs))


@pytest.mark.parametrize('weighting', ['uniform', 'pi_old', 'sampled'])
@pytest.mark.parametrize('surrogate', ['clip', 'dual_clip'])
def test_dense_fused_equals_reference(weighting: str, surrogate: str) -> None:
    logits, labels, g = seg_batch(0)
    old = logits + 0.7 * torch.randn(logits.shape, dtype=D, generator=g)
    ref = torch.randn(logits.shape, dtype=D, generator=g)
    seg_weight = torch.rand(labels.shape, dtype=D, generator=g)
    fused, reference = loss_pair(group_weighting=weighting, surrogate=surrogate, beta=0.2,
                                 dual_clip_c=2.0, seed=4, loss_weight=1.5, chunk_size=9)
    out = {}
    for name, loss_fn in (('fused', fused), ('reference', reference)):
        z = logits.clone().requires_grad_(True)
        value = loss_fn(z, labels, weight=seg_weight, old_logits=old, ref_logits=ref)
        value.backward()
        out[name] = (value.detach(), z.grad, loss_fn.last_diagnostics, loss_fn.last_group_seed)
    assert out['fused'][3] == out['reference'][3]  # the same sampled draws' seed
    torch.testing.assert_close(out['fused'][0], out['reference'][0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out['fused'][1], out['reference'][1], rtol=1e-12, atol=1e-15)
    assert set(out['fused'][2]) == set(out['reference'][2])
    for key, value in out['reference'][2].items():
        torch.testing.assert_close(out['fused'][2][key].to(D), value.to(D), rtol=1e-10,
                                   atol=1e-12)


def test_classification_call_and_the_defaults() -> None:
    assert GRPORMLoss().backend == 'auto'
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 10, generator=g)
    labels = torch.randint(0, 10, (32, ), generator=g)
    fused, reference = loss_pair()
    grads = []
    for loss_fn in (fused, reference):
        z = logits.clone().requires_grad_(True)
        loss_fn(z, labels, avg_factor=32).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('backend', ['cpu_native', 'torch_chunked', 'reference'])
@pytest.mark.parametrize('loss_weight', [1.0, 0.5])
def test_losses_of_one_name_add_up_in_place(backend: str, loss_weight: float) -> None:
    """mmseg's decode heads sum losses that share a name in place
    (``loss[name] += loss_decode(...)``): the returned loss must allow it (a view returned
    by the autograd function would not), with the gradient of the sum."""
    logits, labels, _ = seg_batch(3)
    first, second = (GRPORMLoss(log_diagnostics=False, backend=backend,
                                loss_weight=loss_weight) for _ in range(2))
    z = logits.clone().requires_grad_(True)
    total = first(z, labels)
    total += second(z * 2, labels)
    total.backward()
    z2 = logits.clone().requires_grad_(True)
    (first(z2, labels) + second(z2 * 2, labels)).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-12, atol=1e-15)
    assert z.grad.abs().sum() > 0


def test_backend_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"backend='fast' is unknown; use one of \('auto', "):
        GRPORMLoss(backend='fast')
    with pytest.raises(ValueError, match=r'chunk_size=0 must be a positive int'):
        GRPORMLoss(chunk_size=0)


def test_dense_errors_match_the_reference_messages() -> None:
    logits, labels, _ = seg_batch(2)
    labels[1, 2, 3] = 9
    messages = []
    for loss_fn in loss_pair():
        with pytest.raises(ValueError) as info:
            loss_fn(logits, labels)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and 'label 9 at query' in messages[0]


# ---------------------------------------------------------------------- heads
@pytest.fixture
def mmseg_scope():
    """mmseg as the default scope for the test only (a leaked default scope would make later
    tests of the process build mmpretrain components in mmseg's registry)."""
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield


def seg_samples(labels: torch.Tensor) -> list[SegDataSample]:
    out = []
    for lab in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None])
        s.set_metainfo(dict(img_shape=tuple(lab.shape), pad_shape=tuple(lab.shape)))
        out.append(s)
    return out


@pytest.mark.parametrize('beta', [0.0, 0.1])
def test_seg_head_inner_steps_fused_equal_reference(mmseg_scope, beta: float) -> None:
    """Three optimizer steps (one outer with pi_old = None, two inner with validated=True) of
    the GRPO-RM decode head end at the same weights with either implementation."""
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 4, 4)]
    labels = torch.randint(0, 5, (2, 8, 8))
    labels[:, 0] = 255
    weights = {}
    for impl in ('auto', 'reference'):
        torch.manual_seed(1)
        head = SEG_MODELS.build(dict(type='GRPORMSegHead', in_channels=8, num_classes=5,
                                     loss_decode=dict(type='GRPORMLoss', beta=beta,
                                                      backend=impl)))
        head.init_weights()
        head.train()
        wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(head.parameters(), lr=0.5),
                                   inner_steps=3)
        with wrapper.optim_context(head):
            losses = head.loss(feats, seg_samples(labels), train_cfg=dict())
        assert losses['grpo_kl_old'].item() == 0.0  # ratio 1 on the first update
        wrapper.update_params(losses['loss_grpo'])
        assert wrapper.inner_steps_taken == 2
        weights[impl] = copy.deepcopy(head.conv_seg.state_dict())
    for key in weights['auto']:
        torch.testing.assert_close(weights['auto'][key], weights['reference'][key],
                                   rtol=1e-5, atol=1e-6)


def test_heads_pass_validated_only_in_inner_steps(mmseg_scope) -> None:
    calls = []

    class Spy(GRPORMLoss):
        def forward(self, *args, validated: bool = False, old_logits=None, **kwargs):
            calls.append((validated, old_logits is None))
            return super().forward(*args, validated=validated, old_logits=old_logits, **kwargs)

    head = SEG_MODELS.build(dict(type='GRPORMSegHead', in_channels=8, num_classes=5))
    head.loss_decode = Spy(log_diagnostics=False)
    head.train()
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(head.parameters(), lr=0.1),
                               inner_steps=2)
    with wrapper.optim_context(head):
        losses = head.loss([torch.randn(1, 8, 3, 3)], seg_samples(torch.zeros(1, 6, 6).long()),
                           train_cfg=dict())
    wrapper.update_params(losses['loss_grpo'])
    # outer: checked, pi_old = the current logits (None); inner: validated, cached pi_old
    assert calls == [(False, True), (True, False)]


# ---------------------------------------------------------------------- distributed
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Conv2d(4, 5, 1)
        ddp = nn.parallel.DistributedDataParallel(model)
        x, labels = ddp_batch(rank)
        GRPORMLoss(log_diagnostics=False, chunk_size=7)(ddp(x), labels).backward()
        torch.save(dict(w=model.weight.grad, b=model.bias.grad), f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def ddp_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 4, 5, 5, generator=g)
    labels = torch.randint(0, 5, (2, 5, 5), generator=g)
    labels[:, 0, :] = 255  # the same number of valid pixels on both ranks
    return x, labels


def test_two_processes_gloo_equal_one_process(tmp_path) -> None:
    run_gloo_workers(_ddp_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    torch.testing.assert_close(r0['w'], r1['w'], rtol=0, atol=0)
    # one process on both ranks' batches (equal valid counts: the mean of the two means)
    torch.manual_seed(0)
    model = nn.Conv2d(4, 5, 1)
    (x0, y0), (x1, y1) = ddp_batch(0), ddp_batch(1)
    for impl in ('auto', 'reference'):
        model.zero_grad()
        GRPORMLoss(log_diagnostics=False, backend=impl)(
            model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        torch.testing.assert_close(r0['w'], model.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r0['b'], model.bias.grad, rtol=1e-5, atol=1e-7)
