"""End to end: TensorBoard and MLflow get every point once across a resume, the report's images
and artifacts, and a tracker that fails is one line while the run goes on."""

import io
import json
import os

import numpy as np
import pytest
from cifar_files import write_image_folder
from PIL import Image
from support import (
    EXACT,
    die_after_state,
    folder_args,
    signal_at_step,
    small_run_args,
    timeless_records,
    wandb_offline_history,
    wandb_offline_records,
)

from convnext_cifar import cli


def scalars(work):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag != "train/img_per_s" and not tag.startswith("time/")}  # wall clock


def test_mlflow_gets_params_metrics_and_artifacts_across_a_sigterm(cifar_root, tmp_path,
                                                                   monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    work = tmp_path / "run"
    args = small_run_args(cifar_root, work, "--sched.epochs", "2", "--sched.warmup-epochs", "0",
                          "--data.limit-train", "100", "--data.limit-val", "60",
                          "--log-interval", "1", "--log.mlflow", uri)
    restore = signal_at_step(monkeypatch, 3)  # mid-epoch 2 of 2-step epochs: after a state
    assert cli.main(args) == 143
    restore()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convnext-cifar").experiment_id])
    assert run.info.status == "KILLED"
    assert cli.main(args + ["--resume", "auto"]) == 0
    (run,) = client.search_runs([run.info.experiment_id])  # the same MLflow run, continued
    assert run.info.status == "FINISHED" and run.info.run_name == "convnextv2-atto_cifar10-smoke"
    assert run.data.params["optim.lr"] == "0.004" and run.data.params["data.batch_size"] == "50"
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    for name, key, kind in (("train/loss", "loss", "loss"), ("val/top1", "top1", "top1")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                            name))
        steps = [s for s, _ in history]
        assert steps == sorted(set(steps)), f"{name}: a point twice"
        expected = [r[key] for r in records if kind in r]
        assert [v for _, v in history] == pytest.approx(expected), f"{name}: missing points"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.safetensors", "report.html", "report-confusion.png"} <= artifacts
    assert (tmp_path / "mlruns").is_dir()  # where the artifacts went, not the repository


