"""Where and how a run computes: device, precision, compile, memory format, the backends'
flags (cuDNN autotuning, TF32, determinism); seeding.

`resolve_runtime` turns the config's `auto` settings into what this machine runs,
`configure_backends` sets torch's process-wide flags for it, and `prepare_model` puts a model
there.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError

if TYPE_CHECKING:  # read here, never built: the config stands on data/, above this module
    from convnext_cifar.config import TrainConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Measured with benchmarks/throughput.py on the 2-core CPU (benchmarks/RESULTS.md): compiling
# made pico 1.45x, nano 1.6x and Tiny 1.8x faster, but atto's loop no faster, while a cold
# compile costs about a minute per batch shape. `--compile auto` compiles on the CPU these sizes
# (femto, unmeasured, stays with atto).
# Compile modes that capture CUDA graphs: a graph replays into the same output buffers, and
# gradients accumulated over several replays before one optimizer step are not supported.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
CPU_COMPILE_MODELS = ("convnextv2_pico", "convnextv2_nano", "convnextv2_tiny", "convnextv2_base",
                      "convnextv2_large", "convnextv2_huge")


@dataclass(frozen=True)
class Runtime:
    """What the `auto` settings of a config resolve to on this machine."""

    device: torch.device
    precision: str
    compile: bool
    channels_last: bool
    compile_mode: str = "default"
    deterministic: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def as_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": self.precision, "compile": self.compile,
                "channels_last": self.channels_last, "torch": torch.__version__,
                **({"deterministic": True} if self.deterministic else {})}

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled model replays CUDA graphs (outputs live in reused buffers)."""
        return self.compile and self.device.type == "cuda" and self.compile_mode in CUDA_GRAPH_MODES


def device_problem(name: str) -> str:
    """Why the device `name` (a valid --device value) cannot be used here ('' if it can)."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return "CUDA is not available here"
        count, index = torch.cuda.device_count(), int(name.partition(":")[2] or 0)
        if index >= count:
            return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    if name == "mps" and not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
        return "MPS (Apple silicon) is not available to this torch"
    return ""


def resolve_device(name: str, dist: Dist | None = None) -> torch.device:
    """The torch device --device names: auto picks CUDA, then MPS, then the CPU; under
    torchrun `cuda` is this process's GPU (LOCAL_RANK). A device that is not here is one
    UserError."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if not device_problem("mps") else "cpu")
    if problem := device_problem(name):
        raise UserError(f"--device {name}: {problem}; use --device auto or cpu")
    if name == "cuda" and dist is not None and dist.enabled:
        name = f"cuda:{dist.local_rank}"  # one process per GPU, as torchrun's LOCAL_RANK says
    return torch.device(name)


def resolve_runtime(cfg: TrainConfig, dist: Dist | None = None) -> Runtime:
    device = resolve_device(cfg.device, dist)
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if cuda_has_bf16_units() else "fp16"
        else:  # bf16 autocast runs ~100x slower on CPUs without bf16 matrix units
            precision = "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"
    rt = Runtime(device, precision, _compile_on(cfg, device), cfg.channels_last,
                 cfg.compile_mode, cfg.deterministic)
    if rt.cuda_graphs and cfg.accum_steps(dist.world if dist is not None else 1) > 1:
        raise UserError(f"--compile-mode {cfg.compile_mode} replays CUDA graphs, which cannot "
                        "accumulate gradients over micro-batches (--optim.accum-steps "
                        f"{cfg.optim.accum_steps}, --data.micro-batch {cfg.data.micro_batch}); use "
                        "--compile-mode default, or one step per batch")
    return rt


def cuda_has_bf16_units() -> bool:
    """Whether the GPU computes bf16 natively (Ampere and later). torch's default answer
    counts emulation, which a T4 or V100 has: they run fp16 with a GradScaler instead."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_bf16_units(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX bf16 tiles (Sapphire Rapids and later), where bf16 autocast was
    measured faster than fp32 (Tiny: eager 90 -> 109 img/s, compiled 193 -> 222)."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def configure_backends(rt: Runtime) -> None:
    """torch's process-wide flags for `rt`: on a GPU cuDNN autotunes its kernels for the fixed
    shapes and matmuls/convolutions may use TF32 (set through the one API Inductor reads too);
    the run's GPU is made the current device once, here; `deterministic` picks deterministic
    kernels where torch has them instead of autotuning."""
    torch.use_deterministic_algorithms(rt.deterministic, warn_only=True)
    if rt.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
    if rt.device.type != "cuda":
        return
    torch.cuda.set_device(rt.device)  # cuda:N is the current device of every stream and event
    torch.backends.cudnn.benchmark = not rt.deterministic
    torch.backends.cudnn.deterministic = rt.deterministic
    torch.set_float32_matmul_precision("high")  # the legacy API: Inductor reads it
    torch.backends.cudnn.allow_tf32 = True


def _compile_on(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.compile == "off":
        return False
    if cfg.compile == "auto":
        if device.type == "cuda":
            return True
        if device.type != "cpu" or cfg.model.name not in CPU_COMPILE_MODELS:
            return False
    if device.type == "cpu" and not cpu_compiler_available():
        if cfg.compile == "on":
            raise UserError("--compile on: torch.compile on the CPU needs a C++ compiler (g++ or "
                            "clang++, or $CXX); install one or pass --compile off")
        print("note: no C++ compiler found, so the model runs uncompiled (slower); install g++ "
              "to compile it", file=sys.stderr)
        return False
    return True


def cpu_compiler_available() -> bool:
    """Inductor's CPU backend builds C++: is there a compiler to build it with?"""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def compiled(module: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """`module` compiled as the runtime says (static shapes: the last, smaller batch of an epoch
    gets its own graph once instead of a dynamic one for every batch), or as it is."""
    if not rt.compile:
        return module
    return torch.compile(module, dynamic=False, mode=rt.compile_mode)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from host memory to a GPU through pinned memory, without blocking."""
    if t.device == device:
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def prepare_model(model: torch.nn.Module, rt: Runtime) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move to the device and memory format; return (model, the module to call: maybe compiled)."""
    model = model.to(rt.device, memory_format=rt.memory_format)
    return model, compiled(model, rt)


# ---- running out of memory ----------------------------------------------------------------------

CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory",
                     "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: a GPU's out-of-memory error, or the CPU
    allocator's refusal (a RuntimeError there; an allocation the kernel lets through and
    later kills the process for is beyond any catching)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in CPU_OUT_OF_MEMORY))


def release_cached(device: torch.device) -> None:
    """Give back what an interrupted step left cached (after its exception is gone, so the
    tensors its frames held are freed)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
