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

from convnext_cifar.config import DistillConfig, TrainConfig
from convnext_cifar.data.dataset import Dataset, Split, class_difference
from convnext_cifar.data.kinds import normalisation
from convnext_cifar.data.loader import Normalize, eval_batches
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError
from convnext_cifar.files import file_hash, safetensors_metadata
from convnext_cifar.model.build import fit_to_model, match_head
from convnext_cifar.model.checkpoints import FORMAT, Checkpoint, weights_in
from convnext_cifar.model.formats import infer_variant, load_source
from convnext_cifar.runtime import Runtime, prepare_model
from convnext_cifar.training.step import LossFn
from convnext_cifar.use.evaluate import BackOff, LoadedModel, load_model


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
                 sha256: str, notes: list[str] | None = None):
        self.loaded, self.size, self.sha256, self.notes = loaded, size, sha256, notes or []
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
            logits = forward(self.inputs(x)).float()
        # a CUDA-graph replay writes its next output over this one (accumulation steps)
        return logits.clone() if loaded.rt.cuda_graphs else logits

    @torch.inference_mode()
    def measure(self, split: Split, batch_size: int, dist: Dist) -> None:
        """The teacher's log-probabilities on this rank's share of the held-out images (kept for
        every validation's agreement) and its own held-out top-1, once."""
        lo, hi = dist.shard(len(split.images))
        normalize = Normalize(*self.loaded.normalisation, self.size, self.scale.device,
                              self.memory_format == torch.channels_last)
        parts, hits = [], torch.zeros((), dtype=torch.int64, device=self.scale.device)
        batches = BackOff(batch_size, self.loaded.forward, self.loaded.rt, eager=self.loaded.model)
        for x, y in eval_batches(split.images, split.labels, batch_size, normalize, lo, hi):
            logits = batches.logits(x)
            parts.append(logits.log_softmax(dim=1))
            hits += (logits.argmax(dim=1) == y).sum()
        width = len(self.classes)
        self.held_out_log_probs = torch.cat(parts) if parts else torch.empty(
            0, width, device=self.scale.device)
        self.top1 = 100.0 * int(dist.all_reduce_sum(hits).item()) / max(len(split.images), 1)


def load_teacher(cfg: TrainConfig, rt: Runtime, data: Dataset, student: Normalize,
                 compiled_rows: int) -> Teacher:
    """The teacher `cfg.distill` names, on the student's runtime: a checkpoint of this project
    (its model, classes, normalisation and size from its metadata), or weights `--model.pretrained`
    reads (MMPretrain, official, timm: the size from the weights, the class names where the file
    has them, the student's normalisation). One UserError when it cannot teach these classes."""
    path = weights_in(Path(cfg.distill.teacher))
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        if safetensors_metadata(path).get("format") == FORMAT:  # its init draws no numbers
            loaded, notes = load_model(path, rt=rt, tta="none"), []
        else:
            loaded, notes = _other_weights(path, cfg, rt, data)
    _same_classes(cfg.distill, loaded.classes, data.classes)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    size = cfg.distill.image_size or loaded.cfg.data.image_size
    return Teacher(loaded, student, size, compiled_rows, file_hash(path), notes)


def _same_classes(cfg: DistillConfig, theirs: list[str], ours: list[str]) -> None:
    if difference := class_difference(theirs, ours, "only the teacher has", "only the data has",
                                      "the same class names in another order"):
        raise UserError(f"--distill.teacher {cfg.teacher}: its classes are not this dataset's "
                        f"({difference}); give a teacher trained on these classes")


def _other_weights(path: Path, cfg: TrainConfig, rt: Runtime, data: Dataset
                   ) -> tuple[LoadedModel, list[str]]:
    """A teacher from another toolbox's file: its ConvNeXt-V2 size inferred from the weights,
    its head's rows matched to the data's classes by name (where the file names them; a head of
    the data's class count that names none is taken in the data's order, and said so), run on
    the student's normalisation and input size."""
    import timm

    where = f"--distill.teacher {cfg.distill.teacher}"
    try:
        source = load_source(str(path))
    except UserError as e:  # its advice names --model.pretrained's options: not this one's
        raise UserError(f"{where}: not weights this project reads ({str(e).split('; ')[0]}); "
                        "give a run of this project, or an MMPretrain, official or timm "
                        "ConvNeXt-V2 file") from None
    name, head = infer_variant(source.state_dict), source.state_dict.get("head.fc.weight")
    if name is None:
        raise UserError(f"{where}: the weights match no timm convnextv2_* size")
    if head is None or (source.classes is None and head.shape[0] != len(data.classes)):
        raise UserError(f"{where}: " + ("its weights have no classifier head (a backbone)"
                                        if head is None else f"its head has {head.shape[0]} "
                                        f"outputs and names no classes; the data has "
                                        f"{len(data.classes)}")
                        + "; fine-tune it on this data first (--model.pretrained FILE) and "
                        "give that run")
    if source.classes is not None and set(source.classes) != set(data.classes):
        _same_classes(cfg.distill, source.classes, data.classes)
    model = timm.create_model(name, pretrained=False, num_classes=len(data.classes))
    state_dict, said = match_head(model, source.state_dict, source.classes, data.classes)
    report = fit_to_model(model, state_dict, source.ignored)
    if report.fresh:
        raise UserError(f"{where}: its head does not fit {len(data.classes)} classes")
    model.load_state_dict(report.tensors)
    teacher_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, name=name, pretrained="none"))
    notes = [f"teacher {path.name} ({source.layout} layout, {name})"
             + (f": {said}" if said else "")]
    return _stand_in(path, teacher_cfg, rt, data.classes, model.eval()), notes


def _stand_in(path: Path, cfg: TrainConfig, rt: Runtime, classes: list[str],
              model: torch.nn.Module) -> LoadedModel:
    """Another toolbox's weights dressed as a loaded checkpoint of this project."""
    model, forward = prepare_model(model, rt)
    normalize = Normalize(*normalisation(cfg.data), cfg.data.image_size, rt.device,
                          rt.channels_last)
    return LoadedModel(path, Checkpoint({}, cfg, list(classes), 0, {}), cfg, rt, model, forward,
                       normalize, "none")


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
