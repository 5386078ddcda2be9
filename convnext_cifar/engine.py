"""The training loop, written out: fit() -> train() -> train_one_epoch() -> TrainStep, and
validate(). `build_run` builds what they run, the same way for `train` and the benchmark. Using
a trained model (eval, predict, export) is evaluate.py's, which never imports this module.

Scalars stay on the device between log points: the only host-device syncs are at a log point,
at the end of an epoch and after validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convnext_cifar import distributed
from convnext_cifar.augment import build_batch_transform
from convnext_cifar.checkpoints import (
    WorkDirLock,
    find_states,
    load_weights,
    save_weights,
    write_status,
)
from convnext_cifar.config import TrainConfig, config_json
from convnext_cifar.data import DeviceLoader, Normalize
from convnext_cifar.datasets import Dataset, load_dataset, prepare_dataset
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import Interrupted, Pruned, TrainingDiverged, UserError
from convnext_cifar.evaluate import evaluate
from convnext_cifar.files import remove_stale_temp_files, write_file
from convnext_cifar.model import ModelEma, build_model, ema_lag_warning, ema_schedule
from convnext_cifar.optim import build_optimizer, lr_at, peak_lr, set_lr
from convnext_cifar.report import MetricsLog, Progress, RunClock, TensorBoardLog
from convnext_cifar.resume import (
    DatasetRecord,
    GlobalRng,
    Position,
    StopSignals,
    TrainingState,
    choose_work_dir,
    device_kind_change,
    earlier_results,
    find_resume_state,
    recorded_normalisation,
    refuse_changes,
    set_aside_after,
)
from convnext_cifar.runtime import (
    Runtime,
    compiled,
    configure_backends,
    prepare_model,
    resolve_runtime,
    seed_everything,
)
from convnext_cifar.tracking import MlflowLog, publish

VAL_FILES = "val_files.txt"  # in the work dir: the held-out images of a folder dataset

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_sum(label_smoothing: float, weight: torch.Tensor | None = None) -> LossFn:
    """Summed cross-entropy of logits against class indices, or against per-class probabilities
    (soft targets, as MixUp/CutMix make them), with label smoothing applied to either, and each
    class's terms scaled by `weight` when given."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=weight,
                               label_smoothing=label_smoothing, reduction="sum")

    return loss


