"""GRPO optimizer wrappers: inner steps without a second backbone forward, gradient
accumulation, AMP (bf16 on CPU), state_dict, DDP (2-process gloo), and the batch cache of
GRPOPolicyHeadMixin."""
import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo_workers
from torch import nn

import grpo_rm_mm  # noqa: F401  (compat patches: AMP on CPU in bf16)
from grpo_rm_mm.core.objective import grpo_rm_loss
from grpo_rm_mm.core.rewards import accuracy_reward, uniformity_reward
from grpo_rm_mm.engine.optim_wrappers import GRPOAmpOptimWrapper, GRPOOptimWrapper
from grpo_rm_mm.models.heads.policy_head import (
    GRPOCachedBatch,
    GRPOPolicyHeadMixin,
    make_reference,
)
from grpo_rm_mm.models.losses import GRPORMLoss

IN, FEAT, C = 3, 4, 5
LR = 0.5


class CountingBackbone(nn.Module):
    """Frozen linear 'backbone' that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN, FEAT)
        self.fc.requires_grad_(False)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            return self.fc(x)


class TinyHead(GRPOPolicyHeadMixin, nn.Module):
    """Linear head with the GRPO-RM loss; caches (feats, labels, old_logits) per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEAT, C)
        self.loss_module = GRPORMLoss(log_diagnostics=False)
        self.logit_dtypes: list[torch.dtype] = []

    def _losses(self, feats, labels, old_logits):
        logits = self.fc(feats)
        self.logit_dtypes.append(logits.dtype)
        out = {'loss_grpo': self.loss_module(logits, labels, old_logits=old_logits)}
        out.update(self.loss_module.last_diagnostics)
        return out

    def loss(self, feats, labels):
        old = self.fc(feats).detach()
        out = self._losses(feats, labels, old)
        self.grpo_cache_append(GRPOCachedBatch(feats, labels, old))
        return out

    def _grpo_inner_loss(self, item):
        return self._losses(item.feats, item.labels, item.old_logits)


class TinyModel(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = CountingBackbone()
        self.head = TinyHead()

    def forward(self, x, y):
        return self.head.loss(self.backbone(x), y)


class PlainModel(nn.Module):
    """A head without the mixin, GRPORMLoss as its loss (like a foreign mmseg head)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN, C)
        self.loss_module = GRPORMLoss(log_diagnostics=False)

    def forward(self, x, y):
        return {'loss_grpo': self.loss_module(self.fc(x), y)}


def batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g), torch.randint(0, C, (n, ), generator=g)


def count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    counter = [0]

    def hook(opt, args, kwargs):
        counter[0] += 1

    optimizer.register_step_post_hook(hook)
    return counter


def train_iter(wrapper, model, x, y) -> None:
    """What mmengine's BaseModel.train_step does."""
    with wrapper.optim_context(model):
        losses = model(x, y)
    wrapper.update_params(sum(v for k, v in losses.items() if 'loss' in k))


def manual_grpo(model: TinyModel, micro_batches: list, k: int) -> tuple[torch.Tensor, ...]:
    """Independent oracle: plain SGD on the head with the core loss; pi_old fixed at the
    pre-update head; step 1 = mean of the micro-batch gradients, then k-1 steps on the mean
    of the micro-batch losses over the same features."""
    w = model.head.fc.weight.detach().clone().requires_grad_(True)
    b = model.head.fc.bias.detach().clone().requires_grad_(True)
    feats = [(model.backbone.fc(x).detach(), y) for x, y in micro_batches]
    olds = [(f @ w.T + b).detach() for f, _ in feats]
    rewards = [accuracy_reward, uniformity_reward]
    weighting = model.head.loss_module.group_weighting  # the weighting of the loss under test
    for _ in range(k):
        loss = sum(grpo_rm_loss(f @ w.T + b, y, rewards, old_logits=o,
                                group_weighting=weighting)[0]
                   for (f, y), o in zip(feats, olds)) / len(feats)
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= LR * gw
            b -= LR * gb
    return w.detach(), b.detach()


# ---------------------------------------------------------------------- inner steps
@pytest.mark.parametrize('k', [1, 3])
def test_k_optimizer_steps_and_one_backbone_forward_per_batch(k: int) -> None:
    model = TinyModel()
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.head.parameters(), lr=LR),
                               inner_steps=k)
    steps = count_steps(wrapper.optimizer)
    for i in range(2):
        x, y = batch(i)
        expected = manual_grpo(model, [(x, y)], k)
        train_iter(wrapper, model, x, y)
        assert steps[0] == k * (i + 1)
        assert model.backbone.calls == i + 1
        assert not model.head.grpo_has_cache()
        torch.testing.assert_close(model.head.fc.weight.detach(), expected[0])
        torch.testing.assert_close(model.head.fc.bias.detach(), expected[1])
    assert (wrapper.outer_steps, wrapper.inner_steps_taken) == (2, 2 * (k - 1))
    assert model.head.grpo_cache_enabled is (k > 1)
    if k > 1:  # the last inner step moved away from pi_old
        assert model.head.loss_module.last_diagnostics['grpo_kl_old'] > 0


