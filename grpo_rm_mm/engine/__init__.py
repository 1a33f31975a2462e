"""Registered engine components (optimizer wrappers, hooks)."""
from . import guards, hooks, optim_wrappers  # noqa: F401
