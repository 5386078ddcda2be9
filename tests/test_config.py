"""config.py: frozen sections, every value checked when built (naming the option), the JSON
round trip of config.json, and older config files."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from convnext_cifar.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
    from_dict,
    load_config_file,
    to_dict,
)
from convnext_cifar.errors import UserError
from convnext_cifar.presets import CIFAR10FineTune, CIFAR10Smoke


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
    (lambda: DataConfig(batch_size=64, micro_batch=48), "--data.micro-batch 48: must divide"),
    (lambda: DataConfig(batch_size=64, micro_batch=128), "--data.micro-batch 128: must be auto"),
    (lambda: DataConfig(micro_batch_memory=-1.0), "--data.micro-batch-memory"),
    (lambda: TrainConfig(data=DataConfig(micro_batch="auto"), optim=OptimConfig(accum_steps=2)),
     "--optim.accum-steps 2: set it or --data.micro-batch, not both"),
])
def test_invalid_values_are_rejected_naming_the_option(build, flag):
    with pytest.raises(UserError, match=flag):
        build()


def test_the_accumulation_steps_follow_the_micro_batch_or_the_option():
    assert TrainConfig(optim=OptimConfig(accum_steps=4)).accum_steps() == 4
    by_micro = TrainConfig(data=DataConfig(batch_size=128, micro_batch=16))
    assert by_micro.accum_steps() == 8 and by_micro.accum_steps(world=2) == 4
    assert TrainConfig(data=DataConfig(micro_batch="auto")).accum_steps() == 1  # until chosen


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


def test_default_work_dir_says_what_ran():

    from convnext_cifar.config import ModelConfig
    from convnext_cifar.presets import CIFAR10FineTune, CIFAR10Smoke

    ref = CIFAR10FineTune()
    assert ref.run_dir == Path("work_dirs/convnextv2-tiny_cifar10")
    atto = dataclasses.replace(ref, model=ModelConfig(name="convnextv2_atto"))
    assert atto.run_dir == Path("work_dirs/convnextv2-atto_cifar10")
    assert CIFAR10Smoke().run_dir == Path("work_dirs/convnextv2-atto_cifar10-smoke")
    assert dataclasses.replace(ref, name="mine").run_dir == Path("work_dirs/mine")
    assert TrainConfig(work_dir=Path("/x")).run_dir == Path("/x")


def test_an_old_config_with_workers_still_loads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": {"workers": 3}}))
    assert load_config_file(path).data.decode_processes == 3


def test_a_password_in_the_mlflow_uri_goes_to_mlflows_variables_not_the_config(monkeypatch):
    from convnext_cifar.config import LogConfig, config_json

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    log = LogConfig(mlflow="https://alice:S3CRET@mlflow.example.com/")
    assert log.mlflow == "https://mlflow.example.com/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "S3CRET"
    assert "S3CRET" not in config_json(TrainConfig(log=log))


@pytest.mark.parametrize("project", ["team/proj", "a b", "x" * 129, "what?"])
def test_a_wandb_project_that_wandb_refuses_is_refused_when_the_config_is_built(project):
    from convnext_cifar.config import LogConfig

    with pytest.raises(UserError, match="invalid --log.wandb .*a W&B project name"):
        LogConfig(wandb=project)
    assert LogConfig(wandb="convnext-cifar_runs.1").wandb == "convnext-cifar_runs.1"
