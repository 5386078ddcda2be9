"""Throughput of the project's real training and eval paths, a matrix of settings, and a
typical-PyTorch baseline measured side by side in the same process.

    python -m benchmarks.throughput                 # the matrix for ConvNeXt-V2-Tiny, 32x32
    python -m benchmarks.throughput --quick         # only the defaults `train` uses here
    python -m benchmarks.throughput --quick --model convnextv2_atto --json --out r.jsonl

Per configuration (precision x channels_last x compile):
  data   `DeviceLoader` alone: permutation, gather, crop/flip, normalise
  loop   `training.loop.train_one_epoch` itself: data + LR schedule + forward, loss, backward, clip,
         AdamW, on-device metrics (exactly what `train` runs)
  bare   the same `TrainStep` on one resident, normalised batch: the model ceiling
  eval   `use.evaluate.evaluate` itself over resident test images
Baseline: torchvision CIFAR10-style per-image PIL transforms (RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize) through a DataLoader with worker processes, the same
model and optimizer, eager fp32: the loop most PyTorch users write.

Each figure is the median over --windows timed windows after one warm-up window (whose time,
compile included, is reported as first_s), with min and max. CUDA windows are timed with events
and synchronise only at window edges.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tyro


@dataclass(frozen=True)
class Args:
    model: str = "convnextv2_tiny"
    """timm ConvNeXt-V2 variant."""
    preset: str = "cifar10"
    """The `train --preset` whose recipe is timed (augmentation, EMA, layer decay, image size)."""
    batch_size: int = 128
    """Training batch size."""
    eval_batch_size: int = 256
    """Evaluation batch size."""
    image_size: int = 0
    """Input size (0: the preset's; 32 is CIFAR as stored, larger upsamples on the device)."""
    steps: int = 8
    """Training steps (eval batches) per timed window."""
    windows: int = 3
    """Timed windows after the warm-up one; the median is reported, with min and max."""
    device: str = "auto"
    """Torch device (auto: cuda if available)."""
    quick: bool = False
    """Only the configuration `train` uses by default on this device (and the baseline)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """With --quick: compile as `train --compile` would (auto: its default here)."""
    precision: tuple[Literal["fp32", "bf16", "fp16"], ...] | None = None
    """Precisions of the matrix (default: fp32, plus bf16/fp16 where the device runs them fast)."""
    baseline: bool = True
    """Also measure the typical DataLoader + per-image transforms loop."""
    eval_only: bool = False
    """Measure evaluation alone (no training step, no baseline)."""
    baseline_workers: int = 2
    """DataLoader worker processes of the baseline."""
    num_classes: int = 10
    """Classes of the synthetic data (the head's size)."""
    teacher: str = ""
    """Also time each configuration with a distillation teacher of this timm model (random
    weights, e.g. convnextv2_tiny): the loop with the teacher's forward on every batch."""
    peak_sizes: tuple[int, ...] | None = None
    """Square matmul sizes tried for the peak FLOP/s (default: 1024-4096 CPU, 4096-8192 GPU)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of the compiled configurations."""
    json: bool = False
    """Print one JSON object per configuration instead of the table."""
    out: Path | None = None
    """Also write the JSON objects (one per line) to this file."""


# ---- timing -----------------------------------------------------------------------------------

class Clock:
    """Window timing: CUDA events on a GPU (sync only at the window's end), perf_counter on CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def time(self, fn) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def windows(clock: Clock, fn, images: int, count: int) -> dict[str, float]:
    """Run `fn` once to warm up, then `count` timed windows of `images` images each."""
    first = clock.time(fn)
    rates = [images / clock.time(fn) for _ in range(count)]
    return {"img_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "first_s": first}


# ---- FLOPs ------------------------------------------------------------------------------------

def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None,
                        **kwargs) -> int:
    """Backward of a (grouped) conv: grad input and grad weight each cost one forward.

    torch's own formula treats grad weight as a dense conv and over-counts depthwise
    convolutions by their group count.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape),
                              transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flops_per_image(model, step_fn, x, y) -> tuple[float, float]:
    """(forward, training step) FLOPs per image, counted on one batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with torch.no_grad():
            model(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step_fn(x, y)
    return forward / len(x), counter.get_total_flops() / len(x)


def peak_matmul_flops(device, dtype, sizes: tuple[int, ...] | None = None) -> tuple[float, int]:
    """(FLOP/s, n) of the fastest square n x n matmul on `device` in `dtype`, best of 3 timings
    per size: the ceiling utilisation refers to. Small products do not reach the peak (1024 read
    60 % of it on a 2-core AVX2 host), so several sizes up to large ones are tried."""
    import torch

    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (1024, 2048, 4096))
    clock, best = Clock(device), (0.0, 0)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        flop = 2 * n ** 3
        reps = max(1, int((2e13 if device.type == "cuda" else 2e10) // flop))

        def run(a=a, b=b, reps=reps):
            for _ in range(reps):
                a @ b

        clock.time(run)  # warm-up: library setup, caches, clocks
        rate = flop * reps / min(clock.time(run) for _ in range(3))
        best = max(best, (rate, n))
    return best


# ---- the project's paths ----------------------------------------------------------------------

def default_settings(args: Args, device) -> tuple[str, bool, bool]:
    """(precision, channels_last, compile) that `train` resolves to on `device` for this model."""
    from convnext_cifar.runtime import resolve_runtime

    rt = resolve_runtime(bench_config(args, device))
    return rt.precision, rt.channels_last, {"on": True, "off": False}.get(args.compile, rt.compile)


def matrix(args: Args, device) -> list[tuple[str, bool, bool]]:
    import torch

    if args.quick:
        return [default_settings(args, device)]
    precisions = args.precision
    if precisions is None:
        precisions = ("fp32",)
        if device.type == "cuda":
            precisions += ("bf16", "fp16") if torch.cuda.is_bf16_supported() else ("fp16",)
    return list(itertools.product(precisions, (True, False), (False, True)))


def synthetic_dataset(args: Args, device, num_classes: int = 10):
    """Random uint8 images in CIFAR's layout: one training window's worth and one eval window's."""
    import torch

    from convnext_cifar.data.cifar import CIFAR10
    from convnext_cifar.data.dataset import Dataset, Split

    gen = torch.Generator(device="cpu").manual_seed(0)
    n, n_eval = args.batch_size * args.steps, args.eval_batch_size * args.steps

    def images(count):
        return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=gen)

    def labels(count):
        return torch.randint(0, num_classes, (count,), generator=gen)

    train = Split(images(n).to(device), labels(n).to(device))
    val = Split(images(n_eval).to(device), labels(n_eval).to(device))
    return Dataset(val, [str(i) for i in range(num_classes)], CIFAR10.mean, CIFAR10.std,
                   {"classes": [], "files": "synthetic"}, train=train)


