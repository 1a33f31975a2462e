"""Test one checkpoint on several test sets with the same label space and print one table.

    python tools/test_ood.py CONFIG CHECKPOINT [--sets NAME ...] [--no-id] [--out RESULTS.json]
                             [--baseline BASELINE.json] [--evaluator {ood,test}]
                             [--work-dir DIR] [--cfg-options k=v ...] [--launcher pytorch]

The sets are the config's ``ood_test_sets`` (name -> dataset config; without a ``pipeline`` a set
uses the one of ``test_dataloader``) plus, unless ``--no-id``, the config's own test set (row
``in-distribution``, left out of the ``OOD average`` row). Metrics: the config's
``ood_evaluator`` (default top-1 Accuracy), or its ``test_evaluator`` with ``--evaluator test``.

GRPO-RM vs cross-entropy: run the baseline first with ``--out ce.json``, then the GRPO-RM
checkpoint with ``--baseline ce.json``; the table gets the baseline values and the gains.
"""
import argparse
import json
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
from grpo_rm_mm.evaluation import ood  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Out-of-distribution test of a checkpoint')
    parser.add_argument('config', help='config file (with ood_test_sets)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--sets', nargs='+', help='only these ood_test_sets (default: all)')
    parser.add_argument('--no-id', action='store_true',
                        help='leave out the in-distribution test set')
    parser.add_argument('--evaluator', choices=['ood', 'test'], default='ood',
                        help='ood: the config\'s ood_evaluator (default top-1 Accuracy); '
                        'test: its test_evaluator (kNN/SR too)')
    parser.add_argument('--out', help='write the results (set -> metrics) to this .json')
    parser.add_argument('--baseline', help='results .json of a baseline (e.g. the '
                        'cross-entropy model) to compare with')
    parser.add_argument('--work-dir', help='the dir to save logs')
    add_launch_args(parser)
    return parse_launch_args(parser)


def main() -> None:
    args = parse_args()
    baseline = ood.load_results(args.baseline) if args.baseline else None
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir,
                      checkpoint=args.checkpoint)
    loaders = ood.ood_sets(cfg, args.sets, include_id=not args.no_id)
    if args.evaluator == 'ood':
        evaluator = cfg.get('ood_evaluator') or dict(type='Accuracy', topk=(1, ))
    else:
        evaluator = cfg.test_evaluator
    with checkpoint_trust(cfg):  # --cfg-options trusted_checkpoints=True: legacy files
        runner = build_runner(cfg)
        results = ood.summarize(ood.run_ood(runner, loaders, evaluator))
    table = ood.format_table(results, baseline)
    if runner.rank != 0:
        return
    print(f'Out-of-distribution results of {args.checkpoint} ({args.config}):\n{table}',
          flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
