"""The training and evaluation batches, made on the device from uint8 images.

A training batch is a gather from a seeded per-epoch permutation, then the zero-padded random
crop and horizontal flip of every image at once (augment.crop_flip), then an optional transform
of the whole global batch (augment.BatchAugment), then normalisation. No DataLoader, no
per-image Python. Images on the training device are gathered there; images in host memory or
on disk (placement.py) are gathered one batch ahead into pinned staging buffers (`Staging`).
`training_loader` builds a run's loader the one way `train` and the report's preview use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from convnext_cifar.data.augment import BatchPart, build_batch_transform, crop_flip, draw_crop_flip
from convnext_cifar.data.cache import DiskImages
from convnext_cifar.data.dataset import Dataset
from convnext_cifar.distributed import Dist
from convnext_cifar.runtime import to_device

if TYPE_CHECKING:
    from convnext_cifar.config import DataConfig, TrainConfig


class Generators:
    """The loader's random sources, reseeded each epoch and saved in its state.

    `on_device` draws per-pixel and per-image values on the training device; `host` draws the
    few values that must be known on the host without reading the device (MixUp's per-batch
    lambda and box, used to slice).
    """

    def __init__(self, device: torch.device):
        self.on_device = torch.Generator(device=device)
        self.host = np.random.default_rng(0)

    def seed(self, seed: int, epoch: int) -> None:
        self.on_device.manual_seed(seed * 1_000_003 + epoch)
        self.host = np.random.default_rng([seed, epoch])

    def fits(self, state: dict[str, Any]) -> bool:
        """Whether a saved state continues on this device: a CPU generator's state cannot
        become a GPU's (Mersenne Twister vs Philox), nor the other way."""
        return state["generator"].numel() == self.on_device.get_state().numel()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.on_device.get_state(),
                "host": json.dumps(self.host.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fits(state):  # else: drawn on another kind of device (allowed by the resume)
            self.on_device.set_state(state["generator"])
        if "host" in state:  # states written before the host generator existed did not use it
            self.host.bit_generator.state = json.loads(state["host"])


BatchTransform = Callable[[torch.Tensor, torch.Tensor, Generators, int],
                          tuple[torch.Tensor, torch.Tensor]]
"""(images, labels, generators, epoch) -> (images, targets) of a whole global batch.

Images come in as uint8 after crop/flip and may leave as float on the same 0-255 scale; targets
may leave as class indices or as per-class probabilities (N, classes). Every random draw comes
from `generators`, so that each rank and a resumed run draw the same numbers. A transform that
also has `rows(n, lo, hi)` (the global rows that rows lo:hi depend on) is given just those rows
under several processes, and a fifth argument, the `augment.BatchPart`, to say which they are.
"""


# ---- normalisation and batches ---------------------------------------------------------------

class Normalize(torch.nn.Module):
    """uint8 (or 0-255 float) batch -> float, normalised, resized to `size`, in the chosen
    memory format. A module (mean and 1/std are buffers), so that an exported model can take it
    in front of the network."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int,
                 device: torch.device | str, channels_last: bool):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, device=device).view(1, 3, 1, 1))
        self.size = size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.inv_std
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=self.memory_format)


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-image sampling weights giving every present class the same total (1 / its count)."""
    counts = torch.bincount(labels)
    return (1.0 / counts.double().clamp(min=1))[labels]


class DeviceLoader:
    """Training batches: seeded permutation, batched augmentation on the training device.

    With `dist`, every rank draws the same permutation and the same augmentation parameters for
    the whole global batch and takes its own slice of it, so N processes see exactly the images
    and augmentations one process sees with the same global batch. `transform` (MixUp, ...) is
    applied to the whole global batch before it is sliced, drawing from this loader's generator.
    Every draw, the permutation included, is made on the training device, wherever the images
    live, so device, host and disk placement give the same batches.

    Stateful: `state_dict()` holds the generators, so a run interrupted mid-epoch continues with
    the very draws it would have made (`load_state_dict`, then `epoch(e, start=batch)`).
    """

    def __init__(self, images: torch.Tensor | DiskImages, labels: torch.Tensor,
                 cfg: DataConfig, seed: int, normalize: Normalize, dist: Dist | None = None,
                 transform: BatchTransform | None = None):
        self.images, self.labels, self.cfg, self.seed = images, labels, cfg, seed
        self.normalize, self.transform = normalize, transform
        self.dist = dist or Dist()
        self.device = normalize.mean.device  # where batches are made: the training device
        self.generators = Generators(self.device)
        self._resume_state: dict[str, Any] | None = None
        self._row_plan: dict[tuple[int, torch.device],
                             tuple[slice | np.ndarray, slice | torch.Tensor]] = {}
        # images not on the training device (pinned host memory, a decode cache) are staged
        self.staging = (Staging(images, labels, self.device, cfg.batch_size)
                        if off_device(images, self.device) else None)

    def __len__(self) -> int:
        n, b = len(self.images), self.cfg.batch_size
        return n // b if self.cfg.drop_last and n >= b else math.ceil(n / b)

    def _order(self, gens: Generators) -> torch.Tensor:
        """The epoch's image order: a permutation, or with --data.sampler balanced as many draws
        (with replacement) with each class equally likely, from the same seeded generator."""
        n = len(self.images)
        if self.cfg.sampler != "balanced":
            return torch.randperm(n, generator=gens.on_device, device=self.device)
        weights = balanced_weights(to_device(self.labels, self.device))
        return torch.multinomial(weights, n, replacement=True, generator=gens.on_device)

    def _rows(self, n: int, device: torch.device
              ) -> tuple[slice | np.ndarray, slice | torch.Tensor]:
        """Which rows of a global batch of n this rank gathers, and the same as an index on
        `device`: its own slice lo:hi; all of them for a transform of the whole batch; or the
        rows a transform with `rows(n, lo, hi)` (BatchAugment) says rows lo:hi depend on. Made
        once per batch size and device (no work and no copy to the device per step)."""
        key = (n, device)
        if key not in self._row_plan:
            lo, hi = self.dist.shard(n)
            if self.transform is None:
                rows = slice(lo, hi)
            else:
                rows = self.transform.rows(n, lo, hi) if hasattr(self.transform, "rows") else None
                if rows is None or len(rows) == n:
                    rows = slice(0, n)
            self._row_plan[key] = rows, rows if isinstance(rows, slice) else to_device(
                torch.from_numpy(rows), device)
        return self._row_plan[key]

    def state_dict(self) -> dict[str, Any]:
        return self.generators.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_state = state

    def epoch(self, epoch: int, start: int = 0
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(images, targets, global batch size) of `epoch` (0-based) from batch `start` on; the
        same seed and epoch give the same batches.

        Starting mid-epoch continues from the generator state `load_state_dict` gave (the state
        saved after batch start-1), batch for batch.
        """
        gens = self.generators
        gens.seed(self.seed, epoch)
        order = self._order(gens)
        if self.staging is not None:  # gathered on the host: the order is read there, once
            order = order.cpu()
        if start:
            if self._resume_state is None:
                raise ValueError("starting mid-epoch needs the generator state of a saved run")
            gens.load_state_dict(self._resume_state)
        self._resume_state = None
        b, cfg = self.cfg.batch_size, self.cfg
        batches = [order[i * b:(i + 1) * b] for i in range(start, len(self))]
        for idx, (images, labels) in zip(batches, self._gathered(batches)):
            n = len(idx)
            # drawn for the whole global batch, so that every rank's slice sees its own draws
            offsets, flips = draw_crop_flip(n, cfg.padding, cfg.flip_prob, gens.on_device)
            rows, on = self._rows(n, offsets.device)
            x = crop_flip(images, cfg.padding, cfg.flip_prob, gens.on_device,
                          (offsets[on], flips[on]))
            y = labels
            if isinstance(rows, np.ndarray):  # the rows this rank's slice depends on
                lo, hi = self.dist.shard(n)
                x, y = self.transform(x, labels, gens, epoch, BatchPart(n, lo, hi, rows))
            elif self.transform is not None:  # the whole global batch, then this rank's slice
                lo, hi = self.dist.shard(n)
                x, y = self.transform(x, labels, gens, epoch)
                x, y = x[lo:hi], y[lo:hi]
            yield self.normalize(x), y, n

    def _take(self, idx: torch.Tensor) -> torch.Tensor:
        """The images (global indices) this rank gathers of the global batch `idx`."""
        return idx[self._rows(len(idx), idx.device)[1]]

    def _gathered(self, batches: list[torch.Tensor]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch's images and labels (the rows this rank takes) on the training device:
        gathered there, or staged one batch ahead from host memory or disk."""
        takes = (self._take(idx) for idx in batches)
        if self.staging is not None:
            yield from self.staging.stream(takes)
            return
        for take in takes:  # index_select: on the CPU ~9x faster than images[take], same bytes
            yield self.images.index_select(0, take), self.labels.index_select(0, take)


DISK_READERS = 4  # reads in flight from a decode cache (benchmarks/placement.py: cold cache)


def off_device(images: torch.Tensor | DiskImages, device: torch.device) -> bool:
    """Whether batches of `images` are staged (host memory, disk) rather than gathered on
    `device` itself."""
    return isinstance(images, DiskImages) or images.device != device


class Staging:
    """Batches gathered from images off the training device (pinned host memory, or a decode
    cache on disk) into two staging buffers, one batch ahead of the step, by a reader thread,
    each sent to the device without blocking.

    The reader fills one buffer while the step uses the other. On a GPU the buffers are pinned
    and a buffer is filled again only once its last copy to the device has finished (an event
    recorded on the device's stream after the copy; blocking, so the waiting reader sleeps
    instead of spinning a core); another device (MPS) gets each batch copied before it is used;
    on the CPU the batch is the buffer itself. The process holds the two buffers, never the
    dataset: resident memory is bounded by them.
    """

    def __init__(self, images: torch.Tensor | DiskImages, labels: torch.Tensor,
                 device: torch.device, rows: int):
        self.images, self.labels, self.device = images, labels.cpu(), device
        pin = device.type == "cuda"
        shape = (rows, *images.shape[1:])
        self.buffers = [(torch.empty(shape, dtype=torch.uint8, pin_memory=pin),
                         torch.empty(rows, dtype=torch.int64, pin_memory=pin)) for _ in range(2)]
        # on a GPU, an event per buffer, recorded after each copy from it (made once, reused)
        self.copied = [torch.cuda.Event(blocking=True) for _ in range(2)] if pin else None

    def read(self, take: torch.Tensor, k: int, pool: ThreadPoolExecutor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels `take` into buffer k (waiting for its last copy to finish); from
        disk with `pool`'s threads."""
        if self.copied is not None:  # (an event not yet recorded returns at once)
            self.copied[k].synchronize()
        images, labels = (t[:len(take)] for t in self.buffers[k])
        # this thread's own grad mode: buffers made under inference_mode (eval) are written in it
        with torch.inference_mode():
            if isinstance(self.images, DiskImages):
                self.images.read_into(take.numpy(), images, pool)
            else:
                torch.index_select(self.images, 0, take, out=images)
            torch.index_select(self.labels, 0, take, out=labels)
        return images, labels

    def stream(self, takes: Iterable[torch.Tensor]
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device for each index tensor of `takes`, in order; batch
        i+1 is read while batch i is used."""
        takes = iter(takes)
        disk = isinstance(self.images, DiskImages)
        with ThreadPoolExecutor(1, thread_name_prefix="staging") as reader, ThreadPoolExecutor(
                DISK_READERS if disk else 1, thread_name_prefix="disk") as pool:
            first = next(takes, None)
            pending = None if first is None else reader.submit(self.read, first, 0, pool)
            k = 0
            while pending is not None:
                images, labels = pending.result()
                following = next(takes, None)
                pending = (None if following is None
                           else reader.submit(self.read, following, 1 - k, pool))
                if self.device.type != "cpu":  # a GPU without blocking; MPS copies as it goes
                    pinned = self.copied is not None
                    images = images.to(self.device, non_blocking=pinned)
                    labels = labels.to(self.device, non_blocking=pinned)
                if self.copied is not None:  # on cuda:N's own stream, not the current device's
                    self.copied[k].record(torch.cuda.current_stream(self.device))
                yield images, labels
                k = 1 - k


def eval_batches(images: torch.Tensor | DiskImages, labels: torch.Tensor, batch_size: int,
                 normalize: Normalize, lo: int = 0, hi: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images lo:hi (default: all) exactly once, in order, unaugmented, on the normalisation's
    device; images off the device (host memory, disk) staged one batch ahead."""
    device = normalize.mean.device
    starts = range(lo, len(images) if hi is None else hi, batch_size)
    stops = [min(i + batch_size, starts.stop) for i in starts]
    if off_device(images, device):
        batches = Staging(images, labels, device, batch_size).stream(
            torch.arange(i, j) for i, j in zip(starts, stops))
    else:
        batches = ((images[i:j], labels[i:j]) for i, j in zip(starts, stops))
    for x, y in batches:
        yield normalize(x), y


def training_loader(cfg: TrainConfig, data: Dataset, device: torch.device, channels_last: bool,
                    dist: Dist | None = None) -> DeviceLoader:
    """The training batches `cfg` describes for `data` on `device`: its normalisation, its
    augmentation and its seed; `train` builds its loader so, and the report previews the batch
    the model receives first through the same builder."""
    normalize = Normalize(data.mean, data.std, cfg.data.image_size, device, channels_last)
    transform = build_batch_transform(cfg.aug, data.num_classes, data.mean, data.std)
    return DeviceLoader(data.train.images, data.train.labels, cfg.data, cfg.seed, normalize,
                        dist, transform)
