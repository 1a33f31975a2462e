"""Training GRPORMClassifier from the frozen-feature cache equals training without it."""
import copy

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import grpo_rm_mm  # noqa: F401


def build(feature_cache) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS.build(dict(
        type='GRPORMClassifier', feature_cache=feature_cache,
        backbone=dict(type='ResNet_CIFAR', depth=18, stem_channels=8, base_channels=8),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='GRPORMClsHead', num_classes=4, in_channels=64, hidden_channels=16)))


def batches(n_batches: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(1)
    out = []
    for b in range(n_batches):
        imgs = (torch.rand(size, 3, 16, 16, generator=g) * 255)
        labels = torch.randint(0, 4, (size, ), generator=g)
        samples = [DataSample(metainfo=dict(sample_idx=b * size + i)).set_gt_label(int(y))
                   for i, y in enumerate(labels)]
        out.append(dict(inputs=imgs, data_samples=samples))
    return out


def train(model, data, epochs: int = 3):
    wrapper = build_optim_wrapper(model, dict(
        type='GRPOOptimWrapper', optimizer=dict(type='Adam', lr=1e-2), inner_steps=2))
    model.train()
    for _ in range(epochs):
        for batch in data:
            model.train_step(copy.deepcopy(batch), wrapper)
    return model.head.state_dict()


@pytest.mark.parametrize('inner_steps_batches', [3])
def test_cache_gives_bit_identical_head_training(inner_steps_batches) -> None:
    data = batches(inner_steps_batches)
    plain = train(build(False), data)
    cached_model = build(True)
    cached = train(cached_model, data)
    for key in plain:
        assert torch.equal(plain[key], cached[key]), key
    cache = cached_model.feature_cache
    # epoch 1 fills the cache (24 distinct images), epochs 2 and 3 are served from it
    assert (cache.misses, cache.hits, len(cache)) == (24, 48, 24)


def test_cache_needs_a_fully_frozen_backbone() -> None:
    with pytest.raises(ValueError, match='fully frozen'):
        MODELS.build(dict(
            type='GRPORMClassifier', feature_cache=True, freeze_backbone=False,
            backbone=dict(type='ResNet_CIFAR', depth=18, stem_channels=8, base_channels=8),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='GRPORMClsHead', num_classes=4, in_channels=64)))
