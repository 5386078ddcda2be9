"""The training loop, written out: fit() -> train_one_epoch() -> TrainStep, and evaluate().

Scalars stay on the device between log points: the only host-device syncs are at a log point,
at the end of an epoch and after validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convnext_cifar import distributed
from convnext_cifar.checkpoints import (
    WorkDirLock,
    atomic_write_bytes,
    find_states,
    load_state,
    load_weights,
    prune_states,
    remove_stale_temp_files,
    save_state,
    save_weights,
    state_path,
)
from convnext_cifar.config import TrainConfig, config_json, flatten, to_dict
from convnext_cifar.data import DeviceLoader, Normalize, eval_batches, load_cifar10
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import Interrupted, TrainingDiverged, UserError
from convnext_cifar.formats import first_line
from convnext_cifar.model import build_model, layout_mismatch
from convnext_cifar.optim import build_optimizer, lr_at, peak_lr, set_lr
from convnext_cifar.report import MetricsLog, Progress

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """What the `auto` settings of a config resolve to on this machine."""

    device: torch.device
    precision: str
    compile: bool
    channels_last: bool
    compile_mode: str = "default"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def as_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": self.precision, "compile": self.compile,
                "channels_last": self.channels_last, "torch": torch.__version__}


def resolve_runtime(cfg: TrainConfig, dist: Dist | None = None) -> Runtime:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    if name == "cuda" and dist is not None and dist.enabled:
        name = f"cuda:{dist.local_rank}"  # one process per GPU, as torchrun's LOCAL_RANK says
    device = torch.device(name)
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"  # CPUs without bf16 units run autocast ~100x slower
    # Measured with benchmarks/throughput.py: compiling pays off on CUDA and on the CPU too.
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type in ("cuda", "cpu"))
    if compile_on and device.type == "cpu" and not cpu_compiler_available():
        if cfg.compile == "on":
            raise UserError("--compile on: torch.compile on the CPU needs a C++ compiler (g++ or "
                            "clang++, or $CXX); install one or pass --compile off")
        print("note: no C++ compiler found, so the model runs uncompiled (slower); install g++ "
              "to compile it", file=sys.stderr)
        compile_on = False
    return Runtime(device, precision, compile_on, cfg.channels_last, cfg.compile_mode)


def cpu_compiler_available() -> bool:
    """Inductor's CPU backend builds C++: is there a compiler to build it with?"""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(model: torch.nn.Module, rt: Runtime) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move to the device and memory format; return (model, the module to call: maybe compiled)."""
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    model = model.to(rt.device, memory_format=memory_format)
    if not rt.compile:
        return model, model
    return model, torch.compile(model, dynamic=False, mode=rt.compile_mode)


class TrainStep:
    """One optimizer step on one batch: forward under autocast, loss, backward, clip, step.

    The loss is the mean over the *global* batch of `n` images, however the batch is split over
    ranks (DDP averages gradients across ranks) and over `accum_steps` micro-batches (DDP's
    no_sync on all but the last). Returns this rank's share of that loss and the gradient norm
    as device tensors (no host sync).
    """

    def __init__(self, forward: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime,
                 label_smoothing: float, clip_grad_norm: float | None, accum_steps: int = 1,
                 ddp: torch.nn.parallel.DistributedDataParallel | None = None, world: int = 1):
        self.forward, self.optimizer, self.rt = forward, optimizer, rt
        self.label_smoothing, self.clip = label_smoothing, clip_grad_norm
        self.accum_steps, self.ddp, self.world = accum_steps, ddp, world
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, n: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.world / (n or len(y))  # DDP divides the summed gradients by world
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(zip(x.tensor_split(self.accum_steps), y.tensor_split(self.accum_steps)))
        loss = None
        for j, (xm, ym) in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                with self.rt.autocast():
                    logits = self.forward(xm)
                part = F.cross_entropy(logits.float(), ym, label_smoothing=self.label_smoothing,
                                       reduction="sum") * scale
                (self.scaler.scale(part) if self.scaler is not None else part).backward()
            loss = part.detach() if loss is None else loss + part.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None], foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss / self.world, grad_norm.detach()


@dataclass
class EvalResult:
    num_images: int
    loss: float
    top1: float
    top5: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def per_class(self, classes: list[str]) -> dict[str, float]:
        return {name: 100.0 * row[i] / max(sum(row), 1)
                for i, (name, row) in enumerate(zip(classes, self.confusion))}


