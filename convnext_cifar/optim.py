"""AdamW with decay / no-decay groups and layer-wise LR scales, and the learning rate as a pure
function of the step."""

from __future__ import annotations

import math
import re

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from convnext_cifar.config import OptimConfig, SchedConfig


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to conv and linear weights only: never to norms, biases or GRN."""
    return param.ndim >= 2


def layer_id(name: str, depths: list[int], kind: str = "single") -> int:
    """The official ConvNeXt-V2 layer id of a timm parameter name (its optim_factory.py).

    single: the stem and stage i's downsample get sum(depths[:i]) + 1, block j of stage i
    sum(depths[:i]) + j + 1, the final norm and head sum(depths) + 1. group (Base and larger):
    12 groups of three blocks, the stem 0, the final norm and head 13.
    """
    stem = re.match(r"stem\.", name)
    down = re.match(r"stages\.(\d+)\.downsample\.", name)
    block = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name)
    if kind == "single":
        if stem or down:
            return sum(depths[:int(down.group(1)) if down else 0]) + 1
        if block:
            stage, j = int(block.group(1)), int(block.group(2))
            return sum(depths[:stage]) + j + 1
        return sum(depths) + 1
    if stem:
        return 0
    if down:
        stage = int(down.group(1))
        return stage + 1 if stage in (1, 2) else 12
    if block:
        stage, j = int(block.group(1)), int(block.group(2))
        return stage + 1 if stage < 2 else 3 + j // 3 if stage == 2 else 12
    return 13


def num_layers(depths: list[int], kind: str = "single") -> int:
    return sum(depths) if kind == "single" else 12


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 layer_decay_type: str = "single") -> list[dict]:
    """AdamW groups in the model's parameter order: decay and no-decay (`decays`), and with
    `layer_decay` < 1 one pair per layer id whose `lr_scale` is layer_decay ** (layers + 1 -
    id): the head trains at the full LR, each layer below it R times slower."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay == 1.0:
        return [
            {"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
        ]
    depths = [len(stage.blocks) for stage in model.stages]
    top = num_layers(depths, layer_decay_type)
    groups: dict[tuple[int, bool], dict] = {}
    for n, p in params:
        lid, decay = layer_id(n, depths, layer_decay_type), decays(n, p)
        group = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (top + 1 - lid), "layer_id": lid})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    device: torch.device) -> torch.optim.AdamW:
    # The fused kernel: measured 4x faster than foreach on a 2-core CPU for Tiny (16 vs 72 ms).
    fused_ok = device.type in _get_fused_kernels_supported_devices()
    fast = {"fused": True} if fused_ok else {"foreach": True}
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fast)


def lr_at(step: int, lr: float, sched: SchedConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of the whole run.

    Per step: linear warmup from start_factor*lr to lr over warmup_epochs, then a cosine that
    reaches min_lr at the last step. Per epoch (`sched.per_epoch`): the LR MMEngine's LinearLR +
    CosineAnnealingLR give each epoch. Its LinearLR reaches lr at epoch warmup_epochs - 1 (its
    total_iters is end - begin - 1), and its cosine continues from the LR it finds: with one
    warmup epoch that is start_factor * lr, which MMEngine never raises again.
    """
    if sched.per_epoch:
        epoch, warmup, total = step // steps_per_epoch, sched.warmup_epochs, sched.epochs
        warm_lr = lr * sched.start_factor if warmup == 1 else lr  # where LinearLR leaves it
        if epoch < warmup:
            progress = epoch / (warmup - 1) if warmup > 1 else 0.0
            return lr * (sched.start_factor + (1.0 - sched.start_factor) * progress)
        return _cosine(epoch - warmup, total - warmup, warm_lr, sched.min_lr)
    warmup, total = sched.warmup_epochs * steps_per_epoch, sched.epochs * steps_per_epoch
    if step < warmup:
        return lr * (sched.start_factor + (1.0 - sched.start_factor) * step / warmup)
    return _cosine(step - warmup, total - 1 - warmup, lr, sched.min_lr)


def _cosine(t: int, span: int, lr: float, min_lr: float) -> float:
    progress = min(t / span, 1.0) if span > 0 else 0.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The configured lr, scaled linearly with the global batch when base_batch_size is set."""
    return cfg.lr * batch_size / cfg.base_batch_size if cfg.base_batch_size else cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR times each group's layer-wise scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
