"""The decode cache of image folders: a split's images decoded once at the training size and
streamed into one file, read back a batch at a time.

An entry is a safetensors file (labels, images, which rows decoded, each channel's pixel
histogram) named by a key of everything that changes the decoded images: the files' paths below
the root, classes and stat (a replaced file changes at least ctime), the size, the resize mode.
It lives in the user's cache folder (~/.cache/convnext-cifar/decoded/, or under $XDG_CACHE_HOME)
or --data.cache-dir, each entry carrying its root's tag (an entry an earlier version wrote in
ROOT/.convnext-cifar-cache/ is still found and used); the KEEP_CACHES newest of a split (and
root) are kept. `DiskImages` reads an entry
with positioned reads. Where no entry can be written, `decode_in_memory` decodes into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from convnext_cifar.data.images import decode_chunks, read_images
from convnext_cifar.errors import UserError
from convnext_cifar.files import (
    atomic_writer,
    readable,
    remove_stale_temp_files,
    user_cache_dir,
)
from convnext_cifar.terminal import is_terminal, progress_bar

if TYPE_CHECKING:
    from convnext_cifar.config import DataConfig

FOLDER_CACHE = ".convnext-cifar-cache"
CACHE_FORMAT = "convnext-cifar/decode-cache-v3"  # v3: EXIF orientation applied
KEEP_CACHES = 3  # per split (and dataset), newest first


class ImageFile(NamedTuple):
    """An image of a folder dataset: its path, its path below the dataset's root, its class
    index, and what the cache key notes of the file (a replaced file changes at least ctime)."""

    path: str
    rel: str
    label: int
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int


def cache_path(root: Path, split: str, files: list[ImageFile], cfg: DataConfig) -> Path:
    """<cache dir>/<split>-<key>.safetensors; in a --data.cache-dir shared by several datasets
    the root's own tag comes first, so that each prunes only its own entries."""
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, cfg.image_size, cfg.resize,
                                   cfg.skip_bad_images]).encode())
    h.update("".join(f"{f.rel}\0{f.label}\0{f.size}\0{f.mtime_ns}\0{f.ino}\0{f.ctime_ns}\n"
                     for f in files).encode("utf-8", "surrogateescape"))  # moving keeps a hit
    if cfg.cache_dir is None:  # one written beside the data by an earlier version: used
        beside = root / FOLDER_CACHE / f"{split}-{h.hexdigest()[:24]}.safetensors"
        if beside.is_file():
            return beside
    tag = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:8]
    folder = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()
    return folder / f"{split}-{tag}-{h.hexdigest()[:24]}.safetensors"


def default_cache_dir() -> Path:
    """Where decoded images go without --data.cache-dir: the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache)/convnext-cifar/decoded, never the dataset's own folder."""
    return user_cache_dir() / "decoded"


