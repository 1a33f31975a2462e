"""Registered engine components (optimizer wrappers, hooks)."""
from . import hooks, optim_wrappers  # noqa: F401
