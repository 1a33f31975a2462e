"""Ablation of the GRPO-RM objective (group weighting x surrogate x rewards x inner steps, and a
search for an out-of-distribution gain) against cross-entropy, with held-out selection, plus a
long-tailed run.

Setup (shared with ``convergence.py``, which imports it from here): the models of
``configs/demo/fashion_mnist_{grpo_rm,ce}.py`` (frozen ImageNet EfficientNet-Lite0, real
Fashion-MNIST at 64 px, ``GRPORMClsHead`` MLP 1280 -> 256 -> 10) with the setting's loss options,
inner steps and learning rate; the frozen backbone's features are computed once, through the
model's ``FeatureCache`` (its own file under the data dir: the entries are computed in batches
of 64 images of a fixed order, whatever other runs cached), and the head is trained on them
with batch 1024, Adam, by the head's ``loss()`` and the config's optimizer wrapper. Splits:

- train: the first ``--train-size`` images of a fixed permutation of the 60k training images;
- val (selection only): the next ``--val-size`` images, and ``--ood-size`` of them under each
  of the five corruptions (imagecorruptions, severity 3, another noise seed);
- test (reported): the 10k test images, and the demo's corrupted test sets (first
  ``--ood-size`` test images under the same corruptions).

Every setting is trained with ``--seeds`` (head initialisation and batch order). Reported per
setting, mean ± std over seeds: head top-1 on val / val-OOD average / test / test-OOD average,
and the kNN (k=20, T=0.07, cosine) and SR (softmax regression) probes on the head's hidden
layer (reference: the first ``--probe-ref`` training images) on test and test-OOD.

Selection rule (printed with the results): among the GRPO-RM settings whose mean val head
top-1 is within ``--tolerance`` (1) point of the CE baseline's, the best mean val-OOD average
head top-1. The CE baseline is the CE setting with the best val head top-1.

Stages (``--stages``, pruned as :func:`settings` says): ``grid`` (group weighting x surrogate x
inner steps, accuracy + uniformity rewards), ``rewards`` (reward sets and the Dr.GRPO advantage
scale for the pi_old weighting), ``search`` (reward weights, inner steps, learning rate; CE gets
the same learning rates), ``longtail`` (LongTailDataset, imbalance ratio 100: CE vs the
selected GRPO-RM setting, the default with the inverse-odds query weights and / or the logit
adjustment, CE and logit-adjusted CE, uniform; val and many/medium/few-shot test accuracy),
``correction`` (the inverse-odds query weights on the balanced data, one and four inner steps)
and ``manyclass`` (100 classes: ordered pairs of Fashion-MNIST classes, features concatenated).
Finished runs of the balanced stages are kept in ``--runs-file`` and reused by the same command.

    .venv/bin/python benchmarks/ablation.py [--stages grid rewards search correction longtail]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common as c
import numpy as np
import torch
from mmengine.config import Config
from tqdm import tqdm

UNI = 'UniformityReward'
#: Reward sets by the names the command lines and tables use.
REWARD_SETS: dict[str, list[dict]] = {
    'acc': [dict(type='AccuracyReward', weight=1.0)],
    'acc+uni': [dict(type='AccuracyReward', weight=1.0), dict(type=UNI, weight=1.0)],
    'acc+conf': [dict(type='AccuracyReward', weight=1.0),
                 dict(type='ConfidencePenaltyReward', weight=1.0)],
}
#: Under the data dir.
FEATURE_FILE = 'features/lite0_64px_benchmarks.pt'
OOD_SEVERITY = 3  # imagecorruptions severity of the corrupted sets


@dataclass(frozen=True)
class Setting:
    """One trained configuration: the loss options are GRPORMLoss keyword arguments."""

    name: str
    stage: str
    method: str = 'grpo'
    rewards: str = 'acc+uni'
    uni_weight: float = 1.0
    loss: tuple[tuple[str, object], ...] = ()
    inner_steps: int = 1
    lr: float = 1e-3

    @property
    def loss_options(self) -> dict:
        return dict(self.loss)

    def reward_cfgs(self) -> list[dict]:
        cfgs = [dict(r) for r in REWARD_SETS[self.rewards]]
        for r in cfgs:
            if r['type'] == UNI:
                r['weight'] = self.uni_weight
        return cfgs

    def describe(self) -> str:
        if self.method == 'ce':
            tau = self.loss_options.get('tau')
            steps = f', {self.inner_steps} steps per batch' if self.inner_steps > 1 else ''
            balanced = self.loss_options.get('class_weighting') == 'balanced'
            return f'CE, lr {self.lr:g}' + (f', logit-adjusted tau {tau:g}' if tau else '') \
                + (', class-balanced weights' if balanced else '') + steps
        opts = dict(group_weighting='uniform', surrogate='clip') | self.loss_options
        extra = ', '.join(f'{k}={v}' for k, v in opts.items()
                          if k not in ('group_weighting', 'surrogate'))
        rewards = self.rewards if self.uni_weight == 1 else \
            f'{self.rewards} (uni {self.uni_weight:g})'
        return (f"{opts['group_weighting']}, {opts['surrogate']}, {rewards}, k={self.inner_steps}"
                f", lr {self.lr:g}" + (f', {extra}' if extra else ''))

    def config(self) -> Config:
        """The demo config of the method with this setting's loss, inner steps and lr. A CE
        setting with loss options is the logit-adjusted CE; CE's inner steps are repeated
        steps on a batch (:func:`train_head`'s ``repeats``), so its wrapper keeps one."""
        if self.method == 'grpo':
            return c.demo_config(c.CONFIGS['grpo'], dict(self.loss_options,
                                                         rewards=self.reward_cfgs()),
                                 self.inner_steps, self.lr)
        loss = dict(type='LogitAdjustedCrossEntropyLoss', **self.loss_options) \
            if self.loss else None
        return c.demo_config(c.CONFIGS['ce'], loss, 1, self.lr)


def grpo(name: str, stage: str, weighting: str, surrogate: str = 'clip', k: int = 1,
         **kw) -> Setting:
    loss = dict(group_weighting=weighting, surrogate=surrogate) | kw.pop('loss', {})
    return Setting(name, stage, loss=tuple(sorted(loss.items())), inner_steps=k, **kw)


CLIP_HIGHER = dict(clip_eps_low=0.2, clip_eps_high=0.28)
#: The inverse-odds query weights (mean-normalised, and raw) and the logit adjustment.
CORRECTED = dict(query_weighting='inverse_odds')
CORRECTED_RAW = dict(query_weighting='inverse_odds', query_weight_norm='none')
ADJUSTED = dict(logit_adjust_tau=1.0)
BALANCED = dict(class_weighting='balanced')
LA_CE = Setting('CE logit-adjusted', 'longtail', method='ce', loss=(('tau', 1.0), ))
CB_CE = Setting('CE class-balanced', 'longtail', method='ce',
                loss=(('class_weighting', 'balanced'), ('tau', 0.0)))


def settings(stages: list[str]) -> list[Setting]:
    """The settings of the stages. Pruned: with one inner step the ratio is 1, where every
    surrogate coincides, so only 'clip' runs there; the surrogate variants run at k=4 for
    pi_old (the candidate default) and the dual clip for 'sampled' (whose ratios are
    unbounded for rarely drawn outputs); rewards and the search vary one option at a time
    around pi_old k=1. The default list is the one the README reports."""
    out = [Setting('CE', 'baseline', method='ce')]
    if 'grid' in stages:
        out += [
            grpo('uniform k=1', 'grid', 'uniform'),
            grpo('uniform clip k=4', 'grid', 'uniform', 'clip', 4),
            grpo('pi_old k=1', 'grid', 'pi_old'),
            grpo('pi_old clip k=4', 'grid', 'pi_old', 'clip', 4),
            grpo('pi_old dual_clip k=4', 'grid', 'pi_old', 'dual_clip', 4),
            grpo('pi_old clip-higher k=4', 'grid', 'pi_old', 'clip', 4, loss=CLIP_HIGHER),
            grpo('sampled k=1', 'grid', 'sampled'),
            grpo('sampled dual_clip k=4', 'grid', 'sampled', 'dual_clip', 4),
        ]
    if 'rewards' in stages:
        out += [
            grpo('pi_old acc k=1', 'rewards', 'pi_old', rewards='acc'),
            grpo('pi_old Dr.GRPO k=1', 'rewards', 'pi_old', loss=dict(adv_scale='none')),
        ]
    if 'search' in stages:
        out += [
            Setting('CE lr 3e-3', 'search', method='ce', lr=3e-3),
            grpo('pi_old k=1 lr 3e-3', 'search', 'pi_old', lr=3e-3),
            grpo('pi_old k=1 uni 2', 'search', 'pi_old', uni_weight=2.0),
        ]
    if 'correction' in stages:
        if 'grid' not in stages:
            out.append(grpo('pi_old k=1', 'grid', 'pi_old'))
        out += [
            grpo('pi_old inverse_odds k=1', 'correction', 'pi_old', loss=CORRECTED),
            grpo('pi_old inverse_odds raw k=1', 'correction', 'pi_old', loss=CORRECTED_RAW),
            grpo('pi_old inverse_odds dual_clip k=4', 'correction', 'pi_old', 'dual_clip', 4,
                 loss=CORRECTED),
        ]
    return out


def mlp() -> str:
    """The demo head's MLP widths, e.g. ``1280->256->10``."""
    head = c.demo_config(c.CONFIGS['ce']).model.head
    return f'{head.in_channels}->{head.hidden_channels}->{head.num_classes}'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_common_args(parser, str(c.RESULTS / 'ablation.txt'))
    parser.add_argument('--stages', nargs='+', default=['grid', 'rewards', 'search', 'longtail'],
                        choices=['grid', 'rewards', 'search', 'correction', 'longtail',
                                 'manyclass'])
    parser.add_argument('--iters', type=int, default=200,
                        help='optimizer iterations (batches) per run (default %(default)s)')
    parser.add_argument('--batch-size', type=int, default=1024)
    parser.add_argument('--train-size', type=int, default=20000)
    parser.add_argument('--val-size', type=int, default=5000)
    parser.add_argument('--ood-size', type=int, default=2000,
                        help='images per corrupted set, val and test (default %(default)s)')
    parser.add_argument('--probe-ref', type=int, default=5000,
                        help='training images that are the kNN / SR reference set')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--tolerance', type=float, default=1.0,
                        help='selection: val head top-1 at most this far below CE')
    parser.add_argument('--only', nargs='*', default=None,
                        help='run only the settings with these names (and CE)')
    parser.add_argument('--runs-file', default=str(c.RESULTS / 'ablation_runs.json'),
                        help='metrics of finished (setting, seed) runs, reused when the same '
                        'command is run again (the runs are deterministic); "" disables')
    parser.add_argument('--lt-batch-size', type=int, default=256)
    parser.add_argument('--lt-iters', type=int, default=200)
    parser.add_argument('--mc-iters', type=int, default=300,
                        help='iterations of the many-class stage (batch --batch-size)')
    return parser.parse_args()


