# GRPO-RM classification schedule, as mmpretrain's _base_/schedules/*.py: Adam at a constant
# lr for 20 epochs, validation every 5.
#
# The objective (pi_old group weighting, PPO clip, one inner step) is the setting that
# benchmarks/ablation.py selects by its rule on held-out data (README, Results); inner steps
# rerun only the head on cached features when a run wants them.
optim_wrapper = dict(type='GRPOOptimWrapper', optimizer=dict(type='Adam', lr=1e-3),
                     inner_steps=1)
param_scheduler = []
train_cfg = dict(by_epoch=True, max_epochs=20, val_interval=5)
val_cfg = dict()
test_cfg = dict()
