"""Which images a run uses: one small description per dataset and one `load_dataset`.

A dataset ends up as uint8 NCHW images and int64 labels per split, with its class names and
the mean/std that normalise it, on the training device when it fits (`place`), else in (pinned)
host memory. CIFAR-10 and CIFAR-100 are read from their python pickles (downloaded when
missing); an image folder (root/train/<class>/<image>, root/val/ or test/) is decoded once in
parallel and cached under root/.convnext-cifar-cache/. Adding a CIFAR-like dataset means adding
a description here (and its name to `config.DATASETS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from convnext_cifar.config import DataConfig
from convnext_cifar.errors import UserError
from convnext_cifar.files import atomic_write_bytes, load_array_pickle
from convnext_cifar.images import is_image, read_images


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

CIFAR100 = CifarSpec(
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
)

DATASETS: dict[str, CifarSpec] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
FOLDER_CACHE = ".convnext-cifar-cache"
CACHE_VERSION = 1
KEEP_CACHES = 3  # per split, newest first
HOST_MEMORY_SHARE = 0.8  # of host memory, for images a GPU has no room for


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
    placement: str = "device"  # or "host": too big for the device, batches are copied over

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu",
                 train: bool = True) -> Dataset:
    """The dataset `cfg.dataset` names, on `device` if it fits (the train split only when
    `train`)."""
    device = torch.device(device)
    host_share = cfg.memory_share if device.type == "cpu" else HOST_MEMORY_SHARE
    data = (load_folder(cfg, train, host_share) if cfg.dataset == "folder" else
            load_cifar(cifar_spec(cfg), cfg, train))
    return place(data, device, cfg.memory_share, cfg.image_size)


def normalisation(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std `cfg` gives, else its CIFAR dataset's standard values (a run records the
    values it used, so checkpoints always carry them)."""
    if cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    if cfg.dataset == "folder":
        raise UserError("this config has no --data.mean/--data.std for its image folder")
    spec = DATASETS[cfg.dataset]
    return tuple(cfg.mean or spec.mean), tuple(cfg.std or spec.std)


def stored_size(cfg: DataConfig) -> int:
    """The side of the images as a dataset holds them: CIFAR's own 32 (larger image sizes are
    upsampled batch by batch), an image folder's --data.image-size."""
    return cfg.image_size if cfg.dataset == "folder" else 32


def cifar_spec(cfg: DataConfig) -> CifarSpec:
    spec = DATASETS[cfg.dataset]
    if cfg.labels == "coarse":  # CIFAR-100's 20 superclasses
        spec = dataclasses.replace(spec, label_key="coarse_labels",
                                   names_key="coarse_label_names", num_classes=20)
    return spec


def prepare_dataset(cfg: DataConfig) -> None:
    """What one process does before all of them load: download a missing CIFAR, or decode an
    image folder into its cache."""
    if cfg.dataset == "folder":
        load_folder(cfg, train=True)
    else:
        cifar_folder(cifar_spec(cfg), cfg.root, cfg.download)


# ---- where the images live ------------------------------------------------------------------

def free_memory(device: torch.device) -> int:
    """Bytes free on `device` (the CPU: host memory available to this process)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_free_memory()


def host_free_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def too_big(need: int, room: int, share: float, size: int, count: int, where: str) -> UserError:
    """The one-line refusal, with the largest --data.image-size that would fit."""
    fits = int(size * (share * room / max(need, 1)) ** 0.5)
    advice = (f"use --data.image-size {fits} or less" if fits >= 32 else
              "use fewer images (--data.limit-train) or a machine with more memory")
    return UserError(f"the images need {need / 2**30:.2f} GB ({count} x 3 x {size} x {size} "
                     f"bytes), more than {share:.0%} of the {room / 2**30:.2f} GB free {where}; "
                     f"{advice}")


def placement(need: int, device_free: int, host_free: int, share: float, cpu: bool) -> str:
    """"device" when `need` bytes fit in `share` of the device's free memory, else "host" when
    they fit in HOST_MEMORY_SHARE of host memory (a GPU only: for the CPU the two are one),
    else ""."""
    if need <= share * device_free:
        return "device"
    if not cpu and need <= HOST_MEMORY_SHARE * host_free:
        return "host"
    return ""


def place(data: Dataset, device: torch.device, share: float, size: int) -> Dataset:
    """Move the images to `device` when they fit in `share` of its free memory; else keep them
    in pinned host memory (a CUDA device then gets each batch copied without blocking); else
    stop with the size that would fit."""
    tensors = ("train_images", "train_labels", "test_images", "test_labels")
    need = sum(getattr(data, t).numel() * getattr(data, t).element_size() for t in tensors)
    count = len(data.train_images) + len(data.test_images)
    cpu = device.type == "cpu"
    # on the CPU the images are already in memory: what is free besides them is what counts
    where = placement(need, free_memory(device) + (need if cpu else 0), host_free_memory(),
                      share, cpu)
    if not where:
        raise too_big(need, free_memory(device), share, data.test_images.shape[-1], count,
                      f"on {device}" + ("" if cpu else " or in host memory"))
    if where == "device":
        moved = {t: getattr(data, t).to(device) for t in tensors}
        return dataclasses.replace(data, **moved, placement="device")
    pinned = {t: getattr(data, t).pin_memory() for t in tensors}
    note = (f"the images ({need / 2**30:.2f} GB) do not fit in {share:.0%} of {device}'s free "
            "memory: they stay in pinned host memory and each batch is copied over")
    return dataclasses.replace(data, **pinned, placement="host", notes=data.notes + [note])


# ---- the CIFAR pickle layout --------------------------------------------------------------------

def load_cifar(spec: CifarSpec, cfg: DataConfig, train: bool) -> Dataset:
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
        return images, labels

    if train:
        train_images, train_labels = split(spec.train_files, cfg.limit_train)
    else:
        train_images, train_labels = _empty(32)
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


def _empty(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)


# ---- image folders ----------------------------------------------------------------------------

def load_folder(cfg: DataConfig, train: bool = True, host_share: float | None = None
                ) -> Dataset:
    """root/train/<class>/<image> and root/val/ (or test/), or a held-out share of train/.
    The decoded images must fit in `host_share` of host memory (default --data.memory-share)."""
    host_share = cfg.memory_share if host_share is None else host_share
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
    need = (len(train_files) * train + len(val_files)) * 3 * size * size
    if need > host_share * host_free_memory():
        raise too_big(need, host_free_memory(), host_share, size,
                      len(train_files) * train + len(val_files), "in host memory")
    if train:
        train_images, train_labels = decode_split(root, "train", train_files, cfg, notes)
    else:
        train_images, train_labels = _empty(size)
    test_images, test_labels = decode_split(root, "val", val_files, cfg, notes)
    stats_from = train_images if len(train_images) else test_images
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:  # no standard values: measured on the training images
        measured = channel_stats(stats_from)
        mean, std = mean or measured[0], std or measured[1]
    return Dataset(train_images, train_labels, test_images, test_labels, classes,
                   tuple(mean), tuple(std), notes)


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
                 notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
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
    return images, labels


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
