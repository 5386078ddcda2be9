"""outputs/trackers.py on its own (MLflow and TensorBoard for real: end_to_end/test_trackers.py):
which trackers a config turns on, and the names records get there."""

import dataclasses
import sys
from pathlib import Path

import pytest

from convnext_cifar.config import LogConfig, TrainConfig
from convnext_cifar.errors import UserError
from convnext_cifar.outputs.trackers import (
    MlflowSink,
    TensorBoardSink,
    WandbSink,
    tracker_metrics,
    trackers_for,
)


def test_the_config_turns_each_tracker_on():
    assert trackers_for(TrainConfig()) == []
    cfg = dataclasses.replace(TrainConfig(work_dir=Path("w")),
                              log=LogConfig(tensorboard=True, mlflow="sqlite:///m.db"))
    tb, mlflow = trackers_for(cfg)
    assert isinstance(tb, TensorBoardSink) and tb.folder == Path("w/tb")
    assert isinstance(mlflow, MlflowSink) and mlflow.uri == "sqlite:///m.db"
    assert mlflow.state_name == "tracking" and tb.state_name is None  # purged by step instead
    assert tb.takes_report and mlflow.takes_report


def test_records_become_train_and_val_metrics():
    assert tracker_metrics({"epoch": 1, "step": 10, "loss": 0.5, "lr": 1e-3, "img_per_s": 9,
                            "skipped_steps": 2}) == {
        "train/loss": 0.5, "train/lr": 1e-3, "train/img_per_s": 9.0, "train/skipped_steps": 2.0}
    assert tracker_metrics({"epoch": 1, "val_loss": 1.5, "top1": 50, "ema_val_loss": 1.4,
                            "ema_top1": 52.0, "note": "x", "flag": True}) == {
        "val/loss": 1.5, "val/top1": 50.0, "val/ema_loss": 1.4, "val/ema_top1": 52.0}
    # a distilled run's validation: agreement, KL and the teacher's top-1 beside the rest
    assert tracker_metrics({"epoch": 2, "val_loss": 1.0, "top1": 60, "agreement": 81.5,
                            "teacher_kl": 0.25, "teacher_top1": 70.0, "train_s": 3.0}) == {
        "val/loss": 1.0, "val/top1": 60.0, "val/agreement": 81.5, "val/teacher_kl": 0.25,
        "val/teacher_top1": 70.0, "time/train_s": 3.0}


def test_tensorboard_drops_what_followed_the_state_it_resumes_from(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(work_dir=tmp_path)
    first = TensorBoardSink(tmp_path / "tb", cfg)
    first.open(0, resumed=False)
    for step in (1, 2, 3):
        first.add({"epoch": 1, "step": step, "loss": float(step)}, step)
    first.close("interrupted")
    resumed = TensorBoardSink(tmp_path / "tb", cfg)
    resumed.open(1, resumed=True)  # from the state at step 1: steps 2 and 3 come again
    resumed.add({"epoch": 1, "step": 2, "loss": 20.0}, 2)
    resumed.close("finished")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0)]


@pytest.mark.parametrize("module, make, option", [
    ("torch.utils.tensorboard", lambda tmp, cfg: TensorBoardSink(tmp / "tb", cfg).open(0, False),
     "--log.tensorboard"),
    ("mlflow", lambda tmp, cfg: MlflowSink("sqlite:///x.db", cfg), "--log.mlflow"),
    ("wandb", lambda tmp, cfg: WandbSink("proj", cfg), "--log.wandb"),
])
def test_a_tracker_without_its_extra_says_which_to_install(tmp_path, monkeypatch, module, make,
                                                           option):
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    extra = option.removeprefix("--log.")
    with pytest.raises(UserError, match=rf"^{option} needs the {extra} extra: pip install "
                                        rf"'\.\[{extra}\]' from the project's clone$"):
        make(tmp_path, TrainConfig(work_dir=tmp_path))
