"""Weights as safetensors with everything needed to rebuild the model in the metadata.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed, so a
final name never holds a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, from_dict, to_dict
from convnext_cifar.errors import UserError

FORMAT = "convnext-cifar/weights-v1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
