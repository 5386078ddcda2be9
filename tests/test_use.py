"""Using a trained model: predict, export (ONNX, torch.export), TensorBoard, the runs table."""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import die_after_state, signal_at_step, small_run_args
from PIL import Image
from test_resume import EXACT, records

from convnext_cifar import cli
from convnext_cifar.checkpoints import load_weights
from convnext_cifar.data import Normalize
from convnext_cifar.datasets import load_dataset
from convnext_cifar.evaluate import load_model, predict_logits


@pytest.fixture(scope="module")
def trained(cifar_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("trained")
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "2",
                                   "--data.limit-train", "300")) == 0
    return work


def eval_probabilities(best, root):
    """What `eval` computes for every test image, image by image: its softmax."""
    run = load_model(best)
    data = load_dataset(run.cfg.data, run.rt.device, train=False)
    with torch.inference_mode():
        x = run.normalize(data.val.images)
        return predict_logits(run.forward, x, run.rt).softmax(1), data.val.images


# ---- predict ----------------------------------------------------------------------------------

def test_predict_on_png_files_equals_eval_per_image(trained, cifar_root, tmp_path, capsys):
    best = trained / "best.safetensors"
    probs, images = eval_probabilities(best, cifar_root)
    folder = tmp_path / "pngs" / "nested"
    folder.mkdir(parents=True)
    for i, img in enumerate(images[:40]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    capsys.readouterr()
    assert cli.main(["predict", str(best), str(tmp_path / "pngs"), "--json", "--top-k", "3",
                     "--batch-size", "16"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 40
    classes = load_weights(best).classes
    for i, line in enumerate(lines):
        assert line["path"].endswith(f"{i:03d}.png")
        want = probs[i].topk(3)
        assert [t["class"] for t in line["top_k"]][0] == classes[int(want.indices[0])]
        got = torch.tensor([t["prob"] for t in line["top_k"]])
        torch.testing.assert_close(got, want.values, atol=1e-5, rtol=0)


def test_predict_reports_unreadable_files_and_still_predicts_the_rest(trained, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"nope")
    out_csv = tmp_path / "out.csv"
    capsys.readouterr()
    rc = cli.main(["predict", str(trained / "best.safetensors"), str(good),
                   str(tmp_path / "bad.png"), str(tmp_path / "missing.png"), "--csv",
                   str(out_csv), "--top-k", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "bad.png" in err and "missing.png" in err
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert len(rows) == 2 and rows[1][0] == str(good)
    assert cli.main(["predict", str(trained / "best.safetensors"), str(good), "--top-k",
                     "11"]) == 2
    assert "--top-k 11: must be between 1 and the 10 classes" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (lambda t: ["predict", str(t / "nope.safetensors"), "x.png"], "does not exist"),
    (lambda t: ["predict", str(t / "metrics.jsonl"), "x.png"], "not a readable safetensors"),
    (lambda t: ["export", str(t / "nope.safetensors"), "x.onnx"], "does not exist"),
    (lambda t: ["export", str(t / "best.safetensors"), "model.tflite"],
     "name the file *.onnx or *.pt2"),
    (lambda t: ["export", str(t / "best.safetensors"), "/no/such/dir/m.onnx"], "not a folder"),
])
def test_predict_and_export_bad_input_is_one_line(trained, tmp_path, capsys, args, message):
    capsys.readouterr()
    assert cli.main(args(trained)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


# ---- export ------------------------------------------------------------------------------------

def eager_logits(best, x):
    run = load_model(best)
    with torch.inference_mode():
        return run.model(x.contiguous()).float()


@pytest.mark.parametrize("suffix, preprocessing", [  # an ONNX export takes ~13 s
    (".onnx", True), (".pt2", False), pytest.param(".onnx", False, marks=pytest.mark.slow),
    pytest.param(".pt2", True, marks=pytest.mark.slow)])
def test_exported_files_match_eager_logits_at_batch_1_and_7(trained, tmp_path, suffix,
                                                            preprocessing):
    best = trained / "best.safetensors"
    out = tmp_path / f"model{suffix}"
    args = ["export", str(best), str(out)] + (["--include-preprocessing"] if preprocessing else [])
    assert cli.main(args) == 0
    meta_expected = load_weights(best)
    mean, std = meta_expected.config.data.mean, meta_expected.config.data.std
    if suffix == ".onnx":
        model = onnx.load(str(out))
        meta = {p.key: json.loads(p.value) for p in model.metadata_props}
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
    else:
        extra = {"convnext_cifar.json": ""}
        program = torch.export.load(str(out), extra_files=extra)
        meta = json.loads(extra["convnext_cifar.json"])
        run = lambda x: program.module()(x)  # noqa: E731
    assert meta["classes"] == meta_expected.classes and meta["image_size"] == 32
    assert meta["mean"] == pytest.approx(list(mean)) and meta["std"] == pytest.approx(list(std))
    for n in (1, 7):
        pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
        normalised = Normalize(mean, std, 32, "cpu", channels_last=False)(pixels)
        want = eager_logits(best, normalised)
        got = run(pixels if preprocessing else normalised)
        assert got.shape == (n, 10)
        assert (got - want).abs().max() <= 1e-4


def test_export_without_the_extra_names_it(trained, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxscript"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(trained / "best.safetensors"), str(out)]) == 2
    assert "pip install 'convnext-cifar[export]'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- TensorBoard -------------------------------------------------------------------------------

def scalars(work):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag != "train/img_per_s"}


@pytest.mark.slow  # ~27 s: three runs with a report each (MLflow's resume test stays fast)
def test_tensorboard_curves_continue_across_a_resume_without_gaps_or_repeats(
        cifar_root, tmp_path, monkeypatch):
    def run(work, *extra):
        return cli.main(small_run_args(cifar_root, work, *EXACT, "--log.tensorboard", *extra))

    assert run(tmp_path / "whole") == 0
    whole = scalars(tmp_path / "whole")
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/top1",
            "val/top5"} <= set(whole)
    assert [s for s, _ in whole["train/loss"]] == [r["step"] for r in records(tmp_path / "whole")
                                                   if "step" in r]
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


# ---- runs --------------------------------------------------------------------------------------

def test_runs_table_compares_finished_interrupted_and_running_work_dirs(
        trained, cifar_root, tmp_path, capsys):
    other = tmp_path / "runs" / "lr"
    assert cli.main(small_run_args(cifar_root, other, "--sched.epochs", "1", "--optim.lr",
                                   "1e-3", "--data.limit-train", "100",
                                   "--sched.warmup-epochs", "0")) == 0
    stopped = tmp_path / "runs" / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "convnext_cifar", *small_run_args(
        cifar_root, stopped, "--sched.epochs", "40", "--data.limit-train", "100")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        start = time.monotonic()
        while not (stopped / "metrics.jsonl").exists() and time.monotonic() - start < 120:
            time.sleep(0.05)
        capsys.readouterr()
        assert cli.main(["runs", str(trained), str(tmp_path / "runs"), "--json"]) == 0
        table = json.loads(capsys.readouterr().out)
        by_dir = {os.path.basename(r["work_dir"]): r for r in table["runs"]}
        assert by_dir["stopped"]["status"] == "running"  # another process is writing it now
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert cli.main(["runs", str(trained), str(tmp_path / "runs"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    by_dir = {os.path.basename(r["work_dir"]): r for r in table["runs"]}
    assert by_dir["stopped"]["status"] == "interrupted"  # killed: no lock, "running" on file
    finished = by_dir[trained.name]
    val = [r for r in records(trained) if "top1" in r]
    assert finished["status"] == "finished" and finished["epochs_done"] == 2
    assert finished["epochs"] == 2 and finished["best_top1"] == max(r["top1"] for r in val)
    assert finished["last_top1"] == val[-1]["top1"] and finished["wall_s"] > 0
    assert finished["img_per_s"] > 0 and finished["model"] == "convnextv2_atto"
    assert "optim.lr" in table["differing"] and "sched.epochs" in table["differing"]
    assert "name" not in table["differing"] and "work_dir" not in table["differing"]
    assert cli.main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "stopped" in out or "interrupted" in out


def test_runs_on_a_folder_without_runs_says_so(tmp_path, capsys):
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out


def test_runs_reads_a_metrics_line_being_written(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_loss": 0.5, "to')  # a writer caught mid-line
    assert cli.main(["runs", str(copy), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["last_top1"] == [r for r in records(trained) if "top1" in r][-1]["top1"]
