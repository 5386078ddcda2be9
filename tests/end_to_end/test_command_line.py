"""End to end: the command line itself: options reach the config, presets and config files,
--help, --version, --print-config, suggestions, shell completion, a closed pipe."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from support import NAME, run_cli

from convnext_cifar import __version__, cli
from convnext_cifar.config import TrainConfig, config_json, from_dict
from convnext_cifar.presets import CIFAR10Smoke
from convnext_cifar.training import loop as training_loop

PUBLIC_OPTIONS = [
    "--ema.decay", "--ema.warmup-steps", "--aug.mixup-alpha", "--aug.cutmix-alpha",
    "--aug.mix-prob", "--aug.switch-prob", "--aug.mix-mode", "--aug.mix-off-epoch",
    "--aug.randaugment", "--aug.erasing-prob", "--optim.layer-decay", "--optim.layer-decay-type",
    "--model.head-init-scale", "--model.pretrained-weights", "--eval.tta",
    "cifar10-official-recipe", "cifar10-224",
    "--data.root", "--data.download", "--data.no-download", "--data.batch-size", "--model.name",
    "--model.pretrained", "--model.drop-path-rate", "--optim.lr", "--sched.epochs",
    "--sched.warmup-epochs", "--work-dir", "--seed", "--device", "--val-interval",
    "--ckpt-interval", "--log-interval", "--config", "--preset",
]


@pytest.fixture
def captured(monkeypatch):
    seen = []
    monkeypatch.setattr(training_loop, "fit", lambda cfg, **kw: seen.append(cfg))
    return seen


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\nfrom convnext_cifar import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    cli.main(['train', '--help'])\n"
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_overrides_reach_the_config(captured):
    rc = cli.main(["train", "--optim.lr", "1e-3", "--data.batch-size", "64", "--sched.epochs",
                   "20", "--sched.warmup-epochs", "2", "--model.name", "convnextv2_atto",
                   "--model.pretrained", "none", "--model.drop-path-rate", "0.1", "--data.root",
                   "/d", "--data.no-download", "--work-dir", "/w", "--seed", "3", "--device",
                   "cpu", "--val-interval", "2", "--ckpt-interval", "5", "--log-interval", "7"])
    assert rc == 0
    (c,) = captured
    assert (c.optim.lr, c.data.batch_size, c.sched.epochs, c.sched.warmup_epochs) == (
        1e-3, 64, 20, 2)
    assert (c.model.name, c.model.pretrained, c.model.drop_path_rate) == (
        "convnextv2_atto", "none", 0.1)
    assert (str(c.data.root), c.data.download, str(c.work_dir), c.seed, c.device) == (
        "/d", False, "/w", 3, "cpu")
    assert (c.val_interval, c.ckpt_interval, c.log_interval) == (2, 5, 7)
    assert c.model.label_smoothing == 0.2 and c.optim.clip_grad_norm == 5.0  # untouched


def test_default_train_is_the_reference_and_presets_are_selectable(captured):
    assert cli.main(["train"]) == 0 and captured[-1].run_name == "convnextv2-tiny_cifar10"
    assert cli.main(["train", "--model.name", "convnextv2_atto"]) == 0
    assert str(captured[-1].run_dir) == "work_dirs/convnextv2-atto_cifar10"  # says what ran
    assert cli.main(["train", "--preset", "smoke", "--seed", "4"]) == 0
    assert captured[-1].model.name == "convnextv2_atto" and captured[-1].seed == 4


def test_config_file_then_overrides_on_top(captured, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(config_json(CIFAR10Smoke(seed=11)))
    assert cli.main(["train", "--config", str(path), "--optim.lr", "2e-3"]) == 0
    c = captured[-1]
    assert c.seed == 11 and c.optim.lr == 2e-3 and c.model.name == "convnextv2_atto"


@pytest.mark.parametrize("args, message", [
    (["train", "--optim.lr", "0"], "invalid --optim.lr 0.0: must be > 0"),
    (["train", "--sched.warmup-epochs", "200"], "--sched.warmup-epochs"),
    (["train", "--model.name", "resnet18"], "--model.name"),
    (["train", "--preset", "smoke", "--config", "x.json"], "either --preset or --config"),
    (["train", "--config", "/nonexistent/config.json"], "no such file"),
    (["train", "--ema.decay", "1.5"], "invalid --ema.decay 1.5: must be in [0, 1)"),
    (["train", "--aug.mixup-alpha", "-0.2"], "invalid --aug.mixup-alpha -0.2"),
    (["train", "--aug.cutmix-alpha", "-1"], "invalid --aug.cutmix-alpha -1.0"),
    (["train", "--optim.layer-decay", "0"], "invalid --optim.layer-decay 0.0"),
    (["train", "--aug.randaugment", "rand-q9"], "invalid --aug.randaugment 'rand-q9'"),
    (["train", "--aug.randaugment", "augmix-m5"], "not a timm RandAugment string"),
    (["train", "--aug.erasing-prob", "2"], "invalid --aug.erasing-prob 2.0"),
    (["train", "--model.head-init-scale", "0"], "invalid --model.head-init-scale"),
])
def test_bad_options_end_in_one_line_and_exit_2(captured, capsys, args, message):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not captured


def test_help_documents_every_public_option_quickly():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for option in PUBLIC_OPTIONS:
        assert option in out.stdout, option
    top = run_cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "eval" in top.stdout


@pytest.mark.skipif(shutil.which("convnext-cifar") is None, reason="package not installed")
def test_console_script_is_installed():
    out = subprocess.run(["convnext-cifar", "train", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "--optim.lr" in out.stdout


def test_saved_config_reproduces_the_run_config(tmp_path, captured):
    path = tmp_path / "config.json"
    path.write_text(config_json(CIFAR10Smoke(seed=2)))
    cli.main(["train", "--config", str(path)])
    assert json.loads(config_json(captured[-1])) == json.loads(path.read_text())


def test_output_into_a_closed_pipe_ends_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited: every write fails
    try:
        out = subprocess.run([sys.executable, "-m", "convnext_cifar", "train", "--help"],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 141 and out.stderr == "", out.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--lr", "1e-3"], "did you mean --optim.lr"),
    (["train", "--optim.lrr", "1e-3"], "did you mean --optim.lr?"),
    (["train", "--data.workers", "2"], "did you mean --data.decode-processes"),
    (["train", "--batch-size", "64"], "did you mean --data.batch-size"),
])
def test_a_misspelt_option_gets_one_line_with_suggestions(args, expected, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not re.search(r"[│╭╮╰╯─]|\x1b\[|\[/?bold", err)  # no frame, colour or markup


def test_version_and_print_config_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"convnext-cifar {__version__}\n"
    assert importlib.metadata.version("convnext-cifar") == __version__
    assert cli.main(["train", "--preset", "smoke", "--optim.lr", "1e-3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = from_dict(TrainConfig, printed)
    assert (cfg.optim.lr, cfg.name, str(cfg.work_dir)) == (1e-3, NAME, f"work_dirs/{NAME}")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "work_dirs" / NAME).mkdir(parents=True)
    (tmp_path / "work_dirs" / NAME / "config.json").write_text("{}")
    assert cli.main(["train", "--preset", "smoke", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["work_dir"] == f"work_dirs/{NAME}-2"


def test_eval_and_predict_name_their_options_as_train_does(capsys):
    for command in ("eval", "predict"):
        assert cli.main([command, "--help"]) == 0
        text = "".join(capsys.readouterr())
        for option in ("--data.eval-batch-size", "--eval.tta", "--device", "--compile"):
            assert option in text, (command, option)
    assert cli.main(["train", "--help"]) == 0
    text = "".join(capsys.readouterr())
    assert "Global training batch" in text and "--data.decode-processes" in text


def test_shell_completion_is_available(capsys):
    assert cli.main(["--tyro-print-completion", "bash"]) == 0
    script = capsys.readouterr()
    assert "convnext-cifar" in script.out + script.err and "complete" in script.out + script.err


@pytest.mark.parametrize("args, warmup", [
    (["--preset", "smoke", "--sched.epochs", "1"], 0),  # was: an error on an unasked warmup
    (["--sched.epochs", "5"], 4),  # the reference's 10 warmup epochs
    (["--preset", "smoke", "--sched.epochs=2"], 1),  # fits already: no note
])
def test_a_presets_warmup_is_shortened_to_fit_the_epochs_given(args, warmup, capsys):
    assert cli.main(["train", *args, "--print-config"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["sched"]["warmup_epochs"] == warmup
    assert ("warmup epoch(s) do not fit --sched.epochs" in out.err) == (warmup != 1)


def test_a_warmup_given_with_the_epochs_is_checked_as_given(capsys):
    assert cli.main(["train", "--preset", "smoke", "--sched.epochs", "1",
                     "--sched.warmup-epochs", "1", "--print-config"]) == 2
    assert "invalid --sched.warmup-epochs 1: must be >= 0 and shorter than" in (
        capsys.readouterr().err)


def test_usage_lines_show_where_several_paths_are_taken_and_precision_says_cpu_bf16(capsys):
    for command, usage in (("predict", "CKPT PATH..."), ("runs", "DIR..."),
                           ("report", "WORK_DIR...")):
        assert cli.main([command, "--help"]) == 0
        assert usage in capsys.readouterr().out.splitlines()[0]
    assert cli.main(["train", "--help"]) == 0
    assert "CPUs with AMX" in " ".join(capsys.readouterr().out.split())
