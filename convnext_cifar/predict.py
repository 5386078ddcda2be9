"""`predict`: classify image files with a checkpoint, preprocessed as its training data was.

Every image is decoded and resized to the size the dataset stored (32 for CIFAR, the image size
for folders; `images.read_image` with the checkpoint's resize mode), then normalised, resized
and run in batches on the device exactly as `evaluate` runs test images (the same
`predict_logits`, with flip TTA if asked, through `evaluate.load_model`), so predictions equal
`eval`'s on the same pixels.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from convnext_cifar.errors import UserError
from convnext_cifar.evaluate import load_model
from convnext_cifar.files import write_file
from convnext_cifar.images import is_image, read_images


@dataclass
class Prediction:
    path: str
    classes: list[str]  # the top k, most probable first
    probs: list[float]

    def as_dict(self) -> dict:
        return {"path": self.path,
                "top_k": [{"class": c, "prob": p} for c, p in zip(self.classes, self.probs)]}


def image_paths(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files named or found (recursively) in the folders named, in order; and the
    paths that are neither, with why."""
    found, failed = [], []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_image(p))
        elif path.is_file():
            found.append(path)
        else:
            failed.append((path, "no such file or folder"))
    return found, failed


def predict(ckpt_path: Path, paths: list[Path], batch_size: int = 256, top_k: int = 5,
            tta: str | None = None, device: str | None = None
            ) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Top-k predictions for every readable image; and the (path, reason) of the others."""
    model = load_model(ckpt_path, device, tta)
    num_classes = len(model.classes)
    if not 1 <= top_k <= num_classes:
        raise UserError(f"--top-k {top_k}: must be between 1 and the {num_classes} classes of "
                        f"{ckpt_path}")
    files, failed = image_paths(paths)
    if not files:
        raise UserError("no image files (.png, .jpg, .jpeg, .bmp, .webp, .gif) in "
                        + ", ".join(str(p) for p in paths))
    data_cfg = model.cfg.data
    images, bad = read_images(files, model.stored_size, data_cfg.resize, data_cfg.workers)
    failed += bad
    unreadable = {p for p, _ in bad}
    keep = [i for i, f in enumerate(files) if f not in unreadable]
    images, files = images[keep], [files[i] for i in keep]
    top = model.probabilities(images, batch_size).topk(top_k, dim=1)
    predictions = [Prediction(str(f), [model.classes[j] for j in idx], p)
                   for f, idx, p in zip(files, top.indices.tolist(), top.values.tolist())]
    return predictions, failed


def write_csv(path: Path, predictions: list[Prediction], top_k: int) -> None:
    """path, class_1, prob_1, ..., class_k, prob_k; written to a temporary name, then renamed."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path"] + [f"{name}_{i}" for i in range(1, top_k + 1)
                                for name in ("class", "prob")])
    for p in predictions:
        writer.writerow([p.path] + [v for c, q in zip(p.classes, p.probs) for v in (c, f"{q:.6f}")])
    write_file(path, text.getvalue().encode(), advice="give --csv a writable path")
