# GRPO-RM semantic segmentation with a frozen DINOv2 ViT-S/14, without data: the model base, the
# 2k-iteration schedule and mmseg's runtime, with 256 images per step in total and the guards.
# configs/grpo_rm_voc.py (VOC 2012 train set) and configs/grpo_rm_voc_aug.py (train + SBD aug
# set) put it on top of mmseg's own dataset bases; ce_voc*.py change only the loss.
_base_ = [
    'mmseg::_base_/default_runtime.py',
    './models/grpo_rm_dinov2_vits14_seg.py',
    './schedules/grpo_rm_seg_2k.py',
]

# 256 images per optimizer step in total (2000 steps: ~48 epochs of train+aug (10582), ~350 of
# train (1464)), split over the processes:
#   batch_size per GPU = total_batch_size // num_gpus = 256 // 4 = 64.
# With another number of GPUs keep the product at 256, e.g. 8 GPUs:
#   --cfg-options train_dataloader.batch_size=32
total_batch_size = 256
num_gpus = 4
batch_size_per_gpu = total_batch_size // num_gpus
auto_scale_lr = dict(enable=False, base_batch_size=total_batch_size)

custom_hooks = [
    # stop on a non-finite loss (naming the iteration) and never checkpoint NaN; clear
    # errors for truncated or mismatched checkpoints (grpo_rm_mm/engine/guards.py)
    dict(type='NonFiniteLossHook'),
    dict(type='CheckpointCheckHook'),
]
randomness = dict(seed=0)
