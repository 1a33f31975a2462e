# The README example, verbatim: mmseg's own FCN-R50 Pascal VOC config with GRPO-RM as the loss
# of its decode head. Only the two statements below are added to the stock config.
_base_ = ['mmseg::fcn/fcn_r50-d8_4xb4-20k_voc12aug-512x512.py']

custom_imports = dict(imports=['grpo_rm_mm'], allow_failed_imports=False)
model = dict(decode_head=dict(
    loss_decode=dict(_delete_=True, type='GRPORMLoss', clip_eps=0.2, beta=0.0)))
