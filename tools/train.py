"""Train a model with an mmpretrain or mmseg config (the toolbox is the config's default_scope).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                                 [--auto-scale-lr] [--cfg-options k=v ...] [--launcher pytorch]

Same flags as the toolboxes' own ``tools/train.py``. ``grpo_rm_mm`` is imported first, so its
compatibility patches and components are active even for configs without ``custom_imports``.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import grpo_rm_mm  # noqa: E402,F401  (compatibility patches + registry)
from grpo_rm_mm.engine.launch import (
    add_launch_args,
    build_runner,
    checkpoint_trust,
    enable_amp,
    load_config,
    parse_launch_args,  # noqa: E402
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a GRPO-RM (or any mm*) model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or (no value) from the latest one in the work dir')
    parser.add_argument('--amp', action='store_true', help='enable automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (total batch size / auto_scale_lr.base_batch_size)')
    add_launch_args(parser)
    return parse_launch_args(parser)


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp:
        enable_amp(cfg)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=N)` '
                             'in the config')
        cfg.auto_scale_lr.enable = True
    with checkpoint_trust(cfg):  # --cfg-options trusted_checkpoints=True: legacy files
        runner = build_runner(cfg)
        runner.train()


if __name__ == '__main__':
    main()
