"""Shared by tests/reliability: generated data, small derived configs, subprocess runs and
checkpoint inspection."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO, tool_env

from grpo_rm_mm.testing import make_cifar10

HERE = Path(__file__).resolve().parent
CLS_TINY = REPO / 'tests' / 'cls' / 'configs' / 'grpo_rm_cifar10_tiny.py'
TRAIN = REPO / 'tools' / 'train.py'
TEST = REPO / 'tools' / 'test.py'


def write_cifar(root: Path) -> dict[str, str]:
    """A 200/100-image CIFAR-10 folder; returns the environment the configs read."""
    make_cifar10(root / 'cifar', n_train=200, n_test=100, seed=0)
    (root / 'ood').mkdir(exist_ok=True)
    return dict(CIFAR_ROOT=str(root / 'cifar'), OOD_ROOT=str(root / 'ood'))


def cls_config(path: Path, *, hooks: str = '', extra: str = '', max_epochs: int = 2) -> Path:
    """A GRPO-RM classification config (tiny ViT, 10 iterations per epoch, head beta=0.1 so the
    reference head exists, GRPOOptimWrapper inner_steps=2, top-1 only, a checkpoint every
    epoch) with NonFiniteLossHook, CheckpointCheckHook and the extra ``hooks`` (source)."""
    path.write_text(
        f"_base_ = [{str(CLS_TINY)!r}]\n"
        "custom_imports = dict(imports=['grpo_rm_mm', 'reliability_hooks'],\n"
        "                      allow_failed_imports=False)\n"
        "model = dict(head=dict(loss=dict(beta=0.1)))\n"
        "optim_wrapper = dict(inner_steps=2)\n"
        "val_evaluator = dict(_delete_=True, type='Accuracy', topk=(1, ))\n"
        "test_evaluator = val_evaluator\n"
        "custom_hooks = [dict(type='NumClassesCheckHook'), dict(type='NonFiniteLossHook'),\n"
        f"                dict(type='CheckpointCheckHook'), {hooks}]\n"
        f"train_cfg = dict(max_epochs={max_epochs}, val_interval={max_epochs})\n"
        "default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=-1))\n" + extra)
    return path


def env_for(data: dict[str, str], **extra: str) -> dict[str, str]:
    """The tools' environment with this folder importable (test-only hooks)."""
    pythonpath = os.pathsep.join([str(REPO), str(HERE)])
    return tool_env(**data, PYTHONPATH=pythonpath, **extra)


def run(tool: Path, *args: object, env: dict[str, str], timeout: int = 300
        ) -> subprocess.CompletedProcess:
    """Run a tool; returns the completed process (stdout + stderr text)."""
    return subprocess.run([sys.executable, str(tool), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def load(ckpt: Path) -> dict:
    """A checkpoint of this project: plain data, read as torch >= 2.6 reads by default."""
    return torch.load(ckpt, map_location='cpu', weights_only=True)


def non_finite_tensors(ckpt: Path) -> list[str]:
    """Names of the tensors of a checkpoint (model and optimizer state) with a NaN/Inf."""
    bad: list[str] = []

    def walk(obj, name: str) -> None:
        if torch.is_tensor(obj):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f'{name}.{k}')
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f'{name}[{i}]')

    ckpt_dict = load(ckpt)
    walk({k: ckpt_dict.get(k) for k in ('state_dict', 'optimizer')}, ckpt.name)
    return bad