class GradScaler(torch.amp.GradScaler):
    """torch's GradScaler; a state saved without scaling (fp32, bf16) loads into an fp16 run as
    a fresh scale, so the precision may change when a run resumes."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


class TrainStep:
    """One optimizer step on one batch: forward under autocast, loss, backward, clip, step.

    The loss is the mean over the *global* batch of `n` images, however the batch is split over
    ranks (DDP averages gradients across ranks) and over `accum_steps` micro-batches (DDP's
    no_sync on all but the last). Returns this rank's share of that loss and the gradient norm
    as device tensors (no host sync).

    A compiled `forward` keeps one graph: micro-batches of another size than `compiled_rows`
    (an epoch's last, smaller batch) run through `eager`, the same module uncompiled, instead of
    costing a cold compile of their own.
    """

    def __init__(self, forward: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime,
                 loss_fn: LossFn, clip_grad_norm: float | None, accum_steps: int = 1,
                 ddp: torch.nn.parallel.DistributedDataParallel | None = None, world: int = 1,
                 eager: torch.nn.Module | None = None, compiled_rows: int = 0):
        self.forward, self.optimizer, self.rt, self.loss_fn = forward, optimizer, rt, loss_fn
        self.clip, self.accum_steps, self.ddp, self.world = clip_grad_norm, accum_steps, ddp, world
        self.eager, self.compiled_rows = eager if rt.compile else None, compiled_rows
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.scaler = GradScaler(rt.device.type, enabled=rt.precision == "fp16")

    def __call__(self, x: torch.Tensor, target: torch.Tensor, n: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.world / (n or len(target))  # DDP divides the summed gradients by world
        if self.rt.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(zip(x.tensor_split(self.accum_steps), target.tensor_split(self.accum_steps)))
        loss = None
        for j, (xm, tm) in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            forward = self.forward
            if self.eager is not None and len(xm) != self.compiled_rows:
                forward = self.eager  # the tail batch: no second graph
            with sync:
                with self.rt.autocast():
                    logits = forward(xm)
                part = self.loss_fn(logits, tm) * scale
                (self.scaler.scale(part) if self.scaler.is_enabled() else part).backward()
            loss = part.detach() if loss is None else loss + part.detach()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None], foreach=True)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss / self.world, grad_norm.detach()


class Window:
    """Sums of loss and gradient norm between two log points, kept on the device.

    A step whose gradient norm is not finite (an fp16 overflow the GradScaler skips) adds to
    `skipped` instead of the norm; the record then says how many were skipped.
    """

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.finite = torch.zeros((), dtype=torch.int64, device=device)
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, norm: torch.Tensor, images: int) -> None:
        self.loss += loss
        finite = torch.isfinite(norm)
        self.norm += torch.where(finite, norm, 0.0)
        self.finite += finite
        self.steps += 1
        self.images += images

    def flush(self, epoch: int, step: int, lr: float, dist: Dist | None = None) -> dict[str, Any]:
        """The log record of the window (syncs; sums the ranks' loss shares), then an empty one."""
        loss = (dist or Dist()).all_reduce_sum(self.loss.clone())
        loss_sum, norm_sum, finite = torch.stack(  # one read from the device
            [loss, self.norm, self.finite.to(loss.dtype)]).tolist()
        finite = int(finite)
        record = {"epoch": epoch, "step": step, "loss": loss_sum / self.steps, "lr": lr,
                  "grad_norm": norm_sum / max(finite, 1),
                  "img_per_s": self.images / (time.perf_counter() - self.t0)}
        if finite < self.steps:
            record["skipped_steps"] = self.steps - finite
        self.loss.zero_()
        self.norm.zero_()
        self.finite.zero_()
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.cpu(), "norm": self.norm.cpu(), "finite": self.finite.cpu(),
                "steps": self.steps, "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.copy_(state["loss"])
        self.norm.copy_(state["norm"])
        self.steps, self.images = state["steps"], state["images"]
        self.finite.fill_(state.get("finite", self.steps))  # older states: every step finite


class Guard:
    """Watches loss and gradient norm for non-finite values on the device; read at log points.

    With fp16 a GradScaler skips steps with inf gradients by design: only a streak of
    `patience` such steps in a row counts. Otherwise the first non-finite step counts.
    """

    def __init__(self, device: torch.device, patience: int):
        self.patience = patience
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # steps seen
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

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.cpu(), "streak": self.streak.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count.copy_(state["count"])
        self.streak.copy_(state["streak"])


# ---- what a run is made of, built one way for train and the benchmark -------------------------

@dataclass
class Run:
    """The parts of a training run: data, model, the module to call (maybe compiled), the step,
    the loader, and the EMA of the weights when it is on."""

    cfg: TrainConfig
    rt: Runtime
    dist: Dist
    data: Dataset
    model: torch.nn.Module
    forward: torch.nn.Module
    normalize: Normalize
    step_fn: TrainStep
    loader: DeviceLoader
    ema: ModelEma | None = None


def build_run(cfg: TrainConfig, rt: Runtime, dist: Dist | None = None,
              data: Dataset | None = None, *, pretrained: bool = True) -> Run:
    """Build what `cfg` describes on `rt`: the dataset (unless given), the model (from its
    pretrained weights when `pretrained`), the optimizer, the step, the loader and the EMA."""
    dist = dist or Dist()
    if data is None:
        data = load_dataset(cfg.data, rt.device)
    if data.train is None:
        raise ValueError("training needs the dataset's training split")
    seed_everything(cfg.seed)
    model_cfg = cfg.model if pretrained else dataclasses.replace(cfg.model, pretrained="none")
    model, forward = prepare_model(build_model(model_cfg, data.num_classes, dist.is_main), rt)
    normalize = Normalize(data.mean, data.std, cfg.data.image_size, rt.device, rt.channels_last)
    ddp, train_forward = None, forward
    if dist.enabled:
        # Same initial weights on every rank (seeded above), but each rank its own drop-path noise.
        torch.manual_seed(cfg.seed + 1_000_003 * (dist.rank + 1))
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
        train_forward = compiled(ddp, rt)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    weights = None
    if cfg.loss.class_weights != "none":  # the class counts are read once, here
        counts = torch.bincount(data.train.labels, minlength=data.num_classes).tolist()
        weights = torch.tensor(cfg.loss.weights(counts), device=rt.device)
    loss_fn = cross_entropy_sum(cfg.model.label_smoothing, weights)
    step_fn = TrainStep(train_forward, optimizer, rt, loss_fn,
                        cfg.optim.clip_grad_norm, cfg.optim.accum_steps, ddp, dist.world,
                        eager=ddp or model,
                        compiled_rows=cfg.data.batch_size // dist.world // cfg.optim.accum_steps)
    transform = build_batch_transform(cfg.aug, data.num_classes, data.mean, data.std)
    loader = DeviceLoader(data.train.images, data.train.labels, cfg.data, cfg.seed, normalize,
                          dist, transform)
    ema = None
    decay, warmup = ema_schedule(cfg.ema.decay, cfg.ema.warmup_steps,
                                 cfg.sched.epochs * len(loader))
    if decay > 0:
        ema = ModelEma(model, decay, warmup, wrap=lambda m: compiled(m, rt))
    return Run(cfg, rt, dist, data, model, forward, normalize, step_fn, loader, ema)


# ---- the loop ----------------------------------------------------------------------------------

def train_one_epoch(run: Run, position: Position, log: MetricsLog, progress: Progress,
                    window: Window, guard: Guard, stop: StopSignals | None = None) -> bool:
    """Train epoch `position.epoch` from batch `position.batch`, updating `position`.

    Returns False when a stop was requested before the epoch's end (position.batch says where).
    Under DDP the ranks agree on stopping at a log point, where they synchronise anyway.
    """
    cfg, step_fn, loader = run.cfg, run.step_fn, run.loader
    step_fn.forward.train()
    steps, top_lr = len(loader), peak_lr(cfg.optim, cfg.data.batch_size)
    progress.start_epoch(position.epoch + 1, steps, done=position.batch)
    # each batch arrives gathered, cropped, flipped, augmented and mixed (data.py, augment.py)
    for x, y, n in loader.epoch(position.epoch, start=position.batch):
        lr = lr_at(position.step, top_lr, cfg.sched, steps)
        set_lr(step_fn.optimizer, lr)
        loss, grad_norm = step_fn(x, y, n)
        window.add(loss, grad_norm, n)
        guard.update(loss, grad_norm)
        position.step += 1
        position.batch += 1
        if run.ema is not None:
            run.ema.update(run.model, position.step)
        progress.advance()
        at_log = position.batch % cfg.log_interval == 0 or position.batch == steps
        if at_log:
            guard.check(steps, cfg.run_dir)
            record = window.flush(position.epoch + 1, position.step, lr, run.dist)
            log.write(record)
            position.tick()
            progress.log_train(record, steps, position.batch, position.elapsed_s)
        if stop is not None and position.batch < steps and stop.agreed(run.dist, at_log,
                                                                        x.device):
            progress.end_epoch()
            guard.check(steps, cfg.run_dir)
            return False
    progress.end_epoch()
    position.epoch, position.batch = position.epoch + 1, 0
    return True


def train(run: Run, found: tuple[Path, dict[str, Any]] | None = None,
          live_progress: bool | None = None,
          on_validation: Callable[[int, dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The epochs of a built run (continuing the training state `found`); returns the best.
    `on_validation(epoch, record)` (a tuner's) sees every validation record; when it returns
    True the run stops there, as pruned."""
    cfg, rt, dist = run.cfg, run.rt, run.dist
    clock = RunClock(cfg.sched.epochs, len(run.loader), cfg.data.batch_size, cfg.val_interval)
    progress = Progress(cfg.sched.epochs, live_progress, is_main=dist.is_main, clock=clock)
    progress.message(f"run {cfg.run_name}: {json.dumps(rt.as_dict())} x {dist.world} "
                     f"process(es) -> {cfg.run_dir}")
    for note in run.data.notes:
        progress.warning(note)
    if run.ema is not None and cfg.ema.decay != "auto" and (
            lag := ema_lag_warning(run.ema.decay, cfg.sched.epochs * len(run.loader))):
        progress.warning(lag)
    log = MetricsLog(cfg.run_dir / "metrics.jsonl", is_main=dist.is_main)
    position, window = Position(), Window(rt.device)
    guard = Guard(rt.device, patience=50 if rt.precision == "fp16" else 1)
    tracking = MlflowLog(cfg.log.mlflow, cfg) if cfg.log.mlflow and dist.is_main else None
    state = TrainingState(cfg, dist, len(run.loader), {
        "run": position, "model": run.model, "optimizer": run.step_fn.optimizer,
        "scaler": run.step_fn.scaler, "rng": GlobalRng(rt.device, dist), "loader": run.loader,
        "window": window, "guard": guard, "log": log, "dataset": DatasetRecord(run.data.identity),
        **({"ema": run.ema} if run.ema is not None else {}),
        **({"tracking": tracking} if tracking is not None else {})},
        optional=("dataset", "tracking"))
    _start_or_resume(state, found, log, progress)
    if tracking is not None:
        tracking.open(position.step)
        log.mlflow = tracking
    with RunStatus(run, position, log) as status, StopSignals() as stop:
        while position.epoch < cfg.sched.epochs:
            if not train_one_epoch(run, position, log, progress, window, guard, stop):
                raise stop.interrupted(_save(state, log), position, cfg)
            epoch, last = position.epoch, position.epoch == cfg.sched.epochs
            metrics: dict[str, float] = {}
            if epoch % cfg.val_interval == 0 or last:
                metrics = _validate_timed(run, state, log, progress, on_validation)
            if epoch % cfg.ckpt_interval == 0 or last:
                save_weights_of(run, f"epoch_{epoch}.safetensors", epoch, metrics)
            stopping = dist.any(stop.requested, rt.device)
            if state.due() or stopping:
                path = _save(state, log)
                if stopping and not last:
                    raise stop.interrupted(path, position, cfg)
            status.write("running")
        if dist.is_main:
            publish(cfg, log, str(rt.device))
    progress.message(f"done: best {cfg.eval.best_metric} {position.best_top1:.2f} at epoch "
                     f"{position.best_epoch}: "
                     f"{cfg.run_dir / 'best.safetensors'}")
    return {"best_top1": position.best_top1, "best_epoch": position.best_epoch,
            "work_dir": str(cfg.run_dir)}


def _validate_timed(run: Run, state: TrainingState, log: MetricsLog, progress: Progress,
                    on_validation: Callable[[int, dict[str, Any]], bool] | None
                    ) -> dict[str, float]:
    """`validate`, timed for the run's projection; stops the run as pruned when the caller's
    `on_validation` says so (after writing a state)."""
    position, started = state.position, time.perf_counter()
    metrics, record = validate(run, position, log, progress)
    position.tick()
    progress.validated(time.perf_counter() - started, position.step, position.epoch,
                       position.elapsed_s)
    if on_validation is not None and on_validation(position.epoch, record):
        _save(state, log)
        raise Pruned(f"pruned after epoch {position.epoch}")
    return metrics


def _save(state: TrainingState, log: MetricsLog) -> Path:
    """Write a training state; then the trackers may have what it has seen."""
    path = state.save()
    if state.dist.is_main:
        log.commit()
    return path


def _start_or_resume(state: TrainingState, found: tuple[Path, dict[str, Any]] | None,
                     log: MetricsLog, progress: Progress) -> None:
    """A fresh start empties metrics.jsonl; a resumption restores every component of `found`
    (metrics.jsonl is cut back to what that state had seen) and reopens TensorBoard there."""
    cfg, position = state.cfg, state.position
    if found is None:
        log.truncate(0)
    else:
        state.restore(found[1], found[0])
        if state.dist.is_main:
            _best_after_resume(position, cfg.run_dir, progress, cfg.eval.best_metric)
        progress.message(f"resumed from {found[0]} at epoch {position.epoch + 1}, batch "
                         f"{position.batch}, step {position.step}")
    if cfg.log.tensorboard and state.dist.is_main:  # a resumed run drops what followed its state
        log.tensorboard = TensorBoardLog(cfg.run_dir / "tb", position.step + 1 if found else None)


class RunStatus:
    """status.json of a run (rank 0): "running" while the run lives, then "finished",
    "interrupted" (a signal; a kill leaves "running" without the lock) or "diverged". As a
    context manager it writes the outcome, and closes TensorBoard."""

    def __init__(self, run: Run, position: Position, log: MetricsLog):
        self.run, self.position, self.log = run, position, log

    def write(self, status: str) -> None:
        if self.run.dist.is_main:
            p = self.position
            p.tick()
            write_status(self.run.cfg.run_dir, {
                "status": status, "epoch": p.epoch, "epochs": self.run.cfg.sched.epochs,
                "step": p.step, "best_top1": p.best_top1, "best_epoch": p.best_epoch,
                "elapsed_s": p.elapsed_s, "updated": time.time(), "pid": os.getpid()})

    def __enter__(self) -> RunStatus:
        self.write("running")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.write("finished")
        elif issubclass(kind, (Interrupted, KeyboardInterrupt)):
            self.write("interrupted")
        elif issubclass(kind, TrainingDiverged):
            self.write("diverged")
        elif issubclass(kind, Pruned):
            self.write("pruned")
        if self.log.tensorboard is not None:
            self.log.tensorboard.close()
        if self.log.mlflow is not None:
            self.log.mlflow.close("finished" if kind is None else "interrupted" if issubclass(
                kind, (Interrupted, KeyboardInterrupt)) else "failed")


def validate(run: Run, position: Position, log: MetricsLog, progress: Progress
             ) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate the weights (and their EMA) after epoch `position.epoch`, log it, and keep the
    best of the two as best.safetensors; returns the raw weights' metrics and the record."""
    candidates = {"raw": (run.model, _validation_metrics(run, run.forward, run.model))}
    record = {"epoch": position.epoch, **candidates["raw"][1]}
    if run.ema is not None:
        candidates["ema"] = (run.ema.module,
                             _validation_metrics(run, run.ema.forward, run.ema.module))
        record.update({f"ema_{k}": v for k, v in candidates["ema"][1].items()})
    log.write(record, step=position.step)
    key = run.cfg.eval.best_metric  # position.best_top1 holds the best value of this metric
    weights = max(candidates, key=lambda k: candidates[k][1][key])  # a tie keeps raw
    module, metrics = candidates[weights]
    if metrics[key] > position.best_top1:
        position.best_top1, position.best_epoch = metrics[key], position.epoch
        save_weights_of(run, "best.safetensors", position.epoch, metrics, module, weights)
    progress.log_val(record, position.best_top1, key)
    return candidates["raw"][1], record


def _validation_metrics(run: Run, forward: torch.nn.Module, eager: torch.nn.Module
                        ) -> dict[str, float]:
    res = evaluate(forward, run.data.val.images, run.data.val.labels,
                   run.cfg.data.eval_batch_size, run.normalize, run.rt, run.data.num_classes,
                   run.dist, run.cfg.eval.tta, eager)
    return {"val_loss": res.loss, "top1": res.top1, "top5": res.top5,
            "balanced_accuracy": res.balanced_accuracy, "macro_f1": res.macro_f1}


def save_weights_of(run: Run, name: str, epoch: int, metrics: dict[str, float],
                    module: torch.nn.Module | None = None, weights: str = "raw") -> None:
    if run.dist.is_main:
        state_dict = (module or run.model).state_dict()
        save_weights(run.cfg.run_dir / name, state_dict, run.cfg, run.data.classes, epoch,
                     metrics, run.rt.as_dict(), weights, run.data.identity)


def _best_after_resume(position: Position, run_dir: Path, progress: Progress,
                       metric: str = "top1") -> None:
    """The best value of the best metric to beat: the state's, or a better one
    best.safetensors holds (written before a crash, after the state). When the file holding
    the state's best is gone (a rollback set it aside) the next validation writes a new one."""
    if position.best_epoch and not (run_dir / "best.safetensors").exists():
        progress.warning(f"best.safetensors of epoch {position.best_epoch} ({metric} "
                         f"{position.best_top1:.2f}) is not in {run_dir}; it will hold the best "
                         "weights from the next validation on")
        position.best_top1, position.best_epoch = -1.0, 0
    position.best_top1 = max(position.best_top1, _best_on_disk(run_dir, metric))


def _best_on_disk(run_dir: Path, metric: str = "top1") -> float:
    """The metric recorded in an existing best.safetensors (-1 when there is none)."""
    path = run_dir / "best.safetensors"
    if not path.exists():
        return -1.0
    try:
        return float(load_weights(path).metrics.get(metric, -1.0))
    except UserError:
        return -1.0


# ---- the train command -------------------------------------------------------------------------

def fit(cfg: TrainConfig, live_progress: bool | None = None, resume: str | None = None,
        allow_changes: bool = False,
        on_validation: Callable[[int, dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Run the whole training described by `cfg` (or continue it); returns the best top-1.

    Under torchrun every process calls this; rank 0 alone reads and writes the work dir (other
    nodes' may be other disks) and decides for all. Everything a user can get wrong (data,
    state to resume, options, a work dir in use) is checked before anything is written.
    """
    dist = distributed.from_env()
    cfg = dataclasses.replace(cfg, name=cfg.run_name)
    rt = resolve_runtime(cfg, dist)
    configure_backends(rt)
    per_step = dist.world * cfg.optim.accum_steps
    if cfg.data.batch_size % per_step:
        raise UserError(f"--data.batch-size {cfg.data.batch_size} is the global batch; it must "
                        f"split evenly over {dist.world} processes x {cfg.optim.accum_steps} "
                        f"accumulation steps (a multiple of {per_step})")
    distributed.start(dist, rt.device)
    try:
        cfg, note = distributed.from_main(dist, lambda: choose_work_dir(cfg, resume))
        if note and dist.is_main:
            print(f"note: {note}", file=sys.stderr)
        found = distributed.from_main(dist, lambda: find_resume_state(cfg, resume))
        cfg = recorded_normalisation(found, cfg)
        # The dataset before any weights: a missing one fails at once, with no download.
        # Under torchrun rank 0 downloads or decodes it first; the others then read it.
        distributed.main_first(dist, lambda: prepare_dataset(cfg.data))
        data = distributed.together(dist, lambda: load_dataset(cfg.data, rt.device))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, mean=data.mean, std=data.std))  # recorded in config.json
        if found is not None and not allow_changes:
            distributed.together(dist, lambda: refuse_changes(found, cfg, data.identity,
                                                              rt.device))
        elif found is not None and (change := device_kind_change(found[1], rt.device)):
            print(f"note: {change}: they start afresh here", file=sys.stderr)
        # A resumed run takes its weights from the state: no download of pretrained weights.
        run = build_run(cfg, rt, dist, data, pretrained=found is None)
        with contextlib.ExitStack() as work_dir:
            distributed.from_main(dist, lambda: claim_work_dir(cfg, data, found, work_dir))
            return train(run, found, live_progress, on_validation)
    finally:
        distributed.stop()


def claim_work_dir(cfg: TrainConfig, data: Dataset, found: tuple[Path, dict[str, Any]] | None,
                   stack: contextlib.ExitStack) -> None:
    """On rank 0: create and lock the work dir (held until `stack` closes), refuse a fresh start
    over an earlier run's results, set aside what a rollback abandons, write config.json and
    the held-out files."""
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create work dir {cfg.run_dir}: {e.strerror or e}; pick "
                        "another with --work-dir") from None
    stack.enter_context(WorkDirLock(cfg.run_dir))
    remove_stale_temp_files(cfg.run_dir)
    if found is None and (results := earlier_results(cfg.run_dir)):
        states = [r for r in results if r.startswith("state_")]
        advice = (f"continue it with --resume {cfg.run_dir}, or" if states else
                  "it has no training state left to continue;")
        raise UserError(f"work dir {cfg.run_dir} holds the results of an earlier run "
                        f"({', '.join(results[:4])}{', ...' if len(results) > 4 else ''}); "
                        f"{advice} start a new run with another --work-dir")
    if found is not None and (note := set_aside_after(found, cfg.run_dir)):
        print(note, file=sys.stderr, flush=True)
    write_file(cfg.run_dir / "config.json", config_json(cfg).encode(),
               advice="pick another work dir with --work-dir")
    if data.val.files:  # the held-out images, one path below the dataset's root a line
        write_file(cfg.run_dir / VAL_FILES, "".join(f + "\n" for f in data.val.files).encode())
