"""What a run writes: weights as safetensors with everything needed to rebuild the model in the
metadata, resumable training states, and the lock that keeps one run per work dir.

Every file is written with `files.write_file`: a final name never holds a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import re
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
                 runtime: dict[str, Any], weights: str = "raw") -> None:
    """Model weights (contiguous, on the CPU) plus config, classes, epoch, the metrics of these
    weights and which weights they are (raw, or the EMA of the run's weights)."""
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
                          int(metadata["epoch"]), json.loads(metadata["metrics"]),
                          metadata.get("weights", "raw"))
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} has damaged metadata ({e})") from None


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


def lock_is_held(run_dir: Path) -> bool:
    """Whether a live process holds the work dir's lock (a training is running there)."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


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
