"""Segmentation demo ablation: mIoU of GRPO-RM objective candidates next to cross-entropy.

The segmentation task of ``tools/demo.py`` (real Fashion-MNIST items composited on 64-px
canvases, written as a Pascal VOC folder; frozen ImageNet EfficientNet-Lite0 stride 4/8/16
features; ``GRPORMSegHead`` 176 -> 64 -> 11; Adam 1e-2, 200 iterations of batch 32), trained
with ``tools/train.py`` and scored with ``tools/test.py`` for every candidate objective and
seed (the metrics are read from the test run's metrics file). Two data splits:

- ``select``: canvases drawn with another seed (``prepare_fashion_voc(seed=1)``), used to choose
  the segmentation default;
- ``test``: the demo's own canvases (seed 0), reported.

    .venv/bin/python benchmarks/seg_ablation.py --split select [--seeds 0 1 2]
    .venv/bin/python benchmarks/seg_ablation.py --split test --candidates ce uniform pi_old
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))

import common as c  # noqa: E402

from tools.demo import seg_metrics  # noqa: E402  (the repository is on sys.path via common)

GRPO_CONFIG = 'configs/demo/fashion_voc_grpo_rm.py'
CE_CONFIG = 'configs/demo/fashion_voc_ce.py'
LOSS = 'model.decode_head.loss_decode'
#: name -> (config, cfg-options of the loss and the optimizer wrapper)
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    'ce': (CE_CONFIG, []),
    'uniform': (GRPO_CONFIG, [f'{LOSS}.group_weighting=uniform']),
    'pi_old': (GRPO_CONFIG, [f'{LOSS}.group_weighting=pi_old']),
    'pi_old_drgrpo': (GRPO_CONFIG, [f'{LOSS}.group_weighting=pi_old', f'{LOSS}.adv_scale=none']),
    'pi_old_k4_dual': (GRPO_CONFIG, [f'{LOSS}.group_weighting=pi_old',
                                     f'{LOSS}.surrogate=dual_clip', 'optim_wrapper.inner_steps=4']),
    'sampled': (GRPO_CONFIG, [f'{LOSS}.group_weighting=sampled']),
}
METRICS = ('mIoU', 'aAcc', 'mAcc')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--split', choices=('select', 'test'), default='select')
    parser.add_argument('--candidates', nargs='+', choices=list(CANDIDATES),
                        default=list(CANDIDATES))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--iters', type=int, default=200)
    parser.add_argument('--data-dir', default=c.DEFAULT_DATA_DIR)
    parser.add_argument('--work-dir', default='work_dirs/seg_ablation')
    parser.add_argument('--out', default=None,
                        help='copy of the printed output (default: '
                        'benchmarks/results/seg_ablation_<split>.txt)')
    return parser.parse_args()


def prepare(data_dir: Path, split: str) -> Path:
    """The VOC2012 folder of the split (prepared idempotently)."""
    from tools.dataset_converters.fashion_voc import prepare_fashion_voc

    name, seed = ('fashion_voc', 0) if split == 'test' else ('fashion_voc_select', 1)
    return prepare_fashion_voc(data_dir / name, c.prepare_demo(data_dir) / 'fashion_mnist',
                               n_train=1000, n_val=200, seed=seed)


def run_one(config: str, options: list[str], voc: Path, seed: int, iters: int, work: Path,
            env: dict[str, str]) -> tuple[dict[str, float], bool]:
    """Train and test one run; ``(metrics, reused)``: a finished run of the same command in
    ``work`` is reused."""
    opts = [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            f'param_scheduler.0.end={iters}', f'default_hooks.checkpoint.interval={iters}',
            f'randomness.seed={seed}', *options]
    opts += [f'{loader}.dataset.data_root={voc}'
             for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    work.mkdir(parents=True, exist_ok=True)
    done = work / 'options.json'
    if done.is_file() and json.loads(done.read_text()) == [config, *opts]:
        return seg_metrics(work / 'test'), True
    py = sys.executable
    for cmd, log in (([py, 'tools/train.py', config, '--work-dir', str(work),
                       '--cfg-options', *opts], work / 'train.log'),
                     ([py, 'tools/test.py', config, str(work / f'iter_{iters}.pth'),
                       '--work-dir', str(work / 'test'), '--cfg-options', *opts],
                      work / 'test.log')):
        with open(log, 'w') as f:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            sys.exit(f'failed ({proc.returncode}): {" ".join(cmd)}\n{log.read_text()[-3000:]}')
    metrics = seg_metrics(work / 'test')
    done.write_text(json.dumps([config, *opts]))
    return metrics, False


def fmt(values: list[float]) -> str:
    mean, std = c.mean_std(values)
    return f'{mean:.2f} ± {std:.2f}'


def main() -> None:
    args = parse_args()
    out = args.out or str(c.RESULTS / f'seg_ablation_{args.split}.txt')
    data_dir = Path(args.data_dir).resolve()
    env = dict(os.environ, GRPO_RM_DEMO_DATA=str(data_dir), PYTHONUNBUFFERED='1',
               OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
    with c.tee_stdout(out):
        t0 = time.perf_counter()
        c.print_header(f'segmentation demo ablation, split {args.split!r}')
        voc = prepare(data_dir, args.split)
        print(f'# data: {c.relative(voc)} (1000 train / 200 val canvases); {args.iters} '
              f'iterations of batch 32; seeds {args.seeds}')
        results: dict[str, list[dict[str, float]]] = {}
        for name in args.candidates:
            config, options = CANDIDATES[name]
            for seed in args.seeds:
                work = Path(args.work_dir) / args.split / name / f'seed{seed}'
                m, reused = run_one(config, options, voc, seed, args.iters, work, env)
                results.setdefault(name, []).append(m)
                print(f'# {name} seed {seed}: ' + ', '.join(f'{k} {m[k]:.2f}' for k in METRICS)
                      + (' (finished run reused)' if reused else ''),
                      flush=True)
        print(f'\n### {args.split} split: mean ± std over seeds {args.seeds}\n')
        print('| candidate | cfg-options | mIoU | aAcc | mAcc | mIoU - CE |')
        print('|---|---|---:|---:|---:|---:|')
        ce = statistics.fmean(r['mIoU'] for r in results['ce']) if 'ce' in results else None
        for name, runs in results.items():
            opts = ' '.join(CANDIDATES[name][1]) or '(CrossEntropyLoss)'
            miou = [r['mIoU'] for r in runs]
            gap = '-' if ce is None else f'{statistics.fmean(miou) - ce:+.2f}'
            print(f'| {name} | `{opts}` | {fmt(miou)} | {fmt([r["aAcc"] for r in runs])} | '
                  f'{fmt([r["mAcc"] for r in runs])} | {gap} |')
        print(f'# total {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
    main()
