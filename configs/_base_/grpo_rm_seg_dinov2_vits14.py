# GRPO-RM semantic segmentation with a frozen DINOv2 ViT-S/14 (method.md section 6): the model,
# optimizer, schedule and runtime, without data. configs/grpo_rm_voc.py (VOC 2012 train set) and
# configs/grpo_rm_voc_aug.py (train + SBD aug set) put it on top of mmseg's own dataset bases,
# as mmseg's configs combine a model base with a dataset base; ce_voc*.py change only the loss.
#
# The frozen DINOv2 ViT-S/14 (mmpretrain, published weights) gives patch features
# (N, 384, H/14, W/14); the GRPO-RM head (1x1 convs 384 -> 64 -> 21 with a per-position
# LayerNorm) is trained with clip eps 0.2, beta 0, Adam, 256 images per step in total.
_base_ = ['mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['grpo_rm_mm', 'mmpretrain.models'], allow_failed_imports=False)

num_classes = 21

# 256 images per optimizer step in total, split over the processes:
#   batch_size per GPU = total_batch_size // num_gpus = 256 // 4 = 64.
# With another number of GPUs keep the product at 256, e.g. 8 GPUs:
#   --cfg-options train_dataloader.batch_size=32
total_batch_size = 256
num_gpus = 4
batch_size_per_gpu = total_batch_size // num_gpus
auto_scale_lr = dict(enable=False, base_batch_size=total_batch_size)

dinov2_vits14_checkpoint = ('https://download.openmmlab.com/mmpretrain/v1.0/dinov2/'
                            'vit-small-p14_dinov2-pre_3rdparty_20230426-5641ca5a.pth')
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics (RGB) of the DINOv2 weights
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(448, 448),  # the training crop (the data configs' crop_size): 32 x 32 patches
    test_cfg=dict(size_divisor=14))  # whole-image test: pad to whole patches, crop back after
model = dict(
    type='GRPORMEncoderDecoder',
    freeze_backbone=True,  # frozen: eval mode, no_grad
    trainable_backbone=(),
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='mmpretrain.VisionTransformer',
        arch='dinov2-small',
        img_size=518,
        patch_size=14,
        layer_scale_init_value=1e-5,
        out_type='featmap',  # patch tokens as (N, 384, H/14, W/14), after the final norm
        out_indices=-1,
        init_cfg=dict(type='Pretrained', checkpoint=dinov2_vits14_checkpoint,
                      prefix='backbone')),
    decode_head=dict(
        type='GRPORMSegHead',
        in_channels=384,
        channels=64,
        num_classes=num_classes,
        norm_cfg=dict(type='LN2d'),  # per-position LayerNorm: no batch statistics
        dropout_ratio=0.0,
        align_corners=False,
        ignore_index=255,
        loss_decode=dict(type='GRPORMLoss', group_weighting='pi_old',
                         surrogate='dual_clip', clip_eps=0.2, beta=0.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# pi_old group weighting, dual clip, 4 inner steps: the candidate with the best
# mIoU on a held-out selection split (benchmarks/seg_ablation.py, README Results);
# the inner steps rerun only the head on cached features.
optim_wrapper = dict(type='GRPOOptimWrapper', optimizer=dict(type='Adam', lr=1e-3),
                     inner_steps=4)
max_iters = 2000  # 512k images: ~48 epochs of train+aug (10582), ~350 of train (1464)
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
custom_hooks = [
    # stop on a non-finite loss (naming the iteration) and never checkpoint NaN; clear
    # errors for truncated or mismatched checkpoints (grpo_rm_mm/engine/guards.py)
    dict(type='NonFiniteLossHook'),
    dict(type='CheckpointCheckHook'),
]
randomness = dict(seed=0)
