"""Checkpoints as plain data: what ``torch.load(path, weights_only=True)`` reads.

mmengine 0.10.7 writes its logging state into every checkpoint as Python objects: the message
hub's ``log_scalars`` are ``mmengine.logging.HistoryBuffer`` instances (holding numpy arrays),
and numpy scalars appear in ``meta`` (e.g. a ``best_score`` of ``CheckpointHook``). torch >= 2.6
loads with ``weights_only=True`` by default and refuses such files (upstream mmengine issue
1655: ``mmseg.apis.init_model`` fails on them), so loading them needs ``weights_only=False``,
which runs whatever the pickle says.

:func:`to_plain` turns a checkpoint dict into containers, numbers, strings and tensors only:

- ``HistoryBuffer`` -> ``{PLAIN_TAG: 'HistoryBuffer', 'log_history': Tensor (L,),
  'count_history': Tensor (L,), 'max_length': int}`` (the arrays keep their dtype);
- ``numpy.ndarray`` -> ``{PLAIN_TAG: 'ndarray', 'data': Tensor}`` (numeric and bool dtypes) or
  ``{PLAIN_TAG: 'ndarray', 'list': [...], 'dtype': str}`` (anything else);
- numpy scalars -> Python numbers (``.item()``: the same value);
- dict subclasses (e.g. ``ConfigDict``) -> ``dict``, ``OrderedDict`` kept, namedtuples ->
  tuples.

:func:`from_plain` is the inverse (tagged dicts become ``HistoryBuffer`` / arrays again), so
``--resume`` restores the logging state exactly. :func:`load_checkpoint_file` is the one local
loader of the project: ``weights_only=True`` always; a file that pickles other objects (a legacy
mmengine checkpoint, or anything hostile) is refused with :class:`UntrustedCheckpointError`,
which names the explicit opt-in, unless the caller is inside
:func:`grpo_rm_mm.trusted_checkpoints`.
"""
from __future__ import annotations

import contextlib
import contextvars
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ['PLAIN_TAG', 'UntrustedCheckpointError', 'checkpoint_trusted', 'from_plain',
           'load_checkpoint_file', 'to_plain', 'trusted_checkpoints']

_TRUSTED = contextvars.ContextVar('grpo_rm_trusted_checkpoint', default=False)

#: Key marking a dict that :func:`from_plain` turns back into an object.
PLAIN_TAG = '__grpo_rm_plain__'

# what the weights-only unpickler accepts as leaves (besides tensors and containers)
_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype,
           torch.device)

OPT_IN = ('If you trust the file (e.g. you wrote it with mmengine yourself), opt in explicitly: '
          'in Python, load it inside `with grpo_rm_mm.trusted_checkpoints(): ...`; with '
          'tools/train.py, tools/test.py or tools/test_ood.py, pass '
          '`--cfg-options trusted_checkpoints=True`. Then it is read with weights_only=False '
          '(its pickle runs), and checkpoints written from then on are plain data.')


