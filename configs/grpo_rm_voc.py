# GRPO-RM semantic segmentation on Pascal VOC 2012, train set (1464 images): mmseg's own
# pascal_voc12.py dataset base + the frozen-DINOv2 GRPO-RM model, schedule and runtime of
# configs/_base_/grpo_rm_seg_dinov2_vits14.py (method.md section 6). configs/ce_voc.py is the
# cross-entropy baseline (only the loss differs); configs/grpo_rm_voc_aug.py trains on the
# train + SBD aug set (10582 images) instead.
#
#   bash tools/dist_train.sh configs/grpo_rm_voc.py 4
#   python tools/test.py configs/grpo_rm_voc.py work_dirs/grpo_rm_voc/iter_2000.pth \
#       --out work_dirs/grpo_rm_voc/pred_png
#
# Data: data/VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets/Segmentation).
_base_ = [
    'mmseg::_base_/datasets/pascal_voc12.py',
    './_base_/grpo_rm_seg_dinov2_vits14.py',
]

data_root = 'data/VOCdevkit/VOC2012'
dataset_type = 'CheckedPascalVOCDataset'  # PascalVOCDataset + errors naming bad files
crop_size = (448, 448)  # a multiple of the patch size 14: 32 x 32 patch features
model = dict(data_preprocessor=dict(size=crop_size))

# mmseg's pipelines at 448 instead of 512
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
# the base's loaders (InfiniteSampler; val batch 1; IoUMetric) with this dataset class and these
# pipelines
train_dataloader = dict(
    batch_size=_base_.batch_size_per_gpu, num_workers=8,
    dataset=dict(type=dataset_type, data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(type=dataset_type, data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
