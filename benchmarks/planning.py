"""lr-find's suggestion against the best of a 5-point LR grid at equal epochs, and what
--sched.early-stop saves and loses on a run that plateaus.

    python -m benchmarks.planning --out benchmarks/results-planning-cpu-2core.json
    python -m benchmarks.planning --quick          # a minute: checks the script runs

Each run is its own `convnext-cifar` process (atto, the smoke recipe from scratch, on
benchmarks/distill.py's generated task; best held-out top-1). LR: `lr-find` once, then
`--epochs` epochs at its suggestion and at each grid point. Early stop: the same recipe for
`--plateau-epochs` epochs on `--plateau-images` training images (so it plateaus), with and
without `--sched.early-stop`.
"""

from __future__ import annotations

import json
import re
import shutil
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
    work: Path = Path("/tmp/convnext-cifar-planning-bench")
    """Folder for the data and the runs (runs are replaced)."""
    train_images: int = 4000
    """Generated training images."""
    val_images: int = 1000
    """Generated held-out images."""
    epochs: int = 6
    """Epochs of every LR run."""
    grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    """The hand-set learning rates."""
    plateau_epochs: int = 30
    """Epochs of the early-stop comparison."""
    plateau_images: int = 1000
    """Training images of the early-stop comparison."""
    patience: int = 3
    """--sched.early-stop of the early-stop comparison."""
    quick: bool = False
    """Tiny sizes: checks the script end to end in about a minute."""


def command(args: Args, root: Path, verb: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "convnext_cifar", verb, "--preset", "smoke", "--data.root",
            str(root), "--data.no-download", "--data.limit-val", "0", "--device", "cpu",
            "--compile", "off", "--log-interval", "1000", "--keep-last", "1", *extra]


def train(args: Args, root: Path, work: Path, *extra: str) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(command(args, root, "train", "--work-dir", str(work), *extra), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "top1" in r]
    return {"best_top1": max(r["top1"] for r in val), "epochs": len(val),
            "wall_s": round(time.perf_counter() - started, 1),
            "status": json.loads((work / "status.json").read_text())["status"]}


def main(args: Args) -> dict:
    from benchmarks.distill import write_data

    if args.quick:
        args = replace(args, train_images=300, val_images=100, epochs=1, grid=(1e-3, 1e-2),
                       plateau_epochs=4, plateau_images=100, patience=1,
                       work=args.work.with_name(args.work.name + "-quick"))
    root = args.work / f"data-{args.train_images}-{args.val_images}"
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        write_data(root, args.train_images, args.val_images)
    epochs = ("--sched.epochs", str(args.epochs), "--sched.warmup-epochs",
              str(max(0, min(1, args.epochs - 1))), "--data.limit-train", "0")
    found = subprocess.run(command(args, root, "lr-find", "--data.limit-train", "0",
                                   "--lr-find.out", str(args.work / "lr-find.png")),
                           check=True, capture_output=True, text=True).stdout
    suggestion = float(re.search(r"suggested --optim.lr (\S+) ", found).group(1))
    lr = {"suggestion": suggestion, "lr_find_output": found.splitlines()[-2:],
          "suggested_run": train(args, root, args.work / "lr-suggested", *epochs, "--optim.lr",
                                 repr(suggestion)),
          "grid": {str(g): train(args, root, args.work / f"lr-{g}", *epochs, "--optim.lr", str(g))
                   for g in args.grid}}
    print(json.dumps(lr), flush=True)
    plateau = ("--sched.epochs", str(args.plateau_epochs), "--sched.warmup-epochs", "1",
               "--data.limit-train", str(args.plateau_images))
    early = {"patience": args.patience,
             "full": train(args, root, args.work / "plateau-full", *plateau),
             "early": train(args, root, args.work / "plateau-early", *plateau,
                            "--sched.early-stop", str(args.patience))}
    print(json.dumps(early), flush=True)
    results = {"lr": lr, "early_stop": early}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
