"""GRPORMClsHead and GRPORMClassifier: MLP head, frozen / partly frozen backbone,
representations, GRPO-RM loss wiring (pi_old, pi_ref, inner-step cache)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import grpo_rm_mm  # noqa: F401  (registers the model components)

TINY_VIT = dict(type='VisionTransformer', img_size=32, patch_size=8, out_type='cls_token',
                arch=dict(embed_dims=24, num_layers=2, num_heads=2, feedforward_channels=48))
CE = dict(type='CrossEntropyLoss', loss_weight=1.0)


def build(cfg: dict):
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        module = MODELS.build(copy.deepcopy(cfg))
    module.init_weights()
    return module


def classifier(loss: dict | None = None, **kwargs):
    head = dict(type='GRPORMClsHead', num_classes=5, in_channels=24, hidden_channels=16)
    if loss is not None:
        head['loss'] = loss
    torch.manual_seed(0)
    return build(dict(type='GRPORMClassifier', backbone=TINY_VIT, head=head, **kwargs))


def batch(n: int = 6, num_classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.arange(n) % num_classes
    return images, [DataSample().set_gt_label(int(y)) for y in labels], labels


class TestHead:

    def test_mlp_forward_pre_logits_and_predict(self) -> None:
        torch.manual_seed(0)
        head = build(dict(type='GRPORMClsHead', num_classes=4, in_channels=8,
                          hidden_channels=6, loss=CE))
        x = torch.randn(3, 8)
        fc1, fc2 = head.mlp.fc1, head.mlp.fc2
        assert (fc1.in_features, fc1.out_features, fc2.out_features) == (8, 6, 4)
        hidden = torch.relu(x @ fc1.weight.T + fc1.bias)
        torch.testing.assert_close(head.pre_logits((x, )), hidden)
        logits = hidden @ fc2.weight.T + fc2.bias
        torch.testing.assert_close(head((x, )), logits)
        preds = head.predict((x, ))
        for pred, row in zip(preds, logits):
            torch.testing.assert_close(pred.pred_score, row.softmax(0))
            assert int(pred.pred_label) == int(row.argmax())

    def test_default_hidden_width_is_256(self) -> None:
        head = build(dict(type='GRPORMClsHead', num_classes=3, in_channels=8, loss=CE))
        assert head.mlp.fc1.out_features == 256

    @pytest.mark.parametrize('kwargs,match', [
        (dict(num_classes=1), 'num_classes=1'),
        (dict(hidden_channels=0), 'hidden_channels=0'),
        (dict(in_channels=-3), 'in_channels=-3'),
        (dict(dropout=1.0), 'dropout=1.0'),
    ])
    def test_bad_arguments(self, kwargs, match) -> None:
        cfg = dict(type='GRPORMClsHead', num_classes=3, in_channels=8, loss=CE)
        cfg.update(kwargs)
        with pytest.raises(ValueError, match=match):
            build(cfg)

    def test_feature_maps_and_wrong_width_are_explained(self) -> None:
        head = build(dict(type='GRPORMClsHead', num_classes=3, in_channels=8, loss=CE))
        with pytest.raises(ValueError, match='GlobalAveragePooling'):
            head((torch.randn(2, 8, 4, 4), ))
        with pytest.raises(ValueError, match='in_channels=8'):
            head((torch.randn(2, 9), ))

    def test_label_outside_num_classes(self) -> None:
        head = build(dict(type='GRPORMClsHead', num_classes=3, in_channels=8, loss=CE))
        samples = [DataSample().set_gt_label(y) for y in (0, 7)]
        with pytest.raises(ValueError, match='num_classes=3'):
            head.loss((torch.randn(2, 8), ), samples)

    def test_cross_entropy_baseline_is_plain_ce(self) -> None:
        torch.manual_seed(0)
        head = build(dict(type='GRPORMClsHead', num_classes=4, in_channels=8, loss=CE))
        x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
        losses = head.loss((x, ), [DataSample().set_gt_label(int(t)) for t in y])
        torch.testing.assert_close(losses['loss'], F.cross_entropy(head((x, )), y))


class TestClassifier:

    def test_frozen_backbone(self) -> None:
        model = classifier(loss=CE)
        assert not any(p.requires_grad for p in model.backbone.parameters())
        model.train()
        assert model.head.training and not model.backbone.training
        images, samples, _ = batch()
        losses = model(images, samples, mode='loss')
        losses['loss'].backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in model.head.parameters())

    def test_partial_unfreezing(self) -> None:
        model = classifier(loss=CE, trainable_backbone=('layers.1.', 'ln1.'))
        trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(('layers.1.', 'ln1.')) for n in trainable)
        assert any(n.startswith('layers.1.') for n in trainable)
        model.train()
        assert model.backbone.training  # partly trainable: normal train mode
        images, samples, _ = batch()
        model(images, samples, mode='loss')['loss'].backward()
        for name, p in model.backbone.named_parameters():
            assert (p.grad is not None) == (name in trainable), name

    def test_unfrozen_and_typo(self) -> None:
        model = classifier(loss=CE, freeze_backbone=False)
        assert all(p.requires_grad for p in model.backbone.parameters())
        with pytest.raises(ValueError, match="'layer.1.'"):
            classifier(loss=CE, trainable_backbone=('layer.1.', ))

    def test_representations(self) -> None:
        model = classifier(loss=CE).eval()
        images, samples, _ = batch()
        with torch.no_grad():
            backbone = model.backbone(images)[-1]  # ViT class token, (N, 24)
            hidden = torch.relu(model.head.mlp.fc1(backbone))
            torch.testing.assert_close(model.extract_representation(images, 'backbone'),
                                       backbone)
            torch.testing.assert_close(model.extract_representation(images), hidden)
            torch.testing.assert_close(model.extract_feat(images, stage='pre_logits'), hidden)
            preds = model(images, samples, mode='predict')
        for i, pred in enumerate(preds):
            torch.testing.assert_close(pred.rep_backbone, backbone[i])
            torch.testing.assert_close(pred.rep_pre_logits, hidden[i])
            assert int(pred.gt_label) == int(samples[i].gt_label)
        only_hidden = classifier(loss=CE, representations=('pre_logits', )).eval()
        with torch.no_grad():
            pred = only_hidden(images, batch()[1], mode='predict')[0]
        assert 'rep_pre_logits' in pred and 'rep_backbone' not in pred
        with pytest.raises(ValueError, match="'logits'"):
            classifier(loss=CE, representations=('logits', ))

    def test_resnet_with_pooling_neck(self) -> None:
        torch.manual_seed(0)
        model = build(dict(
            type='GRPORMClassifier',
            backbone=dict(type='ResNet_CIFAR', depth=18, stem_channels=8, base_channels=8,
                          num_stages=4, out_indices=(3, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='GRPORMClsHead', num_classes=3, in_channels=64, loss=CE)))
        model.train()
        assert not model.backbone.training  # BN statistics stay as pretrained
        images, samples, _ = batch(4, 3)
        with torch.no_grad():
            rep = model.extract_representation(images, 'backbone')
        assert rep.shape == (4, 64)


def loss_module(**kwargs):
    """GRPORMLoss built on its own, to recompute what the head should have computed."""
    return MODELS.build(dict(type='GRPORMLoss', log_diagnostics=False, **kwargs))


def method_advantages(logits: torch.Tensor, labels: torch.Tensor,
                      weighting: str = 'uniform') -> tuple[torch.Tensor, torch.Tensor]:
    """(w, A) of method.md sections 2-3 with the default rewards, written out: r = 1[i == y]
    - (p_i / (1 - p_y) - 1 / (C - 1)) on wrong classes, p = softmax(old logits); group weights
    w = 1/C ('uniform') or p ('pi_old'); A = (r - mean_w r) / (population std_w r + 1e-6)."""
    p = logits.double().softmax(1)
    n, c = p.shape
    onehot = F.one_hot(labels, c).double()
    p_y = (p * onehot).sum(1, keepdim=True)
    uniformity = -(p / (1 - p_y) - 1 / (c - 1)) * (1 - onehot)
    r = onehot + uniformity
    w = torch.full_like(p, 1 / c) if weighting == 'uniform' else p
    mean = (w * r).sum(1, keepdim=True)
    std = (w * (r - mean) ** 2).sum(1, keepdim=True).sqrt()
    return w, (r - mean) / (std + 1e-6)


class TestGRPOHead:

    def head(self, **loss):
        torch.manual_seed(0)
        return build(dict(type='GRPORMClsHead', num_classes=5, in_channels=8, hidden_channels=6,
                          loss=dict(type='GRPORMLoss', **loss)))

    def inputs(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(7, 8, generator=g)
        y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
        return x, y, [DataSample().set_gt_label(int(t)) for t in y]

    @pytest.mark.parametrize('weighting', ['uniform', 'pi_old'])
    def test_first_step_gradient_is_minus_weighted_advantage(self, weighting: str) -> None:
        head = self.head(group_weighting=weighting)
        x, y, samples = self.inputs()
        logits = head((x, )).detach()
        losses = head.loss((x, ), samples)
        assert set(losses) >= {'loss_grpo', 'grpo_reward', 'grpo_adv_abs', 'grpo_clip_frac',
                               'grpo_kl', 'grpo_entropy', 'grpo_acc'}
        assert [k for k in losses if 'loss' in k] == ['loss_grpo']  # diagnostics: logged only
        losses['loss_grpo'].backward()
        # d loss / d logits = -w A per query (-A / C for uniform weights), mean over the N
        # queries; the output bias collects it summed over queries
        w, adv = method_advantages(logits, y, weighting)
        expected = -(w * adv).sum(0) / len(y)
        torch.testing.assert_close(head.mlp.fc2.bias.grad.double(), expected,
                                   atol=1e-6, rtol=1e-4)
        assert float(losses['grpo_clip_frac']) == 0.0  # ratio 1 on the first step

    def test_inner_step_reuses_pi_old_from_the_cache(self) -> None:
        head = self.head(clip_eps=0.05)
        x, y, samples = self.inputs()
        head.grpo_cache_enabled = True
        first = head.loss((x, ), samples)['loss_grpo']
        assert head.grpo_cache_size() == 1
        old = head((x, )).detach()
        with torch.no_grad():  # an optimizer update of the head
            for p in head.mlp.parameters():
                p.add_(0.3 * torch.randn_like(p))
        inner = head.grpo_inner_losses()
        independent = loss_module(clip_eps=0.05)
        torch.testing.assert_close(inner['loss_grpo'],
                                   independent(head((x, )), y, old_logits=old))
        assert not torch.allclose(inner['loss_grpo'], first)
        assert float(inner['grpo_clip_frac']) > 0  # the ratio left [1 - eps, 1 + eps]
        inner['loss_grpo'].backward()
        assert head.mlp.fc1.weight.grad is not None

    def test_only_the_last_inner_step_computes_diagnostics(self) -> None:
        from grpo_rm_mm.engine.optim_wrappers import GRPOOptimWrapper

        x, y, samples = self.inputs()
        weights, calls = [], []
        for force in (False, True):  # as the wrapper asks / diagnostics on every call
            head = self.head(clip_eps=0.05)
            forward = head.loss_module.forward

            def spy(*args, _forward=forward, _force=force, **kwargs):
                calls.append((_force, kwargs.get('diagnostics', True)))
                if _force:
                    kwargs['diagnostics'] = True
                return _forward(*args, **kwargs)

            head.loss_module.forward = spy
            wrapper = GRPOOptimWrapper(optimizer=torch.optim.SGD(head.parameters(), lr=0.5),
                                       inner_steps=3)
            with wrapper.optim_context(head):
                losses = head.loss((x, ), samples)
            wrapper.update_params(losses['loss_grpo'])
            weights.append([p.detach().clone() for p in head.parameters()])
            assert float(head.loss_module.last_diagnostics['grpo_kl_old']) > 0
            assert head.grpo_inner_diagnostics  # restored after the inner steps
        # the first update, inner step 1 without diagnostics, inner step 2 (the last) with
        assert [asked for forced, asked in calls if not forced] == [True, False, True]
        for a, b in zip(*weights):  # skipping them changes no update
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_no_cache_when_inner_steps_are_off(self) -> None:
        head = self.head()
        x, _, samples = self.inputs()
        head.loss((x, ), samples)
        assert head.grpo_cache_size() == 0

    def test_reference_head_for_beta(self) -> None:
        head = self.head(beta=0.1)
        assert not hasattr(self.head(), 'ref_mlp')  # beta 0: no reference model
        for (name, p), (ref_name, ref) in zip(head.mlp.named_parameters(),
                                              head.ref_mlp.named_parameters()):
            assert name == ref_name and not ref.requires_grad and p.requires_grad
            torch.testing.assert_close(ref, p)  # pi_ref = the starting head
        assert any(k.startswith('ref_mlp.') for k in head.state_dict())  # in checkpoints
        x, y, samples = self.inputs()
        with torch.no_grad():
            for p in head.mlp.parameters():
                p.add_(0.5)
        head.train()
        loss = head.loss((x, ), samples)['loss_grpo']
        assert not head.ref_mlp.training  # pi_ref is evaluated in eval mode
        independent = loss_module(beta=0.1)
        logits = head((x, ))
        torch.testing.assert_close(loss, independent(
            logits, y, old_logits=logits.detach(), ref_logits=head.ref_mlp(x)))

    def test_checkpoint_without_reference_starts_it_at_the_loaded_head(self) -> None:
        ce_trained = self.head()  # e.g. a head trained with beta 0 (or cross-entropy)
        with torch.no_grad():
            for p in ce_trained.parameters():
                p.mul_(3.0)
        head = self.head(beta=0.1)
        head.load_state_dict(ce_trained.state_dict())
        torch.testing.assert_close(head.ref_mlp.fc2.weight, ce_trained.mlp.fc2.weight)
        torch.testing.assert_close(head.mlp.fc2.weight, ce_trained.mlp.fc2.weight)
