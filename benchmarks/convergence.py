"""Convergence of GRPO-RM vs cross-entropy heads on frozen features.

The models of ``configs/demo/fashion_mnist_{ce,grpo_rm}.py`` (the identical ``GRPORMClsHead``
MLP 1280 -> 256 -> 10, from the same initial weights), trained on the same batch sequence (batch
1024, Adam lr 1e-3) on the frozen features of the real ImageNet EfficientNet-Lite0 on real
Fashion-MNIST at 64 px (a fixed train subset; the full 10k test set), as ``ablation.py`` sets
them up: the head's ``loss()`` and the config's optimizer wrapper. GRPO-RM runs: the paper's
uniform group weighting with each ``--inner-steps``, the project default (the GRPO-RM config
itself, or ``--config``), the default with the inverse-odds query weights
(``query_weighting='inverse_odds'``, raw and mean-normalised), and, for each
``--dual-inner-steps``, the default and the corrected (raw) one with the dual clip and that
many inner steps; CE also runs with each ``--ce-repeats`` train steps per batch (the fair
comparison for inner steps: the same number of optimizer steps on each batch). Test top-1 is
recorded every ``--eval-every`` iterations; the script prints the iterations each method needs
to reach the CE run's final test accuracy (and fractions of it) and plots the curves.

    .venv/bin/python benchmarks/convergence.py [--iters 1000] [--inner-steps 1 4]
"""
from __future__ import annotations

import argparse
import csv
import re
import time
from pathlib import Path

import ablation as a
import common as c


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_common_args(parser, str(c.RESULTS / 'convergence.txt'))
    parser.add_argument('--plot', default=str(c.RESULTS / 'convergence.png'),
                        help='PNG of both curves (a .csv of the curves is written beside it)')
    parser.add_argument('--iters', type=int, default=1000)
    parser.add_argument('--eval-every', type=int, default=10)
    parser.add_argument('--dense-until', type=int, default=50,
                        help='also evaluate after every iteration up to this one')
    parser.add_argument('--batch-size', type=int, default=1024)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--train-size', type=int, default=20000,
                        help='first N images of a fixed permutation of the 60k train set')
    parser.add_argument('--seed', type=int, default=0, help='head init and batch order')
    parser.add_argument('--rewards', choices=sorted(a.REWARD_SETS), default='acc+uni')
    parser.add_argument('--inner-steps', type=int, nargs='+', default=[1, 4],
                        help="one GRPO-RM run with the paper's uniform group weighting per "
                        'value (default: %(default)s)')
    parser.add_argument('--dual-inner-steps', type=int, nargs='+', default=[2, 4],
                        help='inner steps of the dual-clip runs of the default and the '
                        'corrected objective (default: %(default)s; none: no such run)')
    parser.add_argument('--ce-repeats', type=int, nargs='*', default=[2, 4],
                        help='CE runs with this many train steps per batch (default: '
                        '%(default)s)')
    parser.add_argument('--config', default=c.CONFIGS['grpo'],
                        help='also run this GRPO-RM config (its loss and inner steps; the '
                        'project default; "" to skip)')
    parser.add_argument('--fractions', type=float, nargs='+',
                        default=[0.8, 0.9, 0.95, 0.99, 1.0],
                        help='targets as fractions of the CE run\'s final test top-1')
    return parser.parse_args()


def first_reaching(run: a.Run, target: float) -> int | None:
    """First evaluated iteration whose test top-1 is >= ``target``."""
    return next((it for it, acc in run.curve if acc >= target), None)


def style(name: str) -> dict:
    """Line colour by objective (CE, uniform, default, corrected raw / mean-normalised), line
    style by optimizer steps per batch (1 solid, 2 dashed, 4 dotted)."""
    colour = ('black' if name.startswith('CE') else 'tab:gray' if 'uniform' in name
              else 'tab:red' if 'raw' in name else 'tab:green' if 'mean-normalised' in name
              else 'tab:blue')
    steps = re.search(r'inner_steps=(\d+)|(\d+) steps per batch', name)
    k = int(next(g for g in steps.groups() if g)) if steps else 1
    return dict(color=colour, linestyle={1: '-', 2: '--'}.get(k, ':'))


