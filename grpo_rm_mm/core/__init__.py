"""Toolbox-agnostic GRPO-RM core: plain torch, no OpenMMLab imports."""
from .advantages import SCALE_MODES, STD_MODES, group_advantages
from .objective import (
    LOG_RATIO_CLAMP,
    clip_fraction,
    clipped_surrogate,
    entropy,
    exact_kl,
    grpo_rm_loss,
)
from .rewards import accuracy_reward, confidence_penalty_reward, uniformity_reward

__all__ = ['LOG_RATIO_CLAMP', 'SCALE_MODES', 'STD_MODES', 'accuracy_reward', 'clip_fraction',
           'clipped_surrogate', 'confidence_penalty_reward', 'entropy', 'exact_kl',
           'group_advantages', 'grpo_rm_loss', 'uniformity_reward']