def dataset(cfg: Config, test: bool, root: str | Path | None = None):
    """The config's whole FashionMNIST train or test set, or that of the folder ``root``."""
    from mmpretrain.registry import DATASETS

    loader = cfg.test_dataloader if test else cfg.train_dataloader
    ds_cfg = dict(copy.deepcopy(loader.dataset), indices=None, split='test' if test else 'train')
    return DATASETS.build(ds_cfg if root is None else dict(ds_cfg, data_root=str(root)))


def train_order() -> list[int]:
    """A fixed permutation (seed 0) of the 60k training images; a train subset is its prefix."""
    return torch.randperm(60000, generator=torch.Generator().manual_seed(0)).tolist()


@torch.no_grad()
def features(data_dir: Path, sets: dict[str, tuple[object, Sequence[int]]]
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (feats (n, C), labels (n,))}`` of ``{name: (dataset, indices)}``: the CE demo
    model's data preprocessor and ``extract_feat`` in batches of 64, through its
    ``FeatureCache`` in ``data_dir / FEATURE_FILE`` (only images not seen before run the
    backbone)."""
    from mmengine.dataset import pseudo_collate

    cfg = c.demo_config(c.CONFIGS['ce'])
    cfg.model.feature_cache = dict(file=str(data_dir / FEATURE_FILE))
    model, out = c.build(cfg)[0].eval(), {}
    for name, (ds, indices) in sets.items():
        feats = [model.extract_feat(model.data_preprocessor(pseudo_collate(
            [ds[i] for i in indices[s:s + 64]]), False)['inputs'])[-1]
            for s in tqdm(range(0, len(indices), 64), desc=name, file=sys.stderr, leave=False)]
        labels = torch.tensor([int(ds.get_data_info(i)['gt_label']) for i in indices])
        out[name] = torch.cat(feats).float(), labels.long()
    model.save_feature_cache()
    return out


def assert_same_head(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Both models' heads hold the same weights (a fair start)."""
    sa, sb = a.head.mlp.state_dict(), b.head.mlp.state_dict()
    if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
        raise AssertionError('the two heads do not start from the same weights')


