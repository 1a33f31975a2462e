"""Frozen-feature cache: run a frozen backbone once per distinct input (plain torch).

Entries are keyed by the content of each preprocessed input sample (a BLAKE2 digest of its bytes,
dtype and shape), so a cached value is only ever returned for the very same input: with a
deterministic pipeline every epoch after the first is served from the cache; with random
augmentation the inputs differ and are simply computed (correct, just not faster).

Exactness: on a hit the stored features are the ones the backbone produced for this sample
earlier. CPU/GPU kernels may round differently for different batch compositions (about 1e-7
here), so training from the cache is bit-identical to training without it when batches are
composed the same way (e.g. an unshuffled sampler) and agrees to float round-off otherwise.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable

import torch


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hex digest of named tensors (e.g. a frozen backbone's ``state_dict().items()``): a cache
    file is only reused for the very same weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        h.update(name.encode())
        h.update(sample_key(t))
    return h.hexdigest()


def sample_key(sample: torch.Tensor) -> bytes:
    """16-byte digest of one sample's dtype, shape and bytes."""
    data = sample.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f'{data.dtype}{tuple(data.shape)}'.encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b'')
    return h.digest()


class FeatureCache:
    """Content-keyed cache of per-sample features ``f(x)`` for a frozen ``f``.

    ``features(inputs, fn)`` returns ``fn`` applied to the batch ``inputs`` (N, ...), computing
    ``fn`` only on the samples not seen before (one call on the sub-batch of misses). ``fn``
    must map (M, ...) -> a tensor or a tuple/list of tensors with first dimension M.

    Args:
        max_items: stop adding entries beyond this many (lookups continue); None = unbounded.
        device: where entries are stored ('cpu' keeps GPU memory free).
    """

    def __init__(self, max_items: int | None = None, device: str | torch.device = 'cpu') -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f'max_items must be >= 1 or None, got {max_items}')
        self.max_items = max_items
        self.device = torch.device(device)
        self._store: dict[bytes, tuple[torch.Tensor, ...]] = {}
        self._is_tuple: bool | None = None
        self._saved_len = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self._is_tuple = None
        self._saved_len = 0
        self.hits = self.misses = 0

    @property
    def dirty(self) -> bool:
        """Whether entries were added since the last :meth:`save`/:meth:`load`."""
        return self._saved_len != len(self._store)

    def save(self, path: str, weights_fingerprint: str) -> None:
        """Write the entries to ``path`` (atomically), tagged with ``weights_fingerprint``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}'
        torch.save({'fingerprint': weights_fingerprint, 'is_tuple': self._is_tuple,
                    'keys': list(self._store), 'values': list(self._store.values())}, tmp)
        os.replace(tmp, path)
        self._saved_len = len(self._store)

    def load(self, path: str, weights_fingerprint: str) -> bool:
        """Add the entries of ``path`` if it exists and was written for the same weights.

        Returns whether anything was loaded. The file holds only tensors, bytes and strings and
        is read with ``weights_only=True``.
        """
        if not os.path.isfile(path):
            return False
        data = torch.load(path, map_location=self.device, weights_only=True)
        if data.get('fingerprint') != weights_fingerprint:
            return False
        for key, value in zip(data['keys'], data['values']):
            self._store.setdefault(key, tuple(value))
        if self._store:
            self._is_tuple = data['is_tuple']
        self._saved_len = len(self._store)
        return True

    def features(self, inputs: torch.Tensor, fn: Callable[[torch.Tensor], object]):
        """``fn(inputs)``, served per sample from the cache where possible."""
        keys = [sample_key(x) for x in inputs]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        computed: dict[int, tuple[torch.Tensor, ...]] = {}
        if missing:
            out = fn(inputs[missing] if len(missing) < len(keys) else inputs)
            is_tuple = isinstance(out, (tuple, list))
            if self._is_tuple is not None and is_tuple != self._is_tuple:
                raise TypeError('fn returned a different structure than before; clear() first')
            self._is_tuple = is_tuple
            parts = tuple(out) if is_tuple else (out, )
            for j, i in enumerate(missing):
                row = tuple(p[j].detach() for p in parts)
                computed[i] = row
                if self.max_items is None or len(self._store) < self.max_items:
                    self._store[keys[i]] = tuple(r.to(self.device) for r in row)
        rows = [computed[i] if i in computed else self._store[k] for i, k in enumerate(keys)]
        target = inputs.device
        stacked = tuple(torch.stack([r[p] for r in rows]).to(target)
                        for p in range(len(rows[0])))
        return stacked if self._is_tuple else stacked[0]
