"""What the console shows: a run's progress (a live bar on a terminal, plain lines elsewhere)
and its projected wall time, the log lines of its records (`ConsoleSink`), and the tables of
`eval`, `predict` and `runs`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol

from convnext_cifar.files import one_line, readable, spreadsheet_cell
from convnext_cifar.metrics import AGREEMENT, METRICS, TEACHER_KL
from convnext_cifar.outputs.metrics_log import Sink
from convnext_cifar.terminal import is_terminal, log_line, pause_log, progress_bar, warn

SHORT = {"balanced accuracy": "balanced acc."}  # labels abbreviated in a table's header


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
        self.live = is_terminal(sys.stdout) if live is None else live
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

        pause_log(True)  # the bar's frames stay out of train.log; its lines go in plain
        self._bar = progress_bar(TextColumn(f"epoch {epoch}/{self.epochs}"),
                                 BarColumn(bar_width=16), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TextColumn("epoch eta"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[run_eta]}"),
                                 transient=False)
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
        line = (f"epoch {record['epoch']}/{self.epochs} [{index}/{steps_in_epoch}] "
                f"step {record['step']}  {_fmt_train(record)}" + (f"  {eta}" if eta else ""))
        if self._bar is not None:
            self._bar.update(self._task, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                              f"{record['img_per_s']:.0f} img/s", run_eta=eta)
            log_line(line)
        else:
            print(line, flush=True)
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
                log_line(text)
            else:
                print(text, flush=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            pause_log(False)

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
        teacher = (f"  agreement {record[AGREEMENT]:.2f} kl {record[TEACHER_KL]:.4f}"
                   if AGREEMENT in record else "")  # with a distillation teacher
        print(f"epoch {record['epoch']}/{self.epochs} val  loss {record['val_loss']:.4f}  "
              f"top1 {record['top1']:.2f}  top5 {record['top5']:.2f}{chosen}{ema}{teacher}  "
              f"(best {metric} {best:.2f})", flush=True)

    def message(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def warning(self, text: str) -> None:
        if self.is_main:
            warn(text)


class RunPosition(Protocol):
    """What the console reads of where a run is (training/state.py's `Position`)."""

    batch: int  # batches done in the current epoch
    elapsed_s: float  # wall time spent training
    best: float  # the best value so far of `best_metric`
    best_metric: str


class ConsoleSink(Sink):
    """The run's records as log lines through its `Progress`: a log window's loss, lr, grad
    norm, img/s and the run's ETA; a validation's metrics beside the best value so far of the
    metric that picks best.safetensors (`position.best`, updated before the record is written)."""

    def __init__(self, progress: Progress, position: RunPosition, steps_per_epoch: int):
        self.progress, self.position, self.steps = progress, position, steps_per_epoch

    def add(self, record: dict[str, Any], step: int) -> None:
        if "loss" in record:
            self.progress.log_train(record, self.steps, self.position.batch,
                                    self.position.elapsed_s)
        else:
            self.progress.log_val(record, self.position.best, self.position.best_metric)


def print_eval(result: dict[str, Any]) -> None:
    """The metrics, per-class accuracy and the confusion matrix as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"{shown(result['checkpoint'])} (epoch {result['epoch']})")
    for col in ("images", *(f"{SHORT.get(label, label)} %" for label in METRICS.values()),
                "loss"):
        summary.add_column(col, justify="right")
    summary.add_row(str(result["num_images"]), *(f"{result[m]:.2f}" for m in METRICS),
                    f"{result['loss']:.4f}")
    console.print(summary)
    classes = list(result["per_class"])
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("top-1 %", justify="right")
    for name, acc in result["per_class"].items():
        per_class.add_row(shown(name), f"{acc:.2f}")
    console.print(per_class)
    confusion = Table(title="confusion matrix (rows: true class, columns: predicted)")
    confusion.add_column("true \\ predicted")
    for i in range(len(classes)):
        confusion.add_column(str(i), justify="right")
    for i, (name, row) in enumerate(zip(classes, result["confusion"])):
        confusion.add_row(f"{i} {shown(name)}", *(str(v) for v in row))
    console.print(confusion)


def print_parity(report: dict[str, Any], out: Path, report_path: Path) -> None:
    """The INT8 parity report: fp32 against INT8 on the held-out images and in speed."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{shown(str(out))}: INT8 against fp32 on {report['images']:,} held-out "
                        f"images ({report['isa']}, {report['cpus']} CPUs)")
    for col in ("", "top-1 %", "MB", "img/s batch 1", "img/s batch 64"):
        table.add_column(col, justify="right")
    for kind in ("fp32", "int8"):
        table.add_row(kind.upper() if kind == "int8" else kind, f"{report[kind + '_top1']:.2f}",
                      f"{report[kind + '_bytes'] / 1e6:.2f}",
                      f"{report[kind + '_img_per_s_batch1']:,.0f}",
                      f"{report[kind + '_img_per_s_batch64']:,.0f}")
    console = Console()
    console.print(table)
    console.print(f"top-1 agreement {report['agreement']:.2f}%, largest logit difference "
                  f"{report['max_logit_diff']:.4f}; report: {shown(str(report_path))}")