def head_train_step(model: torch.nn.Module, feats: torch.Tensor, samples: list, wrapper) -> dict:
    """``BaseModel.train_step`` from the head on, for precomputed features: the head's ``loss``
    in ``optim_context``, ``parse_losses``, ``update_params`` (with the wrapper's inner steps)."""
    with wrapper.optim_context(model):
        losses = model.head.loss((feats, ), samples)
    parsed, log_vars = model.parse_losses(losses)
    wrapper.update_params(parsed)
    return log_vars


@torch.no_grad()
def head_outputs(model: torch.nn.Module, feats: torch.Tensor,
                 chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, hidden)`` of the head for precomputed features (eval mode, restored after)."""
    head, was = model.head, model.head.training
    head.eval()
    hidden = [head.pre_logits((feats[s:s + chunk], )) for s in range(0, len(feats), chunk)]
    logits = torch.cat([head.mlp[-1](h) for h in hidden])
    head.train(was)
    return logits, torch.cat(hidden)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean() * 100)


@dataclass
class Run:
    """A run's ``(iteration, test top-1 %)`` curve, its training seconds without the
    evaluations and the evaluations' seconds."""

    name: str
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    eval_seconds: float = 0.0


def train_head(model: torch.nn.Module, wrapper, x: torch.Tensor, y: torch.Tensor,
               test_x: torch.Tensor, test_y: torch.Tensor, iters: int, batch_size: int,
               seed: int, evaluate_at: Callable[[int], bool] = lambda it: False,
               name: str = '', progress: bool = True, repeats: int = 1) -> Run:
    """``iters`` iterations of :func:`head_train_step` on full batches cut from seeded epoch
    permutations of ``x``; test top-1 at iteration 0, where ``evaluate_at(iteration)`` and at
    the end. ``repeats``: train steps per batch (each a fresh forward: CE's counterpart of
    GRPO-RM's inner steps)."""
    from mmpretrain.structures import DataSample

    samples, run = [DataSample().set_gt_label(int(v)) for v in y], Run(name)
    gen, order = torch.Generator().manual_seed(seed), torch.zeros(0, dtype=torch.long)

    def evaluate(it: int) -> None:
        t = time.perf_counter()
        run.curve.append((it, top1(head_outputs(model, test_x)[0], test_y)))
        run.eval_seconds += time.perf_counter() - t

    evaluate(0)
    model.train()
    t0 = time.perf_counter()
    for it in tqdm(range(1, iters + 1), desc=name, file=sys.stderr, disable=not progress,
                   leave=False):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        for _ in range(repeats):
            head_train_step(model, x[idx], [samples[i] for i in idx], wrapper)
        if it == iters or evaluate_at(it):
            evaluate(it)
    run.seconds = time.perf_counter() - t0 - run.eval_seconds
    return run


