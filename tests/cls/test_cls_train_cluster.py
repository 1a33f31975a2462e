"""Multi-node and SLURM launches give the weights of one node with 2 processes.

- two "nodes" on localhost: two ``tools/dist_train.sh`` launches with ``NNODES=2``,
  ``NODE_RANK=0/1``, one process each and the same ``PORT``;
- ``tools/slurm_train.sh`` / ``tools/slurm_test.sh`` with a stub ``srun`` on ``PATH`` that
  records its arguments and starts the tasks as SLURM does (``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NODELIST``), and a stub ``scontrol`` for the master's host name;
  mmengine's slurm launcher (``--launcher slurm``) does the rest.
All are compared with ``bash tools/dist_train.sh CONFIG 2`` (same total batch, gloo on CPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cls_e2e_common import CIFAR_CFG, metrics_of, write_cifar_data
from conftest import REPO, free_port, tool_env

OPTS = ['--cfg-options', 'train_cfg.max_epochs=2', 'train_cfg.val_interval=2',
        'train_dataloader.batch_size=10']

SRUN_STUB = '''\
#!{python}
"""Stub srun: record the arguments, then start --ntasks copies of the command as SLURM
tasks on this machine (--kill-on-bad-exit: stop the others when one fails)."""
import json, os, subprocess, sys, time
args = sys.argv[1:]
with open(os.environ['SRUN_RECORD'], 'a') as f:
    f.write(json.dumps(args) + '\\n')
opts, i = {{}}, 0
while i < len(args) and args[i].startswith('-'):
    if args[i] in ('-p', '-J', '-n', '-N'):
        opts[args[i]] = args[i + 1]
        i += 2
    else:
        key, _, value = args[i].partition('=')
        opts[key] = value
        i += 1
ntasks = int(opts.get('--ntasks', 1))
procs = []
for rank in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_NTASKS=str(ntasks), SLURM_NODELIST='stubnode[01]',
               SLURM_JOB_NAME=opts.get('--job-name', ''))
    env.pop('MASTER_ADDR', None)  # SLURM does not set it: mmengine asks scontrol
    procs.append(subprocess.Popen(args[i:], env=env))
while any(p.poll() is None for p in procs):
    if opts.get('--kill-on-bad-exit') == '1' and any(p.poll() for p in procs):
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.2)
sys.exit(max(abs(p.returncode) for p in procs))
'''
SCONTROL_STUB = '''\
#!/usr/bin/env bash
# stub scontrol: `scontrol show hostname NODELIST` -> this machine (the one "node")
echo "$*" >> "$SCONTROL_RECORD"
[ "$1 $2" = "show hostname" ] && echo localhost
'''


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict[str, str]:
    return write_cifar_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory) -> tuple[Path, str]:
    """``dist_train.sh CONFIG 2``: (work dir, output)."""
    work = tmp_path_factory.mktemp('one_node')
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'dist_train.sh'), str(CIFAR_CFG), '2',
                           '--work-dir', str(work), *OPTS], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=tool_env(**data, PORT=str(free_port())))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return work, out


def head_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    head = {k: v for k, v in state.items() if k.startswith('head.')}
    assert head
    return head


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = head_weights(a), head_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=name)


def test_two_nodes_match_one_node_with_two_processes(data, reference, tmp_path: Path) -> None:
    port = str(free_port())
    work = tmp_path / 'two_nodes'  # one work dir, as on a shared file system
    nodes = [subprocess.Popen(
        ['bash', str(REPO / 'tools' / 'dist_train.sh'), str(CIFAR_CFG), '1', '--work-dir',
         str(work), *OPTS], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=tool_env(**data, NNODES='2', NODE_RANK=str(rank), PORT=port,
                                MASTER_ADDR='127.0.0.1')) for rank in (0, 1)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out[-6000:]
    assert 'Distributed training: True' in outs[0]
    assert 'Epoch(train) [1][10/10]' in outs[0]  # 100 images per rank, 10 per batch
    ref_work, ref_out = reference
    assert metrics_of(outs[0]) == pytest.approx(metrics_of(ref_out), abs=1e-6)
    assert_same_weights(ref_work / 'epoch_2.pth', work / 'epoch_2.pth')


def stub_bin(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with the stub srun and scontrol, and the environment that puts it on PATH."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(SRUN_STUB.format(python=sys.executable))
    (bin_dir / 'scontrol').write_text(SCONTROL_STUB)
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = dict(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
               SRUN_RECORD=str(tmp_path / 'srun.jsonl'),
               SCONTROL_RECORD=str(tmp_path / 'scontrol.txt'),
               MASTER_PORT=str(free_port()), CPUS_PER_TASK='1',
               SRUN_ARGS='--exclusive --comment=grpo-rm')
    return bin_dir, env


def recorded(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_slurm_train_and_test_scripts(data, reference, tmp_path: Path) -> None:
    _, stub_env = stub_bin(tmp_path)
    work = tmp_path / 'slurm'
    train = subprocess.run(
        ['bash', str(REPO / 'tools' / 'slurm_train.sh'), 'gpu-part', 'grpo-job', str(CIFAR_CFG),
         str(work), *OPTS], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=tool_env(**data, **stub_env, GPUS='2', GPUS_PER_NODE='2'))
    out = train.stdout + train.stderr
    assert train.returncode == 0, out[-6000:]
    (args, ) = recorded(tmp_path / 'srun.jsonl')
    python = args.index(sys.executable)
    assert args[:python] == ['-p', 'gpu-part', '--job-name=grpo-job', '--gres=gpu:2',
                             '--ntasks=2', '--ntasks-per-node=2', '--cpus-per-task=1',
                             '--kill-on-bad-exit=1', '--exclusive', '--comment=grpo-rm']
    assert args[python:] == [sys.executable, '-u', str(REPO / 'tools' / 'train.py'),
                             str(CIFAR_CFG), f'--work-dir={work}', '--launcher=slurm', *OPTS]
    # mmengine's slurm launcher asked scontrol for the master node of the stub's node list
    assert 'show hostname stubnode[01]' in (tmp_path / 'scontrol.txt').read_text()
    assert 'Distributed training: True' in out
    ref_work, ref_out = reference
    val = metrics_of(out)
    assert val == pytest.approx(metrics_of(ref_out), abs=1e-6)
    assert_same_weights(ref_work / 'epoch_2.pth', work / 'epoch_2.pth')

    (tmp_path / 'srun.jsonl').unlink()
    test = subprocess.run(
        ['bash', str(REPO / 'tools' / 'slurm_test.sh'), 'cpu-part', 'grpo-test', str(CIFAR_CFG),
         str(work / 'epoch_2.pth'), '--work-dir', str(tmp_path / 'slurm_test')], cwd=REPO,
        capture_output=True, text=True, timeout=600, env=tool_env(**data, **stub_env,
                                                                  GPUS='1'))
    out = test.stdout + test.stderr
    assert test.returncode == 0, out[-6000:]
    (args, ) = recorded(tmp_path / 'srun.jsonl')
    assert args[:8] == ['-p', 'cpu-part', '--job-name=grpo-test', '--gres=gpu:1', '--ntasks=1',
                        '--ntasks-per-node=1', '--cpus-per-task=1', '--kill-on-bad-exit=1']
    assert args[-4:] == [str(work / 'epoch_2.pth'), '--launcher=slurm', '--work-dir',
                         str(tmp_path / 'slurm_test')]
    # the test metrics of the trained checkpoint are the validation metrics of the run
    tested = metrics_of(out, prefix='Epoch(test)')
    assert tested['accuracy/top1'] == pytest.approx(val['accuracy/top1'], abs=1e-6)


def test_slurm_scripts_print_usage_without_arguments() -> None:
    for script in ('slurm_train.sh', 'slurm_test.sh'):
        proc = subprocess.run(['bash', str(REPO / 'tools' / script), 'part', 'job'],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and 'usage:' in proc.stderr, script
        assert proc.stderr.count('PARTITION JOB_NAME CONFIG') == 1
