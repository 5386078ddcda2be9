"""The names of what a validation measures: the one list every record, table, figure, tracker
and option takes them from.

A validation record (metrics.jsonl) holds `val_loss` and each accuracy metric below, in percent,
and with an EMA of the weights the same again as `ema_<name>` (ema_val_loss, ema_top1, ...); and
what the epoch took (TIMINGS).
"""

from __future__ import annotations

LOSS = "val_loss"

METRICS: dict[str, str] = {
    "top1": "top-1",
    "top5": "top-5",
    "balanced_accuracy": "balanced accuracy",  # mean recall over the classes present
    "macro_f1": "macro F1",  # mean F1 over the classes present
}
"""Every accuracy metric of a validation, in percent, and the label tables and figures give it."""

BEST_METRICS = ("top1", "balanced_accuracy", "macro_f1")
"""The metrics that may pick best.safetensors (--eval.best-metric); the first is the default."""

TUNE_METRICS = ("top1", "ema_top1")
"""The metrics a tuning study may maximise (--tune.metric); the first is the default."""


AGREEMENT = "agreement"
"""With a distillation teacher: % of held-out images whose top class is the teacher's."""
TEACHER_KL = "teacher_kl"
"""With a distillation teacher: mean KL(teacher || student) of the held-out predictions (nats)."""
TEACHER_TOP1 = "teacher_top1"
"""With a distillation teacher: the teacher's own held-out top-1, measured once, in each record."""
DISTILLATION: dict[str, str] = {AGREEMENT: "agreement with the teacher",
                                TEACHER_KL: "KL(teacher || student)",
                                TEACHER_TOP1: "teacher top-1"}
"""The distillation metrics of a validation record and the label figures give them."""


TIMINGS = ("img_per_s", "train_s", "validate_s", "state_s")
"""Wall-clock measurements in records (they differ between identical runs): a log window's
img/s; a validation record's seconds of the epoch's training, of the validation itself (best
checkpoint included), and of the loop held by the state writes since the previous validation."""


def ema(name: str) -> str:
    """The record key of `name` measured on the EMA of the weights."""
    return f"ema_{name}"