@dataclass
class Data:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    val_ood: dict[str, tuple[torch.Tensor, torch.Tensor]]
    test_ood: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_classes: int


def load(args: argparse.Namespace, data_dir: Path) -> Data:
    """Features of the splits. val-OOD: the val images under the corruptions with another noise
    seed; test-OOD: the demo's corrupted test sets (the first ``--ood-size`` test images)."""
    from tools.dataset_converters.fashion_mnist import prepare_fashion_mnist_corruptions

    cfg, order, n = c.demo_config(c.CONFIGS['ce']), train_order(), args.train_size
    opts = dict(corruptions=cfg.ood_corruptions, severity=OOD_SEVERITY,
                  clean_root=data_dir / 'fashion_mnist')
    folders = {'val': prepare_fashion_mnist_corruptions(
        data_dir / 'fashion_mnist_val_c', seed=1, train_indices=order[n:n + args.ood_size],
        **opts), 'test': prepare_fashion_mnist_corruptions(
        data_dir / 'fashion_mnist_c', limit=args.ood_size, **opts)}
    sets = {'train': (dataset(cfg, False), order[:n + args.val_size]),
            'test': (dataset(cfg, True), list(range(10000)))}
    for split, named in folders.items():
        for name, root in named.items():
            ds = dataset(cfg, True, root)
            sets[f'{split} {name}'] = (ds, list(range(len(ds))))
    f = features(data_dir, sets)
    x, y = f['train']
    return Data(train=(x[:n], y[:n]), val=(x[n:], y[n:]), test=f['test'],
                val_ood={k: f[f'val {k}'] for k in folders['val']},
                test_ood={k: f[f'test {k}'] for k in folders['test']},
                num_classes=cfg.model.head.num_classes)


@dataclass
class Cell:
    """Metrics of one setting, one list entry per seed."""

    values: dict[str, list[float]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values[key])

    def fmt(self, key: str) -> str:
        if key not in self.values:
            return '-'
        mean, std = c.mean_std(self.values[key])
        return f'{mean:.2f} ± {std:.2f}'


