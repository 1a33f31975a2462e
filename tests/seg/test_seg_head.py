"""GRPORMSegHead and GRPORMEncoderDecoder in process: structure, the per-pixel GRPO-RM gradient
against method.md's formulas, ignore_index, resizing, pi_ref, inner steps, frozen backbone."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from seg_common import grpo_logit_grad
from torch import nn

import grpo_rm_mm  # noqa: F401  (registers the components)
from grpo_rm_mm.engine.optim_wrappers import GRPOOptimWrapper
from grpo_rm_mm.models.heads.decode_head import GRPORMSegHead, LayerNorm2d

C = 6


@pytest.fixture(autouse=True)
def mmseg_scope() -> None:
    init_default_scope('mmseg')


def build_head(**kwargs) -> GRPORMSegHead:
    cfg = dict(type='GRPORMSegHead', in_channels=8, num_classes=C)
    cfg.update(kwargs)
    head = MODELS.build(cfg)
    head.init_weights()
    return head.train()


def samples(labels: torch.Tensor, names: list[str] | None = None) -> list[SegDataSample]:
    """(N, H, W) label maps -> data samples, as the data preprocessor makes them."""
    out = []
    for i, lab in enumerate(labels):
        s = SegDataSample(metainfo=dict(seg_map_path=(names or [f'mask_{i}.png'] * 99)[i],
                                        img_shape=tuple(lab.shape)))
        s.gt_sem_seg = PixelData(data=lab[None].long())
        out.append(s)
    return out


def random_labels(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n, h, w), generator=g)
    labels[:, 0, :] = 255  # an ignored border row, as VOC's 255 outlines
    labels[:, :, -1] = 255
    return labels


def logits_grad(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                loss_key: str = 'loss_grpo') -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits, d loss / d logits, loss dict) at the output of ``head.conv_seg``."""
    store = {}

    def keep(module, args, out):
        out.retain_grad()
        store['out'] = out

    handle = head.conv_seg.register_forward_hook(keep)
    losses = head.loss([feats], samples(labels), None)
    handle.remove()
    losses[loss_key].backward()
    return store['out'].detach(), store['out'].grad, losses


