"""The presets: config subclasses that change defaults, as MMPretrain's `_base_` files did.

    ModelConfig -> ConvNeXtV2Tiny         (_base_/models/convnext_v2/tiny.py)
    DataConfig  -> CIFAR10Data            (_base_/datasets/cifar10_bs16.py)
                -> CIFAR100Data           (_base_/datasets/cifar100_bs16.py)
    TrainConfig -> CIFAR10FineTune        (the reference experiment, default of `train`)
                -> CIFAR10Smoke           (a quick CPU run: atto, no download of weights)
                -> CIFAR100FineTune       (the same on CIFAR-100)
                -> CIFAR10OfficialRecipe  (the official ConvNeXt-V2 fine-tuning recipe)
                   -> CIFAR10OfficialRecipe224 (the same at 224 px)

A preset states only the defaults it changes; `--help` takes each option's text from the field's
docstring in config.py (tyro looks it up along the class hierarchy). `train --preset NAME` picks
one, and `train --help` shows each preset's first sentence. Torch-free, like config.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from convnext_cifar.config import (
    AugConfig,
    DataConfig,
    DatasetName,
    DistillConfig,
    EmaConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
)


@dataclass(frozen=True)
class ConvNeXtV2Tiny(ModelConfig):
    """ConvNeXt-V2-Tiny as MMPretrain's _base_/models/convnext_v2/tiny.py defines it: drop-path
    0.2 and label smoothing 0.2 (its LabelSmoothLoss), which the experiment inherits."""

    name: str = "convnextv2_tiny"
    drop_path_rate: float = 0.2
    label_smoothing: float = 0.2


@dataclass(frozen=True)
class CIFAR10Data(DataConfig):
    """CIFAR-10 as MMPretrain's _base_/datasets/cifar10_bs16.py defines it; its normalisation
    is CIFAR-10's standard mean/std, which the dataset description holds (data/cifar.py) and
    a run records in its config.json."""

    batch_size: int = 16


@dataclass(frozen=True)
class CIFAR100Data(DataConfig):
    """CIFAR-100 as MMPretrain's _base_/datasets/cifar100_bs16.py defines it (its own mean/std)."""

    dataset: DatasetName = "cifar100"
    batch_size: int = 16


@dataclass(frozen=True)
class CIFAR10FineTune(TrainConfig):
    """Reference experiment: FCMAE ConvNeXt-V2-Tiny fine-tuned on CIFAR-10 at 32x32."""

    model: ModelConfig = field(default_factory=lambda: ConvNeXtV2Tiny(
        pretrained="convnextv2_tiny.fcmae"))
    data: DataConfig = field(default_factory=lambda: CIFAR10Data(batch_size=128))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=4e-3, weight_decay=0.05, clip_grad_norm=5.0))
    sched: SchedConfig = field(default_factory=lambda: SchedConfig(
        epochs=100, warmup_epochs=10, start_factor=1e-3, min_lr=0.0))
    ckpt_interval: int = 10
    log_interval: int = 50


@dataclass(frozen=True)
class CIFAR10Smoke(CIFAR10FineTune):
    """A quick CPU check of the whole path: atto from scratch, 5k images, 3 epochs."""

    name: str = "{model}_{dataset}-smoke"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        name="convnextv2_atto", pretrained="none", drop_path_rate=0.0, label_smoothing=0.2))
    data: DataConfig = field(default_factory=lambda: CIFAR10Data(
        batch_size=128, limit_train=5000, limit_val=2000))
    sched: SchedConfig = field(default_factory=lambda: SchedConfig(epochs=3, warmup_epochs=1))
    ckpt_interval: int = 1
    log_interval: int = 10


