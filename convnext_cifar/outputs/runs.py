"""`runs`: what the work dirs under some folders hold, read from their small files only
(config.json, metrics.jsonl, status.json, the lock), so it is quick and safe next to a run that
is still writing them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from convnext_cifar.config import flatten
from convnext_cifar.errors import UserError
from convnext_cifar.metrics import AGREEMENT
from convnext_cifar.outputs.console import runs_delimited, runs_table
from convnext_cifar.outputs.metrics_log import read_records, skipped_note
from convnext_cifar.outputs.workdir import (
    CONFIG_FILE,
    METRICS_FILE,
    read_status,
    set_aside_bytes,
    set_aside_lines,
)
from convnext_cifar.terminal import is_terminal, warn

MAX_DEPTH = 4  # how far below a given folder work dirs are looked for
NOT_COMPARED = ("name", "work_dir")  # differ between runs by construction
STUDY_MARKERS = ("study.db", ".ask-lock")  # beside the trial folders of a `tune` study


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
    metric = (config.get("eval") or {}).get("best_metric") or "top1"
    scored = [r for r in records if _number(r.get(metric))]
    best = max(scored, key=lambda r: _best_of(r, metric), default=None)
    best_top1 = max(val, key=lambda r: _best_of(r, "top1"), default=None)
    return {
        "run": run_dir.name, "work_dir": str(run_dir),
        "name": str(config.get("name", run_dir.name)),
        "study": run_dir.parent.name if any((run_dir.parent / m).exists() for m in STUDY_MARKERS)
        else None,
        "model": config["model"]["name"], "dataset": config["data"].get("dataset"),
        "teacher": _teacher(config),
        "epochs_done": status["epoch"] if isinstance(status.get("epoch"), int) else max(
            (r["epoch"] for r in val), default=0),
        "epochs": status["epochs"] if isinstance(status.get("epochs"), int)  # a budget's plan
        else config["sched"].get("epochs"),
        "best_metric": metric,
        "best": _best_of(best, metric) if best else None,
        "best_epoch": best["epoch"] if best else None,
        "best_top1": _best_of(best_top1, "top1") if best_top1 else None,
        "last_top1": val[-1]["top1"] if val else None,
        "last_agreement": val[-1].get(AGREEMENT) if val and _number(val[-1].get(AGREEMENT))
        else None,
        "img_per_s": train[-1]["img_per_s"] if train and _number(train[-1].get("img_per_s"))
        else None,
        "wall_s": status["elapsed_s"] if _number(status.get("elapsed_s")) else None,
        **_budget(status),
        "lr_found": status.get("lr_found") if isinstance(status.get("lr_found"), dict) else None,
        **{k: status[k] if isinstance(status.get(k), int) else None  # --data.micro-batch auto
           for k in ("micro_batch", "accum_steps")},
        "status": status["status"],
        "size_bytes": folder_bytes(run_dir),
        "set_aside_lines": len(set_aside_lines(run_dir)),
        "set_aside_bytes": set_aside_bytes(run_dir),
        "notes": [note] if (note := skipped_note(run_dir / METRICS_FILE, skipped)) else [],
        "config": flatten(config)}


def _budget(status: dict[str, Any]) -> dict[str, Any]:
    """--sched.budget's seconds and what the run used of it (its setup and probe before the
    first epoch, then its training wall time); None without a budget."""
    budget, setup, wall = (status.get(k) for k in ("budget_s", "setup_s", "elapsed_s"))
    used = setup + wall if _number(budget) and _number(setup) and _number(wall) else None
    return {"budget_s": budget if _number(budget) else None, "budget_used_s": used}


def _teacher(config: dict[str, Any]) -> str | None:
    """The distillation teacher's file name (a work dir's: its folder name), None without one."""
    teacher = (config.get("distill") or {}).get("teacher")
    return Path(teacher).name if isinstance(teacher, str) and teacher else None


def folder_bytes(folder: Path) -> int:
    """What the files under `folder` hold on disk (files that vanish meanwhile count 0)."""
    total = 0
    for here, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(here, name), follow_symlinks=False).st_size
    return total


def _best_of(record: dict[str, Any], metric: str) -> float:
    """A validation record's value of `metric`, or its EMA's where that is higher."""
    ema = record.get("ema_" + metric)
    return max(record[metric], ema) if _number(ema) else record[metric]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """The config options whose values differ between the rows."""
    keys = sorted({k for r in rows for k in r["config"]} - set(NOT_COMPARED))
    return [k for k in keys if len({json.dumps(r["config"].get(k)) for r in rows}) > 1]


def list_runs(folders: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run's row, and the options that differ between them. A row's `run` is its work
    dir as it lies under the folder it was found in (its folder name when given itself), and
    the run's name beside it where that differs."""
    rows = []
    for work_dir in find_runs(folders):
        try:
            row = summarize(work_dir)
        except OSError:  # a work dir that cannot be read: passed over, quietly
            continue
        if row is not None:
            row["run"] = _label(work_dir, folders, row["name"])
            rows.append(row)
    return rows, compare(rows) if len(rows) > 1 else []


