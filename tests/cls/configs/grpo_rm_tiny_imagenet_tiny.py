# configs/grpo_rm_tiny_imagenet.py at test size: a tiny random ViT on 32-px Tiny-ImageNet-format
# folders with 5 classes written by the tests ($TIN_ROOT).
_base_ = ['../../../configs/grpo_rm_tiny_imagenet.py']

data_root = '{{$TIN_ROOT:data/tiny-imagenet-200}}'
model = dict(
    backbone=dict(_delete_=True, type='VisionTransformer',
                  arch=dict(embed_dims=32, num_layers=1, num_heads=2, feedforward_channels=64),
                  img_size=32, patch_size=8, out_type='avg_featmap'),
    head=dict(num_classes=5, in_channels=32, hidden_channels=64))
data_preprocessor = dict(num_classes=5, mean=[110.0, 110.0, 110.0], std=[60.0, 60.0, 60.0])

pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=20, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=pipeline))
val_dataloader = dict(
    batch_size=25, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=pipeline))
test_dataloader = val_dataloader
reference_dataloader = dict(
    batch_size=50, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='TinyImageNet', data_root=data_root, split='train', pipeline=pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = [
    dict(type='Accuracy', topk=(1, )),
    dict(type='KNNAccuracy', k=20, temperature=0.07, representation='pre_logits'),
    dict(type='SoftmaxRegressionAccuracy', representation='pre_logits'),
]
custom_hooks = [
    dict(type='NumClassesCheckHook'),
    dict(type='RepresentationReferenceHook', dataloader=reference_dataloader),
]
ood_test_sets = dict(_delete_=True)

optim_wrapper = dict(optimizer=dict(lr=3e-3))
train_cfg = dict(max_epochs=4, val_interval=2)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=2, save_best=None))
randomness = dict(seed=0, deterministic=True)
