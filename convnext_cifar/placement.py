"""Where a loaded dataset's images live while a run trains: on the training device when they fit
in --data.memory-share of its free memory, else in pinned host memory (a CUDA device then gets
each batch copied without blocking), else the run stops with the image size that would fit."""

from __future__ import annotations

import dataclasses
import os

import torch

from convnext_cifar.datasets import HOST_MEMORY_SHARE, Dataset, Split
from convnext_cifar.errors import UserError


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` (the CPU: host memory available to this process)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_free_memory()


def host_free_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def too_big(need: int, room: int, share: float, size: int, count: int, where: str) -> UserError:
    """The one-line refusal, with the largest --data.image-size that would fit."""
    fits = int(size * (share * room / max(need, 1)) ** 0.5)
    advice = (f"use --data.image-size {fits} or less" if fits >= 32 else
              "use fewer images (--data.limit-train) or a machine with more memory")
    return UserError(f"the images need {need / 2**30:.2f} GB ({count} x 3 x {size} x {size} "
                     f"bytes), more than {share:.0%} of the {room / 2**30:.2f} GB free {where}; "
                     f"{advice}")


def pinned_bytes(n: int) -> int:
    """What pinned host memory of `n` bytes really takes: torch's caching host allocator
    rounds each block up to a power of two."""
    return 1 << max(n - 1, 0).bit_length()


def host_peak(split_bytes: list[int]) -> int:
    """The most host memory pinning takes: each split is copied into its pinned buffer while
    its original lives, then the original is freed, one split after the other."""
    peak, pinned, left = 0, 0, sum(split_bytes)
    for n in split_bytes:
        peak = max(peak, left + pinned + pinned_bytes(n))
        pinned, left = pinned + pinned_bytes(n), left - n
    return peak


def choose(need: int, device_free: int, host_free: int, share: float, cpu: bool,
           host_need: int | None = None) -> str:
    """"device" when `need` bytes fit in `share` of the device's free memory, else "host" when
    pinning them (`host_need` at its peak, default `need`) fits in HOST_MEMORY_SHARE of host
    memory (a GPU only: for the CPU the two are one), else ""."""
    if need <= share * device_free:
        return "device"
    if not cpu and (host_need or need) <= HOST_MEMORY_SHARE * host_free:
        return "host"
    return ""


def _splits(data: Dataset) -> list[Split]:
    return [s for s in (data.train, data.val) if s is not None]


def place(data: Dataset, device: torch.device, share: float) -> Dataset:
    """`data` on `device` if it fits in `share` of the free memory there, else in pinned host
    memory (a GPU only), else a UserError with the size that would fit."""
    splits = _splits(data)
    sizes = [t.numel() * t.element_size() for s in splits for t in (s.images, s.labels)]
    need = sum(sizes)
    cpu = device.type == "cpu"
    # on the CPU the images are already in memory: what is free besides them is what counts
    where = choose(need, free_memory(device) + (need if cpu else 0), host_free_memory(), share,
                   cpu, host_peak(sizes) - need)  # what pinning adds to what is held already
    if not where:
        raise too_big(need, free_memory(device), share, data.val.images.shape[-1],
                      sum(len(s) for s in splits),
                      f"on {device}" + ("" if cpu else " or in host memory"))
    for split in splits:  # one split at a time: each original is freed once it is moved
        split.images, split.labels = _move(split.images, device, where), _move(
            split.labels, device, where)
    notes = data.notes
    if where == "host":
        notes = notes + [f"the images ({need / 2**30:.2f} GB) do not fit in {share:.0%} of "
                         f"{device}'s free memory: they stay in pinned host memory and each "
                         "batch is copied over"]
    return dataclasses.replace(data, placement=where, notes=notes)


def _move(t: torch.Tensor, device: torch.device, where: str, chunk: int = 64 << 20
          ) -> torch.Tensor:
    """`t` on the device, or copied into pinned host memory a chunk at a time."""
    if where == "device":
        return t.to(device)
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    rows = max(1, chunk // max(t[0].numel() * t.element_size(), 1)) if t.ndim else 1
    for i in range(0, len(t), rows):
        pinned[i:i + rows].copy_(t[i:i + rows])
    return pinned
