"""Every config under configs/ builds what it promises on data in the real on-disk formats.

For each config the test writes a tiny data set of the kind the config reads (Pascal VOC 2012
with the SBD aug set, CIFAR-10 pickles, Tiny-ImageNet folders, the demo's Fashion-MNIST / MNIST
IDX files and its Fashion-VOC folder), points the config's ``data_root`` at it, builds every
dataloader the config defines, and the reference set ``RepresentationReferenceHook`` derives,
with the runner's own ``Runner.build_dataloader`` (dataset class, sampler, real pipeline,
collate), and runs one batch through the model's data_preprocessor and
its loss (train) or prediction (val/test), with random weights (no pretrained download).
A second test keeps the list complete: a new config without a data writer here fails it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner

from grpo_rm_mm.evaluation.hooks import reference_dataloader_cfg
from grpo_rm_mm.testing import (
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    make_cifar10,
    make_tiny_imagenet,
    make_voc2012,
    write_idx,
)

CONFIGS = REPO / 'configs'
N_TRAIN, N_VAL, N_AUG = 4, 2, 3


def _voc(root: Path) -> dict:
    voc = make_voc2012(root / 'voc', n_train=N_TRAIN, n_val=N_VAL, size=64, n_aug=N_AUG)
    return dict(data_root=str(voc))


def _cifar(root: Path) -> dict:
    make_cifar10(root / 'cifar10', n_train=20, n_test=10)
    # a folder written here has no official md5 sums: the one option the test changes
    return dict(data_root=str(root / 'cifar10'), verify_md5=False)


def _tiny_imagenet(root: Path) -> dict:
    make_tiny_imagenet(root / 'tin', num_classes=3, n_train=6, n_val=3)
    return dict(data_root=str(root / 'tin'))


def _idx_folder(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for images, labels, n in ((TRAIN_IMAGES, TRAIN_LABELS, n_train),
                              (TEST_IMAGES, TEST_LABELS, n_test)):
        write_idx(folder / images, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / labels, (np.arange(n) % 10).astype(np.uint8))


def _demo(root: Path) -> dict:
    """The layout tools/demo.py prepares under $GRPO_RM_DEMO_DATA (no weights: random init)."""
    _idx_folder(root / 'demo' / 'fashion_mnist', 6, 4, seed=0)
    _idx_folder(root / 'demo' / 'mnist_digits' / 'mnist', 6, 4, seed=1)
    make_voc2012(root / 'demo' / 'fashion_voc', n_train=N_TRAIN, n_val=N_VAL, size=64,
                 num_classes=11)
    return dict(env=dict(GRPO_RM_DEMO_DATA=str(root / 'demo')))


# config (relative to configs/) -> the writer of its data
DATA: dict[str, Callable[[Path], dict]] = {
    'grpo_rm_voc.py': _voc, 'ce_voc.py': _voc,
    'grpo_rm_voc_aug.py': _voc, 'ce_voc_aug.py': _voc,
    'grpo_rm_cifar10.py': _cifar, 'ce_cifar10.py': _cifar,
    'grpo_rm_tiny_imagenet.py': _tiny_imagenet, 'ce_tiny_imagenet.py': _tiny_imagenet,
    'demo/fashion_mnist_grpo_rm.py': _demo, 'demo/fashion_mnist_ce.py': _demo,
    'demo/digits_grpo_rm.py': _demo, 'demo/digits_ce.py': _demo,
    'demo/fashion_voc_grpo_rm.py': _demo, 'demo/fashion_voc_ce.py': _demo,
}
# training-set sizes the configs must read from the written data (the aug configs: train + aug)
TRAIN_SIZES = {'grpo_rm_voc.py': N_TRAIN, 'ce_voc.py': N_TRAIN,
               'grpo_rm_voc_aug.py': N_TRAIN + N_AUG, 'ce_voc_aug.py': N_TRAIN + N_AUG}


def _override(node, values: dict) -> None:
    """Set ``values`` (e.g. data_root) in every dataset dict of a (nested) loader config."""
    if isinstance(node, dict):
        if 'type' in node and 'data_root' in node:
            node.update(values)
        for value in node.values():
            _override(value, values)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _override(value, values)


def _loader_cfg(loader: ConfigDict, batch_size: int) -> ConfigDict:
    loader = loader.copy()
    loader.update(batch_size=batch_size, num_workers=0, persistent_workers=False)
    return loader


def _no_pretrained(model_cfg: ConfigDict) -> None:
    """Random weights: drop every ``init_cfg`` that loads a checkpoint (no download)."""
    for part in model_cfg.values():
        if isinstance(part, dict) and isinstance(part.get('init_cfg'), dict) \
                and part['init_cfg'].get('type') == 'Pretrained':
            part['init_cfg'] = None


@pytest.mark.parametrize('name', sorted(DATA))
def test_config_builds_its_data_and_runs_one_batch(name: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    values = DATA[name](tmp_path)
    for key, value in values.pop('env', {}).items():
        monkeypatch.setenv(key, value)
    cfg = Config.fromfile(str(CONFIGS / name))
    loaders = {key: cfg[key] for key in ('train_dataloader', 'val_dataloader', 'test_dataloader')
               if cfg.get(key) is not None}
    assert {'train_dataloader', 'val_dataloader', 'test_dataloader'} <= loaders.keys()
    if any(h.type == 'RepresentationReferenceHook' for h in cfg.get('custom_hooks', [])):
        # the kNN / SR reference set the hook derives: the training set, test pipeline
        loaders['reference_dataloader'] = ConfigDict(
            reference_dataloader_cfg(cfg.train_dataloader, cfg.test_dataloader))
    for loader in loaders.values():
        _override(loader, values)

    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model_cfg = cfg.model.copy()
        if cfg.get('data_preprocessor') is not None:  # mmpretrain: the runner merges it in
            model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
        _no_pretrained(model_cfg)
        torch.manual_seed(0)
        model = MODELS.build(model_cfg)
        model.init_weights()

        forwarded: list[ConfigDict] = []
        for key, loader_cfg in loaders.items():
            train = key == 'train_dataloader'
            loader = Runner.build_dataloader(_loader_cfg(loader_cfg, 2 if train else 1),
                                             seed=0)
            if name in TRAIN_SIZES and train:
                assert len(loader.dataset) == TRAIN_SIZES[name]
            assert len(loader.dataset) > 0, key
            batch = next(iter(loader))
            assert len(batch['inputs']) == (2 if train else 1), key
            data = model.data_preprocessor(batch, training=train)
            inputs = data['inputs']
            assert inputs.dtype == torch.float32 and torch.isfinite(inputs).all(), key
            if loader_cfg in forwarded:  # e.g. test_dataloader = val_dataloader: once is enough
                continue
            forwarded.append(loader_cfg)
            if train:
                model.train()
                losses = model(**data, mode='loss')
                loss, _ = model.parse_losses(losses)
                assert torch.isfinite(loss), (key, losses)
                loss.backward()
                grads = [p.grad for p in model.parameters() if p.requires_grad]
                assert grads and any(g is not None and bool(g.abs().sum() > 0) for g in grads)
                model.zero_grad()
            else:
                model.eval()
                with torch.no_grad():
                    preds = model(**data, mode='predict')
                assert len(preds) == 1, key


def test_every_config_is_built_by_the_test_above() -> None:
    """A config added under configs/ must get a data writer in DATA; every base file must be
    inherited by a config that is built."""
    configs = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob('*.py')}
    bases = {c for c in configs if c.startswith('_base_/')}
    assert configs - bases == set(DATA), 'add the new config (and its data) to DATA'
    used: set[str] = set()
    for name in DATA:
        text = (CONFIGS / name).read_text()
        used |= {b for b in bases if b.removeprefix('_base_/') in text}
        for base in list(used):
            text_b = (CONFIGS / base).read_text()
            used |= {b for b in bases if b.removeprefix('_base_/') in text_b}
    assert bases <= used, f'base configs no built config inherits: {sorted(bases - used)}'
