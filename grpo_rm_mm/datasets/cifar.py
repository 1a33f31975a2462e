"""CIFAR-10/100 from a local ``cifar-*-batches-py`` folder, without download attempts."""
from __future__ import annotations

import os.path as osp
import pickle

from mmpretrain.datasets import CIFAR10, CIFAR100
from mmpretrain.registry import DATASETS


class _LocalCIFARMixin:
    """Read the python-pickle release from ``data_root``; never download.

    ``verify_md5=True`` (default) checks the official md5 sums as mmpretrain does; set it to False
    for a folder you wrote yourself in the same format (tests, re-packed subsets).
    """

    def __init__(self, *args, verify_md5: bool = True, **kwargs) -> None:
        self.verify_md5 = verify_md5
        kwargs['download'] = False
        super().__init__(*args, **kwargs)

    def _check_integrity(self) -> bool:
        if self.verify_md5:
            return super()._check_integrity()
        folder = osp.join(self.data_prefix['root'], self.base_folder)
        return all(osp.isfile(osp.join(folder, name))
                   for name, _ in self.train_list + self.test_list)

    def load_data_list(self):
        folder = osp.join(self.data_prefix['root'], self.base_folder)
        if not osp.isdir(folder):
            raise FileNotFoundError(
                f'{type(self).__name__}: no {self.base_folder!r} folder under data_root '
                f'{self.data_prefix["root"]!r}; extract the python version of the data set '
                f'there (e.g. tar xzf {self.filename} -C {self.data_prefix["root"]})')
        if not self._check_integrity():
            what = 'missing files or wrong md5 sums' if self.verify_md5 else 'missing files'
            raise RuntimeError(f'{type(self).__name__}: {folder} has {what}; expected '
                               f'{[n for n, _ in self.train_list + self.test_list]}'
                               + ('' if not self.verify_md5 else
                                  ' (set verify_md5=False for a folder you wrote yourself)'))
        if not self.verify_md5:
            self.meta = dict(self.meta, md5=None)
        try:
            return super().load_data_list()
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise RuntimeError(f'{type(self).__name__}: {self._unreadable(folder)} cannot be '
                               f'read as a CIFAR python pickle ({type(err).__name__}: {err}); '
                               f'the file is truncated or not from the python release: '
                               f'extract {self.filename} again') from err

    def _unreadable(self, folder: str) -> str:
        """The first file of this split that does not unpickle into a CIFAR batch."""
        files = self.train_list if self.split == 'train' else self.test_list
        for name, _ in files + [[self.meta['filename'], None]]:
            path = osp.join(folder, name)
            try:
                with open(path, 'rb') as f:
                    entry = pickle.load(f, encoding='latin1')
                if name != self.meta['filename'] and 'data' not in entry:
                    return path
            except Exception:
                return path
        return folder


@DATASETS.register_module()
class LocalCIFAR10(_LocalCIFARMixin, CIFAR10):
    """mmpretrain's CIFAR10 read from a local folder only (see :class:`_LocalCIFARMixin`)."""


@DATASETS.register_module()
class LocalCIFAR100(_LocalCIFARMixin, CIFAR100):
    """mmpretrain's CIFAR100 read from a local folder only (see :class:`_LocalCIFARMixin`)."""