@torch.inference_mode()
def evaluate(forward: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int, normalize: Normalize, rt: Runtime, num_classes: int,
             dist: Dist | None = None) -> EvalResult:
    """Every test image once, in order; counts stay on the device until the end.

    Under DDP each rank takes a contiguous share of the images and the counts are added across
    ranks, so every image is counted once and every rank gets the same result.
    """
    forward.eval()
    dist = dist or Dist()
    n = len(images)
    lo, hi = dist.shard(n)
    images, labels = images[lo:hi], labels[lo:hi]
    dev = images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    top1 = torch.zeros((), dtype=torch.int64, device=dev)
    top5 = torch.zeros((), dtype=torch.int64, device=dev)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=dev)
    k = min(5, num_classes)
    for x, y in eval_batches(images, labels, batch_size, normalize):
        with rt.autocast():
            logits = forward(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        top1 += (topk[:, 0] == y).sum()
        top5 += (topk == y[:, None]).any(dim=1).sum()
        confusion += torch.bincount(y * num_classes + topk[:, 0], minlength=num_classes ** 2)
    sums = dist.all_reduce_sum(torch.stack([loss_sum, top1.double(), top5.double()]))
    confusion = dist.all_reduce_sum(confusion)
    loss_total, top1_count, top5_count = sums.tolist()
    return EvalResult(n, loss_total / n, 100.0 * int(top1_count) / n, 100.0 * int(top5_count) / n,
                      confusion.view(num_classes, num_classes).tolist())


class Window:
    """Sums of loss and gradient norm between two log points, kept on the device."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, norm: torch.Tensor, images: int) -> None:
        self.loss += loss
        self.norm += norm
        self.steps += 1
        self.images += images

    def flush(self, epoch: int, step: int, lr: float, dist: Dist | None = None) -> dict[str, Any]:
        """The log record of the window (syncs; sums the ranks' loss shares), then an empty one."""
        loss = (dist or Dist()).all_reduce_sum(self.loss.clone())
        record = {"epoch": epoch, "step": step, "loss": loss.item() / self.steps, "lr": lr,
                  "grad_norm": self.norm.item() / self.steps,
                  "img_per_s": self.images / (time.perf_counter() - self.t0)}
        self.loss.zero_()
        self.norm.zero_()
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.cpu(), "norm": self.norm.cpu(), "steps": self.steps,
                "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.copy_(state["loss"])
        self.norm.copy_(state["norm"])
        self.steps, self.images = state["steps"], state["images"]


class Guard:
    """Watches loss and gradient norm for non-finite values on the device; read at log points.

    With fp16 a GradScaler skips steps with inf gradients by design: only a streak of
    `patience` such steps in a row counts. Otherwise the first non-finite step counts.
    """

    def __init__(self, device: torch.device, step: int, patience: int):
        self.patience = patience
        self.count = torch.full((), step, dtype=torch.int64, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.tripped_at = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.count += 1
        self.streak.add_(1).mul_(bad)
        hit = (self.streak >= self.patience) & (self.tripped_at < 0)
        self.tripped_at.copy_(torch.where(hit, self.count, self.tripped_at))

    def check(self, steps_per_epoch: int, run_dir: Path) -> None:
        step = int(self.tripped_at.item())
        if step >= 0:
            states = find_states(run_dir)
            last = str(states[-1]) if states else "none yet"
            raise TrainingDiverged(
                f"non-finite loss or gradient norm at epoch {(step - 1) // steps_per_epoch + 1}, "
                f"step {step}; stopped without saving. Last good state: {last}. Lower "
                "--optim.lr or check the data, then resume with --resume auto or PATH")


class StopSignals:
    """SIGTERM or a first Ctrl-C ask the loop to stop after the current step; a second Ctrl-C
    raises KeyboardInterrupt at once (nothing more is written)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a resumable "
              "state (Ctrl-C again to quit at once, without it)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


@dataclass
class RunState:
    """Where a run is, besides the tensors of model and optimizer."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch (non-zero only after an interruption)
    step: int = 0  # optimizer steps done
    best_top1: float = -1.0
    best_epoch: int = 0


def train_one_epoch(step_fn: TrainStep, loader: DeviceLoader, run: RunState, cfg: TrainConfig,
                    log: MetricsLog, progress: Progress, window: Window, guard: Guard,
                    stop: StopSignals | None = None, rng_state: torch.Tensor | None = None) -> bool:
    """Train epoch `run.epoch` from batch `run.batch`, updating `run`.

    Returns False when a stop was requested before the epoch's end (run.batch says where).
    Under DDP the ranks agree on stopping at a log point, where they synchronise anyway.
    """
    step_fn.forward.train()
    steps, dist, top_lr = len(loader), loader.dist, peak_lr(cfg.optim, cfg.data.batch_size)
    progress.start_epoch(run.epoch + 1, steps, done=run.batch)
    for x, y, n in loader.epoch(run.epoch, start=run.batch, rng_state=rng_state):
        lr = lr_at(run.step, top_lr, cfg.sched, steps)
        set_lr(step_fn.optimizer, lr)
        loss, grad_norm = step_fn(x, y, n)
        window.add(loss, grad_norm, n)
        guard.update(loss, grad_norm)
        run.step += 1
        run.batch += 1
        progress.advance()
        at_log = run.batch % cfg.log_interval == 0 or run.batch == steps
        if at_log:
            guard.check(steps, cfg.run_dir)
            record = window.flush(run.epoch + 1, run.step, lr, dist)
            log.write(record)
            progress.log_train(record, steps, run.batch)
        if stop is not None and run.batch < steps and _agree_to_stop(stop, dist, at_log, x.device):
            progress.end_epoch()
            guard.check(steps, cfg.run_dir)
            return False
    progress.end_epoch()
    run.epoch, run.batch = run.epoch + 1, 0
    return True


def _agree_to_stop(stop: StopSignals, dist: Dist, at_log: bool, device: torch.device) -> bool:
    """One process stops at once; DDP ranks decide together, at log points only."""
    if not dist.enabled:
        return stop.requested
    return at_log and dist.any(stop.requested, device)


# Options that may differ between a run and its resumption: where and how fast, not what.
RESUMABLE_CHANGES = ("name", "work_dir", "device", "precision", "compile", "compile_mode",
                     "channels_last",
                     "val_interval", "ckpt_interval", "log_interval", "state_interval",
                     "keep_last", "data.root", "data.download", "data.eval_batch_size",
                     "model.pretrained", "model.pretrained_format", "model.pretrained_prefix")


def config_changes(old: dict[str, Any], new: TrainConfig) -> list[str]:
    """The options that differ between a saved config and `new` and change what the run does."""
    a, b = flatten(old), flatten(to_dict(new))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]


def find_resume_state(cfg: TrainConfig, resume: str | None,
                      allow_changes: bool) -> tuple[Path, dict[str, Any]] | None:
    """The training state to resume from (`auto`: the newest readable one), checked."""
    if not resume:
        return None
    if resume == "auto":
        found = None
        for path in reversed(find_states(cfg.run_dir)):
            try:
                found = path, load_state(path)
                break
            except UserError as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
        if found is None:
            print(f"no training state in {cfg.run_dir}; starting fresh", file=sys.stderr)
            return None
    else:
        found = Path(resume), load_state(Path(resume))
    path, state = found
    changes = config_changes(json.loads(state["config"]), cfg)
    if changes and not allow_changes:
        raise UserError(f"cannot resume {path}: the config differs in " + ", ".join(changes)
                        + "; resume with the run's own config.json (--config) or pass "
                        "--resume-allow-changes")
    return found


def save_training_state(run_dir: Path, cfg: TrainConfig, run: RunState, model: torch.nn.Module,
                        step_fn: TrainStep, loader: DeviceLoader, window: Window,
                        log: MetricsLog) -> Path:
    """Everything an exact resume needs, atomically; then prune old states."""
    device = loader.images.device
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
           "data": loader.generator.get_state()}
    path = state_path(run_dir, run.step)
    save_state(path, {
        "config": config_json(cfg), "run": dataclasses.asdict(run),
        "model": model.state_dict(), "optimizer": step_fn.optimizer.state_dict(),
        "scaler": step_fn.scaler.state_dict() if step_fn.scaler is not None else None,
        "rng": rng, "window": window.state_dict(), "metrics_bytes": log.size()})
    best_step = run.best_epoch * len(loader) if run.best_epoch else None
    prune_states(run_dir, cfg.keep_last, keep_step=best_step)
    return path


def restore_training_state(state: dict[str, Any], path: Path, run: RunState,
                           model: torch.nn.Module, step_fn: TrainStep, loader: DeviceLoader,
                           window: Window, log: MetricsLog) -> torch.Tensor:
    """Put a run back where `state` left it; returns the data generator state to continue with
    (None at an epoch boundary)."""
    if problem := layout_mismatch(model, state["model"]):
        raise UserError(f"{path} does not fit this model ({problem}); resume with the run's "
                        "own config.json")
    model.load_state_dict(state["model"])
    try:
        step_fn.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this optimiser ({first_line(e)}); resume with the "
                        "run's own config.json") from None
    if step_fn.scaler is not None and state.get("scaler"):
        step_fn.scaler.load_state_dict(state["scaler"])
    for k, v in state["run"].items():
        setattr(run, k, v)
    window.load_state_dict(state["window"])
    log.truncate(state["metrics_bytes"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and loader.images.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], loader.images.device)
    # Mid-epoch, the augmentation draws continue from where they were; a new epoch reseeds.
    return state["rng"]["data"] if run.batch else None


