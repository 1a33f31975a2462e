# An ordinary mmseg config, nothing of this project in it: EncoderDecoder + a small ResNet +
# FCNHead with cross-entropy, mmseg's VOC dataset, runtime and schedule bases; sized for CPU
# tests on the generated VOC folder ($VOC_ROOT).
_base_ = [
    'mmseg::_base_/datasets/pascal_voc12.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]
data_root = '{{$VOC_ROOT:data/VOCdevkit/VOC2012}}'
crop_size = (64, 64)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[110.0, 110.0, 110.0],
                           std=[60.0, 60.0, 60.0], bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
                           size=crop_size),
    backbone=dict(type='ResNetV1c', depth=18, stem_channels=16, base_channels=16,
                  out_indices=(1, ), num_stages=2, strides=(1, 2), dilations=(1, 1),
                  norm_cfg=norm_cfg, contract_dilation=True),
    decode_head=dict(type='FCNHead', in_channels=32, in_index=0, channels=32, num_convs=1,
                     concat_input=False, dropout_ratio=0.0, num_classes=21, norm_cfg=norm_cfg,
                     align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                      loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=pipeline))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(_delete_=True, type='Adam', lr=0.01))
param_scheduler = []
train_cfg = dict(type='IterBasedTrainLoop', max_iters=30, val_interval=30)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=30))
randomness = dict(seed=0, deterministic=True)
