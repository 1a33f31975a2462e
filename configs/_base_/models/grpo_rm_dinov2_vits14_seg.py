# GRPO-RM segmentation model (method.md section 6), a model base as mmseg's _base_/models/*.py:
# a frozen DINOv2 ViT-S/14 (mmpretrain, published weights) gives patch features
# (N, 384, H/14, W/14); the GRPO-RM decode head (1x1 convs 384 -> 64 -> 21 with a per-position
# LayerNorm) is trained with clip eps 0.2, beta 0. Configs add a dataset, a schedule and a
# runtime; configs/demo/fashion_voc_grpo_rm.py swaps the backbone.
custom_imports = dict(imports=['grpo_rm_mm', 'mmpretrain.models'], allow_failed_imports=False)

num_classes = 21

dinov2_vits14_checkpoint = ('https://download.openmmlab.com/mmpretrain/v1.0/dinov2/'
                            'vit-small-p14_dinov2-pre_3rdparty_20230426-5641ca5a.pth')
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics (RGB) of the DINOv2 weights
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(448, 448),  # the training crop (the data configs' crop_size): 32 x 32 patches
    test_cfg=dict(size_divisor=14))  # whole-image test: pad to whole patches, crop back after
model = dict(
    type='GRPORMEncoderDecoder',
    freeze_backbone=True,  # frozen: eval mode, no_grad
    trainable_backbone=(),
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='mmpretrain.VisionTransformer',
        arch='dinov2-small',
        img_size=518,
        patch_size=14,
        layer_scale_init_value=1e-5,
        out_type='featmap',  # patch tokens as (N, 384, H/14, W/14), after the final norm
        out_indices=-1,
        init_cfg=dict(type='Pretrained', checkpoint=dinov2_vits14_checkpoint,
                      prefix='backbone')),
    decode_head=dict(
        type='GRPORMSegHead',
        in_channels=384,
        channels=64,
        num_classes=num_classes,
        norm_cfg=dict(type='LN2d'),  # per-position LayerNorm: no batch statistics
        dropout_ratio=0.0,
        align_corners=False,
        ignore_index=255,
        # pi_old group weighting, dual clip: the candidate with the best mIoU on a held-out
        # selection split (benchmarks/seg_ablation.py, README Results)
        loss_decode=dict(type='GRPORMLoss', group_weighting='pi_old',
                         surrogate='dual_clip', clip_eps=0.2, beta=0.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
