"""Where a loaded dataset's images live while a run trains (--data.placement): on the training
device when they fit in --data.memory-share of its free memory, else in pinned host memory (a
CUDA device then gets each batch copied without blocking), else on disk: an image folder's
decode cache, read a batch at a time (`cache.DiskImages`) through pinned staging buffers
(`loader.Staging`). Data that has no decode cache (CIFAR) and fits nowhere stops the run with
the image size that would fit."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from convnext_cifar.data.cache import DiskImages
from convnext_cifar.data.dataset import Dataset, Split
from convnext_cifar.errors import UserError

HOST_MEMORY_SHARE = 0.8  # of host memory, for images a GPU has no room for


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


def too_big(need: int, room: int, share: float, size: int, count: int, where: str,
            instead: str | None = None) -> UserError:
    """The one-line refusal, with the largest --data.image-size that would fit (or `instead`,
    another option that would do)."""
    fits = int(size * (share * room / max(need, 1)) ** 0.5)
    advice = (f"use --data.image-size {fits} or less" if fits >= 32 else
              "use fewer images (--data.limit-train) or a machine with more memory")
    if instead:
        advice = f"use {instead}, or {advice.removeprefix('use ')}"
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
           host_need: int | None = None, disk: bool = False) -> str:
    """"device" when `need` bytes fit in `share` of the device's free memory, else "host" when
    pinning them (`host_need` at its peak, default `need`) fits in HOST_MEMORY_SHARE of host
    memory (a GPU only: for the CPU the two are one), else "disk" where the images can stay
    in their decode cache (`disk`), else ""."""
    if need <= share * device_free:
        return "device"
    if not cpu and (host_need or need) <= HOST_MEMORY_SHARE * host_free:
        return "host"
    return "disk" if disk else ""


def _splits(data: Dataset) -> list[Split]:
    return [s for s in (data.train, data.val) if s is not None]


def place(data: Dataset, device: torch.device, share: float, placement: str = "auto"
          ) -> Dataset:
    """`data` where `placement` says; "auto": on `device` if it fits in `share` of the free
    memory there, else in pinned host memory (a GPU only), else left on disk where it is read
    from a decode cache, else a UserError with the size that would fit."""
    splits = _splits(data)
    sizes = [t.nbytes for s in splits for t in (s.images, s.labels)]
    need = sum(sizes)
    cpu = device.type == "cpu"
    on_disk = all(isinstance(s.images, DiskImages) for s in splits)
    # on the CPU, images already in memory are not counted against what is free besides them
    held = 0 if on_disk else need
    device_free = free_memory(device) + (held if cpu else 0)
    host_need = (pinned_bytes(need) if on_disk else host_peak(sizes)) - held
    size, count = data.val.images.shape[-1], sum(len(s) for s in splits)
    if placement == "disk" and not on_disk:
        raise UserError("invalid --data.placement 'disk': these images have no decode cache to "
                        "read from (an image folder's, in a writable --data.cache-dir); use "
                        "--data.placement auto")
    if cpu and placement == "host":  # the CPU's memory is the host's: nothing to pin
        placement = "device"
    host_free = host_free_memory()
    if placement == "auto":
        where = choose(need, device_free, host_free, share, cpu, host_need, on_disk)
        if not where:
            raise too_big(need, free_memory(device), share, size, count,
                          f"on {device}" + ("" if cpu else " or in host memory"))
    elif placement == "device" and need > share * device_free:
        raise too_big(need, device_free, share, size, count, f"on {device}",
                      "--data.placement auto" if on_disk or not cpu else None)
    elif placement == "host" and host_need > HOST_MEMORY_SHARE * host_free:
        raise too_big(host_need, host_free, HOST_MEMORY_SHARE, size, count, "in host memory",
                      "--data.placement disk" if on_disk else None)
    else:
        where = placement
    if where != "disk":
        for split in splits:  # one split at a time: each original is freed once it is moved
            split.images, split.labels = _move(split.images, device, where), _move(
                split.labels, device, where)
    notes = data.notes
    if where == "host" and placement == "auto":
        notes = notes + [f"the images ({need / 2**30:.2f} GB) do not fit in {share:.0%} of "
                         f"{device}'s free memory: they stay in pinned host memory and each "
                         "batch is copied over"]
    elif where == "disk" and placement == "auto":
        notes = notes + [f"the images ({need / 2**30:.2f} GB) fit in neither {device}'s nor "
                         "host memory: each batch is read from the decode cache on disk "
                         f"({data.train.images.path if data.train else data.val.images.path})"]
    return dataclasses.replace(data, placement=where, notes=notes)


def _move(t: torch.Tensor | DiskImages, device: torch.device, where: str,
          chunk: int = 64 << 20) -> torch.Tensor:
    """`t` on the device, or copied into (pinned) host memory a chunk at a time."""
    if where == "device" and not isinstance(t, DiskImages):
        return t.to(device)
    pin = where == "host" and device.type == "cuda"
    into = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin,
                       device=device if where == "device" else "cpu")
    rows = max(1, chunk // max(t.nbytes // max(len(t), 1), 1)) if t.shape else 1
    for i in range(0, len(t), rows):
        if isinstance(t, DiskImages) and into.device.type == "cpu":  # read straight in
            t.read_into(np.arange(i, min(i + rows, len(t))), into[i:i + rows])
        else:
            into[i:i + rows].copy_(t[i:i + rows])
    return into
