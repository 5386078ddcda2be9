"""Where a loaded dataset's images live while a run trains (--data.placement): on the training
device when they fit in --data.memory-share of its free memory, else in pinned host memory (a
CUDA device then gets each batch copied without blocking), else on disk: an image folder's
decode cache, read a batch at a time (`DiskImages`) through pinned staging buffers
(`data.Staging`). Data that has no decode cache (CIFAR) and fits nowhere stops the run with the
image size that would fit."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
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


class DiskImages:
    """uint8 (N, 3, S, S) images that stay in a decode cache file: `rows` are the file rows of
    images 0..N-1 (a cache may hold rows that did not decode). Indexing reads (a CPU tensor);
    `read_into` reads a batch straight into a staging buffer, in file order.

    Read with positioned reads, not a memory map: a map counts every page it touches as the
    process's resident memory, which would grow to the size of the cache over an epoch; reads
    go through the page cache (a warm cache is served from memory all the same) and land
    directly in the buffer given, with no second copy. The file is opened when this is made,
    right after its header was checked, and read through that descriptor: a cache entry that
    another run prunes or replaces afterwards (--data.cache-dir shared, the folder changed)
    cannot change or cut short what this run reads.
    """

    def __init__(self, path: Path, offset: int, rows: np.ndarray, size: int):
        self.path, self.offset, self.size = Path(path), offset, size
        self.rows = np.asarray(rows, dtype=np.int64)
        self.row_bytes = 3 * size * size
        self.dtype, self.device = torch.uint8, torch.device("cpu")
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 3, self.size, self.size))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.row_bytes

    def __getitem__(self, key: slice | np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
        if isinstance(key, slice):
            span = range(len(self))[key]
            index = np.arange(span.start, span.stop, span.step)
        else:
            index = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        out = torch.empty((len(index), 3, self.size, self.size), dtype=torch.uint8)
        self.read_into(index, out)
        return out

    def split(self, rows: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), rows):
            yield self[i:i + rows]

    def _file(self) -> int:
        """The descriptor (a forked process shares it: positioned reads keep no file position;
        an unpickled copy opens the path again)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read_into(self, index: np.ndarray, out: torch.Tensor,
                  pool: Executor | None = None) -> None:
        """Images `index` into out[:len(index)]: the file rows in ascending order, each run of
        consecutive rows one read scattered to where its images go (os.preadv); with `pool`,
        the reads split into up to as many groups as it has threads, in flight at once (a cold
        cache is read several requests at a time, not one)."""
        if not len(index):
            return
        file_rows = self.rows[index]
        order = np.argsort(file_rows, kind="stable")
        ranked = file_rows[order]
        into = memoryview(out.numpy()).cast("B")
        row = self.row_bytes
        breaks = np.flatnonzero(np.diff(ranked) != 1) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        stops = np.concatenate([breaks, [len(ranked)]]).tolist()
        reads = [(lo, min(b, lo + IOV_MAX)) for a, b in zip(starts, stops)
                 for lo in range(a, b, IOV_MAX)]  # preadv takes at most IOV_MAX buffers
        fd = self._file()

        def read(group: list[tuple[int, int]]) -> None:
            for lo, hi in group:
                buffers = [into[k * row:(k + 1) * row] for k in order[lo:hi].tolist()]
                if os.preadv(fd, buffers, self.offset + int(ranked[lo]) * row) != (
                        hi - lo) * row:
                    raise UserError(f"the decode cache {self.path} ended early: it was "
                                    "cut short while the run read it; run again with --resume "
                                    "auto (a damaged cache is decoded again)")

        # a group reads at least GROUP_BYTES: below that, handing reads to threads costs more
        # than it overlaps (32 px batches: measured slower warm, barely faster cold)
        ways = min(len(reads), getattr(pool, "_max_workers", 1) if pool else 1,
                   max(1, len(index) * row // GROUP_BYTES))
        if ways <= 1:
            read(reads)
            return
        step = -(-len(reads) // ways)
        list(pool.map(read, [reads[i:i + step] for i in range(0, len(reads), step)]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


IOV_MAX = 1024
GROUP_BYTES = 1 << 20
