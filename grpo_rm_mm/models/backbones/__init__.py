"""Backbones used by the demos."""
