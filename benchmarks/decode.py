"""Image-folder speed: decoding (cold), a cached start, and the training loop on folder data
next to the same loop on CIFAR-layout data of the same size, in one process.

    python -m benchmarks.decode                       # 50,000 32x32 PNGs, 2,000 500x375 JPEGs
    python -m benchmarks.decode --png 5000 --jpeg 500 --json

The images are generated into a temporary folder (class folders, as users keep them). `decode`
is `data.kinds.load_dataset` with no cache (what a first run does: list, decode in worker
processes, resize, write the cache); `cached start` is the same call again (what every later
run does). The loop figures come from `benchmarks.throughput.measure` (the real
`train_one_epoch`) on the decoded folder images and on random images of the same size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass(frozen=True)
class Args:
    png: int = 50_000
    """32x32 PNG files (the cached-start target is for 50,000)."""
    jpeg: int = 2_000
    """500x375 JPEG files, resized to 32."""
    classes: int = 10
    """Class folders."""
    workers: int = 0
    """Decoding processes (0: one per core)."""
    loop_model: str = "convnextv2_atto"
    """Model of the loop comparison."""
    json: bool = False
    """Print one JSON object instead of lines."""
    out: Path | None = None
    """Also write the JSON object to this file."""


def write_pngs(root: Path, count: int, classes: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:06d}.png", compress_level=1)
    for c in range(classes):  # a small val split, as a real folder has
        folder = root / "val" / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / "v.png")


def write_jpegs(root: Path, count: int, classes: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / ("train" if i >= classes else "val") / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:06d}.jpg", quality=90)


def time_load(cfg) -> tuple[float, object]:
    from convnext_cifar.data.kinds import load_dataset

    t0 = time.perf_counter()
    data = load_dataset(cfg)
    return time.perf_counter() - t0, data


def main(args: Args) -> dict:
    import torch
    import torchvision.io  # noqa: F401  (a one-off import, not part of the decode figure)
    from torchvision.transforms.v2 import functional  # noqa: F401

    from benchmarks import throughput
    from convnext_cifar.config import DataConfig

    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "workers": args.workers or __import__("os").cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    try:
        for kind, count, write in (("png_32", args.png, write_pngs),
                                   ("jpeg_500x375", args.jpeg, write_jpegs)):
            if not count:
                continue
            root = tmp / kind
            write(root, count, args.classes)
            cfg = DataConfig(dataset="folder", root=root, decode_processes=args.workers)
            cold, data = time_load(cfg)
            warm = statistics.median(time_load(cfg)[0] for _ in range(3))
            images = len(data.train.images) + len(data.val.images)
            result[kind] = {"images": images, "decode_s": cold, "decode_img_per_s": images / cold,
                            "cached_start_s": warm}
            print(f"{kind}: {images} images decoded in {cold:.1f} s ({images / cold:.0f} img/s); "
                  f"cached start {warm:.2f} s", file=sys.stderr, flush=True)
            if kind == "png_32":
                result["loop"] = compare_loops(args, data, throughput)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result) + "\n")
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


def compare_loops(args: Args, folder_data, throughput) -> dict:
    """The real training loop on the folder's images and on CIFAR-layout random images."""
    import torch

    bench = throughput.Args(model=args.loop_model, batch_size=128, steps=8, windows=3,
                            image_size=32, quick=True, baseline=False,
                            num_classes=folder_data.num_classes, peak_sizes=(256,))
    device = torch.device("cpu")
    precision, channels_last, compile_on = throughput.default_settings(bench, device)
    n = bench.batch_size * bench.steps
    folder = dataclasses.replace(folder_data, train=dataclasses.replace(
        folder_data.train, images=folder_data.train.images[:n],
        labels=folder_data.train.labels[:n]))
    out = {}
    for name, data in (("folder", folder),
                       ("cifar_layout", throughput.synthetic_dataset(bench, device,
                                                                     folder.num_classes))):
        row = throughput.measure(bench, device, precision, channels_last, compile_on, {},
                                 data=data)
        out[name] = row["loop_img_per_s"]
        print(f"loop on {name} data: {row['loop_img_per_s']:.1f} img/s", file=sys.stderr)
    return out


def cli() -> None:
    main(tyro.cli(Args))


if __name__ == "__main__":
    cli()
