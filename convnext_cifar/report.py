"""What a run tells the user: a rich progress bar on a terminal, plain lines elsewhere, and
metrics.jsonl (one JSON object per log point and per validation)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from convnext_cifar.errors import UserError


class MetricsLog:
    """Appends one JSON object per line, each with a single write (a kill never tears a line).

    Only one process of a multi-process run writes (`is_main`). Stateful: the state is the
    file's length, and restoring it cuts off what a resumed run will write again.
    """

    def __init__(self, path: Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.tensorboard: TensorBoardLog | None = None  # set by the run with --log.tensorboard
        self.mlflow: Any = None  # tracking.MlflowLog, set by the run with --log.mlflow

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        """Append `record`; `step` (the optimizer step it belongs to, for a record without one)
        is the x axis of its TensorBoard scalars."""
        if not self.is_main:
            return
        if self.tensorboard is not None:
            self.tensorboard.add(record, record.get("step", step))
        if self.mlflow is not None:
            self.mlflow.add(record, record.get("step", step))
        line = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            raise UserError(f"could not write {self.path}: {e.strerror or e}") from None

    def commit(self) -> None:
        """A training state is on disk: send what the trackers hold back until then."""
        if self.mlflow is not None:
            self.mlflow.commit()

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Cut the log back to `size` bytes: what a resumed run will write again goes."""
        if self.is_main and self.path.exists() and self.path.stat().st_size > size:
            os.truncate(self.path, size)

    def state_dict(self) -> dict[str, Any]:
        return {"bytes": self.size()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.truncate(state["bytes"])


def metric_names(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics: train/loss, train/lr, ... for a log window;
    val/loss, val/top1, val/ema_top1, ... for a validation (epoch and step are the axes)."""
    train = "loss" in record
    out = {}
    for key, value in record.items():
        if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value,
                                                                                 (int, float)):
            continue
        # val_loss -> val/loss, ema_val_loss -> val/ema_loss, top1 -> val/top1
        out[f"train/{key}" if train else "val/" + key.replace("val_", "")] = float(value)
    return out


class TensorBoardLog:
    """metrics.jsonl records as TensorBoard scalars under WORK_DIR/tb/, x axis the optimizer
    step: train/{loss,lr,grad_norm,img_per_s} and val/{loss,top1,top5} (val/ema_* with EMA).

    A resumed run opens the writer with purge_step = the state's step + 1, so TensorBoard drops
    whatever the interrupted run logged after that state: no point twice, none missing.
    """

    def __init__(self, folder: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log.tensorboard needs the tensorboard extra: pip install "
                            "'convnext-cifar[tensorboard]'") from None
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def add(self, record: dict[str, Any], step: int) -> None:
        for tag, value in metric_names(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


def _fmt_train(r: dict[str, Any]) -> str:
    return (f"loss {r['loss']:.4f}  lr {r['lr']:.3e}  grad_norm {r['grad_norm']:.3f}  "
            f"{r['img_per_s']:.0f} img/s")


def duration(seconds: float) -> str:
    """1 h 05 min, 4 min 10 s, 12 s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class RunClock:
    """The run's remaining wall time: its training steps at the latest log window's rate, plus
    the validations still due at the latest one's duration (none measured yet: left out)."""

    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, val_interval: int):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.batch_size, self.val_interval = batch_size, val_interval
        self.step_s: float | None = None
        self.val_s: float | None = None

    def validations_after(self, epoch: int) -> int:
        """Validations due after `epoch` completed epochs."""
        return sum(1 for e in range(epoch + 1, self.epochs + 1)
                   if e % self.val_interval == 0 or e == self.epochs)

    def left_s(self, step: int, validated_epoch: int) -> float | None:
        """Seconds to go from optimizer step `step`, validations after `validated_epoch` due."""
        if self.step_s is None:
            return None
        steps = self.epochs * self.steps_per_epoch - step
        return steps * self.step_s + self.validations_after(validated_epoch) * (self.val_s or 0.0)

    def projection(self, step: int, validated_epoch: int, elapsed_s: float) -> str:
        left = self.left_s(step, validated_epoch) or 0.0
        steps = self.epochs * self.steps_per_epoch - step
        vals = self.validations_after(validated_epoch)
        val = (f" + {vals} validation(s) at {self.val_s:.1f} s" if self.val_s is not None
               else f"; the {vals} validation(s) are not measured yet")
        return (f"projected wall time of the run: {duration(elapsed_s + left)} ({duration(left)} "
                f"to go: {steps:,} steps at {1000 * (self.step_s or 0):.0f} ms{val}; a "
                "projection from the latest timings)")


class Progress:
    """Per-epoch progress; a live bar when stdout is a terminal, log lines otherwise. With a
    `clock` it projects the run's wall time after the first log window (and again after the
    first validation) and shows the run's ETA beside the epoch's."""

    def __init__(self, epochs: int, live: bool | None = None, is_main: bool = True,
                 clock: RunClock | None = None):
        self.epochs = epochs
        self.live = sys.stdout.isatty() if live is None else live
        self.is_main = is_main  # False on the non-zero ranks of a multi-process run
        self.clock = clock
        self._projected: set[str] = set()
        self._bar = None
        self._task = None

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        if not (self.live and self.is_main):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(TextColumn(f"epoch {epoch}/{self.epochs}"), BarColumn(bar_width=16),
                        MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TextColumn("epoch eta"), TimeRemainingColumn(),
                        TextColumn("{task.fields[run_eta]}"), transient=False)
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, completed=done, info="",
                                        run_eta="")

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def log_train(self, record: dict[str, Any], steps_in_epoch: int, index: int,
                  elapsed_s: float = 0.0) -> None:
        if not self.is_main:
            return
        eta = ""
        if self.clock is not None:
            self.clock.step_s = self.clock.batch_size / max(record["img_per_s"], 1e-9)
            done = record["epoch"] - 1  # validations of this epoch on are still due
            eta = f"run eta {duration(self.clock.left_s(record['step'], done) or 0.0)}"
        if self._bar is not None:
            self._bar.update(self._task, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                              f"{record['img_per_s']:.0f} img/s", run_eta=eta)
        else:
            print(f"epoch {record['epoch']}/{self.epochs} [{index}/{steps_in_epoch}] "
                  f"step {record['step']}  {_fmt_train(record)}" + (f"  {eta}" if eta else ""),
                  flush=True)
        if self.clock is not None and "train" not in self._projected:
            self._projected.add("train")
            self._say(self.clock.projection(record["step"], record["epoch"] - 1, elapsed_s))

    def validated(self, seconds: float, step: int, epoch: int, elapsed_s: float) -> None:
        """A validation after `epoch` took `seconds`: the first one refines the projection."""
        if self.clock is None:
            return
        self.clock.val_s = seconds
        if "val" not in self._projected and self.clock.step_s is not None:
            self._projected.add("val")
            if self.clock.validations_after(epoch):
                self._say(self.clock.projection(step, epoch, elapsed_s))

    def _say(self, text: str) -> None:
        if self.is_main:
            if self._bar is not None:
                self._bar.console.print(text)
            else:
                print(text, flush=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def log_val(self, record: dict[str, Any], best: float, metric: str = "top1") -> None:
        """The validation line; `best` is the best value so far of `metric` (--eval.best-metric),
        which the line shows beside top-1/top-5 when it is another one."""
        if not self.is_main:
            return
        chosen = ema_chosen = ""
        if metric != "top1":
            chosen = f"  {metric} {record[metric]:.2f}"
            ema_chosen = f" {metric} {record[f'ema_{metric}']:.2f}" if "ema_top1" in record else ""
        ema = (f"  ema top1 {record['ema_top1']:.2f} top5 {record['ema_top5']:.2f}{ema_chosen}"
               if "ema_top1" in record else "")
        print(f"epoch {record['epoch']}/{self.epochs} val  loss {record['val_loss']:.4f}  "
              f"top1 {record['top1']:.2f}  top5 {record['top5']:.2f}{chosen}{ema}  "
              f"(best {metric} {best:.2f})", flush=True)

    def message(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def warning(self, text: str) -> None:
        if self.is_main:
            print(f"warning: {text}", file=sys.stderr, flush=True)


def print_eval(result: dict[str, Any]) -> None:
    """Top-1/top-5, per-class accuracy and the confusion matrix as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"{result['checkpoint']} (epoch {result['epoch']})")
    for col in ("images", "top-1 %", "top-5 %", "balanced acc. %", "macro F1 %", "loss"):
        summary.add_column(col, justify="right")
    summary.add_row(str(result["num_images"]), f"{result['top1']:.2f}", f"{result['top5']:.2f}",
                    f"{result['balanced_accuracy']:.2f}", f"{result['macro_f1']:.2f}",
                    f"{result['loss']:.4f}")
    console.print(summary)
    classes = list(result["per_class"])
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("top-1 %", justify="right")
    for name, acc in result["per_class"].items():
        per_class.add_row(name, f"{acc:.2f}")
    console.print(per_class)
    confusion = Table(title="confusion matrix (rows: true class, columns: predicted)")
    confusion.add_column("true \\ predicted")
    for i in range(len(classes)):
        confusion.add_column(str(i), justify="right")
    for i, (name, row) in enumerate(zip(classes, result["confusion"])):
        confusion.add_row(f"{i} {name}", *(str(v) for v in row))
    console.print(confusion)


def print_predictions(predictions: list, top_k: int) -> None:
    """A table on a terminal; tab-separated lines (path, then class:prob pairs) otherwise."""
    if not sys.stdout.isatty():
        for p in predictions:
            pairs = "\t".join(f"{c}:{q:.4f}" for c, q in zip(p.classes, p.probs))
            print(f"{p.path}\t{pairs}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top-{top_k} predictions")
    table.add_column("image")
    table.add_column("class")
    table.add_column("prob", justify="right")
    if top_k > 1:
        table.add_column(f"next {top_k - 1}")
    for p in predictions:
        rest = ", ".join(f"{c} {q:.2f}" for c, q in zip(p.classes[1:], p.probs[1:]))
        table.add_row(p.path, p.classes[0], f"{p.probs[0]:.4f}", *([rest] if top_k > 1 else []))
    Console().print(table)


def print_runs(rows: list[dict[str, Any]], differing: list[str]) -> None:
    """The runs as a table: name, status, best top-1 (epoch), epochs and wall time whole and
    first (never cut), then model, dataset, last top-1, img/s, and the options that differ
    between the runs as one wrapped `key=value` column."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} run(s)")
    for col in ("name", "status", "best top-1 (epoch)", "epochs", "wall"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("epochs", "wall") else
                         "left", min_width=len(col))
    for col in ("model", "dataset", "last top-1", "img/s"):
        table.add_column(col, justify="right" if col in ("last top-1", "img/s") else "left")
    if differing:
        table.add_column("differing options", overflow="fold", ratio=1)
    for r in rows:
        options = " ".join(f"{k}={json.dumps(r['config'].get(k))}" for k in differing)
        table.add_row(
            r["name"], r["status"], run_best(r), f"{r['epochs_done']}/{r['epochs']}",
            wall_clock(r["wall_s"]), str(r["model"]), str(r["dataset"]),
            _num(r["last_top1"], "{:.2f}"), _num(r["img_per_s"], "{:.0f}"),
            *([options] if differing else []))
    Console(width=max(Console().width, 100)).print(table)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def run_best(r: dict[str, Any]) -> str:
    """'93.41 (87)': a run's best top-1 and its epoch."""
    return _num(r["best_top1"], "{:.2f}") + (f" ({r['best_epoch']})" if r["best_epoch"] else "")


def wall_clock(seconds: float | None) -> str:
    """'1:02:03', or '-' when unknown."""
    if seconds is None:
        return "-"
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"
