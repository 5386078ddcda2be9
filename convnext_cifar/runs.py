"""`runs`: what the work dirs under some folders hold, read from their small files only
(config.json, metrics.jsonl, status.json, the lock), so it is quick and safe next to a run that
is still writing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convnext_cifar.checkpoints import STATUS_FILE, find_states, lock_is_held
from convnext_cifar.config import flatten

MAX_DEPTH = 4  # how far below a given folder work dirs are looked for
NOT_COMPARED = ("name", "work_dir")  # differ between runs by construction


def find_runs(folders: list[Path]) -> list[Path]:
    """Work dirs (folders with a config.json) at or below `folders`, each once, sorted."""
    found: set[Path] = set()
    for folder in folders:
        pending = [(Path(folder), 0)]
        while pending:
            here, depth = pending.pop()
            if (here / "config.json").is_file():
                found.add(here.resolve())
                continue
            if depth < MAX_DEPTH and here.is_dir():
                pending += [(p, depth + 1) for p in here.iterdir()
                            if p.is_dir() and not p.name.startswith(".")]
    return sorted(found)


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's complete lines (a line being appended right now is left out)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    records = []
    for line in text.split("\n"):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # empty, or cut short by a writer or a kill
    return records


def summarize(run_dir: Path) -> dict[str, Any] | None:
    """One row of the table; None when config.json cannot be read."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    records = read_records(run_dir / "metrics.jsonl")
    val = [r for r in records if "top1" in r]
    train = [r for r in records if "loss" in r]
    status = _status(run_dir)
    best = max(val, key=lambda r: max(r["top1"], r.get("ema_top1", -1)), default=None)
    data = config.get("data", {})
    return {
        "work_dir": str(run_dir), "name": config.get("name", run_dir.name),
        "model": config.get("model", {}).get("name"), "dataset": data.get("dataset"),
        "epochs_done": status.get("epoch", max((r["epoch"] for r in val), default=0)),
        "epochs": config.get("sched", {}).get("epochs"),
        "best_top1": max(best["top1"], best.get("ema_top1", -1)) if best else None,
        "best_epoch": best["epoch"] if best else None,
        "last_top1": val[-1]["top1"] if val else None,
        "img_per_s": train[-1]["img_per_s"] if train else None,
        "wall_s": status.get("elapsed_s"), "status": status["status"],
        "config": flatten(config)}


def _status(run_dir: Path) -> dict[str, Any]:
    """status.json, with what the lock says: a run whose file says running but whose lock no
    process holds was killed (interrupted)."""
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        status = {"status": "interrupted" if find_states(run_dir) else "not started"}
    if lock_is_held(run_dir):
        status["status"] = "running"
    elif status.get("status") == "running":
        status["status"] = "interrupted"
    return status


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """The config options whose values differ between the rows."""
    keys = sorted({k for r in rows for k in r["config"]} - set(NOT_COMPARED))
    return [k for k in keys if len({json.dumps(r["config"].get(k)) for r in rows}) > 1]


def list_runs(folders: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run's row, and the options that differ between them."""
    rows = [row for d in find_runs(folders) if (row := summarize(d)) is not None]
    return rows, compare(rows) if len(rows) > 1 else []
