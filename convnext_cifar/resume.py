"""What a training state holds, and how a run stops and continues.

A training state is a mapping of named stateful components (model, optimizer, loader, ...), each
with `state_dict()` / `load_state_dict()`; `TrainingState` saves and restores them by iterating
that mapping, so a new piece of run state is one more entry (declared optional when states
written before it existed should still resume). It also owns when states are written and which
are kept. Also here: finding the state to resume from, refusing changed options, and stopping
cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as tdist

from convnext_cifar.checkpoints import (
    STATE_FORMAT,
    STATE_PATTERN,
    find_states,
    load_state,
    prune_states,
    save_state,
    state_path,
    weights_epoch,
)
from convnext_cifar.config import TrainConfig, config_json, flatten, from_dict, to_dict
from convnext_cifar.data import Generators
from convnext_cifar.datasets import identity_difference
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import Interrupted, UserError
from convnext_cifar.files import first_line, write_file
from convnext_cifar.model import layout_mismatch


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Position:
    """Where a run is: epochs and optimizer steps done, and the best validation so far."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch (non-zero only after an interruption)
    step: int = 0  # optimizer steps done
    best_top1: float = -1.0
    best_epoch: int = 0
    elapsed_s: float = 0.0  # wall time spent training, over every resumption

    def __post_init__(self) -> None:
        self._since = time.monotonic()

    def tick(self) -> None:
        """Add the wall time since the last tick (or the start, or the restore) to elapsed_s."""
        now = time.monotonic()
        self.elapsed_s += now - self._since
        self._since = now

    def state_dict(self) -> dict[str, Any]:
        self.tick()
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if missing := {"epoch", "batch", "step"} - set(state):
            raise KeyError(", ".join(sorted(missing)))
        for k, v in state.items():
            setattr(self, k, v)
        self._since = time.monotonic()


class GlobalRng:
    """The process-wide generators (python, torch CPU, CUDA): drop-path noise and the like.

    Under DDP every rank has its own noise stream, so the state keeps one entry per rank
    (gathered to every rank when saving: call `state_dict` on all ranks together).
    """

    def __init__(self, device: torch.device, dist: Dist):
        self.device, self.dist = device, dist

    def _local(self) -> dict[str, Any]:
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                else None}

    def state_dict(self) -> dict[str, Any]:
        if not self.dist.enabled:
            return {"per_rank": [self._local()]}
        gathered: list[Any] = [None] * self.dist.world
        tdist.all_gather_object(gathered, self._local())
        return {"per_rank": gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state["per_rank"]
        if self.dist.rank >= len(ranks):  # more processes than the run had: fresh noise
            torch.manual_seed(torch.initial_seed() + self.dist.rank)
            return
        mine = ranks[self.dist.rank]
        random.setstate(mine["python"])
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)