def _best_on_disk(path: Path) -> float:
    """Top-1 recorded in an existing best.safetensors (-1 when there is none)."""
    if not path.exists():
        return -1.0
    try:
        return float(load_weights(path).metrics.get("top1", -1.0))
    except UserError:
        return -1.0


def fit(cfg: TrainConfig, live_progress: bool | None = None, resume: str | None = None,
        allow_changes: bool = False) -> dict[str, Any]:
    """Run the whole training described by `cfg` (or continue it); returns the best top-1.

    Under torchrun every process calls this; rank 0 alone writes into the work dir.
    """
    info = distributed.from_env()
    cfg = dataclasses.replace(cfg, work_dir=cfg.run_dir)
    rt = resolve_runtime(cfg, info)
    per_step = info.world * cfg.optim.accum_steps
    if cfg.data.batch_size % per_step:
        raise UserError(f"--data.batch-size {cfg.data.batch_size} is the global batch; it must "
                        f"split evenly over {info.world} processes x {cfg.optim.accum_steps} "
                        f"accumulation steps (a multiple of {per_step})")
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create work dir {run_dir}: {e.strerror or e}; pick another "
                        "with --work-dir") from None
    distributed.start(info, rt.device)
    try:
        with WorkDirLock(run_dir) if info.is_main else contextlib.nullcontext():
            if info.is_main:
                remove_stale_temp_files(run_dir)
            found = find_resume_state(cfg, resume, allow_changes)
            if found is None and find_states(run_dir):
                raise UserError(f"work dir {run_dir} holds the training states of an earlier run "
                                f"({find_states(run_dir)[-1].name}); continue it with --resume "
                                "auto or start a new run with another --work-dir")
            if info.is_main:
                write_config(cfg)
            return _train(cfg, rt, found, live_progress, info)
    finally:
        distributed.stop()


