"""CIFAR-10 on the device: read the python pickles once, augment whole batches with tensor ops.

The dataset lives on the training device as one uint8 tensor per split. A training batch is a
gather from a seeded per-epoch permutation, then one indexing op that does the zero-padded random
crop and the horizontal flip for every image at once, then normalisation. No DataLoader, no
per-image Python.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from convnext_cifar.config import DataConfig
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_FILES = ("test_batch",)


# ---- reading the pickles ------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if target[0] == "numpy._core.multiarray":
            try:
                from numpy._core import multiarray  # numpy >= 2
            except ImportError:  # numpy 1.x
                from numpy.core import multiarray
            return getattr(multiarray, target[1])
        return super().find_class(*target)


def _read_pickle(path: Path) -> dict:
    # The official files were written by Python 2's cPickle: their str objects are bytes, and
    # numpy's own advice for such arrays is encoding="latin1" (keys and names become str).
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"missing {path}; re-download CIFAR-10 (delete the folder and run with "
                        "--data.download) or fix the copy") from None
    except Exception as e:  # truncated or foreign file: pickle raises many kinds of error
        raise UserError(f"cannot read {path} as a CIFAR batch file ({type(e).__name__}: {e}); "
                        "delete the folder and download it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch file (holds a {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    d = _read_pickle(path)
    if "data" not in d or not ("labels" in d or "fine_labels" in d):
        raise UserError(f"{path} has no 'data'/'labels' entries; it is not a CIFAR batch file")
    data = np.asarray(d["data"])
    labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' is {data.dtype} {tuple(data.shape)}, expected uint8 "
                        "(N, 3072); the file is damaged, download CIFAR-10 again")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path}: labels must be in [0, {num_classes - 1}], found "
                        f"{labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_warned_roots: set[Path] = set()


def _warn_if_unofficial(folder: Path) -> None:
    if folder in _warned_roots:
        return
    _warned_roots.add(folder)
    differ = [n for n, md5 in CIFAR10_FILES_MD5.items()
              if (folder / n).exists() and _md5(folder / n) != md5]
    if differ:
        print(f"warning: {folder} is not byte-identical to the official archive "
              f"({', '.join(differ)} differ); using it as it is", file=sys.stderr)


# ---- finding or downloading the data ----------------------------------------------------------

def download_cifar10(root: Path) -> None:
    """Download the official archive, check its MD5 and unpack it under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "cifar-10-python.tar.gz.part"
    print(f"downloading {CIFAR10_URL} to {root} ...", file=sys.stderr)
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download CIFAR-10 ({e}); check the connection, or fetch "
                        f"{CIFAR10_URL} by hand and unpack it into {root}") from None
    if (got := _md5(tmp)) != CIFAR10_ARCHIVE_MD5:
        tmp.unlink(missing_ok=True)
        raise UserError(f"downloaded archive has MD5 {got}, expected {CIFAR10_ARCHIVE_MD5}; "
                        "try again (the download was corrupted)")
    with tarfile.open(tmp, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith(CIFAR10_DIR + "/") and ".." not in m.name]
        for m in members:
            target = root / m.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                dst.write(src.read())
    tmp.unlink()


def cifar10_folder(root: Path, download: bool) -> Path:
    """The batches folder under `root`, downloading it first when allowed and missing."""
    folder = Path(root) / CIFAR10_DIR
    if not folder.is_dir():
        if not download:
            raise UserError(f"CIFAR-10 not found: {folder} does not exist; pass --data.root to "
                            "the folder that holds cifar-10-batches-py/, or allow --data.download")
        download_cifar10(Path(root))
    return folder


