# The runtime of the GRPO-RM classification configs: mmpretrain's, with this project's hooks and
# seed 0.
_base_ = ['mmpretrain::_base_/default_runtime.py']

custom_hooks = [
    # fail early when model.head.num_classes differs from the datasets' classes
    dict(type='NumClassesCheckHook'),
    # the kNN / SR probes' reference set: by default the training set with the test pipeline
    dict(type='RepresentationReferenceHook'),
    # stop on a non-finite loss (naming the iteration) and never checkpoint NaN; clear
    # errors for truncated or mismatched checkpoints (grpo_rm_mm/engine/guards.py)
    dict(type='NonFiniteLossHook'),
    dict(type='CheckpointCheckHook'),
]
randomness = dict(seed=0, deterministic=False)
