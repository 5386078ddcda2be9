"""One optimizer step and what watches it: the loss, `TrainStep` (forward under autocast,
loss, backward, clip, step, over micro-batches and DDP ranks), `Window` (the sums between two log
points, kept on the device) and `Guard` (non-finite loss or gradient norm: the run stops)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convnext_cifar.distributed import Dist
from convnext_cifar.errors import TrainingDiverged
from convnext_cifar.outputs.workdir import find_states
from convnext_cifar.runtime import Runtime

LossFn = Callable[..., torch.Tensor]  # (logits, target[, teacher logits]) -> summed loss


def cross_entropy_sum(label_smoothing: float, weight: torch.Tensor | None = None) -> LossFn:
    """Summed cross-entropy of logits against class indices, or against per-class probabilities
    (soft targets, as MixUp/CutMix make them), with label smoothing applied to either, and each
    class's terms scaled by `weight` when given."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=weight,
                               label_smoothing=label_smoothing, reduction="sum")

    return loss


class GradScaler(torch.amp.GradScaler):
    """torch's GradScaler; a state saved without scaling (fp32, bf16) loads into an fp16 run as
    a fresh scale, so the precision may change when a run resumes."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


class TrainStep:
    """One optimizer step on one batch: forward under autocast, loss, backward, clip, step.

    The loss is the mean over the *global* batch of `n` images, however the batch is split over
    ranks (DDP averages gradients across ranks) and over `accum_steps` micro-batches (DDP's
    no_sync on all but the last). Returns this rank's share of that loss and the gradient norm
    as device tensors (no host sync).

    A compiled `forward` keeps one graph: micro-batches of another size than `compiled_rows`
    (an epoch's last, smaller batch) run through `eager`, the same module uncompiled, instead of
    costing a cold compile of their own. With a `teacher` (distillation) the loss also gets the
    teacher's logits of each micro-batch, computed from that very input.
    """

    def __init__(self, forward: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime,
                 loss_fn: LossFn, clip_grad_norm: float | None, accum_steps: int = 1,
                 ddp: torch.nn.parallel.DistributedDataParallel | None = None, world: int = 1,
                 eager: torch.nn.Module | None = None, compiled_rows: int = 0,
                 teacher: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.forward, self.optimizer, self.rt, self.loss_fn = forward, optimizer, rt, loss_fn
        self.clip, self.accum_steps, self.ddp, self.world = clip_grad_norm, accum_steps, ddp, world
        self.eager, self.compiled_rows = eager if rt.compile else None, compiled_rows
        self.teacher = teacher
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.scaler = GradScaler(rt.device.type, enabled=rt.precision == "fp16")

    def __call__(self, x: torch.Tensor, target: torch.Tensor, n: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.world / (n or len(target))  # DDP divides the summed gradients by world
        if self.rt.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(zip(x.tensor_split(self.accum_steps), target.tensor_split(self.accum_steps)))
        loss = None
        for j, (xm, tm) in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            forward = self.forward
            if self.eager is not None and len(xm) != self.compiled_rows:
                forward = self.eager  # the tail batch: no second graph
            with sync:
                with self.rt.autocast():
                    logits = forward(xm)
                part = (self.loss_fn(logits, tm) if self.teacher is None
                        else self.loss_fn(logits, tm, self.teacher(xm))) * scale
                (self.scaler.scale(part) if self.scaler.is_enabled() else part).backward()
            loss = part.detach() if loss is None else loss + part.detach()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None], foreach=True)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss / self.world, grad_norm.detach()


class Window:
    """Sums of loss and gradient norm between two log points, kept on the device.

    A step whose gradient norm is not finite (an fp16 overflow the GradScaler skips) adds to
    `skipped` instead of the norm; the record then says how many were skipped.
    """

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.finite = torch.zeros((), dtype=torch.int64, device=device)
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, norm: torch.Tensor, images: int) -> None:
        self.loss += loss
        finite = torch.isfinite(norm)
        self.norm += torch.where(finite, norm, 0.0)
        self.finite += finite
        self.steps += 1
        self.images += images

    def flush(self, epoch: int, step: int, lr: float, dist: Dist | None = None) -> dict[str, Any]:
        """The log record of the window (syncs; sums the ranks' loss shares), then an empty one."""
        loss = (dist or Dist()).all_reduce_sum(self.loss.clone())
        loss_sum, norm_sum, finite = torch.stack(  # one read from the device
            [loss, self.norm, self.finite.to(loss.dtype)]).tolist()
        finite = int(finite)
        record = {"epoch": epoch, "step": step, "loss": loss_sum / self.steps, "lr": lr,
                  "grad_norm": norm_sum / max(finite, 1),
                  "img_per_s": self.images / (time.perf_counter() - self.t0)}
        if finite < self.steps:
            record["skipped_steps"] = self.steps - finite
        self.loss.zero_()
        self.norm.zero_()
        self.finite.zero_()
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.cpu(), "norm": self.norm.cpu(), "finite": self.finite.cpu(),
                "steps": self.steps, "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.copy_(state["loss"])
        self.norm.copy_(state["norm"])
        self.steps, self.images = state["steps"], state["images"]
        self.finite.fill_(state.get("finite", self.steps))  # older states: every step finite


class Guard:
    """Watches loss and gradient norm for non-finite values on the device; read at log points.

    With fp16 a GradScaler skips steps with inf gradients by design: only a streak of
    `patience` such steps in a row counts. Otherwise the first non-finite step counts.
    """

    def __init__(self, device: torch.device, patience: int):
        self.patience = patience
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # steps seen
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.tripped_at = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.count += 1
        self.streak.add_(1).mul_(bad)
        hit = (self.streak >= self.patience) & (self.tripped_at < 0)
        self.tripped_at.copy_(torch.where(hit, self.count, self.tripped_at))

    def check(self, steps_per_epoch: int, run_dir: Path) -> None:
        step = int(self.tripped_at.item())
        if step >= 0:
            states = find_states(run_dir)
            last = str(states[-1]) if states else "none yet"
            raise TrainingDiverged(
                f"non-finite loss or gradient norm at epoch {(step - 1) // steps_per_epoch + 1}, "
                f"step {step}; stopped without saving. Last good state: {last}. Lower "
                "--optim.lr or check the data, then resume with --resume auto or PATH")

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.cpu(), "streak": self.streak.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count.copy_(state["count"])
        self.streak.copy_(state["streak"])
