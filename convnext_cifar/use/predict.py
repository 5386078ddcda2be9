"""`predict`: classify image files with a checkpoint, preprocessed as its training data was.

Every image is decoded and resized to the size the dataset stored (32 for CIFAR, the image size
for folders; `images.read_image` with the checkpoint's resize mode), then normalised, resized
and run in batches on the device exactly as `evaluate` runs test images (the same
`predict_logits`, with flip TTA if asked, through `evaluate.load_model`), so predictions equal
`eval`'s on the same pixels.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from convnext_cifar.data.images import decode_chunks, is_image
from convnext_cifar.errors import UserError
from convnext_cifar.files import atomic_writer, spreadsheet_cell
from convnext_cifar.use.evaluate import LoadedModel, load_model


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


def predict(ckpt_path: Path, paths: list[Path], batch_size: int = 256, top_k: int | None = None,
            tta: str | None = None, device: str | None = None, compile: bool | None = False
            ) -> tuple[int, Iterator[tuple[list[Prediction], list[tuple[Path, str]]]]]:
    """(k, the top-k predictions a batch of files at a time: the readable files' predictions,
    the (path, reason) of the others); k is `top_k`, by default 5 or the class count when there
    are fewer. Only a few batches of images are in memory at once, so any number of files can be
    predicted; checkpoint and path errors come before the first batch. The model runs uncompiled
    unless `compile` (and the run compiled): for a one-off pass a cold compile costs more than
    it saves, but for a very large one."""
    model = load_model(ckpt_path, device, tta, compile=compile)
    num_classes = len(model.classes)
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, num_classes)
    if not 1 <= top_k <= num_classes:
        raise UserError(f"--top-k {top_k}: must be between 1 and the {num_classes} classes of "
                        f"{ckpt_path}")
    files, failed = image_paths(paths)
    if not files:
        missing = [str(p) for p, _ in failed]
        if missing:  # nothing to predict, and a path given is not there: that is the news
            raise UserError(f"{', '.join(missing)}: no such file or folder; give image files "
                            "or folders of them")
        raise UserError("no image files (.png, .jpg, .jpeg, .bmp, .webp, .gif) in "
                        + ", ".join(str(p) for p in paths))
    return top_k, _predictions(model, files, failed, batch_size, top_k)


DEFAULT_TOP_K = 5


def _predictions(model: LoadedModel, files: list[Path], failed: list[tuple[Path, str]],
                 batch_size: int, top_k: int
                 ) -> Iterator[tuple[list[Prediction], list[tuple[Path, str]]]]:
    yield [], failed  # the paths that are no files, at once
    data = model.cfg.data
    for start, block, bad in decode_chunks(files, model.stored_size, data.resize,
                                           data.decode_processes, chunk=batch_size):
        unreadable = {p for p, _ in bad}
        keep = [i for i, f in enumerate(files[start:start + len(block)]) if f not in unreadable]
        images = torch.from_numpy(block[keep])
        top = model.probabilities(images, batch_size).topk(top_k, dim=1)
        yield [Prediction(str(files[start + i]), [model.classes[j] for j in idx], p)
               for i, idx, p in zip(keep, top.indices.tolist(), top.values.tolist())], bad


class CsvWriter:
    """path, class_1, prob_1, ..., class_k, prob_k, row by row into a temporary file that is
    renamed to `path` when every row is in (a failure leaves no partial file)."""

    def __init__(self, path: Path, top_k: int):
        self.path, self.top_k, self.stack = Path(path), top_k, contextlib.ExitStack()

    def __enter__(self) -> CsvWriter:
        try:
            self.file = self.stack.enter_context(atomic_writer(self.path))
        except OSError as e:
            raise UserError(f"could not write {self.path}: {e.strerror or e}; give --csv a "
                            "writable path") from None
        self._rows([["path"] + [f"{name}_{i}" for i in range(1, self.top_k + 1)
                                for name in ("class", "prob")]])
        return self

    def write(self, predictions: list[Prediction]) -> None:
        cell = spreadsheet_cell
        self._rows([[cell(p.path)] + [v for c, q in zip(p.classes, p.probs)
                                      for v in (cell(c), f"{q:.6f}")] for p in predictions])

    def _rows(self, rows: list[list[str]]) -> None:
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        self.file.write(os.fsencode(text.getvalue()))  # file names as their own bytes

    def __exit__(self, *exc) -> bool:
        return self.stack.__exit__(*exc)


