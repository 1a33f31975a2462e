# Cross-entropy baseline of digits_grpo_rm.py (only the head's loss differs).
_base_ = ['./digits_grpo_rm.py']

model = dict(head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
