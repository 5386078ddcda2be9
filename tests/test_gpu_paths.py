"""The CUDA paths, tested on the CPU where they can be (fakes stand in for what only a GPU
does), and on a GPU by the `cuda`-marked tests that benchmarks/gpu_check.py runs."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import small_run_args
from test_engine import CPU, needs_cuda, tiny_model, tiny_run

from convnext_cifar import cli
from convnext_cifar.checkpoints import find_states
from convnext_cifar.config import DataConfig, OptimConfig, SchedConfig, TrainConfig
from convnext_cifar.engine import TrainStep, Window, cross_entropy_sum
from convnext_cifar.errors import UserError
from convnext_cifar.evaluate import evaluate, predict_logits
from convnext_cifar.optim import build_optimizer
from convnext_cifar.placement import choose, host_peak, pinned_bytes
from convnext_cifar.runtime import Runtime, prepare_model, resolve_runtime


class ReplayedOutput(torch.nn.Module):
    """Stands in for a CUDA-graph replay: every call writes its result into one buffer."""

    def __init__(self, model):
        super().__init__()
        self.model, self.buffer, self.calls = model, None, []

    def forward(self, x):
        out = self.model(x)
        self.calls.append(len(x))
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = torch.empty_like(out)
        return self.buffer.copy_(out)


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append(len(x))
        return self.model(x)


def test_flip_tta_keeps_the_first_output_when_a_replay_overwrites_it():
    model = tiny_model().eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = predict_logits(model, x, CPU, "flip")
        got = predict_logits(ReplayedOutput(model), x, CPU, "flip")
    torch.testing.assert_close(got, want)


def test_cuda_graphs_refuse_gradient_accumulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    accumulating = TrainConfig(device="cuda", compile_mode="reduce-overhead",
                               optim=OptimConfig(accum_steps=2))
    with pytest.raises(UserError, match="reduce-overhead replays CUDA graphs, which cannot "
                                        "accumulate gradients over --optim.accum-steps 2"):
        resolve_runtime(accumulating)
    assert resolve_runtime(TrainConfig(device="cuda", compile_mode="reduce-overhead")).cuda_graphs
    assert not resolve_runtime(TrainConfig(device="cpu", compile_mode="reduce-overhead",
                                           optim=OptimConfig(accum_steps=2))).cuda_graphs


def test_the_tail_batch_runs_uncompiled_in_training_and_in_evaluation():
    rt = Runtime(torch.device("cpu"), "fp32", compile=True, channels_last=True)
    model, _ = prepare_model(tiny_model(), Runtime(torch.device("cpu"), "fp32", False, True))
    graph = Counting(model)  # stands in for the compiled module: counts what it is given
    step = TrainStep(graph, build_optimizer(model, OptimConfig(), rt.device), rt,
                     cross_entropy_sum(0.0), 5.0, eager=model, compiled_rows=8)
    for n in (8, 8, 3):  # two full batches and the epoch's tail
        step(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    assert graph.calls == [8, 8]  # the tail never reached the graph: no second compile
    graph.calls.clear()
    evaluate(graph, torch.randint(0, 256, (19, 3, 32, 32), dtype=torch.uint8),
             torch.randint(0, 10, (19,)), 8, tiny_run(CPU, *_data(8), TrainConfig()).normalize,
             rt, 10, eager=model)
    assert graph.calls == [8, 8]


def _data(n):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,))


def test_tf32_is_set_through_the_api_inductor_reads():
    code = ("import torch; from convnext_cifar.runtime import Runtime, configure_backends\n"
            "configure_backends(Runtime(torch.device('cuda'), 'fp32', True, True))\n"
            "print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,"
            " torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())\n"
            "configure_backends(Runtime(torch.device('cuda'), 'fp32', True, True, "
            "deterministic=True))\n"
            "print(torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, "
            "torch.are_deterministic_algorithms_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["high", "tf32", "True", "False", "False", "True", "True"]


def test_pinning_is_counted_with_its_power_of_two_blocks_and_one_split_at_a_time():
    gb = 2**30
    assert pinned_bytes(5 * gb) == 8 * gb and pinned_bytes(4 * gb) == 4 * gb
    # 5 GB of training images then 1 GB held out: the peak is while the first is copied
    assert host_peak([5 * gb, 1 * gb]) == 6 * gb + 8 * gb
    assert choose(6 * gb, 2 * gb, 100 * gb, 0.8, cpu=False, host_need=8 * gb) == "host"
    assert choose(6 * gb, 2 * gb, 9 * gb, 0.8, cpu=False, host_need=8 * gb) == ""


def test_fp16_overflow_steps_are_counted_not_averaged_into_the_norm():
    window = Window(torch.device("cpu"))
    for norm in (2.0, float("inf"), 4.0, float("nan")):
        window.add(torch.tensor(1.0), torch.tensor(norm), 10)
    record = window.flush(1, 4, 1e-3)
    assert record["grad_norm"] == 3.0 and record["skipped_steps"] == 2
    window.add(torch.tensor(1.0), torch.tensor(5.0), 10)
    assert "skipped_steps" not in window.flush(1, 5, 1e-3)


def test_a_real_fp16_overflow_logs_a_finite_norm_and_the_skip(tmp_path):
    rt = Runtime(torch.device("cpu"), "fp16", compile=False, channels_last=True)
    cfg = TrainConfig(data=DataConfig(batch_size=8), sched=SchedConfig(epochs=2, warmup_epochs=1))
    run = tiny_run(rt, *_data(16), cfg)
    run.step_fn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**80)  # overflows at once
    window = Window(rt.device)
    for x, y, n in run.loader.epoch(0):
        window.add(*run.step_fn(x, y, n), n)
    record = window.flush(1, 2, 1e-3)
    assert record["skipped_steps"] >= 1 and record["grad_norm"] == record["grad_norm"]


def test_bf16_is_the_cpu_default_only_with_amx(tmp_path, monkeypatch):
    from convnext_cifar import runtime

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    assert runtime.cpu_has_bf16_units(info)
    info.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert not runtime.cpu_has_bf16_units(info)
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: True)
    assert resolve_runtime(TrainConfig(device="cpu")).precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)
    assert resolve_runtime(TrainConfig(device="cpu")).precision == "fp32"


def test_a_state_from_another_kind_of_device_is_refused_in_one_line(cifar_root, tmp_path, capsys):
    args = small_run_args(cifar_root, tmp_path, "--sched.epochs", "2", "--data.limit-train",
                          "100", "--data.limit-val", "50", "--deterministic")
    assert cli.main(args + ["--sched.warmup-epochs", "0"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["deterministic"] is True
    state_file = find_states(tmp_path)[0]  # the state after epoch 1
    state = torch.load(state_file, weights_only=True)
    state["components"]["loader"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a GPU's
    gpu_state = tmp_path / "gpu" / state_file.name
    gpu_state.parent.mkdir()
    torch.save(state, gpu_state)
    capsys.readouterr()
    resume = args + ["--sched.warmup-epochs", "0", "--work-dir", str(tmp_path / "gpu"),
                     "--resume", str(gpu_state)]
    assert cli.main(resume) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "another kind of device" in err and err.count("\n") <= 2
    assert cli.main(resume + ["--resume-allow-changes", "--no-deterministic"]) == 0
    assert "they start afresh here" in capsys.readouterr().err


# ---- on a GPU (benchmarks/gpu_check.py runs these) ---------------------------------------------

@pytest.mark.cuda
@needs_cuda
def test_cuda_graphs_keep_flip_tta_and_a_compiled_tail_free_run():
    rt = Runtime(torch.device("cuda"), "bf16", compile=True, channels_last=True,
                 compile_mode="reduce-overhead")
    model, forward = prepare_model(tiny_model(), rt)
    model.eval()
    x = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = predict_logits(model, x, rt, "flip")
        for _ in range(3):  # warm-up replays, then the graph
            replayed = predict_logits(forward, x, rt, "flip")
    torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@needs_cuda
def test_cuda_pinned_placement_copies_one_split_at_a_time():
    from convnext_cifar.datasets import Dataset, Split
    from convnext_cifar.placement import place

    images, labels = _data(64)
    data = Dataset(Split(images, labels), ["a"] * 10, (0.0,) * 3, (1.0,) * 3, {},
                   train=Split(images.clone(), labels.clone()))
    placed = place(data, torch.device("cuda"), 1e-12)  # a share nothing fits in: host memory
    assert placed.placement == "host" and placed.train.images.is_pinned()
    assert torch.equal(placed.val.images, images)


@pytest.mark.cuda
@needs_cuda
def test_cuda_batches_are_the_same_from_device_pinned_host_and_disk(tmp_path):
    """Every draw on the GPU, the images gathered there, or staged from pinned host memory or
    from a cache file through the reader thread and copied without blocking: equal batches."""
    import numpy as np

    from convnext_cifar.augment import build_batch_transform
    from convnext_cifar.config import AugConfig
    from convnext_cifar.data import DeviceLoader, Normalize
    from convnext_cifar.placement import DiskImages

    cuda = torch.device("cuda")
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    path = tmp_path / "cache.bin"
    path.write_bytes(b"\0" * 16 + images.numpy().tobytes())
    sources = {"device": (images.to(cuda), labels.to(cuda)),
               "host": (images.pin_memory(), labels.pin_memory()),
               "disk": (DiskImages(path, 16, np.arange(300), 32), labels)}
    transform = build_batch_transform(AugConfig(mixup_alpha=0.8, randaugment="rand-m9"), 10,
                                      (0.0,) * 3, (1.0,) * 3)
    cfg = DataConfig(batch_size=64, sampler="balanced")
    normalize = Normalize((0.0,) * 3, (1.0,) * 3, 32, cuda, True)
    batches = {name: [(x.cpu(), y.cpu()) for x, y, _ in DeviceLoader(
        *source, cfg, 0, normalize, transform=transform).epoch(3)]
        for name, source in sources.items()}
    for name in ("host", "disk"):
        for (x, y), (x0, y0) in zip(batches[name], batches["device"]):
            assert torch.equal(x, x0) and torch.equal(y, y0), name
