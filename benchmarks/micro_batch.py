"""What --data.micro-batch auto's CPU budget counts, against what a training step takes here,
and what accumulating costs.

    python -m benchmarks.micro_batch --out benchmarks/results-micro-batch-cpu-2core.json
    python -m benchmarks.micro_batch --quick        # seconds: checks the script runs

For each model, image size and micro-batch, a fresh process builds the model (channels_last,
fp32, drop-path 0.1, as the CPU trains), AdamW with the run's decay groups and a TrainStep
(label smoothing, clipping) over a batch of `--batch` images in micro-batches of M; one step
warms up, then the resident-memory peak of the next (Linux's VmHWM, reset before it) is taken
above the process's resident memory before the model was built. Beside it: the estimate
training/micro_batch.py holds against the budget (the weights four times, the batch, and what a
forward keeps, counted per image), and the step's seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass(frozen=True)
class Args:
    out: Path | None = None
    """Write the results here as JSON."""
    batch: int = 128
    """The batch each step trains (split into micro-batches)."""
    cases: tuple[str, ...] = ("convnextv2_atto:32", "convnextv2_tiny:32", "convnextv2_tiny:96")
    """MODEL:IMAGE_SIZE pairs."""
    micro: tuple[int, ...] = (128, 64, 32, 16)
    """Micro-batches to measure (each divides --batch)."""
    quick: bool = False
    """atto at 32 px, a batch of 16 in 16 and 8: checks the script runs."""
    child: str = ""
    """(internal) MODEL:SIZE:BATCH:MICRO measured in this process."""


def rss(field: str) -> int:
    """Bytes of /proc/self/status's `field` (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(model_name: str, size: int, batch: int, micro: int) -> dict:
    """One case, in this (fresh) process."""
    import timm
    import torch

    from convnext_cifar.config import OptimConfig
    from convnext_cifar.model.optim import build_optimizer
    from convnext_cifar.runtime import Runtime
    from convnext_cifar.training.micro_batch import step_estimate
    from convnext_cifar.training.step import TrainStep, cross_entropy_sum

    torch.manual_seed(0)
    before = rss("VmRSS")
    rt = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)
    model = timm.create_model(model_name, num_classes=10, drop_path_rate=0.1).to(
        memory_format=torch.channels_last)
    step = TrainStep(model, build_optimizer(model, OptimConfig(lr=1e-4), rt.device), rt,
                     cross_entropy_sum(0.2), 5.0, batch // micro)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    step(x, y)  # warm: AdamW's moments, oneDNN's caches
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    step(x, y)
    seconds = time.perf_counter() - started
    peak = rss("VmHWM") - before
    fixed, per_image = step_estimate(types.SimpleNamespace(model=model, rt=rt, ema=None,
                                                           teacher=None), x)
    estimate = fixed + per_image * micro
    return {"model": model_name, "image_size": size, "batch": batch, "micro_batch": micro,
            "accum_steps": batch // micro, "peak_bytes": peak, "estimate_bytes": estimate,
            "fixed_bytes": fixed, "per_image_bytes": per_image,
            "estimate_over_peak": round(estimate / peak, 3), "step_s": round(seconds, 3),
            "img_per_s": round(batch / seconds, 1)}


def main(args: Args) -> dict:
    if args.child:
        name, size, batch, micro = args.child.split(":")
        print(json.dumps(measure(name, int(size), int(batch), int(micro))))
        return {}
    cases, batch, micros = args.cases, args.batch, args.micro
    if args.quick:
        cases, batch, micros = ("convnextv2_atto:32",), 16, (16, 8)
    rows = []
    for case in cases:
        for micro in micros:
            out = subprocess.run([sys.executable, "-m", "benchmarks.micro_batch", "--child",
                                  f"{case}:{batch}:{micro}"], capture_output=True, text=True,
                                 check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['model']} {row['image_size']} px, micro-batch {micro:>3} x "
                  f"{row['accum_steps']:>2}: peak {row['peak_bytes'] / 2**20:7.0f} MiB, "
                  f"estimate {row['estimate_bytes'] / 2**20:7.0f} MiB "
                  f"({row['estimate_over_peak']:.2f}x), {row['img_per_s']:6.1f} img/s",
                  flush=True)
    import torch

    from convnext_cifar.runtime import cpu_name

    result = {"cpu": cpu_name(), "torch": torch.__version__, "batch": batch, "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