def _train(cfg: TrainConfig, rt: Runtime, found: tuple[Path, dict[str, Any]] | None,
           live_progress: bool | None, info: Dist) -> dict[str, Any]:
    run_dir, main = cfg.run_dir, info.is_main
    progress = Progress(cfg.sched.epochs, live_progress, enabled=main)
    progress.message(f"run {cfg.name}: {json.dumps(rt.as_dict())} x {info.world} process(es) "
                     f"-> {run_dir}")
    seed_everything(cfg.seed)
    # A resumed run takes its weights from the state: no download of pretrained weights.
    model_cfg = cfg.model if found is None else dataclasses.replace(cfg.model, pretrained="none")
    model, forward = prepare_model(build_model(model_cfg, cfg.data.num_classes, main), rt)
    data = load_cifar10(cfg.data, rt.device, warn=main)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    ddp, train_forward = None, forward
    if info.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
        train_forward = torch.compile(ddp, mode=rt.compile_mode) if rt.compile else ddp
    step_fn = TrainStep(train_forward, optimizer, rt, cfg.model.label_smoothing,
                        cfg.optim.clip_grad_norm, cfg.optim.accum_steps, ddp, info.world)
    loader = DeviceLoader(data.train_images, data.train_labels, cfg.data, cfg.seed,
                          rt.channels_last, info)
    normalize = Normalize(cfg.data, rt.device, rt.channels_last)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    run, window, rng_state = RunState(), Window(rt.device), None
    if found is None:
        log.truncate(0)
    else:
        rng_state = restore_training_state(found[1], found[0], run, model, step_fn, loader,
                                           window, log)
        run.best_top1 = max(run.best_top1, _best_on_disk(run_dir / "best.safetensors"))
        progress.message(f"resumed from {found[0]} at epoch {run.epoch + 1}, batch {run.batch}, "
                         f"step {run.step}")
    guard = Guard(rt.device, run.step, patience=50 if rt.precision == "fp16" else 1)
    epochs = cfg.sched.epochs

    def save_weights_as(name: str, metrics: dict[str, float]) -> None:
        if main:
            save_weights(run_dir / name, model, cfg, data.classes, run.epoch, metrics,
                         rt.as_dict())

    def save_state() -> Path:
        if main:
            return save_training_state(run_dir, cfg, run, model, step_fn, loader, window, log)
        return state_path(run_dir, run.step)

    with StopSignals() as stop:
        while run.epoch < epochs:
            if not train_one_epoch(step_fn, loader, run, cfg, log, progress, window, guard,
                                   stop, rng_state):
                raise _interrupted(stop, save_state(), run, cfg)
            rng_state = None
            epoch, last = run.epoch, run.epoch == epochs
            metrics: dict[str, float] = {}
            if epoch % cfg.val_interval == 0 or last:
                res = evaluate(forward, data.test_images, data.test_labels,
                               cfg.data.eval_batch_size, normalize, rt, cfg.data.num_classes,
                               info)
                metrics = {"val_loss": res.loss, "top1": res.top1, "top5": res.top5}
                log.write({"epoch": epoch, **metrics})
                if res.top1 > run.best_top1:
                    run.best_top1, run.best_epoch = res.top1, epoch
                    save_weights_as("best.safetensors", metrics)
                progress.log_val({"epoch": epoch, **metrics}, run.best_top1)
            if epoch % cfg.ckpt_interval == 0 or last:
                save_weights_as(f"epoch_{epoch}.safetensors", metrics)
            stopping = info.any(stop.requested, rt.device)
            if epoch % cfg.state_interval == 0 or last or stopping:
                path = save_state()
                if stopping and not last:
                    raise _interrupted(stop, path, run, cfg)
    progress.message(f"done: best top1 {run.best_top1:.2f} at epoch {run.best_epoch}: "
                     f"{run_dir / 'best.safetensors'}")
    return {"best_top1": run.best_top1, "best_epoch": run.best_epoch, "work_dir": str(run_dir)}


