"""The GRPO-RM CIFAR-10 config end to end through tools/*.py (subprocesses, as users run them)
on generated CIFAR-10 pickles: training, testing with the kNN/SR probes, the inferencer and the
out-of-distribution table."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from cls_e2e_common import CIFAR_CFG, metrics_of, write_cifar_data
from conftest import REPO, run_cmd


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict[str, str]:
    return write_cifar_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory) -> tuple[Path, dict[str, float], str]:
    """The config trained once (4 epochs, 10 iterations each) for the tests of this module."""
    work = tmp_path_factory.mktemp('work')
    out = run_cmd([sys.executable, str(REPO / 'tools' / 'train.py'), str(CIFAR_CFG),
                   '--work-dir', str(work)], **data).stdout
    return work, metrics_of(out), out


def test_grpo_rm_training_lifts_accuracy_far_above_chance(trained) -> None:
    work, val, log = trained
    assert 'loss_grpo' in log and 'grpo_reward' in log  # the GRPO-RM loss and its diagnostics
    assert (work / 'epoch_4.pth').is_file()
    first = metrics_of(log.split('Epoch(val) [4]')[0])  # validation after epoch 2
    assert val['accuracy/top1'] >= 70.0 and first['accuracy/top1'] < val['accuracy/top1']
    # the head's hidden layer separates the classes: the probes find it too
    assert val['knn_pre_logits/top1'] >= 70.0 and val['sr_pre_logits/top1'] >= 70.0
    assert (val['knn_pre_logits/num_train'], val['knn_pre_logits/num_test']) == (200, 100)


def test_test_tool_probes_and_knn_k1_on_the_train_set(run_tool, data, trained,
                                                       tmp_path) -> None:
    """tools/test.py on the *train* split with k=1: each sample is its own nearest neighbour,
    so kNN is exactly 100% (backbone and hidden representation); SR, the backbone probes and
    the dumped predictions come along."""
    work, _, _ = trained
    out = run_tool('test.py', CIFAR_CFG, work / 'epoch_4.pth', '--work-dir', tmp_path,
                   '--out', tmp_path / 'pred.pkl', '--cfg-options',
                   'test_dataloader.dataset.split=train', 'test_evaluator.1.k=1',
                   'test_evaluator.3.k=1', **data).stdout
    test = metrics_of(out, 'Epoch(test)')
    assert test['knn_pre_logits/top1'] == 100.0 and test['knn_backbone/top1'] == 100.0
    assert test['knn_pre_logits/num_test'] == 200 and test['sr_backbone/num_train'] == 200
    assert 0.0 <= test['sr_pre_logits/top1'] <= 100.0
    with open(tmp_path / 'pred.pkl', 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 200 and preds[0]['rep_pre_logits'].shape == (64, )
    assert preds[0]['rep_backbone'].shape == (32, )
    acc = np.mean([int(p['pred_label']) == int(p['gt_label']) for p in preds]) * 100
    assert acc == pytest.approx(test['accuracy/top1'])


def test_inferencer_works_unchanged(data, trained, monkeypatch) -> None:
    """README, "Inference with the stock APIs": mmpretrain's ``get_model`` and
    ``ImageClassificationInferencer`` on the ``tools/train.py`` checkpoint, with no trust
    wrapper (the file is plain data: torch >= 2.6 reads it with weights_only=True)."""
    import torch
    from mmengine.registry import DefaultScope
    from mmpretrain import ImageClassificationInferencer, get_model

    work, val, _ = trained
    for key, value in data.items():  # the config reads $CIFAR_ROOT
        monkeypatch.setenv(key, value)
    checkpoint = str(work / 'epoch_4.pth')
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']
    model = get_model(str(CIFAR_CFG), pretrained=checkpoint, device='cpu')
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)
    # mmpretrain's inferencer builds its pipeline in the process-wide default scope, which an
    # earlier test in this process may have set to mmseg (mmseg.apis.init_model does)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        inferencer = ImageClassificationInferencer(str(CIFAR_CFG), pretrained=checkpoint,
                                                   device='cpu')
    with open(Path(data['CIFAR_ROOT']) / 'cifar-10-batches-py' / 'test_batch', 'rb') as f:
        test = pickle.load(f, encoding='latin1')
    images = list(test['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    results = inferencer(images, batch_size=50)
    acc = np.mean([r['pred_label'] == y for r, y in zip(results, test['labels'])]) * 100
    assert acc == pytest.approx(val['accuracy/top1'])
    assert results[0]['pred_class'] in ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                                        'frog', 'horse', 'ship', 'truck')


def test_ood_table_with_gains_over_a_baseline(run_tool, data, trained, tmp_path) -> None:
    work, val, _ = trained
    baseline = {'in-distribution': {'accuracy/top1': 50.0}, 'shifted': {'accuracy/top1': 40.0},
                'noisy': {'accuracy/top1': 30.0}, 'OOD average': {'accuracy/top1': 35.0}}
    (tmp_path / 'ce.json').write_text(json.dumps(baseline))
    out = run_tool('test_ood.py', CIFAR_CFG, work / 'epoch_4.pth', '--work-dir', tmp_path,
                   '--baseline', tmp_path / 'ce.json', '--out', tmp_path / 'grpo.json',
                   **data).stdout
    res = json.loads((tmp_path / 'grpo.json').read_text())
    assert list(res) == ['in-distribution', 'shifted', 'noisy', 'OOD average']
    assert res['in-distribution']['accuracy/top1'] == pytest.approx(val['accuracy/top1'])
    assert res['OOD average']['accuracy/top1'] == pytest.approx(
        (res['shifted']['accuracy/top1'] + res['noisy']['accuracy/top1']) / 2)
    # the two shifted sets are different test sets: not the in-distribution numbers
    assert res['shifted']['accuracy/top1'] != res['noisy']['accuracy/top1']
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in out.splitlines() if line.startswith('| ')}
    assert rows['set'] == ['accuracy/top1', 'accuracy/top1 (baseline)', 'accuracy/top1 gain']
    for name, metrics in res.items():
        value, base, gain = (float(c) for c in rows[name])
        assert value == pytest.approx(metrics['accuracy/top1'], abs=0.005)
        assert base == baseline[name]['accuracy/top1']
        assert gain == pytest.approx(metrics['accuracy/top1'] - base, abs=0.005)
