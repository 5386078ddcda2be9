"""--data.micro-batch auto: the largest micro-batch that fits the device, the global batch kept.

The global batch (--data.batch-size) is the experiment; how each process splits its share of
it into micro-batches whose gradients add up is not. A fresh run tries the divisors of its
share, the whole share first, each with real training steps of the uncompiled model without
DDP (a rank that runs out of memory must not leave the others waiting in a collective), and
keeps the largest that fits:

- on a GPU: TRIAL_STEPS steps (the first allocates AdamW's moments) without an out-of-memory
  error and with a peak within the cap (--data.micro-batch-memory; default 90 % of the device's
  memory: room for the compiled graph's buffers and fragmentation);
- on the CPU an allocation too large for the machine is not an error but a process the kernel
  kills, so each candidate is first held against a budget (--data.micro-batch-memory; default
  half the memory available at the start): the weights, their gradients and AdamW moments, the
  EMA's and the teacher's weights, the batch, and the bytes a forward keeps for its backward,
  counted tensor by tensor at 1 and 2 images and scaled (a lower bound of the step's peak:
  hence half). The largest within it is then tried for real, as on a GPU.

Every component the trial steps touch is restored (probe.restored), so the run trains as the
run with that micro-batch set by hand (--data.micro-batch N) does, bit for bit. Under torchrun
every rank tries on its own device and all take the smallest choice. The choice is recorded in
the training state with the device it was made on: a resume there keeps it, a resume on
another device chooses again (the global batch, and so the experiment, stays).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from convnext_cifar.config import TrainConfig
from convnext_cifar.data.placement import host_free_memory
from convnext_cifar.errors import UserError
from convnext_cifar.model.optim import set_lr
from convnext_cifar.runtime import Runtime, cpu_name, is_out_of_memory, release_cached
from convnext_cifar.training.build import Run
from convnext_cifar.training.probe import restored, touched
from convnext_cifar.training.step import TrainStep

TRIAL_STEPS = 2
GPU_SHARE = 0.9  # of a GPU's memory, by default
CPU_SHARE = 0.5  # of the host memory available at the start, by default
GIB = 2**30


def size(n: float) -> str:
    """Bytes in words: GiB from one on, MiB below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def candidates(share: int) -> list[int]:
    """The micro-batches a process's share of `share` images splits into evenly, largest first."""
    return [share // k for k in range(1, share + 1) if share % k == 0]


def memory_cap(device: torch.device, gib: float) -> int:
    """Bytes a training step may take: `gib` (--data.micro-batch-memory), else the default share
    of the GPU's memory or of the host memory available now."""
    if gib > 0:
        return int(gib * GIB)
    if device.type == "cuda":
        return int(GPU_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return int(CPU_SHARE * host_free_memory())


def device_name(run: Run) -> str:
    """What a choice holds for: the device's model and memory, the processes, the cap given."""
    device = run.rt.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / GIB:.1f} GiB)"
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        where = f"{device.type} {cpu_name()} ({total / GIB:.1f} GiB)"
    cap = run.cfg.data.micro_batch_memory
    return (f"{where} x {run.dist.world} process(es)"
            + (f", --data.micro-batch-memory {cap:g}" if cap else ""))


def kept_bytes(model: torch.nn.Module, x: torch.Tensor, rt: Runtime) -> int:
    """Bytes of the tensors a training forward of `x` keeps for its backward, each storage
    once; the weights are not counted (they are there anyway)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rt.autocast():
        out = model(x)
    del out
    return sum(kept.values())


def step_estimate(run: Run, x: torch.Tensor) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of a training step: the weights with their gradients
    and two AdamW moments, the EMA's and teacher's weights, the batch `x`; and what a forward
    keeps per image (measured at 1 and 2 images; its constant part goes to the fixed bytes)."""
    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*module.parameters(), *module.buffers()))

    one, two = kept_bytes(run.model, x[:1], run.rt), kept_bytes(run.model, x[:2], run.rt)
    fixed = 4 * nbytes(run.model) + x.numel() * x.element_size() + (2 * one - two)
    if run.ema is not None:
        fixed += nbytes(run.ema.module)
    if run.teacher is not None:
        fixed += nbytes(run.teacher.loaded.model)
    return fixed, max(two - one, 1)


def trial(step: TrainStep, x: torch.Tensor, y: torch.Tensor, n: int, cap: int
          ) -> tuple[bool, str]:
    """Whether TRIAL_STEPS steps of `step` on the batch run (on a GPU: within `cap` bytes at
    their peak); why not, in words."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    failed = False
    try:
        for _ in range(TRIAL_STEPS):
            step(x, y, n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - only running out of memory is a "no"
        if not is_out_of_memory(e):
            raise
        failed = True
    step.optimizer.zero_grad(set_to_none=True)  # the error (and what its frames held) is gone
    release_cached(device)
    if failed:
        return False, "out of memory"
    if device.type == "cuda" and (peak := torch.cuda.max_memory_allocated(device)) > cap:
        return False, f"a peak of {size(peak)}, over the {size(cap)} cap"
    return True, ""


def trial_batch(run: Run, share: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first batch of the first epoch, as a step gets it, repeated up to a full share."""
    x, y, n = next(iter(run.loader.epoch(0)))
    if len(x) < share:  # a dataset smaller than a batch
        rows = torch.arange(share, device=x.device) % len(x)
        x, y = x[rows], y[rows]
    return x, y, n


