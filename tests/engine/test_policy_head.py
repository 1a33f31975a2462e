"""GRPOPolicyHeadMixin: GRPO-loss detection, pi_ref creation, init sync, missing-reference
filling and the typed batch cache, on a minimal head."""
import torch
from mmengine.model import BaseModule
from torch import nn

import grpo_rm_mm  # noqa: F401
from grpo_rm_mm.models.heads.policy_head import GRPOCachedBatch, GRPOPolicyHeadMixin
from grpo_rm_mm.models.losses import GRPORMLoss


class LookAlikeLoss(nn.Module):
    """Has ``beta`` and ``last_diagnostics`` but is not a GRPO-RM loss."""

    beta = 0.5
    log_diagnostics = True
    last_diagnostics: dict = {}


class Head(GRPOPolicyHeadMixin, BaseModule):
    reference_name = 'ref_fc'

    def __init__(self, losses: list[nn.Module]) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.fc = nn.Linear(3, 4)
        self.setup_policy()

    def grpo_loss_modules(self) -> list[nn.Module]:
        return list(self.losses)

    def policy_layers(self) -> nn.Module:
        return self.fc


class SpyLoss(GRPORMLoss):
    """A subclass is a GRPO-RM loss too."""


def test_grpo_losses_are_detected_by_type_and_stop_logging_themselves() -> None:
    head = Head([GRPORMLoss(beta=0.1), nn.CrossEntropyLoss(), SpyLoss(beta=0.3),
                 LookAlikeLoss()])
    assert [head.is_grpo_loss(m) for m in head.losses] == [True, False, True, False]
    assert not head.losses[0].log_diagnostics and not head.losses[2].log_diagnostics
    assert head.losses[3].log_diagnostics  # not a GRPO-RM loss: left alone
    assert head.beta == 0.3  # the largest beta of the GRPO-RM losses only
    assert isinstance(head.ref_fc, nn.Linear)
    assert all(not p.requires_grad for p in head.ref_fc.parameters())


def test_no_reference_without_a_positive_beta() -> None:
    for losses in ([GRPORMLoss()], [LookAlikeLoss()], [nn.CrossEntropyLoss()]):
        head = Head(losses)
        assert head.beta == 0.0 and not hasattr(head, 'ref_fc')
        assert head.reference_logits(torch.ones(2, 3)) is None
        assert not any(k.startswith('ref_fc.') for k in head.state_dict())


def test_reference_is_synced_after_init_and_filled_from_checkpoints() -> None:
    head = Head([GRPORMLoss(beta=0.1)])
    with torch.no_grad():
        head.fc.weight.add_(1.0)
    head.init_weights()  # pi_ref = the starting policy, after initialisation
    torch.testing.assert_close(head.ref_fc.weight, head.fc.weight, rtol=0, atol=0)
    x = torch.randn(5, 3)
    ref = head.reference_logits(x)
    assert not ref.requires_grad
    torch.testing.assert_close(ref, head.fc(x).detach())

    trained = Head([GRPORMLoss(beta=0.1)])
    with torch.no_grad():
        trained.fc.weight.mul_(3.0)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith('ref_fc.')}
    fresh = Head([GRPORMLoss(beta=0.1)])
    fresh.load_state_dict(state)  # no pi_ref in the checkpoint: it starts at the loaded fc
    torch.testing.assert_close(fresh.ref_fc.weight, trained.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(fresh.ref_fc.bias, trained.fc.bias, rtol=0, atol=0)
    full = trained.state_dict()
    fresh.load_state_dict(full)  # a saved pi_ref is kept as saved
    torch.testing.assert_close(fresh.ref_fc.weight, full['ref_fc.weight'], rtol=0, atol=0)
    assert not torch.equal(fresh.ref_fc.weight, fresh.fc.weight)


def test_cache_batch_is_typed_detached_and_keeps_the_group_seeds() -> None:
    head = Head([GRPORMLoss(), nn.CrossEntropyLoss()])
    head.losses[0].last_group_seed = 7
    feats = torch.randn(2, 3, requires_grad=True)
    logits = head.fc(feats)
    labels = torch.tensor([0, 1])
    head.grpo_cache_batch(feats, labels, logits, None)
    assert head.grpo_cache_size() == 0  # caching is off unless the wrapper enables it
    head.grpo_cache_enabled = True
    head.grpo_cache_batch(feats, labels, logits, None)
    (cached, ) = head._grpo_cache()
    assert isinstance(cached, GRPOCachedBatch)
    assert not cached.feats.requires_grad and not cached.old_logits.requires_grad
    torch.testing.assert_close(cached.old_logits, logits.detach())
    assert cached.ref_logits is None and cached.group_seeds == (7, None)
