"""runtime.py: what `auto` resolves to per device, when compiling is possible, TF32 and bf16
defaults, and what CUDA graphs refuse."""

import subprocess
import sys

import pytest
import torch

from convnext_cifar import runtime
from convnext_cifar.config import DataConfig, OptimConfig, TrainConfig
from convnext_cifar.errors import UserError
from convnext_cifar.runtime import Runtime, resolve_runtime


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
    asked = []

    def bf16(including_emulation=True):
        asked.append(including_emulation)
        return not including_emulation and native  # a T4/V100 emulates it: only that says yes

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    native = True
    rt = resolve_runtime(TrainConfig(device="cuda"))
    assert (rt.precision, rt.compile) == ("bf16", True)
    native = False  # emulated bf16 only: fp16 with a GradScaler
    assert resolve_runtime(TrainConfig(device="cuda")).precision == "fp16"
    assert asked == [False, False]


def test_cpu_compile_needs_a_compiler(monkeypatch, capsys):
    from convnext_cifar.errors import UserError

    monkeypatch.setattr(runtime, "cpu_compiler_available", lambda: False)
    assert not runtime.resolve_runtime(TrainConfig(device="cpu")).compile  # auto: falls back
    assert "no C++ compiler found" in capsys.readouterr().err
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        runtime.resolve_runtime(TrainConfig(device="cpu", compile="on"))
    monkeypatch.setattr(runtime, "cpu_compiler_available", lambda: True)
    assert runtime.resolve_runtime(TrainConfig(device="cpu")).compile


def test_cuda_graphs_refuse_gradient_accumulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    accumulating = TrainConfig(device="cuda", compile_mode="reduce-overhead",
                               optim=OptimConfig(accum_steps=2))
    with pytest.raises(UserError, match=r"reduce-overhead replays CUDA graphs, which cannot "
                                        r"accumulate gradients over micro-batches "
                                        r"\(--optim.accum-steps 2, --data.micro-batch 0\)"):
        resolve_runtime(accumulating)
    with pytest.raises(UserError, match=r"--data.micro-batch 32\)"):  # 4 micro-batches of 32
        resolve_runtime(TrainConfig(device="cuda", compile_mode="reduce-overhead",
                                    data=DataConfig(micro_batch=32)))
    assert resolve_runtime(TrainConfig(device="cuda", compile_mode="reduce-overhead")).cuda_graphs
    assert not resolve_runtime(TrainConfig(device="cpu", compile_mode="reduce-overhead",
                                           optim=OptimConfig(accum_steps=2))).cuda_graphs


def test_tf32_is_set_through_the_api_inductor_reads():
    code = ("import torch; from convnext_cifar.runtime import Runtime, configure_backends\n"
            "torch.cuda.set_device = lambda device: None  # no GPU here\n"
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


def test_the_runs_gpu_is_made_the_current_device_once(monkeypatch):
    """Streams and events of cuda:N (Staging's) are then cuda:N's, not cuda:0's."""
    made = []
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    runtime.configure_backends(Runtime(torch.device("cuda", 1), "bf16", False, True))
    runtime.configure_backends(Runtime(torch.device("cpu"), "fp32", False, True))
    assert made == [torch.device("cuda", 1)]


def test_running_out_of_memory_is_told_apart_from_other_errors():
    from convnext_cifar.runtime import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 70368744177664 bytes. Error code 12"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))
    try:  # what this machine's allocator raises for an impossible size
        torch.empty(2**62, dtype=torch.uint8)
    except Exception as e:  # noqa: BLE001
        assert is_out_of_memory(e), repr(e)
