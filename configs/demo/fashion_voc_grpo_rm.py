# The segmentation part of the embedded demo (tools/demo.py): GRPO-RM post-training of a
# segmentation head on real images through the Pascal VOC code path. Canvases with real
# Fashion-MNIST items (tools/dataset_converters/fashion_voc.py: 64 px, 1-3 tinted items on a
# smooth random background, masks from the items' own pixels, 255 on a 1-px ring, 11 classes) are
# written as a VOC 2012 folder; a frozen, real ImageNet-pretrained EfficientNet-Lite0 gives its
# stride-4/8/16 maps (24 + 40 + 112 channels, upsampled to stride 4 and concatenated); the
# GRPO-RM head of configs/_base_/models/grpo_rm_dinov2_vits14_seg.py (1x1 convs 176 -> 64 -> 11
# with a per-position LayerNorm) is trained with Adam, clip eps 0.2, beta 0, on the schedule
# base shortened to 200 iterations. fashion_voc_ce.py is the cross-entropy baseline (only the
# loss differs).
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
    '../_base_/models/grpo_rm_dinov2_vits14_seg.py',
    '../_base_/schedules/grpo_rm_seg_2k.py',
]

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

# the same ImageNet statistics (RGB) for the EfficientNet weights; stride 16: pad to 16 at test
data_preprocessor = dict(size=crop_size, test_cfg=dict(size_divisor=16))
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='mmpretrain.EfficientNetLite',
        arch='lite0',
        out_indices=(2, 3, 5),  # strides 4, 8, 16; 24, 40, 112 channels
        init_cfg=dict(type='Pretrained',
                      checkpoint=demo_root + '/pretrained/efficientnet_lite0.pth')),
    decode_head=dict(
        in_channels=[24, 40, 112],
        in_index=[0, 1, 2],
        input_transform='resize_concat',  # upsampled to stride 4, concatenated: 176 channels
        num_classes=num_classes))

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
# the base's loaders (split files, folders, samplers; IoUMetric) with this dataset and batch 32
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-2))
max_iters = 200
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=25),
                     checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
randomness = dict(seed=0)
