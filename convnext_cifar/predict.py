"""`predict`: classify image files with a checkpoint, preprocessed as its training data was.

Every image is decoded and resized to the size the dataset stored (32 for CIFAR, the image size
for folders; `images.read_image` with the checkpoint's resize mode), then normalised, resized
and run in batches on the device exactly as `evaluate` runs test images (the same
`predict_logits`, with flip TTA if asked), so predictions equal `eval`'s on the same pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from convnext_cifar.checkpoints import load_weights
from convnext_cifar.datasets import stored_size
from convnext_cifar.engine import checkpoint_run, predict_logits
from convnext_cifar.errors import UserError
from convnext_cifar.files import atomic_write_bytes
from convnext_cifar.images import is_image, read_images
from convnext_cifar.runtime import resolve_runtime


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
    ckpt = load_weights(ckpt_path)
    num_classes = len(ckpt.classes)
    if not 1 <= top_k <= num_classes:
        raise UserError(f"--top-k {top_k}: must be between 1 and the {num_classes} classes of "
                        f"{ckpt_path}")
    cfg = dataclasses.replace(ckpt.config, device=device or ckpt.config.device)
    rt = resolve_runtime(cfg)
    run = checkpoint_run(ckpt, ckpt_path, cfg, rt)
    files, failed = image_paths(paths)
    if not files:
        raise UserError("no image files (.png, .jpg, .jpeg, .bmp, .webp, .gif) in "
                        + ", ".join(str(p) for p in paths))
    images, bad = read_images(files, stored_size(cfg.data), cfg.data.resize, cfg.data.workers)
    failed += bad
    unreadable = {p for p, _ in bad}
    keep = [i for i, f in enumerate(files) if f not in unreadable]
    images, files = images[keep], [files[i] for i in keep]
    probs = class_probabilities(run, images, batch_size, tta or cfg.eval.tta)
    top = probs.topk(top_k, dim=1)
    predictions = [Prediction(str(f), [ckpt.classes[j] for j in idx], p)
                   for f, idx, p in zip(files, top.indices.tolist(), top.values.tolist())]
    return predictions, failed


@torch.inference_mode()
def class_probabilities(run, images: torch.Tensor, batch_size: int, tta: str) -> torch.Tensor:
    """Softmax over the classes for uint8 images, batched on the run's device (N, classes)."""
    run.forward.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = run.normalize(images[i:i + batch_size].to(run.rt.device))
        out.append(predict_logits(run.forward, x, run.rt, tta).softmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(run.data.classes))


def write_csv(path: Path, predictions: list[Prediction], top_k: int) -> None:
    """path, class_1, prob_1, ..., class_k, prob_k; written to a temporary name, then renamed."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path"] + [f"{name}_{i}" for i in range(1, top_k + 1)
                                for name in ("class", "prob")])
    for p in predictions:
        writer.writerow([p.path] + [v for c, q in zip(p.classes, p.probs) for v in (c, f"{q:.6f}")])
    try:
        atomic_write_bytes(path, text.getvalue().encode())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; give --csv a writable path"
                        ) from None
