"""GRPO-RM heads for mmpretrain and mmseg."""
