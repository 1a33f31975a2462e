# configs/grpo_rm_cifar10.py at test size: the same head, loss, optimizer, hooks and metrics, with
# a tiny random ViT on 32-px CIFAR-format data written by the tests ($CIFAR_ROOT, $OOD_ROOT).
_base_ = ['../../../configs/grpo_rm_cifar10.py']

data_root = '{{$CIFAR_ROOT:data/cifar10}}'
ood_root = '{{$OOD_ROOT:data/ood}}'
model = dict(
    backbone=dict(_delete_=True, type='VisionTransformer',
                  arch=dict(embed_dims=32, num_layers=1, num_heads=2, feedforward_channels=64),
                  img_size=32, patch_size=8, out_type='avg_featmap'),
    head=dict(in_channels=32, hidden_channels=64))
data_preprocessor = dict(mean=[110.0, 110.0, 110.0], std=[60.0, 60.0, 60.0])

pipeline = [dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=20, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True, seed=0),
    dataset=dict(data_root=data_root, verify_md5=False, pipeline=pipeline))
val_dataloader = dict(
    batch_size=25, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, verify_md5=False, pipeline=pipeline))
test_dataloader = val_dataloader
# the base's head top-1 and probes on the head's hidden layer, here also at validation, so the
# 2-process test compares them too
val_evaluator = _base_.test_evaluator[:3]
# the base's class-count check and reference hook (the training set, test pipeline), no guards
custom_hooks = _base_.custom_hooks[:2]
ood_test_sets = dict(
    _delete_=True,
    shifted=dict(type='NpyImageDataset', data_root=ood_root, data_file='shifted.npy',
                 label_file='labels.npy'),
    noisy=dict(type='NpyImageDataset', data_root=ood_root, data_file='noisy.npy',
               label_file='labels.npy'))

optim_wrapper = dict(optimizer=dict(lr=3e-3))
train_cfg = dict(max_epochs=4, val_interval=2)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=2, save_best=None))
randomness = dict(seed=0, deterministic=True)
