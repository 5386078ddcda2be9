"""A trained model in use: a checkpoint loaded into everything needed to run it, the held-out
split it was validated on (checked against it), evaluation of a held-out split, and the `eval`
command. `predict` and `export` build on `load_model`, the report on `load_held_out`; the
trainer's validation calls `evaluate`. Nothing here imports the trainer (training/).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convnext_cifar.config import DataConfig, TrainConfig
from convnext_cifar.data.dataset import Dataset, class_difference, identity_difference
from convnext_cifar.data.kinds import load_dataset, normalisation, stored_size
from convnext_cifar.data.loader import Normalize, eval_batches
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError
from convnext_cifar.metrics import AGREEMENT, LOSS, METRICS, TEACHER_KL
from convnext_cifar.model.build import build_model, layout_mismatch
from convnext_cifar.model.checkpoints import Checkpoint, load_weights, weights_in
from convnext_cifar.runtime import (
    Runtime,
    configure_backends,
    device_problem,
    is_out_of_memory,
    prepare_model,
    release_cached,
    resolve_runtime,
)
from convnext_cifar.terminal import warn
from convnext_cifar.use.onnx_file import RawImages, is_onnx, open_onnx


@dataclass
class LoadedModel:
    """A checkpoint ready to run: its model (and the module to call, maybe compiled) on a
    runtime, the normalisation and classes it was trained with, its config and TTA."""

    path: Path
    checkpoint: Checkpoint
    cfg: TrainConfig  # the checkpoint's config, with the overrides it was loaded with
    rt: Runtime
    model: torch.nn.Module
    forward: torch.nn.Module
    normalize: Normalize
    tta: str

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) on 0-255 pixels, as the run recorded them."""
        return normalisation(self.cfg.data)

    @property
    def stored_size(self) -> int:
        """The side the training data stored its images at: what inputs are resized to first."""
        return stored_size(self.cfg.data)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Softmax over the classes for uint8 images at the stored size, batched on the
        device; (N, classes) on the CPU."""
        self.forward.eval()
        batches = BackOff(batch_size, self.forward, self.rt, self.tta, self.model)
        out = [batches.logits(self.normalize(chunk.to(self.rt.device))).softmax(1).cpu()
               for chunk in images.split(batch_size)]
        return torch.cat(out) if out else torch.empty(0, len(self.classes))


def load_model(path: Path, device: str | None = None, tta: str | None = None,
               rt: Runtime | None = None, compile: bool | None = None) -> LoadedModel:
    """The model a checkpoint describes, with its weights, ready to run on `rt` (default:
    `device`, else the recorded device where this machine has it, resolved as `train` does;
    compiled as the run was, unless `compile` says otherwise). An exported `.onnx` file runs
    with ONNX Runtime on the CPU, with the config, classes and data identity it carries."""
    if is_onnx(path):
        return _load_onnx(Path(path), device, tta)
    path = weights_in(Path(path))  # a work dir: its best.safetensors
    ckpt = load_weights(path)
    if device is None and (problem := device_problem(ckpt.config.device)):
        print(f"note: {path} was trained on {ckpt.config.device}, which is not here ({problem}); "
              "running on --device auto", file=sys.stderr)
        device = "auto"
    cfg = dataclasses.replace(ckpt.config, device=device or ckpt.config.device,
                              eval=dataclasses.replace(ckpt.config.eval,
                                                       tta=tta or ckpt.config.eval.tta))
    rt = rt or resolve_runtime(cfg)
    if compile is not None:
        rt = dataclasses.replace(rt, compile=compile and rt.compile)
    configure_backends(rt)
    model_cfg = dataclasses.replace(cfg.model, pretrained="none")  # the weights come next
    model, forward = prepare_model(build_model(model_cfg, len(ckpt.classes)), rt)
    if problem := layout_mismatch(model, ckpt.state_dict):
        raise UserError(f"{path} does not match the model its metadata describes ({problem}); "
                        "the file is damaged or was edited")
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    normalize = Normalize(*normalisation(cfg.data), cfg.data.image_size, rt.device,
                          rt.channels_last)
    return LoadedModel(Path(path), ckpt, cfg, rt, model, forward, normalize, cfg.eval.tta)


def _load_onnx(path: Path, device: str | None, tta: str | None) -> LoadedModel:
    if device not in (None, "auto", "cpu"):
        raise UserError(f"--device {device}: an .onnx file runs on the CPU (ONNX Runtime's CPU "
                        "provider); leave --device out, or evaluate the checkpoint instead")
    ckpt, module, _ = open_onnx(path)
    cfg = dataclasses.replace(ckpt.config, device="cpu",
                              eval=dataclasses.replace(ckpt.config.eval,
                                                       tta=tta or ckpt.config.eval.tta))
    rt = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=False)
    make = RawImages if module.uint8_input else Normalize
    normalize = make(*normalisation(cfg.data), cfg.data.image_size, rt.device, False)
    return LoadedModel(path, ckpt, cfg, rt, module, module, normalize, cfg.eval.tta)


# ---- evaluation ----------------------------------------------------------------------------------

@dataclass
class EvalResult:
    num_images: int
    loss: float
    top1: float
    top5: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    agreement: float | None = None  # % of images whose top class is the reference's
    reference_kl: float | None = None  # mean KL(reference || these predictions)

    def record(self) -> dict[str, float]:
        """The validation metrics by their names (metrics.py): val_loss, top1, top5, ..., and
        with a reference (a distillation teacher) the agreement with it."""
        out = {LOSS: self.loss, **{name: getattr(self, name) for name in METRICS}}
        if self.agreement is not None:
            out.update({AGREEMENT: self.agreement, TEACHER_KL: self.reference_kl})
        return out

    def per_class(self, classes: list[str]) -> dict[str, float]:
        return {name: 100.0 * row[i] / max(sum(row), 1)
                for i, (name, row) in enumerate(zip(classes, self.confusion))}

    @property
    def balanced_accuracy(self) -> float:
        """Mean recall over the classes present in the labels, in percent."""
        recalls = [row[i] / sum(row) for i, row in enumerate(self.confusion) if sum(row)]
        return 100.0 * sum(recalls) / max(len(recalls), 1)

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the classes present in the labels, in percent (F1 = 0 for a class
        never predicted right)."""
        scores = []
        for i, row in enumerate(self.confusion):
            if not sum(row):
                continue
            predicted = sum(r[i] for r in self.confusion)
            hits = row[i]
            scores.append(2.0 * hits / (sum(row) + predicted) if hits else 0.0)
        return 100.0 * sum(scores) / max(len(scores), 1)