def _label(work_dir: Path, folders: list[Path], name: str) -> str:
    label = work_dir.name
    for folder in folders:
        with contextlib.suppress(OSError, ValueError):
            inside = work_dir.relative_to(Path(folder).resolve())
            if inside.parts:
                label = inside.as_posix()
                break
    return label if name == work_dir.name else f"{label} ({name})"


# ---- choosing and ordering rows (--filter, --sort) -----------------------------------------------

FIELDS = ("run", "name", "study", "status", "model", "dataset", "teacher", "best_metric")
NUMBERS = {"best": "best", "last": "last_top1", "img/s": "img_per_s", "img_per_s": "img_per_s",
           "wall": "wall_s", "size": "size_bytes", "epochs": "epochs_done"}
HIGHER_FIRST = ("best", "last_top1", "img_per_s")  # the rest sort lowest first


def select(rows: list[dict[str, Any]], filters: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows matching every KEY=VALUE: KEY a column (run, name, study, status, model,
    dataset, best_metric) or a dotted option (optim.lr, data.dataset); one UserError for a
    filter that is not KEY=VALUE or names neither."""
    for spec in filters:
        key, sep, want = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise UserError(f"--filter {spec!r}: write KEY=VALUE, e.g. status=finished")
        if key not in FIELDS and not any(key in r["config"] for r in rows):
            raise UserError(f"--filter {spec!r}: {key} is neither a column ({', '.join(FIELDS)}) "
                            "nor an option of these runs (e.g. optim.lr)")
        rows = [r for r in rows if _matches(r[key] if key in FIELDS else r["config"].get(key),
                                            want.strip())]
    return rows


def _matches(value: Any, want: str) -> bool:
    return want in (str(value), json.dumps(value)) or (
        _number(value) and _is_float(want) and float(want) == value)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def ordered(rows: list[dict[str, Any]], key: str | None) -> list[dict[str, Any]]:
    """Rows sorted by `key` (best, last, img/s, wall, size, epochs, a column or an option;
    best, last and img/s highest first, the rest lowest first; rows without it last), each
    study's trials kept together after the other runs."""
    def position(r: dict[str, Any]) -> tuple[Any, ...]:
        if key is None:
            return ()
        field = NUMBERS.get(key, key.replace("-", "_"))
        value = r.get(field) if field in r and field != "config" else r["config"].get(field)
        if value is None:
            return (1, 0, "")
        if _number(value):
            return (0, -value if field in HIGHER_FIRST else value, "")
        return (0, 0, str(value))

    if key is not None and key not in NUMBERS and key.replace("-", "_") not in FIELDS and not any(
            key.replace("-", "_") in r["config"] for r in rows):
        raise UserError(f"--sort {key}: sort by best, last, img/s, wall, size, epochs, a column "
                        f"({', '.join(FIELDS)}) or an option of these runs (e.g. optim.lr)")
    return sorted(rows, key=lambda r: (r["study"] is not None, r["study"] or "", *position(r),
                                       r["run"]))


def show_runs(folders: list[Path], output: str, sort: str | None, filters: tuple[str, ...]) -> int:
    """`runs`: the rows of `folders` chosen by `filters` and sorted by `sort`, as `output`
    says: json, csv, table, or auto (the table on a terminal, tab-separated lines to a pipe).
    A folder that does not exist is one UserError."""
    for folder in folders:
        if not Path(folder).exists():
            raise UserError(f"{folder} does not exist; give a work dir or a folder of them")
    rows = ordered(select(list_runs(folders)[0], filters), sort)
    differing = compare(rows) if len(rows) > 1 else []  # among the runs shown
    if output == "json":
        print(json.dumps({"runs": rows, "differing": differing}))
    elif not rows:
        print("no runs (work dirs with a config.json" + (" matching --filter" if filters else "")
              + ") under " + ", ".join(str(f) for f in folders))
    elif output == "csv" or (output == "auto" and not is_terminal(sys.stdout)):
        sys.stdout.write(runs_delimited(rows, differing, csv_output=output == "csv"))
    else:
        print("\n".join(runs_table(rows, differing, shutil.get_terminal_size((100, 24)).columns)))
    for note in (n for r in rows for n in r.get("notes", []) if output != "json"):
        warn(note)  # (the JSON holds them)
    return 0
