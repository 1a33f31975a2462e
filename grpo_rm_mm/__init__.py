"""GRPO-RM for OpenMMLab: reinforcement post-training of representation models.

``import grpo_rm_mm`` (or ``custom_imports=dict(imports=['grpo_rm_mm'])`` in a config) applies the
compatibility patches in :mod:`grpo_rm_mm.compat` and registers every component.
"""
from . import compat

compat.apply_all()

from . import datasets, engine, evaluation, models  # noqa: E402,F401  (registers components)
from .checkpoints import trusted_checkpoints  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ['__version__', 'trusted_checkpoints']
