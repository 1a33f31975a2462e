# GRPO-RM segmentation schedule, as mmseg's _base_/schedules/schedule_*.py: Adam with a poly
# decay over 2000 iterations, validation and a checkpoint every 500.
#
# 4 inner steps per batch (GRPOOptimWrapper): the segmentation candidate with the best mIoU on a
# held-out selection split (benchmarks/seg_ablation.py, README Results); the inner steps rerun
# only the head on cached features.
optim_wrapper = dict(type='GRPOOptimWrapper', optimizer=dict(type='Adam', lr=1e-3),
                     inner_steps=4)
max_iters = 2000
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
