"""Weights as safetensors with everything needed to rebuild the model in the metadata.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed, so a
final name never holds a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, from_dict, to_dict
from convnext_cifar.errors import UserError

FORMAT = "convnext-cifar/weights-v1"


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def require_file(path: Path, what: str) -> Path:
    """`path` as a Path if it is a non-empty file; otherwise one clear UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file in it")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty")
    return path


def save_weights(path: Path, model: torch.nn.Module, cfg: TrainConfig, classes: list[str],
                 epoch: int, metrics: dict[str, float], runtime: dict[str, Any]) -> None:
    """Model weights (contiguous, on the CPU) plus config, classes, epoch and metrics."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(to_dict(cfg)),
        "classes": json.dumps(classes),
        "epoch": str(epoch),
        "metrics": json.dumps(metrics),
        "runtime": json.dumps(runtime),
    }
    try:
        atomic_write_bytes(path, save(tensors, metadata=metadata))
    except OSError as e:
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e}; earlier files "
                        "are intact; free space or fix permissions and resume") from None


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: TrainConfig
    classes: list[str]
    epoch: int
    metrics: dict[str, float]


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
        config = from_dict(TrainConfig, json.loads(metadata["config"]))
        return Checkpoint(state_dict, config, json.loads(metadata["classes"]),
                          int(metadata["epoch"]), json.loads(metadata["metrics"]))
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} has damaged metadata ({e})") from None


# ---- full training state, for exact resume ------------------------------------------------------

STATE_FORMAT = "convnext-cifar/state-v1"
STATE_PATTERN = re.compile(r"^state_(\d{8})\.pt$")


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"state_{step:08d}.pt"


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` atomically; it holds only tensors and plain containers."""
    buf = io.BytesIO()
    torch.save({"format": STATE_FORMAT, **state}, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise UserError(f"could not write training state {path}: {e.strerror or e}; earlier "
                        "files are intact; free space or fix permissions and resume") from None


def load_state(path: Path) -> dict[str, Any]:
    """A state written by `save_state`; refuses anything else, running nothing."""
    from convnext_cifar.formats import load_pth

    path = require_file(path, "training state")
    state = load_pth(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a convnext-cifar training state; give a state_*.pt "
                        "file of a run, or --resume auto")
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


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files left by a process killed while writing (never under a final name)."""
    for path in Path(run_dir).glob(".*.tmp"):
        path.unlink(missing_ok=True)


class WorkDirLock:
    """An exclusive lock on a work dir: a second run refuses; a dead process holds nothing."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> WorkDirLock:
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(self.fd)
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
            os.close(self.fd)  # closing releases the flock
            self.fd = None
