"""AdamW with decay / no-decay groups, and the learning rate as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from convnext_cifar.config import OptimConfig, SchedConfig


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to conv and linear weights only: never to norms, biases or GRN."""
    return param.ndim >= 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups split by `decays`, in the model's parameter order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    device: torch.device) -> torch.optim.AdamW:
    # The fused kernel: measured 4x faster than foreach on a 2-core CPU for Tiny (16 vs 72 ms).
    fused_ok = device.type in _get_fused_kernels_supported_devices()
    fast = {"fused": True} if fused_ok else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                             eps=cfg.eps, **fast)


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
    for group in optimizer.param_groups:
        group["lr"] = lr
