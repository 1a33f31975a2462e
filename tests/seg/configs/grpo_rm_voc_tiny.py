# configs/grpo_rm_voc.py at test size: the same segmentor, frozen-backbone setup, GRPO-RM head
# and loss, dataset class, optimizer wrapper, schedule, hooks and IoUMetric, with a tiny random
# (frozen) ViT from mmpretrain on 64-px VOC-format data written by the tests ($VOC_ROOT).
_base_ = ['../../../configs/grpo_rm_voc.py']

data_root = '{{$VOC_ROOT:data/VOCdevkit/VOC2012}}'
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size, mean=[110.0, 110.0, 110.0], std=[60.0, 60.0, 60.0]),
    backbone=dict(_delete_=True, type='mmpretrain.VisionTransformer',
                  arch=dict(embed_dims=48, num_layers=1, num_heads=2, feedforward_channels=96),
                  img_size=64, patch_size=4, out_type='featmap', with_cls_token=False),
    decode_head=dict(in_channels=48))

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
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=2e-2))
max_iters = 40
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=20)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=10, max_keep_ckpts=-1))
randomness = dict(seed=0, deterministic=True)
env_cfg = dict(cudnn_benchmark=False)