def read_cache(path: Path, count: int, size: int
               ) -> tuple[int, np.ndarray, torch.Tensor | None] | None:
    """(where the images start in the file, which rows decoded, the decoded rows' pixel
    histogram, None in entries written before it was kept) of a cache entry, or None when it is
    missing, damaged, of another format or another shape (a miss)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(length, 1 << 20)))  # a header is a few hundred bytes
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict) or (
                header["__metadata__"].get("format") != CACHE_FORMAT):
            return None
        base = 8 + length
        end = max(entry["data_offsets"][1] for name, entry in header.items()
                  if name != "__metadata__")
        if header["images"]["shape"] != [count, 3, size, size] or path.stat().st_size != (
                base + end):
            return None
        ok_at = base + header["ok"]["data_offsets"][0]
        ok = np.fromfile(path, np.uint8, count, offset=ok_at).astype(bool)
        hist = None
        if "histogram" in header:
            hist = torch.from_numpy(np.fromfile(
                path, "<i8", 3 * 256, offset=base + header["histogram"]["data_offsets"][0]
            ).reshape(3, 256).copy())
        return base + header["images"]["data_offsets"][0], ok, hist
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # damaged: decoded again


def write_cache(path: Path, root: Path, split: str, files: list[ImageFile], cfg: DataConfig
                ) -> None:
    """Decode `files` straight into a new cache file (safetensors: labels, images, which rows
    decoded, and the decoded rows' pixel histogram), a few chunks in memory at a time; then
    prune older entries. A file that cannot be decoded stops it with one line, unless
    --data.skip-bad-images."""
    n, size = len(files), cfg.image_size
    labels = np.array([f.label for f in files], dtype="<i8")
    sizes = {"labels": ("I64", [n], 8 * n),  # in the file's order: `ok` is known last
             "images": ("U8", [n, 3, size, size], n * 3 * size * size), "ok": ("U8", [n], n),
             "histogram": ("I64", [3, 256], 8 * 3 * 256)}
    header, offset = {"__metadata__": {"format": CACHE_FORMAT}}, 0
    for name, (dtype, shape, length) in sizes.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
        offset += length
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, shared=True)
    ok = np.ones(n, dtype=np.uint8)
    hist = torch.zeros(3, 256, dtype=torch.int64)
    index = {p.path: i for i, p in enumerate(files)}
    start_time, bad = time.monotonic(), []
    try:
        with atomic_writer(path) as f, _DecodeProgress(n, f"decoding {n} images of "
                                                          f"{root}/{split}") as bar:
            f.write(len(text).to_bytes(8, "little") + text + labels.tobytes())
            for start, block, block_bad in decode_chunks([Path(p.path) for p in files], size,
                                                         cfg.resize, cfg.decode_processes):
                f.write(np.ascontiguousarray(block).data)
                good = np.ones(len(block), dtype=bool)
                good[[index[str(p)] - start for p, _ in block_bad]] = False
                hist += histogram(torch.from_numpy(block[good]))
                bad += block_bad
                bar.advance(len(block))
            _refuse_bad(bad, cfg)
            ok[[index[str(p)] for p, _ in bad]] = 0
            f.write(ok.tobytes())
            f.write(hist.numpy().astype("<i8").tobytes())
    except BaseException:
        if created:
            _remove_if_empty(path.parent)
        raise
    _report(root, split, n, start_time)
    _prune(path)


def decode_in_memory(root: Path, split: str, files: list[ImageFile], cfg: DataConfig
                      ) -> tuple[torch.Tensor, list]:
    start = time.monotonic()
    with _DecodeProgress(len(files), f"decoding {len(files)} images of {root}/{split}") as bar:
        images, bad = read_images([Path(f.path) for f in files], cfg.image_size, cfg.resize,
                                  cfg.decode_processes, bar.advance)
    _refuse_bad(bad, cfg)
    _report(root, split, len(files), start)
    return images, bad


def _refuse_bad(bad: list, cfg: DataConfig) -> None:
    if bad and not cfg.skip_bad_images:
        path, reason = bad[0]
        more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"cannot read image {path}: {reason}{more}; fix or remove it, or pass "
                        "--data.skip-bad-images to leave unreadable files out")


def _report(root: Path, split: str, count: int, start: float) -> None:
    seconds = time.monotonic() - start
    print(f"decoded {count} images of {root}/{split} in {seconds:.1f} s "
          f"({count / max(seconds, 1e-9):.0f} img/s)", file=sys.stderr, flush=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _prune(path: Path) -> None:
    """Keep the KEEP_CACHES newest entries of this split (and dataset); another run may be
    pruning the same folder at the same time, so a vanished file is no error."""
    prefix = path.name[:-len(path.name.split("-")[-1])]  # "<split>-" or "<split>-<tag>-"

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    entries = [p for p in path.parent.glob(prefix + "*.safetensors")
               if p.name.count("-") == path.name.count("-")]
    for stale in sorted(entries, key=mtime, reverse=True)[KEEP_CACHES:]:
        stale.unlink(missing_ok=True)


class _DecodeProgress:
    """A progress bar on stderr when it is a terminal; one line otherwise (stdout stays clean
    for `eval --json`)."""

    def __init__(self, total: int, title: str):
        self.total, self.title, self.bar, self.task = total, title, None, None

    def __enter__(self) -> _DecodeProgress:
        if is_terminal(sys.stderr):
            from rich.markup import escape

            self.bar = progress_bar(stderr=True)
            self.task = self.bar.add_task(escape(readable(self.title)), total=self.total)
        else:
            print(self.title + " ...", file=sys.stderr, flush=True)
        return self

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def histogram(images: torch.Tensor) -> torch.Tensor:
    """(3, 256) int64: how many pixels of each channel have each value."""
    return torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                        for c in range(images.shape[1])])



class DiskImages:
    """uint8 (N, 3, S, S) images that stay in a decode cache file: `rows` are the file rows of
    images 0..N-1 (a cache may hold rows that did not decode). Indexing reads (a CPU tensor);
    `read_into` reads a batch straight into a staging buffer, in file order.

    Read with positioned reads, not a memory map: a map counts every page it touches as the
    process's resident memory, which would grow to the size of the cache over an epoch; reads
    go through the page cache (a warm cache is served from memory all the same) and land
    directly in the buffer given, with no second copy. The file is opened when this is made,
    right after its header was checked, and read through that descriptor: a cache entry that
    another run prunes or replaces afterwards (--data.cache-dir shared, the folder changed)
    cannot change or cut short what this run reads.
    """

    def __init__(self, path: Path, offset: int, rows: np.ndarray, size: int):
        self.path, self.offset, self.size = Path(path), offset, size
        self.rows = np.asarray(rows, dtype=np.int64)
        self.row_bytes = 3 * size * size
        self.dtype, self.device = torch.uint8, torch.device("cpu")
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 3, self.size, self.size))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.row_bytes

    def __getitem__(self, key: slice | np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
        if isinstance(key, slice):
            span = range(len(self))[key]
            index = np.arange(span.start, span.stop, span.step)
        else:
            index = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        out = torch.empty((len(index), 3, self.size, self.size), dtype=torch.uint8)
        self.read_into(index, out)
        return out

    def split(self, rows: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), rows):
            yield self[i:i + rows]

    def _file(self) -> int:
        """The descriptor (a forked process shares it: positioned reads keep no file position;
        an unpickled copy opens the path again)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read_into(self, index: np.ndarray, out: torch.Tensor,
                  pool: Executor | None = None) -> None:
        """Images `index` into out[:len(index)]: the file rows in ascending order, each run of
        consecutive rows one read scattered to where its images go (os.preadv); with `pool`,
        the reads split into up to as many groups as it has threads, in flight at once (a cold
        cache is read several requests at a time, not one)."""
        if not len(index):
            return
        file_rows = self.rows[index]
        order = np.argsort(file_rows, kind="stable")
        ranked = file_rows[order]
        into = memoryview(out.numpy()).cast("B")
        row = self.row_bytes
        breaks = np.flatnonzero(np.diff(ranked) != 1) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        stops = np.concatenate([breaks, [len(ranked)]]).tolist()
        reads = [(lo, min(b, lo + IOV_MAX)) for a, b in zip(starts, stops)
                 for lo in range(a, b, IOV_MAX)]  # preadv takes at most IOV_MAX buffers
        fd = self._file()

        def read(group: list[tuple[int, int]]) -> None:
            for lo, hi in group:
                buffers = [into[k * row:(k + 1) * row] for k in order[lo:hi].tolist()]
                if os.preadv(fd, buffers, self.offset + int(ranked[lo]) * row) != (
                        hi - lo) * row:
                    raise UserError(f"the decode cache {self.path} ended early: it was "
                                    "cut short while the run read it; run again with --resume "
                                    "auto (a damaged cache is decoded again)")

        # a group reads at least GROUP_BYTES: below that, handing reads to threads costs more
        # than it overlaps (32 px batches: measured slower warm, barely faster cold)
        ways = min(len(reads), getattr(pool, "_max_workers", 1) if pool else 1,
                   max(1, len(index) * row // GROUP_BYTES))
        if ways <= 1:
            read(reads)
            return
        step = -(-len(reads) // ways)
        list(pool.map(read, [reads[i:i + step] for i in range(0, len(reads), step)]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


IOV_MAX = 1024
GROUP_BYTES = 1 << 20