def bench_config(args: Args, device, precision: str = "auto", channels_last: bool = True,
                 compile_on: bool | None = None, teacher: Path | None = None):
    """The preset's config (the reference experiment by default) with the benchmark's model,
    sizes and runtime (compile_on None: `auto`), distilling from `teacher` when given."""
    from convnext_cifar.config import DistillConfig
    from convnext_cifar.presets import PRESETS

    base = PRESETS[args.preset]()
    return dataclasses.replace(
        base, model=dataclasses.replace(base.model, name=args.model, pretrained="none"),
        data=dataclasses.replace(base.data, batch_size=args.batch_size, drop_last=True,
                                 image_size=args.image_size or base.data.image_size,
                                 eval_batch_size=args.eval_batch_size),
        device=str(device), precision=precision,
        compile="auto" if compile_on is None else "on" if compile_on else "off",
        channels_last=channels_last, log_interval=10 ** 9,
        distill=DistillConfig(teacher=str(teacher) if teacher else ""))


def teacher_checkpoint(args: Args, device, folder: Path) -> Path:
    """A checkpoint of `args.teacher` with random weights, of the synthetic data's classes."""
    import timm

    from convnext_cifar.model.checkpoints import save_weights

    cfg = bench_config(dataclasses.replace(args, model=args.teacher), device)
    model = timm.create_model(args.teacher, num_classes=args.num_classes)
    path = folder / "teacher.safetensors"
    save_weights(path, model.state_dict(), cfg, [str(i) for i in range(args.num_classes)], 0,
                 {}, {"device": str(device)}, identity=None)
    return path


