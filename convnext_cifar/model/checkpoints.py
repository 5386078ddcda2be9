"""Weights files: a model's weights as safetensors with everything needed to rebuild it in the
metadata (the run's config, classes, epoch, metrics, raw or EMA weights, the dataset's
identity), read back with one clear error for anything else.

Every file is written with `files.write_file`: a final name never holds a half-written file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, from_dict, to_dict
from convnext_cifar.errors import UserError
from convnext_cifar.files import RESUME_ADVICE, parse_json, require_file, shown, write_file
from convnext_cifar.model.formats import MAX_CLASSES, class_names

FORMAT = "convnext-cifar/weights-v1"
MAX_EPOCHS = 10**6  # as --sched.epochs allows


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
    identity: dict[str, Any] | None = None  # the dataset's (dataset.identity_of); None: older


def load_weights(path: Path) -> Checkpoint:
    """Read a file written by `save_weights`, with one clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = require_file(weights_in(Path(path)), "checkpoint")
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
        ckpt = Checkpoint(state_dict, _field(metadata, "config",
                                             lambda v: from_dict(TrainConfig, v)),
                          _field(metadata, "classes"), _field(metadata, "epoch"),
                          _field(metadata, "metrics"), metadata.get("weights", "raw"),
                          _field(metadata, "dataset", default="null"))
        problem = _metadata_problem(ckpt)
    except (KeyError, ValueError, TypeError, UserError) as e:
        problem = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    if problem:
        raise UserError(f"{path} has damaged metadata ({problem}); it was edited or written by "
                        "something else: use another checkpoint of the run")
    return ckpt


def weights_in(path: Path) -> Path:
    """The weights file `path` names: itself, or a work dir's best.safetensors; a training
    state (state_*.pt, for --resume) is one UserError naming what to give instead."""
    if path.is_dir() and (path / "config.json").is_file():
        best = path / "best.safetensors"
        if not best.is_file():
            raise UserError(f"{path} is a run's work dir without best.safetensors yet (it is "
                            "written after the first validation); give one of its "
                            "epoch_N.safetensors, or wait")
        return best
    if path.suffix in (".pt", ".pth") and path.name.startswith("state_"):
        raise UserError(f"{path} is a training state, for `train --resume`; evaluate the run's "
                        f"weights instead: {path.parent} (its best.safetensors) or an "
                        "epoch_N.safetensors")
    return path


def _field(metadata: dict[str, str], name: str, build: Any = None, default: str | None = None
           ) -> Any:
    """Metadata field `name` parsed as bounded JSON (and built by `build`), any problem one
    UserError starting with the field's name."""
    if name not in metadata and default is None:
        raise UserError(f"field {name} is missing")
    value = parse_json(metadata.get(name, default), f"field {name}")
    if build is None:
        return value
    try:
        return build(value)
    except UserError as e:
        raise UserError(f"field {name}: {e}") from None


def _metadata_problem(ckpt: Checkpoint) -> str:
    """What is wrong with a checkpoint's metadata values ('' if nothing)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if class_names(ckpt.classes) is None:
        return (f"field classes is {shown(ckpt.classes)}, not a list of at most {MAX_CLASSES:,} "
                "distinct class names")
    head = ckpt.state_dict.get("head.fc.weight")
    if head is None or head.shape[0] != len(ckpt.classes):
        return (f"field classes names {len(ckpt.classes):,} classes but the weights' head has "
                f"{'none' if head is None else head.shape[0]}")
    if not (isinstance(ckpt.epoch, int) and not isinstance(ckpt.epoch, bool)
            and 0 <= ckpt.epoch <= MAX_EPOCHS):
        return f"field epoch is {shown(ckpt.epoch)}, not a whole number in [0, {MAX_EPOCHS:,}]"
    if not (isinstance(ckpt.metrics, dict) and all(number(v) for v in ckpt.metrics.values())):
        return f"field metrics is {shown(ckpt.metrics)}, not an object of numbers"
    if ckpt.weights not in ("raw", "ema"):
        return f"field weights is {shown(ckpt.weights)}, not raw or ema"
    if ckpt.identity is not None and not (isinstance(ckpt.identity, dict)
                                          and isinstance(ckpt.identity.get("classes"), list)):
        return "field dataset is not an identity object"
    return ""
