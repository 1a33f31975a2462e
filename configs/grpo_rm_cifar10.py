# GRPO-RM on CIFAR-10: frozen DINOv2 ViT-S/14 (published weights), MLP head 384 -> 256 -> 10,
# batch 1024, Adam, eps 0.2, beta 0. Images are resized 32 -> 224 (a multiple of the patch 14).
#
#   python tools/train.py configs/grpo_rm_cifar10.py
#   python tools/test.py configs/grpo_rm_cifar10.py work_dirs/grpo_rm_cifar10/epoch_20.pth
#   python tools/test_ood.py configs/grpo_rm_cifar10.py work_dirs/grpo_rm_cifar10/epoch_20.pth
#
# data/cifar10/cifar-10-batches-py: the python release (cifar-10-python.tar.gz), md5-checked.
# OOD sets (ood_test_sets): data/cifar10.1 (CIFAR-10.1 v6 .npy files) and data/CIFAR-10-C
# (Hendrycks & Dietterich 2019; 15 corruptions at severity `cifar10c_severity`).
_base_ = ['./_base_/grpo_rm_cls_dinov2_vits14.py']

data_root = 'data/cifar10'
dataset_type = 'LocalCIFAR10'  # mmpretrain's CIFAR10 without download attempts
cifar10_classes = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
image_size = 224

model = dict(head=dict(num_classes=10))
# CIFAR images are RGB arrays: ImageNet statistics (RGB order) of the DINOv2 weights, no swap
data_preprocessor = dict(num_classes=10, mean=[123.675, 116.28, 103.53],
                         std=[58.395, 57.12, 57.375], to_rgb=False)

train_pipeline = [
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='Resize', scale=image_size, interpolation='bicubic'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='Resize', scale=image_size, interpolation='bicubic'),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=1024, num_workers=8, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', verify_md5=True,
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=256, num_workers=8, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='test', verify_md5=True,
                 pipeline=test_pipeline))
test_dataloader = val_dataloader

cifar10c_root = 'data/CIFAR-10-C'
cifar10c_severity = 5  # rows (severity - 1) * 10000 .. severity * 10000 of each .npy
cifar10c_corruptions = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur',
    'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform',
    'pixelate', 'jpeg_compression')
ood_test_sets = dict(
    cifar10_1=dict(type='NpyImageDataset', data_root='data/cifar10.1',
                   data_file='cifar10.1_v6_data.npy', label_file='cifar10.1_v6_labels.npy',
                   classes=cifar10_classes),
    **{f'cifar10c_{name}': dict(
        type='NpyImageDataset', data_root=cifar10c_root, data_file=f'{name}.npy',
        label_file='labels.npy', classes=cifar10_classes,
        rows=((cifar10c_severity - 1) * 10000, cifar10c_severity * 10000))
       for name in cifar10c_corruptions})
