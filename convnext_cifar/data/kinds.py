"""Which images a run uses: the registry of dataset kinds, and the `Dataset` a run loads.

`DATASETS` maps each `--data.dataset` name to a kind (data/dataset.py's `DatasetKind`) that
prepares the data (download, decode), loads it, names its classes, knows the size it stores
images at, its normalisation and its identity. This is the only module that knows the names:
adding a kind is one class and one entry here. The registry dispatches downward only: CIFAR's
pickles are read by cifar.py, image folders by folders.py, and placement.py puts what they read
on the training device, in pinned host memory, or leaves it in the decode cache.

No torch at import time: config.py checks --data.dataset against this registry, and `--help`
must not import torch (so the readers that need torch are imported where they are called).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from convnext_cifar.data.cifar import CIFAR10, CIFAR100
from convnext_cifar.data.dataset import Dataset, DatasetKind
from convnext_cifar.errors import UserError

if TYPE_CHECKING:
    import torch

    from convnext_cifar.config import DataConfig


class ImageFolder(DatasetKind):
    """root/train/<class>/<image> with root/val/ (or test/), or a held-out share of train/."""

    title = "image folder"

    def check(self, cfg: DataConfig) -> None:
        if cfg.labels != "fine":
            raise UserError(f"invalid --data.labels {cfg.labels!r}: an image folder's labels "
                            "are its class folders")

    def run_label(self, cfg: DataConfig) -> str:
        return Path(cfg.root).resolve().name or cfg.dataset  # the folder's own name says more

    def stored_size(self, cfg: DataConfig) -> int:
        return cfg.image_size  # decoded once at the training size

    def prepare(self, cfg: DataConfig) -> None:
        self.load(cfg, True, cfg.memory_share)

    def load(self, cfg: DataConfig, train: bool, host_share: float) -> Dataset:
        from convnext_cifar.data import folders

        return folders.load(cfg, train, host_share)


DATASETS: dict[str, DatasetKind] = {
    "cifar10": CIFAR10, "cifar100": CIFAR100, "folder": ImageFolder()}
"""Every `--data.dataset` name and its kind; the first is the default."""


# ---- what the rest of the package calls -------------------------------------------------------

def kind_of(cfg: DataConfig) -> DatasetKind:
    return DATASETS[cfg.dataset]


def hub_dataset(cfg: DataConfig) -> str | None:
    """The dataset's id on the Hugging Face Hub (a model card names it), or None."""
    return kind_of(cfg).hub_id


def stored_size(cfg: DataConfig) -> int:
    return kind_of(cfg).stored_size(cfg)


def normalisation(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std `cfg` gives, else the kind's standard values (a run records the values it
    used, so checkpoints always carry them)."""
    if cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    standard = kind_of(cfg).standard_normalisation()
    if standard is None:
        raise UserError(f"this config has no --data.mean/--data.std for its "
                        f"{kind_of(cfg).title}")
    return tuple(cfg.mean or standard[0]), tuple(cfg.std or standard[1])


def prepare_dataset(cfg: DataConfig) -> None:
    """What one process does before all of them load (under torchrun: rank 0 first)."""
    kind_of(cfg).prepare(cfg)


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu",
                 train: bool = True) -> Dataset:
    """The dataset `cfg` describes (its training split only when `train`), where
    --data.placement puts it (auto: on `device` when it fits in --data.memory-share of its free
    memory, else in pinned host memory, else an image folder's stays in its decode cache)."""
    import torch

    from convnext_cifar.data.placement import HOST_MEMORY_SHARE, place

    device = torch.device(device)
    host_share = cfg.memory_share if device.type == "cpu" else HOST_MEMORY_SHARE
    return place(kind_of(cfg).load(cfg, train, host_share), device, cfg.memory_share,
                 cfg.placement)
