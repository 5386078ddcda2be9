"""The training loop, written out: fit() -> train_one_epoch() -> TrainStep, and evaluate().

Scalars stay on the device between log points: the only host-device syncs are at a log point,
at the end of an epoch and after validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convnext_cifar.checkpoints import atomic_write_bytes, load_weights, save_weights
from convnext_cifar.config import TrainConfig, config_json
from convnext_cifar.data import DeviceLoader, Normalize, eval_batches, load_cifar10
from convnext_cifar.errors import UserError
from convnext_cifar.model import build_model
from convnext_cifar.optim import build_optimizer, lr_at, set_lr
from convnext_cifar.report import MetricsLog, Progress

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """What the `auto` settings of a config resolve to on this machine."""

    device: torch.device
    precision: str
    compile: bool
    channels_last: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def as_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": self.precision, "compile": self.compile,
                "channels_last": self.channels_last, "torch": torch.__version__}


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    device = torch.device(name)
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"  # CPUs without bf16 units run autocast ~100x slower
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return Runtime(device, precision, compile_on, cfg.channels_last)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(model: torch.nn.Module, rt: Runtime) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move to the device and memory format; return (model, the module to call: maybe compiled)."""
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    model = model.to(rt.device, memory_format=memory_format)
    return model, (torch.compile(model, dynamic=False) if rt.compile else model)


class TrainStep:
    """One optimizer step on one batch: forward under autocast, loss, backward, clip, step.

    Returns the loss and the gradient norm as device tensors (no host sync).
    """

    def __init__(self, forward: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime,
                 label_smoothing: float, clip_grad_norm: float | None):
        self.forward, self.optimizer, self.rt = forward, optimizer, rt
        self.label_smoothing, self.clip = label_smoothing, clip_grad_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.rt.autocast():
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None], foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach(), grad_norm.detach()


@dataclass
class EvalResult:
    num_images: int
    loss: float
    top1: float
    top5: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def per_class(self, classes: list[str]) -> dict[str, float]:
        return {name: 100.0 * row[i] / max(sum(row), 1)
                for i, (name, row) in enumerate(zip(classes, self.confusion))}


