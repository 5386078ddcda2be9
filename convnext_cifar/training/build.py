"""What a training run is made of (`Run`), built one way for `train` and the benchmarks: the
dataset, the model (from its pretrained weights), the module to call (maybe compiled, maybe
under DDP), the optimizer and the step, the loader, the EMA of the weights, and the
distillation teacher."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from convnext_cifar.config import TrainConfig
from convnext_cifar.data.dataset import Dataset
from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.data.loader import DeviceLoader, Normalize, training_loader
from convnext_cifar.distributed import Dist
from convnext_cifar.model.build import build_model
from convnext_cifar.model.ema import ModelEma, ema_schedule
from convnext_cifar.model.optim import build_optimizer
from convnext_cifar.runtime import Runtime, compiled, prepare_model, seed_everything
from convnext_cifar.training.distill import Teacher, distillation_loss, load_teacher
from convnext_cifar.training.step import TrainStep, cross_entropy_sum


@dataclass
class Run:
    """The parts of a training run: data, model, the module to call (maybe compiled), the step,
    the loader (with the normalisation validation uses too), and the EMA when it is on."""

    cfg: TrainConfig
    rt: Runtime
    dist: Dist
    data: Dataset
    model: torch.nn.Module
    forward: torch.nn.Module
    step_fn: TrainStep
    loader: DeviceLoader
    ema: ModelEma | None = None
    teacher: Teacher | None = None

    @property
    def normalize(self) -> Normalize:
        return self.loader.normalize


def build_run(cfg: TrainConfig, rt: Runtime, dist: Dist | None = None,
              data: Dataset | None = None, *, pretrained: bool = True) -> Run:
    """Build what `cfg` describes on `rt`: the dataset (unless given), the model (from its
    pretrained weights when `pretrained`), the optimizer, the step, the loader and the EMA."""
    dist = dist or Dist()
    if data is None:
        data = load_dataset(cfg.data, rt.device)
    if data.train is None:
        raise ValueError("training needs the dataset's training split")
    seed_everything(cfg.seed)
    model_cfg = cfg.model if pretrained else dataclasses.replace(cfg.model, pretrained="none")
    model, forward = prepare_model(build_model(model_cfg, data.num_classes, dist.is_main,
                                                data.classes), rt)
    ddp, train_forward = None, forward
    if dist.enabled:
        # Same initial weights on every rank (seeded above), but each rank its own drop-path noise.
        torch.manual_seed(cfg.seed + 1_000_003 * (dist.rank + 1))
        ddp = torch.nn.parallel.DistributedDataParallel(  # gradients are views of the buckets:
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None,  # no copies
            gradient_as_bucket_view=True)
        train_forward = compiled(ddp, rt)
    optimizer = build_optimizer(model, cfg.optim, rt.device, scaled=rt.precision == "fp16")
    weights = None
    if cfg.loss.class_weights != "none":  # the class counts are read once, here
        counts = torch.bincount(data.train.labels, minlength=data.num_classes).tolist()
        weights = torch.tensor(cfg.loss.weights(counts), device=rt.device)
    loss_fn = cross_entropy_sum(cfg.model.label_smoothing, weights)
    loader = training_loader(cfg, data, rt.device, rt.channels_last, dist)
    accum_steps = cfg.accum_steps(dist.world)
    rows = cfg.data.batch_size // dist.world // accum_steps
    teacher = None
    if cfg.distill.on:
        teacher = load_teacher(cfg, rt, data, loader.normalize, rows)
        loss_fn = distillation_loss(loss_fn, cfg.distill)
    step_fn = TrainStep(train_forward, optimizer, rt, loss_fn,
                        cfg.optim.clip_grad_norm, accum_steps, ddp, dist.world,
                        eager=ddp or model, compiled_rows=rows, teacher=teacher)
    ema = None
    decay, warmup = ema_schedule(cfg.ema.decay, cfg.ema.warmup_steps,
                                 cfg.sched.epochs * len(loader))
    if decay > 0:
        ema = ModelEma(model, decay, warmup, wrap=lambda m: compiled(m, rt))
    return Run(cfg, rt, dist, data, model, forward, step_fn, loader, ema, teacher)