class UntrustedCheckpointError(pickle.UnpicklingError, RuntimeError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses, outside a trusted context.

    A ``pickle.UnpicklingError`` (what torch raises for such files) and a ``RuntimeError`` (what
    the other unreadable-checkpoint errors of :func:`grpo_rm_mm.engine.guards.check_checkpoint_file`
    are), so existing handlers keep working; the message names the file and the opt-in.
    """


def _array_to_plain(arr: np.ndarray) -> dict:
    if arr.dtype.kind in 'biuf' and arr.dtype.byteorder in '=|<':
        return {PLAIN_TAG: 'ndarray', 'data': torch.from_numpy(np.ascontiguousarray(arr).copy())}
    return {PLAIN_TAG: 'ndarray', 'list': to_plain(arr.tolist()), 'dtype': arr.dtype.str}


def to_plain(obj: Any, _path: str = 'checkpoint') -> Any:
    """``obj`` with every non-plain value converted (see the module docstring); a new object,
    ``obj`` itself is not modified. Unknown objects are kept, with a warning naming where they
    are (the file then needs the trusted opt-in to load)."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, np.generic):  # first: numpy.float64 is also a Python float
        return obj.item()
    if torch.is_tensor(obj) or type(obj) in _LEAVES:
        return obj
    for base in (bool, int, float, complex, str, bytes):
        if isinstance(obj, base):  # a subclass (e.g. an IntEnum member): its plain value
            return base(obj)
    if isinstance(obj, HistoryBuffer):
        return {PLAIN_TAG: 'HistoryBuffer',
                'log_history': _array_to_plain(np.asarray(obj._log_history)),
                'count_history': _array_to_plain(np.asarray(obj._count_history)),
                'max_length': int(obj.max_length)}
    if isinstance(obj, np.ndarray):
        return _array_to_plain(obj)
    if isinstance(obj, dict):
        items = ((to_plain(k, f'{_path} key'), to_plain(v, f'{_path}.{k}'))
                 for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        values = [to_plain(v, f'{_path}[{i}]') for i, v in enumerate(obj)]
        return values if isinstance(obj, list) else tuple(values)
    warnings.warn(f'{_path} holds a {type(obj).__module__}.{type(obj).__qualname__}, which '
                  f'torch.load(weights_only=True) cannot read; the checkpoint will need '
                  f'grpo_rm_mm.trusted_checkpoints() to load. Store plain data (numbers, '
                  f'strings, tensors, dicts, lists) there instead.', stacklevel=2)
    return obj


def _array_from_plain(d: dict) -> np.ndarray:
    if 'data' in d:
        return d['data'].numpy()
    return np.array(from_plain(d['list']), dtype=np.dtype(d['dtype']))


def from_plain(obj: Any) -> Any:
    """The inverse of :func:`to_plain`: tagged dicts become ``HistoryBuffer`` / numpy arrays."""
    if isinstance(obj, dict):
        kind = obj.get(PLAIN_TAG)
        if kind == 'HistoryBuffer':
            from mmengine.logging import HistoryBuffer
            return HistoryBuffer(_array_from_plain(obj['log_history']),
                                 _array_from_plain(obj['count_history']),
                                 max_length=obj['max_length'])
        if kind == 'ndarray':
            return _array_from_plain(obj)
        items = ((k, from_plain(v)) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


@contextlib.contextmanager
def trusted_checkpoints() -> Iterator[None]:
    """The explicit opt-in for checkpoints that pickle Python objects.

    Outside this context every local checkpoint is read with ``weights_only=True`` (see
    :func:`grpo_rm_mm.compat.patch_plain_checkpoints`): this project's own checkpoints are
    plain data and load that way. A legacy file that pickles objects (e.g. one written by
    mmengine without grpo_rm_mm, whose logging state holds ``HistoryBuffer`` objects) is
    refused with an error naming this context. Inside it, such a file is read with
    ``weights_only=False``: use it only for files you trust, since unpickling can run code.
    ``--cfg-options trusted_checkpoints=True`` does the same for ``tools/train.py``,
    ``tools/test.py`` and ``tools/test_ood.py``.
    """
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def checkpoint_trusted() -> bool:
    """Whether the current context trusts local checkpoints (see :func:`trusted_checkpoints`)."""
    return _TRUSTED.get()


def load_checkpoint_file(filename: str, map_location: Any = None) -> Any:
    """``torch.load(filename, weights_only=True)``, then :func:`from_plain`.

    Raises:
        UntrustedCheckpointError: the file pickles objects the weights-only unpickler refuses
            (e.g. mmengine's ``HistoryBuffer`` in a checkpoint written without grpo_rm_mm) and
            :func:`grpo_rm_mm.trusted_checkpoints` is not active. Inside it, such a file is
            read with ``weights_only=False``.
    """
    try:
        return from_plain(torch.load(filename, map_location=map_location, weights_only=True))
    except pickle.UnpicklingError as err:
        if 'weights only' not in str(err).lower():
            raise
        if checkpoint_trusted():
            return from_plain(torch.load(filename, map_location=map_location,
                                         weights_only=False))
        first = next((line for line in str(err).splitlines() if 'GLOBAL' in line
                      or 'global' in line), str(err).splitlines()[0])
        raise UntrustedCheckpointError(
            f'{filename}: Weights only load failed: torch.load(weights_only=True) refuses this '
            f'checkpoint ({first.strip()}). It pickles Python objects, as checkpoints written '
            f'by mmengine without grpo_rm_mm do (their logging state holds HistoryBuffer '
            f'objects), and unpickling them can run arbitrary code. {OPT_IN}') from err
