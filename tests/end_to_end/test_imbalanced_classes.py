"""End to end: imbalanced classes: balanced accuracy and macro F1 in validation and eval, the
best checkpoint by the chosen metric, class weights and the balanced sampler resumed."""

import json

import pytest
from support import signal_at_step, small_run_args

from convnext_cifar import cli
from convnext_cifar.model.checkpoints import load_weights
from convnext_cifar.use.evaluate import EvalResult


def test_validation_and_eval_report_them_and_best_follows_the_chosen_metric(
        cifar_root, tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "2", "--data.limit-train",
                                   "100", "--data.limit-val", "90", "--optim.lr", "5e-4",
                                   "--eval.best-metric", "macro_f1")) == 0
    val = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()
           if '"top1"' in x]
    assert all({"balanced_accuracy", "macro_f1"} <= set(r) for r in val)
    best = max(val, key=lambda r: r["macro_f1"])  # the first of equals
    ckpt = load_weights(work / "best.safetensors")
    assert ckpt.epoch == best["epoch"] and ckpt.metrics["macro_f1"] == best["macro_f1"]
    out = capsys.readouterr().out
    assert "done: best macro_f1" in out
    lines = [x for x in out.splitlines() if " val  loss" in x]  # each names the metric it keeps
    assert len(lines) == 2 and all(f"  macro_f1 {r['macro_f1']:.2f}  " in x and x.endswith(
        f"(best macro_f1 {max(v['macro_f1'] for v in val[:i + 1]):.2f})")
        for i, (x, r) in enumerate(zip(lines, val)))
    assert cli.main(["eval", str(work / "best.safetensors"), "--json", "--compile", "off"]) == 0
    result = json.loads(capsys.readouterr().out)
    confusion = result["confusion"]
    again = EvalResult(90, 0, 0, 0, confusion)
    assert result["balanced_accuracy"] == pytest.approx(again.balanced_accuracy)
    assert result["macro_f1"] == pytest.approx(best["macro_f1"])
    assert cli.main(["eval", str(work / "best.safetensors"), "--compile", "off"]) == 0
    assert "balanced acc. %" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--loss.class-weights", "heavy"], "--loss.class-weights"),
    (["--loss.class-weights", "1,-2"], "--loss.class-weights"),
    (["--loss.class-weights", "1,2,3"], "gives 3 weights for 10 classes"),
])
def test_bad_class_weights_are_one_line(args, message, cifar_root, tmp_path, capsys):
    assert cli.main(small_run_args(cifar_root, tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.slow  # three short runs
def test_a_balanced_weighted_run_resumes_bit_exactly(cifar_root, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    args = ("--sched.epochs", "2", "--data.limit-train", "150", "--data.limit-val", "50",
            "--data.sampler", "balanced", "--loss.class-weights", "balanced",
            "--sched.warmup-epochs", "0")
    assert cli.main(small_run_args(cifar_root, tmp_path / "whole", *args)) == 0
    restore = signal_at_step(monkeypatch, 4)  # mid epoch 2 (3 steps an epoch)
    assert cli.main(small_run_args(cifar_root, tmp_path / "cut", *args)) == 143
    restore()
    assert cli.main(small_run_args(cifar_root, tmp_path / "cut", *args, "--resume",
                                   "auto")) == 0
    a = load_file(tmp_path / "whole" / "epoch_2.safetensors")
    b = load_file(tmp_path / "cut" / "epoch_2.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