class TrainingState:
    """A run's stateful components by name, written to one state file on the run's cadence.

    `components["run"]` is the run's `Position`. Names in `optional` may be missing from a
    state (one written before they existed): they then keep their fresh state on restore.
    """

    def __init__(self, cfg: TrainConfig, dist: Dist, steps_per_epoch: int,
                 components: dict[str, Stateful], optional: tuple[str, ...] = ()):
        self.cfg, self.dist, self.steps_per_epoch = cfg, dist, steps_per_epoch
        self.components, self.optional = components, optional
        self.position: Position = components["run"]  # type: ignore[assignment]

    def due(self) -> bool:
        """Whether the epoch just ended is one to write a state after: every --state-interval
        epochs, and after the last."""
        epoch = self.position.epoch
        return epoch % self.cfg.state_interval == 0 or epoch == self.cfg.sched.epochs

    def save(self) -> Path:
        """Write state_<step>.pt (rank 0; every rank must call it) and prune older states: the
        newest --keep-last stay, and the state of the best epoch."""
        path = state_path(self.cfg.run_dir, self.position.step)
        states = {name: c.state_dict() for name, c in self.components.items()}
        if self.dist.is_main:
            save_state(path, {"config": config_json(self.cfg), "components": states})
            best_step = self.position.best_epoch * self.steps_per_epoch
            prune_states(self.cfg.run_dir, self.cfg.keep_last, keep_step=best_step or None)
        return path

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Load every component from `state` (as `find_resume_state` returned it)."""
        saved = state["components"]
        missing = [n for n in self.components if n not in saved and n not in self.optional]
        if missing:
            raise UserError(f"{path} ({state['format']}) holds no {', '.join(missing)}; resume "
                            "it with the version that wrote it")
        model = self.components["model"]
        if problem := layout_mismatch(model, saved["model"]):
            raise UserError(f"{path} does not fit this model ({problem}); resume with the run's "
                            "own config.json")
        for name, component in self.components.items():
            if name not in saved:
                continue
            try:
                component.load_state_dict(saved[name])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path} does not fit this run's {name} ({first_line(e)}); "
                                "resume with the run's own config.json") from None


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state of an older format in the current layout (format v1: one key per piece)."""
    if state["format"] == STATE_FORMAT:
        return state
    rng, run = state["rng"], state["run"]
    return {"format": state["format"], "config": state["config"], "components": {
        "run": run, "model": state["model"], "optimizer": state["optimizer"],
        "scaler": state["scaler"] or {},
        "rng": {"per_rank": [{k: rng[k] for k in ("python", "torch", "cuda")}]},
        "loader": {"generator": rng["data"]}, "window": state["window"],
        "guard": {"count": torch.tensor(run["step"]), "streak": torch.tensor(0)},
        "log": {"bytes": state["metrics_bytes"]}}}


# ---- finding the state to resume, and what may change -------------------------------------------

# Options that may differ between a run and its resumption: where and how fast, not what.
RESUMABLE_CHANGES = ("name", "work_dir", "device", "precision", "compile", "compile_mode",
                     "deterministic",
                     "channels_last", "log.tensorboard", "log.mlflow",
                     "val_interval", "ckpt_interval", "log_interval", "state_interval",
                     "keep_last", "data.root", "data.download", "data.eval_batch_size",
                     "data.workers", "data.decode_processes", "data.memory_share", "data.placement",
                     "data.cache_dir",
                     "model.pretrained", "model.pretrained_format", "model.pretrained_prefix",
                     "model.pretrained_weights", "model.head_init_scale")  # (only the start)


def config_changes(old: dict[str, Any], new: TrainConfig) -> list[str]:
    """The options that differ between a saved config and `new` and change what the run does.

    The saved config is read back first, so options added since it was written count as their
    defaults.
    """
    a, b = flatten(to_dict(from_dict(TrainConfig, old))), flatten(to_dict(new))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]


def read_state(path: Path) -> dict[str, Any]:
    """A training state of this or an older format, in the current layout, with the pieces
    resuming reads checked (one UserError naming the file otherwise)."""
    state = load_state(path)
    try:
        state = upgrade_state(state)
        run, log = state["components"]["run"], state["components"]["log"]
        json.loads(state["config"])
        problem = "" if all(isinstance(run.get(k), int) for k in ("epoch", "batch", "step")) \
            and isinstance(log.get("bytes"), int) and isinstance(
                state["components"].get("model"), dict) else "its run position is incomplete"
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        problem = f"{type(e).__name__}: {first_line(e)}"
    if problem:
        raise UserError(f"{path} is a damaged training state ({problem}); resume from another "
                        "state of the run (--resume PATH), or --resume auto")
    return state


