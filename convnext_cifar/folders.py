"""Image folders: root/train/<class>/<image> with root/val/ (or test/), or a held-out share of
train/. The files are listed, decoded once in parallel worker processes (images.py) at the
training size and cached under root/.convnext-cifar-cache/, keyed by everything that changes
the decoded images."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from convnext_cifar.datasets import Dataset, Split, identity_of
from convnext_cifar.errors import UserError
from convnext_cifar.files import atomic_write_bytes
from convnext_cifar.images import is_image, read_images
from convnext_cifar.placement import host_free_memory, too_big

if TYPE_CHECKING:
    from convnext_cifar.config import DataConfig

FOLDER_CACHE = ".convnext-cifar-cache"
CACHE_VERSION = 1
KEEP_CACHES = 3  # per split, newest first


def load(cfg: DataConfig, train: bool, host_share: float) -> Dataset:
    """The folder's held-out split (and with `train` its training split); the decoded images
    must fit in `host_share` of host memory."""
    root = Path(cfg.root)
    if not (root / "train").is_dir():
        raise UserError(f"image folder {root} has no train/ folder; lay it out as "
                        f"{root}/train/<class>/<image> with {root}/val/<class>/<image> (or "
                        "test/), or pass --data.root to such a folder")
    classes, train_files = list_classes(root / "train")
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if val_dir is not None:
        val_classes, val_files = list_classes(val_dir)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise UserError(f"{root}/train and {val_dir} have different classes (only in "
                            f"train: {', '.join(only_train) or 'none'}; only in {val_dir.name}: "
                            f"{', '.join(only_val) or 'none'}); give both the same class folders")
    elif cfg.val_fraction > 0:
        train_files, val_files = stratified_split(train_files, cfg.val_fraction, cfg.split_seed)
    else:
        raise UserError(f"image folder {root} has no val/ or test/ folder; add one, or hold out "
                        "part of train/ with --data.val-fraction 0.1")
    train_files = _limit(train_files, cfg.limit_train, cfg.split_seed)
    val_files = _limit(val_files, cfg.limit_val, cfg.split_seed)
    size, notes = cfg.image_size, []
    count = len(train_files) * train + len(val_files)
    need = count * 3 * size * size
    if need > host_share * host_free_memory():
        raise too_big(need, host_free_memory(), host_share, size, count, "in host memory")
    train_split = decode_split(root, "train", train_files, cfg, notes) if train else None
    val_split = decode_split(root, "val", val_files, cfg, notes)
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:  # no standard values: measured on the training images
        measured = channel_stats((train_split or val_split).images)
        mean, std = mean or measured[0], std or measured[1]
    skip = len(str(root)) + 1
    listed = [f"{f.path[skip:]}\t{f.label}" for f in train_files + val_files]
    return Dataset(val=val_split, classes=classes, mean=tuple(mean), std=tuple(std),
                   identity=identity_of(classes, listed), train=train_split, notes=notes)


class ImageFile(NamedTuple):
    """An image of a folder dataset: its path, class index, and what the cache key notes."""

    path: str
    label: int
    size: int
    mtime_ns: int


def list_classes(split_dir: Path) -> tuple[list[str], list[ImageFile]]:
    """Sorted class folder names and every image file under them (recursively) with its
    class index, in a fixed order."""
    classes = sorted(p.name for p in split_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} holds no class folders; put each class's images in "
                        f"{split_dir}/<class>/")
    files = []
    for index, name in enumerate(classes):
        found = _image_files(str(split_dir / name))
        if not found:
            raise UserError(f"class folder {split_dir / name} holds no images (.png, .jpg, "
                            ".jpeg, .bmp, .webp, .gif); add some or remove the folder")
        files += [ImageFile(path, index, size, mtime) for path, size, mtime in found]
    return classes, files


def _image_files(folder: str) -> list[tuple[str, int, int]]:
    """(path, bytes, mtime) of the image files under `folder`, sorted; one stat each."""
    found, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(entry.path)
                elif entry.is_file() and is_image(Path(entry.name)):
                    st = entry.stat()
                    found.append((entry.path, st.st_size, st.st_mtime_ns))
    return sorted(found)


def stratified_split(files: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): `fraction` of each class (at least one image, if it has two) held out,
    chosen by a seeded permutation; both keep the files' order."""
    generator = torch.Generator().manual_seed(seed)
    held: set[int] = set()
    by_class: dict[int, list[int]] = {}
    for i, file in enumerate(files):
        label = file[1]
        by_class.setdefault(label, []).append(i)
    for _, members in sorted(by_class.items()):
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        order = torch.randperm(len(members), generator=generator).tolist()
        held.update(members[j] for j in order[:count])
    return ([f for i, f in enumerate(files) if i not in held],
            [f for i, f in enumerate(files) if i in held])