def test_gradient_accumulation_steps_every_second_micro_batch() -> None:
    model = TinyModel(1)
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.head.parameters(), lr=LR),
                               inner_steps=3, accumulative_counts=2)
    steps = count_steps(wrapper.optimizer)
    m1, m2 = batch(10), batch(11)
    expected = manual_grpo(model, [m1, m2], 3)
    train_iter(wrapper, model, *m1)
    assert steps[0] == 0 and model.head.grpo_cache_size() == 1
    assert wrapper.inner_count == 1
    train_iter(wrapper, model, *m2)
    assert steps[0] == 3 and not model.head.grpo_has_cache()
    assert wrapper.inner_count == 2  # inner steps do not advance the accumulation counter
    assert model.backbone.calls == 2
    torch.testing.assert_close(model.head.fc.weight.detach(), expected[0])
    torch.testing.assert_close(model.head.fc.bias.detach(), expected[1])
    m3, m4 = batch(12), batch(13)
    expected = manual_grpo(model, [m3, m4], 3)
    train_iter(wrapper, model, *m3)
    assert steps[0] == 3
    train_iter(wrapper, model, *m4)
    assert steps[0] == 6 and model.backbone.calls == 4
    torch.testing.assert_close(model.head.fc.weight.detach(), expected[0])


def test_amp_wrapper_bf16_on_cpu() -> None:
    model = TinyModel(2)
    wrapper = GRPOAmpOptimWrapper(optimizer=torch.optim.SGD(model.head.parameters(), lr=LR),
                                  inner_steps=2, dtype='bfloat16')
    steps = count_steps(wrapper.optimizer)
    before = model.head.fc.weight.detach().clone()
    train_iter(wrapper, model, *batch(20))
    assert steps[0] == 2 and model.backbone.calls == 1
    # the outer forward and the inner-step forward both ran under bf16 autocast
    assert model.head.logit_dtypes == [torch.bfloat16, torch.bfloat16]
    w = model.head.fc.weight.detach()
    assert torch.isfinite(w).all() and not torch.equal(w, before)
    assert (wrapper.outer_steps, wrapper.inner_steps_taken) == (1, 1)