def find_resume_state(cfg: TrainConfig, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
    """The training state to resume from: `auto`, the newest readable one in the work dir (none:
    a fresh start); a work dir, its newest readable one (none: an error); or a state file."""
    if not resume:
        return None
    folder = cfg.run_dir if resume == "auto" else Path(resume)
    if resume != "auto" and not folder.is_dir():
        if not folder.exists():
            raise UserError(f"--resume {resume}: no such work dir or training state; give a "
                            "run's folder (e.g. work_dirs/NAME), a state_*.pt file, or auto")
        return folder, read_state(folder)
    for path in reversed(find_states(folder)):
        try:
            return path, read_state(path)
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    if resume != "auto":
        raise UserError(f"--resume {resume}: the folder holds no readable training state "
                        "(state_*.pt) to continue; start a new run instead")
    print(f"no training state in {cfg.run_dir}; starting fresh", file=sys.stderr)
    return None


def resumed_config(target: Path) -> TrainConfig:
    """The config `--resume WORK_DIR|STATE` continues with: the state's own (for a folder, its
    newest readable state's), with the work dir where that state lies."""
    path, state = find_resume_state(TrainConfig(), str(target))  # type: ignore[misc]
    try:
        cfg = from_dict(TrainConfig, json.loads(state["config"]))
    except UserError as e:
        raise UserError(f"{path}: its recorded config does not load ({e}); give --config "
                        "with a config.json that does") from None
    return dataclasses.replace(cfg, work_dir=path.parent)


def choose_work_dir(cfg: TrainConfig, resume: str | None) -> tuple[TrainConfig, str]:
    """`cfg` with its work dir settled, and a note when it is not the default one. --work-dir is
    used as given; `--resume STATE|DIR` without it uses the state's folder. By default a fresh
    run goes to work_dirs/<name>, or where that is taken (anything in it) to the first free
    <name>-2, <name>-3, ... (then its name too); `--resume auto` continues the newest."""
    if cfg.work_dir is not None:
        return cfg, ""
    if resume and resume != "auto":
        target = Path(resume)
        return dataclasses.replace(cfg, work_dir=target if target.is_dir() else target.parent), ""
    base = Path("work_dirs") / cfg.run_name
    if resume == "auto":
        newest = _versions(base)[-1]
        return dataclasses.replace(cfg, name=newest.name, work_dir=newest), ""
    version = 1
    chosen = base
    while chosen.exists() and (not chosen.is_dir() or any(chosen.iterdir())):
        version += 1
        chosen = base.with_name(f"{base.name}-{version}")
    if version == 1:
        return dataclasses.replace(cfg, work_dir=chosen), ""
    note = f"{base} holds another run; this one goes to {chosen}"
    return dataclasses.replace(cfg, name=chosen.name, work_dir=chosen), note


def _versions(base: Path) -> list[Path]:
    """work_dirs/<name> and its existing versions <name>-2, <name>-3, ..., in version order."""
    found = {1: base}
    if base.parent.is_dir():
        for p in base.parent.iterdir():
            suffix = p.name[len(base.name) + 1:]
            if p.name.startswith(base.name + "-") and suffix.isdigit() and int(suffix) > 1:
                found[int(suffix)] = p
    return [found[v] for v in sorted(found)]


def refuse_changes(found: tuple[Path, dict[str, Any]], cfg: TrainConfig,
                   identity: dict[str, Any], device: torch.device) -> None:
    """Stop when `cfg`, the dataset (its `identity`) or the kind of `device` would make the
    resumed run another run than the one saved."""
    path, state = found
    if problem := device_kind_change(state, device):
        raise UserError(f"cannot resume {path} on {device}: {problem}; resume it on that kind "
                        "of device, or pass --resume-allow-changes to go on with freshly "
                        "seeded augmentation draws")
    recorded = state["components"].get("dataset")
    if recorded and (difference := identity_difference(recorded, identity)):
        raise UserError(f"cannot resume {path}: {cfg.data.root} is not the data the run trained "
                        f"on ({difference}); point --data.root at the run's data, or pass "
                        "--resume-allow-changes to continue on this data")
    if changes := config_changes(json.loads(state["config"]), cfg):
        raise UserError(f"cannot resume {path}: the config differs in " + ", ".join(changes)
                        + "; resume with the run's own config.json (--config) or pass "
                        "--resume-allow-changes")


def device_kind_change(state: dict[str, Any], device: torch.device) -> str:
    """'' when the state's random streams continue on `device`, else what differs."""
    if Generators(device).fits(state["components"]["loader"]):
        return ""
    return "its augmentation draws come from a generator of another kind of device"


def recorded_normalisation(found: tuple[Path, dict[str, Any]] | None, cfg: TrainConfig
                           ) -> TrainConfig:
    """`cfg` with the mean/std the resumed run recorded, unless options give them: a run keeps
    its normalisation (measured once on a folder's images) however its data may change."""
    if found is None or cfg.data.mean is not None or cfg.data.std is not None:
        return cfg
    data = json.loads(found[1]["config"]).get("data", {})
    if data.get("mean") is None or data.get("std") is None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, mean=tuple(data["mean"]), std=tuple(data["std"])))


