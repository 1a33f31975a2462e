"""Registered engine components (optimizer wrappers, hooks)."""
from . import optim_wrappers  # noqa: F401
