# Cross-entropy baseline of digits_grpo_rm.py (only the head's loss differs).
_base_ = ['./digits_grpo_rm.py']

model = dict(head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
# one optimizer step per batch (inner steps are GRPO-RM's own; see fashion_mnist_ce.py)
optim_wrapper = dict(inner_steps=1)
