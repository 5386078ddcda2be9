"""Typed, frozen configuration: one dataclass per concern, the run settings that hold them, and
the search settings of `tune`.

The presets (presets.py) are subclasses that change defaults, the way MMPretrain layered dict
files through `_base_`. Every value is checked when the object is built; a bad one raises
`UserError` naming the option (a dataset kind checks the options it cannot honour: config
stands on data/kinds.py's registry). Also here: the JSON round trip of config.json and
checkpoint metadata, the one walk over the options (`options`), setting options by their dotted
names (`with_options`), and the parser of timm's RandAugment strings (AugConfig checks them
when it is built). This module must not import torch or timm: `--help` has to answer fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from convnext_cifar.data.kinds import DATASETS
from convnext_cifar.errors import UserError
from convnext_cifar.files import parse_json, shown
from convnext_cifar.metrics import BEST_METRICS, TUNE_METRICS
from convnext_cifar.network import credentials

CONVNEXTV2_MODELS = (
    "convnextv2_atto",
    "convnextv2_femto",
    "convnextv2_pico",
    "convnextv2_nano",
    "convnextv2_tiny",
    "convnextv2_base",
    "convnextv2_large",
    "convnextv2_huge",
)
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]  (the registry's names)
BestMetric = Literal[BEST_METRICS]  # type: ignore[valid-type]
TuneMetric = Literal[TUNE_METRICS]  # type: ignore[valid-type]


def _check(ok: bool, option: str, value: Any, must: str) -> None:
    if not ok:
        flag = "--" + option.replace("_", "-")
        raise UserError(f"invalid {flag} {shown(value)}: {must}")


def _at_most(config: Any, section: str, limits: dict[str, int]) -> None:
    """Every count and size has a ceiling far above any real run: an absurd value (epochs
    1e21) is refused here instead of hanging a loop that no signal interrupts."""
    for name, ceiling in limits.items():
        value = getattr(config, name)
        _check(value <= ceiling, section + name, value, f"must be at most {ceiling:,}")


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build and how to initialise it."""

    name: str = "convnextv2_tiny"
    """timm ConvNeXt-V2 variant: convnextv2_{atto,femto,pico,nano,tiny,base,large,huge}."""
    pretrained: str = "none"
    """Initial weights: 'none', a timm tag (convnextv2_tiny.fcmae) or a .safetensors/.pth file."""
    pretrained_format: Literal["auto", "timm", "mmpretrain", "official"] = "auto"
    """Layout of a --model.pretrained file; auto tells it from the keys."""
    pretrained_prefix: str = ""
    """Take only the weights under this key prefix (e.g. backbone); empty: all."""
    pretrained_weights: Literal["raw", "ema"] = "raw"
    """Which weights of a checkpoint that holds both to start from: raw or its EMA."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the residual blocks."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy training loss."""
    head_init_scale: float = 1.0
    """Scale of the fresh classifier head's initial weights and bias (official recipe: 0.001)."""

    def __post_init__(self) -> None:
        _check(self.name in CONVNEXTV2_MODELS, "model.name", self.name,
               "must be one of " + ", ".join(CONVNEXTV2_MODELS))
        _check(bool(self.pretrained), "model.pretrained", self.pretrained,
               "give 'none', a timm tag or a file path")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate,
               "must be in [0, 1)")
        _check(0.0 <= self.label_smoothing < 1.0, "model.label_smoothing", self.label_smoothing,
               "must be in [0, 1)")
        _check(self.head_init_scale > 0, "model.head_init_scale", self.head_init_scale,
               "must be > 0")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how training batches are augmented."""

    dataset: DatasetName = "cifar10"
    """The kind of dataset: a CIFAR (its python folder under --data.root) or an image folder."""
    root: Path = Path("data")
    """Folder holding (or receiving) the dataset's folder; for folder: holds train/ and val/."""
    labels: Literal["fine", "coarse"] = "fine"
    """CIFAR-100 labels: the 100 fine classes or the 20 coarse superclasses."""
    val_fraction: float = 0.0
    """folder without val/ or test/: hold out this stratified share of train/ for validation."""
    split_seed: int = 0
    """Seed of the --data.val-fraction split."""
    resize: Literal["center-crop", "squash"] = "center-crop"
    """folder images to --data.image-size: shorter side then centre crop, or squash both sides."""
    skip_bad_images: bool = False
    """folder: skip (and count) image files that cannot be decoded instead of stopping."""
    placement: Literal["auto", "device", "host", "disk"] = "auto"
    """Where training images live: auto (device, else pinned host, else disk), or one of them."""
    memory_share: float = 0.8
    """Largest share of the device's free memory the images may take (else host memory)."""
    decode_processes: int = 0
    """Processes decoding folder images into the cache (0: one per CPU core)."""
    cache_dir: Path | None = None
    """folder: the decoded-image cache (None: the user cache, ~/.cache/convnext-cifar/decoded)."""
    download: bool = True
    """Download the official archive (checksum verified) when the data is missing."""
    batch_size: int = 128
    """Global training batch: split over the processes (torchrun) and accumulation steps."""
    micro_batch: int | Literal["auto"] = 0
    """Images per forward/backward of a process (0: per --optim.accum-steps; auto: what fits)."""
    micro_batch_memory: float = 0.0
    """GiB a step may take for --data.micro-batch auto (0: CPU half the free memory, GPU 90 %)."""
    eval_batch_size: int = 256
    """Evaluation batch size (halved on its own where it runs out of memory)."""
    padding: int = 4
    """Zero padding on each side before the random crop (0 turns the crop off)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip."""
    mean: tuple[float, float, float] | None = None
    """Per-channel mean subtracted from 0-255 pixels (None: the dataset's standard values)."""
    std: tuple[float, float, float] | None = None
    """Per-channel std dividing 0-255 pixels (None: the dataset's standard values)."""
    image_size: int = 32
    """Input size: CIFAR larger than 32 upsamples on the device; folder images are stored at it."""
    drop_last: bool = False
    """Drop the last incomplete training batch of each epoch."""
    sampler: Literal["uniform", "balanced"] = "uniform"
    """Epoch order: uniform (each image once) or balanced (classes equally likely, repeats)."""
    limit_train: int = 0
    """Use only the first N training images (0: all); for quick runs."""
    limit_val: int = 0
    """Use only the first N test images (0: all); for quick runs."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size,
               "must be >= 1")
        _check(self.padding >= 0, "data.padding", self.padding, "must be >= 0")
        _check(0.0 <= self.flip_prob <= 1.0, "data.flip_prob", self.flip_prob, "must be in [0, 1]")
        _check(self.mean is None or len(self.mean) == 3, "data.mean", self.mean,
               "needs 3 values")
        _check(self.std is None or (len(self.std) == 3 and all(s > 0 for s in self.std)),
               "data.std", self.std, "needs 3 values > 0")
        _check(self.image_size >= 32, "data.image_size", self.image_size, "must be >= 32")
        _check(self.limit_train >= 0, "data.limit_train", self.limit_train, "must be >= 0")
        _check(self.limit_val >= 0, "data.limit_val", self.limit_val, "must be >= 0")
        _check(0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction,
               "must be in [0, 1)")
        _check(0 < self.memory_share <= 1, "data.memory_share", self.memory_share,
               "must be in (0, 1]")
        _check(self.decode_processes >= 0, "data.decode_processes", self.decode_processes,
               "must be >= 0")
        _check(self.micro_batch == "auto" or 0 <= self.micro_batch <= self.batch_size,
               "data.micro_batch", self.micro_batch,
               f"must be auto, 0 (off) or at most --data.batch-size {self.batch_size}")
        _check(self.micro_batch in ("auto", 0) or self.batch_size % self.micro_batch == 0,
               "data.micro_batch", self.micro_batch,
               f"must divide --data.batch-size {self.batch_size}")
        _check(0 <= self.micro_batch_memory <= 2**20, "data.micro_batch_memory",
               self.micro_batch_memory, "must be in [0, 1048576] GiB (0: what the device has)")
        _at_most(self, "data.", {"batch_size": 2**20, "eval_batch_size": 2**20,
                                 "padding": 1024, "image_size": 1024, "limit_train": 2**40,
                                 "limit_val": 2**40, "decode_processes": 1024,
                                 "split_seed": 2**32 - 1})
        _check(self.split_seed >= 0, "data.split_seed", self.split_seed, "must be >= 0")
        DATASETS[self.dataset].check(self)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, its decay groups and gradient clipping."""

    lr: float | Literal["auto"] = 1e-3
    """Peak learning rate (reached at the end of warmup); auto: found first by lr-find's test."""
    weight_decay: float = 0.05
    """Decoupled weight decay of conv/linear weights; norms, biases and GRN never decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad_norm: float | None = None
    """Clip the global gradient L2 norm to this (None: no clipping; the norm is logged anyway)."""
    accum_steps: int = 1
    """Split each global batch into N micro-batches whose gradients add up (less memory)."""
    base_batch_size: int = 0
    """Scale lr by data.batch_size / this (linear scaling rule); 0: use lr as given."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: layer i's LR is lr * R^(layers + 1 - i), the head's lr (1.0: off)."""
    layer_decay_type: Literal["single", "group"] = "single"
    """Layer ids as the official ConvNeXt-V2 code: single (one per block) or group (3 blocks)."""

    def __post_init__(self) -> None:
        _check(self.lr == "auto" or self.lr > 0, "optim.lr", self.lr, "must be > 0 or auto")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               self.betas, "needs 2 values in [0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "optim.clip_grad_norm",
               self.clip_grad_norm, "must be > 0 (or None to turn clipping off)")
        _check(self.accum_steps >= 1, "optim.accum_steps", self.accum_steps, "must be >= 1")
        _check(self.base_batch_size >= 0, "optim.base_batch_size", self.base_batch_size,
               "must be >= 0")
        _at_most(self, "optim.", {"accum_steps": 2**20, "base_batch_size": 2**20})
        _check(0 < self.layer_decay <= 1, "optim.layer_decay", self.layer_decay,
               "must be in (0, 1] (1 turns it off)")


