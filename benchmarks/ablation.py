"""Ablation of the GRPO-RM objective (group weighting x surrogate x rewards x inner steps, and a
search for an out-of-distribution gain) against cross-entropy, with held-out selection, plus a
long-tailed run.

Setup (as ``convergence.py``): frozen ImageNet EfficientNet-Lite0 features of real
Fashion-MNIST at 64 px, the demo's ``GRPORMClsHead`` (MLP 1280 -> 256 -> 10), batch 1024,
Adam, trained with the registered head's ``loss()`` and the optimizer wrappers. Splits:

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
selected GRPO-RM setting vs uniform, many/medium/few-shot accuracy). Finished runs are kept in
``--runs-file`` and reused by the same command.

    .venv/bin/python benchmarks/ablation.py [--stages grid rewards search longtail]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common as c
import numpy as np
import torch
from tqdm import tqdm

UNI = 'UniformityReward'


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
        cfgs = [dict(r) for r in c.REWARD_SETS[self.rewards]]
        for r in cfgs:
            if r['type'] == UNI:
                r['weight'] = self.uni_weight
        return cfgs

    def describe(self) -> str:
        if self.method == 'ce':
            return f'CE, lr {self.lr:g}'
        opts = dict(group_weighting='uniform', surrogate='clip') | self.loss_options
        extra = ', '.join(f'{k}={v}' for k, v in opts.items()
                          if k not in ('group_weighting', 'surrogate'))
        rewards = self.rewards if self.uni_weight == 1 else \
            f'{self.rewards} (uni {self.uni_weight:g})'
        return (f"{opts['group_weighting']}, {opts['surrogate']}, {rewards}, k={self.inner_steps}"
                f", lr {self.lr:g}" + (f', {extra}' if extra else ''))


def grpo(name: str, stage: str, weighting: str, surrogate: str = 'clip', k: int = 1,
         **kw) -> Setting:
    loss = dict(group_weighting=weighting, surrogate=surrogate) | kw.pop('loss', {})
    return Setting(name, stage, loss=tuple(sorted(loss.items())), inner_steps=k, **kw)


CLIP_HIGHER = dict(clip_eps_low=0.2, clip_eps_high=0.28)


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
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_common_args(parser, str(c.RESULTS / 'ablation.txt'))
    parser.add_argument('--stages', nargs='+', default=['grid', 'rewards', 'search', 'longtail'],
                        choices=['grid', 'rewards', 'search', 'longtail'])
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
    return parser.parse_args()


@dataclass
class Data:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    val_ood: dict[str, tuple[torch.Tensor, torch.Tensor]]
    test_ood: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load(args: argparse.Namespace, demo: c.Demo) -> Data:
    x, y = c.cached_features(demo, False, args.train_size + args.val_size)
    n = args.train_size
    return Data(train=(x[:n], y[:n]), val=(x[n:], y[n:]), test=c.cached_features(demo, True),
                val_ood=c.ood_features(demo, 'val', args.ood_size, val_offset=n),
                test_ood=c.ood_features(demo, 'test', args.ood_size))


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

    _, h_ref = c.head_outputs(model, data.train[0][:ref])
    y_ref = data.train[1][:ref]
    scaler, clf = fit_softmax_regression(h_ref.numpy(), y_ref.numpy())
    out: dict[str, float] = {}
    sets = {'test': data.test} | {f'ood/{k}': v for k, v in data.test_ood.items()}
    for name, (x, y) in sets.items():
        _, h = c.head_outputs(model, x)
        knn = knn_predict(h_ref, y_ref, h, num_classes=c.NUM_CLASSES)
        sr = clf.predict(scaler.transform(h.numpy().astype(np.float64)))
        out[f'knn {name}'] = float((knn == y).float().mean() * 100)
        out[f'sr {name}'] = float((torch.from_numpy(sr) == y).float().mean() * 100)
    for probe in ('knn', 'sr'):
        out[f'{probe} test-ood'] = statistics.fmean(out[f'{probe} ood/{k}']
                                                    for k in data.test_ood)
    return out


def head_metrics(model: torch.nn.Module, data: Data) -> dict[str, float]:
    out = {'val': c.top1(c.head_outputs(model, data.val[0])[0], data.val[1]),
           'test': c.top1(c.head_outputs(model, data.test[0])[0], data.test[1])}
    for split, sets in (('val', data.val_ood), ('test', data.test_ood)):
        accs = {k: c.top1(c.head_outputs(model, x)[0], y) for k, (x, y) in sets.items()}
        out.update({f'{split} ood/{k}': v for k, v in accs.items()})
        out[f'{split}-ood'] = statistics.fmean(accs.values())
    return out


def train(s: Setting, demo: c.Demo, x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor,
          eval_y: torch.Tensor, iters: int, batch_size: int, seed: int):
    model = c.build_model(s.method, demo.checkpoint, s.reward_cfgs(), seed, s.loss_options)
    wrapper = c.build_wrapper(model, s.method, s.inner_steps, s.lr)
    run = c.train_head(model, wrapper, x, y, eval_x, eval_y, iters, batch_size, seed,
                       name=s.name, progress=False)
    return model, run


def long_tail(args: argparse.Namespace, demo: c.Demo, data: Data, chosen: Setting,
              baseline: Setting) -> None:
    from grpo_rm_mm.datasets.long_tail import LongTailDataset

    class Labels:  # the training features' labels, as LongTailDataset reads a dataset
        metainfo = {'classes': tuple(str(i) for i in range(c.NUM_CLASSES))}

        def get_gt_labels(self) -> np.ndarray:
            return data.train[1].numpy()

    lt = LongTailDataset(Labels(), imbalance_ratio=100, max_per_class=1000, seed=0)
    idx = torch.from_numpy(lt.indices)
    x, y = data.train[0][idx], data.train[1][idx]
    counts = np.asarray(lt.class_counts)
    groups = {'many (>100)': np.flatnonzero(counts > 100),
              'medium (20-100)': np.flatnonzero((counts >= 20) & (counts <= 100)),
              'few (<20)': np.flatnonzero(counts < 20)}
    print(f'\n### Long-tailed training set (LongTailDataset, imbalance ratio 100, head class '
          f'1000): {len(idx)} images, per-class counts {lt.class_counts}; '
          f'{args.lt_iters} iterations of batch {args.lt_batch_size}; balanced 10k test set\n')
    ref = Setting('GRPO-RM uniform k=1', 'longtail')
    rows = [baseline, chosen] + ([ref] if chosen.loss_options.get('group_weighting')
                                 != 'uniform' else [])
    print('| method | setting | many-shot | medium-shot | few-shot | all | test-OOD avg |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for s in rows:
        cell = Cell()
        for seed in args.seeds:
            model, _ = train(s, demo, x, y, data.val[0], data.val[1], args.lt_iters,
                             args.lt_batch_size, seed)
            pred = c.head_outputs(model, data.test[0])[0].argmax(1)
            ty = data.test[1]
            m = {'all': float((pred == ty).float().mean() * 100)}
            for g, classes in groups.items():
                sel = torch.isin(ty, torch.from_numpy(classes))
                m[g] = float((pred[sel] == ty[sel]).float().mean() * 100) if sel.any() else \
                    float('nan')
            m['ood'] = statistics.fmean(c.top1(c.head_outputs(model, ox)[0], oy)
                                        for ox, oy in data.test_ood.values())
            cell.add(m)
        label = 'CE' if s.method == 'ce' else 'GRPO-RM'
        print(f'| {label} | {s.describe()} | ' + ' | '.join(
            cell.fmt(g) for g in [*groups, 'all', 'ood']) + ' |', flush=True)


def main() -> None:
    args = parse_args()
    c.setup(args.threads)
    with c.tee_stdout(args.out):
        t_start = time.perf_counter()
        c.print_header('ablation: GRPO-RM group weighting x surrogate x rewards x inner steps, '
                       'OOD search, long tail; CE baseline; held-out selection')
        demo = c.prepare_demo(args.data_dir)
        data = load(args, demo)
        print(f'# data: Fashion-MNIST 64 px, frozen ImageNet EfficientNet-Lite0 features; '
              f'train {len(data.train[0])}, val {len(data.val[0])} (+ {args.ood_size} x '
              f'{len(data.val_ood)} corrupted), test {len(data.test[0])} (+ {args.ood_size} x '
              f'{len(data.test_ood)} corrupted: {", ".join(c.CORRUPTIONS)}, severity '
              f'{c.OOD_SEVERITY})')
        print(f'# every run: MLP {c.IN_CHANNELS}->{c.HIDDEN_CHANNELS}->{c.NUM_CLASSES}, '
              f'{args.iters} iterations of batch {args.batch_size}, Adam; seeds {args.seeds}; '
              f'GRPORMLoss defaults unless listed (clip eps 0.2, beta 0, population std)')
        grid = [s for s in settings(args.stages)
                if args.only is None or s.method == 'ce' or s.name in args.only]
        cells = {s.name: Cell() for s in grid}
        store = RunStore(args.runs_file, args)
        bar = tqdm(total=len(grid) * len(args.seeds), desc='runs', unit='run')
        for s in grid:
            for seed in args.seeds:
                metrics = store.get(s, seed)
                if metrics is None:
                    model, run = train(s, demo, *data.train, *data.val, args.iters,
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
                gap = ch.mean(key) - ce.mean(key)
                sd = max(c.mean_std(ch.values[key])[1], c.mean_std(ce.values[key])[1])
                verdict = 'beats CE by > 2 std' if gap > 2 * sd else (
                    'below CE by > 2 std' if gap < -2 * sd else 'within 2 std of CE')
                print(f'  {label}: GRPO-RM {ch.fmt(key)} vs CE {ce.fmt(key)}: {gap:+.2f} '
                      f'({verdict}; larger std {sd:.2f})')
            print('\nper corruption, test head top-1 (selected vs CE): ' + '; '.join(
                f'{k} {ch.mean(f"test ood/{k}"):.2f} vs {ce.mean(f"test ood/{k}"):.2f}'
                for k in data.test_ood))
            beats = [s.describe() for s in grid if s.method == 'grpo' and
                     cells[s.name].mean('val-ood') > cells[baseline.name].mean('val-ood')]
            print(f'GRPO-RM settings above CE on val-OOD: {beats or "none"}')
        if 'longtail' in args.stages and chosen is not None:
            long_tail(args, demo, data, chosen, baseline)
        print(f'# total {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
    main()
