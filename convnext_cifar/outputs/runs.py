"""`runs`: what the work dirs under some folders hold, read from their small files only
(config.json, metrics.jsonl, status.json, the lock), so it is quick and safe next to a run that
is still writing them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from convnext_cifar.config import flatten
from convnext_cifar.outputs.metrics_log import read_records, skipped_note
from convnext_cifar.outputs.workdir import (
    CONFIG_FILE,
    METRICS_FILE,
    read_status,
    set_aside_bytes,
    set_aside_lines,
)

MAX_DEPTH = 4  # how far below a given folder work dirs are looked for
NOT_COMPARED = ("name", "work_dir")  # differ between runs by construction


def find_runs(folders: list[Path]) -> list[Path]:
    """Work dirs (folders with a config.json) at or below `folders`, each once, sorted; a folder
    that cannot be read is passed over."""
    found: set[Path] = set()
    for folder in folders:
        pending = [(Path(folder), 0)]
        while pending:
            here, depth = pending.pop()
            try:
                if (here / CONFIG_FILE).is_file():
                    found.add(here.resolve())
                    continue
                if depth < MAX_DEPTH and here.is_dir():
                    pending += [(p, depth + 1) for p in here.iterdir()
                                if p.is_dir() and not p.name.startswith(".")]
            except OSError:  # unreadable: not ours to list
                continue
    return sorted(found)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_run_config(config: Any) -> bool:
    """Whether a config.json is one a run wrote (another tool's is passed over)."""
    return isinstance(config, dict) and all(
        isinstance(config.get(k), dict) for k in ("model", "data", "optim", "sched")) and (
        isinstance(config["model"].get("name"), str))


def summarize(run_dir: Path) -> dict[str, Any] | None:
    """One row of the table; None when the folder is not a run's work dir."""
    config = _read_json(run_dir / CONFIG_FILE)
    if not is_run_config(config):
        return None
    skipped: list[int] = []
    records = read_records(run_dir / METRICS_FILE, skipped)
    val = [r for r in records if _number(r.get("top1"))]
    train = [r for r in records if _number(r.get("loss"))]
    status = read_status(run_dir)
    best = max(val, key=lambda r: max(r["top1"], _ema(r)), default=None)
    return {
        "work_dir": str(run_dir), "name": str(config.get("name", run_dir.name)),
        "model": config["model"]["name"], "dataset": config["data"].get("dataset"),
        "epochs_done": status["epoch"] if isinstance(status.get("epoch"), int) else max(
            (r["epoch"] for r in val), default=0),
        "epochs": config["sched"].get("epochs"),
        "best_top1": max(best["top1"], _ema(best)) if best else None,
        "best_epoch": best["epoch"] if best else None,
        "last_top1": val[-1]["top1"] if val else None,
        "img_per_s": train[-1]["img_per_s"] if train and _number(train[-1].get("img_per_s"))
        else None,
        "wall_s": status["elapsed_s"] if _number(status.get("elapsed_s")) else None,
        "status": status["status"],
        "set_aside_lines": len(set_aside_lines(run_dir)),
        "set_aside_bytes": set_aside_bytes(run_dir),
        "notes": [note] if (note := skipped_note(run_dir / METRICS_FILE, skipped)) else [],
        "config": flatten(config)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def _ema(record: dict[str, Any]) -> float:
    return record["ema_top1"] if _number(record.get("ema_top1")) else -1.0


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """The config options whose values differ between the rows."""
    keys = sorted({k for r in rows for k in r["config"]} - set(NOT_COMPARED))
    return [k for k in keys if len({json.dumps(r["config"].get(k)) for r in rows}) > 1]


def list_runs(folders: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run's row, and the options that differ between them."""
    rows = []
    for work_dir in find_runs(folders):
        try:
            row = summarize(work_dir)
        except OSError:  # a work dir that cannot be read: passed over, quietly
            continue
        if row is not None:
            rows.append(row)
    return rows, compare(rows) if len(rows) > 1 else []
