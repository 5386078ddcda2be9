"""What one training step launches: torch.profiler over a few steps of the real loop.

    python -m benchmarks.profile_step                                # the recipe preset, atto
    python -m benchmarks.profile_step --preset cifar10 --model convnextv2_tiny
    python -m benchmarks.profile_step --json

Counts, per step, the operator calls (on the CPU each is a kernel; on a GPU the CUDA kernels are
counted too) of the whole step and of its parts (data and augmentation, forward/backward,
optimizer), the time per step, and names the costliest kernels. The step is the one `train`
runs (`train_one_epoch` on a `build_run` of the preset), on random CIFAR-layout images.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro


@dataclass(frozen=True)
class Args:
    preset: str = "cifar10-official-recipe"
    """The `train --preset` whose step is profiled."""
    model: str = "convnextv2_atto"
    """timm ConvNeXt-V2 variant."""
    batch_size: int = 128
    """Global batch size."""
    steps: int = 4
    """Profiled steps (after two warm-up steps)."""
    device: str = "auto"
    """Torch device (auto: cuda if available)."""
    compile: bool = False
    """torch.compile the model as `train` would."""
    one_pass: bool | None = None
    """OnePassAdamW (True) or one fused call per group (False); None: the device's default."""
    top: int = 10
    """How many of the costliest kernels to name."""
    json: bool = False
    """Print one JSON object instead of lines."""


PARTS = ("data", "step", "optimizer")


def profile(args: Args) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, record_function

    from benchmarks.throughput import Args as BenchArgs
    from benchmarks.throughput import bench_config, synthetic_dataset
    from convnext_cifar.runtime import Runtime
    from convnext_cifar.training.build import build_run

    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    bench = BenchArgs(model=args.model, preset=args.preset, batch_size=args.batch_size,
                      steps=args.steps + 2, image_size=32)
    cfg = bench_config(bench, device, compile_on=args.compile)
    precision = "bf16" if device.type == "cuda" else "fp32"
    rt = Runtime(device, precision, args.compile, True)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(dataclasses.replace(cfg, work_dir=Path(tmp)), rt,
                        data=synthetic_dataset(bench, device))
        if args.one_pass is not None:
            from convnext_cifar.model.optim import build_optimizer

            run.step_fn.optimizer = build_optimizer(run.model, cfg.optim, device, args.one_pass)
        batches = iter(run.loader.epoch(0))
        optimizer_step = run.step_fn.optimizer.step

        def timed_step(*a, **k):
            with record_function("optimizer"):
                return optimizer_step(*a, **k)

        run.step_fn.optimizer.step = timed_step
        run.step_fn.forward.train()

        def one_step():
            with record_function("data"):
                x, y, n = next(batches)
            with record_function("step"):
                run.step_fn(x, y, n)

        for _ in range(2):
            one_step()
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                one_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
    return summarize(prof, args, seconds, device)


def summarize(prof, args: Args, seconds: float, device) -> dict[str, Any]:
    """Operator (and CUDA kernel) counts per step, whole and per part, and the costliest."""
    events = prof.events()
    ranges = {name: [(e.time_range.start, e.time_range.end) for e in events if e.name == name]
              for name in PARTS}

    def inside(e, part):
        return any(lo <= e.time_range.start and e.time_range.end <= hi for lo, hi in ranges[part])

    ops = [e for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"]
    top_level = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith(
        "aten::")]
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    result = {
        "preset": args.preset, "model": args.model, "batch_size": args.batch_size,
        "device": str(device), "compile": args.compile,
        "optimizer": {None: "default", True: "one-pass", False: "per-group"}[args.one_pass],
        "ms_per_step": 1000 * seconds,
        "ops_per_step": len(top_level) / args.steps,
        **{f"ops_{part}": sum(inside(e, part) for e in top_level) / args.steps
           for part in PARTS},
    }
    if kernels:
        result["cuda_kernels_per_step"] = len(kernels) / args.steps
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total" if kernels else "self_cpu_time_total", row_limit=args.top)
    result["top"] = [line for line in table.splitlines() if line.strip()][: args.top + 4]
    return result


def main(args: Args) -> dict[str, Any]:
    result = profile(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "top":
                print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
        print("\n".join(result["top"]))
    return result


def cli() -> None:
    main(tyro.cli(Args))


if __name__ == "__main__":
    cli()