def test_state_dict_round_trips_the_counters() -> None:
    model = TinyModel(3)
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.Adam(model.head.parameters(), lr=1e-2),
                               inner_steps=3)
    for i in range(2):
        train_iter(wrapper, model, *batch(30 + i))
    state = wrapper.state_dict()
    assert state['grpo_inner_steps']['outer_steps'] == 2
    assert state['grpo_inner_steps']['inner_steps_taken'] == 4
    fresh = GRPOOptimWrapper(optimizer=torch.optim.Adam(model.head.parameters(), lr=1e-2),
                             inner_steps=3)
    fresh.load_state_dict(copy.deepcopy(state))
    assert (fresh.outer_steps, fresh.inner_steps_taken) == (2, 4)
    adam_steps = [float(s['step']) for s in fresh.optimizer.state_dict()['state'].values()]
    assert adam_steps == [6.0, 6.0]  # Adam's own count: 3 steps per batch
    # a plain OptimWrapper checkpoint (no counters) loads and leaves them at 0
    plain = copy.deepcopy(state)
    plain.pop('grpo_inner_steps')
    other = GRPOOptimWrapper(optimizer=torch.optim.Adam(model.head.parameters(), lr=1e-2))
    other.load_state_dict(plain)
    assert (other.outer_steps, other.inner_steps_taken) == (0, 0)
    amp = GRPOAmpOptimWrapper(optimizer=torch.optim.Adam(model.head.parameters(), lr=1e-2),
                              inner_steps=3, dtype='bfloat16')
    amp.outer_steps, amp.inner_steps_taken = 5, 10
    amp_state = amp.state_dict()
    assert 'loss_scaler' in amp_state
    amp2 = GRPOAmpOptimWrapper(optimizer=torch.optim.Adam(model.head.parameters(), lr=1e-2),
                               inner_steps=3, dtype='bfloat16')
    amp2.load_state_dict(amp_state)
    assert (amp2.outer_steps, amp2.inner_steps_taken) == (5, 10)


def test_unwraps_ddp_like_module_attribute() -> None:
    class Wrapped(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    model = TinyModel(4)
    wrapped = Wrapped(model)
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.head.parameters(), lr=LR),
                               inner_steps=2)
    steps = count_steps(wrapper.optimizer)
    train_iter(wrapper, wrapped, *batch(40))
    assert steps[0] == 2 and model.backbone.calls == 1


def test_inner_losses_are_reduced_by_the_models_parse_losses() -> None:
    from mmengine.model import BaseModel

    class Parsing(BaseModel):
        """A model whose parse_losses doubles the loss and records its calls."""

        def __init__(self) -> None:
            super().__init__()
            self.net = TinyModel(5)
            self.parsed: list[list[str]] = []

        def forward(self, x, y):
            return self.net(x, y)

        def parse_losses(self, losses):
            self.parsed.append(sorted(losses))
            loss, log_vars = super().parse_losses(losses)
            return 2 * loss, log_vars

    class Wrapped(nn.Module):  # the module of a DDP-like wrapper is the model
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = Parsing()
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                               inner_steps=2)
    reference = TinyModel(5)
    x, y = batch(45)
    feats = reference.backbone.fc(x).detach()
    old = reference.head.fc(feats).detach()  # pi_old: the head before the outer step
    w, b = manual_grpo(reference, [(x, y)], 1)  # the outer step, on the plain sum
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    inner = reference.head.loss_module(feats @ w.T + b, y, old_logits=old)
    gw, gb = torch.autograd.grad(2 * inner, (w, b))
    with wrapper.optim_context(Wrapped(model)):
        losses = model(x, y)
    wrapper.update_params(sum(v for k, v in losses.items() if 'loss' in k))
    assert len(model.parsed) == 1 and 'loss_grpo' in model.parsed[0]
    # the inner step descended the doubled loss of the model's parse_losses
    torch.testing.assert_close(model.net.head.fc.weight.detach(), (w - LR * gw).detach())
    torch.testing.assert_close(model.net.head.fc.bias.detach(), (b - LR * gb).detach())


def test_registered_and_built_by_mmengine() -> None:
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import OPTIM_WRAPPERS as SEG_OPTIM_WRAPPERS

    model = TinyModel()
    wrapper = build_optim_wrapper(model, dict(type='GRPOOptimWrapper', inner_steps=2,
                                              optimizer=dict(type='SGD', lr=0.1)))
    assert isinstance(wrapper, GRPOOptimWrapper) and wrapper.inner_steps == 2
    assert SEG_OPTIM_WRAPPERS.get('GRPOAmpOptimWrapper') is GRPOAmpOptimWrapper


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize('bad', [0, -2, 1.5, True, '2'])
def test_bad_inner_steps(bad) -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f'inner_steps={bad!r}'):
        GRPOOptimWrapper(optimizer=opt, inner_steps=bad)


