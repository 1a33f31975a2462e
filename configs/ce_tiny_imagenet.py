# Cross-entropy baseline of configs/grpo_rm_tiny_imagenet.py: the same model, data and schedule;
# only the head's loss differs.
_base_ = ['./grpo_rm_tiny_imagenet.py']

model = dict(head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
