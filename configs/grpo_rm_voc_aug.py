# GRPO-RM semantic segmentation on Pascal VOC 2012 with the SBD aug set (train + aug, 10582
# images), as mmseg's *_voc12aug configs: mmseg's own pascal_voc12_aug.py dataset base (a
# ConcatDataset of the train and aug sets) + the frozen-DINOv2 GRPO-RM model, schedule and
# runtime of configs/_base_/grpo_rm_seg_dinov2_vits14.py. Everything but the training set is the
# same as configs/grpo_rm_voc.py; configs/ce_voc_aug.py is the cross-entropy baseline.
#
#   bash tools/dist_train.sh configs/grpo_rm_voc_aug.py 4
#   python tools/test.py configs/grpo_rm_voc_aug.py work_dirs/grpo_rm_voc_aug/iter_2000.pth
#
# Data: data/VOCdevkit/VOC2012 with JPEGImages, SegmentationClass, SegmentationClassAug and
# ImageSets/Segmentation/{train,val,aug}.txt (SegmentationClassAug and aug.txt are made from SBD
# by mmseg's tools/dataset_converters/voc_aug.py).
_base_ = [
    'mmseg::_base_/datasets/pascal_voc12_aug.py',
    './_base_/grpo_rm_seg_dinov2_vits14.py',
]

data_root = 'data/VOCdevkit/VOC2012'
dataset_type = 'CheckedPascalVOCDataset'  # PascalVOCDataset + errors naming bad files
crop_size = (448, 448)  # a multiple of the patch size 14: 32 x 32 patch features
model = dict(data_preprocessor=dict(size=crop_size))

# The pipelines of configs/grpo_rm_voc.py: each of mmseg's dataset bases defines its own, and
# mmengine refuses a key that two bases of one config both define, so they are restated here.
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
# The base's training set is dict(type='ConcatDataset', datasets=[dataset_train, dataset_aug]);
# a list is replaced, not merged, so both parts are restated from the base's own dicts (their
# folders and split files) with this project's dataset class and pipeline.
dataset_train = dict(_base_.dataset_train, type=dataset_type, data_root=data_root,
                     pipeline=train_pipeline)
dataset_aug = dict(_base_.dataset_aug, type=dataset_type, data_root=data_root,
                   pipeline=train_pipeline)
train_dataloader = dict(
    batch_size=_base_.batch_size_per_gpu, num_workers=8,
    dataset=dict(datasets=[dataset_train, dataset_aug]))
val_dataloader = dict(dataset=dict(type=dataset_type, data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
