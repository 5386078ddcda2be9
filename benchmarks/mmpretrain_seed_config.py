# The reference experiment as MMPretrain 1.2.0 writes it (the seed config): ConvNeXt-V2-Tiny
# with GRN and drop-path 0.2, CIFAR-10 at 32x32 with RandomCrop(32, padding 4) + flip, label
# smoothing 0.2, no MixUp/CutMix, batch 128, AdamW 4e-3 / 0.05 without decay on norms, biases
# and GRN, clipping 5.0, linear warmup 10 epochs then cosine to 0 at 100, validation every
# epoch, a checkpoint every 10 and the best kept, a log line every 50 iterations, seed 0.
# benchmarks/mmpretrain.py runs it with MMPretrain's own Runner (never in CI: it installs
# MMPretrain on demand). `_base_` files are MMPretrain's own: the script links its installed
# package's configs/_base_ beside a copy of this file (MMEngine's "mmpretrain::" scope needs
# pkg_resources, which current setuptools no longer has).
_base_ = [
    "_base_/models/convnext_v2/tiny.py",
    "_base_/datasets/cifar10_bs16.py",
    "_base_/schedules/cifar10_bs128.py",
    "_base_/default_runtime.py",
]

model = dict(
    backbone=dict(  # the FCMAE backbone; benchmarks/mmpretrain.py drops it (--pretrained)
        init_cfg=dict(
            type="Pretrained",
            checkpoint="https://download.openmmlab.com/mmpretrain/v1.0/convnext_v2/"
                       "convnext-v2-tiny_3rdparty-fcmae_in1k_20230104-80513adc.pth",
            prefix="backbone.")),
    head=dict(num_classes=10),
    train_cfg=dict(_delete_=True),  # no MixUp/CutMix
)

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=4e-3, weight_decay=0.05, betas=(0.9, 0.999)),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                       custom_keys={".gamma": dict(decay_mult=0.0),
                                    ".beta": dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-3, by_epoch=True, end=10, convert_to_iter_based=True),
    dict(type="CosineAnnealingLR", eta_min=0.0, by_epoch=True, begin=10, end=100),
]
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
auto_scale_lr = dict(base_batch_size=128)

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=50),
    checkpoint=dict(type="CheckpointHook", interval=10, save_best="auto", max_keep_ckpts=1),
)
randomness = dict(seed=0)
