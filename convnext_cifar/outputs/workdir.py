"""The run folder (work dir): which one a run uses, the lock that keeps one run in it, the names
of the files in it, status.json, and what a rollback sets aside.

    config.json          the run's whole config (train --config takes it back)
    metrics.jsonl        one JSON object per log point and per validation
    status.json          running / finished / interrupted / diverged / pruned, epoch, wall time
    val_files.txt        the held-out images of a folder dataset, one path below its root a line
    state_<step>.pt      resumable training states (training/state.py writes them)
    epoch_<N>.safetensors, best.safetensors   weights (model/checkpoints.py writes them)
    set-aside/           what a rollback abandoned, one folder per rollback
    .lock                held by the running training (`WorkDirLock`)

A fresh run goes to work_dirs/<name>, or the first free <name>-2, <name>-3, ...; it never writes
over an earlier run's results. Rank 0 alone reads and writes here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

from convnext_cifar.config import TrainConfig, config_json
from convnext_cifar.errors import UserError
from convnext_cifar.files import (
    RESUME_ADVICE,
    one_line,
    remove_stale_temp_files,
    safetensors_metadata,
    write_file,
)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
VAL_FILES = "val_files.txt"
BEST_FILE = "best.safetensors"
LOCK_FILE = ".lock"
TRAIN_LOG = "train.log"  # what the console showed, appended across resumes
SET_ASIDE = "set-aside"  # WORK_DIR/set-aside/<when>-after-step-<step>/: an abandoned line
STATE_PATTERN = re.compile(r"^state_(\d{8})\.pt$")
EPOCH_PATTERN = re.compile(r"^epoch_(\d+)\.safetensors$")


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"state_{step:08d}.pt"


def state_step(path: Path) -> int:
    """The optimizer step a state file's name gives."""
    return int(STATE_PATTERN.match(Path(path).name)[1])


def find_states(run_dir: Path) -> list[Path]:
    """The training states in `run_dir`, oldest first."""
    if not Path(run_dir).is_dir():
        return []
    return sorted(p for p in Path(run_dir).iterdir() if STATE_PATTERN.match(p.name))


def is_run_file(path: Path) -> bool:
    """Whether `path` is one of a run's own files in its work dir: weights, states, records."""
    path = Path(path)
    if not (path.parent / CONFIG_FILE).is_file():  # not a work dir
        return False
    return path.name in (CONFIG_FILE, METRICS_FILE, STATUS_FILE, VAL_FILES, BEST_FILE,
                         LOCK_FILE, TRAIN_LOG) or bool(STATE_PATTERN.match(path.name)
                                            or EPOCH_PATTERN.match(path.name))


def check_output(path: Path, option: str, suffixes: tuple[str, ...], force: bool = False) -> None:
    """Refuse an output path that would replace a run's weights, states or records (always),
    or an existing file of another kind than `suffixes` (unless `force`)."""
    path = Path(path)
    if is_run_file(path):
        raise UserError(f"{option} {path}: that is a file of the run in {path.parent}, which is "
                        "never overwritten; give another path")
    if path.exists() and path.suffix.lower() not in suffixes and not force:
        kind = "/".join(suffixes)
        raise UserError(f"{option} {path} exists and is no {kind} file; give another path, or "
                        "--force to replace it")


# ---- which work dir ------------------------------------------------------------------------------

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


