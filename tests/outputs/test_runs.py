"""outputs/runs.py: the rows of `runs` from a work dir's small files, and what differs."""

import json

from convnext_cifar.config import OptimConfig, TrainConfig, config_json
from convnext_cifar.outputs.runs import compare, find_runs, list_runs, ordered, select, summarize


def work_dir(folder, lr=1e-3, status="finished", records=()):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config_json(TrainConfig(
        name=folder.name, optim=OptimConfig(lr=lr))))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "status.json").write_text(json.dumps({"status": status, "epoch": 2,
                                                    "elapsed_s": 61.0}))
    return folder


def test_a_row_holds_the_runs_best_last_speed_and_status(tmp_path):
    run = work_dir(tmp_path / "a", records=[
        {"epoch": 1, "step": 5, "loss": 2.0, "img_per_s": 100.0},
        {"epoch": 1, "top1": 40.0, "ema_top1": 45.0},
        {"epoch": 2, "step": 10, "loss": 1.0, "img_per_s": 120.0},
        {"epoch": 2, "top1": 44.0, "ema_top1": 41.0}])
    row = summarize(run)
    assert (row["best_top1"], row["best_epoch"], row["last_top1"]) == (45.0, 1, 44.0)
    assert (row["img_per_s"], row["wall_s"], row["epochs_done"]) == (120.0, 61.0, 2)
    assert row["status"] == "finished"
    assert row["config"]["optim.lr"] == 1e-3 and row["name"] == "a"


def test_a_running_status_without_the_lock_is_an_interrupted_run(tmp_path):
    assert summarize(work_dir(tmp_path / "b", status="running"))["status"] == "interrupted"


def test_runs_finds_work_dirs_below_folders_and_passes_over_other_configs(tmp_path):
    work_dir(tmp_path / "x" / "a")
    work_dir(tmp_path / "x" / "deep" / "b", lr=1e-2)
    other = tmp_path / "x" / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model": "resnet"}))
    assert [p.name for p in find_runs([tmp_path / "x"])] == ["a", "b", "other"]
    rows, differing = list_runs([tmp_path / "x", tmp_path / "x" / "a"])  # each once
    assert [r["name"] for r in rows] == ["a", "b"] and differing == ["optim.lr"]


def test_compare_leaves_out_what_differs_by_construction():
    rows = [{"config": {"name": n, "work_dir": n, "seed": s}} for n, s in (("a", 0), ("b", 0))]
    assert compare(rows) == []
    rows[1]["config"]["seed"] = 1
    assert compare(rows) == ["seed"]


def test_rows_are_labelled_by_their_folder_and_name_and_name_their_best_metric(tmp_path):
    work_dir(tmp_path / "w" / "run1", records=[{"epoch": 1, "top1": 50.0, "macro_f1": 40.0}])
    b = work_dir(tmp_path / "w" / "run2", records=[{"epoch": 1, "top1": 52.0}])
    config = json.loads((b / "config.json").read_text())
    config["name"], config["eval"]["best_metric"] = "other", "macro_f1"
    (b / "config.json").write_text(json.dumps(config))
    rows, _ = list_runs([tmp_path / "w"])
    assert [r["run"] for r in rows] == ["run1", "run2 (other)"]
    assert rows[1]["best_metric"] == "macro_f1" and rows[1]["best"] is None  # none recorded
    assert rows[0]["best"] == 50.0 and rows[0]["size_bytes"] > 0
    assert [r["run"] for r in list_runs([tmp_path / "w" / "run1"])[0]] == ["run1"]


def test_select_and_ordered_keep_a_studys_trials_together():
    rows = [{"run": n, "study": s, "status": "finished", "best": b, "config": {"optim.lr": lr}}
            for n, s, b, lr in (("a", None, 50.0, 0.1), ("s/t-0", "s", 90.0, 0.2),
                                ("b", None, 70.0, 0.3), ("s/t-1", "s", 95.0, 0.05))]
    assert [r["run"] for r in ordered(rows, "best")] == ["b", "a", "s/t-1", "s/t-0"]
    assert [r["run"] for r in ordered(rows, "optim.lr")] == ["a", "b", "s/t-1", "s/t-0"]
    assert [r["run"] for r in select(rows, ("optim.lr=0.3",))] == ["b"]
    assert [r["run"] for r in select(rows, ("study=s", "--optim.lr=0.2"))] == ["s/t-0"]
