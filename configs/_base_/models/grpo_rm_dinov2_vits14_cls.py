# GRPO-RM classification model: mmpretrain's headless DINOv2 ViT-S/14 with its published weights,
# frozen, and the GRPO-RM MLP head (384 -> 256 -> C) with clip eps 0.2, beta 0 (method.md). The
# configs set num_classes and add data, schedule and runtime.
_base_ = ['mmpretrain::dinov2/vit-small-p14_dinov2-pre_headless.py']
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
