"""Image folders: root/train/<class>/<image> with root/val/ (or test/), or a held-out share of
train/. The files are listed (every directory once, links included, no image under two classes),
split by a stable hash of each path, and decoded once into the decode cache (data/cache.py), whose
pixel histogram gives the mean/std of the training images without reading them again. A run gets
the cache as `cache.DiskImages`: placement.py reads it into memory, or leaves it on disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from convnext_cifar.data.cache import (
    DiskImages,
    ImageFile,
    cache_path,
    decode_in_memory,
    histogram,
    read_cache,
    write_cache,
)
from convnext_cifar.data.dataset import Dataset, Split, class_difference, identity_of
from convnext_cifar.data.images import is_image
from convnext_cifar.data.placement import host_free_memory, too_big
from convnext_cifar.errors import UserError

if TYPE_CHECKING:
    from convnext_cifar.config import DataConfig


def load(cfg: DataConfig, train: bool, host_share: float) -> Dataset:
    """The folder's held-out split (and with `train` its training split); the decoded images
    must fit in `host_share` of host memory. Without `train`, a folder with val/ (or test/)
    needs no train/."""
    root = Path(cfg.root)
    classes, train_files, val_files, notes = list_splits(root, cfg, need_train=train)
    train_files = _limit(train_files, cfg.limit_train, cfg.split_seed)
    val_files = _limit(val_files, cfg.limit_val, cfg.split_seed)
    train_split = decode_split(root, "train", train_files, cfg, notes, host_share
                               ) if train else None
    val_split = decode_split(root, "val", val_files, cfg, notes, host_share)
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:  # no standard values: measured on the training images
        measured_on = train_split or val_split
        measured = (stats_of(measured_on.histogram) if measured_on.histogram is not None
                    else channel_stats(measured_on.images))
        mean, std = mean or measured[0], std or measured[1]
    identity = identity_of(classes, [f.rel for f in train_files] if train_files else None,
                           [f.rel for f in val_files])
    return Dataset(val=val_split, classes=classes, mean=tuple(mean), std=tuple(std),
                   identity=identity, train=train_split, notes=notes)


HELD_OUT_DIRS = ("val", "validation", "test")  # torchvision/MMPretrain, timm, and others


def list_splits(root: Path, cfg: DataConfig, need_train: bool = True
                ) -> tuple[list[str], list[ImageFile], list[ImageFile], list[str]]:
    """(classes, training files, held-out files, notes): from val/ (or validation/, test/), or
    the --data.val-fraction share of train/, or of the class folders themselves (the layout
    torchvision's ImageFolder reads: root/<class>/<image>). Training files are [] when not
    needed and absent."""
    val_dir = next((root / d for d in HELD_OUT_DIRS if (root / d).is_dir()), None)
    notes: list[str] = []
    if not (root / "train").is_dir() and (need_train or val_dir is None):
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist; pass --data.root a folder "
                            "laid out as <root>/train/<class>/<image> or <root>/<class>/<image>")
        flat = sorted(p.name for p in root.iterdir() if p.is_dir() and _holds_images(p))
        if flat and val_dir is None:  # the class folders themselves (ImageFolder's layout)
            if cfg.val_fraction <= 0:
                shown = ", ".join(flat[:3]) + (", ..." if len(flat) > 3 else "")
                raise UserError(f"image folder {root} holds class folders ({shown}) and no "
                                "held-out split; hold out part of them with --data.val-fraction "
                                "0.1 (or lay them out as train/ and val/)")
            classes, files = list_classes(root, root, notes)
            return (classes, *hash_split(files, cfg.val_fraction, cfg.split_seed), notes)
        raise UserError(f"image folder {root} has no train/ folder; lay it out as "
                        f"{root}/train/<class>/<image> with {root}/val/<class>/<image> (or "
                        "validation/, test/), or as <root>/<class>/<image> with "
                        "--data.val-fraction 0.1")
    if val_dir is not None:
        val_classes, val_files = list_classes(val_dir, root, notes)
        if not need_train and not (root / "train").is_dir():
            return val_classes, [], val_files, notes
    classes, train_files = list_classes(root / "train", root, notes)
    if val_dir is not None:
        if difference := class_difference(classes, val_classes, "only in train",
                                          f"only in {val_dir.name}"):
            raise UserError(f"{root}/train and {val_dir} have different classes ({difference}); "
                            "give both the same class folders")
    elif cfg.val_fraction > 0:
        train_files, val_files = hash_split(train_files, cfg.val_fraction, cfg.split_seed)
    else:
        raise UserError(f"image folder {root} has no val/, validation/ or test/ folder; add "
                        "one, or hold out part of train/ with --data.val-fraction 0.1")
    return classes, train_files, val_files, notes


def _holds_images(folder: Path) -> bool:
    try:
        return any(map(is_image, os.listdir(folder)))
    except OSError:  # unreadable: not a class folder this message can name
        return False


def list_classes(split_dir: Path, root: Path, notes: list[str]
                 ) -> tuple[list[str], list[ImageFile]]:
    """Sorted class folder names and every image file under them (recursively, links
    followed) with its class index, in a fixed order.

    Every directory is read once: a link back up (a loop) or into another class's folder adds
    nothing, and an image reachable twice (two links, a hard link) is listed once, under the
    class whose own folder holds it.
    """
    classes = sorted(p.name for p in split_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} holds no class folders; put each class's images in "
                        f"{split_dir}/<class>/")
    walk = _Walk(root)
    for index, name in enumerate(classes):  # each class's own tree, links not yet followed
        walk.tree(index, str(split_dir / name))
    for index in range(len(classes)):  # then what links lead to that nothing listed yet
        walk.links(index)
    files = []
    for index, name in enumerate(classes):
        found = sorted(walk.found[index])
        if not found:
            raise UserError(f"class folder {split_dir / name} holds no images (.png, .jpg, "
                            ".jpeg, .bmp, .webp, .gif); add some or remove the folder")
        files += found
    if walk.left_out:
        notes.append(f"left out {len(walk.left_out)} link(s) under {split_dir} that lead to a "
                     "folder or image already listed (a loop, or another class's files), e.g. "
                     f"{walk.left_out[0]}")
    return classes, files


class _Walk:
    """Directories and images seen so far, by (device, inode), while listing one split."""

    def __init__(self, root: Path):
        self.skip = len(str(root)) + 1
        self.dirs: set[tuple[int, int]] = set()
        self.images: set[tuple[int, int]] = set()
        self.found: dict[int, list[ImageFile]] = {}
        self.pending_links: dict[int, list[str]] = {}
        self.left_out: list[str] = []

    def tree(self, label: int, folder: str) -> None:
        self.found.setdefault(label, [])
        self.pending_links.setdefault(label, [])
        try:
            st = os.stat(folder)  # the class folder itself may be a link: follow it
        except OSError as e:
            raise UserError(f"cannot read {folder}: {e.strerror or e}") from None
        if (st.st_dev, st.st_ino) in self.dirs:
            self.left_out.append(folder)
            return
        self.dirs.add((st.st_dev, st.st_ino))
        pending = [folder]
        while pending:
            here = pending.pop()
            try:
                entries = list(os.scandir(here))
            except OSError as e:
                raise UserError(f"cannot read {here}: {e.strerror or e}; fix its permissions "
                                "or move it out of the dataset") from None
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    self.pending_links[label].append(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) not in self.dirs:
                        self.dirs.add((st.st_dev, st.st_ino))
                        pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and is_image(entry.name):
                    self._add(label, entry.path, entry.stat(follow_symlinks=False))

    def links(self, label: int) -> None:
        pending = self.pending_links[label]
        while pending:
            path = pending.pop()
            try:
                st = os.stat(path)
            except OSError:  # dangling, or a loop of links
                self.left_out.append(path)
                continue
            if os.path.isdir(path):
                if (st.st_dev, st.st_ino) in self.dirs:
                    self.left_out.append(path)
                    continue
                self.dirs.discard((st.st_dev, st.st_ino))  # tree() registers it again
                self.tree(label, path)
            elif is_image(path):
                self._add(label, path, st)

    def _add(self, label: int, path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.images:
            self.left_out.append(path)
            return
        self.images.add(key)
        self.found[label].append(ImageFile(path, path[self.skip:], label, st.st_size,
                                           st.st_mtime_ns, st.st_ino, st.st_ctime_ns))


def held_out(rel: str, seed: int, fraction: float) -> bool:
    """Whether the file at `rel` (below the dataset's root) is held out: a hash of the path and
    the seed, so adding or removing images moves only those images."""
    digest = hashlib.sha256(os.fsencode(f"{seed}\0{rel}")).digest()  # the name's own bytes
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def hash_split(files: list[ImageFile], fraction: float, seed: int
               ) -> tuple[list[ImageFile], list[ImageFile]]:
    """(train, val): each file held out or not by `held_out`; a class of two or more images
    that the hash left without a held-out image (or with no training image) gives up its
    lowest-hash (highest-hash) one, so every class is in both. Both keep the files' order."""
    held = {f.path for f in files if held_out(f.rel, seed, fraction)}
    by_class: dict[int, list[ImageFile]] = {}
    for f in files:
        by_class.setdefault(f.label, []).append(f)
    for members in by_class.values():
        if len(members) < 2:
            continue
        ranked = sorted(members, key=lambda f: hashlib.sha256(os.fsencode(f"{seed}\0{f.rel}"))
                        .digest())
        if not any(f.path in held for f in members):
            held.add(ranked[0].path)
        elif all(f.path in held for f in members):
            held.discard(ranked[-1].path)
    return [f for f in files if f.path not in held], [f for f in files if f.path in held]


def _limit(files: list[ImageFile], limit: int, seed: int) -> list[ImageFile]:
    """A seeded subset of `limit` files (all classes represented as they come), in order."""
    if not limit or limit >= len(files):
        return files
    keep = set(torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[
        :limit].tolist())
    return [f for i, f in enumerate(files) if i in keep]


def channel_stats(images: torch.Tensor | DiskImages
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 images on 0-255 pixels, exactly, from each
    channel's 256-bin histogram (fast for millions of pixels; a chunk of images at a time)."""
    hist = torch.zeros(3, 256, dtype=torch.int64)
    rows = max(1, 2**20 // (images.shape[-1] ** 2))  # a million pixels at a time: small copies
    for chunk in images.split(rows):
        hist += histogram(chunk)
    return stats_of(hist)


def stats_of(hist: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, unbiased std) from a (3, 256) pixel histogram."""
    hist = hist.double()
    if not hist.sum():
        return (127.5, 127.5, 127.5), (64.0, 64.0, 64.0)
    values = torch.arange(256, dtype=torch.float64)
    n = hist.sum(1)
    mean = (hist * values).sum(1) / n
    var = (hist * (values - mean[:, None]) ** 2).sum(1) / (n - 1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def decode_split(root: Path, split: str, files: list[ImageFile], cfg: DataConfig,
                 notes: list[str], host_share: float) -> Split:
    """The split's images at cfg.image_size: its cache entry when its files are unchanged, else
    decoded into a new one (left on disk: placement.py decides where they go); where no cache
    can be written, decoded into memory when they fit in `host_share` of it."""
    path = cache_path(root, split, files, cfg)
    cached = read_cache(path, len(files), cfg.image_size)
    if cached is None:
        try:
            write_cache(path, root, split, files, cfg)
            cached = read_cache(path, len(files), cfg.image_size)
        except OSError as e:
            notes.append(f"could not cache the decoded images in {path.parent} "
                         f"({e.strerror or e}); the next run decodes them again (give a "
                         "writable --data.cache-dir)")
    hist = None
    if cached is not None:
        offset, ok, hist = cached
        images = DiskImages(path, offset, np.flatnonzero(ok), cfg.image_size)
    else:
        size, need = cfg.image_size, len(files) * 3 * cfg.image_size ** 2
        if need > host_share * host_free_memory():
            raise too_big(need, host_free_memory(), host_share, size, len(files),
                          "in host memory", f"a writable --data.cache-dir (then {split} "
                          "is read from disk)")
        images, bad = decode_in_memory(root, split, files, cfg)
        unread = {str(p) for p, _ in bad}
        ok = np.array([f.path not in unread for f in files])
        images = images[torch.from_numpy(ok)] if not ok.all() else images
    kept = [f for f, good in zip(files, ok) if good]
    if len(kept) < len(files):
        first = next(f.path for f, good in zip(files, ok) if not good)
        notes.append(f"skipped {len(files) - len(kept)} image(s) of {root}/{split} that cannot "
                     f"be read (--data.skip-bad-images), e.g. {first}")
    if not kept:
        raise UserError(f"no readable images in {root} for {split}")
    labels = torch.tensor([f.label for f in kept], dtype=torch.int64)
    return Split(images, labels, [f.rel for f in kept], hist)
