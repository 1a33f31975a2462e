# GRPO-RM on Tiny-ImageNet-200: frozen DINOv2 ViT-S/14 (published weights), MLP head
# 384 -> 256 -> 200, batch 1024, Adam, eps 0.2, beta 0. Images are resized 64 -> 224.
#
#   python tools/train.py configs/grpo_rm_tiny_imagenet.py
#   python tools/test.py configs/grpo_rm_tiny_imagenet.py work_dirs/grpo_rm_tiny_imagenet/epoch_20.pth
#   python tools/test_ood.py configs/grpo_rm_tiny_imagenet.py work_dirs/grpo_rm_tiny_imagenet/epoch_20.pth
#
# data/tiny-imagenet-200: the extracted tiny-imagenet-200.zip (wnids.txt, train/, val/). The
# val split (10000 images, val_annotations.txt) is the test set.
# OOD sets (ood_test_sets): data/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG
# (Hendrycks & Dietterich 2019; 15 corruptions at severity `tin_c_severity`).
_base_ = ['./_base_/grpo_rm_cls_dinov2_vits14.py']

data_root = 'data/tiny-imagenet-200'
dataset_type = 'TinyImageNet'
image_size = 224

model = dict(head=dict(num_classes=200))
# JPEG files load as BGR: ImageNet statistics (RGB order) of the DINOv2 weights, BGR -> RGB
data_preprocessor = dict(num_classes=200, mean=[123.675, 116.28, 103.53],
                         std=[58.395, 57.12, 57.375], to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='Resize', scale=image_size, interpolation='bicubic'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, interpolation='bicubic'),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=1024, num_workers=8, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=256, num_workers=8, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='val', pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(topk=(1, 5))
# the base's head top-1 with top-5 added, then its kNN / SR probes
test_evaluator = [dict(_base_.test_evaluator[0], topk=(1, 5)), *_base_.test_evaluator[1:]]
ood_evaluator = dict(topk=(1, 5))

tin_c_root = 'data/Tiny-ImageNet-C'
tin_c_severity = 5
tin_c_corruptions = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur',
    'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform',
    'pixelate', 'jpeg_compression')
ood_test_sets = {
    f'tin_c_{name}': dict(type='WnidFolderDataset',
                          data_root=f'{tin_c_root}/{name}/{tin_c_severity}',
                          wnids_file=f'{data_root}/wnids.txt')
    for name in tin_c_corruptions}