def predict_logits(forward: torch.nn.Module, x: torch.Tensor, rt: Runtime,
                   tta: str = "none") -> torch.Tensor:
    """fp32 logits of a normalised batch; with flip TTA the log of the mean softmax of the image
    and its mirror (so softmax, argmax and the loss all see the averaged probabilities)."""
    with rt.autocast():
        logits = forward(x)
        if tta == "flip":
            logits = logits.clone()  # a CUDA-graph replay writes its next output over this one
            mirrored = forward(x.flip(3))
    if tta != "flip":
        return logits.float()
    probs = (logits.float().softmax(1) + mirrored.float().softmax(1)) / 2
    return probs.log()


class BackOff:
    """Evaluation batches that halve where they run out of memory: the batch that failed is
    run again in parts, and the smaller size holds for the rest of the pass (said once per
    process). The counts are per image, so the result is the full batches' result. A batch of
    another size than `batch_size` runs through `eager` (when given), not a second graph."""

    said: set[tuple[str, int, int]] = set()

    def __init__(self, batch_size: int, forward: torch.nn.Module, rt: Runtime,
                 tta: str = "none", eager: torch.nn.Module | None = None):
        self.full = self.rows = batch_size
        self.forward, self.rt, self.tta, self.eager = forward, rt, tta, eager

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """predict_logits of `x`, in parts of at most `rows` images."""
        parts, done = [], 0
        while done < len(x):
            part = x[done:done + self.rows]
            forward = self.eager if self.eager is not None and len(part) != self.full \
                else self.forward
            try:
                parts.append(predict_logits(forward, part, self.rt, self.tta))
                done += len(part)
                continue
            except Exception as e:  # noqa: BLE001 - only running out of memory is retried
                if not is_out_of_memory(e) or len(part) == 1:
                    raise
            self.rows = len(part) // 2  # the error (and what its frames held) is gone here
            release_cached(self.rt.device)
            self._say()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _say(self) -> None:
        key = (str(self.rt.device), self.full, self.rows)
        if key not in BackOff.said:
            BackOff.said.add(key)
            warn(f"evaluation ran out of memory on {self.rt.device} at {self.full} images a "
                 f"batch; it goes on in batches of {self.rows} (--data.eval-batch-size "
                 f"{self.rows} saves the retries)")


