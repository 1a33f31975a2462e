"""GRPO-RM heads for mmpretrain and mmseg, and the policy-head protocol they share."""
from .policy_head import GRPOCachedBatch, GRPOPolicyHeadMixin, detach_context, make_reference

__all__ = ['GRPOCachedBatch', 'GRPOPolicyHeadMixin', 'detach_context', 'make_reference']
