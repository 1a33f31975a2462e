# Cross-entropy baseline of configs/grpo_rm_voc_aug.py (train + SBD aug set): the same frozen
# DINOv2 ViT-S/14, head, data, batch 256, Adam and schedule; only the head's loss differs, as in
# configs/ce_voc.py (averaged over the labelled pixels, avg_non_ignore=True).
#
#   bash tools/dist_train.sh configs/ce_voc_aug.py 4
_base_ = ['./grpo_rm_voc_aug.py']

model = dict(decode_head=dict(loss_decode=dict(
    _delete_=True, type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=True,
    loss_weight=1.0)))
# one optimizer step per batch: inner steps re-optimise the GRPO-RM ratio against pi_old and
# have no cross-entropy counterpart (GRPOOptimWrapper with inner_steps=1 is a plain OptimWrapper)
optim_wrapper = dict(inner_steps=1)