@dataclass(frozen=True)
class SchedConfig:
    """Learning-rate schedule: linear warmup, then cosine decay."""

    epochs: int = 100
    """Training length in epochs."""
    warmup_epochs: int = 10
    """Epochs of linear warmup from start_factor * lr to lr."""
    start_factor: float = 1e-3
    """Warmup starts at start_factor * lr."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine."""
    per_epoch: bool = False
    """Change the LR once per epoch exactly as MMEngine does (to compare with MMPretrain runs)."""
    budget: str = ""
    """Wall time to plan the run for (30m, 2h, 1h30m, 90s): sets --sched.epochs to fit it."""
    early_stop: int = 0
    """Stop after this many validations without the best metric improving (0: never)."""
    early_stop_delta: float = 0.0
    """Points the best metric must gain over its last counted best to reset --sched.early-stop."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "sched.epochs", self.epochs, "must be >= 1")
        if self.budget:
            try:
                parse_duration(self.budget)
            except ValueError as e:
                _check(False, "sched.budget", self.budget, str(e))
        _check(self.early_stop >= 0, "sched.early_stop", self.early_stop,
               "must be >= 0 (0: never stop early)")
        _check(0 <= self.early_stop_delta <= 100, "sched.early_stop_delta",
               self.early_stop_delta, "must be in [0, 100] (points of the best metric)")
        _check(0 <= self.warmup_epochs < self.epochs, "sched.warmup_epochs", self.warmup_epochs,
               f"must be >= 0 and shorter than --sched.epochs {self.epochs}")
        _check(0 < self.start_factor <= 1, "sched.start_factor", self.start_factor,
               "must be in (0, 1]")
        _check(self.min_lr >= 0, "sched.min_lr", self.min_lr, "must be >= 0")
        _at_most(self, "sched.", {"epochs": 1_000_000, "early_stop": 1_000_000})


DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """Seconds of a duration written 30m, 2h, 1h30m, 90s or 1.5h (a bare number: minutes)."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        text += "m"
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError("write a duration such as 30m, 2h, 1h30m or 90s")
    seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    if not 1 <= seconds <= 365 * 86400:
        raise ValueError("must be between 1s and a year")
    return seconds


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment string, parsed: rand-m9-mstd0.5-inc1 and the like."""

    magnitude: float = 10.0  # m
    num_layers: int = 2  # n: ops applied per image
    magnitude_std: float = 0.0  # mstd: gaussian noise on the magnitude (inf: uniform in [0, m])
    magnitude_max: float = 10.0  # mmax: magnitudes are clipped to [0, mmax]
    increasing: bool = False  # inc: the op set whose severity grows with the magnitude
    prob: float = 0.5  # p: probability of applying each chosen op


def parse_randaugment(text: str) -> RandAugmentSpec:
    """Parse a timm RandAugment string (sections m, n, mstd, mmax, inc, p; 'rand' first)."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError("must start with 'rand'")
    values: dict[str, Any] = {}
    keys = {"mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "increasing",
            "m": "magnitude", "n": "num_layers", "p": "prob"}
    for part in parts[1:]:
        key = next((k for k in keys if part.startswith(k) and part[len(k):]), None)
        if key is None:
            raise ValueError(f"unknown section {part!r} (known: {', '.join(keys)})")
        number = float(part[len(key):])
        if key == "mstd" and number > 100:
            number = float("inf")  # timm: uniform sampling of the magnitude
        values[keys[key]] = bool(int(number)) if key == "inc" else (
            int(number) if key == "n" else number)
    spec = RandAugmentSpec(**values)
    if spec.num_layers < 1 or not 0 <= spec.prob <= 1 or spec.magnitude < 0 \
            or spec.magnitude_std < 0 or spec.magnitude_max <= 0:
        raise ValueError("needs n >= 1, p in [0, 1] and non-negative m, mstd, mmax")
    return spec


