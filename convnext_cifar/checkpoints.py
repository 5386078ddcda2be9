"""What a run writes: weights as safetensors with everything needed to rebuild the model in the
metadata, resumable training states, and the lock that keeps one run per work dir.

Every file is written with `files.write_file`: a final name never holds a half-written file.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, from_dict, to_dict
from convnext_cifar.errors import UserError
from convnext_cifar.files import load_pth, require_file, write_file

FORMAT = "convnext-cifar/weights-v1"
RESUME_ADVICE = "earlier files are intact; free space or fix permissions and resume"


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], cfg: TrainConfig,
                 classes: list[str], epoch: int, metrics: dict[str, float],
                 runtime: dict[str, Any], weights: str = "raw",
                 identity: dict[str, Any] | None = None) -> None:
    """Model weights (contiguous, on the CPU) plus config, classes, epoch, the metrics of these
    weights, which weights they are (raw, or the EMA of the run's weights) and the identity of
    the dataset they were trained and validated on."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(to_dict(cfg)),
        "classes": json.dumps(classes),
        "epoch": str(epoch),
        "metrics": json.dumps(metrics),
        "runtime": json.dumps(runtime),
        "weights": weights,
        **({"dataset": json.dumps(identity)} if identity is not None else {}),
    }
    write_file(path, save(tensors, metadata=metadata), "checkpoint", RESUME_ADVICE)


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: TrainConfig
    classes: list[str]
    epoch: int
    metrics: dict[str, float]
    weights: str = "raw"  # "ema": the EMA of the run's weights
    identity: dict[str, Any] | None = None  # the dataset's (datasets.identity_of); None: older


def load_weights(path: Path) -> Checkpoint:
    """Read a file written by `save_weights`, with one clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = require_file(path, "checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors checkpoint ({e}); "
                        "it may be truncated or of another kind") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} was not written by convnext-cifar (no '{FORMAT}' metadata); "
                        "use `convnext-cifar train --model.pretrained` to start from other weights")
    try:
        ckpt = Checkpoint(state_dict, from_dict(TrainConfig, json.loads(metadata["config"])),
                          json.loads(metadata["classes"]), int(metadata["epoch"]),
                          json.loads(metadata["metrics"]), metadata.get("weights", "raw"),
                          json.loads(metadata.get("dataset", "null")))
        problem = _metadata_problem(ckpt)
    except (KeyError, ValueError, TypeError, UserError) as e:
        problem = str(e)
    if problem:
        raise UserError(f"{path} has damaged metadata ({problem}); it was edited or written by "
                        "something else: use another checkpoint of the run")
    return ckpt


def weights_epoch(path: Path) -> int:
    """The epoch a weights file records, from its metadata alone (-1 if it is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("epoch", -1))
    except Exception:  # a damaged file: the caller treats it as of no known epoch
        return -1


def _metadata_problem(ckpt: Checkpoint) -> str:
    """What is wrong with a checkpoint's metadata values ('' if nothing)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not (isinstance(ckpt.classes, list) and ckpt.classes
            and all(isinstance(c, str) for c in ckpt.classes)):
        return f"classes is {ckpt.classes!r}, not a list of class names"
    if not (isinstance(ckpt.metrics, dict) and all(number(v) for v in ckpt.metrics.values())):
        return f"metrics is {ckpt.metrics!r}, not an object of numbers"
    if ckpt.weights not in ("raw", "ema"):
        return f"weights is {ckpt.weights!r}, not raw or ema"
    if ckpt.epoch < 0:
        return f"epoch is {ckpt.epoch}"
    if ckpt.identity is not None and not (isinstance(ckpt.identity, dict)
                                          and isinstance(ckpt.identity.get("classes"), list)):
        return "dataset is not an identity object"
    return ""


# ---- full training state, for exact resume ------------------------------------------------------

STATE_FORMAT = "convnext-cifar/state-v2"
OLDER_STATE_FORMATS = ("convnext-cifar/state-v1",)  # still read: resume.upgrade_state
STATE_PATTERN = re.compile(r"^state_(\d{8})\.pt$")


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"state_{step:08d}.pt"


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


def find_states(run_dir: Path) -> list[Path]:
    """The training states in `run_dir`, oldest first."""
    if not Path(run_dir).is_dir():
        return []
    return sorted(p for p in Path(run_dir).iterdir() if STATE_PATTERN.match(p.name))


def prune_states(run_dir: Path, keep_last: int, keep_step: int | None) -> None:
    """Delete all but the newest `keep_last` states, never the one at step `keep_step`."""
    states = find_states(run_dir)
    for path in states[:-keep_last] if keep_last else states:
        if keep_step is None or int(STATE_PATTERN.match(path.name).group(1)) != keep_step:
            path.unlink(missing_ok=True)


STATUS_FILE = "status.json"


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """status.json: what `runs` shows without reading the states (running, finished,
    interrupted or diverged; epoch, step, wall time), rewritten atomically."""
    write_file(Path(run_dir) / STATUS_FILE, json.dumps(status).encode(), advice=RESUME_ADVICE)


# The work-dir lock is an open-file-description lock (Linux): `lock_is_held` can ask whether it is
# held without taking it, so that `runs` never makes a training that starts at that instant fail.
# Elsewhere it is a flock, which can only be tested by taking it for a moment.
_OFD = hasattr(fcntl, "F_OFD_SETLK")


def _ofd_request(kind: int, command: int, fd: int) -> int:
    """F_OFD_SETLK / F_OFD_GETLK on the whole file; returns the lock type the kernel reports."""
    request = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)  # struct flock, pid 0
    return struct.unpack("hhqqi4x", fcntl.fcntl(fd, command, request))[0]


def lock_is_held(run_dir: Path) -> bool:
    """Whether a live process holds the work dir's lock (a training is running there)."""
    try:
        fd = os.open(Path(run_dir) / ".lock", os.O_RDONLY)
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


class WorkDirLock:
    """An exclusive lock on a work dir: a second run refuses; a dead process holds nothing."""

    def __init__(self, run_dir: Path, name: str = ".lock"):
        self.path = Path(run_dir) / name
        self.fd: int | None = None

    def __enter__(self) -> WorkDirLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if _OFD:
                _ofd_request(fcntl.F_WRLCK, fcntl.F_OFD_SETLK, self.fd)
            else:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError) as e:
            if self.fd is None:
                raise UserError(f"cannot use work dir {self.path.parent}: {e.strerror or e}; "
                                "pick another with --work-dir") from None
            holder = self.path.read_text().strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise UserError(f"work dir {self.path.parent} is in use by a running training "
                            f"({holder}); wait for it or pick another --work-dir") from None
        except OSError as e:
            raise UserError(f"cannot use work dir {self.path.parent}: {e.strerror or e}; "
                            "pick another with --work-dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}".encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None
