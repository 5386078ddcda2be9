"""AdamW with decay / no-decay groups and layer-wise LR scales, whose loaded state fits how it runs
(another kind of AdamW, another memory format), and the learning rate as a pure function of the
step."""

from __future__ import annotations

import functools
import math
import re

import torch

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


RUN_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how an AdamW runs, per group


class AdamW(torch.optim.AdamW):
    """torch's AdamW, whose loaded state always fits how this optimizer runs.

    A state written by another kind of AdamW (fused, foreach, `OnePassAdamW`) or under another
    memory format (a resume that toggles --channels-last) gets this optimizer's run flags back
    (torch's load takes the saved ones: a fused optimizer would then run foreach), `step` where
    this kind keeps it (fused: on the parameter's device; else on the host), and every moment
    its parameter's layout: torch's load casts only dtype and device, and the fused kernel walks
    raw memory, so a moment in another layout would be applied to the wrong elements.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        own = [{k: g[k] for k in RUN_FLAGS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flags in zip(self.param_groups, own):
            group.update(flags)
            on_device = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                state = self.state.get(p, {})
                for key, value in state.items():
                    if key == "step":
                        state[key] = value.to(p.device if on_device else "cpu", torch.float32)
                    elif torch.is_tensor(value) and value.shape == p.shape and (
                            value.stride() != p.stride()):
                        state[key] = torch.empty_like(p).copy_(value)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    one_pass: bool | None = None, scaled: bool = False) -> AdamW:
    """AdamW over `param_groups`. On the CPU torch's fused kernel, one call per group (measured
    4x faster than foreach on a 2-core CPU for Tiny: 16 vs 72 ms). On a GPU with layer decay's
    many groups (38 for Tiny), `OnePassAdamW`: a few multi-tensor ops for all of them instead of
    a call (and its Python) per group, unless the gradients are `scaled` (fp16). `one_pass`
    forces either."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type)
    if one_pass is None:
        one_pass = use_one_pass(device.type, len(groups), scaled)
    if one_pass:
        return OnePassAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    fast = {"fused": True} if fused_supported(device.type) else {"foreach": True}
    return AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fast)


def use_one_pass(device_type: str, groups: int, scaled: bool) -> bool:
    """OnePassAdamW on a GPU with more than the two decay groups; not with fp16's GradScaler:
    the fused kernel skips an overflowed step on the device, while a step without that support
    makes the scaler read its inf check on the host every step."""
    return device_type == "cuda" and groups > 2 and not scaled


@functools.cache
def fused_supported(device_type: str) -> bool:
    """Whether torch's fused AdamW runs on this kind of device: asked of AdamW itself, one step
    on a one-element parameter (its first step refuses a device without the kernel)."""
    try:
        param = torch.zeros(1, device=device_type, requires_grad=True)
        param.grad = torch.zeros_like(param)
        torch.optim.AdamW([param], fused=True).step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


class OnePassAdamW(AdamW):
    """torch's AdamW update (amsgrad off) for every parameter of every group at once: each
    step is a handful of multi-tensor (foreach) ops with per-parameter learning rates and
    weight decays, however many groups there are. Its state has AdamW's layout, so a state
    saved by one loads into the other."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=True)

    @torch.no_grad()
    def step(self, closure=None):
        params, grads, avgs, squares, steps, lrs, decays = [], [], [], [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # on the host, as torch keeps it
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                avgs.append(state["exp_avg"])
                squares.append(state["exp_avg_sq"])
                steps.append(state["step"])
                lrs.append(group["lr"])
                decays.append(1.0 - group["lr"] * group["weight_decay"])
        if not params:
            return None
        (beta1, beta2), eps = self.param_groups[0]["betas"], self.param_groups[0]["eps"]
        torch._foreach_add_(steps, 1.0)
        t = steps[0].item()  # a host tensor: no read from the device
        bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
        torch._foreach_mul_(params, decays)
        torch._foreach_lerp_(avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, 1.0 - beta2)
        denominators = torch._foreach_sqrt(squares)
        torch._foreach_div_(denominators, math.sqrt(bias2))
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, avgs, denominators, [-lr / bias1 for lr in lrs])
        return None


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