def _limit(files: list[ImageFile], limit: int, seed: int) -> list[ImageFile]:
    """A seeded subset of `limit` files (all classes represented as they come), in order."""
    if not limit or limit >= len(files):
        return files
    keep = set(torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[
        :limit].tolist())
    return [f for i, f in enumerate(files) if i in keep]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 images on 0-255 pixels, exactly, from each
    channel's 256-bin histogram (fast for millions of pixels)."""
    if not len(images):
        return (127.5, 127.5, 127.5), (64.0, 64.0, 64.0)
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * (values - mean) ** 2).sum() / (n - 1)
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return tuple(means), tuple(stds)


def decode_split(root: Path, split: str, files: list[ImageFile], cfg: DataConfig,
                 notes: list[str]) -> Split:
    """The split's images at cfg.image_size, from the cache when its files are unchanged."""
    cache_dir = root / FOLDER_CACHE
    key = _cache_key(root, files, cfg)
    path = cache_dir / f"{split}-{key}.safetensors"
    cached = _read_cache(path)
    if cached is not None:
        images, labels, skipped = cached
    else:
        images, labels, skipped = _decode(root, split, files, cfg)
        _write_cache(path, images, labels, skipped, notes)
    if skipped:
        notes.append(f"skipped {len(skipped)} image(s) of {root}/{split} that cannot be read "
                     f"(--data.skip-bad-images), e.g. {skipped[0]}")
    if not len(images):
        raise UserError(f"no readable images in {root} for {split}")
    skip = len(str(root)) + 1
    unread = set(skipped)
    return Split(images, labels, [f.path[skip:] for f in files if f.path not in unread])


def _cache_key(root: Path, files: list[ImageFile], cfg: DataConfig) -> str:
    """Changes with the file list, any file's size or mtime, the image size and resize mode."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, cfg.image_size, cfg.resize,
                                   cfg.skip_bad_images]).encode())
    skip = len(str(root)) + 1  # the path below the root: the cache survives moving the root
    h.update("".join(f"{f.path[skip:]}\0{f.label}\0{f.size}\0{f.mtime_ns}\n"
                     for f in files).encode())
    return h.hexdigest()[:24]


def _decode(root: Path, split: str, files: list[ImageFile], cfg: DataConfig
            ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    paths = [Path(f.path) for f in files]
    start = time.monotonic()
    with _DecodeProgress(len(paths), f"decoding {len(paths)} images of {root}/{split}") as bar:
        images, bad = read_images(paths, cfg.image_size, cfg.resize, cfg.workers, bar.advance)
    labels = torch.tensor([f.label for f in files], dtype=torch.int64)
    if bad and not cfg.skip_bad_images:
        path, reason = bad[0]
        more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"cannot read image {path}: {reason}{more}; fix or remove it, or pass "
                        "--data.skip-bad-images to leave unreadable files out")
    if bad:
        keep = torch.ones(len(paths), dtype=torch.bool)
        keep[[paths.index(p) for p, _ in bad]] = False
        images, labels = images[keep], labels[keep]
    seconds = time.monotonic() - start
    print(f"decoded {len(paths)} images of {root}/{split} in {seconds:.1f} s "
          f"({len(paths) / max(seconds, 1e-9):.0f} img/s)", file=sys.stderr, flush=True)
    return images, labels, [str(p) for p, _ in bad]


class _DecodeProgress:
    """A rich progress bar on stderr when it is a terminal; one line otherwise (stdout stays
    clean for `eval --json`)."""

    def __init__(self, total: int, title: str):
        self.total, self.title, self.bar, self.task = total, title, None, None

    def __enter__(self) -> _DecodeProgress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=self.total)
        else:
            print(self.title + " ...", file=sys.stderr, flush=True)
        return self

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            skipped = json.loads(f.metadata()["skipped"])
            return f.get_tensor("images"), f.get_tensor("labels"), skipped
    except Exception:  # a damaged cache file is a cache miss; it is rewritten
        return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, skipped: list[str],
                 notes: list[str]) -> None:
    from safetensors.torch import save

    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, save({"images": images.contiguous(), "labels": labels},
                                      metadata={"skipped": json.dumps(skipped)}))
    except OSError as e:
        notes.append(f"could not cache the decoded images in {path.parent} ({e.strerror or e}); "
                     "the next run decodes them again")
        return
    split = path.name.split("-")[0]
    older = sorted(path.parent.glob(f"{split}-*.safetensors"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    for stale in older[KEEP_CACHES:]:
        stale.unlink(missing_ok=True)
