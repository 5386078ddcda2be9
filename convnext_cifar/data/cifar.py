"""The CIFAR python-pickle layout (CIFAR-10's cifar-10-batches-py/, CIFAR-100's
cifar-100-python/): the `Cifar` kind describing each dataset's files, the official archive
downloaded and checked, its batch files read with the allow-list unpickler (a data file cannot
run code), a copy that differs from the official files noted once.

Torch is imported where images are read, not at import time: config.py checks --data.dataset
against these descriptions, and `--help` must not import torch.
"""

from __future__ import annotations

import dataclasses
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convnext_cifar.data.dataset import Dataset, DatasetKind, Split, identity_of
from convnext_cifar.errors import UserError
from convnext_cifar.files import file_hash, first_time, load_array_pickle
from convnext_cifar.terminal import is_terminal, progress_bar

if TYPE_CHECKING:
    import torch

    from convnext_cifar.config import DataConfig


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
    hub_id: str | None = None  # the dataset on the Hugging Face Hub (model cards name it)

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
        label_key, names_key, num_classes = self.coarse_keys
        return dataclasses.replace(self, label_key=label_key, names_key=names_key,
                                   num_classes=num_classes)

    def prepare(self, cfg: DataConfig) -> None:
        ensure_folder(self, cfg.root, cfg.download)

    def load(self, cfg: DataConfig, train: bool, host_share: float) -> Dataset:
        return read(self.labelled(cfg.labels), cfg, train)


def read(spec: Cifar, cfg: DataConfig, train: bool) -> Dataset:
    """The test split (and with `train` the training split) under cfg.root, downloaded first
    when missing and allowed."""
    folder = ensure_folder(spec, cfg.root, cfg.download)
    fix = f"delete {folder} and download {spec.title} again (--data.download), or fix the copy"
    meta_path = folder / spec.meta_file
    meta = load_array_pickle(meta_path, fix) if meta_path.exists() else {}
    classes = [str(c) for c in meta.get(spec.names_key, [])] or [
        str(i) for i in range(spec.num_classes)]
    if len(classes) != spec.num_classes:
        raise UserError(f"{meta_path} names {len(classes)} classes, expected {spec.num_classes}")

    def split(names: tuple[str, ...], limit: int) -> Split:
        import torch

        parts = [_read_batch(folder / n, spec, fix) for n in names]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if limit:
            images, labels = images[:limit], labels[:limit]
        if len(images) == 0:
            raise UserError(f"{folder}: the {names[0]} split holds no images")
        return Split(images, labels)

    checksums = _checksums(spec, folder)
    return Dataset(
        val=split(spec.test_files, cfg.limit_val), classes=classes,
        mean=tuple(cfg.mean or spec.mean), std=tuple(cfg.std or spec.std),
        identity=identity_of(classes, _listed(spec.train_files, checksums),
                             _listed(spec.test_files + (spec.meta_file,), checksums)),
        train=split(spec.train_files, cfg.limit_train) if train else None,
        notes=_unofficial(spec, folder, checksums))


def _listed(names: tuple[str, ...], checksums: dict[str, str]) -> list[str]:
    return [f"{n} {checksums.get(n, 'missing')}" for n in names]


def _read_batch(path: Path, spec: Cifar, fix: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torch

    d = load_array_pickle(path, fix)
    if "data" not in d or spec.label_key not in d:
        raise UserError(f"{path} has no 'data'/'{spec.label_key}' entries; it is not a "
                        f"{spec.title} batch file")
    data = np.asarray(d["data"])
    labels = np.asarray(d[spec.label_key], dtype=np.int64)
    side = spec.size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side * side:
        raise UserError(f"{path}: 'data' is {data.dtype} {tuple(data.shape)}, expected uint8 "
                        f"(N, {3 * side * side}); the file is damaged, download {spec.title} "
                        "again")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(f"{path}: labels must be in [0, {spec.num_classes - 1}], found "
                        f"{labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, 3, side, side).copy())
    return images, torch.from_numpy(labels)


_checked: dict[tuple[Path, int, int], dict[str, str]] = {}


def _checksums(spec: Cifar, folder: Path) -> dict[str, str]:
    """MD5 of each of the layout's files present in `folder` (once per process and version of
    the folder's files)."""
    present = [n for n in spec.files_md5 if (folder / n).exists()]
    stats = [(folder / n).stat() for n in present]
    key = (folder.resolve(), sum(s.st_size for s in stats), max(
        (s.st_mtime_ns for s in stats), default=0))
    if key not in _checked:
        _checked[key] = {n: file_hash(folder / n, "md5") for n in present}
    return _checked[key]


def _unofficial(spec: Cifar, folder: Path, checksums: dict[str, str]) -> list[str]:
    """A warning when a local copy is not the official files."""
    differ = [n for n, md5 in checksums.items() if spec.files_md5[n] != md5]
    note = (f"{folder} is not byte-identical to the official archive ({', '.join(differ)} "
            "differ); using it as it is (said once for these files)")
    key = note + "".join(sorted(checksums.values()))  # other files in the folder: said again
    return [note] if differ and first_time(key) else []


def _copy_with_progress(source, target, total: int) -> None:
    """Copy a response to a file, showing progress on stderr: a live bar on a terminal, else a
    line every 10 % (of `total` bytes; 0: unknown, every 20 MB)."""
    bar = task = None
    if is_terminal(sys.stderr):
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        bar = progress_bar(*Progress.get_default_columns()[:-1], DownloadColumn(),
                           TransferSpeedColumn(), stderr=True)
        task = bar.add_task("download", total=total or None)
    done, shown = 0, 0
    step = total // 10 if total else 20 << 20
    try:
        while chunk := source.read(1 << 20):
            target.write(chunk)
            done += len(chunk)
            if bar is not None:
                bar.update(task, completed=done)
            elif done - shown >= step:
                shown = done
                of = f" of {total / 1e6:.0f} MB ({100 * done / total:.0f} %)" if total else ""
                print(f"  {done / 1e6:.0f} MB{of}", file=sys.stderr, flush=True)
    finally:
        if bar is not None:
            bar.stop()


def download(spec: Cifar, root: Path) -> None:
    """Download the official archive, check its MD5 and unpack it under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (Path(spec.url).name + ".part")
    print(f"downloading {spec.url} to {root} ...", file=sys.stderr)
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as r, open(tmp, "wb") as f:
            _copy_with_progress(r, f, int(getattr(r, "headers", {}).get("Content-Length") or 0))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {spec.title} ({e}); check the connection, or fetch "
                        f"{spec.url} by hand and unpack it into {root}") from None
    if (got := file_hash(tmp, "md5")) != spec.archive_md5:
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


def ensure_folder(spec: Cifar, root: Path, download_missing: bool) -> Path:
    """The dataset's folder under `root`, downloading it first when allowed and missing."""
    folder = Path(root) / spec.folder
    if not folder.is_dir():
        if not download_missing:
            raise UserError(f"{spec.title} not found: {folder} does not exist; pass --data.root "
                            f"to the folder that holds {spec.folder}/, or allow --data.download")
        download(spec, Path(root))
    return folder


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
    hub_id="uoft-cs/cifar10",
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
    hub_id="uoft-cs/cifar100",
    coarse_keys=("coarse_labels", "coarse_label_names", 20),
)