def claim_work_dir(cfg: TrainConfig, val_files: list[str], resumed: tuple[Path, dict] | None,
                   stack: contextlib.ExitStack) -> None:
    """On rank 0: create and lock the work dir (held until `stack` closes), refuse a fresh start
    over an earlier run's results, set aside what a rollback to the state `resumed` abandons,
    write config.json and the held-out files (`val_files`, paths below the dataset's root)."""
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create work dir {cfg.run_dir}: {e.strerror or e}; pick "
                        "another with --work-dir") from None
    stack.enter_context(WorkDirLock(cfg.run_dir))
    remove_stale_temp_files(cfg.run_dir)
    if resumed is None and (results := earlier_results(cfg.run_dir)):
        states = [r for r in results if r.startswith("state_")]
        advice = (f"continue it with --resume {cfg.run_dir}, or" if states else
                  "it has no training state left to continue;")
        raise UserError(f"work dir {cfg.run_dir} holds the results of an earlier run "
                        f"({', '.join(results[:4])}{', ...' if len(results) > 4 else ''}); "
                        f"{advice} start a new run with another --work-dir")
    if resumed is not None and (note := set_aside_after(resumed, cfg.run_dir,
                                                        cfg.keep_set_aside)):
        print(note, file=sys.stderr, flush=True)
    write_file(cfg.run_dir / CONFIG_FILE, config_json(cfg).encode(),
               advice="pick another work dir with --work-dir")
    if val_files:
        write_file(cfg.run_dir / VAL_FILES,  # the names' own bytes, one a line, escaped
                   os.fsencode("".join(one_line(f) + "\n" for f in val_files)))


# ---- what a fresh start or a rollback finds in the work dir --------------------------------------

