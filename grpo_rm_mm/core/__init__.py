"""Toolbox-agnostic GRPO-RM core: plain torch, no OpenMMLab imports."""
from .advantages import SCALE_MODES, STD_MODES, group_advantages, weighted_advantages
from .objective import (
    LOG_RATIO_CLAMP,
    check_objective_options,
    clip_fraction,
    clipped_surrogate,
    entropy,
    exact_kl,
    grpo_rm_loss,
    query_mean,
)
from .rewards import accuracy_reward, confidence_penalty_reward, uniformity_reward
from .surrogates import SURROGATES, register_surrogate, surrogate_terms
from .weighting import GROUP_WEIGHTINGS, GroupWeights, group_weights, register_group_weighting

__all__ = ['GROUP_WEIGHTINGS', 'GroupWeights', 'LOG_RATIO_CLAMP', 'SCALE_MODES', 'STD_MODES',
           'SURROGATES', 'accuracy_reward', 'check_objective_options', 'clip_fraction',
           'clipped_surrogate', 'confidence_penalty_reward', 'entropy', 'exact_kl',
           'group_advantages', 'group_weights', 'grpo_rm_loss', 'query_mean',
           'register_group_weighting', 'register_surrogate', 'surrogate_terms',
           'uniformity_reward', 'weighted_advantages']
