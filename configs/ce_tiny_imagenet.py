# Cross-entropy baseline of configs/grpo_rm_tiny_imagenet.py: the same model, data and schedule;
# only the head's loss differs.
_base_ = ['./grpo_rm_tiny_imagenet.py']

model = dict(head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
# one optimizer step per batch: inner steps re-optimise the GRPO-RM ratio against pi_old and
# have no cross-entropy counterpart (GRPOOptimWrapper with inner_steps=1 is a plain OptimWrapper)
optim_wrapper = dict(inner_steps=1)
