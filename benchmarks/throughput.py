"""Training throughput of the project's real loop next to the bare model ceiling, in one process.

    python -m benchmarks.throughput --model convnextv2_tiny --batch-size 128

`loop`: `engine.train_one_epoch` itself (seeded permutation, on-device crop/flip, normalise,
LR schedule, forward, loss, backward, clip, AdamW) over device-resident synthetic uint8 images.
`bare`: the same `TrainStep` on one resident, already normalised batch: no data work at all.
Each figure is the median over `--windows` timed epochs of `--steps` steps after one warm-up epoch.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro


@dataclass(frozen=True)
class Args:
    model: str = "convnextv2_tiny"
    """timm ConvNeXt-V2 variant."""
    batch_size: int = 128
    """Training batch size."""
    steps: int = 10
    """Steps per timed window."""
    windows: int = 3
    """Timed windows; the median is reported, with min and max."""
    device: str = "auto"
    """Torch device (auto: cuda if available)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision, as in `train`."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile, as in `train`."""
    channels_last: bool = True
    """channels_last memory format."""
    json: bool = False
    """Print one JSON object instead of a line per figure."""


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args: Args) -> dict:
    import torch

    from convnext_cifar.config import CIFAR10FineTune, ModelConfig
    from convnext_cifar.data import DeviceLoader
    from convnext_cifar.engine import TrainStep, prepare_model, resolve_runtime, train_one_epoch
    from convnext_cifar.model import build_model
    from convnext_cifar.optim import build_optimizer
    from convnext_cifar.report import MetricsLog, Progress

    base = CIFAR10FineTune()
    cfg = dataclasses.replace(
        base, model=ModelConfig(name=args.model, pretrained="none", drop_path_rate=0.2,
                                label_smoothing=0.2),
        data=dataclasses.replace(base.data, batch_size=args.batch_size, drop_last=True),
        device=args.device, precision=args.precision, compile=args.compile,
        channels_last=args.channels_last, log_interval=10**9)
    rt = resolve_runtime(cfg)
    torch.manual_seed(0)
    model, forward = prepare_model(build_model(cfg.model, 10, verbose=False), rt)
    step_fn = TrainStep(forward, build_optimizer(model, cfg.optim, rt.device), rt,
                        cfg.model.label_smoothing, cfg.optim.clip_grad_norm)
    n = args.batch_size * args.steps
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=rt.device)
    labels = torch.randint(0, 10, (n,), device=rt.device)
    loader = DeviceLoader(images, labels, cfg.data, 0, rt.channels_last)

    results = {"model": args.model, "batch_size": args.batch_size, **rt.as_dict(),
               "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        log, quiet = MetricsLog(Path(tmp) / "m.jsonl"), Progress(1, live=False)
        quiet.log_train = lambda *a, **k: None  # the benchmark prints its own table

        def loop_window(i: int) -> None:
            train_one_epoch(step_fn, loader, i, i * args.steps, cfg, log, quiet)

        x, y = next(loader.epoch(0))

        def bare_window(i: int) -> None:
            for _ in range(args.steps):
                loss, _ = step_fn(x, y)
            loss.item()

        for name, window in (("loop", loop_window), ("bare", bare_window)):
            t0 = time.perf_counter()
            window(0)
            _sync(rt.device)
            results[f"{name}_first_window_s"] = time.perf_counter() - t0
            rates = []
            for i in range(1, args.windows + 1):
                _sync(rt.device)
                t0 = time.perf_counter()
                window(i)
                _sync(rt.device)
                rates.append(n / (time.perf_counter() - t0))
            results[f"{name}_img_per_s"] = statistics.median(rates)
            results[f"{name}_img_per_s_min"] = min(rates)
            results[f"{name}_img_per_s_max"] = max(rates)
    results["loop_over_bare"] = results["loop_img_per_s"] / results["bare_img_per_s"]

    return results


def cli() -> None:
    args = tyro.cli(Args)
    res = main(args)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['model']} batch {res['batch_size']} on {res['device']} ({res['precision']}, "
          f"compile {res['compile']}, channels_last {res['channels_last']}, "
          f"{res['threads']} threads, torch {res['torch']})")
    for name in ("loop", "bare"):
        print(f"  {name:5s} {res[f'{name}_img_per_s']:8.1f} img/s  (min "
              f"{res[f'{name}_img_per_s_min']:.1f}, max {res[f'{name}_img_per_s_max']:.1f}; first "
              f"window {res[f'{name}_first_window_s']:.1f} s)")
    print(f"  loop / bare = {res['loop_over_bare']:.3f}")


if __name__ == "__main__":
    cli()
