"""End to end: `runs` lists finished, interrupted and running work dirs and what differs."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import ONE_EPOCH, small_run_args, timeless_records

from convnext_cifar import cli
from convnext_cifar.config import TrainConfig, to_dict
from convnext_cifar.outputs.runs import list_runs, ordered


def test_runs_passes_over_what_is_not_a_run(cifar_root, tmp_path, monkeypatch, capsys):
    real = tmp_path / "work_dirs" / "real"
    assert cli.main(small_run_args(cifar_root, real, *ONE_EPOCH)) == 0
    for name, text in (("foreign", '{"foo": 1}'), ("a_list", "[1, 2]"), ("broken", "{"),
                       ("half", '{"model": "x", "data": {}, "optim": {}, "sched": {}}')):
        (tmp_path / "work_dirs" / name).mkdir()
        (tmp_path / "work_dirs" / name / "config.json").write_text(text)
    (real / "status.json").write_text('["not", "a", "status"]')
    with open(real / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"epoch": "x", "top1": "y"}\n')
    locked = tmp_path / "work_dirs" / "locked"
    locked.mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    import fcntl

    taken = []
    real_fcntl, real_flock = fcntl.fcntl, fcntl.flock
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, *a: taken.append(cmd) if cmd in (
        getattr(fcntl, "F_OFD_SETLK", -1), fcntl.F_SETLK) else None or real_fcntl(fd, cmd, *a))
    monkeypatch.setattr(fcntl, "flock", lambda *a: taken.append("flock") or real_flock(*a))
    capsys.readouterr()
    assert cli.main(["runs", str(tmp_path / "work_dirs"), "--json"]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)["runs"]
    assert [Path(r["work_dir"]).name for r in rows] == ["real"] and out.err == ""
    assert rows[0]["status"] == "interrupted" or rows[0]["status"] == "not started"
    assert taken == []  # looked at the lock without taking it


def test_the_runs_table_keeps_names_and_results_whole(tmp_path, monkeypatch, capsys):
    for i in range(3):  # a dozen differing options, long run names
        work = tmp_path / f"a-rather-long-run-name-number-{i}"
        work.mkdir()
        config = to_dict(TrainConfig())
        config["name"] = work.name
        for j, key in enumerate(("lr", "weight_decay", "eps", "layer_decay")):
            config["optim"][key] = 0.1 * (i + 1) + j
        for key in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob"):
            config["aug"][key] = 0.1 * i
        config["seed"], config["sched"]["epochs"] = i, 10 + i
        config["data"]["padding"], config["data"]["flip_prob"] = i, 0.1 * i
        (work / "config.json").write_text(json.dumps(config))
        (work / "metrics.jsonl").write_text(json.dumps(
            {"epoch": 1, "val_loss": 1.0, "top1": 91.25 + i, "top5": 99.0}) + "\n")
    monkeypatch.setenv("COLUMNS", "160")
    assert cli.main(["runs", str(tmp_path), "--table"]) == 0
    out = capsys.readouterr().out
    for i in range(3):
        assert f"a-rather-long-run-name-number-{i}" in out
        assert f"{91.25 + i:.2f} (1)" in out
    assert "optim.lr=" in out and "…" not in out.split("differing")[0]
    assert max(len(line) for line in out.splitlines()) <= 160


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
    val = [r for r in timeless_records(trained) if "top1" in r]
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

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_loss": 0.5, "to')  # a writer caught mid-line
    assert cli.main(["runs", str(copy), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["last_top1"] == [r for r in timeless_records(trained) if "top1" in r][-1]["top1"]


def test_odd_records_and_status_values_are_passed_over_with_a_note(trained, tmp_path, capsys):
    """A string step, an infinite wall time, NaN and a truncated line crashed `runs` and
    `report` (ValueError: cannot convert float NaN to integer)."""
    work = tmp_path / "odd"
    shutil.copytree(trained, work)
    first_odd = len((work / "metrics.jsonl").read_text().splitlines()) + 1
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": "s", "loss": 1.0, "lr": 0.1}\n'
                '{"epoch": 3, "top1": 1e999, "top5": -1}\n'
                '{"epoch": 3, "top1": NaN}\n{"epoch": 4, "to\n'
                '{"epoch": 2, "step": 99, "loss": 0.5, "lr": 0.1, "grad_norm": 1, '
                '"img_per_s": 7}\n')
    (work / "status.json").write_text('{"status": "finished", "epoch": 1.5, "elapsed_s": 1e999}')
    capsys.readouterr()
    assert cli.main(["runs", str(work), "--json"]) == 0
    out = capsys.readouterr()
    (row,) = json.loads(out.out)["runs"]
    assert row["wall_s"] is None and row["epochs_done"] == 2 and row["img_per_s"] == 7
    assert row["notes"] == [f"{work.resolve() / 'metrics.jsonl'}: passed over 4 line(s) that "
                            f"are no well-formed record (first: line {first_odd})"]
    assert cli.main(["runs", str(work)]) == 0
    assert "passed over 4 line(s)" in capsys.readouterr().err
    assert cli.main(["report", str(work)]) == 0
    assert "passed over 4 line(s)" in capsys.readouterr().err


def _fake_run(folder, name, records=(), **options):
    """A work dir as a run leaves it: config.json with `options` (section__field=value) set,
    metrics.jsonl and status.json."""
    folder.mkdir(parents=True)
    config = to_dict(TrainConfig())
    config["name"] = name
    for key, value in options.items():
        section, field = key.split("__")
        config[section][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "status.json").write_text(json.dumps({"status": "finished", "epoch": 1,
                                                    "elapsed_s": 75.0}))
    return folder


def _daily_loop(tmp_path):
    """Two runs of one name in run1/ and run2/ (the issue's --work-dir run1 / run2), a long
    option value, and a tune study of two trials."""
    root = tmp_path / "work"
    name = "convnextv2-atto_cifar10-smoke"
    for i, decay in ((1, 0.0), (2, "auto")):
        _fake_run(root / f"run{i}", name, [{"epoch": 1, "top1": 60.0 + i}], optim__lr=i * 1e-3,
                  ema__decay=decay, data__root=f"/data/a-rather-long-folder-name-{i}/cifar")
    (root / "study").mkdir()
    (root / "study" / "study.db").write_bytes(b"")
    for t in range(2):
        _fake_run(root / "study" / f"trial-{t}", f"trial-{t}", [{"epoch": 1, "top1": 70.0 + t}],
                  optim__lr=0.5 + t, data__root=f"/data/a-rather-long-folder-name-{t}/cifar")
    return root


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_runs_fits_the_terminal_keeping_every_differing_option_whole(tmp_path, monkeypatch,
                                                                      capsys, columns):
    root = _daily_loop(tmp_path)
    monkeypatch.setenv("COLUMNS", str(columns))
    assert cli.main(["runs", str(root), "--table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows, differing = list_runs([root])
    assert sorted(differing) == ["data.root", "ema.decay", "name", "optim.lr"] or sorted(
        differing) == ["data.root", "ema.decay", "optim.lr"]
    for r in rows:  # each pair on one line, whole
        for key in ("optim.lr", "data.root", "ema.decay"):
            pair = f"{key}={json.dumps(r['config'][key])}"
            assert sum(pair in line for line in lines) >= 1, (pair, lines)
    assert all(len(line) <= columns for line in lines), [x for x in lines if len(x) > columns]
    text = "\n".join(lines)
    assert "run1 (convnextv2-atto_cifar10-smoke)" in text and "run2 (" in text  # told apart
    assert "study study (2 trial(s)):" in text and text.index("study study") < text.index(
        "trial-0") < text.index("trial-1")
    assert "…" not in text and "best top1 (ep)" in text
    assert cli.main(["runs", str(root / "study"), "--table"]) == 0  # the study's folder itself
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "study study (2 trial(s)):" and lines[3].startswith("  trial-0  finished")


def test_runs_piped_is_tab_separated_and_json_and_csv_round_trip(tmp_path, capsys):
    import csv

    root = _daily_loop(tmp_path)
    assert cli.main(["runs", str(root)]) == 0  # capsys: not a terminal
    table = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    head, body = table[0], table[1:]
    assert head[:4] == ["run", "name", "study", "status"] and "optim.lr" in head
    assert [r[0] for r in body] == ["run1 (convnextv2-atto_cifar10-smoke)",
                                    "run2 (convnextv2-atto_cifar10-smoke)", "study/trial-0",
                                    "study/trial-1"]
    assert [r[head.index("optim.lr")] for r in body] == ["0.001", "0.002", "0.5", "1.5"]
    assert [r[head.index("ema.decay")] for r in body][:2] == ["0.0", "auto"]  # text bare
    assert all(len(r) == len(head) for r in body)
    assert cli.main(["runs", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    rows, differing = list_runs([root])
    assert listed == json.loads(json.dumps({"runs": ordered(rows, None),
                                            "differing": differing}))
    assert cli.main(["runs", str(root), "--csv"]) == 0
    parsed = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert parsed[0] == head and [r[0] for r in parsed[1:]] == [r[0] for r in body]


def test_runs_sorts_and_filters(tmp_path, capsys):
    root = _daily_loop(tmp_path)

    def runs(*args):
        assert cli.main(["runs", str(root), "--json", *args]) == 0
        return [r["run"] for r in json.loads(capsys.readouterr().out)["runs"]]

    assert runs("--sort", "best")[:2] == ["run2 (convnextv2-atto_cifar10-smoke)",
                                          "run1 (convnextv2-atto_cifar10-smoke)"]
    assert runs("--sort", "optim.lr")[:2] == ["run1 (convnextv2-atto_cifar10-smoke)",
                                              "run2 (convnextv2-atto_cifar10-smoke)"]
    assert runs("--filter", "study=study") == ["study/trial-0", "study/trial-1"]
    assert runs("--filter", "ema.decay=auto") == ["run2 (convnextv2-atto_cifar10-smoke)"]
    assert runs("--filter", "status=finished", "--filter", "optim.lr=0.001") == [
        "run1 (convnextv2-atto_cifar10-smoke)"]
    assert runs("--filter", "dataset=folder") == []
    for bad, message in ((["--filter", "nokey"], "write KEY=VALUE"),
                         (["--filter", "optim.lrr=1"], "optim.lrr is neither a column"),
                         (["--sort", "speed"], "--sort speed: sort by best")):
        assert cli.main(["runs", str(root), *bad]) == 2
        assert message in capsys.readouterr().err


def test_runs_of_a_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    assert cli.main(["runs", str(tmp_path / "typo")]) == 2  # was: "no runs", exit 0
    assert "typo does not exist" in capsys.readouterr().err


def test_listing_fifty_runs_takes_under_a_second_without_torch(tmp_path):
    root = tmp_path / "many"
    for i in range(50):
        _fake_run(root / f"r{i:02d}", f"r{i:02d}", [{"epoch": e, "step": e, "loss": 1.0,
                                                     "img_per_s": 9.0} for e in range(1, 40)]
                  + [{"epoch": e, "top1": e} for e in range(1, 40)], optim__lr=i * 1e-4)
    code = ("import sys, time\nfrom pathlib import Path\nfrom convnext_cifar import cli\n"
            "t = time.perf_counter()\nassert cli.main(['runs', sys.argv[1], '--table']) == 0\n"
            "print('SECONDS', time.perf_counter() - t, 'TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, torch_loaded = out.stdout.split("SECONDS ")[1].split(" TORCH ")
    assert torch_loaded.strip() == "False" and float(seconds) < 1.0, out.stdout[-300:]
    assert out.stdout.count("optim.lr=") == 50
