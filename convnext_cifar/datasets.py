"""Which images a run uses: one small description per dataset and one `load_dataset`.

A dataset ends up as uint8 NCHW images and int64 labels per split, on the training device, with
its class names and the mean/std that normalise it. Adding a dataset means adding a description
here (and its name to `config.DATASETS`), nothing else.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convnext_cifar.config import DataConfig
from convnext_cifar.errors import UserError
from convnext_cifar.files import load_array_pickle


@dataclass(frozen=True)
class CifarSpec:
    """A dataset in the CIFAR python-pickle layout, and where its official archive lives."""

    title: str  # for messages: "CIFAR-10"
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


CIFAR10 = CifarSpec(
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

DATASETS: dict[str, CifarSpec] = {"cifar10": CIFAR10}


@dataclass
class Dataset:
    """Both splits as uint8 NCHW images and int64 labels on one device, and how to read them."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    notes: list[str] = field(default_factory=list)  # warnings to show once the run starts

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu",
                 train: bool = True) -> Dataset:
    """The dataset `cfg.dataset` names, on `device` (the train split only when `train`)."""
    spec = DATASETS[cfg.dataset]
    return load_cifar(spec, cfg, device, train)


# ---- the CIFAR pickle layout --------------------------------------------------------------------

def load_cifar(spec: CifarSpec, cfg: DataConfig, device: torch.device | str,
               train: bool) -> Dataset:
    folder = cifar_folder(spec, cfg.root, cfg.download)
    fix = f"delete {folder} and download {spec.title} again (--data.download), or fix the copy"
    meta_path = folder / spec.meta_file
    meta = load_array_pickle(meta_path, fix) if meta_path.exists() else {}
    classes = [str(c) for c in meta.get(spec.names_key, [])] or [
        str(i) for i in range(spec.num_classes)]
    if len(classes) != spec.num_classes:
        raise UserError(f"{meta_path} names {len(classes)} classes, expected {spec.num_classes}")

    def split(names: tuple[str, ...], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_batch(folder / n, spec, fix) for n in names]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if limit:
            images, labels = images[:limit], labels[:limit]
        if len(images) == 0:
            raise UserError(f"{folder}: the {names[0]} split holds no images")
        return images.to(device), labels.to(device)

    if train:
        train_images, train_labels = split(spec.train_files, cfg.limit_train)
    else:
        train_images = torch.empty(0, 3, 32, 32, dtype=torch.uint8, device=device)
        train_labels = torch.empty(0, dtype=torch.int64, device=device)
    test_images, test_labels = split(spec.test_files, cfg.limit_val)
    return Dataset(train_images, train_labels, test_images, test_labels, classes,
                   tuple(cfg.mean or spec.mean), tuple(cfg.std or spec.std),
                   _unofficial(spec, folder))


def _read_batch(path: Path, spec: CifarSpec, fix: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    d = load_array_pickle(path, fix)
    if "data" not in d or spec.label_key not in d:
        raise UserError(f"{path} has no 'data'/'{spec.label_key}' entries; it is not a "
                        f"{spec.title} batch file")
    data = np.asarray(d["data"])
    labels = np.asarray(d[spec.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' is {data.dtype} {tuple(data.shape)}, expected uint8 "
                        f"(N, 3072); the file is damaged, download {spec.title} again")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(f"{path}: labels must be in [0, {spec.num_classes - 1}], found "
                        f"{labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unofficial(spec: CifarSpec, folder: Path) -> list[str]:
    """A warning when a local copy is not the official files (checked once per folder)."""
    if folder not in _checked:
        differ = [n for n, md5 in spec.files_md5.items()
                  if (folder / n).exists() and _md5(folder / n) != md5]
        _checked[folder] = [f"{folder} is not byte-identical to the official archive "
                            f"({', '.join(differ)} differ); using it as it is"] if differ else []
    return _checked[folder]


_checked: dict[Path, list[str]] = {}


def download_cifar(spec: CifarSpec, root: Path) -> None:
    """Download the official archive, check its MD5 and unpack it under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (Path(spec.url).name + ".part")
    print(f"downloading {spec.url} to {root} ...", file=sys.stderr)
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {spec.title} ({e}); check the connection, or fetch "
                        f"{spec.url} by hand and unpack it into {root}") from None
    if (got := _md5(tmp)) != spec.archive_md5:
        tmp.unlink(missing_ok=True)
        raise UserError(f"downloaded archive has MD5 {got}, expected {spec.archive_md5}; "
                        "try again (the download was corrupted)")
    with tarfile.open(tmp, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith(spec.folder + "/") and ".." not in m.name]
        for m in members:
            target = root / m.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                dst.write(src.read())
    tmp.unlink()


def cifar_folder(spec: CifarSpec, root: Path, download: bool) -> Path:
    """The dataset's folder under `root`, downloading it first when allowed and missing."""
    folder = Path(root) / spec.folder
    if not folder.is_dir():
        if not download:
            raise UserError(f"{spec.title} not found: {folder} does not exist; pass --data.root "
                            f"to the folder that holds {spec.folder}/, or allow --data.download")
        download_cifar(spec, Path(root))
    return folder