class RunStore:
    """Metrics of finished runs in a JSON file, keyed by the setting, the seed and every
    option that changes a run, so an interrupted ablation resumes where it stopped."""

    def __init__(self, path: str, args: argparse.Namespace) -> None:
        self.path = Path(path) if path else None
        self.common = dict(iters=args.iters, batch_size=args.batch_size,
                           train_size=args.train_size, val_size=args.val_size,
                           ood_size=args.ood_size, probe_ref=args.probe_ref)
        self.runs: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            self.runs = json.loads(self.path.read_text())

    def _key(self, s: Setting, seed: int) -> str:
        return json.dumps(dict(asdict(s) | self.common, name=None, stage=None, seed=seed),
                          sort_keys=True, default=str)

    def get(self, s: Setting, seed: int) -> dict | None:
        found = self.runs.get(self._key(s, seed))
        return None if found is None else dict(found)

    def put(self, s: Setting, seed: int, metrics: dict) -> None:
        self.runs[self._key(s, seed)] = dict(metrics)
        if self.path is not None:
            tmp = self.path.with_suffix('.tmp')
            tmp.write_text(json.dumps(self.runs, indent=0, sort_keys=True))
            tmp.replace(self.path)


def probe_metrics(model: torch.nn.Module, data: Data, ref: int) -> dict[str, float]:
    """kNN and SR top-1 on the head's hidden layer, test and test-OOD average."""
    from grpo_rm_mm.evaluation.representation import fit_softmax_regression, knn_predict

    _, h_ref = head_outputs(model, data.train[0][:ref])
    y_ref = data.train[1][:ref]
    scaler, clf = fit_softmax_regression(h_ref.numpy(), y_ref.numpy())
    out: dict[str, float] = {}
    sets = {'test': data.test} | {f'ood/{k}': v for k, v in data.test_ood.items()}
    for name, (x, y) in sets.items():
        _, h = head_outputs(model, x)
        knn = knn_predict(h_ref, y_ref, h, num_classes=data.num_classes)
        sr = clf.predict(scaler.transform(h.numpy().astype(np.float64)))
        out[f'knn {name}'] = float((knn == y).float().mean() * 100)
        out[f'sr {name}'] = float((torch.from_numpy(sr) == y).float().mean() * 100)
    for probe in ('knn', 'sr'):
        out[f'{probe} test-ood'] = statistics.fmean(out[f'{probe} ood/{k}']
                                                    for k in data.test_ood)
    return out


def head_metrics(model: torch.nn.Module, data: Data) -> dict[str, float]:
    out = {'val': top1(head_outputs(model, data.val[0])[0], data.val[1]),
           'test': top1(head_outputs(model, data.test[0])[0], data.test[1])}
    for split, sets in (('val', data.val_ood), ('test', data.test_ood)):
        accs = {k: top1(head_outputs(model, x)[0], y) for k, (x, y) in sets.items()}
        out.update({f'{split} ood/{k}': v for k, v in accs.items()})
        out[f'{split}-ood'] = statistics.fmean(accs.values())
    return out


def set_class_prior(model: torch.nn.Module, counts: Sequence[int]) -> None:
    """What ``ClassPriorHook`` does in a runner: the training set's class counts to every
    loss that uses a class prior."""
    for m in model.modules():
        if getattr(m, 'uses_class_prior', False):
            m.set_class_counts(counts)


def train(s: Setting, x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor,
          eval_y: torch.Tensor, iters: int, batch_size: int, seed: int,
          cfg: Config | None = None,
          evaluate_at: Callable[[int], bool] = lambda it: False):
    """Train the setting (or its config ``cfg``) on ``(x, y)``, scored on ``(eval_x, eval_y)``
    at ``evaluate_at`` iterations; the class prior of a logit-adjusted loss is the counts of
    ``y``."""
    model, wrapper = c.build(s.config() if cfg is None else cfg, seed)
    set_class_prior(model, np.bincount(y.numpy(), minlength=model.head.num_classes).tolist())
    repeats = s.inner_steps if s.method == 'ce' else 1
    run = train_head(model, wrapper, x, y, eval_x, eval_y, iters, batch_size, seed,
                     evaluate_at, name=s.name, progress=False, repeats=repeats)
    return model, run


def two_std_gap(cell, ref, key: str) -> tuple[float, float, int]:
    """``(gap, sd, side)`` of ``cell`` against ``ref`` at ``key``: the difference of their
    seed means, the larger of their stds, and 1 / -1 / 0 for above / below by more than 2 sd /
    within."""
    gap = cell.mean(key) - ref.mean(key)
    sd = max(c.mean_std(cell.values[key])[1], c.mean_std(ref.values[key])[1])
    return gap, sd, 1 if gap > 2 * sd else (-1 if gap < -2 * sd else 0)