@dataclass
class Dataset:
    """Both splits as uint8 NCHW images and int64 labels, on one device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def load_cifar10(cfg: DataConfig, device: torch.device | str = "cpu",
                 train: bool = True, warn: bool = True) -> Dataset:
    """Read the splits once and move them to `device` (the train split only when `train`)."""
    folder = cifar10_folder(cfg.root, cfg.download)
    meta = _read_pickle(folder / "batches.meta") if (folder / "batches.meta").exists() else {}
    classes = [str(c) for c in meta.get("label_names", [])] or [str(i) for i in range(10)]
    if len(classes) != cfg.num_classes:
        raise UserError(f"{folder / 'batches.meta'} names {len(classes)} classes, expected "
                        f"{cfg.num_classes}")

    def split(names: tuple[str, ...], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_batch(folder / n, cfg.num_classes) for n in names]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if limit:
            images, labels = images[:limit], labels[:limit]
        if len(images) == 0:
            raise UserError(f"{folder}: the {names[0]} split holds no images")
        return images.to(device), labels.to(device)

    if train:
        train_images, train_labels = split(TRAIN_FILES, cfg.limit_train)
    else:
        train_images = torch.empty(0, 3, 32, 32, dtype=torch.uint8, device=device)
        train_labels = torch.empty(0, dtype=torch.int64, device=device)
    test_images, test_labels = split(TEST_FILES, cfg.limit_val)
    if warn:  # only once the files read well: an error stays one line
        _warn_if_unofficial(folder)
    return Dataset(train_images, train_labels, test_images, test_labels, classes)


# ---- batched augmentation and normalisation ---------------------------------------------------

def draw_crop_flip(n: int, padding: int, flip_prob: float, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (n, 2) in [0, 2*padding] and flip flags (n,) for a batch of n images."""
    dev = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=dev)
    flips = torch.rand(n, generator=generator, device=dev) < flip_prob
    return offsets, flips


def crop_flip(images: torch.Tensor, padding: int, flip_prob: float,
              generator: torch.Generator, params: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, then a random horizontal flip.

    One gather does both for the whole batch; the result is NCHW with channels_last strides.
    `params` (offsets, flips) are drawn from `generator` unless given.
    """
    n, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    offsets, flips = params or draw_crop_flip(n, padding, flip_prob, generator)
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = offsets[:, :1] + ys  # (n, h)
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - xs, xs)  # (n, w)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


class Normalize:
    """uint8 batch -> float, normalised, optionally upsampled, in the chosen memory format."""

    def __init__(self, cfg: DataConfig, device: torch.device | str, channels_last: bool):
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
        self.size = cfg.image_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.inv_std
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=self.memory_format)


class DeviceLoader:
    """Training batches from device-resident data: seeded permutation, batched augmentation.

    With `dist`, every rank draws the same permutation and the same crop/flip parameters for the
    whole global batch and takes its own slice of it, so N processes see exactly the images and
    augmentations one process sees with the same global batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, seed: int,
                 channels_last: bool, dist: Dist | None = None):
        self.images, self.labels, self.cfg, self.seed = images, labels, cfg, seed
        self.dist = dist or Dist()
        self.normalize = Normalize(cfg, images.device, channels_last)
        self.generator = torch.Generator(device=images.device)

    def __len__(self) -> int:
        n, b = len(self.images), self.cfg.batch_size
        return n // b if self.cfg.drop_last and n >= b else math.ceil(n / b)

    def epoch(self, epoch: int, start: int = 0, rng_state: torch.Tensor | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(images, labels, global batch size) of `epoch` (0-based); the same seed and epoch give
        the same batches.

        `start` and `rng_state` (this loader's `generator.get_state()` after batch start-1)
        continue an epoch where an interrupted run left it, batch for batch.
        """
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.images), generator=self.generator,
                               device=self.images.device)
        if rng_state is not None:
            self.generator.set_state(rng_state)
        b = self.cfg.batch_size
        for i in range(start, len(self)):
            idx = order[i * b:(i + 1) * b]
            offsets, flips = draw_crop_flip(len(idx), self.cfg.padding, self.cfg.flip_prob,
                                            self.generator)
            lo, hi = self.dist.shard(len(idx))
            x = crop_flip(self.images[idx[lo:hi]], self.cfg.padding, self.cfg.flip_prob,
                          self.generator, (offsets[lo:hi], flips[lo:hi]))
            yield self.normalize(x), self.labels[idx[lo:hi]], len(idx)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 normalize: Normalize) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image exactly once, in order, unaugmented."""
    for i in range(0, len(images), batch_size):
        yield normalize(images[i:i + batch_size]), labels[i:i + batch_size]
