"""--sched.budget on this machine: planned against actual wall time for a few budgets, and the
top-1 a budgeted run reaches against a run with a longer hand-set schedule cut off at the same
wall time (what a max_time limit does: its LR never decays).

    python -m benchmarks.budget --out benchmarks/results-budget-cpu-2core.json
    python -m benchmarks.budget --quick           # a minute: checks the script runs

Each run is its own `convnext-cifar train` process (atto, the smoke recipe, on
benchmarks/distill.py's generated task); wall time is measured around the process, start-up
included. The cut-off run trains `--cutoff-factor` times the budgeted run's planned epochs and
gets SIGTERM when the budget is spent; its best top-1 until then is what it has.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import tyro


@dataclass(frozen=True)
class Args:
    out: Path | None = None
    """Write the results here as JSON."""
    work: Path = Path("/tmp/convnext-cifar-budget-bench")
    """Folder for the data and the runs (runs are replaced)."""
    budgets: tuple[str, ...] = ("1m", "2m", "4m")
    """The budgets to plan for."""
    train_images: int = 4000
    """Generated training images."""
    val_images: int = 1000
    """Generated held-out images."""
    cutoff_factor: float = 2.0
    """The cut-off run's schedule, in multiples of the budgeted run's planned epochs."""
    quick: bool = False
    """Tiny sizes: checks the script end to end in about a minute."""


def train_command(root: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "convnext_cifar", "train", "--preset", "smoke", "--data.root",
            str(root), "--data.no-download", "--data.limit-train", "0", "--data.limit-val", "0",
            "--work-dir", str(work), "--device", "cpu", "--compile", "off",
            "--log-interval", "1000", "--keep-last", "1", *extra]


def timed(command: list[str], limit_s: float | None = None) -> tuple[float, int]:
    """(wall seconds, exit code) of a process; SIGTERM at `limit_s`, then wait for it."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    return time.perf_counter() - started, code


def best_top1(work: Path) -> tuple[float | None, int]:
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "top1" in r]
    return (max(r["top1"] for r in val) if val else None), len(val)


def main(args: Args) -> dict:
    import shutil

    from benchmarks.distill import write_data
    from convnext_cifar.config import parse_duration

    if args.quick:
        args = replace(args, budgets=("25s",), train_images=400, val_images=200,
                       work=args.work.with_name(args.work.name + "-quick"))
    root = args.work / f"data-{args.train_images}-{args.val_images}"
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        write_data(root, args.train_images, args.val_images)
    results = []
    for budget in args.budgets:
        seconds = parse_duration(budget)
        planned_dir, cut_dir = args.work / f"budget-{budget}", args.work / f"cutoff-{budget}"
        for folder in (planned_dir, cut_dir):
            shutil.rmtree(folder, ignore_errors=True)
        wall, code = timed(train_command(root, planned_dir, "--sched.budget", budget))
        status = json.loads((planned_dir / "status.json").read_text())
        top1, _ = best_top1(planned_dir)
        epochs = max(2, round(status["epochs"] * args.cutoff_factor))
        cut_wall, _ = timed(train_command(root, cut_dir, "--sched.epochs", str(epochs),
                                          "--sched.warmup-epochs", str(max(1, epochs // 3))),
                            limit_s=seconds)
        cut_top1, cut_validations = best_top1(cut_dir)
        row = {"budget": budget, "budget_s": seconds, "exit": code, "wall_s": round(wall, 1),
               "off_by_pct": round(100 * (wall - seconds) / seconds, 1),
               "planned_epochs": status["epochs"], "best_top1": top1,  # after any re-plan
               "cutoff_schedule_epochs": epochs, "cutoff_wall_s": round(cut_wall, 1),
               "cutoff_validations": cut_validations, "cutoff_best_top1": cut_top1}
        print(json.dumps(row), flush=True)
        results.append(row)
    out = {"runs": results}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