def long_tail_rows(chosen: Setting, baseline: Setting) -> list[Setting]:
    """CE and logit-adjusted CE; the selected setting; the default (pi_old, clip, k=1) plain,
    with the inverse-odds weights (mean-normalised and raw), logit-adjusted, and both (also
    with the accuracy reward alone), with class-balanced weights (CE too); the uniform form."""
    default = grpo('pi_old k=1', 'grid', 'pi_old')
    rows = [baseline, LA_CE, CB_CE, chosen, default,
            grpo('pi_old inverse_odds k=1', 'correction', 'pi_old', loss=CORRECTED),
            grpo('pi_old inverse_odds raw k=1', 'correction', 'pi_old', loss=CORRECTED_RAW),
            grpo('pi_old logit-adjusted k=1', 'longtail', 'pi_old', loss=ADJUSTED),
            grpo('pi_old logit-adjusted inverse_odds k=1', 'longtail', 'pi_old',
                 loss=ADJUSTED | CORRECTED),
            grpo('pi_old logit-adjusted inverse_odds raw k=1', 'longtail', 'pi_old',
                 loss=ADJUSTED | CORRECTED_RAW),
            # at one inner step every update is at ratio 1, where this is the logit-adjusted
            # CE's gradient: the row tells the uniformity reward's part from the rest
            grpo('pi_old logit-adjusted inverse_odds raw acc k=1', 'longtail', 'pi_old',
                 rewards='acc', loss=ADJUSTED | CORRECTED_RAW),
            grpo('pi_old inverse_odds raw class-balanced k=1', 'longtail', 'pi_old',
                 loss=CORRECTED_RAW | BALANCED),
            grpo('GRPO-RM uniform k=1', 'longtail', 'uniform')]
    out: list[Setting] = []
    for s in rows:  # the selected setting may be one of the others
        if all((s.method, s.loss, s.inner_steps, s.lr, s.rewards, s.uni_weight) !=
               (o.method, o.loss, o.inner_steps, o.lr, o.rewards, o.uni_weight) for o in out):
            out.append(s)
    return out


def long_tail(args: argparse.Namespace, data: Data, chosen: Setting,
              baseline: Setting) -> None:
    from grpo_rm_mm.datasets.class_counts import dataset_class_counts
    from grpo_rm_mm.datasets.long_tail import LongTailDataset

    class Labels:  # the training features' labels, as LongTailDataset reads a dataset
        metainfo = {'classes': tuple(str(i) for i in range(data.num_classes))}

        def get_gt_labels(self) -> np.ndarray:
            return data.train[1].numpy()

    lt = LongTailDataset(Labels(), imbalance_ratio=100, max_per_class=1000, seed=0)
    idx = torch.from_numpy(lt.indices)
    x, y = data.train[0][idx], data.train[1][idx]
    counts = np.asarray(dataset_class_counts(lt))  # what ClassPriorHook would count
    assert counts.tolist() == list(lt.class_counts)
    groups = {'many (>100)': np.flatnonzero(counts > 100),
              'medium (20-100)': np.flatnonzero((counts >= 20) & (counts <= 100)),
              'few (<20)': np.flatnonzero(counts < 20)}
    print(f'\n### Long-tailed training set (LongTailDataset, imbalance ratio 100, head class '
          f'1000): {len(idx)} images, per-class counts {lt.class_counts}; '
          f'{args.lt_iters} iterations of batch {args.lt_batch_size}; balanced val (selection: '
          f'val all and val few-shot) and balanced 10k test set (reported); logit-adjusted '
          f'losses: tau 1, prior = the class counts above\n')
    print('| method | setting | val all | val few-shot | many-shot | medium-shot | few-shot | all '
          '| test-OOD avg |')
    print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
    cells: dict[str, Cell] = {}

    def group_acc(pred: torch.Tensor, ty: torch.Tensor, classes: np.ndarray) -> float:
        sel = torch.isin(ty, torch.from_numpy(classes))
        return float((pred[sel] == ty[sel]).float().mean() * 100) if sel.any() else float('nan')

    for s in long_tail_rows(chosen, baseline):
        cell = cells.setdefault(s.name, Cell())
        for seed in args.seeds:
            model, _ = train(s, x, y, data.val[0], data.val[1], args.lt_iters,
                             args.lt_batch_size, seed)
            pred = head_outputs(model, data.test[0])[0].argmax(1)
            ty = data.test[1]
            vpred = head_outputs(model, data.val[0])[0].argmax(1)
            m = {'val': float((vpred == data.val[1]).float().mean() * 100),
                 'val few': group_acc(vpred, data.val[1], groups['few (<20)']),
                 'all': float((pred == ty).float().mean() * 100)}
            m.update({g: group_acc(pred, ty, classes) for g, classes in groups.items()})
            m['ood'] = statistics.fmean(top1(head_outputs(model, ox)[0], oy)
                                        for ox, oy in data.test_ood.values())
            cell.add(m)
        label = 'CE' if s.method == 'ce' else 'GRPO-RM'
        mark = ' (selected on the balanced val)' if s is chosen else ''
        print(f'| {label} | {s.describe()}{mark} | ' + ' | '.join(
            cell.fmt(g) for g in ['val', 'val few', *groups, 'all', 'ood']) + ' |', flush=True)
    few = 'few (<20)'
    for ref in (baseline, LA_CE, CB_CE):
        r = cells[ref.name]
        for s in long_tail_rows(chosen, baseline):
            if s.method == 'ce':
                continue
            gap, sd, side = two_std_gap(cells[s.name], r, few)
            verdict = {1: 'above by > 2 std', -1: 'below by > 2 std', 0: 'within 2 std'}[side]
            print(f'few-shot {s.describe()} vs {ref.describe()}: {gap:+.2f} ({verdict}; larger '
                  f'std {sd:.2f})')


