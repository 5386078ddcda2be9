"""Distillation (`--distill.*`): a trained teacher that sees every training batch exactly as the
student does, the loss that learns from it, and how far the two agree.

The teacher is a checkpoint of this project, frozen, in eval mode, run under the run's
precision, memory format and compile. It gets the student's augmented device batch itself (the
same crop, flip, RandAugment, erasing and MixUp/CutMix), normalised as the teacher was trained
and resized on the device to its input size: a "consistent teacher" (Beyer et al., 2022), never
logits cached once per image. Its held-out predictions are computed once; every validation then
counts how often the student's top class is the teacher's and their mean KL divergence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convnext_cifar.config import DistillConfig
from convnext_cifar.data.dataset import Dataset, Split, class_difference
from convnext_cifar.data.loader import Normalize, eval_batches
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError
from convnext_cifar.files import file_hash
from convnext_cifar.model.checkpoints import weights_in
from convnext_cifar.runtime import Runtime
from convnext_cifar.training.step import LossFn
from convnext_cifar.use.evaluate import LoadedModel, load_model, predict_logits


def distillation_loss(base: LossFn, cfg: DistillConfig) -> LossFn:
    """(1 - alpha) x the usual summed loss of the labels + alpha x the summed distillation term:
    soft, KL(teacher || student) of the softmax at temperature T, times T^2 (Hinton et al.);
    hard, the cross-entropy to the teacher's top class (DeiT's hard distillation)."""
    alpha, t = cfg.alpha, cfg.temperature

    def loss(logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        plain = base(logits, target)
        if cfg.kind == "soft":
            term = F.kl_div(F.log_softmax(logits.float() / t, dim=1),
                            F.log_softmax(teacher.float() / t, dim=1),
                            reduction="sum", log_target=True) * (t * t)
        else:
            term = F.cross_entropy(logits.float(), teacher.argmax(dim=1), reduction="sum")
        return (1 - alpha) * plain + alpha * term

    return loss


class Teacher:
    """A frozen trained model that sees the student's batches: `teacher(x)` takes the student's
    normalised input batch and returns the teacher's fp32 logits (no gradient)."""

    def __init__(self, loaded: LoadedModel, student: Normalize, size: int, compiled_rows: int,
                 sha256: str):
        self.loaded, self.size, self.sha256 = loaded, size, sha256
        self.compiled_rows = compiled_rows
        mean_t, std_t = (torch.tensor(v, device=student.mean.device).view(1, 3, 1, 1)
                         for v in loaded.normalisation)
        # (pixels - mean_t) / std_t = x_student * std_s / std_t + (mean_s - mean_t) / std_t
        std_s = 1.0 / student.inv_std
        self.same_normalisation = bool(torch.equal(mean_t, student.mean)
                                       and torch.equal(std_t, std_s))
        self.scale, self.shift = std_s / std_t, (student.mean - mean_t) / std_t
        self.memory_format = student.memory_format
        self.held_out_log_probs: torch.Tensor | None = None
        self.top1: float | None = None

    @property
    def name(self) -> str:
        return self.loaded.path.name

    @property
    def classes(self) -> list[str]:
        return self.loaded.classes

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The batch the teacher sees: the student's, normalised as the teacher was trained and
        resized (bilinear, as Normalize resizes) to the teacher's input size."""
        if not self.same_normalisation:
            x = x.float() * self.scale + self.shift
        if x.shape[-1] != self.size:
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        return x.contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        loaded = self.loaded
        forward = loaded.forward if len(x) == self.compiled_rows else loaded.model  # one graph
        with loaded.rt.autocast():
            return forward(self.inputs(x)).float()

    @torch.inference_mode()
    def measure(self, split: Split, batch_size: int, dist: Dist) -> None:
        """The teacher's log-probabilities on this rank's share of the held-out images (kept for
        every validation's agreement) and its own held-out top-1, once."""
        lo, hi = dist.shard(len(split.images))
        normalize = Normalize(*self.loaded.normalisation, self.size, self.scale.device,
                              self.memory_format == torch.channels_last)
        parts, hits = [], torch.zeros((), dtype=torch.int64, device=self.scale.device)
        for x, y in eval_batches(split.images, split.labels, batch_size, normalize, lo, hi):
            forward = self.loaded.forward if len(x) == batch_size else self.loaded.model
            logits = predict_logits(forward, x, self.loaded.rt)
            parts.append(logits.log_softmax(dim=1))
            hits += (logits.argmax(dim=1) == y).sum()
        width = len(self.classes)
        self.held_out_log_probs = torch.cat(parts) if parts else torch.empty(
            0, width, device=self.scale.device)
        self.top1 = 100.0 * int(dist.all_reduce_sum(hits).item()) / max(len(split.images), 1)


def load_teacher(cfg: DistillConfig, rt: Runtime, data: Dataset, student: Normalize,
                 compiled_rows: int) -> Teacher:
    """The teacher `cfg` names, on the student's runtime; one UserError when it is not a
    checkpoint of this project or was trained on other classes than `data`'s."""
    path = weights_in(Path(cfg.teacher))
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        loaded = load_model(path, rt=dataclasses.replace(rt), tta="none")  # its init draws
    if difference := class_difference(loaded.classes, data.classes, "only the teacher has",
                                      "only the data has",
                                      "the same class names in another order"):
        raise UserError(f"--distill.teacher {cfg.teacher}: its classes are not this dataset's "
                        f"({difference}); give a teacher trained on these classes")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    size = cfg.image_size or loaded.cfg.data.image_size
    return Teacher(loaded, student, size, compiled_rows, file_hash(path))


def teacher_record(teacher: Teacher | None) -> dict[str, Any]:
    """What a training state keeps of the teacher: its file's name and the hash of its bytes."""
    return {"file": teacher.name, "sha256": teacher.sha256} if teacher else {}


def teacher_change(recorded: dict[str, Any] | None, cfg: DistillConfig) -> str:
    """'' when a resumption learns from the teacher the run started with (the same bytes, at
    whatever path); else what changed. A state from before distillation existed records none."""
    if not cfg.on:
        return "distillation was on (--distill.teacher)" if recorded else ""
    if not recorded:
        return f"--distill.teacher {cfg.teacher} (the run had no teacher)"
    path = weights_in(Path(cfg.teacher))
    if file_hash(path) != recorded.get("sha256"):
        return (f"--distill.teacher {cfg.teacher} holds other weights than the run's teacher "
                f"({recorded.get('file')}, sha256 {str(recorded.get('sha256'))[:12]})")
    return ""


class TeacherRecord:
    """The teacher's identity as a component of the training state (compared on resume, by
    `teacher_change`, before anything is written; loading it back changes nothing)."""

    def __init__(self, teacher: Teacher | None):
        self.record = teacher_record(teacher)

    def state_dict(self) -> dict[str, Any]:
        return self.record

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
