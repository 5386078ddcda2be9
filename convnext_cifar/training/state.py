"""What a training state holds, and how a run continues from one.

A training state is a mapping of named stateful components (model, optimizer, loader, ...), each
with `state_dict()` / `load_state_dict()`; `TrainingState` saves and restores them by iterating
that mapping, so a new piece of run state is one more entry (declared optional when states
written before it existed should still resume). It also owns when states are written, their
file format and which are kept. Also here: finding the state to resume from, and refusing
changed options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as tdist

from convnext_cifar.config import TrainConfig, config_json, flatten, from_dict, to_dict
from convnext_cifar.data.dataset import identity_difference
from convnext_cifar.data.loader import Generators
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError
from convnext_cifar.files import (
    RESUME_ADVICE,
    first_line,
    load_pth,
    parse_json,
    require_file,
    write_file,
)
from convnext_cifar.model.build import layout_mismatch
from convnext_cifar.outputs.workdir import find_states, state_path, state_step
from convnext_cifar.training.distill import teacher_change


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Position:
    """Where a run is: epochs and optimizer steps done, and the best validation so far."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch (non-zero only after an interruption)
    step: int = 0  # optimizer steps done
    best: float = -1.0  # the best value so far of `best_metric` (-1: no validation yet)
    best_metric: str = "top1"  # the metric that picks best.safetensors (--eval.best-metric)
    best_epoch: int = 0
    elapsed_s: float = 0.0  # wall time spent training, over every resumption
    plateau: int = 0  # validations since the best metric last gained more than the delta
    plateau_best: float = -1.0  # its value then (--sched.early-stop counts from it)
    stopped_early: bool = False  # the run ended by --sched.early-stop
    plan: dict[str, Any] | None = None  # --sched.budget's plan (training/budget.py)
    lr_found: dict[str, Any] | None = None  # --optim.lr auto's range test (training/lr_find.py)
    micro_batch: dict[str, Any] | None = None  # --data.micro-batch auto's choice (micro_batch.py)

    def __post_init__(self) -> None:
        self._since = time.monotonic()

    def tick(self) -> None:
        """Add the wall time since the last tick (or the start, or the restore) to elapsed_s."""
        now = time.monotonic()
        self.elapsed_s += now - self._since
        self._since = now

    def observe(self, value: float, delta: float) -> None:
        """Count a validation of the best metric at `value`: an improvement over the last
        counted best (none: the first validation) by more than `delta` resets the plateau,
        anything else lengthens it."""
        if self.plateau_best < 0 or value > self.plateau_best + delta:
            self.plateau, self.plateau_best = 0, value
        else:
            self.plateau += 1

    def state_dict(self) -> dict[str, Any]:
        self.tick()
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if missing := {"epoch", "batch", "step"} - set(state):
            raise KeyError(", ".join(sorted(missing)))
        state = dict(state)
        if "best_top1" in state:  # states of 0.1.0 named the best value so (any metric)
            state["best"] = state.pop("best_top1")
        state.pop("best_metric", None)  # recorded for the reader; the config names it
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
        # seconds since the last validation record: the epoch's training (the loop adds it),
        # and the loop held by state writes (`save` adds it)
        self.timings = {"train_s": 0.0, "state_s": 0.0}
        self.writer = BackgroundWriter()

    def due(self) -> bool:
        """Whether the epoch just ended is one to write a state after: every --state-interval
        epochs, and after the last."""
        epoch = self.position.epoch
        return epoch % self.cfg.state_interval == 0 or epoch == self.cfg.sched.epochs

    def save(self, on_disk: Callable[[], None] | None = None) -> Path:
        """Take state_<step>.pt (every rank must call it: the RNG streams are gathered) and
        write it on rank 0 in the background, then prune older states: the newest --keep-last
        stay, and the state of the best epoch. The loop is held only while the state is copied
        off the live tensors (and while a previous write still runs); `on_disk` is called on
        this thread once the file is complete (at the next `save` or `written`)."""
        started = time.perf_counter()
        path = state_path(self.cfg.run_dir, self.position.step)
        states = {name: c.state_dict() for name, c in self.components.items()}
        if self.dist.is_main:
            self.writer.wait()
            snapshot = {"config": config_json(self.cfg), "components": detached(states)}
            best_step = self.position.best_epoch * self.steps_per_epoch or None
            cfg = self.cfg

            def write() -> None:
                save_state(path, snapshot)
                prune_states(cfg.run_dir, cfg.keep_last, keep_step=best_step)

            self.writer.submit(write, on_disk)
        self.timings["state_s"] += time.perf_counter() - started
        return path

    def written(self) -> None:
        """Wait until the states taken are on disk; a write that failed raises its error."""
        self.writer.wait()

    @contextlib.contextmanager
    def writing(self) -> Iterator[TrainingState]:
        """The run's span of state writes: on leaving it every state taken is on disk (the
        error of a failed write is raised, unless the run already ends with another one)."""
        try:
            yield self
        except BaseException:
            self.writer.wait(raising=False)
            raise
        self.writer.wait()

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


# ---- state files ---------------------------------------------------------------------------------

