"""cli.py on its own (the commands run for real in end_to_end/): the one table of commands, the
config `train` starts from, and how each kind of error ends (one line, its exit code)."""

import json
import signal

import pytest

from convnext_cifar import cli
from convnext_cifar.config import TrainConfig, config_json
from convnext_cifar.errors import Interrupted, TrainingDiverged, UserError
from convnext_cifar.presets import PRESETS, CIFAR10Smoke


def test_one_table_names_every_command_the_usage_lists():
    table = cli.commands(TrainConfig())
    usage = [line.split()[1] for line in cli.__doc__.splitlines()
             if line.strip().startswith("convnext-cifar ")]
    assert list(table) == usage
    assert all(callable(c) for c in table.values())


def test_train_starts_from_a_preset_or_a_config_file_never_both(tmp_path):
    assert isinstance(cli.starting_config(["train"]), PRESETS[cli.DEFAULT_PRESET])
    assert isinstance(cli.starting_config(["train", "--preset=smoke"]), CIFAR10Smoke)
    saved = tmp_path / "config.json"
    saved.write_text(config_json(TrainConfig(seed=7)))
    assert cli.starting_config(["train", "--config", str(saved), "--seed", "3"]).seed == 7
    with pytest.raises(UserError, match="either --preset or --config"):
        cli.starting_config(["train", "--preset", "smoke", "--config", str(saved)])
    with pytest.raises(UserError, match="unknown --preset 'tiny'; choose one of cifar10, smoke"):
        cli.starting_config(["train", "--preset", "tiny"])


@pytest.mark.parametrize("error, code, line", [
    (UserError("no such file"), 2, "convnext-cifar: error: no such file"),
    (TrainingDiverged("nan at step 3"), 1, "convnext-cifar: error: nan at step 3"),
    (Interrupted("SIGTERM: stopped", 128 + signal.SIGTERM), 143, "convnext-cifar: SIGTERM: "
     "stopped"),
    (KeyboardInterrupt(), 130, "convnext-cifar: interrupted; nothing more was written"),
])
def test_each_kind_of_error_is_one_line_and_its_exit_code(monkeypatch, capsys, error, code,
                                                           line):
    def runs_then_fails(*args, **kwargs):
        def run():
            raise error
        return run

    monkeypatch.setattr(cli, "runs_command", runs_then_fails)
    assert cli.main(["runs"]) == code
    assert capsys.readouterr().err == line + "\n"


def test_only_rank_0_speaks_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["eval", "/nowhere/best.safetensors"]) == 2
    assert capsys.readouterr().err == ""


def test_version_and_print_config(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("convnext-cifar 0.")
    assert cli.main(["train", "--preset", "smoke", "--seed", "5", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["name"] == "convnextv2-atto_cifar10-smoke"


def test_the_process_age_is_read_from_proc():
    age = cli.process_age_s()
    assert 0.0 < age < 24 * 3600  # this test process started a while ago, not before boot
