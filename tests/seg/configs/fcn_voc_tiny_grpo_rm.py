# tests/seg/configs/fcn_voc_tiny.py (an ordinary mmseg config) with the GRPO-RM plugin: only
# `custom_imports` and the decode head's `loss_decode` are added.
_base_ = ['./fcn_voc_tiny.py']

custom_imports = dict(imports=['grpo_rm_mm'], allow_failed_imports=False)
model = dict(decode_head=dict(
    loss_decode=dict(_delete_=True, type='GRPORMLoss', clip_eps=0.2, beta=0.0)))