STATE_FORMAT = "convnext-cifar/state-v2"
OLDER_STATE_FORMATS = ("convnext-cifar/state-v1",)  # still read: upgrade_state


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` atomically; it holds only tensors and plain containers (so that
    `load_state` can read it with weights_only=True)."""
    buf = io.BytesIO()
    torch.save({"format": STATE_FORMAT, **state}, buf)
    write_file(path, buf.getvalue(), "training state", RESUME_ADVICE)


def load_state(path: Path) -> dict[str, Any]:
    """A state written by `save_state` (this version's format or an older one it still reads);
    refuses anything else, running nothing."""
    path = require_file(path, "training state")
    state = load_pth(path)
    fmt = state.get("format") if isinstance(state, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("convnext-cifar/state-"):
        raise UserError(f"{path} is not a convnext-cifar training state; give a state_*.pt "
                        "file of a run, or --resume auto")
    if fmt != STATE_FORMAT and fmt not in OLDER_STATE_FORMATS:
        raise UserError(f"{path} is a training state of format {fmt!r}, which this version "
                        f"({STATE_FORMAT}) cannot resume; finish that run with the version that "
                        "wrote it")
    return state


def prune_states(run_dir: Path, keep_last: int, keep_step: int | None) -> int:
    """Delete all but the newest `keep_last` states, never the one at step `keep_step`; the
    bytes freed."""
    freed = 0
    for path in find_states(run_dir)[:-keep_last] if keep_last else find_states(run_dir):
        if keep_step is None or state_step(path) != keep_step:
            with contextlib.suppress(OSError):
                freed += path.stat().st_size
                path.unlink()
    return freed


def trim_ended_run(cfg: TrainConfig) -> str:
    """A run that ended (finished, or a pruned trial) keeps only its last training state (what
    resuming it reads) unless --keep-states; a line saying what was freed, or ''."""
    if cfg.keep_states:
        return ""
    before = len(find_states(cfg.run_dir))
    freed = prune_states(cfg.run_dir, keep_last=1, keep_step=None)
    if not freed:
        return ""
    return (f"removed {before - 1} older training state(s) ({freed / 1e6:.0f} MB); the last "
            "stays (--keep-states keeps them all)")



def detached(obj: Any) -> Any:
    """`obj` (a state's nested dicts, lists and tensors) with every tensor copied to host
    memory, so that training on can change nothing in it: GPU tensors into pinned buffers
    without blocking, then one wait for all of them."""
    cuda = []

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cuda":
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                cuda.append(host.copy_(value.detach(), non_blocking=True))
                return host
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    out = copy(obj)
    if cuda:
        torch.cuda.synchronize()
    return out


class BackgroundWriter:
    """One write at a time in a thread of its own: `submit` waits for the previous one first,
    so at most one state is held in memory beside the live tensors. The thread is never a
    daemon: a process that ends normally finishes its write; one killed mid-write leaves a
    temporary file (removed by the next run) and its earlier states intact."""

    def __init__(self):
        self.pool: ThreadPoolExecutor | None = None
        self.pending: tuple[Future, Callable[[], None] | None] | None = None

    def submit(self, write: Callable[[], None], on_disk: Callable[[], None] | None) -> None:
        self.wait()
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="state-writer")
        self.pending = self.pool.submit(write), on_disk

    def wait(self, raising: bool = True) -> None:
        """Until the pending write is done; then its `on_disk` (here), or its error."""
        if self.pending is None:
            return
        (future, on_disk), self.pending = self.pending, None
        try:
            future.result()
        except BaseException:
            if raising:
                raise
            return
        if on_disk is not None:
            on_disk()

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
# (distill.teacher: its path may change, its bytes not: teacher_change checks them)
RESUMABLE_CHANGES = ("name", "work_dir", "distill.teacher", "device", "precision", "compile",
                     "compile_mode",
                     "deterministic", "channels_last", "log.tensorboard", "log.mlflow", "log.wandb",
                     "val_interval", "ckpt_interval", "log_interval", "state_interval",
                     "keep_last", "keep_states", "keep_set_aside", "data.root", "data.download",
                     "data.eval_batch_size", "data.workers", "data.decode_processes",
                     "data.memory_share", "data.placement", "data.cache_dir",
                     "data.micro_batch_memory",
                     "model.pretrained", "model.pretrained_format", "model.pretrained_prefix",
                     "model.pretrained_weights", "model.head_init_scale",  # (only the start)
                     "sched.early_stop", "sched.early_stop_delta")


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
        parse_json(state["config"], "its config")
        problem = "" if all(isinstance(run.get(k), int) for k in ("epoch", "batch", "step")) \
            and isinstance(log.get("bytes"), int) and isinstance(
                state["components"].get("model"), dict) else "its run position is incomplete"
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        problem = f"{type(e).__name__}: {first_line(e)}"
    except UserError as e:
        problem = str(e)
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
    if change := teacher_change(state["components"].get("teacher"), cfg.distill):
        raise UserError(f"cannot resume {path}: {change}; resume with the run's own teacher "
                        "(the same file's bytes, at any path), or pass --resume-allow-changes")
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
