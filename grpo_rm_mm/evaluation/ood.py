"""Out-of-distribution evaluation: one checkpoint, several test sets with the same label space.

Test sets come from the config's ``ood_test_sets`` (name -> dataset config; a set without a
``pipeline`` gets the one of ``test_dataloader``). ``tools/test_ood.py`` runs them all with one
model and prints one table: each set, the in-distribution test set, and the OOD average.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import numpy as np
from mmengine.config import Config
from mmengine.runner import TestLoop

ID_NAME = 'in-distribution'
AVG_NAME = 'OOD average'


def ood_sets(cfg: Config, names: Sequence[str] | None = None,
             include_id: bool = True) -> dict[str, dict]:
    """``{name: dataloader config}`` of the OOD sets (in-distribution test set first)."""
    declared = dict(cfg.get('ood_test_sets') or {})
    if not declared:
        raise ValueError('the config defines no `ood_test_sets`; add '
                         'ood_test_sets = dict(<name>=<dataset config>, ...)')
    unknown = sorted(set(names or ()) - set(declared))
    if unknown:
        raise ValueError(f'unknown OOD set(s) {unknown}; the config has {sorted(declared)}')
    base = cfg.test_dataloader
    out = {}
    if include_id:
        out[ID_NAME] = copy.deepcopy(base)
    for name in names or declared:
        dataset = copy.deepcopy(declared[name])
        dataset.setdefault('pipeline', copy.deepcopy(base.dataset.get('pipeline', [])))
        dataset.setdefault('test_mode', True)
        loader = copy.deepcopy(base)
        loader.dataset = dataset
        out[name] = loader
    return out


def run_ood(runner, loaders: dict[str, dict], evaluator) -> dict[str, dict]:
    """Test ``runner``'s model on every dataloader; returns ``{name: metrics}``.

    The model and checkpoint are loaded once; each set gets a fresh ``TestLoop``.
    """
    results = {}
    for name, loader in loaders.items():
        # Runner has no public setter for its test loop; Runner.test() builds a loop from
        # ``_test_loop`` unless it is one already.
        runner._test_loop = TestLoop(runner, loader, copy.deepcopy(evaluator))
        results[name] = {k: float(v) for k, v in runner.test().items()}
    return results


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Add the ``OOD average`` row: the mean over all sets but the in-distribution one."""
    ood = [m for name, m in results.items() if name not in (ID_NAME, AVG_NAME)]
    out = dict(results)
    if ood:
        keys = [k for k in ood[0] if all(k in m for m in ood)]
        out[AVG_NAME] = {k: float(np.mean([m[k] for m in ood])) for k in keys}
    return out


def format_table(results: dict[str, dict], baseline: dict[str, dict] | None = None,
                 digits: int = 2) -> str:
    """One text table: a row per set, a column per metric; with ``baseline`` (the same
    structure, e.g. the cross-entropy model's results) each metric also gets the baseline
    value and the gain ``this - baseline``."""
    keys = [k for k in next(iter(results.values())) if not k.endswith(('num_train', 'num_test'))]
    compared = {k for m in (baseline or {}).values() for k in m} & set(keys)
    header = ['set']
    for k in keys:
        header += [k] + ([f'{k} (baseline)', f'{k} gain'] if k in compared else [])

    def fmt(v: float | None, sign: str = '') -> str:
        return '-' if v is None else f'{v:{sign}.{digits}f}'

    rows = []
    for name, metrics in results.items():
        row = [name]
        for k in keys:
            v = metrics.get(k)
            row.append(fmt(v))
            if k in compared:
                b = (baseline.get(name) or {}).get(k)
                row += [fmt(b), fmt(None if b is None or v is None else v - b, '+')]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'

    sep = '+-' + '-+-'.join('-' * w for w in widths) + '-+'
    return '\n'.join([sep, line(header), sep] + [line(r) for r in rows] + [sep])


def load_results(path: str) -> dict[str, dict]:
    with open(path) as f:
        return json.load(f)
