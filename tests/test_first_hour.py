"""A newcomer's first hour and the daily loop (issue 19), through the real command line:
versioned default work dirs, `--resume WORK_DIR`, typo suggestions, --version, --print-config,
the run's projected wall time, the EMA lag warning and `--ema.decay auto`, packaging."""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import signal_at_step

from convnext_cifar import __version__, cli
from convnext_cifar.config import TrainConfig, from_dict, load_config_file
from convnext_cifar.model import ema_lag_warning, ema_schedule
from convnext_cifar.report import RunClock

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the packaging checks read pyproject)

ROOT = Path(__file__).resolve().parents[1]
NAME = "convnextv2-atto_cifar10-smoke"


def quick(root, *extra):
    """`train` of the smoke preset on the generated data, default work dir, one short epoch."""
    return ["train", "--preset", "smoke", "--data.root", str(root), "--data.no-download",
            "--device", "cpu", "--compile", "off", "--sched.epochs", "1",
            "--sched.warmup-epochs", "0", "--data.limit-train", "100", "--data.limit-val", "50",
            "--data.batch-size", "25", "--log-interval", "2", *extra]


def test_a_second_run_gets_the_next_free_work_dir(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(quick(cifar_root)) == 0
    first = capsys.readouterr()
    assert f"-> work_dirs/{NAME}\n" in first.out and "holds another run" not in first.err
    assert cli.main(quick(cifar_root, "--optim.lr", "1e-3")) == 0
    second = capsys.readouterr()
    assert (f"note: work_dirs/{NAME} holds another run; this one goes to work_dirs/{NAME}-2"
            in second.err)
    runs = tmp_path / "work_dirs"
    assert load_config_file(runs / NAME / "config.json").optim.lr == 4e-3
    assert load_config_file(runs / f"{NAME}-2" / "config.json").optim.lr == 1e-3
    assert (runs / NAME / "best.safetensors").exists()
    assert (runs / f"{NAME}-2" / "best.safetensors").exists()
    # --resume auto continues the newest version; `runs` alone lists work_dirs
    assert cli.main(quick(cifar_root, "--optim.lr", "1e-3", "--resume", "auto")) == 0
    assert f"resumed from work_dirs/{NAME}-2/state_" in capsys.readouterr().out
    assert cli.main(["runs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert sorted(r["name"] for r in listed) == [NAME, f"{NAME}-2"]
    assert not (runs / f"{NAME}-3").exists()


def test_an_explicit_work_dir_is_used_as_given_and_never_over_results(cifar_root, tmp_path,
                                                                      capsys):
    work = tmp_path / "mine"
    assert cli.main(quick(cifar_root, "--work-dir", str(work))) == 0
    capsys.readouterr()
    assert cli.main(quick(cifar_root, "--work-dir", str(work), "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert f"work dir {work} holds the results of an earlier run" in err
    assert f"--resume {work}" in err


def test_an_interrupted_run_resumes_from_its_folder_with_its_own_config(cifar_root, tmp_path,
                                                                        monkeypatch, capsys):
    work = tmp_path / "run"
    restore = signal_at_step(monkeypatch, 3)
    custom = ("--optim.lr", "2e-3", "--aug.randaugment", "rand-m5-n1", "--optim.weight-decay",
              "0.01")
    assert cli.main(quick(cifar_root, "--work-dir", str(work), *custom)) == 143
    err = capsys.readouterr().err
    assert f"Resume with: convnext-cifar train --resume {work}" in err
    restore()
    # the state's own config: nothing but the folder on the command line
    assert cli.main(["train", "--resume", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {work}/state_00000003.pt" in out
    cfg = load_config_file(work / "config.json")
    assert (cfg.optim.lr, cfg.aug.randaugment, cfg.optim.weight_decay) == (2e-3, "rand-m5-n1",
                                                                           0.01)
    assert cfg.sched.epochs == 1 and cfg.data.limit_train == 100
    # a state file works the same way, without --config; what is not resumable is refused
    state = sorted(work.glob("state_*.pt"))[-1]
    assert cli.main(["train", "--resume", str(state), "--optim.lr", "5e-3"]) == 2
    assert "config differs in optim.lr (0.002 -> 0.005)" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(state), "--log-interval", "3"]) == 0
    # an empty folder or a wrong path: one line, exit 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no readable training state" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such work dir or training state" in capsys.readouterr().err


def test_the_run_projects_its_wall_time_after_the_first_log_window(cifar_root, tmp_path, capsys):
    assert cli.main(quick(cifar_root, "--work-dir", str(tmp_path / "w"), "--sched.epochs", "2"
                          )) == 0
    lines = capsys.readouterr().out.splitlines()
    first_log = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2 [2/4]"))
    projections = [i for i, line in enumerate(lines)
                   if line.startswith("projected wall time of the run: ")]
    assert projections[0] == first_log + 1
    assert "the 2 validation(s) are not measured yet" in lines[projections[0]]
    # refined once the first validation is timed
    assert len(projections) == 2 and "+ 1 validation(s) at" in lines[projections[1]]
    assert re.search(r"run eta \d+ (s|min)", lines[first_log])


def test_run_clock_counts_steps_and_the_validations_still_due():
    clock = RunClock(epochs=10, steps_per_epoch=100, batch_size=128, val_interval=3)
    assert clock.left_s(0, 0) is None  # nothing measured yet
    clock.step_s = 0.5
    # validations after epochs 3, 6, 9 and the last (10)
    assert clock.validations_after(0) == 4 and clock.validations_after(6) == 2
    assert clock.left_s(250, 2) == pytest.approx(750 * 0.5)  # no validation timed yet
    clock.val_s = 4.0
    assert clock.left_s(250, 2) == pytest.approx(750 * 0.5 + 4 * 4.0)
    assert clock.left_s(1000, 10) == 0


def test_a_lagging_ema_is_warned_about_and_auto_keeps_up(cifar_root, tmp_path, capsys):
    assert cli.main(quick(cifar_root, "--work-dir", str(tmp_path / "a"), "--ema.decay",
                          "0.999")) == 0
    err = capsys.readouterr().err
    assert ("warning: --ema.decay 0.999 averages over about 1,000 optimizer steps, 25000% of "
            "this 4-step run") in err
    assert "75.37 top-1 against 82.32 raw" in err and "--ema.decay auto" in err
    assert cli.main(quick(cifar_root, "--work-dir", str(tmp_path / "b"), "--ema.decay",
                          "auto")) == 0
    assert "--ema.decay" not in capsys.readouterr().err
    assert load_config_file(tmp_path / "b" / "config.json").ema.decay == "auto"
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert "ema_top1" in records[-1]


def test_ema_auto_picks_a_tenth_of_the_run_with_warmup():
    assert ema_schedule("auto", 0, 942) == (pytest.approx(1 - 10 / 942), 1)
    assert ema_schedule("auto", 5, 39_100) == (pytest.approx(1 - 10 / 39_100), 5)
    assert ema_schedule("auto", 0, 20) == (0.9, 1)  # clamped
    assert ema_schedule("auto", 0, 10**9) == (0.9999, 1)
    assert ema_schedule(0.999, 0, 942) == (0.999, 0)
    assert ema_lag_warning(0.999, 942) and not ema_lag_warning(0.9999, 39_100)
    assert not ema_lag_warning(0.0, 10)
    assert from_dict(TrainConfig, {"ema": {"decay": "auto"}}).ema.decay == "auto"
    with pytest.raises(Exception, match="ema.decay"):
        from_dict(TrainConfig, {"ema": {"decay": "often"}})


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


def test_suggestions_survive_a_box_without_tyros_list():
    box = "╭─ Unrecognized options ─╮\n│ Unrecognized options: --lr, 1e-3 │\n╰────────╯\n"
    line = cli._one_line(box, ["train", "--lr", "1e-3"])
    assert line == ("Unrecognized options: --lr, 1e-3; did you mean --optim.lr? (see "
                    "convnext-cifar train --help)")
    ascii_box = ("Unrecognized options\n------\nUnrecognized options: --optim.lrr, 1\n------\n"
                 "Perhaps you meant:\n    --optim.lr FLOAT\n        Peak learning rate.\n"
                 "        in convnext-cifar train --help\n------\nFor full helptext, run x\n")
    assert cli._one_line(ascii_box, ["train"]) == (
        "Unrecognized options: --optim.lrr, 1; did you mean --optim.lr? (see convnext-cifar "
        "train --help)")


def test_an_old_config_with_workers_still_loads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": {"workers": 3}}))
    assert load_config_file(path).data.decode_processes == 3


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


# ---- packaging ----------------------------------------------------------------------------------

STDLIB = set(sys.stdlib_module_names)
DISTRIBUTIONS = {"PIL": "pillow", "huggingface_hub": "huggingface-hub",
                 "mlflow": "mlflow-skinny"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_package_the_code_imports_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-")
                for d in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-") for d in extra}
    imported = set().union(*(_imports(p) for p in (ROOT / "convnext_cifar").glob("*.py")))
    third_party = {m for m in imported - STDLIB if m not in ("convnext_cifar", "__future__")}
    missing = {m for m in third_party
               if DISTRIBUTIONS.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing
    assert {"numpy", "pillow", "huggingface-hub"} <= declared
    assert "version" in project["dynamic"] and "version" not in project


def test_a_licence_file_matches_the_declared_licence():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    readme = (ROOT / "README.md").read_text()
    assert "CC-BY-NC 4.0" in readme


def test_no_private_internals_without_a_fallback(monkeypatch):
    from huggingface_hub import constants

    from convnext_cifar.model import hub_offline_unless_reachable
    from convnext_cifar.optim import fused_supported

    assert fused_supported("cpu") and not fused_supported("meta")
    source = "\n".join(p.read_text() for p in (ROOT / "convnext_cifar").glob("*.py"))
    assert "torch.utils._" not in source and "_get_fused" not in source
    monkeypatch.delattr(constants, "HF_HUB_OFFLINE")  # a hub client without the switch
    with hub_offline_unless_reachable({"hf_hub_id": "timm/x"}) as unreachable:
        assert unreachable == ""


def test_the_readme_reads_in_a_newcomers_order():
    text = (ROOT / "README.md").read_text()
    headings = [h for h in re.findall(r"^## (.+)$", text, re.M)]
    order = ["Quickstart", "Results", "Your own images", "Common tasks", "Coming from timm",
             "FAQ", "Internals"]
    found = [next(i for i, h in enumerate(headings) if h.startswith(o)) for o in order]
    assert found == sorted(found), headings
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "python3 -m venv" in quickstart and ". .venv/bin/activate" in quickstart
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.findall(r"```bash\n(.+?)\n```", quickstart, re.S)[1].strip()
    assert test_command in ci


@pytest.mark.slow
def test_the_quickstart_installs_in_a_fresh_venv(tmp_path):
    """A fresh venv (no system packages): `pip install .` and the console script works."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(ROOT)], check=True, timeout=1800)
    out = subprocess.run([str(venv / "bin" / "convnext-cifar"), "--version"], check=True,
                         capture_output=True, text=True)
    assert out.stdout.strip() == f"convnext-cifar {__version__}"
    out = subprocess.run([str(venv / "bin" / "convnext-cifar"), "train", "--preset", "smoke",
                          "--print-config"], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    assert json.loads(out.stdout)["model"]["name"] == "convnextv2_atto"
