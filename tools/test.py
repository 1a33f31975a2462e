"""Test a checkpoint with an mmpretrain or mmseg config and print the metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out PATH] [--show-dir DIR]
                         [--cfg-options k=v ...] [--launcher pytorch]

mmseg configs print aAcc, mIoU and a per-class IoU/Acc table; ``--out DIR`` writes the predicted
label maps as Pascal-VOC-palette PNGs. mmpretrain configs print their metrics; ``--out FILE.pkl``
dumps the predictions.
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
    load_config,
    parse_launch_args,  # noqa: E402
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--out', help='mmseg: folder for VOC-palette PNG predictions; '
                        'mmpretrain: .pkl file for the predictions')
    parser.add_argument('--show-dir', help='mmseg: folder for painted predictions')
    add_launch_args(parser)
    return parse_launch_args(parser)


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir,
                      checkpoint=args.checkpoint)
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        cfg.setdefault('custom_hooks', [])
        if args.out:
            cfg.custom_hooks.append(dict(type='SegPalettePredictionHook', out_dir=args.out))
        if args.show_dir:
            cfg.default_hooks.visualization.update(draw=True, interval=1)
            cfg.visualizer.save_dir = args.show_dir
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [
            cfg.test_evaluator]
        for evaluator in evaluators:
            if evaluator.get('type') in ('IoUMetric', 'mmseg.IoUMetric'):
                evaluator.setdefault('iou_metrics', ['mIoU'])
    elif args.out:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out {args.out!r}: mmpretrain predictions are dumped to a .pkl')
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [
            cfg.test_evaluator]
        cfg.test_evaluator = evaluators + [dict(type='DumpResults', out_file_path=args.out)]
    with checkpoint_trust(cfg):  # --cfg-options trusted_checkpoints=True: legacy files
        runner = build_runner(cfg)
        runner.test()


if __name__ == '__main__':
    main()
