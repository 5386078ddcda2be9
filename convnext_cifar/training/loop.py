"""The training loop, written out: fit() -> train() -> train_one_epoch() -> TrainStep, and
validate(). build.py builds what they run; state.py holds what they resume from. Using a
trained model (eval, predict, export) is use/'s, which never imports this package.

Every record goes to the run's `MetricsLog` (console, metrics.jsonl, trackers); after the last
epoch the HTML report is written when a tracker takes it. Scalars stay on the device between
log points: the only host-device syncs are at a log point, at the end of an epoch and after
validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convnext_cifar import distributed
from convnext_cifar.config import TrainConfig, flatten, to_dict
from convnext_cifar.data.kinds import load_dataset, prepare_dataset
from convnext_cifar.errors import Interrupted, Pruned, TrainingDiverged, UserError
from convnext_cifar.files import first_line
from convnext_cifar.metrics import TEACHER_TOP1, ema
from convnext_cifar.model.checkpoints import load_weights, save_weights
from convnext_cifar.model.ema import ema_lag_warning
from convnext_cifar.model.optim import lr_at, peak_lr, set_lr
from convnext_cifar.outputs.console import ConsoleSink, Progress, RunClock
from convnext_cifar.outputs.metrics_log import JsonlSink, MetricsLog, Sink
from convnext_cifar.outputs.report import write_report
from convnext_cifar.outputs.trackers import trackers_for
from convnext_cifar.outputs.workdir import (
    BEST_FILE,
    METRICS_FILE,
    TRAIN_LOG,
    choose_work_dir,
    claim_work_dir,
    read_status,
    write_status,
)
from convnext_cifar.runtime import Runtime, configure_backends, resolve_runtime
from convnext_cifar.terminal import ConsoleLog, warn
from convnext_cifar.training.budget import (
    plan_line,
    plan_of,
    plan_run,
    shortened,
    shortened_line,
    with_plan,
)
from convnext_cifar.training.build import Run, build_run
from convnext_cifar.training.distill import TeacherRecord
from convnext_cifar.training.lr_find import (
    buildable,
    found_line,
    found_lr_of,
    resolve_auto_lr,
    with_found_lr,
)
from convnext_cifar.training.micro_batch import (
    micro_batch_of,
    resolve_auto_micro_batch,
    with_micro_batch,
)
from convnext_cifar.training.probe import touched
from convnext_cifar.training.signals import StopSignals
from convnext_cifar.training.state import (
    DatasetRecord,
    GlobalRng,
    Position,
    TrainingState,
    device_kind_change,
    find_resume_state,
    recorded_normalisation,
    refuse_changes,
    trim_ended_run,
)
from convnext_cifar.training.step import Guard, Window
from convnext_cifar.use.evaluate import evaluate

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
    # each batch arrives gathered, cropped, flipped, augmented and mixed (data/loader.py)
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
            position.tick()  # the console projects the run's wall time from it
            log.write(record)
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
          on_validation: Callable[[int, dict[str, Any]], bool] | None = None,
          started: float | None = None) -> dict[str, Any]:
    """The epochs of a built run (continuing the training state `found`); returns the best.
    `on_validation(epoch, record)` (a tuner's) sees every validation record; when it returns
    True the run stops there, as pruned. A fresh run first finds what it is asked to
    (_self_planned): its micro-batch, LR and epochs (`started`: when the command started,
    time.monotonic(); a --sched.budget counts from it)."""
    run, chosen, micro_line = _self_planned(run, found, started)
    cfg, rt, dist, steps = run.cfg, run.rt, run.dist, len(run.loader)
    clock = RunClock(cfg.sched.epochs, steps, cfg.data.batch_size, cfg.val_interval)
    progress = Progress(cfg.sched.epochs, live_progress, is_main=dist.is_main, clock=clock)
    if run.teacher is not None:  # its held-out predictions, once: every validation compares
        run.teacher.measure(run.data.val, cfg.data.eval_batch_size, dist)
    for line in start_lines(run) + ([micro_line] if micro_line else []):
        progress.message(line)
    for note in run.data.notes:
        progress.warning(note)
    if run.ema is not None and cfg.ema.decay != "auto" and (
            lag := ema_lag_warning(run.ema.decay, cfg.sched.epochs * steps)):
        progress.warning(lag)
    position = Position(best_metric=cfg.eval.best_metric, **chosen)
    window = Window(rt.device)
    guard = Guard(rt.device, patience=50 if rt.precision == "fp16" else 1)
    log = MetricsLog(sinks(cfg, progress, position, steps) if dist.is_main else [])
    state = TrainingState(cfg, dist, steps, {
        "run": position, "model": run.model, "optimizer": run.step_fn.optimizer,
        "scaler": run.step_fn.scaler, "rng": GlobalRng(rt.device, dist), "loader": run.loader,
        "window": window, "guard": guard, **log.stateful(),
        "dataset": DatasetRecord(run.data.identity), "teacher": TeacherRecord(run.teacher),
        **({"ema": run.ema} if run.ema is not None else {})},
        optional=("dataset", "tracking", "wandb", "teacher"))
    _start_or_resume(state, found, log, progress)
    position.micro_batch = chosen["micro_batch"]  # chosen again on another device: the new one
    for line in _planning_lines(cfg, position, resumed=found is not None):
        progress.message(line)
    try:
        _epochs(run, state, log, progress, window, guard, on_validation)
    except BaseException as e:
        log.close(outcome_of(type(e)))
        if isinstance(e, Pruned) and dist.is_main and (freed := trim_ended_run(cfg)):
            progress.message(freed)
        raise
    if dist.is_main and (freed := trim_ended_run(cfg)):
        progress.message(freed)
    _after_training(run, log)
    progress.message(f"done: best {position.best_metric} {position.best:.2f} at epoch "
                     f"{position.best_epoch}: {cfg.run_dir / BEST_FILE}")
    return {"best": position.best, "best_metric": position.best_metric,
            "best_epoch": position.best_epoch, "work_dir": str(cfg.run_dir)}


def _self_planned(run: Run, found: tuple[Path, dict[str, Any]] | None, started: float | None
                  ) -> tuple[Run, dict[str, Any], str]:
    """What a run finds for itself, on a fresh start (a resume: as recorded): the micro-batch
    (--data.micro-batch auto; chosen again on another device), the LR (--optim.lr auto), the
    epochs (--sched.budget), in this order, each measured with the ones before. Returns the
    run, what to record (Position's fields), and the micro-batch's line."""
    run, micro_batch, micro_line = resolve_auto_micro_batch(run, micro_batch_of(found))
    lr_found = found_lr_of(found)
    if run.cfg.optim.lr == "auto" and lr_found is None:  # a fresh run: find it first
        run, lr_found = resolve_auto_lr(run)
    plan = plan_of(found)
    if run.cfg.sched.budget and plan is None:  # a fresh run: probe, then plan its epochs
        run, plan = plan_run(run, touched(run), time.monotonic() - (started or time.monotonic()))
    return run, {"micro_batch": micro_batch, "lr_found": lr_found, "plan": plan}, micro_line


def _planning_lines(cfg: TrainConfig, position: Position, resumed: bool) -> list[str]:
    """What --optim.lr auto found and --sched.budget planned (on a resume: what is left)."""
    return ([found_line(position.lr_found)] if position.lr_found else []) + (
        [plan_line(position.plan, cfg, position.elapsed_s if resumed else None)]
        if position.plan else [])


def _epochs(run: Run, state: TrainingState, log: MetricsLog, progress: Progress, window: Window,
            guard: Guard, on_validation: Callable[[int, dict[str, Any]], bool] | None) -> None:
    """The epochs left, each trained, validated, checkpointed and its state taken as the
    config says; status.json says how they ended, once every state is on disk."""
    cfg, rt, dist, position = run.cfg, run.rt, run.dist, state.position
    pace = None  # (epoch, time) at the end of this session's first epoch: a budget's pace
    with RunStatus(run, position) as status, StopSignals() as stop, state.writing():
        while position.epoch < cfg.sched.epochs:
            started = time.perf_counter()
            if not train_one_epoch(run, position, log, progress, window, guard, stop):
                raise stop.interrupted(_save(state, log, wait=True), position, cfg)
            state.timings["train_s"] += time.perf_counter() - started  # synced at its end
            epoch, last = position.epoch, position.epoch == cfg.sched.epochs
            metrics: dict[str, float] = {}
            if epoch % cfg.val_interval == 0 or last:
                metrics = _validate_timed(run, state, log, progress, on_validation)
            # the metrics are every rank's (all-reduced): the ranks stop at the same validation
            position.stopped_early = bool(metrics) and not last and _plateaued(cfg, position)
            if epoch % cfg.ckpt_interval == 0 or last or position.stopped_early:
                save_weights_of(run, f"epoch_{epoch}.safetensors", epoch, metrics)
            if position.plan is not None and not last and not position.stopped_early:
                cfg, pace = _keep_to_budget(run, state, progress, pace)  # before the state
            stopping = dist.any(stop.requested, rt.device)
            if state.due() or stopping or position.stopped_early:
                path = _save(state, log, wait=(stopping and not last) or position.stopped_early)
                if stopping and not last and not position.stopped_early:
                    raise stop.interrupted(path, position, cfg)
            if position.stopped_early:
                progress.message(early_stop_line(cfg, position))
                return
            status.write("running")


def _keep_to_budget(run: Run, state: TrainingState, progress: Progress,
                    pace: tuple[int, float] | None) -> tuple[TrainConfig, tuple[int, float]]:
    """A budgeted run that has fallen behind its plan gets fewer epochs (said, recorded in the
    plan). The pace is taken from the second epoch of this session on (the first pays one-time
    costs); every rank decides on the same (averaged) timings. Returns the config in force and
    the pace's start. Called before the epoch's state is taken, so the state holds the plan."""
    position, cfg, plan = state.position, run.cfg, state.position.plan
    position.tick()
    now = time.perf_counter()
    if pace is None:  # the end of this session's first epoch
        return cfg, (position.epoch, now)
    epochs_since, seconds = position.epoch - pace[0], now - pace[1]
    timings = torch.tensor([plan["setup_s"] + position.elapsed_s, seconds / epochs_since],
                           dtype=torch.float64, device=run.rt.device)
    used_s, per_epoch_s = (run.dist.all_reduce_sum(timings) / run.dist.world).tolist()
    epochs = shortened(plan, position.epoch, used_s, per_epoch_s, cfg.sched.epochs)
    if epochs >= cfg.sched.epochs:
        return cfg, pace
    progress.message(shortened_line(position.epoch, cfg.sched.epochs, epochs, used_s,
                                    plan["budget_s"]))
    plan["epochs"], plan["warmup_epochs"] = epochs, min(cfg.sched.warmup_epochs, epochs - 1)
    plan.setdefault("shortened", []).append({"after_epoch": position.epoch, "epochs": epochs})
    cfg = with_plan(cfg, plan)
    run.cfg = state.cfg = cfg
    progress.epochs = progress.clock.epochs = epochs
    return cfg, pace


def _plateaued(cfg: TrainConfig, position: Position) -> bool:
    return 0 < cfg.sched.early_stop <= position.plateau


def early_stop_line(cfg: TrainConfig, position: Position) -> str:
    gain = (f"by more than {cfg.sched.early_stop_delta:g} " if cfg.sched.early_stop_delta
            else "")
    return (f"stopped early after epoch {position.epoch} of {cfg.sched.epochs}: "
            f"{position.best_metric} has not improved {gain}in {position.plateau} validations "
            f"(--sched.early-stop {cfg.sched.early_stop}); best {position.best:.2f} at epoch "
            f"{position.best_epoch}")


def _already_finished(cfg: TrainConfig, found: tuple[Path, dict[str, Any]]
                      ) -> dict[str, Any] | None:
    """What `fit` returns for a resumption whose state ended the run's last epoch (nothing to
    train, said in one line); None when there are epochs left."""
    position = found[1]["components"]["run"]
    early = position.get("stopped_early") and 0 < cfg.sched.early_stop <= position["plateau"]
    if (position["epoch"] < cfg.sched.epochs or position["batch"]) and not early:
        return None
    how = (f"stopped early at epoch {position['epoch']} of {cfg.sched.epochs}" if early else
           f"epoch {position['epoch']} of {cfg.sched.epochs}")
    longer = ("a larger --sched.early-stop (or 0)" if early else "--sched.epochs N")
    print(f"{cfg.run_dir} is already finished: {how} ({found[0]}); nothing to train. To train "
          f"it longer: {longer} --resume-allow-changes", flush=True)
    status = read_status(cfg.run_dir)
    return {"best": status.get("best"), "best_metric": status.get("best_metric"),
            "best_epoch": status.get("best_epoch"), "work_dir": str(cfg.run_dir)}


def start_lines(run: Run) -> list[str]:
    """What a run trains, in words: its data (images per split, classes), model and parameter
    count, device, precision, compile and batch; then the options that differ from the preset
    (or config) class it started from."""
    cfg, rt, dist, data = run.cfg, run.rt, run.dist, run.data
    params = sum(p.numel() for p in run.model.parameters())
    accum_steps = run.step_fn.accum_steps  # --data.micro-batch auto: as chosen
    per_process = cfg.data.batch_size // (dist.world * accum_steps)
    accum = f" x {accum_steps} steps" if accum_steps > 1 else ""
    lines = [f"run {cfg.run_name} -> {cfg.run_dir}: {cfg.data.dataset} {len(data.train or []):,} "
             f"train / {len(data.val):,} held-out images, {data.num_classes} classes; "
             f"{cfg.model.name} ({params / 1e6:.1f} M parameters); {rt.device}, {rt.precision}, "
             f"compile {'on' if rt.compile else 'off'}"
             f"{', channels_last' if rt.channels_last else ''}; batch {cfg.data.batch_size} "
             f"({dist.world} process(es) x {per_process}{accum})"]
    ours, preset = flatten(to_dict(cfg)), flatten(to_dict(type(cfg)()))
    changed = [f"{k}={json.dumps(v)}" for k, v in ours.items()
               if k not in ("name", "work_dir") and v != preset.get(k)
               and not (k in ("data.mean", "data.std") and preset.get(k) is None)]  # measured
    if changed:
        lines.append(f"options beside {type(cfg).__name__}'s: " + " ".join(changed))
    if (teacher := run.teacher) is not None:
        d = cfg.distill
        term = f"{d.kind}, alpha {d.alpha}" + (f", T {d.temperature}" if d.kind == "soft" else "")
        lines += teacher.notes
        lines.append(f"teacher {teacher.name}: {teacher.loaded.cfg.model.name} at "
                     f"{teacher.size}x{teacher.size}, held-out top-1 {teacher.top1:.2f}; "
                     f"distillation {term}")
    return lines


def sinks(cfg: TrainConfig, progress: Progress, position: Position, steps: int) -> list[Sink]:
    """Where the records of the process that writes files go: metrics.jsonl, the trackers
    `cfg.log` turns on, the console."""
    return [JsonlSink(cfg.run_dir / METRICS_FILE), *trackers_for(cfg),
            ConsoleSink(progress, position, steps)]


def _after_training(run: Run, log: MetricsLog) -> None:
    """The steps after the last epoch, once status.json says finished: the HTML report for the
    trackers that take it (TensorBoard its figures, MLflow the page), then the trackers closed.
    Nothing here can fail the run: a step that fails is one line, and the run stays finished."""
    page = None
    if log.takes_report:
        try:
            page = write_report([run.cfg.run_dir], device=str(run.rt.device))
        except Exception as e:  # noqa: BLE001 - the run is done: say why, lose nothing
            warn(f"no report for the trackers: {first_line(e)}")
    try:
        if log.takes_report:
            log.publish(page)
        log.close("finished")
    except Exception as e:  # noqa: BLE001 - a tracker's failure after the run is its own
        warn(f"after training, a tracker failed ({type(e).__name__}: {first_line(e)}); the run "
             "is finished and its files are complete")


def _validate_timed(run: Run, state: TrainingState, log: MetricsLog, progress: Progress,
                    on_validation: Callable[[int, dict[str, Any]], bool] | None
                    ) -> dict[str, float]:
    """`validate`, timed for the run's projection; stops the run as pruned when the caller's
    `on_validation` says so (after writing a state)."""
    position, started = state.position, time.perf_counter()
    metrics, record = validate(run, position, log, state.timings)
    position.tick()
    progress.validated(time.perf_counter() - started, position.step, position.epoch,
                       position.elapsed_s)
    if on_validation is not None and on_validation(position.epoch, record):
        _save(state, log, wait=True)
        raise Pruned(f"pruned after epoch {position.epoch}")
    return metrics


def _save(state: TrainingState, log: MetricsLog, wait: bool = False) -> Path:
    """Take a training state, written in the background (with `wait`, on disk on return); the
    trackers get what it has seen once it is on disk, never before."""
    state.written()  # the previous state is on disk: its records go out (log.commit)
    log.seal()  # the records this state has seen
    path = state.save(on_disk=log.commit)
    if wait:
        state.written()
    return path


def _start_or_resume(state: TrainingState, found: tuple[Path, dict[str, Any]] | None,
                     log: MetricsLog, progress: Progress) -> None:
    """A fresh start empties metrics.jsonl; a resumption restores every component of `found`
    (metrics.jsonl is cut back to what that state had seen, TensorBoard drops what followed
    it, MLflow continues its run)."""
    cfg, position = state.cfg, state.position
    if found is not None:
        state.restore(found[1], found[0])
        if state.dist.is_main:
            _best_after_resume(position, cfg.run_dir, progress)
        progress.message(f"resumed from {found[0]} at epoch {position.epoch + 1}, batch "
                         f"{position.batch}, step {position.step}")
    log.open(position.step, resumed=found is not None)


def outcome_of(kind: type[BaseException] | None) -> str:
    """How a run ended, by the exception that ended it (None: it finished)."""
    if kind is None:
        return "finished"
    for outcome, kinds in (("interrupted", (Interrupted, KeyboardInterrupt)),
                           ("diverged", TrainingDiverged), ("pruned", Pruned)):
        if issubclass(kind, kinds):
            return outcome
    return "failed"


class RunStatus:
    """status.json of a run (rank 0): "running" while the run lives, then "finished",
    "interrupted" (a signal; a kill leaves "running" without the lock), "diverged" or "pruned".
    As a context manager it writes the outcome."""

    def __init__(self, run: Run, position: Position):
        self.run, self.position = run, position

    def write(self, status: str) -> None:
        if self.run.dist.is_main:
            p = self.position
            p.tick()
            write_status(self.run.cfg.run_dir, {
                "status": status, "epoch": p.epoch, "epochs": self.run.cfg.sched.epochs,
                "step": p.step, "best": p.best, "best_metric": p.best_metric,
                "best_epoch": p.best_epoch, "elapsed_s": p.elapsed_s, "updated": time.time(),
                "pid": os.getpid(),
                **({"budget_s": p.plan["budget_s"], "setup_s": p.plan["setup_s"]}
                   if p.plan else {}),
                **({"lr_found": p.lr_found} if p.lr_found else {}),
                **({"micro_batch": p.micro_batch["micro_batch"],
                    "accum_steps": p.micro_batch["accum_steps"]} if p.micro_batch else {})})

    def __enter__(self) -> RunStatus:
        self.write("running")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        outcome = outcome_of(kind)
        if outcome == "finished" and self.position.stopped_early:
            outcome = "stopped early"
        if outcome != "failed":  # a failure leaves "running": `runs` sees the lock is free
            self.write(outcome)


def validate(run: Run, position: Position, log: MetricsLog,
             timings: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate the weights (and their EMA) after epoch `position.epoch`, keep the best of the
    two as best.safetensors, then log the record (the console shows it beside the best so
    far) with the `timings` since the previous validation (emptied: metrics.TIMINGS); returns
    the raw weights' metrics and the record."""
    started = time.perf_counter()
    candidates = {"raw": (run.model, _validation_metrics(run, run.forward, run.model))}
    record = {"epoch": position.epoch, **candidates["raw"][1]}
    if run.teacher is not None:
        record[TEACHER_TOP1] = run.teacher.top1
    if run.ema is not None:
        candidates["ema"] = (run.ema.module,
                             _validation_metrics(run, run.ema.forward, run.ema.module))
        record.update({ema(k): v for k, v in candidates["ema"][1].items()})
    key = position.best_metric
    weights = max(candidates, key=lambda k: candidates[k][1][key])  # a tie keeps raw
    module, metrics = candidates[weights]
    position.observe(metrics[key], run.cfg.sched.early_stop_delta)
    if metrics[key] > position.best:
        position.best, position.best_epoch = metrics[key], position.epoch
        save_weights_of(run, BEST_FILE, position.epoch, metrics, module, weights)
    if timings is not None:
        timings["validate_s"] = time.perf_counter() - started
        record.update({k: round(timings[k], 3) for k in ("train_s", "validate_s", "state_s")})
        timings.update(train_s=0.0, state_s=0.0)
    log.write(record, step=position.step)
    return candidates["raw"][1], record


def _validation_metrics(run: Run, forward: torch.nn.Module, eager: torch.nn.Module
                        ) -> dict[str, float]:
    reference = run.teacher.held_out_log_probs if run.teacher is not None else None
    return evaluate(forward, run.data.val.images, run.data.val.labels,
                    run.cfg.data.eval_batch_size, run.normalize, run.rt, run.data.num_classes,
                    run.dist, run.cfg.eval.tta, eager, reference).record()


def save_weights_of(run: Run, name: str, epoch: int, metrics: dict[str, float],
                    module: torch.nn.Module | None = None, weights: str = "raw") -> None:
    if run.dist.is_main:
        state_dict = (module or run.model).state_dict()
        save_weights(run.cfg.run_dir / name, state_dict, run.cfg, run.data.classes, epoch,
                     metrics, run.rt.as_dict(), weights, run.data.identity)


def _best_after_resume(position: Position, run_dir: Path, progress: Progress) -> None:
    """The best value of the best metric to beat: the state's, or a better one
    best.safetensors holds (written before a crash, after the state). When the file holding
    the state's best is gone (a rollback set it aside) the next validation writes a new one."""
    metric = position.best_metric
    if position.best_epoch and not (run_dir / BEST_FILE).exists():
        progress.warning(f"best.safetensors of epoch {position.best_epoch} ({metric} "
                         f"{position.best:.2f}) is not in {run_dir}; it will hold the best "
                         "weights from the next validation on")
        position.best, position.best_epoch = -1.0, 0
    position.best = max(position.best, _best_on_disk(run_dir, metric))


def _best_on_disk(run_dir: Path, metric: str) -> float:
    """The metric recorded in an existing best.safetensors (-1 when there is none)."""
    path = run_dir / BEST_FILE
    if not path.exists():
        return -1.0
    try:
        return float(load_weights(path).metrics.get(metric, -1.0))
    except UserError:
        return -1.0


# ---- the train command -------------------------------------------------------------------------

def preflight(cfg: TrainConfig, dist: distributed.Dist | None = None) -> Runtime:
    """The checks of `cfg` against this machine and launch that need no data, weights or work
    dir (the device is here, the compile and batch options fit it); its runtime. `fit` starts
    with them, and `tune` runs them on every value it may draw before the first trial."""
    world = dist.world if dist is not None else 1
    rt = resolve_runtime(cfg, dist)
    accum_steps = cfg.accum_steps(world)
    per_step = world * accum_steps
    if cfg.data.batch_size % per_step or (
            cfg.data.micro_batch not in ("auto", 0) and per_step * cfg.data.micro_batch
            != cfg.data.batch_size):
        split = (f"micro-batches of --data.micro-batch {cfg.data.micro_batch}"
                 if cfg.data.micro_batch not in ("auto", 0) else
                 f"{accum_steps} accumulation steps (a multiple of {per_step})")
        raise UserError(f"--data.batch-size {cfg.data.batch_size} is the global batch; it must "
                        f"split evenly over {world} processes x {split}")
    return rt


def fit(cfg: TrainConfig, live_progress: bool | None = None, resume: str | None = None,
        allow_changes: bool = False,
        on_validation: Callable[[int, dict[str, Any]], bool] | None = None,
        started: float | None = None) -> dict[str, Any]:
    """Run the whole training described by `cfg` (or continue it); returns the best value of
    the metric that picks best.safetensors, that metric, its epoch and the work dir.

    Under torchrun every process calls this; rank 0 alone reads and writes the work dir (other
    nodes' may be other disks) and decides for all. Everything a user can get wrong (data,
    state to resume, options, a work dir in use) is checked before anything is written.
    `started` (time.monotonic(); default: now) is when the command began: a --sched.budget
    counts from it.
    """
    dist = distributed.from_env()
    started = time.monotonic() if started is None else started
    with ConsoleLog() if dist.is_main else contextlib.nullcontext() as console_log:
        return _fit(cfg, dist, console_log, live_progress, resume, allow_changes, on_validation,
                    started)


def _fit(cfg: TrainConfig, dist: distributed.Dist, console_log: ConsoleLog | None,
         live_progress: bool | None, resume: str | None, allow_changes: bool,
         on_validation: Callable[[int, dict[str, Any]], bool] | None,
         started: float | None = None) -> dict[str, Any]:
    """`fit`'s steps; `console_log` (the main process's) goes to WORK_DIR/train.log once the
    work dir is claimed."""
    cfg = dataclasses.replace(cfg, name=cfg.run_name)
    rt = preflight(cfg, dist)
    configure_backends(rt)
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
        # a budgeted run resumes with its plan, --optim.lr auto with the LR it found,
        # --data.micro-batch auto with its choice (made again on another device)
        planned = with_micro_batch(with_found_lr(with_plan(cfg, plan_of(found)),
                                                 found_lr_of(found)), micro_batch_of(found))
        if found is not None and not allow_changes:
            distributed.together(dist, lambda: refuse_changes(found, planned, data.identity,
                                                              rt.device))
        elif found is not None and (change := device_kind_change(found[1], rt.device)):
            print(f"note: {change}: they start afresh here", file=sys.stderr)
        if found is not None and (done := _already_finished(planned, found)) is not None:
            return done
        # A resumed run takes its weights from the state: no download of pretrained weights.
        run = build_run(buildable(planned), rt, dist, data, pretrained=found is None)
        run = dataclasses.replace(run, cfg=planned)  # auto stays auto until it is found
        with contextlib.ExitStack() as work_dir:
            distributed.from_main(dist, lambda: claim_work_dir(cfg, data.val.files, found,
                                                               work_dir))
            if console_log is not None:
                console_log.to(cfg.run_dir / TRAIN_LOG)
            return train(run, found, live_progress, on_validation, started)
    finally:
        distributed.stop()
