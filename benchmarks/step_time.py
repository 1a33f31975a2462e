"""Train-step time of GRPO-RM vs cross-entropy on the same model and batch.

Full step: ``model.train_step(data, optim_wrapper)`` of the demo model (frozen ImageNet
EfficientNet-Lite0 + MLP head 1280 -> 256 -> 10) on one real Fashion-MNIST batch at 64 px, with
``GRPOOptimWrapper(inner_steps=k)`` (GRPO-RM) vs the CE config's own wrapper
(``GRPOOptimWrapper(inner_steps=1)``, the parent's behaviour), Adam. Head-only step: the
same from precomputed backbone features (``head.loss`` + ``parse_losses`` + ``update_params``),
which isolates the head's share. All timed functions are interleaved (A, B, ..., then reversed)
in one run; medians of wall and process-CPU time and the ratios of the medians are printed.
A forward hook counts backbone forwards per step: inner steps must not rerun the backbone.

Segmentation head-only step: the demo segmentation model (``configs/demo/fashion_voc_grpo_rm.py``
vs ``fashion_voc_ce.py``: frozen EfficientNet-Lite0 strides 4/8/16, ``GRPORMSegHead``
176 -> 64 -> 11) on one batch of real Fashion-MNIST canvases (64 x 64 labels with the 255 ring),
from the frozen backbone's features computed once: ``decode_head.loss`` + ``parse_losses`` +
``update_params``. GRPO-RM runs with one inner step (the loss's own cost next to CE) and with
the config's ``inner_steps`` (what a training iteration of that config costs: each inner step
is one more head forward + loss + backward + optimizer step on the cached batch).

    .venv/bin/python benchmarks/step_time.py [--batch-size 256] [--reps 15] [--head-reps 60]
        [--seg-batch-size 32] [--seg-reps 40]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import ablation
import common as c
import torch
from mmengine.dataset import pseudo_collate

TARGET = 1.03  # GRPO-RM (inner_steps=1) / CE step time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_common_args(parser, str(c.RESULTS / 'step_time.txt'))
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--reps', type=int, default=15,
                        help='timed repetitions of each full step (default %(default)s)')
    parser.add_argument('--head-reps', type=int, default=60,
                        help='timed repetitions of each head-only step (default %(default)s)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--inner-steps', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--seed', type=int, default=0, help='head initialisation')
    parser.add_argument('--seg-batch-size', type=int, default=32,
                        help='segmentation canvases per step (the demo config: 32)')
    parser.add_argument('--seg-reps', type=int, default=40,
                        help='timed repetitions of each segmentation head-only step')
    return parser.parse_args()


SEG_CONFIGS = {'CE': 'configs/demo/fashion_voc_ce.py',
               'GRPO-RM': 'configs/demo/fashion_voc_grpo_rm.py'}


def seg_head_steps(data_dir: Path, batch_size: int, seed: int) -> dict:
    """``{name: step function}`` of the demo segmentation models' head-only training step on
    the frozen backbone's features of one real batch, and a description of the batch."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS, MODELS

    from tools.dataset_converters.fashion_voc import prepare_fashion_voc

    voc = prepare_fashion_voc(data_dir / 'fashion_voc_step_time', data_dir / 'fashion_mnist',
                              n_train=batch_size, n_val=1)
    os.environ['GRPO_RM_DEMO_DATA'] = str(data_dir)  # the configs' weights path
    models, wrappers = {}, {}
    with DefaultScope.overwrite_default_scope('mmseg'):
        grpo_cfg = Config.fromfile(str(c.REPO / SEG_CONFIGS['GRPO-RM']))
        k_config = int(grpo_cfg.optim_wrapper.get('inner_steps', 1))
        runs = {'CE': (SEG_CONFIGS['CE'], None), 'GRPO-RM k=1': (SEG_CONFIGS['GRPO-RM'], 1)}
        if k_config > 1:
            runs[f'GRPO-RM k={k_config} (config)'] = (SEG_CONFIGS['GRPO-RM'], k_config)
        for name, (path, k) in runs.items():
            cfg = Config.fromfile(str(c.REPO / path))
            if k is not None:
                cfg.optim_wrapper.inner_steps = k
            c.seed_everything(seed)
            models[name] = MODELS.build(cfg.model)
            models[name].init_weights()
            models[name].train()
            wrappers[name] = build_optim_wrapper(models[name], cfg.optim_wrapper)
        ds_cfg = cfg.train_dataloader.dataset
        ds_cfg.data_root = str(voc)
        ds = DATASETS.build(ds_cfg)
        batch = pseudo_collate([ds[i] for i in range(batch_size)])
    ce = models['CE'].decode_head
    grpo = models['GRPO-RM k=1'].decode_head
    for name, model in models.items():
        for a, b in zip(ce.state_dict().values(), model.decode_head.state_dict().values()):
            if not torch.equal(a, b):
                raise AssertionError(f'the segmentation head of {name} does not start from '
                                     f'the weights of the CE head')
    with torch.no_grad():
        data = models['CE'].data_preprocessor(batch, True)
        feats = models['CE'].extract_feat(data['inputs'])
    samples = data['data_samples']

    def step(name: str):
        model, wrapper = models[name], wrappers[name]

        def run() -> None:
            with wrapper.optim_context(model):
                losses = model.decode_head.loss(feats, samples, model.train_cfg)
            parsed, _ = model.parse_losses(losses)
            wrapper.update_params(parsed)

        return run

    labels = torch.stack([s.gt_sem_seg.data for s in samples])
    desc = (f'{batch_size} real Fashion-MNIST canvases, labels {tuple(labels.shape[-2:])} '
            f'({float((labels == 255).float().mean()) * 100:.1f} % ignored), features '
            f'{[tuple(f.shape[1:]) for f in feats]}, head '
            f'{sum(p.numel() for p in grpo.parameters() if p.requires_grad)} trainable '
            f'parameters, wrappers {[type(w).__name__ for w in wrappers.values()]}')
    inner = {name: getattr(w, 'inner_steps', 1) for name, w in wrappers.items()}
    return dict(steps={name: step(name) for name in models}, desc=desc, inner=inner,
                wrappers={name: type(w).__name__ for name, w in wrappers.items()})


