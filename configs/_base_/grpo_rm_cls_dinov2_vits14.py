# GRPO-RM post-training of a frozen DINOv2 ViT-S/14 with an MLP head (384 -> 256 -> C), Adam,
# clip eps 0.2, beta 0 (method.md). Shared by configs/{grpo_rm,ce}_{cifar10,tiny_imagenet}.py,
# which add the data; the cross-entropy baselines change only model.head.loss.
_base_ = [
    'mmpretrain::dinov2/vit-small-p14_dinov2-pre_headless.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['grpo_rm_mm'], allow_failed_imports=False)

dinov2_vits14_checkpoint = ('https://download.openmmlab.com/mmpretrain/v1.0/dinov2/'
                            'vit-small-p14_dinov2-pre_3rdparty_20230426-5641ca5a.pth')
model = dict(
    type='GRPORMClassifier',
    freeze_backbone=True,  # frozen: eval mode, no_grad
    trainable_backbone=(),  # e.g. ('layers.11.', 'ln1.') unfreezes the last block + final norm
    representations=('backbone', 'pre_logits'),
    backbone=dict(
        out_type='cls_token',
        init_cfg=dict(type='Pretrained', checkpoint=dinov2_vits14_checkpoint,
                      prefix='backbone')),
    head=dict(
        _delete_=True,  # the mmpretrain base is headless (head=None)
        type='GRPORMClsHead',
        num_classes=10,
        in_channels=384,
        hidden_channels=256,
        loss=dict(type='GRPORMLoss', group_weighting='pi_old', surrogate='clip',
                  clip_eps=0.2, beta=0.0),
        cal_acc=True))

# 1024 images per step in total: batch_size 1024 on one GPU (the backbone runs without grad), or
# e.g. 8 GPUs x 128 (--cfg-options train_dataloader.batch_size=128).
# The objective (pi_old group weighting, PPO clip, one inner step) is the setting that
# benchmarks/ablation.py selects by its rule on held-out data (README, Results); inner steps
# rerun only the head on cached features when a run wants them.
optim_wrapper = dict(type='GRPOOptimWrapper', optimizer=dict(type='Adam', lr=1e-3),
                     inner_steps=1)
auto_scale_lr = dict(base_batch_size=1024, enable=False)
param_scheduler = []
train_cfg = dict(by_epoch=True, max_epochs=20, val_interval=5)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(interval=5, max_keep_ckpts=2, save_best='auto'))
randomness = dict(seed=0, deterministic=False)