@dataclass(frozen=True)
class LossConfig:
    """The training loss: cross-entropy (label smoothing is --model.label-smoothing)."""

    class_weights: str = "none"
    """Per-class weights: none, balanced (inverse class frequency), or w1,w2,... one a class."""

    def __post_init__(self) -> None:
        if self.class_weights in ("none", "balanced"):
            return
        values = self._given()
        _check(bool(values) and all(v > 0 and v == v for v in values), "loss.class_weights",
               self.class_weights, "use none, balanced, or positive numbers w1,w2,... one a class")

    def _given(self) -> list[float]:
        """The weights w1,w2,... as numbers ([] when they are not numbers)."""
        try:
            return [float(v) for v in self.class_weights.split(",")]
        except ValueError:
            return []

    def weights(self, counts: list[int]) -> list[float] | None:
        """The weight of each class given its training image `counts` (None: unweighted);
        balanced: N / (classes present x count), so the mean weight over the images is 1."""
        if self.class_weights == "none":
            return None
        if self.class_weights != "balanced":
            values = self._given()
            if len(values) != len(counts):
                raise UserError(f"--loss.class-weights gives {len(values)} weights for "
                                f"{len(counts)} classes; give one a class, in class order")
            return values
        present = sum(1 for c in counts if c)
        return [sum(counts) / (present * c) if c else 0.0 for c in counts]


