"""training/build.py: what `train` and the benchmarks run is built one way from the config."""

import dataclasses

import torch

from convnext_cifar.config import DataConfig, EmaConfig, LossConfig, TrainConfig
from convnext_cifar.data.cifar import CIFAR10
from convnext_cifar.data.dataset import Dataset, Split
from convnext_cifar.presets import CIFAR10Smoke
from convnext_cifar.runtime import Runtime
from convnext_cifar.training.build import build_run

CPU = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)


def dataset(n=24, classes=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return Dataset(Split(images[:8], labels[:8]), [str(i) for i in range(classes)], CIFAR10.mean,
                   CIFAR10.std, {}, train=Split(images, labels))


def test_the_run_is_what_the_config_says():
    smoke = CIFAR10Smoke()
    cfg = dataclasses.replace(smoke, data=DataConfig(batch_size=8),
                              model=dataclasses.replace(smoke.model, label_smoothing=0.0),
                              ema=EmaConfig(decay="auto"),
                              loss=LossConfig(class_weights="1,2,3"))
    run = build_run(cfg, CPU, data=dataset())
    assert len(run.loader) == 3 and run.normalize is run.loader.normalize
    assert run.model.head.fc.out_features == 3
    assert run.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert run.ema is not None and 0.9 <= run.ema.decay < 1  # auto: a tenth of the run's steps
    assert run.step_fn.clip == 5.0 and run.step_fn.compiled_rows == 8
    logits, target = torch.zeros(2, 3), torch.tensor([2, 2])
    weighted = run.step_fn.loss_fn(logits, target)  # class 2 weighs 3: 3 x the plain sum
    plain = build_run(dataclasses.replace(cfg, loss=LossConfig()), CPU, data=dataset())
    assert torch.allclose(weighted, 3 * plain.step_fn.loss_fn(logits, target))


def test_same_config_same_initial_weights_and_no_ema_when_off():
    cfg = dataclasses.replace(TrainConfig(), model=CIFAR10Smoke().model,
                              data=DataConfig(batch_size=8))
    a, b = (build_run(cfg, CPU, data=dataset(), pretrained=False) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))
    assert a.ema is None


def test_under_a_process_group_gradients_are_views_of_the_ddp_buckets(tmp_path):
    import torch.distributed as tdist

    from convnext_cifar.distributed import Dist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                             world_size=1)
    try:
        cfg = dataclasses.replace(CIFAR10Smoke(), data=DataConfig(batch_size=8))
        run = build_run(cfg, CPU, Dist(torchrun=True), data=dataset())
        assert run.step_fn.ddp is not None and run.step_fn.ddp.gradient_as_bucket_view
    finally:
        tdist.destroy_process_group()
