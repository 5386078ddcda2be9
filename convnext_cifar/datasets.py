"""Which images a run uses: one registry of dataset kinds, and the `Dataset` a run loads.

`DATASETS` maps each `--data.dataset` name to a kind object that prepares the data (download,
decode), loads it, names its classes, knows the size it stores images at, its normalisation and
its identity (the class list plus a fingerprint of its files). This is the only module that
knows the names: adding a kind is one class and one entry here. The kinds do their reading in
cifar.py (the CIFAR python-pickle layout) and folders.py (image folders); placement.py puts what
they read on the training device or in pinned host memory.

No torch at import time: config.py checks --data.dataset against this registry, and `--help`
must not import torch.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convnext_cifar.errors import UserError

if TYPE_CHECKING:
    import torch

    from convnext_cifar.config import DataConfig
    from convnext_cifar.placement import DiskImages

HOST_MEMORY_SHARE = 0.8  # of host memory, for images a GPU has no room for


@dataclass
class Split:
    """One split of a dataset: uint8 (N, 3, S, S) images (a tensor, or `placement.DiskImages`
    read from a decode cache) and int64 (N,) labels; `files` are the images' paths relative to
    the dataset's root where the kind reads files (folders); `histogram` the (3, 256) pixel
    counts per channel where the kind has them without reading the images."""

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
    placement: str = "device"  # or "host" (pinned), or "disk" (a decode cache): see placement.py

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def identity_of(classes: list[str], train: list[str] | None, val: list[str]) -> dict[str, Any]:
    """A dataset's identity: its class names in label order and a fingerprint of each split's
    files (one line each: a folder image's path below the root, a CIFAR file's name and
    checksum), so a moved but identical dataset keeps its identity. `train` is None where the
    training split was not listed (evaluation)."""

    def fingerprint(lines: list[str]) -> str:
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    return {"classes": list(classes), "train": None if train is None else fingerprint(train),
            "val": fingerprint(val)}


def identity_difference(recorded: dict[str, Any], found: dict[str, Any],
                        splits: tuple[str, ...] = ("train", "val")) -> str:
    """What differs between two identities, in words ('' when nothing does); a split missing
    from either is not compared."""
    old, new = recorded.get("classes", []), found.get("classes", [])
    if old != new:
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        if not missing and not extra:
            return "the same class names in another order"
        return (f"classes missing: {', '.join(missing) or 'none'}; classes not in the run: "
                f"{', '.join(extra) or 'none'}")
    changed = [s for s in splits if recorded.get(s) and found.get(s)
               and recorded[s] != found[s]]
    return " and ".join(f"the {s} files (fingerprint {recorded[s]} -> {found[s]})"
                        for s in changed)


class DatasetKind(ABC):
    """What every kind of dataset provides; one subclass per kind, one entry in DATASETS."""

    title: str  # for messages: "CIFAR-10", "image folder"

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


@dataclass(frozen=True)
class Cifar(DatasetKind):
    """A dataset in the CIFAR python-pickle layout, and where its official archive lives."""

    title: str  # "CIFAR-10"
    folder: str  # under --data.root
    url: str
    archive_md5: str
    files_md5: dict[str, str]  # every file of the folder, as the official archive has it
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str  # in each batch file
    names_key: str  # in the meta file
    num_classes: int
    mean: tuple[float, float, float]  # of the training images, on 0-255 pixels
    std: tuple[float, float, float]
    coarse_keys: tuple[str, str, int] | None = None  # label key, names key, classes
    size: int = 32  # the layout's images are 32 x 32

    def check(self, cfg: DataConfig) -> None:
        if cfg.placement == "disk":
            raise UserError(f"invalid --data.placement 'disk': {self.title} is read into memory "
                            "whole (it is small); disk placement streams an image folder's "
                            "decode cache (--data.dataset folder); use auto, device or host")
        if cfg.labels == "coarse" and self.coarse_keys is None:
            raise UserError(f"invalid --data.labels 'coarse': {self.title} has no coarse "
                            "labels")

    def run_label(self, cfg: DataConfig) -> str:
        return cfg.dataset

    def stored_size(self, cfg: DataConfig) -> int:
        return self.size

    def standard_normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    def labelled(self, labels: str) -> Cifar:
        """This layout read with `labels` (CIFAR-100's 20 coarse superclasses, or fine)."""
        if labels != "coarse" or self.coarse_keys is None:
            return self
        import dataclasses

        label_key, names_key, num_classes = self.coarse_keys
        return dataclasses.replace(self, label_key=label_key, names_key=names_key,
                                   num_classes=num_classes)

    def prepare(self, cfg: DataConfig) -> None:
        from convnext_cifar import cifar

        cifar.ensure_folder(self, cfg.root, cfg.download)

    def load(self, cfg: DataConfig, train: bool, host_share: float) -> Dataset:
        from convnext_cifar import cifar

        return cifar.load(self.labelled(cfg.labels), cfg, train)


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
        from convnext_cifar import folders

        return folders.load(cfg, train, host_share)


CIFAR10 = Cifar(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    files_md5={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    train_files=("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    mean=(125.307, 122.961, 113.8575),
    std=(51.5865, 50.847, 51.255),
)

CIFAR100 = Cifar(
    title="CIFAR-100",
    folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    files_md5={
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    mean=(129.304, 124.070, 112.434),  # MMPretrain's _base_/datasets/cifar100_bs16.py
    std=(68.170, 65.392, 70.418),
    coarse_keys=("coarse_labels", "coarse_label_names", 20),
)

DATASETS: dict[str, DatasetKind] = {
    "cifar10": CIFAR10, "cifar100": CIFAR100, "folder": ImageFolder()}
"""Every `--data.dataset` name and its kind; the first is the default."""


# ---- what the rest of the package calls -------------------------------------------------------

def kind_of(cfg: DataConfig) -> DatasetKind:
    return DATASETS[cfg.dataset]


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

    from convnext_cifar.placement import place

    device = torch.device(device)
    host_share = cfg.memory_share if device.type == "cpu" else HOST_MEMORY_SHARE
    return place(kind_of(cfg).load(cfg, train, host_share), device, cfg.memory_share,
                 cfg.placement)