@torch.inference_mode()
def evaluate(forward: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int, normalize: Normalize, rt: Runtime, num_classes: int) -> EvalResult:
    """Every test image once, in order; counts stay on the device until the end."""
    forward.eval()
    dev = images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    top1 = torch.zeros((), dtype=torch.int64, device=dev)
    top5 = torch.zeros((), dtype=torch.int64, device=dev)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=dev)
    k = min(5, num_classes)
    for x, y in eval_batches(images, labels, batch_size, normalize):
        with rt.autocast():
            logits = forward(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        top1 += (topk[:, 0] == y).sum()
        top5 += (topk == y[:, None]).any(dim=1).sum()
        confusion += torch.bincount(y * num_classes + topk[:, 0], minlength=num_classes ** 2)
    n = len(images)
    return EvalResult(n, loss_sum.item() / n, 100.0 * top1.item() / n, 100.0 * top5.item() / n,
                      confusion.view(num_classes, num_classes).tolist())


def train_one_epoch(step_fn: TrainStep, loader: DeviceLoader, epoch: int, step: int,
                    cfg: TrainConfig, log: MetricsLog, progress: Progress) -> int:
    """Train `epoch` (0-based) starting at global step `step`; returns the step after it."""
    step_fn.forward.train()
    steps = len(loader)
    dev = loader.images.device
    loss_sum = torch.zeros((), device=dev)
    norm_sum = torch.zeros((), device=dev)
    window_steps, window_images, t0 = 0, 0, time.perf_counter()
    progress.start_epoch(epoch + 1, steps)
    for i, (x, y) in enumerate(loader.epoch(epoch)):
        lr = lr_at(step, cfg.optim.lr, cfg.sched, steps)
        set_lr(step_fn.optimizer, lr)
        loss, grad_norm = step_fn(x, y)
        loss_sum += loss
        norm_sum += grad_norm
        step += 1
        window_steps += 1
        window_images += len(y)
        progress.advance()
        if (i + 1) % cfg.log_interval == 0 or i + 1 == steps:
            record = {"epoch": epoch + 1, "step": step,
                      "loss": loss_sum.item() / window_steps, "lr": lr,
                      "grad_norm": norm_sum.item() / window_steps}
            record["img_per_s"] = window_images / (time.perf_counter() - t0)
            log.write(record)
            progress.log_train(record, steps, i + 1)
            loss_sum.zero_()
            norm_sum.zero_()
            window_steps, window_images, t0 = 0, 0, time.perf_counter()
    progress.end_epoch()
    return step


def prepare_work_dir(cfg: TrainConfig) -> Path:
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.json", config_json(cfg).encode())
    except OSError as e:
        raise UserError(f"cannot write to work dir {run_dir}: {e.strerror or e}; "
                        "pick another with --work-dir") from None
    return run_dir


def fit(cfg: TrainConfig, live_progress: bool | None = None) -> dict[str, Any]:
    """Run the whole training described by `cfg`; returns the best top-1 and where it is."""
    cfg = dataclasses.replace(cfg, work_dir=cfg.run_dir)
    rt = resolve_runtime(cfg)
    run_dir = prepare_work_dir(cfg)
    progress = Progress(cfg.sched.epochs, live_progress)
    progress.message(f"run {cfg.name}: {json.dumps(rt.as_dict())} -> {run_dir}")
    seed_everything(cfg.seed)

    data = load_cifar10(cfg.data, rt.device)
    model, forward = prepare_model(build_model(cfg.model, cfg.data.num_classes), rt)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    step_fn = TrainStep(forward, optimizer, rt, cfg.model.label_smoothing, cfg.optim.clip_grad_norm)
    loader = DeviceLoader(data.train_images, data.train_labels, cfg.data, cfg.seed,
                          rt.channels_last)
    normalize = Normalize(cfg.data, rt.device, rt.channels_last)
    log = MetricsLog(run_dir / "metrics.jsonl")

    step, best_top1, best_epoch = 0, -1.0, 0
    for epoch in range(cfg.sched.epochs):
        step = train_one_epoch(step_fn, loader, epoch, step, cfg, log, progress)
        last = epoch + 1 == cfg.sched.epochs
        metrics: dict[str, float] = {}
        if (epoch + 1) % cfg.val_interval == 0 or last:
            res = evaluate(forward, data.test_images, data.test_labels, cfg.data.eval_batch_size,
                           normalize, rt, cfg.data.num_classes)
            metrics = {"val_loss": res.loss, "top1": res.top1, "top5": res.top5}
            log.write({"epoch": epoch + 1, **metrics})
            if res.top1 > best_top1:
                best_top1, best_epoch = res.top1, epoch + 1
                save_weights(run_dir / "best.safetensors", model, cfg, data.classes, epoch + 1,
                             metrics, rt.as_dict())
            progress.log_val({"epoch": epoch + 1, **metrics}, best_top1)
        if (epoch + 1) % cfg.ckpt_interval == 0 or last:
            save_weights(run_dir / f"epoch_{epoch + 1}.safetensors", model, cfg, data.classes,
                         epoch + 1, metrics, rt.as_dict())
    progress.message(f"done: best top1 {best_top1:.2f} at epoch {best_epoch}: "
                     f"{run_dir / 'best.safetensors'}")
    return {"best_top1": best_top1, "best_epoch": best_epoch, "work_dir": str(run_dir)}


def evaluate_checkpoint(path: Path, data_root: Path | None = None, download: bool | None = None,
                        device: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Rebuild the model from a checkpoint's own metadata and evaluate the test split."""
    ckpt = load_weights(path)
    cfg = ckpt.config
    data_changes = {k: v for k, v in (("root", data_root), ("download", download),
                                      ("eval_batch_size", batch_size)) if v is not None}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_changes),
                              device=device or cfg.device)
    rt = resolve_runtime(cfg)
    model = build_model(dataclasses.replace(cfg.model, pretrained="none"), cfg.data.num_classes)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        raise UserError(f"{path} does not match the model its metadata describes ({e})") from None
    model, forward = prepare_model(model, rt)
    data = load_cifar10(cfg.data, rt.device, train=False)
    normalize = Normalize(cfg.data, rt.device, rt.channels_last)
    res = evaluate(forward, data.test_images, data.test_labels, cfg.data.eval_batch_size,
                   normalize, rt, cfg.data.num_classes)
    return {"checkpoint": str(path), "epoch": ckpt.epoch, "num_images": res.num_images,
            "top1": res.top1, "top5": res.top5, "loss": res.loss,
            "per_class": res.per_class(data.classes), "confusion": res.confusion,
            "recorded": ckpt.metrics}