@dataclass(frozen=True)
class CIFAR10OfficialRecipe(CIFAR10FineTune):
    """The official ConvNeXt-V2 Tiny fine-tuning recipe, adapted to CIFAR-10 at 32x32.

    Taken as TRAINING.md gives it for Tiny: layer decay 0.9 with 'single' layer ids, EMA 0.9999
    evaluated every epoch, MixUp 0.8 / CutMix 1.0 (switch 0.5, per batch), RandAugment
    rand-m9-mstd0.5-inc1, random erasing 0.25, head init scale 0.001, drop-path 0.2, label
    smoothing 0.1, AdamW weight decay 0.05, base LR 8e-4 per 256 images scaled linearly with
    the batch (main_finetune.py's blr), no gradient clipping, cosine to min_lr 1e-6.
    Changed for CIFAR-10, and why: 100 epochs with 10 of warmup instead of 300 and 40, because
    50,000 images at 32x32 converge in the reference's 100 (and warmup keeps its share of the
    run); batch 128 (the reference's) instead of 1024, with the LR scaled by that rule; warmup
    from 1e-3 x lr instead of 0, as the reference (the first steps barely differ); the
    reference's RandomCrop(32, padding 4) + flip instead of RandomResizedCrop at 224, whose
    crops of a 32-pixel image would mostly be upsampled blur; RandAugment then runs at 32x32.
    """

    name: str = "{model}_{dataset}-official-recipe"
    model: ModelConfig = field(default_factory=lambda: ConvNeXtV2Tiny(
        pretrained="convnextv2_tiny.fcmae", label_smoothing=0.1, head_init_scale=0.001))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=8e-4, base_batch_size=256, weight_decay=0.05, clip_grad_norm=None, layer_decay=0.9))
    sched: SchedConfig = field(default_factory=lambda: SchedConfig(
        epochs=100, warmup_epochs=10, start_factor=1e-3, min_lr=1e-6))
    aug: AugConfig = field(default_factory=lambda: AugConfig(
        mixup_alpha=0.8, cutmix_alpha=1.0, randaugment="rand-m9-mstd0.5-inc1",
        erasing_prob=0.25))
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(decay=0.9999))


@dataclass(frozen=True)
class CIFAR10OfficialRecipe224(CIFAR10OfficialRecipe):
    """The official-recipe preset with every image upsampled on the device to 224x224, the
    resolution the FCMAE backbone was pre-trained at, for the best transfer accuracy (49x the
    compute per image: a GPU preset). Augmentation still runs at 32x32, before upsampling."""

    name: str = "{model}_{dataset}-224"
    data: DataConfig = field(default_factory=lambda: CIFAR10Data(batch_size=128, image_size=224))


@dataclass(frozen=True)
class CIFAR100FineTune(CIFAR10FineTune):
    """The reference experiment on CIFAR-100: the same model, recipe and schedule, 100 classes."""

    data: DataConfig = field(default_factory=lambda: CIFAR100Data(batch_size=128))


@dataclass(frozen=True)
class CIFAR10DistilAtto(CIFAR10FineTune):
    """The reference experiment for ConvNeXt-V2-Atto (FCMAE), learning from the reference run's
    best Tiny: train that first (plain `train`, work dir work_dirs/convnextv2-tiny_cifar10).

    The student: atto from its FCMAE weights, drop-path 0.1 (a model 7.5x smaller than Tiny).
    The teacher sees every augmented batch (soft distillation, alpha 0.5, temperature 1: the
    "consistent teacher" setting); the rest is the reference's recipe and schedule.
    """

    name: str = "{model}_{dataset}-distilled"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        name="convnextv2_atto", pretrained="convnextv2_atto.fcmae", drop_path_rate=0.1,
        label_smoothing=0.2))
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(
        teacher="work_dirs/convnextv2-tiny_cifar10", alpha=0.5, temperature=1.0))


PRESETS: dict[str, type[TrainConfig]] = {
    "cifar10": CIFAR10FineTune, "smoke": CIFAR10Smoke, "cifar100": CIFAR100FineTune,
    "cifar10-official-recipe": CIFAR10OfficialRecipe, "cifar10-224": CIFAR10OfficialRecipe224,
    "cifar10-distil-atto": CIFAR10DistilAtto}
"""Presets selectable with `train --preset NAME`; the first is the default."""