def print_predictions(predictions: list, top_k: int) -> None:
    """A table on a terminal; tab-separated lines (path, then class:prob pairs) otherwise."""
    if not is_terminal(sys.stdout):  # fields escaped: a name may hold a tab or a newline
        for p in predictions:
            pairs = "\t".join(f"{one_line(c)}:{q:.4f}" for c, q in zip(p.classes, p.probs))
            print(f"{one_line(p.path)}\t{pairs}")
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
        rest = ", ".join(f"{shown(c)} {q:.2f}" for c, q in zip(p.classes[1:], p.probs[1:]))
        table.add_row(shown(p.path), shown(p.classes[0]), f"{p.probs[0]:.4f}",
                      *([rest] if top_k > 1 else []))
    Console().print(table)


RUN_COLUMNS = ("status", "best", "epochs", "wall", "last top-1", "img/s", "size")


def runs_table(rows: list[dict[str, Any]], differing: list[str], width: int) -> list[str]:
    """The runs as plain lines that fit `width`: a title (with what every run shares), a header,
    then per run its row and, indented below it, every differing `key=value` whole (wrapped
    between pairs, never inside one); a study's trials under a line naming the study. A run
    label too long for its column stands on its own line above its row."""
    metrics = sorted({r["best_metric"] for r in rows})
    best_head = f"best {metrics[0]} (ep)" if len(metrics) == 1 else "best (ep)"
    cells = [[readable(r["status"]), run_best(r, named=len(metrics) > 1),
              f"{r['epochs_done']}/{r['epochs']}", run_wall(r),
              _num(r["last_top1"], "{:.2f}"), _num(r["img_per_s"], "{:.0f}"),
              size(r["size_bytes"])] for r in rows]
    head = [best_head if c == "best" else c for c in RUN_COLUMNS]
    if any(r.get("set_aside_lines") for r in rows):  # what rollbacks set aside, where any did
        head.append("set aside")
        for r, row in zip(rows, cells):
            row.append(_set_aside(r))
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    right = "  ".join(f"{{:>{w}}}" if i > 0 else f"{{:<{w}}}" for i, w in enumerate(widths))
    fixed = sum(widths) + 2 * len(widths)
    room = max(width - fixed, 8)
    labels = [readable(r["run"]) if r["study"] is None else  # a trial: under its study's line
              "  " + readable(r["run"]).removeprefix(readable(r["study"]) + "/") for r in rows]
    label_w = min(max(len(x) for x in ["run", *labels]), room)
    option = {"model": "model.name", "dataset": "data.dataset", "teacher": "distill.teacher"}
    shared = [f"{k} {v}" for k, v in (("model", rows[0]["model"]),
                                      ("dataset", rows[0]["dataset"]),
                                      ("teacher", rows[0].get("teacher")))
              if option[k] not in differing and (k != "teacher" or v)]
    lines = [f"{len(rows)} run(s)" + (": " + ", ".join(readable(str(x)) for x in shared)
                                      if shared else "")]
    lines.append(f"{'run':<{label_w}}  " + right.format(*head))
    study = None
    for r, row, label in zip(rows, cells, labels):
        if r["study"] != study and r["study"] is not None:
            trials = sum(x["study"] == r["study"] for x in rows)
            lines.append(f"study {readable(r['study'])} ({trials} trial(s)):")
        study = r["study"]
        if len(label) > label_w:
            lines.append(label)
            label = ""
        lines.append(f"{label:<{label_w}}  " + right.format(*row))
        pairs = [f"{k}={json.dumps(r['config'].get(k), ensure_ascii=False)}" for k in differing]
        lines += wrapped(pairs, width, indent="    ")
    return lines


