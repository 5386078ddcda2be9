"""The training and evaluation batches, made on the device from device-resident uint8 images.

A training batch is a gather from a seeded per-epoch permutation, then the zero-padded random
crop and horizontal flip of every image at once (augment.crop_flip), then an optional transform
of the whole global batch (augment.BatchAugment), then normalisation. No DataLoader, no
per-image Python.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convnext_cifar.augment import BatchPart, crop_flip, draw_crop_flip
from convnext_cifar.config import DataConfig
from convnext_cifar.distributed import Dist
from convnext_cifar.runtime import to_device


class Generators:
    """The loader's random sources, reseeded each epoch and saved in its state.

    `on_device` draws per-pixel and per-image values on the training device; `host` draws the
    few values that must be known on the host without reading the device (MixUp's per-batch
    lambda and box, used to slice).
    """

    def __init__(self, device: torch.device, order_device: torch.device | None = None):
        self.on_device = torch.Generator(device=device)
        self.host = np.random.default_rng(0)
        # The epoch's permutation is drawn where the images are: on the device, from
        # `on_device` itself; for images kept in host memory, from a CPU generator of its own.
        self.order = (self.on_device
                      if order_device is None or order_device == torch.device(device)
                      else torch.Generator(device=order_device))

    def seed(self, seed: int, epoch: int) -> None:
        self.on_device.manual_seed(seed * 1_000_003 + epoch)
        if self.order is not self.on_device:
            self.order.manual_seed(seed * 1_000_003 + epoch)
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

class Normalize:
    """uint8 (or 0-255 float) batch -> float, normalised, resized to `size`, in the chosen
    memory format."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int,
                 device: torch.device | str, channels_last: bool):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.size = size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.inv_std
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=self.memory_format)


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-image sampling weights giving every present class the same total (1 / its count)."""
    counts = torch.bincount(labels)
    return (1.0 / counts.double().clamp(min=1))[labels]


class DeviceLoader:
    """Training batches from device-resident data: seeded permutation, batched augmentation.

    With `dist`, every rank draws the same permutation and the same augmentation parameters for
    the whole global batch and takes its own slice of it, so N processes see exactly the images
    and augmentations one process sees with the same global batch. `transform` (MixUp, ...) is
    applied to the whole global batch before it is sliced, drawing from this loader's generator.

    Stateful: `state_dict()` holds the generators, so a run interrupted mid-epoch continues with
    the very draws it would have made (`load_state_dict`, then `epoch(e, start=batch)`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, seed: int,
                 normalize: Normalize, dist: Dist | None = None,
                 transform: BatchTransform | None = None):
        self.images, self.labels, self.cfg, self.seed = images, labels, cfg, seed
        self.normalize, self.transform = normalize, transform
        self.dist = dist or Dist()
        self.device = normalize.mean.device  # where batches are made: the training device
        self.generators = Generators(self.device, images.device)
        self._resume_state: dict[str, Any] | None = None

    def __len__(self) -> int:
        n, b = len(self.images), self.cfg.batch_size
        return n // b if self.cfg.drop_last and n >= b else math.ceil(n / b)

    def _order(self, gens: Generators) -> torch.Tensor:
        """The epoch's image order: a permutation, or with --data.sampler balanced as many draws
        (with replacement) with each class equally likely, from the same seeded generator."""
        n, device = len(self.images), self.images.device
        if self.cfg.sampler != "balanced":
            return torch.randperm(n, generator=gens.order, device=device)
        weights = balanced_weights(self.labels.to(device))
        return torch.multinomial(weights, n, replacement=True, generator=gens.order)

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
        if start:
            if self._resume_state is None:
                raise ValueError("starting mid-epoch needs the generator state of a saved run")
            gens.load_state_dict(self._resume_state)
        self._resume_state = None
        b, cfg = self.cfg.batch_size, self.cfg
        for i in range(start, len(self)):
            idx = order[i * b:(i + 1) * b]
            # drawn for the whole global batch, so that every rank's slice sees its own draws
            offsets, flips = draw_crop_flip(len(idx), cfg.padding, cfg.flip_prob, gens.on_device)
            lo, hi = self.dist.shard(len(idx))
            if self.transform is None:  # crop/flip only this rank's slice
                images, labels = self._gather(idx[lo:hi])
                x = crop_flip(images, cfg.padding, cfg.flip_prob, gens.on_device,
                              (offsets[lo:hi], flips[lo:hi]))
                y = labels
            else:
                x, y = self._transformed(idx, offsets, flips, lo, hi, epoch)
            yield self.normalize(x), y, len(idx)

    def _transformed(self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                     lo: int, hi: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows lo:hi of the global batch `idx` through the transform, every draw made for the
        whole batch: a transform that says which rows it needs (`rows(n, lo, hi)`: BatchAugment)
        gets just those, any other the whole global batch."""
        cfg, gens, n = self.cfg, self.generators, len(idx)
        rows = self.transform.rows(n, lo, hi) if hasattr(self.transform, "rows") else None
        if rows is None or len(rows) == n:  # one process (or every row needed): all of it
            images, labels = self._gather(idx)
            x = crop_flip(images, cfg.padding, cfg.flip_prob, gens.on_device, (offsets, flips))
            x, y = self.transform(x, labels, gens, epoch)
            return x[lo:hi], y[lo:hi]
        pick = torch.from_numpy(rows)
        images, labels = self._gather(idx[to_device(pick, idx.device)])
        on = to_device(pick, offsets.device)
        x = crop_flip(images, cfg.padding, cfg.flip_prob, gens.on_device, (offsets[on], flips[on]))
        return self.transform(x, labels, gens, epoch, BatchPart(n, lo, hi, rows))

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images and labels on the training device."""
        return to_device(self.images[idx], self.device), to_device(self.labels[idx], self.device)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 normalize: Normalize) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image exactly once, in order, unaugmented, on the normalisation's device."""
    device = normalize.mean.device
    for i in range(0, len(images), batch_size):
        yield (normalize(to_device(images[i:i + batch_size], device)),
               to_device(labels[i:i + batch_size], device))
