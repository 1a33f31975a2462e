# Cross-entropy baseline of fashion_mnist_grpo_rm.py: same model, data, seed and budget; only the
# head's loss differs.
_base_ = ['./fashion_mnist_grpo_rm.py']

model = dict(head=dict(loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
# one optimizer step per batch: inner steps re-optimise the GRPO-RM ratio against pi_old and
# have no cross-entropy counterpart (GRPOOptimWrapper with inner_steps=1 is a plain OptimWrapper)
optim_wrapper = dict(inner_steps=1)