def _interrupted(stop: StopSignals, path: Path, run: RunState, cfg: TrainConfig) -> Interrupted:
    signum = stop.signum or signal.SIGTERM  # a rank that agreed to stop without the signal
    where = (f"epoch {run.epoch + 1}, batch {run.batch}" if run.batch
             else f"the end of epoch {run.epoch}")
    return Interrupted(
        f"{signal.Signals(signum).name}: stopped at {where} (step {run.step}); state saved "
        f"to {path}. Resume with: convnext-cifar train --config {cfg.run_dir / 'config.json'} "
        "--resume auto", 128 + signum)


def write_config(cfg: TrainConfig) -> None:
    try:
        atomic_write_bytes(cfg.run_dir / "config.json", config_json(cfg).encode())
    except OSError as e:
        raise UserError(f"cannot write to work dir {cfg.run_dir}: {e.strerror or e}; "
                        "pick another with --work-dir") from None


def evaluate_checkpoint(path: Path, data_root: Path | None = None, download: bool | None = None,
                        device: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Rebuild the model from a checkpoint's own metadata and evaluate the test split."""
    ckpt = load_weights(path)
    cfg = ckpt.config
    data_changes = {k: v for k, v in (("root", data_root), ("download", download),
                                      ("eval_batch_size", batch_size)) if v is not None}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_changes),
                              device=device or cfg.device)
    rt = resolve_runtime(cfg)
    model = build_model(dataclasses.replace(cfg.model, pretrained="none"), cfg.data.num_classes)
    if problem := layout_mismatch(model, ckpt.state_dict):
        raise UserError(f"{path} does not match the model its metadata describes ({problem}); "
                        "the file is damaged or was edited")
    model.load_state_dict(ckpt.state_dict)
    model, forward = prepare_model(model, rt)
    data = load_cifar10(cfg.data, rt.device, train=False)
    normalize = Normalize(cfg.data, rt.device, rt.channels_last)
    res = evaluate(forward, data.test_images, data.test_labels, cfg.data.eval_batch_size,
                   normalize, rt, cfg.data.num_classes)
    return {"checkpoint": str(path), "epoch": ckpt.epoch, "num_images": res.num_images,
            "top1": res.top1, "top5": res.top5, "loss": res.loss,
            "per_class": res.per_class(data.classes), "confusion": res.confusion,
            "recorded": ckpt.metrics}
