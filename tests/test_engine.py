import copy
import dataclasses
import json

import pytest
import timm
import torch
from conftest import small_run_args
from safetensors import safe_open

from convnext_cifar import cli, runtime
from convnext_cifar.config import DataConfig, OptimConfig, SchedConfig, TrainConfig
from convnext_cifar.data import DeviceLoader, Normalize
from convnext_cifar.datasets import CIFAR10, Dataset, Split
from convnext_cifar.distributed import Dist
from convnext_cifar.engine import (
    Guard,
    Run,
    TrainStep,
    Window,
    cross_entropy_sum,
    train_one_epoch,
)
from convnext_cifar.optim import build_optimizer
from convnext_cifar.report import MetricsLog, Progress
from convnext_cifar.resume import Position
from convnext_cifar.runtime import Runtime, prepare_model

CPU = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                             num_classes=10)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(cifar_root, tmp_path_factory):
    """A 3-epoch atto run on the learnable generated data, through the real CLI entry."""
    work = tmp_path_factory.mktemp("run")
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "3")) == 0
    return work


def test_short_run_learns_far_above_chance(trained):
    val = [r for r in read_jsonl(trained / "metrics.jsonl") if "top1" in r]
    assert [r["epoch"] for r in val] == [1, 2, 3]
    assert max(r["top1"] for r in val) > 60.0  # chance is 10 %
    train = [r for r in read_jsonl(trained / "metrics.jsonl") if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]


def test_run_writes_config_metrics_and_checkpoints(trained):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"]["name"] == "convnextv2_atto" and cfg["work_dir"] == str(trained)
    records = read_jsonl(trained / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "top1" in r]
    assert set(train[0]) == {"epoch", "step", "loss", "lr", "grad_norm", "img_per_s"}
    assert set(val[0]) == {"epoch", "val_loss", "top1", "top5", "balanced_accuracy", "macro_f1"}
    # 1000 images / batch 50 = 20 steps an epoch, logged every 5 steps
    assert [r["step"] for r in train if r["epoch"] == 1] == [5, 10, 15, 20]
    assert train[-1]["step"] == 60 and train[-1]["lr"] < 1e-4
    assert sorted(p.name for p in trained.glob("*.safetensors")) == [
        "best.safetensors", "epoch_1.safetensors", "epoch_2.safetensors", "epoch_3.safetensors"]
    best = max(val, key=lambda r: r["top1"])
    with safe_open(str(trained / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["metrics"])["top1"] == best["top1"]
    assert int(meta["epoch"]) == best["epoch"]
    assert json.loads(meta["classes"])[0] == "airplane"
    assert json.loads(meta["config"]) == cfg


def test_eval_of_best_reproduces_recorded_top1(trained, cifar_root, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(trained / "best.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = max((r for r in read_jsonl(trained / "metrics.jsonl") if "top1" in r),
                   key=lambda r: r["top1"])
    assert result["top1"] == recorded["top1"] and result["top5"] == recorded["top5"]
    assert result["num_images"] == 300 and len(result["per_class"]) == 10
    assert sum(map(sum, result["confusion"])) == 300
    assert cli.main(["eval", str(trained / "best.safetensors"), "--data.root",
                     str(cifar_root)]) == 0
    assert "per-class accuracy" in capsys.readouterr().out


def test_same_seed_same_run(cifar_root, tmp_path):
    args = ("--sched.epochs", "1", "--sched.warmup-epochs", "0", "--data.limit-train", "200")
    runs = []
    for name in ("a", "b"):
        assert cli.main(small_run_args(cifar_root, tmp_path / name) + list(args)) == 0
        with safe_open(str(tmp_path / name / "best.safetensors"), "pt") as f:
            runs.append({k: f.get_tensor(k) for k in f.keys()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    strip = [[{k: v for k, v in r.items() if k != "img_per_s"}
              for r in read_jsonl(tmp_path / n / "metrics.jsonl")] for n in ("a", "b")]
    assert strip[0] == strip[1]


def test_train_step_logs_preclip_norm_and_clips():
    model, fwd = prepare_model(tiny_model(), CPU)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), CPU.device)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    ref = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(ref(x), y, label_smoothing=0.1).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    step = TrainStep(fwd, opt, CPU, cross_entropy_sum(0.1), clip_grad_norm=1e-3)
    loss, norm = step(x, y)
    torch.testing.assert_close(norm, expected)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def tiny_run(rt, images, labels, cfg):
    """A Run of the tiny model on given device-resident data (no dataset files)."""
    model, fwd = prepare_model(tiny_model(), rt)
    normalize = Normalize(CIFAR10.mean, CIFAR10.std, 32, rt.device, True)
    data = Dataset(Split(images, labels), [str(i) for i in range(10)], CIFAR10.mean, CIFAR10.std,
                   {}, train=Split(images, labels))
    step = TrainStep(fwd, build_optimizer(model, cfg.optim, rt.device), rt, cross_entropy_sum(0.0),
                     5.0)
    loader = DeviceLoader(images, labels, cfg.data, 0, normalize)
    return Run(cfg, rt, Dist(), data, model, fwd, normalize, step, loader)


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
    assert train_one_epoch(run, position, MetricsLog(tmp_path / "m.jsonl"), Progress(2, live=False),
                           Window(CPU.device), Guard(CPU.device, 1))
    assert (position.step, position.epoch, position.batch) == (10, 1, 0)
    assert len(calls) == 2 * 2  # the window's sums in one read, and the non-finite guard,
    # at steps 5 and 10


def test_soft_targets_train_like_the_class_indices_they_encode():
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    results = []
    for target in (y, torch.nn.functional.one_hot(y, 10).float()):
        model, fwd = prepare_model(tiny_model(), CPU)
        step = TrainStep(fwd, build_optimizer(model, OptimConfig(), CPU.device), CPU,
                         cross_entropy_sum(0.2), 5.0)
        results.append((step(x, target), model.stem[0].weight.detach().clone()))
    (la, na), wa = results[0]
    (lb, nb), wb = results[1]
    torch.testing.assert_close((la, na), (lb, nb))
    torch.testing.assert_close(wa, wb)
    soft = torch.full((8, 10), 0.1)  # a uniform target: the loss is the mean log-partition
    logits = torch.randn(8, 10)
    expected = -(torch.log_softmax(logits, 1) * soft).sum()
    torch.testing.assert_close(cross_entropy_sum(0.0)(logits, soft), expected)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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


@pytest.mark.slow  # a cold compile takes a minute on 2 cores
def test_compiled_train_step_matches_eager():
    results = []
    for compiled in (False, True):
        rt = Runtime(torch.device("cpu"), "fp32", compile=compiled, channels_last=True)
        model, fwd = prepare_model(tiny_model(), rt)
        step = TrainStep(fwd, build_optimizer(model, OptimConfig(), rt.device), rt,
                         cross_entropy_sum(0.1), 1.0)
        torch.manual_seed(1)
        x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (8,))
        results.append([step(x, y)[0] for _ in range(3)])
        if compiled:
            assert fwd is not model and hasattr(fwd, "_orig_mod")
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)
    assert results[1][2] < results[1][0]