def measure(args: Args, device, precision: str, channels_last: bool, compile_on: bool,
            flops: dict[str, float], data=None, teacher: Path | None = None) -> dict[str, Any]:
    """Every figure of one configuration, on `data` (default: random CIFAR-layout images),
    with a distillation `teacher` checkpoint when given."""
    import torch

    from convnext_cifar.runtime import Runtime, configure_backends
    from convnext_cifar.training.build import build_run
    from convnext_cifar.training.step import TrainStep

    cfg = bench_config(args, device, precision, channels_last, compile_on, teacher)
    rt = Runtime(device, precision, compile_on, channels_last, args.compile_mode)
    configure_backends(rt)  # cuDNN autotuning and TF32 on a GPU, as `train` sets them
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = data or synthetic_dataset(args, device, args.num_classes)
    clock = Clock(device)
    result: dict[str, Any] = {"precision": precision, "channels_last": channels_last,
                              "compile": compile_on, "compile_mode": args.compile_mode}

    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(dataclasses.replace(cfg, work_dir=Path(tmp)), rt, data=data)
        timed, (x, y) = timed_paths(args, run, Path(tmp))
        if args.eval_only:
            timed = {"eval": timed["eval"]}
        for name, (fn, count) in timed.items():
            for key, value in windows(clock, fn, count, args.windows).items():
                result[f"{name}_{key}"] = value
        if args.eval_only:
            return result
        if not flops:  # counted on the eager model: the same arithmetic, without compile hooks
            eager = TrainStep(run.model, run.step_fn.optimizer,
                              dataclasses.replace(rt, compile=False), run.step_fn.loss_fn,
                              cfg.optim.clip_grad_norm)
            flops["forward"], flops["train"] = flops_per_image(run.model, eager, x, y)
    result["loop_over_bare"] = result["loop_img_per_s"] / result["bare_img_per_s"]
    result["train_flops_per_image"] = flops["train"]
    result["forward_flops_per_image"] = flops["forward"]
    result["achieved_tflops"] = flops["train"] * result["loop_img_per_s"] / 1e12
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def timed_paths(args: Args, run, tmp: Path) -> tuple[dict[str, tuple[Any, int]], tuple]:
    """{name: (one window's work, images in it)} for data, loop, bare and eval, and the first
    training batch (x, y)."""
    from convnext_cifar.outputs.console import Progress
    from convnext_cifar.outputs.metrics_log import MetricsLog
    from convnext_cifar.training.loop import train_one_epoch
    from convnext_cifar.training.state import Position
    from convnext_cifar.training.step import Guard, Window
    from convnext_cifar.use.evaluate import evaluate

    data, device = run.data, run.rt.device
    log, quiet = MetricsLog([]), Progress(1, live=False)  # it prints its own table
    epoch = itertools.count()
    x, y, _ = next(run.loader.epoch(0))

    def data_window():
        for _ in run.loader.epoch(next(epoch)):
            pass

    def loop_window():
        train_one_epoch(run, Position(epoch=next(epoch)), log, quiet, Window(device),
                        Guard(device, 1))

    def bare_window():
        for _ in range(args.steps):
            run.step_fn(x, y)

    def eval_window():
        evaluate(run.forward, data.val.images, data.val.labels, args.eval_batch_size,
                 run.normalize, run.rt, data.num_classes)

    n, n_eval = len(data.train.images), len(data.val.images)
    return {"data": (data_window, n), "loop": (loop_window, n), "bare": (bare_window, n),
            "eval": (eval_window, n_eval)}, (x, y)


# ---- the baseline -----------------------------------------------------------------------------