def test_wandb_offline_records_equal_metrics_jsonl_across_a_sigterm_and_resume(
        cifar_root, tmp_path, monkeypatch, capsys):
    """Point for point: every metrics.jsonl record once in the offline W&B run (two offline
    run folders of one run id), at its optimizer step, with the config and the artifacts."""
    from convnext_cifar.outputs.trackers import WANDB_STEP, tracker_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    work = tmp_path / "run"
    args = small_run_args(cifar_root, work, "--sched.epochs", "2", "--sched.warmup-epochs", "0",
                          "--data.limit-train", "100", "--data.limit-val", "60",
                          "--log-interval", "1", "--log.wandb", "convnext-cifar-test")
    restore = signal_at_step(monkeypatch, 3)  # mid-epoch 2: after the state of epoch 1
    assert cli.main(args) == 143
    restore()
    assert cli.main(args + ["--resume", "auto"]) == 0
    runs = sorted((work / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one run id
    rows = wandb_offline_history(work)
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    wall = ("train/img_per_s", "time/train_s", "time/validate_s", "time/state_s")
    expected, step = [], 0
    for r in records:  # a validation is at the step its epoch ended on
        step = r.get("step", step)
        expected.append((step, {k: v for k, v in tracker_metrics(r).items() if k not in wall}))
    got = [(row[WANDB_STEP], {k: v for k, v in row.items() if not k.startswith("_")
                              and k != WANDB_STEP and k not in wall}) for row in rows]
    assert len(got) == len(expected) == 6  # 4 log windows and 2 validations, none twice
    for (step, metrics), (want_step, want) in zip(got, expected):
        assert step == want_step and metrics.keys() == want.keys()
        assert [metrics[k] for k in sorted(want)] == pytest.approx([want[k] for k in sorted(want)])
    assert "Weights & Biases" not in capsys.readouterr().err  # no warning on the way
    assert json.loads((work / "wandb-run.json").read_text())["step"] == 4
    records = wandb_offline_records(work)
    config = {i.key: json.loads(i.value_json) for r in records
              if r.WhichOneof("record_type") == "run" for i in r.run.config.update}
    assert config["optim.lr"] == 0.004 and config["data.batch_size"] == 50
    artifacts = {(r.artifact.type, r.artifact.name.split("-", 1)[1]) for r in records
                 if r.WhichOneof("record_type") == "artifact"}
    assert artifacts == {("model", "best"), ("report", "report")}


def test_a_rollback_continues_in_a_new_wandb_run(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    work = tmp_path / "run"
    args = small_run_args(cifar_root, work, "--sched.epochs", "2", "--sched.warmup-epochs", "0",
                          "--data.limit-train", "100", "--data.limit-val", "60",
                          "--log.wandb", "p", "--keep-states")
    assert cli.main(args) == 0
    first = json.loads((work / "wandb-run.json").read_text())
    assert cli.main(args + ["--resume", str(work / "state_00000002.pt")]) == 0  # epoch 1's
    assert f"W&B run {first['id']} went on past step 2" in capsys.readouterr().err
    second = json.loads((work / "wandb-run.json").read_text())
    assert second["id"] != first["id"] and second["step"] == 4
    runs = {r.name.rsplit("-", 1)[1] for r in (work / "wandb").glob("offline-run-*")}
    assert runs == {first["id"], second["id"]}


@pytest.mark.parametrize("option, name", [(("--log.mlflow", "http://127.0.0.1:9"), "MLflow"),
                                          (("--log.wandb", "p"), "Weights & Biases")])
def test_an_unreachable_tracker_is_one_line_and_the_run_goes_on(cifar_root, tmp_path,
                                                                monkeypatch, capsys, option, name):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "1", "--data.limit-train",
                                   "50", "--data.limit-val", "50", "--sched.warmup-epochs", "0",
                                   *option)) == 0
    err = capsys.readouterr().err
    assert err.count(name) == 1 and "cannot be reached" in err
    assert (work / "best.safetensors").exists() and not (work / "wandb").exists()


def test_tensorboard_gets_the_report_images_and_the_hparams(cifar_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "1", "--data.limit-train",
                                   "50", "--data.limit-val", "50", "--sched.warmup-epochs", "0",
                                   "--log.tensorboard")) == 0
    acc = EventAccumulator(str(work / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert {"report/confusion", "report/augmentation"} <= set(acc.Tags()["images"])
    (image,) = acc.Images("report/confusion")
    png = (work / "report-confusion.png").read_bytes()
    assert Image.open(io.BytesIO(image.encoded_image_string)).size == Image.open(
        io.BytesIO(png)).size
    hparams = EventAccumulator(str(work / "tb" / "hparams"))
    hparams.Reload()
    assert "hparam/best_top1" in hparams.Tags()["scalars"]
    assert hparams.Scalars("hparam/best_top1")[0].value == pytest.approx(
        max(json.loads(x).get("top1", 0) for x in (work / "metrics.jsonl").read_text()
            .splitlines()))


@pytest.mark.slow  # ~27 s: three runs with a report each (MLflow's resume test stays fast)
def test_tensorboard_curves_continue_across_a_resume_without_gaps_or_repeats(
        cifar_root, tmp_path, monkeypatch):
    def run(work, *extra):
        return cli.main(small_run_args(cifar_root, work, *EXACT, "--log.tensorboard", *extra))

    assert run(tmp_path / "whole") == 0
    whole = scalars(tmp_path / "whole")
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/top1",
            "val/top5"} <= set(whole)
    steps = [r["step"] for r in timeless_records(tmp_path / "whole") if "step" in r]
    assert [s for s, _ in whole["train/loss"]] == steps
    restore = signal_at_step(monkeypatch, 6)
    assert run(tmp_path / "cut") == 143
    restore()
    restore = die_after_state(monkeypatch)  # and a hard kill after the next state, mid-run
    with pytest.raises(SystemExit):
        run(tmp_path / "cut", "--resume", "auto")
    restore()
    assert run(tmp_path / "cut", "--resume", "auto") == 0
    resumed = scalars(tmp_path / "cut")
    assert resumed.keys() == whole.keys()
    for tag in whole:
        assert [s for s, _ in resumed[tag]] == [s for s, _ in whole[tag]], tag
        np.testing.assert_allclose([v for _, v in resumed[tag]], [v for _, v in whole[tag]],
                                   rtol=1e-6, err_msg=tag)


def _dollar_classes(tmp_path):
    return write_image_folder(tmp_path / "data", {
        "train": {"price_$5_$10": 6, "$\\foo$": 6}, "val": {"price_$5_$10": 2, "$\\foo$": 2}})


def test_class_names_that_look_like_formulas_are_plain_text_and_the_run_finishes(tmp_path,
                                                                                capsys):
    """matplotlib read `$...$` as math: the report raised, and a tracked run ended with exit 1
    and status.json still `running` after training every epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, work = _dollar_classes(tmp_path), tmp_path / "run"
    assert cli.main(folder_args(data, work, "--sched.epochs", "1", "--data.batch-size", "4",
                                "--log.tensorboard")) == 0
    assert json.loads((work / "status.json").read_text())["status"] == "finished"
    acc = EventAccumulator(str(work / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "report/confusion" in acc.Tags()["images"]
    assert cli.main(["report", str(work), "--out", str(tmp_path / "again.html")]) == 0


def test_a_post_run_step_that_fails_is_one_line_and_the_run_stays_finished(
        cifar_root, tmp_path, monkeypatch, capsys):
    from convnext_cifar.outputs import trackers
    from convnext_cifar.training import loop

    def broken(*args, **kwargs):
        raise RuntimeError("the report broke\nwith a long story")

    monkeypatch.setattr(loop, "write_report", broken)
    monkeypatch.setattr(trackers.TensorBoardSink, "publish", broken)
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "1", "--data.limit-train",
                                   "50", "--data.limit-val", "50", "--sched.warmup-epochs", "0",
                                   "--log.tensorboard")) == 0
    err = capsys.readouterr().err
    assert "warning: no report for the trackers: the report broke\n" in err
    assert ("warning: after training, a tracker failed (RuntimeError: the report broke); the run "
            "is finished and its files are complete") in err
    assert json.loads((work / "status.json").read_text())["status"] == "finished"


def _holding(folder, secret: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_password_in_a_tracking_uri_is_never_recorded_nor_shown(cifar_root, tmp_path,
                                                                  monkeypatch, capsys):
    """Not in config.json, checkpoints, states, status, metrics, the report, TensorBoard, the
    console, `runs --json`, MLflow's params or store: MLflow gets it through its own variables."""
    from mlflow import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    store = tmp_path / "mlflow.db"
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "1", "--data.limit-train",
                                   "50", "--data.limit-val", "50", "--sched.warmup-epochs", "0",
                                   "--log.tensorboard", "--log.mlflow",
                                   f"sqlite://alice:S3CRET@/{store}")) == 0
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "S3CRET"  # for MLflow, in this process
    assert cli.main(["runs", str(work), "--json"]) == 0
    assert cli.main(["train", "--preset", "smoke", "--log.mlflow",
                     "http://alice:S3CRET@127.0.0.1:9/", "--print-config"]) == 0
    out = capsys.readouterr()
    assert "S3CRET" not in out.out + out.err and (work / "report.html").exists()
    assert json.loads((work / "config.json").read_text())["log"]["mlflow"] == f"sqlite:///{store}"
    assert _holding(work, b"S3CRET") == [] and _holding(tmp_path / "mlruns", b"S3CRET") == []
    assert b"S3CRET" not in store.read_bytes()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("convnext-cifar").experiment_id])
    assert run.data.params["log.mlflow"] == f"sqlite:///{store}"
    assert not any("S3CRET" in v for v in run.data.params.values())


def test_a_password_in_a_study_storage_url_is_shown_masked(tmp_path, capsys):
    assert cli.main(["tune", "--preset", "smoke", "--tune.trials", "0", "--work-dir",
                     str(tmp_path / "t"), "--tune.storage",
                     "postgresql://bob:S3CRET@127.0.0.1:9/study"]) == 2
    err = capsys.readouterr().err
    assert "postgresql://bob:***@127.0.0.1:9/study" in err and "S3CRET" not in err
