"""Ablation of GRPO-RM rewards x inner steps, with the CE baseline (issue 6, benchmark 3).

Same cached-feature setup as ``convergence.py`` (frozen ImageNet EfficientNet-Lite0 features of
real Fashion-MNIST at 64 px, MLP head 1280 -> 256 -> 10, batch 1024, Adam lr 1e-3): every
reward set (accuracy; accuracy + uniformity; accuracy + confidence penalty) x every
``inner_steps`` value, over several seeds (head initialisation and batch order), trained for the
same number of iterations with the registered head's ``loss()`` and the optimizer wrappers.
Prints a markdown table of mean and std over seeds of the final test top-1 of the head and of
kNN top-1 (k=20, T=0.07, cosine) on the head's hidden layer (train subset as reference, test
set as queries).

    .venv/bin/python benchmarks/ablation.py [--iters 200] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import common as c
from tqdm import tqdm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_common_args(parser, str(c.RESULTS / 'ablation.txt'))
    parser.add_argument('--iters', type=int, default=200,
                        help='optimizer iterations (batches) per run (default %(default)s)')
    parser.add_argument('--batch-size', type=int, default=1024)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--train-size', type=int, default=20000,
                        help='first N images of a fixed permutation of the 60k train set')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--rewards', nargs='+', choices=list(c.REWARD_SETS),
                        default=list(c.REWARD_SETS))
    parser.add_argument('--inner-steps', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--no-knn', dest='knn', action='store_false',
                        help='skip the kNN probe on the hidden layer')
    return parser.parse_args()


@dataclass
class Cell:
    """Results of one configuration over the seeds."""

    top1: list[float] = field(default_factory=list)
    knn: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def fmt(values: list[float]) -> str:
    if not values:
        return '-'
    mean, std = c.mean_std(values)
    return f'{mean:.2f} ± {std:.2f}'


def main() -> None:
    args = parse_args()
    c.setup(args.threads)
    with c.tee_stdout(args.out):
        t_start = time.perf_counter()
        c.print_header('ablation: GRPO-RM rewards x inner_steps, CE baseline (issue 6, '
                       'benchmark 3)')
        demo = c.prepare_demo(args.data_dir)
        train_x, train_y = c.cached_features(demo, False, args.train_size)
        test_x, test_y = c.cached_features(demo, True)
        print(f'# data: Fashion-MNIST, {len(train_x)} train / {len(test_x)} test images, 64 px, '
              f'features of the frozen ImageNet EfficientNet-Lite0 ({train_x.shape[1]}-d)')
        print(f'# every run: MLP {c.IN_CHANNELS}->{c.HIDDEN_CHANNELS}->{c.NUM_CLASSES}, '
              f'{args.iters} iterations of batch {args.batch_size} '
              f'({args.iters * args.batch_size / len(train_x):.1f} epochs), Adam lr {args.lr}; '
              f'seeds {args.seeds}; GRPORMLoss defaults otherwise (clip 0.2, beta 0, '
              f'population-std advantages)')
        print('# rewards: ' + '; '.join(
            f'{name} = ' + ' + '.join(f"{r['weight']:g} {r['type']}" for r in rs)
            for name, rs in c.REWARD_SETS.items() if name in args.rewards))

        configs = [('CE', 'ce', '-', 1)] + [
            (f'GRPO-RM {rw} k={k}', 'grpo', rw, k)
            for rw in args.rewards for k in args.inner_steps]
        cells = {name: Cell() for name, *_ in configs}
        bar = tqdm(total=len(configs) * len(args.seeds), desc='runs', unit='run')
        for seed in args.seeds:
            for name, method, rewards, k in configs:
                model = c.build_model(method, demo.checkpoint,
                                      rewards if method == 'grpo' else c.DEFAULT_REWARDS, seed)
                wrapper = c.build_wrapper(model, method, k, args.lr)
                run = c.train_head(model, wrapper, train_x, train_y, test_x, test_y, args.iters,
                                   args.batch_size, seed, name=name, progress=False)
                cell = cells[name]
                cell.top1.append(run.final)
                cell.seconds.append(run.seconds)
                if args.knn:
                    cell.knn.append(c.knn_top1(model, train_x, train_y, test_x, test_y))
                bar.set_postfix_str(f'{name} seed {seed}: {run.final:.2f}%')
                bar.update()
        bar.close()

        if args.knn:
            from grpo_rm_mm.evaluation.representation import knn_predict
            pred = knn_predict(train_x, train_y, test_x, num_classes=c.NUM_CLASSES)
            frozen_knn = float((pred == test_y).float().mean() * 100)

        print(f'\n### Final test top-1 after {args.iters} iterations, mean ± std over '
              f'{len(args.seeds)} seeds\n')
        print('| method | rewards | inner_steps | head top-1 % | kNN top-1 % (hidden 256-d) '
              '| per-seed head top-1 | s / run |')
        print('|---|---|---:|---:|---:|---|---:|')
        for name, method, rewards, k in configs:
            cell = cells[name]
            label = 'CE' if method == 'ce' else 'GRPO-RM'
            seeds = ', '.join(f'{v:.2f}' for v in cell.top1)
            print(f'| {label} | {rewards} | {k} | {fmt(cell.top1)} | {fmt(cell.knn)} | {seeds} '
                  f'| {c.mean_std(cell.seconds)[0]:.1f} |')
        if args.knn:
            print(f'| frozen backbone, no head | - | - | - | {frozen_knn:.2f} (1280-d, '
                  f'deterministic) | - | - |')

        best = max((n for n, m, *_ in configs if m == 'grpo'),
                   key=lambda n: c.mean_std(cells[n].top1)[0], default=None)
        if best is not None:
            print(f'\nbest GRPO-RM configuration by mean head top-1: {best} '
                  f'({fmt(cells[best].top1)}), CE {fmt(cells["CE"].top1)}')
        print(f'# total {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
    main()