def choose(run: Run) -> dict[str, Any]:
    """Try the candidates (restoring everything the trials touch); the choice to record. Every
    rank takes the smallest choice of all."""
    cfg, dist, device = run.cfg, run.dist, run.rt.device
    share = cfg.data.batch_size // dist.world
    cap = memory_cap(device, cfg.data.micro_batch_memory)
    with restored(touched(run)):
        set_lr(run.step_fn.optimizer, 0.0)  # the trial steps change nothing that stays
        chosen, tried = _search(run, share, cap)
    most = dist.all_reduce_max(torch.tensor([share // chosen if chosen else share + 1],
                                            device=device))
    accum = int(most.item())
    if accum > share:
        raise UserError(_none_fits(run, tried))
    return {"micro_batch": share // accum, "accum_steps": accum, "device": device_name(run),
            "memory_cap": cap, "tried": tried}


def _search(run: Run, share: int, cap: int) -> tuple[int, list[dict[str, Any]]]:
    """The largest candidate that fits (0: none) and what each one tried did."""
    x, y, n = trial_batch(run, share)
    tried: list[dict[str, Any]] = []
    estimate = None
    if run.rt.device.type != "cuda":
        try:
            estimate = step_estimate(run, x)
        except Exception as e:  # noqa: BLE001 - only running out of memory is a "no"
            if not is_out_of_memory(e):
                raise
            return 0, [{"micro_batch": 1, "fits": False, "why": "out of memory"}]
    for rows in candidates(share):
        if estimate is not None and (need := estimate[0] + estimate[1] * rows) > cap:
            tried.append({"micro_batch": rows, "fits": False,
                          "why": f"an estimated {size(need)}, over the {size(cap)} budget"})
            continue
        step = TrainStep(run.model, run.step_fn.optimizer, run.rt, run.step_fn.loss_fn,
                         run.cfg.optim.clip_grad_norm, share // rows, teacher=run.teacher)
        fits, why = trial(step, x, y, n, cap)
        tried.append({"micro_batch": rows, "fits": fits, **({"why": why} if why else {})})
        if fits:
            return rows, tried
    return 0, tried


def _none_fits(run: Run, tried: list[dict[str, Any]]) -> str:
    last = tried[-1]["why"] if tried else "nothing tried"
    return (f"--data.micro-batch auto: not even 1 image a step fits {run.rt.device} ({last}); "
            "use a smaller --model.name or --data.image-size, or give the step more room with "
            "--data.micro-batch-memory GIB")


def with_micro_batch(cfg: TrainConfig, choice: dict[str, Any] | None) -> TrainConfig:
    """`cfg` with the micro-batch a recorded choice made (unchanged without auto or a choice)."""
    if cfg.data.micro_batch != "auto" or not choice:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                            micro_batch=choice["micro_batch"]))


def micro_batch_of(found: tuple[Any, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The choice a training state recorded (None: none, or no state)."""
    return None if found is None else found[1]["components"]["run"].get("micro_batch")


def applied(run: Run, choice: dict[str, Any]) -> Run:
    """The run stepping in the chosen micro-batches (its config says which)."""
    if run.rt.cuda_graphs and choice["accum_steps"] > 1:
        raise UserError(f"--data.micro-batch auto: only {choice['micro_batch']} images a step fit "
                        f"{run.rt.device}, and --compile-mode {run.cfg.compile_mode} replays CUDA "
                        "graphs, which cannot accumulate gradients; use --compile-mode default")
    run.step_fn.accum_steps = choice["accum_steps"]
    run.step_fn.compiled_rows = choice["micro_batch"]
    if run.teacher is not None:
        run.teacher.compiled_rows = choice["micro_batch"]
    return dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, data=dataclasses.replace(
        run.cfg.data, micro_batch=choice["micro_batch"])))


def resolve_auto_micro_batch(run: Run, recorded: dict[str, Any] | None
                             ) -> tuple[Run, dict[str, Any] | None, str]:
    """--data.micro-batch auto: the recorded choice where it was made on this device (the run's
    config already holds it), else a new one. Returns the run, the choice, and what to say."""
    asked = run.cfg.data.micro_batch  # auto, or the recorded choice with_micro_batch put there
    if asked != "auto" and (recorded is None or asked != recorded["micro_batch"]):
        return run, None, ""  # not auto (a resume may set the micro-batch by hand)
    here = device_name(run)
    elsewhere = recorded is not None and run.dist.any(recorded["device"] != here, run.rt.device)
    if recorded is not None and not elsewhere:
        # kept; applied again, which refuses it under a compile mode changed to CUDA graphs
        return applied(run, recorded), recorded, choice_line(recorded, run.cfg)
    choice = choose(run)
    line = choice_line(choice, run.cfg)
    if recorded is not None:
        line += (f"; chosen again: the run chose {recorded['micro_batch']} on "
                 f"{recorded['device']} (the batch, and so the experiment, stays)")
    return applied(run, choice), choice, line


def choice_line(choice: dict[str, Any], cfg: TrainConfig) -> str:
    """The choice in words."""
    rejected = [t for t in choice["tried"] if not t["fits"]]
    why = ("; " + ", ".join(str(t["micro_batch"]) for t in rejected) + " did not fit ("
           + rejected[-1]["why"] + ")") if rejected else ""
    return (f"--data.micro-batch auto: {choice['micro_batch']} images a step, "
            f"{choice['accum_steps']} accumulation step(s) per process for the batch of "
            f"{cfg.data.batch_size}, on {choice['device']}{why}")
