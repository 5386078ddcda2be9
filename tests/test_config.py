import dataclasses
import json

import pytest

from convnext_cifar.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
    flatten,
    from_dict,
    load_config_file,
    to_dict,
)
from convnext_cifar.errors import UserError
from convnext_cifar.presets import (
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
    from convnext_cifar.datasets import DATASETS

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


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CIFAR10FineTune().seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("build, flag", [
    (lambda: OptimConfig(lr=0), "--optim.lr"),
    (lambda: OptimConfig(lr=-1e-3), "--optim.lr"),
    (lambda: OptimConfig(clip_grad_norm=0.0), "--optim.clip-grad-norm"),
    (lambda: SchedConfig(epochs=10, warmup_epochs=10), "--sched.warmup-epochs"),
    (lambda: SchedConfig(epochs=0), "--sched.epochs"),
    (lambda: DataConfig(batch_size=0), "--data.batch-size"),
    (lambda: DataConfig(padding=-1), "--data.padding"),
    (lambda: DataConfig(flip_prob=1.5), "--data.flip-prob"),
    (lambda: DataConfig(std=(1.0, 0.0, 1.0)), "--data.std"),
    (lambda: ModelConfig(name="resnet50"), "--model.name"),
    (lambda: ModelConfig(drop_path_rate=1.0), "--model.drop-path-rate"),
    (lambda: TrainConfig(log_interval=0), "--log-interval"),
    (lambda: TrainConfig(device="tpu"), "--device"),
    (lambda: TrainConfig(name="{modle}_x"), "--name"),
])
def test_invalid_values_are_rejected_naming_the_option(build, flag):
    with pytest.raises(UserError, match=flag):
        build()


def test_json_round_trip_keeps_every_value():
    smoke = CIFAR10Smoke()
    cfg = dataclasses.replace(smoke, seed=7, optim=OptimConfig(clip_grad_norm=None),
                              data=dataclasses.replace(smoke.data, mean=(1.0, 2.0, 3.5)))
    back = from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg))))
    assert to_dict(back) == to_dict(cfg)
    assert back.data.mean == cfg.data.mean and isinstance(back.data.mean, tuple)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config_file(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"optim": {"lrr": 1.0}}))
    with pytest.raises(UserError, match="optim.lrr"):
        load_config_file(unknown)
    wrong_type = tmp_path / "type.json"
    wrong_type.write_text(json.dumps({"data": {"batch_size": "many"}}))
    with pytest.raises(UserError, match="data.batch_size"):
        load_config_file(wrong_type)
    with pytest.raises(UserError, match="no such file"):
        load_config_file(tmp_path / "missing.json")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"sched": {"epochs": 5, "warmup_epochs": 1}}))
    assert load_config_file(partial).sched.epochs == 5