@dataclass(frozen=True)
class AugConfig:
    """Extra training augmentation on the device, all off by default (the reference uses none)."""

    mixup_alpha: float = 0.0
    """MixUp Beta(alpha, alpha) strength (0: off)."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha) strength (0: off)."""
    mix_prob: float = 1.0
    """Probability of mixing a batch (or image/pair, by mix mode) when MixUp or CutMix is on."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of MixUp when both are on."""
    mix_mode: Literal["batch", "pair", "elem"] = "batch"
    """Mixing parameters drawn per batch, per image pair, or per image (timm's modes)."""
    mix_off_epoch: int = 0
    """No MixUp/CutMix from this epoch on, counted from 0 as timm does (0: mix throughout)."""
    randaugment: str = ""
    """timm RandAugment string, e.g. rand-m9-mstd0.5-inc1 (empty: off)."""
    erasing_prob: float = 0.0
    """Probability of timm's RandomErasing per image, 'pixel' mode (0: off)."""

    def __post_init__(self) -> None:
        _check(self.mixup_alpha >= 0, "aug.mixup_alpha", self.mixup_alpha, "must be >= 0")
        _check(self.cutmix_alpha >= 0, "aug.cutmix_alpha", self.cutmix_alpha, "must be >= 0")
        for option in ("mix_prob", "switch_prob", "erasing_prob"):
            value = getattr(self, option)
            _check(0 <= value <= 1, "aug." + option, value, "must be in [0, 1]")
        _check(self.mix_off_epoch >= 0, "aug.mix_off_epoch", self.mix_off_epoch, "must be >= 0")
        _at_most(self, "aug.", {"mix_off_epoch": 1_000_000})
        if self.randaugment:
            try:
                parse_randaugment(self.randaugment)
            except ValueError as e:
                _check(False, "aug.randaugment", self.randaugment,
                       f"not a timm RandAugment string ({e}); e.g. rand-m9-mstd0.5-inc1")

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def randaugment_spec(self) -> RandAugmentSpec:
        """--aug.randaugment parsed (checked when this was built; the default spec when off)."""
        return parse_randaugment(self.randaugment) if self.randaugment else RandAugmentSpec()


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average of the weights, evaluated beside them (off by default)."""

    decay: float | Literal["auto"] = 0.0
    """EMA decay per step, e.g. 0.9999 (0: no EMA; auto: from the run's length, with warmup)."""
    warmup_steps: int = 0
    """Ramp the decay in as timm's ModelEmaV3 warmup with gamma N: min(D, 1-(1+t/N)^-2/3)."""

    def __post_init__(self) -> None:
        _check(self.decay == "auto" or 0 <= self.decay < 1, "ema.decay", self.decay,
               "must be in [0, 1) (0 turns it off) or auto")
        _check(self.warmup_steps >= 0, "ema.warmup_steps", self.warmup_steps, "must be >= 0")
        _at_most(self, "ema.", {"warmup_steps": 10**12})


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: learn from a trained teacher that sees every training batch."""

    teacher: str = ""
    """Teacher checkpoint of this project (.safetensors, or a work dir: its best); empty: off."""
    alpha: float = 0.5
    """Weight of the distillation term; the usual loss (smoothing, mixed targets) gets 1-alpha."""
    temperature: float = 1.0
    """Softening temperature T of soft distillation (KL of softmax(z/T), times T^2)."""
    kind: Literal["soft", "hard"] = "soft"
    """soft: KL to the teacher's softened probabilities; hard: CE to its top class (DeiT)."""
    image_size: int = 0
    """The teacher's input size: each augmented batch is resized to it (0: the teacher's own)."""

    def __post_init__(self) -> None:
        _check(0 <= self.alpha <= 1, "distill.alpha", self.alpha, "must be in [0, 1]")
        _check(0 < self.temperature <= 100, "distill.temperature", self.temperature,
               "must be in (0, 100]")
        _check(self.image_size == 0 or 16 <= self.image_size <= 1024, "distill.image_size",
               self.image_size, "must be 0 (the teacher's own size) or in [16, 1024]")

    @property
    def on(self) -> bool:
        return bool(self.teacher)


# The node types ONNX Runtime's QDQ quantizer handles (its QDQRegistry; a test keeps this
# list equal to the installed onnxruntime's), and those `export --int8` keeps in float by
# default: chosen by measuring each type's cost in accuracy and speed (RESULTS.md, INT8).
QDQ_OP_TYPES = ("AveragePool", "BatchNormalization", "Clip", "Conv", "ConvTranspose", "CumSum",
                "Flatten", "Gather", "GatherElements", "Gemm", "InstanceNormalization",
                "LayerNormalization", "MatMul", "MaxPool", "Pad", "Relu", "Reshape", "Resize",
                "Slice", "Split", "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where")
INT8_FLOAT_OPS_DEFAULT = ("LayerNormalization", "Gemm")


@dataclass(frozen=True)
class Int8Config:
    """INT8 ONNX export (`export --int8`): calibration, node types kept float, the accuracy gate."""

    calibration_images: int = 1024
    """Training images (drawn with --int8.seed) whose activations set the INT8 ranges."""
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    """How the ranges are taken from the calibration activations (ONNX Runtime's methods)."""
    float_ops: tuple[str, ...] = INT8_FLOAT_OPS_DEFAULT
    """ONNX node types left in float (the rest of ONNX Runtime's QDQ types are quantized)."""
    max_drop: float = 0.5
    """Refuse an INT8 file whose held-out top-1 is more than this many points below fp32's."""
    force: bool = False
    """Write the INT8 file even when it loses more than --int8.max-drop."""
    reduce_range: bool = False
    """7-bit weights: may help accuracy on CPUs without VNNI (ONNX Runtime's advice)."""
    parity_images: int = 0
    """Held-out images the parity report compares fp32 and INT8 on (0: all of them)."""
    seed: int = 0
    """Seed of the draw of calibration images."""

    def __post_init__(self) -> None:
        _check(1 <= self.calibration_images <= 1_000_000, "int8.calibration_images",
               self.calibration_images, "must be in [1, 1,000,000]")
        _check(0 <= self.max_drop <= 100, "int8.max_drop", self.max_drop, "must be in [0, 100]")
        _check(self.parity_images >= 0, "int8.parity_images", self.parity_images,
               "must be >= 0 (0: every held-out image)")
        unknown = [op for op in self.float_ops if op not in QDQ_OP_TYPES]
        _check(not unknown, "int8.float_ops", " ".join(self.float_ops),
               "must name ONNX node types ONNX Runtime quantizes: " + ", ".join(QDQ_OP_TYPES))


@dataclass(frozen=True)
class EvalConfig:
    """How validation (and `eval`) computes its predictions."""

    tta: Literal["none", "flip"] = "none"
    """Test-time augmentation: flip averages the softmax of the image and its mirror."""
    best_metric: BestMetric = "top1"  # type: ignore[valid-type]
    """Validation metric that picks best.safetensors (balanced: for imbalanced classes)."""


@dataclass(frozen=True)
class LogConfig:
    """Where a run's metrics go besides metrics.jsonl."""

    tensorboard: bool = False
    """Also write every metrics.jsonl record as TensorBoard scalars under WORK_DIR/tb/."""
    mlflow: str = ""
    """MLflow tracking URI (e.g. sqlite:///mlflow.db or http://host:5000); empty: off."""
    wandb: str = ""
    """Weights & Biases project (wandb extra; WANDB_MODE=offline needs no network); empty: off."""

    def __post_init__(self) -> None:
        _check(not set(self.wandb) & set("/\\#?%: ") and len(self.wandb) <= 128, "log.wandb",
               self.wandb, "a W&B project name: at most 128 characters, none of / \\ # ? % : "
               "or spaces")
        # a user and password in the URI go to MLflow's own variables for this process and
        # into no file, log line, param or report: the config holds the URI without them
        uri, user, password = credentials(self.mlflow)
        if user or password:
            os.environ.update({k: v for k, v in (("MLFLOW_TRACKING_USERNAME", user),
                                                 ("MLFLOW_TRACKING_PASSWORD", password)) if v})
            object.__setattr__(self, "mlflow", uri)


@dataclass(frozen=True)
class LrFindConfig:
    """The learning-rate range test (`lr-find`): an exponential ramp over at most one epoch."""

    start_lr: float = 1e-7
    """The ramp's first learning rate."""
    end_lr: float = 10.0
    """The ramp's last learning rate (the test stops earlier when the loss diverges)."""
    steps: int = 100
    """Optimizer steps of the ramp (at most one epoch's)."""
    smoothing: float = 0.98
    """Weight of the running average of the loss (bias-corrected, as fastai's)."""
    diverge: float = 4.0
    """Stop once the smoothed loss exceeds this many times its lowest value."""
    suggest: Literal["valley", "steepest"] = "valley"
    """Rule for the suggestion: valley (fastai's default) or steepest descent of the loss."""
    out: Path | None = None
    """PNG of the loss against the LR (default: lr-find-<run name>.png here; needs [report])."""

    def __post_init__(self) -> None:
        _check(0 < self.start_lr < self.end_lr, "lr_find.start_lr", self.start_lr,
               f"must be > 0 and below --lr-find.end-lr {self.end_lr}")
        _check(5 <= self.steps <= 100_000, "lr_find.steps", self.steps, "must be in [5, 100,000]")
        _check(0 <= self.smoothing < 1, "lr_find.smoothing", self.smoothing, "must be in [0, 1)")
        _check(self.diverge > 1, "lr_find.diverge", self.diverge, "must be > 1")


@dataclass(frozen=True)
class TuneConfig:
    """The search of `tune`: trials, space, metric, pruner, sampler, storage."""

    trials: int = 20
    """Trials in the study in all, over every process sharing it (0: only report the study)."""
    space: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """KEY=SPEC (repeatable), e.g. optim.lr=log(1e-4,1e-2); log/uniform/int(a,b), choice(v,..)."""
    metric: TuneMetric = "top1"  # type: ignore[valid-type]
    """Validation metric to maximise (its best over the trial's epochs)."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stop unpromising trials after a validation: median, hyperband or none."""
    sampler: Literal["tpe", "random"] = "tpe"
    """How the next trial's values are drawn (seeded with --seed)."""
    storage: str = ""
    """Optuna storage URL (default sqlite:///WORK_DIR/study.db); share it to share the study."""
    study: str = ""
    """Study name (default: the run name)."""

    def __post_init__(self) -> None:
        _check(self.trials >= 0, "tune.trials", self.trials, "must be >= 0")
        _at_most(self, "tune.", {"trials": 1_000_000})


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: the sections plus the run settings."""

    name: str = "{model}_{dataset}"
    """Run name, default work dir work_dirs/<name>; {model} and {dataset} are filled in."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and augmentation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser."""
    sched: SchedConfig = field(default_factory=SchedConfig)
    """Learning-rate schedule."""
    aug: AugConfig = field(default_factory=AugConfig)
    """MixUp/CutMix, RandAugment, random erasing."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Training loss."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    """EMA of the weights."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation from a teacher."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    work_dir: Path | None = None
    """Where config.json, metrics.jsonl and checkpoints go (default: work_dirs/<name>)."""
    device: str = "auto"
    """Torch device: auto (cuda, else mps, else cpu), cpu, mps, cuda, cuda:N."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast; auto: bf16 on CUDA with bf16 or CPUs with AMX, fp16 on older CUDA, else fp32."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the model; auto: on CUDA, and on the CPU for the sizes measured faster."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode; reduce-overhead/max-autotune use CUDA graphs on a GPU."""
    channels_last: bool = True
    """Keep the model and its inputs in channels_last memory format."""
    deterministic: bool = False
    """Deterministic GPU kernels (cuDNN, torch's deterministic algorithms): bit-exact resumes."""
    seed: int = 0
    """Seed for weights init, data order, augmentation and drop-path."""
    val_interval: int = 1
    """Validate every N epochs (and after the last one)."""
    ckpt_interval: int = 1
    """Write epoch_N.safetensors every N epochs (and after the last one)."""
    log_interval: int = 100
    """Log training loss, lr, grad norm and img/s every N steps."""
    state_interval: int = 1
    """Write a resumable training state every N epochs (and at the end and on interruption)."""
    keep_last: int = 2
    """Keep the newest N training states (plus the one of the best epoch)."""
    keep_states: bool = False
    """Keep every training state of a run that ended (default: only the last, to resume from)."""
    keep_set_aside: int = 3
    """Keep the newest N lines rollbacks set aside in WORK_DIR/set-aside/ (older: removed)."""

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name", self.name,
               "must be a non-empty name without '/'")
        try:
            self.name.format(model="", dataset="")
        except (KeyError, IndexError, ValueError):
            _check(False, "name", self.name, "may only use the fields {model} and {dataset}")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "device",
               self.device, "use auto, cpu, mps, cuda or cuda:N")
        for option in ("val_interval", "ckpt_interval", "log_interval", "state_interval",
                       "keep_last"):
            _check(getattr(self, option) >= 1, option, getattr(self, option), "must be >= 1")
        _at_most(self, "", {"val_interval": 1_000_000, "ckpt_interval": 1_000_000,
                            "log_interval": 10**9, "state_interval": 1_000_000,
                            "keep_last": 10_000, "keep_set_aside": 10_000,
                            "seed": 2**32 - 1})
        _check(self.keep_set_aside >= 0, "keep_set_aside", self.keep_set_aside, "must be >= 0")
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _check(self.data.batch_size % self.optim.accum_steps == 0, "optim.accum_steps",
               self.optim.accum_steps, f"must divide --data.batch-size {self.data.batch_size}")
        _check(self.data.micro_batch == 0 or self.optim.accum_steps == 1, "optim.accum_steps",
               self.optim.accum_steps, "set it or --data.micro-batch, not both (--data.micro-batch "
               f"{self.data.micro_batch} sets the accumulation steps)")

    def accum_steps(self, world: int = 1) -> int:
        """Micro-batches each process splits its share of a batch into: --optim.accum-steps, or
        what --data.micro-batch N makes of it (auto, until chosen: 1, the whole share)."""
        if self.data.micro_batch in ("auto", 0):
            return self.optim.accum_steps
        return max(self.data.batch_size // world // self.data.micro_batch, 1)

    @property
    def run_name(self) -> str:
        """The name with its fields filled in, e.g. convnextv2-tiny_cifar10."""
        dataset = DATASETS[self.data.dataset].run_label(self.data)
        return self.name.format(model=self.model.name.replace("_", "-"), dataset=dataset)

    @property
    def run_dir(self) -> Path:
        return self.work_dir if self.work_dir is not None else Path("work_dirs") / self.run_name


# ---- JSON round trip (config.json, checkpoint metadata, --config) -------------------------------

def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a config (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}: nested config dicts as dotted option names."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


# Options renamed since a config.json could have been written: old dotted name -> new.
RENAMED = {"data.workers": "data.decode_processes"}


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build `cls` from a dict made by `to_dict`, refusing unknown fields and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{where or 'top level'}' must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {RENAMED.get(where + k, where + k)[len(where):]: v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown config field(s) {', '.join(where + k for k in unknown)}; "
                        "remove them or check the spelling against `train --help`")
    kwargs = {k: coerce(v, hints[k], where + k) for k, v in data.items()}
    return cls(**kwargs)