def plot(runs: list[a.Run], target: float, path: Path, title: str, xlabel: str) -> None:
    """Test top-1 against iterations, with the CE final accuracy as a dashed line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=120)
    for run in runs:
        its, accs = zip(*run.curve)
        ax.plot(its, accs, label=run.name, linewidth=1.4, **style(run.name))
    ax.axhline(target, color='gray', linestyle='--', linewidth=1,
               label=f'CE final ({target:.2f}%)')
    low = min(acc for run in runs for it, acc in run.curve if it > 0)
    ax.set_ylim(max(0.0, low - 2), max(acc for run in runs for _, acc in run.curve) + 1)
    ax.set_xscale('symlog', linthresh=10, linscale=0.5)
    ax.set_xlim(0, max(it for run in runs for it, _ in run.curve))
    ax.set_xlabel(xlabel + ', linear up to 10, log beyond')
    ax.set_ylabel('test top-1 (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=6.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    c.setup(args.threads)
    with c.tee_stdout(args.out):
        t_start = time.perf_counter()
        c.print_header('convergence, GRPO-RM vs CE heads on frozen features')
        data_dir = c.prepare_demo(args.data_dir)
        cfg = c.demo_config(c.CONFIGS['ce'])
        feats = a.features(data_dir, {
            'train': (a.dataset(cfg, False), a.train_order()[:args.train_size]),
            'test': (a.dataset(cfg, True), list(range(10000)))})
        (train_x, train_y), (test_x, test_y) = feats['train'], feats['test']
        print(f'# data: Fashion-MNIST, {len(train_x)} train / {len(test_x)} test images, 64 px, '
              f'features of the frozen ImageNet EfficientNet-Lite0 ({train_x.shape[1]}-d)')
        print(f'# training: MLP {a.mlp()}, '
              f'{args.iters} iterations of batch {args.batch_size} '
              f'({args.iters * args.batch_size / len(train_x):.1f} epochs), Adam lr {args.lr}, '
              f'seed {args.seed}; GRPO-RM rewards {args.rewards}, inner_steps '
              f'{" and ".join(map(str, args.inner_steps))}; test top-1 after every iteration '
              f'up to {args.dense_until}, then every {args.eval_every}')
        rewards = dict(rewards=a.REWARD_SETS[args.rewards])
        configs = {'CE': c.demo_config(c.CONFIGS['ce'], lr=args.lr)} | {
            f'GRPO-RM uniform ({args.rewards}, inner_steps={k})': c.demo_config(
                c.CONFIGS['grpo'], dict(rewards, group_weighting='uniform', surrogate='clip'),
                k, args.lr) for k in args.inner_steps}
        repeats = {'CE': 1}
        for r in args.ce_repeats:
            name = f'CE, {r} steps per batch'
            configs[name], repeats[name] = c.demo_config(c.CONFIGS['ce'], lr=args.lr), r
        if args.config:
            cfg = c.demo_config(args.config, rewards, lr=args.lr)
            options = {k: v for k, v in cfg.model.head.loss.items()
                       if k not in ('type', 'rewards', 'clip_eps', 'beta')}
            k = cfg.optim_wrapper.get('inner_steps', 1)
            print(f'# {args.config}: GRPORMLoss options {options}, inner_steps={k}')
            label = ', '.join(f'{v}' for v in options.values())
            configs[f'GRPO-RM default: {label} ({args.rewards}, inner_steps={k})'] = cfg
            corrected = dict(rewards, query_weighting='inverse_odds', query_weight_norm='none')
            configs[f'GRPO-RM corrected: {label}, inverse_odds raw ({args.rewards}, inner_steps='
                    f'{k})'] = c.demo_config(args.config, corrected, lr=args.lr)
            configs[f'GRPO-RM corrected: {label}, inverse_odds mean-normalised ({args.rewards}, '
                    f'inner_steps={k})'] = c.demo_config(
                args.config, dict(rewards, query_weighting='inverse_odds'), lr=args.lr)
            corrected_mean = dict(rewards, query_weighting='inverse_odds')
            for k in args.dual_inner_steps:
                for kind, loss in (('default: dual_clip', rewards),
                                   ('corrected: dual_clip, inverse_odds raw', corrected),
                                   ('corrected: dual_clip, inverse_odds mean-normalised',
                                    corrected_mean)):
                    configs[f'GRPO-RM {kind} ({args.rewards}, inner_steps={k})'] = c.demo_config(
                        args.config, dict(loss, surrogate='dual_clip'), k, args.lr)
        built = {name: c.build(cfg, args.seed) for name, cfg in configs.items()}
        for model, _ in built.values():
            a.assert_same_head(built['CE'][0], model)

        def evaluate_at(it: int) -> bool:
            return it <= args.dense_until or bool(args.eval_every and it % args.eval_every == 0)

        runs = [a.train_head(model, wrapper, train_x, train_y, test_x, test_y, args.iters,
                             args.batch_size, args.seed, evaluate_at, name,
                             repeats=repeats.get(name, 1))
                for name, (model, wrapper) in built.items()]
        ce = runs[0]
        target = ce.curve[-1][1]

        print(f'\nCE final test top-1 (iteration {args.iters}): {target:.2f}%')
        print('\n| method | final top-1 % | best top-1 % (iteration) | '
              + ' | '.join(f'iterations to {f:g} x CE final ({f * target:.2f}%)'
                           for f in args.fractions)
              + ' | train s | ms / iteration | eval s |')
        print('|---|---:|---:|' + '---:|' * len(args.fractions) + '---:|---:|---:|')
        for run in runs:
            best_it, best = max(run.curve, key=lambda p: (p[1], -p[0]))
            reach = []
            for f in args.fractions:
                it = first_reaching(run, f * target)
                reach.append('not reached' if it is None else str(it))
            print(f'| {run.name} | {run.curve[-1][1]:.2f} | {best:.2f} ({best_it}) | '
                  + ' | '.join(reach)
                  + f' | {run.seconds:.1f} | {run.seconds / args.iters * 1e3:.1f} | '
                    f'{run.eval_seconds:.1f} |')
        print(f'\n(test top-1 at iteration 0 (chance) and after every iteration up to '
              f'{args.dense_until}, then every {args.eval_every}; train s and ms / iteration '
              f'exclude these test evaluations, eval s is their time)')
        for run in runs[1:]:
            for f in args.fractions:
                it_ce, it = first_reaching(ce, f * target), first_reaching(run, f * target)
                if it_ce and it:
                    print(f'{run.name} / CE iterations to {f:g} x CE final: {it}/{it_ce} = '
                          f'{it / it_ce:.2f}')
        by_name = {run.name: run for run in runs}
        print('\nsame optimizer steps per batch (inner steps k vs CE with k steps per batch), '
              'iterations to 1 x CE final:')
        for run in runs:
            k = getattr(built[run.name][1], 'inner_steps', 1)
            fair = by_name.get(f'CE, {k} steps per batch') if k > 1 else None
            if 'GRPO-RM' in run.name and fair is not None:
                it, it_ce = first_reaching(run, target), first_reaching(fair, target)
                print(f'  {run.name}: {it or "not reached"} vs {fair.name}: '
                      f'{it_ce or "not reached"}')

        plot_path = Path(args.plot)
        plot(runs, target, plot_path,
             f'Fashion-MNIST 64 px ({len(train_x)} train / {len(test_x)} test), frozen '
             f'EfficientNet-Lite0 features\nMLP head {a.mlp().replace("->", "-")}, batch '
             f'{args.batch_size}, Adam {args.lr:g}, seed {args.seed}',
             f'iteration (batch {args.batch_size})')
        csv_path = plot_path.with_suffix('.csv')
        with open(csv_path, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['iteration'] + [run.name for run in runs])
            for rows in zip(*(run.curve for run in runs)):
                writer.writerow([rows[0][0]] + [f'{acc:.2f}' for _, acc in rows])
        print(f'\ncurves: {c.relative(plot_path)} and {c.relative(csv_path)}')
        print(f'# total {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
    main()