@torch.inference_mode()
def evaluate(forward: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int, normalize: Normalize, rt: Runtime, num_classes: int,
             dist: Dist | None = None, tta: str = "none",
             eager: torch.nn.Module | None = None,
             reference: torch.Tensor | None = None) -> EvalResult:
    """Every image once, in order; counts stay on the device until the end.

    Under DDP each rank takes a contiguous share of the images and the counts are added across
    ranks, so every image is counted once and every rank gets the same result. A last, smaller
    batch runs through `eager` (the uncompiled module), when given, not a second graph; a batch
    that runs out of memory is redone in halves (BackOff). `reference` (log-probabilities of
    this rank's share, e.g. a teacher's) adds how often the top classes agree and the mean KL
    divergence from it.
    """
    forward.eval()
    dist = dist or Dist()
    n = len(images)
    lo, hi = dist.shard(n)
    dev = normalize.mean.device  # the images may live in host memory (Dataset.placement)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    top1 = torch.zeros((), dtype=torch.int64, device=dev)
    top5 = torch.zeros((), dtype=torch.int64, device=dev)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=dev)
    agree = torch.zeros((), dtype=torch.int64, device=dev)
    kl_sum = torch.zeros((), dtype=torch.float64, device=dev)
    k, done = min(5, num_classes), 0
    batches = BackOff(batch_size, forward, rt, tta, eager)
    for x, y in eval_batches(images, labels, batch_size, normalize, lo, hi):
        logits = batches.logits(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        if reference is not None:
            ref = reference[done:done + len(x)]
            agree += (topk[:, 0] == ref.argmax(dim=1)).sum()
            kl_sum += F.kl_div(logits.log_softmax(dim=1), ref, reduction="sum", log_target=True)
            done += len(x)
        top1 += (topk[:, 0] == y).sum()
        top5 += (topk == y[:, None]).any(dim=1).sum()
        cell = y * num_classes + topk[:, 0]  # scatter_add: bincount would read its max
        confusion.scatter_add_(0, cell, torch.ones_like(cell))
    sums = dist.all_reduce_sum(torch.stack([loss_sum, top1.double(), top5.double(),
                                            agree.double(), kl_sum]))
    confusion = dist.all_reduce_sum(confusion)
    loss_total, top1_count, top5_count, agree_count, kl_total = sums.tolist()
    return EvalResult(n, loss_total / n, 100.0 * int(top1_count) / n, 100.0 * int(top5_count) / n,
                      confusion.view(num_classes, num_classes).tolist(),
                      *((100.0 * int(agree_count) / n, kl_total / n) if reference is not None
                        else (None, None)))


# ---- the held-out split of a checkpoint, and the eval command -----------------------------------

def load_held_out(loaded: LoadedModel, data_root: Path | None = None,
                  download: bool | None = None, batch_size: int | None = None,
                  device: torch.device | str | None = None, train: bool = False
                  ) -> tuple[Dataset, DataConfig]:
    """The dataset a checkpoint was validated on (with `train`, its training split too) on
    `device` (default: the model's), and the data config it was read with. Its classes must be
    the checkpoint's; its held-out images must be the ones the run validated on, unless
    `data_root` names other data on purpose (then a note says the numbers are for these)."""
    changes = {k: v for k, v in (("root", data_root), ("download", download),
                                 ("eval_batch_size", batch_size)) if v is not None}
    data_cfg = dataclasses.replace(loaded.cfg.data, **changes)
    data = load_dataset(data_cfg, loaded.rt.device if device is None else device, train=train)
    path = loaded.path
    if difference := class_difference(loaded.classes, data.classes, "missing", "not trained on",
                                      "the same names in another order"):
        raise UserError(f"{data_cfg.root} does not hold the classes {path} was trained on ("
                        f"{difference}); evaluate a dataset with the same class folders")
    recorded = loaded.checkpoint.identity
    if recorded and (difference := identity_difference(recorded, data.identity, ("val",))):
        if data_root is None:  # the run's own data, changed: its numbers would not compare
            raise UserError(f"{data_cfg.root} no longer holds the held-out images {path} was "
                            f"validated on ({difference}); to evaluate these images anyway, "
                            f"name them: --data.root {data_cfg.root}")
        data.notes.append(f"{data_cfg.root} holds other images than the run's held-out split "
                          f"({difference}): the numbers are for these images")
    return data, data_cfg


def evaluate_checkpoint(path: Path, data_root: Path | None = None, download: bool | None = None,
                        device: str | None = None, batch_size: int | None = None,
                        tta: str | None = None, compile: bool | None = None) -> dict[str, Any]:
    """Rebuild the model from a checkpoint's own metadata and evaluate its held-out split
    (compiled as the run was, unless `compile` says otherwise)."""
    loaded = load_model(path, device, tta, compile=compile)
    data, data_cfg = load_held_out(loaded, data_root, download, batch_size)
    res = evaluate(loaded.forward, data.val.images, data.val.labels, data_cfg.eval_batch_size,
                   loaded.normalize, loaded.rt, data.num_classes, tta=loaded.tta,
                   eager=loaded.model)
    for note in data.notes:
        warn(note)
    ckpt = loaded.checkpoint
    return {"checkpoint": str(path), "epoch": ckpt.epoch, "weights": ckpt.weights,
            "tta": loaded.tta, "num_images": res.num_images,
            **{name: getattr(res, name) for name in METRICS}, "loss": res.loss,
            "per_class": res.per_class(data.classes), "confusion": res.confusion,
            "recorded": ckpt.metrics}
