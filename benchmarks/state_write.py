"""How long writing a training state holds the training loop, and how long until it is on disk.

    python -m benchmarks.state_write                      # ConvNeXt-V2-Tiny, 5 states
    python -m benchmarks.state_write --model convnextv2_atto --states 3 --json

Builds the run `train` builds (random weights, generated images, one optimizer step so the
AdamW moments exist), gives `TrainingState` the components `train` gives it, and writes
--states states into a temporary work dir: per state, the seconds `save()` held the caller
(`blocked_s`) and the seconds until the file was complete on disk (`on_disk_s`), with the
state's size. Measure on the disk the runs write to (--work).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass(frozen=True)
class Args:
    model: str = "convnextv2_tiny"
    """timm ConvNeXt-V2 variant."""
    states: int = 5
    """States written (the first one is timed too)."""
    device: str = "cpu"
    """Torch device of the run."""
    work: Path | None = None
    """Folder to write into (default: a temporary one; the disk matters)."""
    json: bool = False
    """Print one JSON object instead of lines."""


def build(args: Args, work: Path):
    """The run and its TrainingState, as `train` builds them, after one optimizer step."""
    import torch

    from convnext_cifar.config import DataConfig, ModelConfig
    from convnext_cifar.data.cifar import CIFAR10
    from convnext_cifar.data.dataset import Dataset, Split
    from convnext_cifar.distributed import Dist
    from convnext_cifar.outputs.metrics_log import JsonlSink
    from convnext_cifar.presets import CIFAR10FineTune
    from convnext_cifar.runtime import resolve_runtime
    from convnext_cifar.training.build import build_run
    from convnext_cifar.training.state import DatasetRecord, GlobalRng, Position, TrainingState
    from convnext_cifar.training.step import Guard, Window

    cfg = dataclasses.replace(
        CIFAR10FineTune(), device=args.device, compile="off", work_dir=work,
        model=ModelConfig(name=args.model), data=DataConfig(batch_size=16), keep_last=2)
    rt = resolve_runtime(cfg)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    data = Dataset(Split(images[:16], labels[:16]), [str(i) for i in range(10)], CIFAR10.mean,
                   CIFAR10.std, {}, train=Split(images, labels))
    run = build_run(cfg, rt, data=data, pretrained=False)
    run.step_fn(*next(run.loader.epoch(0))[:2])
    position, dist = Position(), Dist()
    state = TrainingState(cfg, dist, len(run.loader), {
        "run": position, "model": run.model, "optimizer": run.step_fn.optimizer,
        "scaler": run.step_fn.scaler, "rng": GlobalRng(rt.device, dist), "loader": run.loader,
        "window": Window(rt.device), "guard": Guard(rt.device, 1),
        "log": JsonlSink(work / "metrics.jsonl"), "dataset": DatasetRecord({})})
    return state, position


def measure(args: Args, work: Path) -> dict:
    state, position = build(args, work)
    rows = []
    for i in range(args.states):
        position.step, position.epoch = i + 1, i + 1
        started = time.perf_counter()
        path = state.save()
        blocked = time.perf_counter() - started
        if hasattr(state, "written"):  # states written in the background
            state.written()
        rows.append({"blocked_s": blocked, "on_disk_s": time.perf_counter() - started,
                     "mb": path.stat().st_size / 2**20})
    return {"model": args.model, "device": args.device, "states": args.states,
            "state_mb": round(rows[-1]["mb"], 1),
            "blocked_s_median": round(statistics.median(r["blocked_s"] for r in rows), 3),
            "on_disk_s_median": round(statistics.median(r["on_disk_s"] for r in rows), 3),
            "blocked_s": [round(r["blocked_s"], 3) for r in rows],
            "on_disk_s": [round(r["on_disk_s"], 3) for r in rows]}


def main() -> None:
    args = tyro.cli(Args)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        result = measure(args, Path(tmp))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']} on {result['device']}: {result['state_mb']} MB a state; the loop "
          f"held {result['blocked_s_median']} s, on disk after {result['on_disk_s_median']} s "
          f"(medians of {result['states']}; per state: held {result['blocked_s']}, on disk "
          f"{result['on_disk_s']})")


if __name__ == "__main__":
    main()
