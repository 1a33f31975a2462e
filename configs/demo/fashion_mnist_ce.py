# Cross-entropy baseline of fashion_mnist_grpo_rm.py: same model, data, seed and budget; only the
# head's loss differs.
_base_ = ['./fashion_mnist_grpo_rm.py']

model = dict(head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
