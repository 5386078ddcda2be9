"""What every dataset kind produces and every other module reads: `Split` and `Dataset`, the
dataset's identity (its classes and a fingerprint of its files), and `DatasetKind`, what a kind
of dataset provides (data/kinds.py registers them).

No torch at import time: the command line reads the kinds through config.py.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from convnext_cifar.config import DataConfig
    from convnext_cifar.data.cache import DiskImages


@dataclass
class Split:
    """One split of a dataset: uint8 (N, 3, S, S) images (a tensor, or `cache.DiskImages` read
    from a decode cache) and int64 (N,) labels; `files` are the images' paths relative to the
    dataset's root where the kind reads files (folders); `histogram` the (3, 256) pixel counts
    per channel where the kind has them without reading the images."""

    images: torch.Tensor | DiskImages
    labels: torch.Tensor
    files: list[str] = field(default_factory=list)
    histogram: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """What a run reads: the held-out split, the training split when it was asked for, the class
    names, the mean/std that normalise the images, and the dataset's identity."""

    val: Split
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: dict[str, Any]
    train: Split | None = None
    notes: list[str] = field(default_factory=list)  # warnings to show once the run starts
    placement: str = "device"  # or "host" (pinned), or "disk" (a decode cache): placement.py

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def identity_of(classes: list[str], train: list[str] | None, val: list[str]) -> dict[str, Any]:
    """A dataset's identity: its class names in label order and a fingerprint of each split's
    files (one line each: a folder image's path below the root, a CIFAR file's name and
    checksum), so a moved but identical dataset keeps its identity. `train` is None where the
    training split was not listed (evaluation)."""

    def fingerprint(lines: list[str]) -> str:
        return hashlib.sha256(os.fsencode("\n".join(lines))).hexdigest()[:16]  # names as bytes

    return {"classes": list(classes), "train": None if train is None else fingerprint(train),
            "val": fingerprint(val)}


def class_difference(expected: Sequence[str], found: Sequence[str], missing: str, extra: str,
                     reordered: str = "the same class names in another order") -> str:
    """'' when the two class lists are equal; else `reordered` when they hold the same names, or
    '<missing>: names only in expected; <extra>: names only in found' (none for an empty side)."""
    if list(expected) == list(found):
        return ""
    gone, more = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if not gone and not more:
        return reordered
    return f"{missing}: {', '.join(gone) or 'none'}; {extra}: {', '.join(more) or 'none'}"


def identity_difference(recorded: dict[str, Any], found: dict[str, Any],
                        splits: tuple[str, ...] = ("train", "val")) -> str:
    """What differs between two identities, in words ('' when nothing does); a split missing
    from either is not compared."""
    if classes := class_difference(recorded.get("classes", []), found.get("classes", []),
                                   "classes missing", "classes not in the run"):
        return classes
    changed = [s for s in splits if recorded.get(s) and found.get(s)
               and recorded[s] != found[s]]
    return " and ".join(f"the {s} files (fingerprint {recorded[s]} -> {found[s]})"
                        for s in changed)


class DatasetKind(ABC):
    """What every kind of dataset provides; one subclass per kind, one entry in kinds.DATASETS."""

    title: str  # for messages: "CIFAR-10", "image folder"
    hub_id: str | None = None  # the dataset's id on the Hugging Face Hub, where it has one

    def check(self, cfg: DataConfig) -> None:  # noqa: B027 (most kinds accept every option)
        """Refuse options this kind cannot honour (a UserError naming the option)."""

    @abstractmethod
    def run_label(self, cfg: DataConfig) -> str:
        """The dataset part of the default run name."""

    @abstractmethod
    def stored_size(self, cfg: DataConfig) -> int:
        """The side of the images as this kind stores them (before any resize on the device)."""

    def standard_normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The kind's standard (mean, std) on 0-255 pixels, or None (measured when loading)."""
        return None

    @abstractmethod
    def prepare(self, cfg: DataConfig) -> None:
        """What one process does before all of them load: download, decode into a cache."""

    @abstractmethod
    def load(self, cfg: DataConfig, train: bool, host_share: float) -> Dataset:
        """The held-out split (and the training split when `train`) in host memory; the
        decoded images must fit in `host_share` of it."""