def test_inner_steps_need_a_grpo_head() -> None:
    model = PlainModel()
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               inner_steps=2)
    with pytest.raises(RuntimeError, match='no GRPO-RM head.*inner_steps=1 only'):
        train_iter(wrapper, model, *batch(50))
    ok = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    train_iter(ok, model, *batch(50))  # inner_steps=1 works with any head
    assert ok.outer_steps == 1


def test_inner_steps_need_the_optim_context() -> None:
    model = TinyModel()
    wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1),
                               inner_steps=2)
    losses = model(*batch(60))
    with pytest.raises(RuntimeError, match='optim_context'):
        wrapper.update_params(losses['loss_grpo'])


# ---------------------------------------------------------------------- mixin
class SumHead(GRPOPolicyHeadMixin, nn.Module):
    def _grpo_inner_loss(self, item):
        return {'loss_x': item['v'] * 2, 'metric': item['v']}


def test_mixin_caches_only_when_enabled_and_averages() -> None:
    head = SumHead()
    v = torch.tensor(3.0, requires_grad=True)
    head.grpo_cache_append({'v': v})
    assert not head.grpo_has_cache()
    head.grpo_cache_enabled = True
    head.grpo_cache_append({'v': v * 1})
    head.grpo_cache_append({'v': torch.tensor(5.0)})
    assert head.grpo_cache_size() == 2
    assert not head._grpo_cache()[0]['v'].requires_grad  # detached
    out = head.grpo_inner_losses()
    assert out['loss_x'].item() == 8.0 and out['metric'].item() == 4.0
    head.grpo_cache_clear()
    assert not head.grpo_has_cache() and head.grpo_inner_losses() == {}


def test_mixin_requires_the_head_to_implement_the_inner_loss() -> None:
    class Bare(GRPOPolicyHeadMixin, nn.Module):
        pass

    head = Bare()
    head.grpo_cache_enabled = True
    head.grpo_cache_append({'v': torch.zeros(1)})
    with pytest.raises(NotImplementedError, match='Bare must implement'):
        head.grpo_inner_losses()


def test_make_reference_is_frozen_eval_and_saved() -> None:
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5), nn.Linear(3, 2))
            self.ref_mlp = make_reference(self.mlp)

    head = Head().train()
    ref = head.ref_mlp
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in head.mlp.parameters())
    x = torch.ones(4, 2)
    torch.testing.assert_close(ref(x), ref(x))  # dropout off although head.train() ran
    assert not ref.training
    assert any(k.startswith('ref_mlp.') for k in head.state_dict())
    with torch.no_grad():
        head.mlp[0].weight.add_(1.0)
    assert not torch.equal(head.mlp[0].weight, ref[0].weight)  # an independent copy
    pickle.loads(pickle.dumps(ref))  # the pre-hook is a module-level function
    assert GRPOPolicyHeadMixin.make_reference is make_reference


# ---------------------------------------------------------------------- distributed
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    try:
        model = TinyModel(7)
        ddp = nn.parallel.DistributedDataParallel(model)
        wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(model.head.parameters(), lr=LR),
                                   inner_steps=3)
        for i in range(2):
            train_iter(wrapper, ddp, *batch(100 + 10 * i + rank))
        torch.save(dict(w=model.head.fc.weight.detach(), b=model.head.fc.bias.detach(),
                        calls=model.backbone.calls), f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo_inner_steps_stay_in_sync(tmp_path) -> None:
    run_gloo_workers(_ddp_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    assert r0['calls'] == r1['calls'] == 2
    torch.testing.assert_close(r0['w'], r1['w'], rtol=0, atol=0)
    # same result as one process on both ranks' batches (equal sizes: mean of the means)
    model = TinyModel(7)
    for i in range(2):
        w, b = manual_grpo(model, [batch(100 + 10 * i), batch(101 + 10 * i)], 3)
        with torch.no_grad():
            model.head.fc.weight.copy_(w)
            model.head.fc.bias.copy_(b)
    torch.testing.assert_close(r0['w'], model.head.fc.weight.detach())
    torch.testing.assert_close(r0['b'], model.head.fc.bias.detach())
