"""Where the images live (--data.placement): device, host and disk, side by side on folder data.

    python -m benchmarks.placement          # 32 px x 30,000; 128 px x 5,000 and x 20,000
    python -m benchmarks.placement --sizes 32 --images 5000 --json

Generates an image folder per size (PNG at 32 px; JPEG at 1.25 x the size otherwise, resized
when decoded), decodes it once into its cache, then measures each placement in a process of its
own (so that its peak resident memory is its own):

  feed       the loader's gather alone over `--batches` batches of one epoch's order: device
             indexing, or the staging buffers filled by the reader thread (host, disk)
  loader     the whole `DeviceLoader.epoch`: gather, crop/flip, normalise (what the step gets)
  cold/warm  disk only: the cache's pages evicted from the page cache first (posix_fadvise
             DONTNEED after a sync; no root needed), or read once before
  loop       with --loop-model: `benchmarks.throughput.measure` (the real train_one_epoch) on
             the first batches of the same data, device vs disk, at --loop-size
  RSS        peak resident memory of the process before the loop, and what loading and the
             passes added to it

On the CPU there is no host memory apart from the device's: `host` there is the staged path
(the reader thread gathering from a tensor in memory into the staging buffers), which is the
host-side half of what host placement does on a GPU. Figures compare only within one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass(frozen=True)
class Args:
    sizes: tuple[int, ...] = (32, 128, 128)
    """Image sizes (--data.image-size) to measure, one folder each."""
    images: tuple[int, ...] = (30_000, 5_000, 20_000)
    """Training images of each folder (the same size twice: memory against cache size)."""
    batch_size: int = 128
    """Global batch."""
    batches: int = 80
    """Batches per timed pass (at most one epoch)."""
    loop_model: str = ""
    """Also time the training loop with this model, device vs disk ('' : not)."""
    loop_steps: int = 8
    """Steps per loop window."""
    loop_size: int = 32
    """The image size at which the loop is timed."""
    device: str = "auto"
    """cpu, cuda or auto."""
    json: bool = False
    """Print one JSON object instead of the table."""
    out: Path | None = None
    """Also write the JSON object to this file."""
    worker: str = ""
    """(internal) root,size,placement,loop-model of one measuring process."""


def write_folder(root: Path, count: int, size: int, classes: int = 10) -> None:
    """count training images (and 10 per class held out) of random smooth pixels, as PNG at
    32 px, as JPEG at 1.25 x size otherwise (decoded and resized to size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = 32 if size == 32 else size * 5 // 4
    base = rng.integers(0, 256, (side // 4, side // 4, 3), dtype=np.uint8)
    for split, n in (("train", count), ("val", 10 * classes)):
        for i in range(n):
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            small = np.roll(base, i, axis=0) ^ rng.integers(0, 64, base.shape, dtype=np.uint8)
            image = Image.fromarray(small).resize((side, side))
            if size == 32:
                image.save(folder / f"{i:06d}.png", compress_level=1)
            else:
                image.save(folder / f"{i:06d}.jpg", quality=90)


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only: written back first)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(field: str = "VmRSS") -> int:
    """This process's resident bytes now (VmRSS) or at their peak (VmHWM: unlike ru_maxrss,
    not carried over from the parent across fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def data_config(root: Path, size: int, placement: str, batch: int):
    from convnext_cifar.config import DataConfig

    return DataConfig(dataset="folder", root=root, download=False, image_size=size,
                      placement=placement, batch_size=batch)


def measure_one(args: Args, root: Path, size: int, placement: str) -> dict:
    """One placement at one size, in this (fresh) process."""
    import torch

    from convnext_cifar.data.cache import DiskImages
    from convnext_cifar.data.kinds import load_dataset
    from convnext_cifar.data.loader import DeviceLoader, Normalize, Staging
    from convnext_cifar.distributed import Dist
    from convnext_cifar.runtime import resolve_device

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = resident()
    staged_host = placement == "host" and device.type == "cpu"
    cfg = data_config(root, size, "device" if staged_host else placement, args.batch_size)
    t0 = time.perf_counter()
    data = load_dataset(cfg, device)
    load_s = time.perf_counter() - t0
    normalize = Normalize(data.mean, data.std, size, device, device.type == "cuda")
    loader = DeviceLoader(data.train.images, data.train.labels, cfg, 0, normalize, Dist())
    if staged_host:  # the CPU's host path: staged from memory (a GPU pins and copies too)
        loader.staging = Staging(data.train.images, data.train.labels, device, args.batch_size)
    files = [s.images.path for s in (data.train, data.val) if isinstance(s.images, DiskImages)]
    row: dict = {"size": size, "placement": data.placement if not staged_host else "host",
                 "images": len(data.train), "cache_mb": data.train.images.nbytes / 2**20,
                 "load_s": load_s, **passes(args, loader, files, sync)}
    row["peak_rss_mb"] = resident("VmHWM") / 2**20
    row["rss_over_start_mb"] = (resident() - base) / 2**20
    if args.loop_model and placement in ("device", "disk") and size == args.loop_size:
        row["loop_img_per_s"] = loop(args, data, device)
    return row


def passes(args: Args, loader, files: list[Path], sync) -> dict:
    """feed and loader img/s, warm, and cold where the images are read from `files`."""
    batches, b = min(args.batches, len(loader)), args.batch_size
    epoch = iter(range(1, 1000))

    def feed() -> float:
        order = loader._order(loader.generators)
        if loader.staging is not None:
            order = order.cpu()
        t = time.perf_counter()
        for _ in loader._gathered([order[i * b:(i + 1) * b] for i in range(batches)]):
            pass
        sync()
        return batches * b / (time.perf_counter() - t)

    def whole() -> float:
        t = time.perf_counter()
        for i, _ in enumerate(loader.epoch(next(epoch))):
            if i + 1 == batches:
                break
        sync()
        return batches * b / (time.perf_counter() - t)

    loader.generators.seed(0, 0)
    row = {}
    if files:
        evict(files)
        row["feed_cold_img_per_s"] = feed()
    row["feed_img_per_s"] = feed()
    row["loader_img_per_s"] = whole()
    if files:
        evict(files)
        row["loader_cold_img_per_s"] = whole()
    return row


def loop(args: Args, data, device) -> float:
    """The real training loop (benchmarks.throughput) on the first batches of `data`."""
    from benchmarks import throughput
    from convnext_cifar.data.cache import DiskImages

    bench = throughput.Args(model=args.loop_model, batch_size=args.batch_size,
                            steps=args.loop_steps, windows=3, image_size=data.val.images.shape[-1],
                            quick=True, baseline=False, num_classes=data.num_classes,
                            peak_sizes=(256,))
    n = args.batch_size * args.loop_steps
    images = data.train.images
    head = (DiskImages(images.path, images.offset, images.rows[:n], images.size)
            if isinstance(images, DiskImages) else images[:n])
    data = dataclasses.replace(data, train=dataclasses.replace(
        data.train, images=head, labels=data.train.labels[:n]))
    precision, channels_last, compile_on = throughput.default_settings(bench, device)
    row = throughput.measure(bench, device, precision, channels_last, compile_on, {}, data=data)
    return row["loop_img_per_s"]


def main(args: Args) -> dict:
    if args.worker:
        root, size, placement = args.worker.split(",")
        print(json.dumps(measure_one(args, Path(root), int(size), placement)))
        return {}
    from convnext_cifar.data.kinds import load_dataset

    result: dict = {"rows": [], "cpu_count": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="placement-bench-"))
    try:
        for size, count in zip(args.sizes, args.images):
            root = tmp / f"px{size}-{count}"
            t0 = time.perf_counter()
            write_folder(root, count, size)
            written = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_dataset(data_config(root, size, "disk", args.batch_size))  # decode, cache
            print(f"{size} px: {count} images written in {written:.0f} s, decoded into the "
                  f"cache in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for placement in ("device", "host", "disk"):
                worker = [sys.executable, "-m", "benchmarks.placement", "--worker",
                          f"{root},{size},{placement}", "--batch-size", str(args.batch_size),
                          "--batches", str(args.batches), "--device", args.device,
                          "--loop-model", args.loop_model, "--loop-steps",
                          str(args.loop_steps), "--loop-size", str(args.loop_size)]
                out = subprocess.run(worker, capture_output=True, text=True)
                if out.returncode != 0:
                    result["rows"].append({"size": size, "placement": placement,
                                           "error": out.stderr[-2000:]})
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                result["rows"].append(row)
                print(line(row), file=sys.stderr, flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result) + "\n")
    print(json.dumps(result) if args.json else table(result["rows"]))
    return result


def line(row: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in row.items())


COLUMNS = [("size", "px"), ("placement", "placement"), ("images", "images"),
           ("cache_mb", "cache MB"), ("feed_cold_img_per_s", "feed cold img/s"),
           ("feed_img_per_s", "feed warm img/s"), ("loader_cold_img_per_s", "loader cold img/s"),
           ("loader_img_per_s", "loader warm img/s"), ("loop_img_per_s", "loop img/s"),
           ("peak_rss_mb", "peak RSS MB"), ("rss_over_start_mb", "RSS added MB"),
           ("load_s", "load s")]


def table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key, "-")
            cells.append(f"{value:,.0f}" if isinstance(value, float) and key != "load_s"
                         else f"{value:.2f}" if isinstance(value, float) else str(value))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def cli() -> None:
    main(tyro.cli(Args))


if __name__ == "__main__":
    cli()