def earlier_results(run_dir: Path) -> list[str]:
    """The files of an earlier run's results in `run_dir` (states, weights, logged metrics)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir()
                   if STATE_PATTERN.match(p.name) or EPOCH_PATTERN.match(p.name)
                   or p.name == BEST_FILE)
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size:
        names.append(metrics.name)
    return names


def set_aside_after(found: tuple[Path, dict[str, Any]], run_dir: Path, keep: int = 3) -> str:
    """A rollback: when the work dir holds states newer than the one resumed, move them, the
    metrics records logged after it, later epoch_N weights and a best.safetensors of a later
    epoch to WORK_DIR/set-aside/, where nothing picks them up; the resumed line is the run from
    then on. Only the `keep` newest lines set aside stay. Returns the line that says so ('' when
    it is no rollback: what a crash left after the newest state is written again, identically,
    by the resumed run)."""
    path, state = found
    run, run_dir = state["components"]["run"], Path(run_dir)
    step, epoch = run["step"], run["epoch"]
    moving = [p for p in find_states(run_dir) if state_step(p) > step]
    if not moving:
        return ""
    moving += sorted((p for p in run_dir.glob("epoch_*.safetensors")
                      if EPOCH_PATTERN.match(p.name) and int(EPOCH_PATTERN.match(p.name)[1])
                      > epoch), key=lambda p: int(EPOCH_PATTERN.match(p.name)[1]))
    best = run_dir / BEST_FILE
    if best.exists() and weights_epoch(best) > epoch:
        moving.append(best)
    dest = run_dir / SET_ASIDE / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    for n in itertools.count(2):  # two rollbacks within a second stay apart
        if not dest.exists():
            break
        dest = dest.with_name(f"{dest.name.rsplit('~', 1)[0]}~{n}")
    dest.mkdir(parents=True)
    metrics, logged = run_dir / METRICS_FILE, state["components"]["log"]["bytes"]
    records = 0
    if metrics.is_file() and metrics.stat().st_size > logged:
        with open(metrics, "rb") as f:
            f.seek(logged)
            tail = f.read()
        write_file(dest / METRICS_FILE, tail)
        records = tail.count(b"\n")
    for p in moving:
        os.replace(p, dest / p.name)
    what = [p.name for p in moving] + ([f"{records} metrics records"] if records else [])
    note = (f"resuming from {path.name} (step {step}), not the newest state: set aside "
            f"{', '.join(what)} in {dest}; the run goes on from step {step}")
    if removed := prune_set_aside(run_dir, keep):
        note += (f"; removed the oldest set-aside line(s) {', '.join(removed)} "
                 f"(--keep-set-aside {keep})")
    return note


def set_aside_lines(run_dir: Path) -> list[Path]:
    """The lines rollbacks set aside in WORK_DIR/set-aside/, oldest first."""
    folder = Path(run_dir) / SET_ASIDE
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir()),
                  key=lambda p: (p.stat().st_mtime_ns, p.name))


def prune_set_aside(run_dir: Path, keep: int) -> list[str]:
    """Remove all but the `keep` newest set-aside lines; their names."""
    lines = set_aside_lines(run_dir)
    old = lines[:-keep] if keep else lines
    for line in old:
        shutil.rmtree(line, ignore_errors=True)
    return [p.name for p in old]


def set_aside_bytes(run_dir: Path) -> int:
    """What the set-aside lines hold on disk."""
    return sum(f.stat().st_size for line in set_aside_lines(run_dir) for f in line.rglob("*")
               if f.is_file())


def weights_epoch(path: Path) -> int:
    """The epoch a weights file records, from its header alone (-1 if it records none)."""
    epoch = safetensors_metadata(path).get("epoch", "")
    return int(epoch) if epoch.isdigit() and len(epoch) < 19 else -1


# ---- status.json ---------------------------------------------------------------------------------

def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """status.json: what `runs` shows without reading the states (running, finished,
    interrupted, diverged or pruned; epoch, step, best, wall time), rewritten atomically."""
    write_file(Path(run_dir) / STATUS_FILE, json.dumps(status).encode(), advice=RESUME_ADVICE)


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json, with what the lock says: a run whose file says running but whose lock no
    process holds was killed (interrupted); no file: interrupted when states exist, else not
    started."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        status = {"status": "interrupted" if find_states(run_dir) else "not started"}
    if lock_is_held(run_dir):
        status["status"] = "running"
    elif status.get("status") == "running":
        status["status"] = "interrupted"
    return status


# ---- the lock ------------------------------------------------------------------------------------

# An open-file-description lock (Linux): `lock_is_held` can ask whether it is held without taking
# it, so that `runs` never makes a training that starts at that instant fail. Elsewhere it is a
# flock, which can only be tested by taking it for a moment.
_OFD = hasattr(fcntl, "F_OFD_SETLK")


def _ofd_request(kind: int, command: int, fd: int) -> int:
    """F_OFD_SETLK(W) / F_OFD_GETLK on the whole file; returns the lock type the kernel reports."""
    request = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)  # struct flock, pid 0
    return struct.unpack("hhqqi4x", fcntl.fcntl(fd, command, request))[0]


class FileLock:
    """An exclusive lock on the file `path` (created if missing), held until closed; a process
    that dies holds nothing. `wait`: block until it is free; else another holder raises
    BlockingIOError or PermissionError at once."""

    def __init__(self, path: Path, wait: bool = False):
        self.path, self.wait = Path(path), wait
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._take()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take(self) -> None:
        if _OFD:
            command = fcntl.F_OFD_SETLKW if self.wait else fcntl.F_OFD_SETLK
            _ofd_request(fcntl.F_WRLCK, command, self.fd)
        else:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def lock_is_held(run_dir: Path, name: str = LOCK_FILE) -> bool:
    """Whether a live process holds the lock file `name` of `run_dir` (a training running)."""
    try:
        fd = os.open(Path(run_dir) / name, os.O_RDONLY)
    except OSError:
        return False
    try:
        if _OFD:
            return _ofd_request(fcntl.F_WRLCK, fcntl.F_OFD_GETLK, fd) != fcntl.F_UNLCK
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a flock taken here
    return False


class WorkDirLock(FileLock):
    """The lock of a work dir: a second run refuses with one line naming the holder's pid."""

    def __init__(self, run_dir: Path, name: str = LOCK_FILE):
        super().__init__(Path(run_dir) / name)

    def __enter__(self) -> WorkDirLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._take()
        except (BlockingIOError, PermissionError) as e:
            if self.fd is None:
                raise UserError(f"cannot use work dir {self.path.parent}: {e.strerror or e}; "
                                "pick another with --work-dir") from None
            holder = self.path.read_text().strip() or "another process"
            self.__exit__()
            raise UserError(f"work dir {self.path.parent} is in use by a running training "
                            f"({holder}); wait for it or pick another --work-dir") from None
        except OSError as e:
            self.__exit__()
            raise UserError(f"cannot use work dir {self.path.parent}: {e.strerror or e}; "
                            "pick another with --work-dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}".encode())
        return self
