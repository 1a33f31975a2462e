"""Toolbox-agnostic GRPO-RM core: plain torch, no OpenMMLab imports."""
