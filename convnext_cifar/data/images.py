"""Image files -> uint8 RGB tensors at the training size: one file (`read_image`), or many in
parallel worker processes, chunk by chunk (`decode_chunks`; `read_images` collects them). Used
for image-folder datasets and by `predict`.

PNG, JPEG and WebP are decoded by torchvision.io; GIF (first frame only: an animated GIF is
never expanded frame by frame), BMP, and anything torchvision refuses (a CMYK JPEG, say), by
Pillow. Grayscale, palette, RGBA and CMYK images become RGB. Every file's header is read first
and an image claiming more than `MAX_IMAGE_PIXELS` pixels is refused by name before anything is
decoded or allocated. Pillow's own process-wide pixel limit is left as it is.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
MAX_IMAGE_PIXELS = 100_000_000  # 10,000 x 10,000: far beyond any photo, far below a bomb


class BadImage(Exception):
    """A file that cannot be read as an image; the message says why."""


def is_image(path: Path | str) -> bool:
    name = os.path.basename(path)
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not name.startswith(".")


@contextlib.contextmanager
def _header_only():
    """Pillow's pixel limit lifted while one header is read (MAX_IMAGE_PIXELS, with its own
    message, applies instead), and put back at once: the process keeps Pillow's protection."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = before


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header alone; refuses a decompression bomb."""
    return _header(path)[:2]


def _header(path: Path) -> tuple[int, int, int]:
    """(width, height, EXIF orientation: 1 upright) from the header; refuses a bomb."""
    try:
        with _header_only() as Image, Image.open(path) as img:
            width, height = img.size
            orientation = _orientation(img) if width * height <= MAX_IMAGE_PIXELS else 1
    except Exception as e:  # truncated, not an image, unknown format: many error types
        raise BadImage(f"not a readable image ({type(e).__name__}: {e})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImage(f"its header claims {width} x {height} pixels, more than the "
                       f"{MAX_IMAGE_PIXELS:,} allowed; refused before decoding (a "
                       "decompression bomb, or an image to shrink first)")
    return width, height, orientation


def _orientation(img) -> int:
    """The EXIF orientation of an opened image (1: upright; also when its EXIF is unreadable:
    the decoder then reports what is wrong with the file)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - damaged EXIF: read the pixels as stored
        return 1


def decode_rgb(path: Path) -> torch.Tensor:
    """The first frame of an image file as uint8 (3, H, W) RGB, turned upright by its EXIF
    orientation (a phone photo stored sideways is read as it is shown)."""
    import torchvision.io as tio

    _, _, orientation = _header(path)
    data = path.read_bytes()
    # torchvision decodes every frame of an animation (Pillow: the first) and turns only JPEG
    # and PNG upright: Pillow takes GIFs and any other image with an EXIF orientation
    if data[:4] == b"GIF8" or (orientation != 1 and data[:3] != b"\xff\xd8\xff"
                               and data[:8] != b"\x89PNG\r\n\x1a\n"):
        return _decode_with_pillow(path)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            img = tio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                   mode=tio.ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception:  # BMP, CMYK JPEG and the like: Pillow knows them
        img = _decode_with_pillow(path)
    if img.ndim == 4:  # an animation torchvision expanded: keep its first frame
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img


def _decode_with_pillow(path: Path) -> torch.Tensor:
    try:
        from PIL import ImageOps

        with _header_only() as Image, Image.open(path) as img:
            img.seek(0)
            rgb = ImageOps.exif_transpose(img).convert("RGB")  # upright, as a viewer shows it
            return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    except Exception as e:
        raise BadImage(f"cannot decode it ({type(e).__name__}: {e})") from None


def resize(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size): the shorter side to `size` then the centre crop
    (center-crop), or both sides to `size` (squash); antialiased bilinear."""
    from torchvision.transforms.v2 import functional as TF

    if mode == "squash":
        return TF.resize(img, [size, size], antialias=True)
    return TF.center_crop(TF.resize(img, size, antialias=True), [size, size])


def read_image(path: Path, size: int, mode: str) -> torch.Tensor:
    """An image file as uint8 (3, size, size), as training and prediction see it."""
    return resize(decode_rgb(Path(path)), size, mode)


def _read_chunk(args: tuple[list[str], int, str]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: a chunk of files -> uint8 (k, 3, S, S) and the (index, reason) of bad ones."""
    paths, size, mode = args
    torch.set_num_threads(1)
    out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            out[i] = read_image(Path(p), size, mode).numpy()
        except BadImage as e:
            bad.append((i, str(e)))
        except Exception as e:  # a decoder's own error on a damaged file
            bad.append((i, f"cannot decode it ({type(e).__name__}: {e})"))
    return out, bad


def decode_chunks(paths: list[Path], size: int, mode: str, workers: int = 0, chunk: int = 0
                  ) -> Iterator[tuple[int, np.ndarray, list[tuple[Path, str]]]]:
    """(start, uint8 (k, 3, size, size), [(path, reason) of the files that could not be read,
    their rows zeros]) for consecutive chunks of `paths`, in order, decoded in `workers`
    processes (0: one per core). Only a few chunks are in memory at a time."""
    import torchvision.io  # noqa: F401  (imported here once: forked workers inherit it)
    from torchvision.transforms.v2 import functional  # noqa: F401

    workers = workers or os.cpu_count() or 1
    chunk = chunk or max(16, min(256, len(paths) // (workers * 16)))  # few in memory at once
    starts = range(0, len(paths), chunk)
    jobs = [([str(p) for p in paths[i:i + chunk]], size, mode) for i in starts]
    if workers == 1 or len(jobs) <= 1:
        for start, job in zip(starts, jobs):
            threads = torch.get_num_threads()
            block, bad = _read_chunk(job)
            torch.set_num_threads(threads)  # a worker's one thread, not this process's for good
            yield start, block, [(paths[start + i], reason) for i, reason in bad]
        return
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for start, (block, bad) in zip(starts, _bounded_map(pool, jobs, 2 * workers)):
            yield start, block, [(paths[start + i], reason) for i, reason in bad]


def _bounded_map(pool: ProcessPoolExecutor, jobs: list, ahead: int) -> Iterator:
    """pool.map in order with at most `ahead` chunks decoded and not yet consumed."""
    pending = [pool.submit(_read_chunk, job) for job in jobs[:ahead]]
    for i in range(len(jobs)):
        result = pending.pop(0).result()
        if i + ahead < len(jobs):
            pending.append(pool.submit(_read_chunk, jobs[i + ahead]))
        yield result


def read_images(paths: list[Path], size: int, mode: str, workers: int = 0,
                progress: Callable[[int], None] | None = None
                ) -> tuple[torch.Tensor, list[tuple[Path, str]]]:
    """Many files as one uint8 (N, 3, size, size) tensor (the rows of unreadable files are
    zeros) and the (path, reason) of those files. `progress(n)` is called as chunks finish."""
    images = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    bad: list[tuple[Path, str]] = []
    for start, block, block_bad in decode_chunks(paths, size, mode, workers):
        images[start:start + len(block)] = block
        bad += block_bad
        if progress is not None:
            progress(len(block))
    return torch.from_numpy(images), bad
