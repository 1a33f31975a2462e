# GRPO-RM semantic segmentation on Pascal VOC 2012 (method.md section 6): a frozen DINOv2
# ViT-S/14 (mmpretrain, published weights) gives patch features (N, 384, H/14, W/14); the
# GRPO-RM head (1x1 convs 384 -> 64 -> 21 with a per-position LayerNorm) is trained with clip
# eps 0.2, beta 0, Adam, 256 images per step in total. configs/ce_voc.py is the cross-entropy
# baseline (only the loss differs).
#
#   bash tools/dist_train.sh configs/grpo_rm_voc.py 4
#   python tools/test.py configs/grpo_rm_voc.py work_dirs/grpo_rm_voc/iter_2000.pth \
#       --out work_dirs/grpo_rm_voc/pred_png
#
# Data: data/VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets/Segmentation). If the
# SBD "aug" set is there too (SegmentationClassAug + ImageSets/Segmentation/aug.txt, made by
# mmseg's tools/dataset_converters/voc_aug.py), it is added to the training set, as in mmseg's
# _base_/datasets/pascal_voc12_aug.py. This is decided when the config is read (relative to the
# working directory); the log's config dump shows which (`use_aug_set`).
_base_ = [
    'mmseg::_base_/datasets/pascal_voc12.py',
    'mmseg::_base_/default_runtime.py',
]
# after _base_ (mmengine then reads this as an ordinary, non-lazy config, also when inherited)
import os.path as osp  # noqa: E402

custom_imports = dict(imports=['grpo_rm_mm', 'mmpretrain.models'], allow_failed_imports=False)

data_root = 'data/VOCdevkit/VOC2012'
use_aug_set = osp.isdir(osp.join(data_root, 'SegmentationClassAug'))
dataset_type = 'CheckedPascalVOCDataset'  # PascalVOCDataset + errors naming bad files
num_classes = 21
crop_size = (448, 448)  # a multiple of the patch size 14: 32 x 32 patch features

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
    size=crop_size,
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
        loss_decode=dict(type='GRPORMLoss', clip_eps=0.2, beta=0.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 448), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 448), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
voc_train = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
    ann_file='ImageSets/Segmentation/train.txt',
    pipeline=train_pipeline)
voc_aug = dict(
    type=dataset_type,
    data_root=data_root,
    data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
    ann_file='ImageSets/Segmentation/aug.txt',
    pipeline=train_pipeline)
train_dataloader = dict(
    batch_size=batch_size_per_gpu,
    num_workers=8,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=(dict(type='ConcatDataset', datasets=[voc_train, voc_aug]) if use_aug_set
             else voc_train))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])  # aAcc, mIoU, per-class IoU/Acc
test_evaluator = val_evaluator

# inner_steps=1 for segmentation: the classification ablation's 4 (benchmarks/ablation.py) did
# not carry over: on the segmentation demo 4 inner steps lowered mIoU (README, Results).
optim_wrapper = dict(type='GRPOOptimWrapper', optimizer=dict(type='Adam', lr=1e-3),
                     inner_steps=1)
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