def test_runtime_defaults_per_device(monkeypatch):
    from convnext_cifar.errors import UserError
    from convnext_cifar.runtime import resolve_runtime

    rt = resolve_runtime(TrainConfig(device="cpu"))
    assert (rt.precision, rt.compile, rt.autocast_dtype) == ("fp32", True, None)  # Tiny
    atto = TrainConfig(device="cpu", model=TrainConfig().model.__class__(name="convnextv2_atto"))
    assert not resolve_runtime(atto).compile  # measured: not worth compiling on the CPU
    assert not resolve_runtime(TrainConfig(device="cpu", compile="off")).compile
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_runtime(TrainConfig()).device.type == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_runtime(TrainConfig(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    rt = resolve_runtime(TrainConfig(device="cuda"))
    assert (rt.precision, rt.compile) == ("bf16", True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_runtime(TrainConfig(device="cuda")).precision == "fp16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_and_fp16_uses_a_grad_scaler(precision):
    rt = Runtime(torch.device("cpu"), precision, compile=False, channels_last=True)
    model, fwd = prepare_model(tiny_model(), rt)
    step = TrainStep(fwd, build_optimizer(model, OptimConfig(), rt.device), rt,
                     cross_entropy_sum(0.1), 5.0)
    assert step.scaler.is_enabled() == (precision == "fp16")
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    before = model.stem[0].weight.detach().clone()
    losses = [step(x, y)[0] for _ in range(3)]
    assert all(torch.isfinite(v) for v in losses) and losses[0].dtype == torch.float32
    weight = model.stem[0].weight
    assert not torch.equal(before, weight) and weight.dtype == torch.float32


def test_default_work_dir_says_what_ran():
    from pathlib import Path

    from convnext_cifar.config import ModelConfig
    from convnext_cifar.presets import CIFAR10FineTune, CIFAR10Smoke

    ref = CIFAR10FineTune()
    assert ref.run_dir == Path("work_dirs/convnextv2-tiny_cifar10")
    atto = dataclasses.replace(ref, model=ModelConfig(name="convnextv2_atto"))
    assert atto.run_dir == Path("work_dirs/convnextv2-atto_cifar10")
    assert CIFAR10Smoke().run_dir == Path("work_dirs/convnextv2-atto_cifar10-smoke")
    assert dataclasses.replace(ref, name="mine").run_dir == Path("work_dirs/mine")
    assert TrainConfig(work_dir=Path("/x")).run_dir == Path("/x")


def test_live_progress_shows_epoch_loss_and_speed(capsys):
    progress = Progress(epochs=2, live=True)
    progress.start_epoch(1, steps=4)
    for _ in range(4):
        progress.advance()
    progress.log_train({"epoch": 1, "step": 4, "loss": 1.25, "lr": 1e-3, "grad_norm": 2.0,
                        "img_per_s": 321.0}, 4, 4)
    progress.end_epoch()
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "4/4" in out and "loss 1.2500" in out and "321 img/s" in out
    assert "eta" in out


def test_cpu_compile_needs_a_compiler(monkeypatch, capsys):
    from convnext_cifar.errors import UserError

    monkeypatch.setattr(runtime, "cpu_compiler_available", lambda: False)
    assert not runtime.resolve_runtime(TrainConfig(device="cpu")).compile  # auto: falls back
    assert "no C++ compiler found" in capsys.readouterr().err
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        runtime.resolve_runtime(TrainConfig(device="cpu", compile="on"))
    monkeypatch.setattr(runtime, "cpu_compiler_available", lambda: True)
    assert runtime.resolve_runtime(TrainConfig(device="cpu")).compile


class SimulatedRank(Dist):
    """Rank r of `world` whose collectives are left to the test: it keeps what it would sum."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        object.__setattr__(self, "sums", [])

    def all_reduce_sum(self, tensor):
        self.sums.append(tensor.clone())
        return tensor


def test_sharded_eval_counts_every_image_exactly_once():
    from convnext_cifar.engine import evaluate

    model, fwd = prepare_model(tiny_model(), CPU)
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (37,))
    norm = Normalize(CIFAR10.mean, CIFAR10.std, 32, "cpu", True)
    whole = evaluate(fwd, images, labels, 8, norm, CPU, 10)
    ranks = [SimulatedRank(r, 3) for r in range(3)]
    for rank in ranks:
        evaluate(fwd, images, labels, 8, norm, CPU, 10, rank)
    sums = torch.stack([r.sums[0] for r in ranks]).sum(0)  # loss, top-1, top-5 counts
    confusion = torch.stack([r.sums[1] for r in ranks]).sum(0).view(10, 10)
    assert confusion.sum() == 37 and confusion.tolist() == whole.confusion
    assert sums[1].item() * 100 / 37 == pytest.approx(whole.top1)
    assert sums[2].item() * 100 / 37 == pytest.approx(whole.top5)
    assert sums[0].item() / 37 == pytest.approx(whole.loss, rel=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_recipe_epoch_has_no_host_sync():
    """MixUp/CutMix per image, RandAugment, erasing and EMA on: still no host sync per step."""
    from convnext_cifar.augment import BatchAugment
    from convnext_cifar.config import AugConfig
    from convnext_cifar.model import ModelEma

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
def test_cuda_images_in_host_memory_are_batched_onto_the_device():
    """Dataset.placement "host": pinned images, permutation on the CPU, batches copied over."""
    rt = Runtime(torch.device("cuda"), "fp32", compile=False, channels_last=True)
    cfg = TrainConfig(data=DataConfig(batch_size=8, padding=0, flip_prob=0.0))
    images = torch.arange(40).view(40, 1, 1, 1).expand(40, 3, 32, 32).to(torch.uint8)
    run = tiny_run(rt, images.contiguous().pin_memory(), torch.arange(40).pin_memory(), cfg)
    seen = []
    for x, y, _ in run.loader.epoch(0):
        assert x.device.type == "cuda" and y.device.type == "cuda"
        seen += y.tolist()
        loss, _ = run.step_fn(x, y % 10)
        assert torch.isfinite(loss)
    assert sorted(seen) == list(range(40))
