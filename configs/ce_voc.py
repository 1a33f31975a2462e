# Cross-entropy baseline of configs/grpo_rm_voc.py: the same frozen DINOv2 ViT-S/14, head
# (384 -> 64 -> 21), data, batch 256, Adam and schedule; only the head's loss differs. Like
# GRPO-RM it averages over the labelled pixels (avg_non_ignore=True; mmseg's default would
# divide by all pixels, 255 ones included).
#
#   bash tools/dist_train.sh configs/ce_voc.py 4
#   python tools/test.py configs/ce_voc.py work_dirs/ce_voc/iter_2000.pth
_base_ = ['./grpo_rm_voc.py']

model = dict(decode_head=dict(loss_decode=dict(
    _delete_=True, type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=True,
    loss_weight=1.0)))
# one optimizer step per batch: inner steps re-optimise the GRPO-RM ratio against pi_old and
# have no cross-entropy counterpart (GRPOOptimWrapper with inner_steps=1 is a plain OptimWrapper)
optim_wrapper = dict(inner_steps=1)
