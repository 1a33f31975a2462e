"""Epoch time with the frozen-feature cache / without it (target >= 20x).

    .venv/bin/python benchmarks/feature_cache.py [--data-dir data/demo] [--images 4096] [--epochs 3]

Builds the demo's model, training dataloader and optimizer wrapper from
``configs/demo/fashion_mnist_grpo_rm.py`` (frozen real EfficientNet-Lite0, 64-px real
Fashion-MNIST, GRPO-RM head, GRPOOptimWrapper with the config's inner steps) and times whole
training epochs (data loading + preprocessing + ``model.train_step``) of the same images, once
with ``feature_cache`` off and once on, for ``--epochs`` + 1 epochs each. With the cache the
first epoch fills it; the later ones are the steady state. Prints the epoch times, the ratio of
the medians, and whether both runs end with identical head weights.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import common as c
import torch
from mmengine.config import Config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    c.add_common_args(parser, str(c.RESULTS / 'feature_cache.txt'))
    parser.add_argument('--images', type=int, default=4096, help='training images per epoch')
    parser.add_argument('--epochs', type=int, default=3, help='timed epochs per setting')
    parser.add_argument('--batch-size', type=int, default=256)
    return parser.parse_args()


def run(cfg: Config, cached: bool, epochs: int) -> tuple[list[float], dict, object]:
    """Epoch times, final head state and the feature cache of ``epochs + 1`` epochs."""
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    cfg = copy.deepcopy(cfg)
    cfg.model.feature_cache = cached
    model, wrapper = c.build(cfg, seed=0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
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
    c.setup(args.threads)
    with c.tee_stdout(args.out):
        c.print_header('epoch time with / without the frozen-feature cache')
        c.prepare_demo(args.data_dir)
        cfg = c.demo_config(c.CONFIGS['grpo'])
        cfg.train_dataloader.dataset.indices = args.images
        cfg.train_dataloader.batch_size = args.batch_size
        cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=False)
        print(f'# {args.images} real Fashion-MNIST images at 64 px per epoch, batch '
              f'{args.batch_size}, inner_steps={cfg.optim_wrapper.inner_steps}, unshuffled (same '
              f'batches each epoch)')

        # both runs train epochs + 1 epochs on the same batches; with the cache the first fills it
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
        print(f'cache: {len(cache)} entries, {cache.hits} hits, {cache.misses} misses; head '
              f'weights after {args.epochs + 1} epochs identical with and without cache: {same}')


if __name__ == '__main__':
    main()