def pairs(x: torch.Tensor, y: torch.Tensor, seed: int, num_classes: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A C^2-class task from a C-class one: image i beside a partner image (a seeded
    permutation), features concatenated, label ``C * y_i + y_partner``."""
    partner = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return torch.cat([x, x[partner]], dim=1), y * num_classes + y[partner]


def many_class(args: argparse.Namespace, data: Data, chosen: Setting,
               baseline: Setting) -> None:
    """The many-class check: 100 classes (ordered pairs of Fashion-MNIST classes), balanced,
    head MLP 2560 -> 256 -> 100; CE, the selected setting, the default and the corrected one."""
    k = data.num_classes
    train_xy = pairs(*data.train, 0, k)
    val_xy, test_xy = pairs(*data.val, 1, k), pairs(*data.test, 2, k)
    print(f'\n### Many classes: {k * k} classes (ordered pairs of Fashion-MNIST classes: each '
          f'image beside a fixed random partner, frozen features concatenated), train '
          f'{len(train_xy[0])}, val {len(val_xy[0])}, test {len(test_xy[0])}; MLP '
          f'{2 * data.train[0].shape[1]}->256->{k * k}, {args.mc_iters} iterations of batch '
          f'{args.batch_size}, Adam\n')
    rows = [baseline, chosen, grpo('pi_old k=1', 'grid', 'pi_old'),
            grpo('pi_old inverse_odds k=1', 'correction', 'pi_old', loss=CORRECTED),
            grpo('pi_old inverse_odds raw k=1', 'correction', 'pi_old', loss=CORRECTED_RAW)]
    print('| method | setting | val top-1 | test top-1 | test top-1 at 1/10 of the iterations |')
    print('|---|---|---:|---:|---:|')
    seen = set()
    for s in rows:
        if s.loss + (s.method, s.inner_steps) in seen:
            continue
        seen.add(s.loss + (s.method, s.inner_steps))
        cell = Cell()
        for seed in args.seeds:
            cfg = s.config()
            cfg.model.head.in_channels = 2 * data.train[0].shape[1]
            cfg.model.head.num_classes = k * k
            model, run = train(s, *train_xy, *test_xy, args.mc_iters, args.batch_size, seed,
                               cfg=cfg, evaluate_at=lambda it: it == args.mc_iters // 10)
            early = [acc for it, acc in run.curve if it == args.mc_iters // 10]
            cell.add({'val': top1(head_outputs(model, val_xy[0])[0], val_xy[1]),
                      'test': run.curve[-1][1], 'early': early[0]})
        label = 'CE' if s.method == 'ce' else 'GRPO-RM'
        print(f'| {label} | {s.describe()} | {cell.fmt("val")} | {cell.fmt("test")} | '
              f'{cell.fmt("early")} |', flush=True)


def main() -> None:
    args = parse_args()
    c.setup(args.threads)
    with c.tee_stdout(args.out):
        t_start = time.perf_counter()
        c.print_header('ablation: GRPO-RM group weighting x surrogate x rewards x inner steps, '
                       'OOD search, long tail; CE baseline; held-out selection')
        data = load(args, c.prepare_demo(args.data_dir))
        print(f'# data: Fashion-MNIST 64 px, frozen ImageNet EfficientNet-Lite0 features; '
              f'train {len(data.train[0])}, val {len(data.val[0])} (+ {args.ood_size} x '
              f'{len(data.val_ood)} corrupted), test {len(data.test[0])} (+ {args.ood_size} x '
              f'{len(data.test_ood)} corrupted: {", ".join(data.test_ood)}, severity '
              f'{OOD_SEVERITY})')
        print(f'# every run: MLP {mlp()}, '
              f'{args.iters} iterations of batch {args.batch_size}, Adam; seeds {args.seeds}; '
              f'GRPORMLoss defaults unless listed (clip eps 0.2, beta 0, population std)')
        grid = [s for s in settings(args.stages)
                if args.only is None or s.method == 'ce' or s.name in args.only]
        cells = {s.name: Cell() for s in grid}
        store = RunStore(args.runs_file, args)
        bar = tqdm(total=len(grid) * len(args.seeds), desc='runs', unit='run')
        reused = 0
        for s in grid:
            for seed in args.seeds:
                metrics = store.get(s, seed)
                reused += metrics is not None
                if metrics is None:
                    model, run = train(s, *data.train, *data.val, args.iters,
                                       args.batch_size, seed)
                    metrics = head_metrics(model, data) | probe_metrics(model, data,
                                                                        args.probe_ref)
                    metrics['seconds'] = run.seconds
                    store.put(s, seed, metrics)
                cells[s.name].seconds.append(metrics.pop('seconds'))
                cells[s.name].add(metrics)
                bar.set_postfix_str(f'{s.name} seed {seed}: val {metrics["val"]:.2f}')
                bar.update()
        bar.close()
        print(f'# {reused} of {len(grid) * len(args.seeds)} runs reused from '
              f'{c.relative(args.runs_file)} (their s / run are those of the run that made them)')

        ce_settings = [s for s in grid if s.method == 'ce']
        baseline = max(ce_settings, key=lambda s: cells[s.name].mean('val'))
        ce_val = cells[baseline.name].mean('val')
        eligible = [s for s in grid if s.method == 'grpo'
                    and cells[s.name].mean('val') >= ce_val - args.tolerance]
        chosen = max(eligible, key=lambda s: cells[s.name].mean('val-ood'), default=None)

        print(f'\nSelection rule: among GRPO-RM settings whose mean val head top-1 is within '
              f'{args.tolerance:g} point of the CE baseline ({baseline.describe()}: '
              f'{ce_val:.2f}), the best mean val-OOD average head top-1. Selection reads only '
              f'the val columns; the test columns are reported.')
        print(f'\n### Head top-1 % (val / test) and probes on the hidden layer (test), mean ± '
              f'std over {len(args.seeds)} seeds, {args.iters} iterations\n')
        head = ('| stage | setting | val | val-OOD avg | test | test-OOD avg | kNN test | '
                'kNN test-OOD | SR test | SR test-OOD | s / run |')
        print(head)
        print('|' + '---|' * 2 + '---:|' * 9)
        for s in grid:
            cell = cells[s.name]
            mark = ' **(selected)**' if chosen is not None and s.name == chosen.name else ''
            mark += ' (CE baseline)' if s.name == baseline.name else ''
            cols = ['val', 'val-ood', 'test', 'test-ood', 'knn test', 'knn test-ood',
                    'sr test', 'sr test-ood']
            print(f'| {s.stage} | {s.describe()}{mark} | ' +
                  ' | '.join(cell.fmt(k) for k in cols) +
                  f' | {c.mean_std(cell.seconds)[0]:.1f} |')

        if chosen is None:
            print(f'\nno GRPO-RM setting is within {args.tolerance:g} point of CE on val')
        else:
            ch, ce = cells[chosen.name], cells[baseline.name]
            print(f'\nselected: {chosen.describe()} (val {ch.fmt("val")}, val-OOD '
                  f'{ch.fmt("val-ood")})')
            for key, label in (('test', 'test head top-1'), ('test-ood', 'test-OOD average'),
                               ('knn test-ood', 'kNN test-OOD'), ('sr test-ood', 'SR test-OOD')):
                gap, sd, side = two_std_gap(ch, ce, key)
                verdict = {1: 'beats CE by > 2 std', -1: 'below CE by > 2 std',
                           0: 'within 2 std of CE'}[side]
                print(f'  {label}: GRPO-RM {ch.fmt(key)} vs CE {ce.fmt(key)}: {gap:+.2f} '
                      f'({verdict}; larger std {sd:.2f})')
            print('\nper corruption, test head top-1 (selected vs CE): ' + '; '.join(
                f'{k} {ch.mean(f"test ood/{k}"):.2f} vs {ce.mean(f"test ood/{k}"):.2f}'
                for k in data.test_ood))
            beats = [s.describe() for s in grid if s.method == 'grpo' and
                     cells[s.name].mean('val-ood') > cells[baseline.name].mean('val-ood')]
            print(f'GRPO-RM settings above CE on val-OOD: {beats or "none"}')
        if 'longtail' in args.stages and chosen is not None:
            long_tail(args, data, chosen, baseline)
        if 'manyclass' in args.stages and chosen is not None:
            many_class(args, data, chosen, baseline)
        print(f'# total {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
    main()
