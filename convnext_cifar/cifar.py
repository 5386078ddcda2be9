"""The CIFAR python-pickle layout (CIFAR-10's cifar-10-batches-py/, CIFAR-100's
cifar-100-python/): the official archive downloaded and checked, its batch files read with the
allow-list unpickler (a data file cannot run code), a copy that differs from the official files
noted once. What each dataset's files are is its `datasets.Cifar` description."""

from __future__ import annotations

import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from convnext_cifar.datasets import Dataset, Split, identity_of
from convnext_cifar.errors import UserError
from convnext_cifar.files import file_hash, load_array_pickle

if TYPE_CHECKING:
    from convnext_cifar.config import DataConfig
    from convnext_cifar.datasets import Cifar


def load(spec: Cifar, cfg: DataConfig, train: bool) -> Dataset:
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
    return [f"{folder} is not byte-identical to the official archive ({', '.join(differ)} "
            "differ); using it as it is"] if differ else []


def _copy_with_progress(source, target, total: int) -> None:
    """Copy a response to a file, showing progress on stderr: a live bar on a terminal, else a
    line every 10 % (of `total` bytes; 0: unknown, every 20 MB)."""
    live = sys.stderr.isatty()
    bar = task = None
    if live:
        from rich.console import Console
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        bar = Progress(*Progress.get_default_columns()[:-1], DownloadColumn(),
                       TransferSpeedColumn(), console=Console(stderr=True), transient=True)
        task = bar.add_task("download", total=total or None)
        bar.start()
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
