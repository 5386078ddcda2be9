"""outputs/runs.py: the rows of `runs` from a work dir's small files, and what differs."""

import json

from convnext_cifar.config import OptimConfig, TrainConfig, config_json
from convnext_cifar.outputs.runs import compare, find_runs, list_runs, summarize


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
