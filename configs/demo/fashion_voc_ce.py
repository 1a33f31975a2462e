# Cross-entropy baseline of fashion_voc_grpo_rm.py: the same frozen EfficientNet-Lite0, head,
# data, Adam and schedule; only the head's loss differs (averaged over the labelled pixels, as
# GRPO-RM's is).
#
#   python tools/train.py configs/demo/fashion_voc_ce.py --work-dir work_dirs/fv_ce
_base_ = ['./fashion_voc_grpo_rm.py']

model = dict(decode_head=dict(loss_decode=dict(
    _delete_=True, type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=True,
    loss_weight=1.0)))
# one optimizer step per batch (inner steps are GRPO-RM's own; see fashion_mnist_ce.py)
optim_wrapper = dict(inner_steps=1)
