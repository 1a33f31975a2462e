# Cross-entropy baseline of configs/grpo_rm_cifar10.py: the same model, data and schedule; only
# the head's loss differs.
_base_ = ['./grpo_rm_cifar10.py']

model = dict(head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