def as_rows(t: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double().numpy()


class TestStructure:

    def test_mlp_in_hidden_classes_per_position(self) -> None:
        head = build_head()
        assert head.channels == 64  # hidden width of GRPO-RM segmentation
        assert head.hidden.conv.kernel_size == (1, 1) and head.conv_seg.kernel_size == (1, 1)
        assert (head.hidden.conv.in_channels, head.hidden.conv.out_channels) == (8, 64)
        assert (head.conv_seg.in_channels, head.conv_seg.out_channels) == (64, C)
        assert isinstance(head.hidden.norm, LayerNorm2d)
        out = head(tuple([torch.randn(2, 8, 5, 7)]))
        assert out.shape == (2, C, 5, 7)

    def test_positions_are_independent(self) -> None:
        # 1x1 convs + per-position norm: a pixel's logits depend on its own features only
        head = build_head()
        x = torch.randn(1, 8, 4, 4)
        y = x.clone()
        y[..., 0, 0] += 5.0
        a, b = head([x]), head([y])
        assert not torch.allclose(a[..., 0, 0], b[..., 0, 0])
        assert torch.allclose(a[..., 1:, :], b[..., 1:, :], atol=1e-6)

    def test_layer_norm_2d_matches_layer_norm_over_channels(self) -> None:
        ln = LayerNorm2d(8)
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
        x = torch.randn(2, 8, 3, 5)
        ref = nn.functional.layer_norm(x.movedim(1, -1), (8, ), ln.weight, ln.bias).movedim(-1, 1)
        assert torch.allclose(ln(x), ref, atol=1e-6)

    def test_prediction_is_resized_to_the_input(self) -> None:
        head = build_head().eval()
        seg = head.predict([torch.randn(1, 8, 4, 5)], [dict(img_shape=(32, 40))], None)
        assert seg.shape == (1, C, 32, 40)

    @pytest.mark.parametrize('kwargs, match', [
        (dict(num_classes=1), 'num_classes=1'),
        (dict(out_channels=1), 'out_channels=1'),
        (dict(channels=0), 'channels=0'),
    ])
    def test_bad_arguments(self, kwargs: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            build_head(**kwargs)

    def test_wrong_feature_width_is_explained(self) -> None:
        with pytest.raises(ValueError, match='in_channels=8'):
            build_head()([torch.randn(1, 16, 4, 4)])


class TestLoss:

    def test_every_labelled_pixel_is_a_query_with_its_own_group(self) -> None:
        # features at label resolution, so the resize is the identity and the gradient at the
        # logits is the per-pixel GRPO-RM gradient -A/(G n_valid); ignored pixels get none
        head = build_head()
        labels = random_labels(2, 6, 5)
        logits, grad, losses = logits_grad(head, torch.randn(2, 8, 6, 5), labels)
        expected = grpo_logit_grad(as_rows(logits), labels.reshape(-1).numpy())
        np.testing.assert_allclose(as_rows(grad), expected, atol=1e-7, rtol=1e-4)
        ignored = (labels == 255).reshape(-1).numpy()
        assert np.all(as_rows(grad)[ignored] == 0)
        assert set(losses) >= {'loss_grpo', 'acc_seg', 'grpo_reward', 'grpo_adv_abs',
                               'grpo_clip_frac', 'grpo_kl', 'grpo_entropy', 'grpo_acc'}
        assert all('loss' not in k for k in losses if k.startswith('grpo_'))

    def test_logits_are_resized_to_the_label_size(self) -> None:
        head = build_head()
        feats, labels = torch.randn(2, 8, 4, 4), random_labels(2, 16, 16, seed=1)
        store = {}
        handle = head.loss_decode.register_forward_pre_hook(
            lambda m, args, kwargs: store.update(pred=args[0], target=args[1]),
            with_kwargs=True)
        losses = head.loss([feats], samples(labels), None)
        handle.remove()
        assert store['pred'].shape == (2, C, 16, 16) and store['target'].shape == (2, 16, 16)
        up = nn.functional.interpolate(head([feats]), size=(16, 16), mode='bilinear',
                                       align_corners=False)
        valid = labels != 255
        acc = (up.argmax(1)[valid] == labels[valid]).float().mean() * 100
        assert float(losses['acc_seg']) == pytest.approx(float(acc), abs=1e-3)

    def test_label_outside_the_classes_names_the_mask(self) -> None:
        labels = random_labels(2, 6, 6)
        labels[1, 3, 3] = C + 4
        head = build_head()
        with pytest.raises(ValueError, match=rf'\[{C + 4}\].*bad_mask\.png') as err:
            head.loss([torch.randn(2, 8, 6, 6)], samples(labels, ['ok.png', 'bad_mask.png']),
                      None)
        assert 'ok.png' not in str(err.value)

    def test_all_ignored_batch_is_a_zero_loss_with_zero_gradients(self) -> None:
        head = build_head()
        labels = torch.full((1, 6, 6), 255)
        with pytest.warns(UserWarning, match='is ignored'):
            losses = head.loss([torch.randn(1, 8, 6, 6)], samples(labels), None)
        losses['loss_grpo'].backward()
        assert losses['loss_grpo'].item() == 0.0
        assert losses['grpo_ignored_batches'].item() == 1
        grads = [p.grad for p in head.parameters() if p.requires_grad]
        assert grads and all(g is not None and not g.any() for g in grads)

    def test_cross_entropy_baseline_in_the_same_head(self) -> None:
        # avg_non_ignore=True (configs/ce_voc.py): the mean over labelled pixels, as GRPO-RM
        head = build_head(loss_decode=dict(type='CrossEntropyLoss', avg_non_ignore=True))
        labels = random_labels(2, 6, 5)
        logits, grad, losses = logits_grad(head, torch.randn(2, 8, 6, 5), labels, 'loss_ce')
        assert not any(k.startswith('grpo_') for k in losses)
        rows, y = as_rows(logits), labels.reshape(-1).numpy()
        valid = y != 255
        p = np.exp(rows - rows.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        expected = np.zeros_like(rows)
        expected[valid] = (p[valid] - np.eye(C)[y[valid]]) / valid.sum()
        np.testing.assert_allclose(as_rows(grad), expected, atol=1e-7, rtol=1e-4)


class TestReference:

    def test_beta_keeps_a_frozen_starting_copy(self) -> None:
        head = build_head(loss_decode=dict(type='GRPORMLoss', beta=0.5))
        start = copy.deepcopy(head.state_dict())
        assert all(not p.requires_grad for p in head.ref_layers.parameters())
        for name, p in head.ref_layers.named_parameters():
            assert torch.equal(p, start[name]), name
        assert any(k.startswith('ref_layers.') for k in start)  # saved in checkpoints
        opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=0.05)
        feats, labels = torch.randn(2, 8, 6, 6), random_labels(2, 6, 6)
        first = head.loss([feats], samples(labels), None)
        assert float(first['grpo_kl']) == pytest.approx(0.0, abs=1e-7)
        first['loss_grpo'].backward()
        opt.step()
        second = head.loss([feats], samples(labels), None)
        assert float(second['grpo_kl']) > 1e-5
        for name, p in head.ref_layers.named_parameters():
            assert torch.equal(p, start['ref_layers.' + name])

    def test_checkpoint_without_reference_starts_it_at_the_loaded_head(self) -> None:
        trained = build_head()  # beta = 0: no ref_layers
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(1.0)
        head = build_head(loss_decode=dict(type='GRPORMLoss', beta=0.5))
        head.load_state_dict(trained.state_dict())
        for name, p in head.ref_layers.named_parameters():
            assert torch.equal(p, trained.state_dict()[name])


def tiny_segmentor(inner_steps: int = 1, **kwargs) -> nn.Module:
    cfg = dict(
        type='GRPORMEncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[110.0] * 3, std=[60.0] * 3,
                               size=(32, 32), seg_pad_val=255),
        backbone=dict(type='mmpretrain.VisionTransformer',
                      arch=dict(embed_dims=16, num_layers=1, num_heads=2,
                                feedforward_channels=32),
                      img_size=32, patch_size=4, out_type='featmap', with_cls_token=False),
        decode_head=dict(type='GRPORMSegHead', in_channels=16, num_classes=C))
    cfg.update(kwargs)
    model = MODELS.build(cfg)
    model.init_weights()
    return model.train()


def batch(n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
            for _ in range(n)]
    labels = random_labels(n, 32, 32, seed)
    return dict(inputs=imgs, data_samples=samples(labels))


class TestSegmentor:

    def test_backbone_is_frozen_in_eval_mode_and_without_grad(self) -> None:
        model = tiny_segmentor()
        assert not any(p.requires_grad for p in model.backbone.parameters())
        assert not model.backbone.training and model.decode_head.training
        data = model.data_preprocessor(batch(), True)
        feats = model.extract_feat(data['inputs'])
        assert feats[0].shape == (2, 16, 8, 8) and not feats[0].requires_grad

    def test_trainable_backbone_prefixes(self) -> None:
        model = tiny_segmentor(trainable_backbone=('ln1.', ))
        trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
        assert trainable == {'ln1.weight', 'ln1.bias'}
        assert model.backbone.training  # partly trainable: normal train mode

    @pytest.mark.parametrize('inner_steps', [1, 3])
    def test_train_step_with_inner_steps(self, inner_steps: int) -> None:
        torch.manual_seed(0)
        model = tiny_segmentor()
        before = copy.deepcopy(model.state_dict())
        wrapper = GRPOOptimWrapper(torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=1e-2),
            inner_steps=inner_steps)
        log = model.train_step(batch(), wrapper)
        assert 'decode.loss_grpo' in log and 'decode.grpo_reward' in log
        assert (wrapper.outer_steps, wrapper.inner_steps_taken) == (1, inner_steps - 1)
        assert not model.decode_head.grpo_has_cache()  # the wrapper consumed the cache
        after = model.state_dict()
        for name in before:
            changed = not torch.equal(before[name], after[name])
            assert changed == name.startswith('decode_head.'), name

    def test_inner_loss_on_the_cache_repeats_the_first_step(self) -> None:
        head = build_head()
        head.grpo_cache_enabled = True
        feats, labels = torch.randn(2, 8, 4, 4), random_labels(2, 12, 12)
        first = head.loss([feats], samples(labels), None)
        assert head.grpo_cache_size() == 1
        again = head.grpo_inner_losses()  # same parameters: ratio 1 again
        for key in ('loss_grpo', 'acc_seg', 'grpo_reward', 'grpo_adv_abs'):
            assert float(again[key]) == pytest.approx(float(first[key]), abs=1e-6), key
        with torch.no_grad():
            head.conv_seg.weight.add_(0.5 * torch.randn_like(head.conv_seg.weight))
        moved = head.grpo_inner_losses()  # pi_old is the cached one: the ratio moved
        assert float(moved['grpo_kl_old']) > 1e-4
