"""training/loop.py: an epoch reads from the device only at log points (CPU, and CUDA where
there is one)."""


import dataclasses

import pytest
import torch
from support import CPU, needs_cuda, tiny_run

from convnext_cifar.config import DataConfig, SchedConfig, TrainConfig
from convnext_cifar.data.cifar import CIFAR10
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError
from convnext_cifar.outputs.console import Progress
from convnext_cifar.outputs.metrics_log import JsonlSink, MetricsLog
from convnext_cifar.runtime import Runtime
from convnext_cifar.training.loop import preflight, train_one_epoch
from convnext_cifar.training.state import Position
from convnext_cifar.training.step import Guard, Window


def test_epoch_syncs_only_at_log_points(monkeypatch, tmp_path):
    cfg = TrainConfig(data=DataConfig(batch_size=4), sched=SchedConfig(epochs=2, warmup_epochs=1),
                      log_interval=5, work_dir=tmp_path)
    run = tiny_run(CPU, torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8),
                   torch.randint(0, 10, (40,)), cfg)
    step = run.step_fn
    step(*next(run.loader.epoch(1)))  # creates AdamW's step counters: host-side by design
    counters = {id(s["step"]) for s in step.optimizer.state.values()}
    calls = []
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting(real):
        def read(t):
            if id(t) not in counters:
                calls.append(t)
            return real(t)
        return read

    monkeypatch.setattr(torch.Tensor, "item", counting(real_item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting(real_tolist))
    position = Position()
    log = MetricsLog([JsonlSink(tmp_path / "m.jsonl")])
    assert train_one_epoch(run, position, log, Progress(2, live=False), Window(CPU.device),
                           Guard(CPU.device, 1))
    assert (position.step, position.epoch, position.batch) == (10, 1, 0)
    assert len(calls) == 2 * 2  # the window's sums in one read, and the non-finite guard,


@pytest.mark.cuda
@needs_cuda
def test_cuda_epoch_has_no_host_sync(tmp_path):
    rt = Runtime(torch.device("cuda"), "bf16", compile=False, channels_last=True)
    cfg = TrainConfig(data=DataConfig(batch_size=4), log_interval=1000)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, device="cuda")
    run = tiny_run(rt, images, torch.randint(0, 10, (40,), device="cuda"), cfg)
    step, loader = run.step_fn, run.loader
    step(*next(loader.epoch(1)))
    batches = list(loader.epoch(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        window, guard = Window(rt.device), Guard(rt.device, 1)
        for x, y, n in batches[:-1]:
            loss, norm = step(x, y, n)
            window.add(loss, norm, n)
            guard.update(loss, norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@needs_cuda
def test_cuda_recipe_epoch_has_no_host_sync():
    """MixUp/CutMix per image, RandAugment, erasing and EMA on: still no host sync per step."""
    from convnext_cifar.config import AugConfig
    from convnext_cifar.data.augment import BatchAugment
    from convnext_cifar.model.ema import ModelEma

    rt = Runtime(torch.device("cuda"), "bf16", compile=False, channels_last=True)
    cfg = TrainConfig(data=DataConfig(batch_size=8), log_interval=1000)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, device="cuda")
    run = tiny_run(rt, images, torch.randint(0, 10, (48,), device="cuda"), cfg)
    aug = AugConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mix_mode="elem",
                    randaugment="rand-m9-mstd0.5-inc1", erasing_prob=0.25)
    run.loader.transform = BatchAugment(aug, 10, CIFAR10.mean, CIFAR10.std)
    ema = ModelEma(run.model, 0.99)
    run.step_fn(*next(run.loader.epoch(1)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (x, y, n) in enumerate(run.loader.epoch(0), start=1):
            run.step_fn(x, y, n)
            ema.update(run.model, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@needs_cuda
def test_cuda_fp16_with_layer_decay_steps_without_host_sync():
    """fp16's GradScaler with layer decay's many groups: fused AdamW (it skips an overflowed
    step on the device), not OnePass, whose step would make the scaler read every step."""
    from convnext_cifar.config import OptimConfig
    from convnext_cifar.data.cifar import CIFAR10
    from convnext_cifar.data.dataset import Dataset, Split
    from convnext_cifar.model.optim import OnePassAdamW
    from convnext_cifar.presets import CIFAR10Smoke
    from convnext_cifar.training.build import build_run

    rt = Runtime(torch.device("cuda"), "fp16", compile=False, channels_last=True)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (40,), device="cuda")
    data = Dataset(Split(images, labels), [str(i) for i in range(10)], CIFAR10.mean,
                   CIFAR10.std, {}, train=Split(images, labels))
    cfg = dataclasses.replace(CIFAR10Smoke(), data=DataConfig(batch_size=8),
                              optim=OptimConfig(layer_decay=0.9))
    run = build_run(cfg, rt, data=data)
    assert not isinstance(run.step_fn.optimizer, OnePassAdamW) and run.step_fn.scaler.is_enabled()
    run.step_fn(*next(run.loader.epoch(1)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y, n in run.loader.epoch(0):
            run.step_fn(x, y, n)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_preflight_checks_the_batch_against_the_processes_and_returns_the_runtime():
    cfg = dataclasses.replace(TrainConfig(), device="cpu", compile="off")
    assert preflight(cfg).device.type == "cpu"
    with pytest.raises(UserError, match="must split evenly over 3 processes x 1 accumulation"):
        preflight(cfg, Dist(rank=0, world=3, local_rank=0))


def test_preflight_checks_a_micro_batch_against_each_process_share():
    cfg = TrainConfig(device="cpu", compile="off", data=DataConfig(batch_size=60, micro_batch=10))
    assert preflight(cfg, Dist(rank=0, world=2, local_rank=0)).device.type == "cpu"  # 3 x 10
    with pytest.raises(UserError, match=r"--data.batch-size 60 is the global batch; it must "
                                        r"split evenly over 4 processes x micro-batches of "
                                        r"--data.micro-batch 10"):
        preflight(cfg, Dist(rank=0, world=4, local_rank=0))  # 15 images each