class ForwardCounter:
    """Counts forward calls of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def table(title: str, rows: list[tuple[str, str, c.Timings, str]], base: str) -> None:
    """Markdown table of median times and ratios against the row named ``base``."""
    ref = next(t for name, _, t, _ in rows if name == base)
    print(f'\n### {title}\n')
    print('| step | optim wrapper | median wall ms | median CPU ms | wall ratio / CE '
          '| CPU ratio / CE | backbone fwd / step |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for name, wrapper, t, fwd in rows:
        print(f'| {name} | {wrapper} | {t.wall_median * 1e3:.1f} | {t.cpu_median * 1e3:.1f} | '
              f'{t.wall_median / ref.wall_median:.3f} | {t.cpu_median / ref.cpu_median:.3f} | '
              f'{fwd} |')


def main() -> None:
    args = parse_args()
    c.setup(args.threads)
    with c.tee_stdout(args.out):
        t_start = time.perf_counter()
        c.print_header('train-step time, GRPO-RM / CE')
        data_dir = c.prepare_demo(args.data_dir)
        ds = ablation.dataset(c.demo_config(c.CONFIGS['ce']), False)
        data = pseudo_collate([ds[i] for i in ablation.train_order()[:args.batch_size]])
        methods = [('CE', 'ce', 1)] + [(f'GRPO-RM k={k}', 'grpo', k) for k in args.inner_steps]
        models, wrappers, counters = {}, {}, {}
        for name, method, k in methods:
            models[name], wrappers[name] = c.build(
                c.demo_config(c.CONFIGS[method], inner_steps=k, lr=args.lr), args.seed)
            models[name].train()
            counters[name] = ForwardCounter(models[name].backbone)
        for name in models:
            ablation.assert_same_head(models['CE'], models[name])
        print(f'# batch: {args.batch_size} real Fashion-MNIST train images, '
              f'{"x".join(map(str, data["inputs"][0].shape))} after Resize + GrayToRGB; Adam lr '
              f'{args.lr}; '
              f'{sum(p.numel() for p in models["CE"].head.parameters())} trainable head '
              f'parameters, {sum(p.numel() for p in models["CE"].backbone.parameters())} frozen '
              f'backbone parameters')

        ce = models['CE']
        with torch.no_grad():
            inputs = ce.data_preprocessor(data, False)['inputs']
        feats = ce.extract_feat(inputs)[-1]
        samples = data['data_samples']

        def full(name: str):
            return lambda: models[name].train_step(data, wrappers[name])

        def head(name: str):
            return lambda: ablation.head_train_step(models[name], feats, samples, wrappers[name])

        probe = c.build(c.demo_config(c.CONFIGS['ce']), args.seed)[0]  # uncounted backbone
        probe.train()

        def backbone_only() -> None:
            with torch.no_grad():
                probe.extract_feat(probe.data_preprocessor(data, True)['inputs'])

        fns = {name: full(name) for name in models}
        fns['backbone only'] = backbone_only
        for counter in counters.values():
            counter.calls = 0
        full_t = c.interleaved(fns, args.reps, args.warmup, desc='full steps')
        n_steps = args.warmup + args.reps
        fwd = {name: f'{counters[name].calls / n_steps:g}' for name in models}
        for counter in counters.values():
            counter.calls = 0
        head_t = c.interleaved({name: head(name) for name in models}, args.head_reps,
                               args.warmup, desc='head-only steps')
        head_fwd = {name: f'{counters[name].calls / (args.warmup + args.head_reps):g}'
                    for name in models}

        def wrapper_name(name: str) -> str:
            return f'{type(wrappers[name]).__name__}(inner_steps={wrappers[name].inner_steps})'

        rows = [(name, wrapper_name(name), full_t[name], fwd[name]) for name, _, _ in methods]
        rows.append(('frozen backbone only (preprocess + forward, no_grad)', '-',
                     full_t['backbone only'], '1'))
        table(f'Full step: model.train_step(data, optim_wrapper), batch {args.batch_size}, '
              f'{args.reps} interleaved repetitions each', rows, 'CE')
        table(f'Head-only step: precomputed features (head.loss + parse_losses + '
              f'update_params), batch {args.batch_size}, {args.head_reps} interleaved '
              f'repetitions each',
              [(name, wrapper_name(name), head_t[name], head_fwd[name])
               for name, _, _ in methods], 'CE')

        ce_full, ce_head = full_t['CE'], head_t['CE']
        bb = full_t['backbone only']
        print(f'\nfrozen backbone share of the CE full step: '
              f'{bb.wall_median / ce_full.wall_median * 100:.0f}% (wall), '
              f'{bb.cpu_median / ce_full.cpu_median * 100:.0f}% (CPU)')
        for name, _, k in methods[1:]:
            extra_wall = full_t[name].wall_median - ce_full.wall_median
            extra_head = head_t[name].wall_median - ce_head.wall_median
            line = (f'{name}: full step {extra_wall * 1e3:+.1f} ms vs CE (head-only '
                    f'{extra_head * 1e3:+.1f} ms)')
            if k > 1:
                rerun = (ce_full.wall_median + (k - 1) * (bb.wall_median + head_t[name].wall_median
                                                          / k)) / ce_full.wall_median
                line += (f'; had each inner step rerun the backbone, the full-step ratio would '
                         f'be about {rerun:.2f}')
            print(line)
        seg = seg_head_steps(data_dir, args.seg_batch_size, args.seed)
        seg_t = c.interleaved(seg['steps'], args.seg_reps, args.warmup,
                              desc='segmentation head-only steps')
        print(f'\n# segmentation: {seg["desc"]}')
        table(f'Segmentation head-only step: demo seg model (GRPORMSegHead 176 -> 64 -> 11), '
              f'cached frozen-backbone features (decode_head.loss + parse_losses + '
              f'update_params), batch {args.seg_batch_size}, {args.seg_reps} interleaved '
              f'repetitions each',
              [(name, f'{seg["wrappers"][name]}(inner_steps={seg["inner"][name]})',
                seg_t[name], '0') for name in seg['steps']], 'CE')
        for name in seg['steps']:
            k = seg['inner'][name]
            if name != 'CE' and k > 1:
                per = seg_t[name].wall_median / k / seg_t['CE'].wall_median
                print(f'{name}: {k} optimizer steps per batch; per optimizer step '
                      f'{per:.3f} x the CE step (wall)')
        k1 = 'GRPO-RM k=1'
        if k1 in full_t:
            wall = full_t[k1].wall_median / ce_full.wall_median
            cpu = full_t[k1].cpu_median / ce_full.cpu_median
            verdict = 'PASS' if max(wall, cpu) <= TARGET else 'FAIL'
            print(f'\ntarget: full-step ratio GRPO-RM(inner_steps=1) / CE <= {TARGET}: '
                  f'wall {wall:.3f}, CPU {cpu:.3f} -> {verdict}')
        wall = seg_t['GRPO-RM k=1'].wall_median / seg_t['CE'].wall_median
        cpu = seg_t['GRPO-RM k=1'].cpu_median / seg_t['CE'].cpu_median
        verdict = 'PASS' if max(wall, cpu) <= TARGET else 'FAIL'
        print(f'target: segmentation head-only step ratio GRPO-RM(inner_steps=1) / CE <= '
              f'{TARGET}: wall {wall:.3f}, CPU {cpu:.3f} -> {verdict}')
        print(f'# total {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
    main()