class DatasetRecord:
    """The dataset's identity as a component of the training state; a resumption compares it
    (refuse_changes) before anything is written, so loading it back changes nothing."""

    def __init__(self, identity: dict[str, Any]):
        self.identity = identity

    def state_dict(self) -> dict[str, Any]:
        return self.identity

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---- what a fresh start or a rollback finds in the work dir --------------------------------------

SET_ASIDE = "set-aside"  # WORK_DIR/set-aside/<when>-after-step-<step>/: an abandoned line
EPOCH_PATTERN = re.compile(r"^epoch_(\d+)\.safetensors$")


def earlier_results(run_dir: Path) -> list[str]:
    """The files of an earlier run's results in `run_dir` (states, weights, logged metrics)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir()
                   if STATE_PATTERN.match(p.name) or EPOCH_PATTERN.match(p.name)
                   or p.name == "best.safetensors")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        names.append(metrics.name)
    return names


def set_aside_after(found: tuple[Path, dict[str, Any]], run_dir: Path) -> str:
    """A rollback: when the work dir holds states newer than the one resumed, move them, the
    metrics records logged after it, later epoch_N weights and a best.safetensors of a later
    epoch to WORK_DIR/set-aside/, where nothing picks them up; the resumed line is the run from
    then on. Returns the one line that says so ('' when it is no rollback: what a crash left
    after the newest state is written again, identically, by the resumed run)."""
    path, state = found
    run, run_dir = state["components"]["run"], Path(run_dir)
    step, epoch = run["step"], run["epoch"]
    moving = [p for p in find_states(run_dir) if int(STATE_PATTERN.match(p.name)[1]) > step]
    if not moving:
        return ""
    moving += sorted((p for p in run_dir.glob("epoch_*.safetensors")
                      if EPOCH_PATTERN.match(p.name) and int(EPOCH_PATTERN.match(p.name)[1])
                      > epoch), key=lambda p: int(EPOCH_PATTERN.match(p.name)[1]))
    best = run_dir / "best.safetensors"
    if best.exists() and weights_epoch(best) > epoch:
        moving.append(best)
    dest = run_dir / SET_ASIDE / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    dest.mkdir(parents=True, exist_ok=True)
    metrics, logged = run_dir / "metrics.jsonl", state["components"]["log"]["bytes"]
    records = 0
    if metrics.is_file() and metrics.stat().st_size > logged:
        with open(metrics, "rb") as f:
            f.seek(logged)
            tail = f.read()
        write_file(dest / "metrics.jsonl", tail)
        records = tail.count(b"\n")
    for p in moving:
        os.replace(p, dest / p.name)
    what = [p.name for p in moving] + ([f"{records} metrics records"] if records else [])
    return (f"resuming from {path.name} (step {step}), not the newest state: set aside "
            f"{', '.join(what)} in {dest}; the run goes on from step {step}")


# ---- stopping ------------------------------------------------------------------------------------

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

    def agreed(self, dist: Dist, at_log: bool, device: torch.device) -> bool:
        """Whether to stop now: one process at once; DDP ranks together, at log points only."""
        if not dist.enabled:
            return self.requested
        return at_log and dist.any(self.requested, device)

    def interrupted(self, path: Path, position: Position, cfg: TrainConfig) -> Interrupted:
        """The exception that ends the run after the state at `path` was written."""
        signum = self.signum or signal.SIGTERM  # a rank that agreed to stop without the signal
        where = (f"epoch {position.epoch + 1}, batch {position.batch}" if position.batch
                 else f"the end of epoch {position.epoch}")
        return Interrupted(
            f"{signal.Signals(signum).name}: stopped at {where} (step {position.step}); state "
            f"saved to {path}. Resume with: convnext-cifar train --resume {cfg.run_dir}",
            128 + signum)