def baseline_loader(args: Args, device):
    """Random CIFAR-like images through per-image PIL transforms in a DataLoader's workers."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from convnext_cifar.data.cifar import CIFAR10

    class CIFARLike(Dataset):
        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])

    n = args.batch_size * args.steps
    rng = np.random.default_rng(0)
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        *([transforms.Resize(args.image_size)] if args.image_size != 32 else []),
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in CIFAR10.mean], [s / 255 for s in CIFAR10.std])])
    dataset = CIFARLike(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, args.num_classes, n), transform)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                      num_workers=args.baseline_workers, pin_memory=device.type == "cuda",
                      persistent_workers=args.baseline_workers > 0)


def baseline(args: Args, device) -> dict[str, Any]:
    """What most users write: per-image PIL transforms in DataLoader workers, eager fp32."""
    import torch
    import torch.nn.functional as F

    from convnext_cifar.config import ModelConfig, OptimConfig
    from convnext_cifar.model.build import build_model
    from convnext_cifar.model.optim import build_optimizer

    loader = baseline_loader(args, device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, drop_path_rate=0.2), args.num_classes,
                        is_main=False).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=4e-3), device)
    model.train()

    def epoch():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()

    result = {"precision": "fp32", "channels_last": False, "compile": False,
              "workers": args.baseline_workers}
    n = args.batch_size * args.steps
    for key, value in windows(Clock(device), epoch, n, args.windows).items():
        result[f"loop_{key}"] = value
    return result


# ---- report -----------------------------------------------------------------------------------

def environment(device) -> dict[str, Any]:
    import platform

    import timm
    import torch

    env = {"device": str(device), "torch": torch.__version__, "timm": timm.__version__,
           "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def print_table(rows: list[dict[str, Any]], env: dict[str, Any], args: Args) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{args.model} {args.image_size}x{args.image_size}, batch {args.batch_size} "
             f"(eval {args.eval_batch_size}) on {env.get('gpu', env['device'])}, torch "
             f"{env['torch']}, {env['threads']} threads")
    table = Table(title=title)
    for col in ("config", "data", "loop img/s", "bare", "loop/bare", "eval", "first s",
                "TFLOP/s", "util %", "vs baseline"):
        table.add_column(col, justify="right")
    for r in rows:
        name = ("baseline" if r.get("kind") == "baseline" else
                f"{r['precision']} {'cl' if r['channels_last'] else 'nchw'} "
                f"{'compiled' if r['compile'] else 'eager'}"
                + (f" + teacher {r['teacher']}" if r.get("teacher") else ""))

        def num(key: str, fmt: str = "{:.0f}", r: dict[str, Any] = r) -> str:
            return fmt.format(r[key]) if key in r else "-"

        spread = (f"{r['loop_img_per_s']:.1f} ({r['loop_min']:.0f}-{r['loop_max']:.0f})"
                  if "loop_img_per_s" in r else "-")
        table.add_row(name, num("data_img_per_s"), spread, num("bare_img_per_s", "{:.1f}"),
                      num("loop_over_bare", "{:.2f}"), num("eval_img_per_s"),
                      num("loop_first_s", "{:.1f}"), num("achieved_tflops", "{:.3f}"),
                      num("utilisation_pct", "{:.1f}"), num("vs_baseline", "{:.2f}x"))
    Console(width=max(Console().width, 150)).print(table)
    if rows and "train_flops_per_image" in rows[0]:
        print(f"FLOPs per image: forward {rows[0]['forward_flops_per_image'] / 1e9:.3f} G, "
              f"training step {rows[0]['train_flops_per_image'] / 1e9:.3f} G; peak matmul "
              f"{rows[0]['peak_tflops']:.2f} TFLOP/s (best square matmul, n="
              f"{rows[0]['peak_matmul_n']})")


def with_teacher(args: Args, device, settings: tuple[str, bool, bool], flops: dict[str, float],
                 row: dict[str, Any]) -> dict[str, Any]:
    """`row`'s configuration measured again with a distillation teacher of `args.teacher`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = teacher_checkpoint(args, device, Path(tmp))
        taught = measure(args, device, *settings, flops, teacher=path)
    taught["loop_over_without_teacher"] = taught["loop_img_per_s"] / row["loop_img_per_s"]
    merged = {**row, **taught, "teacher": args.teacher}
    for key in ("achieved_tflops", "utilisation_pct"):  # the student's FLOPs only
        merged.pop(key, None)
    print(f"  with teacher {args.teacher}: loop {taught['loop_img_per_s']:.1f} img/s "
          f"({taught['loop_over_without_teacher']:.2f}x)", file=sys.stderr, flush=True)
    return merged


def main(args: Args) -> list[dict[str, Any]]:
    import torch

    from convnext_cifar.presets import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset}; choose one of {', '.join(PRESETS)}")
    if not args.image_size:
        args = dataclasses.replace(args, image_size=PRESETS[args.preset]().data.image_size)

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    rows: list[dict[str, Any]] = []
    flops: dict[str, float] = {}
    peaks: dict[str, tuple[float, int]] = {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for precision, channels_last, compile_on in matrix(args, device):
        row = measure(args, device, precision, channels_last, compile_on, flops)
        if "achieved_tflops" in row:
            if precision not in peaks:
                peaks[precision] = peak_matmul_flops(device, dtypes[precision], args.peak_sizes)
            row["peak_tflops"], row["peak_matmul_n"] = (peaks[precision][0] / 1e12,
                                                        peaks[precision][1])
            row["utilisation_pct"] = 100 * row["achieved_tflops"] / row["peak_tflops"]
        rows.append({"kind": "project", "model": args.model, "preset": args.preset,
                     "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                     "image_size": args.image_size, **env, **row})
        print(f"measured {precision} channels_last={channels_last} compile={compile_on}: "
              f"loop {row.get('loop_img_per_s', 0):.1f} img/s, eval "
              f"{row['eval_img_per_s']:.1f} img/s", file=sys.stderr, flush=True)
        if args.teacher and not args.eval_only:
            rows.append(with_teacher(args, device, (precision, channels_last, compile_on),
                                     flops, rows[-1]))
    if args.baseline and not args.eval_only:
        base = baseline(args, device)
        rows.append({"kind": "baseline", "model": args.model, "batch_size": args.batch_size,
                     "image_size": args.image_size, **env, **base})
        for r in rows[:-1]:
            r["vs_baseline"] = r["loop_img_per_s"] / base["loop_img_per_s"]
    best_bare = max((r["bare_img_per_s"] for r in rows if "bare_img_per_s" in r), default=0)
    for r in rows:
        if "bare_img_per_s" in r:
            r["loop_over_best_bare"] = r["loop_img_per_s"] / best_bare
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print_table(rows, env, args)
    return rows


def cli() -> None:
    main(tyro.cli(Args))


if __name__ == "__main__":
    cli()
