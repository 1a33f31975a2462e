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
val_evaluator = dict(type='Accuracy', topk=(1, ))
# top-1 and the base's probes on the head's hidden layer
test_evaluator = [val_evaluator, *_base_.test_evaluator[1:3]]
# the base's class-count check and reference hook (the training set, test pipeline), no guards
custom_hooks = _base_.custom_hooks[:2]
ood_test_sets = dict(_delete_=True)

optim_wrapper = dict(optimizer=dict(lr=3e-3))
train_cfg = dict(max_epochs=4, val_interval=2)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=2, save_best=None))
randomness = dict(seed=0, deterministic=True)
