"""Checkpoints are plain data: ``torch.load(path, weights_only=True)`` reads every checkpoint
``tools/train.py`` writes, and the conversion round-trips exactly; a legacy mmengine
checkpoint (pickled ``HistoryBuffer``) is refused by the tools with an error naming the
explicit opt-in, and loads with ``--cfg-options trusted_checkpoints=True``."""
from __future__ import annotations

import enum
import warnings
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from reliability_common import TEST, TRAIN, cls_config, env_for, output, run, write_cifar

from grpo_rm_mm.checkpoints import PLAIN_TAG, from_plain, to_plain


class Colour(enum.IntEnum):
    RED = 3


Pair = namedtuple('Pair', 'a b')


def test_plain_round_trip_is_exact_and_weights_only_loadable(tmp_path: Path) -> None:
    buf = HistoryBuffer([0.5, 1.5, 2.5], [1, 2, 1], max_length=7)
    original = {
        'message_hub': {'log_scalars': OrderedDict(loss=buf)},
        'meta': {'seed': np.int64(3), 'best_score': np.float64(0.25), 'flag': np.bool_(True),
                 'name': np.str_('x'), 'colour': Colour.RED, 'pair': Pair(1, 2.0)},
        'arrays': [np.arange(6, dtype=np.int32).reshape(2, 3), np.array(['a', 'bc'])],
        'state_dict': {'w': torch.ones(2)},
    }
    plain = to_plain(original)
    assert plain['message_hub']['log_scalars']['loss'][PLAIN_TAG] == 'HistoryBuffer'
    assert type(plain['meta']['best_score']) is float and type(plain['meta']['seed']) is int
    assert type(plain['meta']['colour']) is int and type(plain['meta']['pair']) is tuple
    path = tmp_path / 'plain.pth'
    torch.save(plain, path)
    back = from_plain(torch.load(path, weights_only=True))

    restored = back['message_hub']['log_scalars']['loss']
    assert isinstance(restored, HistoryBuffer) and restored.max_length == 7
    np.testing.assert_array_equal(restored.data[0], buf.data[0])
    np.testing.assert_array_equal(restored.data[1], buf.data[1])
    assert restored.data[0].dtype == buf.data[0].dtype
    assert restored.mean() == buf.mean() and restored.current() == buf.current()
    assert isinstance(back['message_hub']['log_scalars'], OrderedDict)
    assert back['meta'] == {'seed': 3, 'best_score': 0.25, 'flag': True, 'name': 'x',
                            'colour': 3, 'pair': (1, 2.0)}
    for a, b in zip(back['arrays'], original['arrays']):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert torch.equal(back['state_dict']['w'], torch.ones(2))
    # the input is not modified
    assert original['message_hub']['log_scalars']['loss'] is buf


def test_unknown_object_is_named_with_a_warning() -> None:
    class Odd:
        pass

    with pytest.warns(UserWarning, match=r'checkpoint\.meta\.odd holds a .*Odd'):
        to_plain({'meta': {'odd': Odd()}})


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tuple[dict[str, str], Path, Path]:
    """A 1-epoch run of the small GRPO-RM classification config: (env, config, checkpoint)."""
    tmp = tmp_path_factory.mktemp('trust')
    data = write_cifar(tmp)
    cfg = cls_config(tmp / 'cfg.py', max_epochs=1)
    env = env_for(data)
    proc = run(TRAIN, cfg, '--work-dir', tmp / 'work', env=env)
    assert proc.returncode == 0, output(proc)[-4000:]
    return env, cfg, tmp / 'work' / 'epoch_1.pth'


def test_train_checkpoint_loads_weights_only(trained) -> None:
    _, _, ckpt = trained
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing needs weights_only=False
        loaded = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer'} <= loaded.keys()
    assert loaded['message_hub']['log_scalars']['train/loss'][PLAIN_TAG] == 'HistoryBuffer'


def test_legacy_checkpoint_needs_the_explicit_opt_in(trained, tmp_path: Path) -> None:
    env, cfg, ckpt = trained
    legacy = tmp_path / 'legacy.pth'  # what mmengine writes on its own: objects pickled
    torch.save(from_plain(torch.load(ckpt, map_location='cpu', weights_only=True)), legacy)
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(legacy, weights_only=True)

    refused = run(TEST, cfg, legacy, '--work-dir', tmp_path / 'refused', env=env)
    log = output(refused)
    assert refused.returncode != 0
    assert 'UntrustedCheckpointError' in log and str(legacy) in log
    assert 'with grpo_rm_mm.trusted_checkpoints():' in log
    assert '--cfg-options trusted_checkpoints=True' in log

    trusted = run(TEST, cfg, legacy, '--work-dir', tmp_path / 'trusted', '--cfg-options',
                  'trusted_checkpoints=True', env=env)
    assert trusted.returncode == 0, output(trusted)[-4000:]
    plain = run(TEST, cfg, ckpt, '--work-dir', tmp_path / 'plain', env=env)
    assert plain.returncode == 0, output(plain)[-4000:]

    def top1(text: str) -> str:
        return text.split('accuracy/top1:')[-1].split()[0]

    assert top1(output(trusted)) == top1(output(plain))