def wrapped(items: list[str], width: int, indent: str) -> list[str]:
    """`items` joined by two spaces into lines of at most `width` (an item longer than a line
    stands alone on one, whole)."""
    lines: list[str] = []
    line = ""
    for item in (readable(i) for i in items):
        if line and len(indent) + len(line) + 2 + len(item) > width:
            lines.append(indent + line)
            line = ""
        line = f"{line}  {item}" if line else item
    return lines + ([indent + line] if line else [])


DELIMITED = ("run", "name", "study", "status", "best_metric", "best", "best_epoch", "epochs_done",
             "epochs", "wall_s", "last_top1", "img_per_s", "size_bytes", "set_aside_lines",
             "set_aside_bytes", "teacher", "last_agreement", "budget_s", "budget_used_s",
             "work_dir")


def runs_delimited(rows: list[dict[str, Any]], differing: list[str], csv_output: bool) -> str:
    """The runs one per line with a header: tab-separated (tabs and newlines in values written
    as \\t, \\n) or CSV (quoted; text cells a spreadsheet would run as formulas get a leading
    apostrophe); the columns of DELIMITED, then one per differing option (JSON values)."""
    import csv
    import io

    def cell(value: Any) -> str:
        if value is None:
            return ""
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return spreadsheet_cell(readable(text)) if csv_output and isinstance(
            value, str) else (readable(text) if csv_output else one_line(readable(text)))

    table = [[*DELIMITED, *differing]] + [
        [cell(r.get(c)) for c in DELIMITED] + [cell(r["config"].get(k)) for k in differing]
        for r in rows]
    if not csv_output:
        return "".join("\t".join(line) + "\n" for line in table)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(table)
    return out.getvalue()


def size(n: int | None) -> str:
    """'351 MB', '12.4 GB', '880 kB'."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


def shown(text: str) -> str:
    """A user's string (a path, a class or run name) for a rich table: its markup escaped, so
    `[draft]` shows and `x[/]y.png` cannot break the table; bytes that are not UTF-8 as \\xNN."""
    from rich.markup import escape

    return escape(readable(text))


def _set_aside(r: dict[str, Any]) -> str:
    """'2 (14.3 MB)': the lines rollbacks set aside in a run and what they hold on disk."""
    lines = r.get("set_aside_lines") or 0
    return f"{lines} ({r.get('set_aside_bytes', 0) / 1e6:.1f} MB)" if lines else "-"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def run_best(r: dict[str, Any], named: bool = False) -> str:
    """'93.41 (87)': a run's best value of the metric that chose best.safetensors, and its
    epoch; `named`: 'macro_f1 71.20 (9)'."""
    best = r["best"] if "best" in r else r["best_top1"]
    text = _num(best, "{:.2f}") + (f" ({r['best_epoch']})" if r["best_epoch"] else "")
    return f"{r.get('best_metric', 'top1')} {text}" if named and best is not None else text


def run_wall(summary: dict[str, Any]) -> str:
    """A run's wall time; with --sched.budget, what it used of the budget: '0:29:40/0:30:00'."""
    if summary.get("budget_s") is None:
        return wall_clock(summary["wall_s"])
    return f"{wall_clock(summary['budget_used_s'])}/{wall_clock(summary['budget_s'])}"


def wall_clock(seconds: float | None) -> str:
    """'1:02:03', or '-' when unknown."""
    if seconds is None:
        return "-"
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"