def coerce(value: Any, tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"config field {name} = {shown(value)} is not a valid {type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first type that fits
            try:
                return coerce(value, inner, name)
            except UserError:
                pass
        raise bad
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp in (str, Path):
        if not isinstance(value, str):
            raise bad
        return tp(value)
    raise bad


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def options(cls: type = TrainConfig) -> dict[str, Any]:
    """Every option of a config class by its dotted field name, with its type, the sections
    walked through in field order: {'name': str, ..., 'optim.lr': float, ...}."""
    out: dict[str, Any] = {}
    for f_name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update({f"{f_name}.{k}": v for k, v in options(tp).items()})
        else:
            out[f_name] = tp
    return out


def with_options(base: TrainConfig, values: dict[str, Any], what: str = "config"
                 ) -> TrainConfig:
    """`base` with the options named by their dotted names set to `values` and checked as a
    config.json would be; a value the config refuses is one line starting with `what`."""
    data = to_dict(base)
    for key, value in values.items():
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node[part]
        node[last] = list(value) if isinstance(value, tuple) else value
    try:
        return from_dict(TrainConfig, data)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None


def load_config_file(path: Path) -> TrainConfig:
    """Read a config.json written by a run (or by hand) into a TrainConfig."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    return from_dict(TrainConfig, parse_json(text, f"--config {path}"))


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)
