"""The plugin in an ordinary mmseg config: adding only ``custom_imports`` and a ``loss_decode``
change makes any mmseg decode head train with the GRPO-RM loss (the README example)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mmseg
import numpy as np
import pytest
import torch
from conftest import REPO, tool_env
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from seg_common import DATA_CLASSES, SEG_CONFIGS, grpo_logit_grad

from grpo_rm_mm.models.losses import GRPORMLoss
from grpo_rm_mm.testing import make_voc2012

README_CFG = SEG_CONFIGS / 'fcn_r50_voc12aug_grpo_rm.py'
STOCK_CFG = (Path(mmseg.__file__).parent / '.mim' / 'configs' / 'fcn' /
             'fcn_r50-d8_4xb4-20k_voc12aug-512x512.py')  # mmseg::fcn/...
TINY_CE = SEG_CONFIGS / 'fcn_voc_tiny.py'
TINY_GRPO = SEG_CONFIGS / 'fcn_voc_tiny_grpo_rm.py'

# mmseg's own tools/train.py in essence: no import of this project anywhere
PLAIN_TRAIN = '''
import sys
from mmengine.config import Config
from mmengine.runner import Runner
cfg = Config.fromfile(sys.argv[1])
cfg.work_dir = sys.argv[2]
Runner.from_cfg(cfg).train()
print('grpo_rm_mm imported by custom_imports:', 'grpo_rm_mm' in sys.modules)
'''


def unscoped(x):
    """Drop the ``_scope_`` keys that ``mmseg::`` inheritance adds."""
    if isinstance(x, dict):
        return {k: unscoped(v) for k, v in x.items() if k != '_scope_'}
    if isinstance(x, (list, tuple)):
        return type(x)(unscoped(v) for v in x)
    return x


def flat_diff(a: dict, b: dict, prefix: str = '') -> set[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = set()
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != 'loss_decode':
            keys |= flat_diff(va, vb, f'{prefix}{key}.')
        elif va != vb:
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize('plugin, ordinary', [(README_CFG, STOCK_CFG), (TINY_GRPO, TINY_CE)],
                         ids=['readme-fcn-r50', 'tiny'])
def test_only_custom_imports_and_loss_decode_change(plugin: Path, ordinary: Path) -> None:
    a = unscoped(Config.fromfile(str(ordinary)).to_dict())
    b = unscoped(Config.fromfile(plugin).to_dict())
    assert flat_diff(a, b) == {'custom_imports', 'model.decode_head.loss_decode'}
    assert 'custom_imports' not in a
    assert b['model']['decode_head']['loss_decode']['type'] == 'GRPORMLoss'


def test_stock_fcn_head_gets_the_grpo_rm_gradient() -> None:
    """The README config builds mmseg's FCNHead with GRPORMLoss; its gradient at the logits is
    the per-pixel GRPO-RM gradient of method.md, 255 pixels excluded."""
    init_default_scope('mmseg')
    cfg = Config.fromfile(README_CFG)
    head = revert_sync_batchnorm(MODELS.build(cfg.model.decode_head))  # SyncBN needs GPUs
    head.train()
    assert type(head).__name__ == 'FCNHead' and isinstance(head.loss_decode, GRPORMLoss)
    assert (head.loss_decode.clip_eps, head.loss_decode.beta) == (0.2, 0.0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 21, (2, 5, 5), generator=g)
    labels[:, 0] = 255
    data_samples = []
    for lab in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None])
        data_samples.append(s)
    store = {}

    def keep(module, args, out):
        out.retain_grad()
        store['out'] = out

    head.conv_seg.register_forward_hook(keep)
    # ResNet-50 stages; the head reads the last one (in_index=3, 2048 channels)
    feats = [torch.randn(2, c, 5, 5, generator=g) for c in (256, 512, 1024, 2048)]
    losses = head.loss(feats, data_samples, cfg.model.train_cfg)
    assert set(losses) == {'loss_grpo', 'acc_seg'}
    losses['loss_grpo'].backward()
    rows = store['out'].detach().permute(0, 2, 3, 1).reshape(-1, 21).double().numpy()
    grad = store['out'].grad.permute(0, 2, 3, 1).reshape(-1, 21).double().numpy()
    np.testing.assert_allclose(grad, grpo_logit_grad(rows, labels.reshape(-1).numpy()),
                               atol=1e-7, rtol=1e-4)


def test_ordinary_config_trains_with_plain_mmengine_runner(tmp_path: Path) -> None:
    voc = make_voc2012(tmp_path / 'voc', n_train=16, n_val=4, size=64,
                       num_classes=DATA_CLASSES)
    proc = subprocess.run([sys.executable, '-c', PLAIN_TRAIN, str(TINY_GRPO),
                           str(tmp_path / 'work')], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600,
                          env=dict(tool_env(VOC_ROOT=str(voc)), PYTHONPATH=str(REPO)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert 'grpo_rm_mm imported by custom_imports: True' in out
    train_lines = [line for line in out.splitlines() if 'Iter(train) [30/30]' in line]
    assert train_lines, out[-3000:]
    # the loss is optimised under its own name, and pushes its diagnostics to the log itself
    for key in ('decode.loss_grpo', 'grpo_reward', 'grpo_adv_abs', 'grpo_entropy', 'grpo_acc'):
        assert f'{key}: ' in train_lines[0], key
    assert 'decode.loss_ce' not in out
    assert 'mIoU' in out and (tmp_path / 'work' / 'iter_30.pth').is_file()
