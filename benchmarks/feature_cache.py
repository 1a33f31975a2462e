"""Epoch time with the frozen-feature cache / without it (issue 6, benchmark 2; target >= 20x).

    python benchmarks/feature_cache.py [--data-dir data/demo] [--images 4096] [--epochs 3]

Builds the demo's model and training dataloader from ``configs/demo/fashion_mnist_grpo_rm.py``
(frozen real EfficientNet-Lite0, 64-px real Fashion-MNIST, GRPO-RM head, GRPOOptimWrapper with
the config's inner steps) and times whole training epochs (data loading + preprocessing +
``model.train_step``) of the same images, once with ``feature_cache`` off and once on, for
``--epochs`` + 1 epochs each. With the cache the first epoch fills it; the later ones are the
steady state. Prints the median epoch
times and their ratio, and checks that both runs end with identical head weights.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data-dir', default='data/demo')
    parser.add_argument('--images', type=int, default=4096, help='training images per epoch')
    parser.add_argument('--epochs', type=int, default=3, help='timed epochs per setting')
    parser.add_argument('--batch-size', type=int, default=256)
    return parser.parse_args()


def run(cfg, cached: bool, epochs: int) -> tuple[list[float], dict, object]:
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    from mmpretrain.registry import MODELS

    cfg = copy.deepcopy(cfg)
    cfg.model.feature_cache = cached
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        model.init_weights()
        loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        model.train()
        times = []
        for _ in range(epochs + 1):
            start = time.perf_counter()
            for batch in loader:
                model.train_step(batch, wrapper)
            times.append(time.perf_counter() - start)
    return times, model.head.state_dict(), model.feature_cache


def main() -> None:
    args = parse_args()
    os.environ['GRPO_RM_DEMO_DATA'] = str(Path(args.data_dir).resolve())
    import torch
    from mmengine.config import Config

    import grpo_rm_mm  # noqa: F401
    from tools.dataset_converters import fashion_mnist as demo_data
    print('$ ' + ' '.join([Path(sys.executable).name] + sys.argv))
    data = Path(args.data_dir).resolve()
    demo_data.prepare_fashion_mnist(data / 'fashion_mnist')
    weights = data / 'pretrained' / 'efficientnet_lite0.pth'
    if not weights.is_file():
        import subprocess
        subprocess.run([sys.executable, str(REPO / 'tools/model_converters/'
                                            'efficientnet_lite0_to_mmpretrain.py'),
                        str(weights)], check=True)
    cfg = Config.fromfile(str(REPO / 'configs/demo/fashion_mnist_grpo_rm.py'))
    cfg.train_dataloader.dataset.indices = args.images
    cfg.train_dataloader.batch_size = args.batch_size
    cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=False)
    print(f'# torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.images} '
          f'real Fashion-MNIST images at 64 px per epoch, batch {args.batch_size}, '
          f'inner_steps={cfg.optim_wrapper.inner_steps}, unshuffled (same batches each epoch)')

    # both runs train epochs + 1 epochs on the same batches; with the cache the first one fills it
    plain, plain_head, _ = run(cfg, cached=False, epochs=args.epochs)
    cached, cached_head, cache = run(cfg, cached=True, epochs=args.epochs)
    fill, steady = cached[0], cached[1:]
    same = all(torch.equal(plain_head[k], cached_head[k]) for k in plain_head)
    print('| setting | epoch times (s) | median epoch (s) |\n|---|---|---:|')
    print(f'| no cache | {", ".join(f"{t:.2f}" for t in plain)} | '
          f'{statistics.median(plain):.2f} |')
    print(f'| cache, first epoch (fills it) | {fill:.2f} | - |')
    print(f'| cache, later epochs | {", ".join(f"{t:.2f}" for t in steady)} | '
          f'{statistics.median(steady):.2f} |')
    ratio = statistics.median(plain) / statistics.median(steady)
    print(f'\nepoch time without cache / with cache (steady state): {ratio:.1f}x '
          f'(target >= 20x); first-epoch overhead of filling it: {fill / plain[0]:.2f}x')
    print(f'cache: {len(cache)} entries, {cache.hits} hits, {cache.misses} misses; head weights '
          f'after {args.epochs + 1} epochs identical with and without cache: {same}')


if __name__ == '__main__':
    main()
