"""presets.py: the default is the reference experiment, and each preset changes only what it
says."""


from convnext_cifar.config import DataConfig, ModelConfig, TrainConfig, flatten, to_dict
from convnext_cifar.presets import (
    PRESETS,
    CIFAR10Data,
    CIFAR10FineTune,
    CIFAR10Smoke,
    CIFAR100FineTune,
    ConvNeXtV2Tiny,
)


def _diff(a, b):
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return {k for k in fa if fa[k] != fb[k]}


def test_default_is_the_reference_experiment():
    c = CIFAR10FineTune()
    assert (c.model.name, c.model.pretrained) == ("convnextv2_tiny", "convnextv2_tiny.fcmae")
    assert c.model.drop_path_rate == 0.2 and c.model.label_smoothing == 0.2
    assert c.data.dataset == "cifar10" and c.data.image_size == 32
    assert c.data.padding == 4 and c.data.flip_prob == 0.5 and c.data.batch_size == 128
    # the dataset's standard normalisation, which a run resolves and records in config.json
    from convnext_cifar.data.kinds import DATASETS

    assert (c.data.mean, c.data.std) == (None, None)
    assert DATASETS["cifar10"].mean == (125.307, 122.961, 113.8575)
    assert DATASETS["cifar10"].std == (51.5865, 50.847, 51.255)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.clip_grad_norm) == (4e-3, 0.05, 5.0)
    assert (c.sched.epochs, c.sched.warmup_epochs, c.sched.start_factor, c.sched.min_lr) == (
        100, 10, 1e-3, 0.0)
    assert (c.val_interval, c.ckpt_interval, c.log_interval, c.seed) == (1, 10, 50, 0)


def test_presets_change_only_what_they_say():
    # MMPretrain's _base_/models/convnext_v2/tiny.py: drop-path 0.2, LabelSmoothLoss 0.2
    assert _diff(ModelConfig(), ConvNeXtV2Tiny()) == {"drop_path_rate", "label_smoothing"}
    assert (ConvNeXtV2Tiny().drop_path_rate, ConvNeXtV2Tiny().label_smoothing) == (0.2, 0.2)
    assert _diff(DataConfig(), CIFAR10Data()) == {"batch_size"}
    assert _diff(TrainConfig(), CIFAR10FineTune()) == {
        "model.pretrained", "model.drop_path_rate", "model.label_smoothing",
        "optim.lr", "optim.clip_grad_norm", "ckpt_interval", "log_interval"}
    assert _diff(CIFAR10FineTune(), CIFAR100FineTune()) == {"data.dataset"}
    assert _diff(CIFAR10FineTune(), CIFAR10Smoke()) == {
        "name", "model.name", "model.pretrained", "model.drop_path_rate", "data.limit_train",
        "data.limit_val",
        "sched.epochs", "sched.warmup_epochs", "ckpt_interval", "log_interval"}
    assert isinstance(CIFAR10FineTune().model, ConvNeXtV2Tiny)
    # the distillation preset: atto (FCMAE) learning from the reference run's work dir
    assert _diff(CIFAR10FineTune(), PRESETS["cifar10-distil-atto"]()) == {
        "name", "model.name", "model.pretrained", "model.drop_path_rate", "distill.teacher"}
    assert PRESETS["cifar10-distil-atto"]().distill.teacher == str(CIFAR10FineTune().run_dir)
