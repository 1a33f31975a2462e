# The segmentation part of the embedded demo (tools/demo.py): GRPO-RM post-training of a
# segmentation head on real images through the Pascal VOC code path. Canvases with real
# Fashion-MNIST items (tools/dataset_converters/fashion_voc.py: 64 px, 1-3 tinted items on a
# smooth random background, masks from the items' own pixels, 255 on a 1-px ring, 11 classes) are
# written as a VOC 2012 folder; a frozen, real ImageNet-pretrained EfficientNet-Lite0 gives its
# stride-4/8/16 maps (24 + 40 + 112 channels, upsampled to stride 4 and concatenated); the
# GRPO-RM head (1x1 convs 176 -> 64 -> 11 with a per-position LayerNorm) is trained with Adam,
# clip eps 0.2, beta 0. fashion_voc_ce.py is the cross-entropy baseline (only the loss differs).
#
# Data and weights are prepared by tools/demo.py under $GRPO_RM_DEMO_DATA (default data/demo):
#   fashion_voc/VOCdevkit/VOC2012   prepare_fashion_voc(demo_root + '/fashion_voc', ...)
#   pretrained/efficientnet_lite0.pth
#
#   python tools/train.py configs/demo/fashion_voc_grpo_rm.py --work-dir work_dirs/fv_grpo
#   python tools/test.py configs/demo/fashion_voc_grpo_rm.py work_dirs/fv_grpo/iter_200.pth
#
# mmseg's PascalVOCDataset refuses class names that are not VOC's, so the folder is read with
# VOCFormatDataset (CheckedPascalVOCDataset whose classes are the 11 of its metainfo).
_base_ = [
    'mmseg::_base_/datasets/pascal_voc12.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['grpo_rm_mm', 'mmpretrain.models'],
                      allow_failed_imports=False)

demo_root = '{{$GRPO_RM_DEMO_DATA:data/demo}}'
data_root = demo_root + '/fashion_voc/VOCdevkit/VOC2012'
dataset_type = 'VOCFormatDataset'
metainfo = dict(
    classes=('background', 'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
             'Shirt', 'Sneaker', 'Bag', 'Ankle boot'),
    palette=[[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
             [0, 128, 128], [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0]])
num_classes = 11
crop_size = (64, 64)

data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics (RGB) of the EfficientNet weights
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
    test_cfg=dict(size_divisor=16))
model = dict(
    type='GRPORMEncoderDecoder',
    freeze_backbone=True,  # frozen: eval mode, no_grad
    trainable_backbone=(),
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='mmpretrain.EfficientNetLite',
        arch='lite0',
        out_indices=(2, 3, 5),  # strides 4, 8, 16; 24, 40, 112 channels
        init_cfg=dict(type='Pretrained',
                      checkpoint=demo_root + '/pretrained/efficientnet_lite0.pth')),
    decode_head=dict(
        type='GRPORMSegHead',
        in_channels=[24, 40, 112],
        in_index=[0, 1, 2],
        input_transform='resize_concat',  # upsampled to stride 4, concatenated: 176 channels
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

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/train.txt',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt',
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])  # aAcc, mIoU, per-class IoU/Acc
test_evaluator = val_evaluator

# pi_old group weighting, dual clip, 4 inner steps: the candidate with the best
# mIoU on a held-out selection split (benchmarks/seg_ablation.py, README Results);
# the inner steps rerun only the head on cached features.
optim_wrapper = dict(type='GRPOOptimWrapper', optimizer=dict(type='Adam', lr=1e-2),
                     inner_steps=4)
max_iters = 200
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=25, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
randomness = dict(seed=0)
