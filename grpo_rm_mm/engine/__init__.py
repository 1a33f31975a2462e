"""Registered engine components (optimizer wrappers, hooks)."""
from . import guards, hooks, optim_wrappers, prior_hook  # noqa: F401
