# GRPO-RM post-training of a frozen DINOv2 ViT-S/14 with an MLP head (384 -> 256 -> C), Adam,
# clip eps 0.2, beta 0 (method.md): the model base, the 20-epoch schedule and the runtime, with
# 1024 images per step and the head / kNN / SR evaluators. Shared by
# configs/{grpo_rm,ce}_{cifar10,tiny_imagenet}.py, which add the data; the cross-entropy
# baselines change only model.head.loss.
_base_ = [
    './models/grpo_rm_dinov2_vits14_cls.py',
    './schedules/grpo_rm_cls_20e.py',
    './grpo_rm_cls_runtime.py',
]

# 1024 images per step in total: batch_size 1024 on one GPU (the backbone runs without grad), or
# e.g. 8 GPUs x 128 (--cfg-options train_dataloader.batch_size=128).
auto_scale_lr = dict(base_batch_size=1024, enable=False)
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(interval=5, max_keep_ckpts=2, save_best='auto'))

val_evaluator = dict(type='Accuracy', topk=(1, ))
# the head, then kNN and SR probes on the head's hidden layer and on the backbone features
test_evaluator = [
    dict(type='Accuracy', topk=(1, )),
    dict(type='KNNAccuracy', k=20, temperature=0.07, representation='pre_logits'),
    dict(type='SoftmaxRegressionAccuracy', representation='pre_logits'),
    dict(type='KNNAccuracy', k=20, temperature=0.07, representation='backbone'),
    dict(type='SoftmaxRegressionAccuracy', representation='backbone'),
]
ood_evaluator = dict(type='Accuracy', topk=(1, ))
