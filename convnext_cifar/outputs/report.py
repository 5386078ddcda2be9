"""`convnext-cifar report`: one self-contained HTML page that shows a run (or compares several),
with every figure inline and also written as a PNG file beside the page.

For one run: learning curves from metrics.jsonl; the best checkpoint on the held-out split
(confusion heatmap, per-class accuracy, the most confident mistakes); the training batch the
model receives first (the run's own loader and augmentation, same seed); the options that
differ from the defaults, status, best epoch and wall time. For several: their curves overlaid
and a table of their differing options and best results. Plotting needs matplotlib (the
`report` extra); everything else is the trainer's own code: the held-out split comes through
`eval`'s own `load_held_out` (with its checks), the preview through the loader `train` builds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, flatten, from_dict, to_dict
from convnext_cifar.data.dataset import Dataset
from convnext_cifar.data.loader import training_loader
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError, install_extra
from convnext_cifar.files import parse_json, readable, write_file
from convnext_cifar.metrics import AGREEMENT, DISTILLATION, METRICS, TEACHER_KL, TEACHER_TOP1, ema
from convnext_cifar.outputs.console import run_best, run_wall, wall_clock
from convnext_cifar.outputs.metrics_log import read_records
from convnext_cifar.outputs.runs import compare, summarize
from convnext_cifar.outputs.workdir import BEST_FILE, CONFIG_FILE, METRICS_FILE
from convnext_cifar.presets import PRESETS
from convnext_cifar.terminal import warn
from convnext_cifar.use.evaluate import load_held_out, load_model

EXTRA = install_extra("report")
GALLERY = 24  # most confident mistakes shown
PREVIEW = 32  # training images shown


@dataclass
class Figure:
    name: str  # file stem: report-<name>.png
    alt: str  # what it shows, the <img> alt text
    png: bytes
    series: list[tuple[str, str]] | None = None  # (legend label, colour) per line, in the page


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one line naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        # class names and run names are plain text: `price_$5_$10` is no formula
        matplotlib.rcParams["text.parse_math"] = False
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"the report draws its figures with matplotlib: {EXTRA}") from None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


# ---- a run on disk ------------------------------------------------------------------------------

@dataclass
class RunData:
    run_dir: Path
    summary: dict[str, Any]  # runs.summarize: name, status, best, wall time, flat config
    cfg: TrainConfig
    records: list[dict[str, Any]]

    @property
    def train(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "loss" in r and "step" in r]

    @property
    def val(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "top1" in r]

    def epoch_of(self, step: int) -> float:
        """A step as a fractional epoch, the x axis every curve shares: an epoch's last log
        point is at its last step, so epoch 1's last step is the steps per epoch."""
        first = [r["step"] for r in self.train if r["epoch"] == 1]
        return step / max(first) if first else float(step)


def read_run(run_dir: Path) -> RunData:
    """A work dir's config, records and summary; one line when it holds no run."""
    run_dir = Path(run_dir)
    summary = summarize(run_dir) if run_dir.is_dir() else None
    if summary is None:
        raise UserError(f"{run_dir} is not a run's work dir (no config.json written by train); "
                        "give the folder `train` wrote, e.g. work_dirs/NAME")
    config = run_dir / CONFIG_FILE
    cfg = from_dict(TrainConfig, parse_json(config.read_bytes(), str(config)))
    for note in summary["notes"]:  # records passed over: the page shows the others
        warn(note)
    return RunData(run_dir, summary, cfg, read_records(run_dir / METRICS_FILE))


def differing_from_defaults(cfg: TrainConfig, run_dir: Path | None = None
                            ) -> dict[str, tuple[Any, Any]]:
    """{option: (default, this run's value)} for every option the run changed; a path shown
    relative to `run_dir` (the page is meant to be shared)."""
    default = flatten(to_dict(next(iter(PRESETS.values()))()))
    mine = flatten(to_dict(cfg))
    return {k: (default.get(k), relative(v, run_dir)) for k, v in mine.items()
            if k not in ("name", "work_dir") and default.get(k) != v}


PATH_OPTIONS = ("data.root", "data.cache_dir", "model.pretrained")


def relative(value: Any, run_dir: Path | None) -> Any:
    """An absolute path `value` as seen from `run_dir` (`../data/cifar`); anything else as is."""
    if run_dir is None or not isinstance(value, str) or not os.path.isabs(value):
        return value
    return os.path.relpath(value, run_dir)


def run_labels(runs: list[RunData]) -> list[str]:
    """Each run by its work dir's folder and the options that differ between the runs (the
    first three): `run2 (ema.decay="auto", optim.lr=0.002)`; runs of one name stay apart."""
    differing = compare([r.summary for r in runs]) if len(runs) > 1 else []
    labels = []
    for run in runs:
        pairs = [f"{k}={json.dumps(relative(run.summary['config'].get(k), run.run_dir))}"
                 for k in differing[:3]] + (["..."] if len(differing) > 3 else [])
        labels.append(readable(run.run_dir.name) + (f" ({', '.join(pairs)})" if pairs else ""))
    return labels


# ---- learning curves ----------------------------------------------------------------------------

CURVES = [  # name, alt, [(record kind, key, label)], y label
    ("loss", "learning curves: training loss per step and validation loss per epoch",
     [("train", "loss", "training loss"), ("val", "val_loss", "validation loss")], "loss"),
    ("accuracy", "validation accuracy per epoch",
     [("val", name, label) for name, label in METRICS.items()]
     + [("val", ema("top1"), "EMA " + METRICS["top1"])], "accuracy %"),
    ("distillation", "agreement with the distillation teacher per epoch: the share of held-out "
     "images whose top class is the teacher's, beside the teacher's and the student's top-1",
     [("val", AGREEMENT, DISTILLATION[AGREEMENT]), ("val", TEACHER_TOP1,
                                                     DISTILLATION[TEACHER_TOP1]),
      ("val", "top1", "student " + METRICS["top1"])], "%"),
    ("teacher_kl", "mean KL divergence of the student's held-out predictions from the teacher's",
     [("val", TEACHER_KL, DISTILLATION[TEACHER_KL])], "nats"),
    ("lr", "learning rate per step", [("train", "lr", "learning rate")], "learning rate"),
    ("grad_norm", "gradient norm per step (before clipping)",
     [("train", "grad_norm", "gradient norm")], "gradient norm"),
    ("throughput", "training throughput per log window",
     [("train", "img_per_s", "images/s")], "images/s"),
]


COMPARED = [  # one chart per metric on the comparison page: name, record kind, key, y label
    ("train_loss", "train", "loss", "training loss"),
    ("val_loss", "val", "val_loss", "validation loss"),
    *((name, "val", name, f"{label} %") for name, label in METRICS.items()),
    (ema("top1"), "val", ema("top1"), f"EMA {METRICS['top1']} %"),
    (AGREEMENT, "val", AGREEMENT, f"{DISTILLATION[AGREEMENT]} %"),
    (TEACHER_KL, "val", TEACHER_KL, f"{DISTILLATION[TEACHER_KL]} (nats)"),
    ("lr", "train", "lr", "learning rate"),
    ("grad_norm", "train", "grad_norm", "gradient norm"),
    ("throughput", "train", "img_per_s", "images/s"),
]


def colour(i: int) -> str:
    """Run i's colour, the same in every chart of the page (matplotlib's tab10, as hex)."""
    from matplotlib.colors import to_hex

    return to_hex(f"C{i % 10}")


def comparison_figures(runs: list[RunData], labels: list[str]) -> list[Figure]:
    """One chart per metric with the runs overlaid, each run one colour in every chart and
    named once in each legend (a metric no run recorded is left out)."""
    plt = pyplot()
    figures = []
    for name, kind, key, ylabel in COMPARED:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        series = []
        for i, run in enumerate(runs):
            rows = [r for r in (run.train if kind == "train" else run.val)
                    if isinstance(r.get(key), (int, float))]
            if rows:
                xs = [run.epoch_of(r["step"]) if kind == "train" else r["epoch"] for r in rows]
                ax.plot(xs, [r[key] for r in rows], color=colour(i), label=labels[i],
                        marker="o" if kind == "val" else None, markersize=3, linewidth=1.2)
                series.append((labels[i], colour(i)))
        if not series:
            plt.close(fig)
            continue
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.append(Figure(name, f"{ylabel} per epoch, {len(series)} runs overlaid: "
                              + "; ".join(label for label, _ in series), _png(fig), series))
    return figures


def values_table(runs: list[RunData], labels: list[str]) -> str:
    """Per run, each validation metric's final value and its best (epoch)."""
    keys = [k for k in ("top1", *(m for m in METRICS if m != "top1"), ema("top1"), "val_loss")
            if any(isinstance(r.get(k), (int, float)) for run in runs for r in run.val)]
    rows = []
    for run, label in zip(runs, labels):
        row: list[Any] = [label]
        for k in keys:
            val = [r for r in run.val if isinstance(r.get(k), (int, float))]
            if not val:
                row.append("-")
                continue
            best = (min if k == "val_loss" else max)(val, key=lambda r: r[k])
            row.append(f"{val[-1][k]:.2f} / {best[k]:.2f} ({best['epoch']})")
        rows.append(row)
    return _table(["run", *(f"{k}: final / best (epoch)" for k in keys)], rows)


def ema_lag(run: RunData) -> str:
    """How the EMA weights' top-1 stood against the raw weights' ('' without EMA)."""
    pairs = [(r["epoch"], r[ema("top1")] - r["top1"]) for r in run.val
             if isinstance(r.get(ema("top1")), (int, float))]
    if not pairs:
        return ""
    low = min(pairs, key=lambda p: p[1])
    return (f"EMA weights against the raw weights, top-1: {pairs[-1][1]:+.2f} points at the last "
            f"validation (epoch {pairs[-1][0]}), {sum(d for _, d in pairs) / len(pairs):+.2f} on "
            f"average over {len(pairs)} validation(s), {low[1]:+.2f} at its lowest (epoch "
            f"{low[0]}); below 0 the average still lags the weights it follows.")


def curve_figures(runs: list[RunData]) -> list[Figure]:
    """The learning curves, x axis the epoch; several runs overlaid, one colour each. Each
    figure's alt text names the series drawn (a series a run did not record is left out)."""
    plt = pyplot()
    figures = []
    for name, alt, series, ylabel in CURVES:
        if series[0][1] in DISTILLATION and not any(
                isinstance(r.get(series[0][1]), (int, float)) for run in runs for r in run.val):
            continue  # no teacher: no distillation figure (its student top-1 would still draw)
        fig, ax = plt.subplots(figsize=(7, 3.6))
        drawn, labels = 0, []
        for run in runs:
            for kind, key, label in series:
                rows = [r for r in (run.train if kind == "train" else run.val)
                        if isinstance(r.get(key), (int, float))]
                if not rows:
                    continue
                xs = [run.epoch_of(r["step"]) if kind == "train" else r["epoch"] for r in rows]
                tag = label if len(runs) == 1 else f"{run.summary['name']}: {label}"
                ax.plot(xs, [r[key] for r in rows], marker="o" if kind == "val" else None,
                        markersize=3, linewidth=1.2, label=tag)
                drawn += 1
                labels += [] if label in labels else [label]
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.append(Figure(name, f"{alt} ({', '.join(labels)})" if len(series) > 1 else alt,
                              _png(fig)))
    return figures


# ---- the best checkpoint on the held-out split --------------------------------------------------

@dataclass
class HeldOut:
    classes: list[str]
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # (N,)
    probs: torch.Tensor  # (N, classes) softmax of the best checkpoint
    about: str = ""  # which epoch the best checkpoint is, and by which metric it was chosen

    @property
    def predicted(self) -> torch.Tensor:
        return self.probs.argmax(1)

    def confusion(self) -> torch.Tensor:
        k = len(self.classes)
        cells = self.labels * k + self.predicted
        return torch.bincount(cells, minlength=k * k).view(k, k)

    def mistakes(self, count: int = GALLERY) -> list[int]:
        """Misclassified images, most confident first (ties: in order)."""
        wrong = (self.predicted != self.labels).nonzero().flatten()
        confidence = self.probs[wrong, self.predicted[wrong]]
        order = torch.sort(confidence, descending=True, stable=True).indices
        return wrong[order][:count].tolist()


def held_out(run: RunData, device: str, batch_size: int | None,
             data_root: Path | None) -> tuple[HeldOut, Dataset] | None:
    """The best checkpoint's probabilities on the held-out split (read and checked as `eval`
    reads it), and the dataset (with its training split, for the preview); None when the run
    has no best checkpoint yet."""
    best = run.run_dir / BEST_FILE
    if not best.exists():
        return None
    loaded = load_model(best, device, compile=False)
    data, data_cfg = load_held_out(loaded, data_root, download=False, batch_size=batch_size,
                                   device="cpu", train=True)
    for note in data.notes:
        warn(note)
    probs = loaded.probabilities(data.val.images, data_cfg.eval_batch_size)
    ckpt, metric = loaded.checkpoint, loaded.cfg.eval.best_metric
    value = ckpt.metrics.get(metric)
    about = (f"best.safetensors: epoch {ckpt.epoch}" + (" (EMA weights)" if ckpt.weights == "ema"
                                                         else "")
             + (f", chosen by {metric} {value:.2f}" if isinstance(value, (int, float)) else ""))
    return HeldOut(loaded.classes, data.val.images, data.val.labels, probs, about), data


def confusion_figure(held: HeldOut) -> Figure:
    """Rows: true class, columns: predicted, shaded by the share of the row (readable at 100
    classes: names on the axes up to 30 classes, indices beyond, counts written up to 12)."""
    plt = pyplot()
    counts = held.confusion()
    k = len(held.classes)
    share = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(14.0, 3.0 + 0.11 * k)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    names = held.classes if k <= 30 else [str(i) for i in range(k)]
    step = 1 if k <= 30 else 5
    ax.set_xticks(range(0, k, step), names[::step], rotation=90, fontsize=7 if k <= 30 else 6)
    ax.set_yticks(range(0, k, step), names[::step], fontsize=7 if k <= 30 else 6)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix, {int(counts.sum())} held-out images")
    return Figure("confusion", f"confusion matrix of the best checkpoint over {k} classes "
                  f"({int(counts.sum())} held-out images)", _png(fig))


def per_class_figure(held: HeldOut) -> Figure:
    plt = pyplot()
    counts = held.confusion()
    accuracy = 100.0 * counts.diag().double() / counts.sum(1).clamp(min=1)
    k = len(held.classes)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.16 * k + 1)))
    ax.barh(range(k), accuracy.numpy(), color="tab:blue")
    ax.set_yticks(range(k), held.classes, fontsize=7 if k <= 30 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy % (held-out images of the class)")
    ax.grid(axis="x", alpha=0.3)
    return Figure("per_class", f"per-class top-1 accuracy of the best checkpoint, {k} classes",
                  _png(fig))


def _grid(images: torch.Tensor, titles: list[str], name: str, alt: str) -> Figure:
    """uint8 (N, 3, H, W) images in a grid, each upscaled (nearest) with its title."""
    plt = pyplot()
    cols = 8
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(titles[i], fontsize=6)
    return Figure(name, alt, _png(fig))


def top_confusions(held: HeldOut, count: int = 10) -> list[str]:
    """The most frequent mistakes as lines, by share of the true class: 'cat → dog 25 % (12 of
    48)'."""
    counts = held.confusion()
    totals = counts.sum(1)
    cells = [(float(counts[i, j]) / max(int(totals[i]), 1), i, j)
             for i in range(len(held.classes)) for j in range(len(held.classes))
             if i != j and counts[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [f"{held.classes[i]} → {held.classes[j]} {100 * share:.0f} % ({int(counts[i, j])} of "
            f"{int(totals[i])})" for share, i, j in cells[:count]]


def mistakes_figure(held: HeldOut) -> Figure | None:
    picked = held.mistakes()
    if not picked:
        return None
    titles = [f"true {held.classes[int(held.labels[i])]}\npred "
              f"{held.classes[int(held.predicted[i])]} {float(held.probs[i].max()):.2f}"
              for i in picked]
    return _grid(held.images[picked], titles, "mistakes",
                 f"the {len(picked)} most confident mistakes of the best checkpoint on "
                 "held-out images, most confident first, with true and predicted class")


# ---- what the model receives --------------------------------------------------------------------

def augmentation_preview(cfg: TrainConfig, data: Dataset, count: int = PREVIEW
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images (normalised, as the model receives them) and targets of the
    run's first training batch: the run's own loader, augmentation and seed, on the CPU."""
    loader = training_loader(cfg, data, torch.device("cpu"), channels_last=False, dist=Dist())
    x, y, _ = next(iter(loader.epoch(0)))
    return x[:count], y[:count]


def preview_figure(cfg: TrainConfig, data: Dataset) -> Figure:
    x, y = augmentation_preview(cfg, data)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    pixels = (x.float() * std + mean).round().clamp(0, 255).to(torch.uint8)
    titles = []
    for target in y:
        if target.ndim == 0:
            titles.append(data.classes[int(target)])
        else:  # soft targets (MixUp/CutMix, label smoothing aside): the two largest shares
            top = target.topk(min(2, len(target)))
            titles.append("\n".join(f"{data.classes[int(i)]} {float(v):.2f}"
                                    for v, i in zip(top.values, top.indices) if v > 0.05))
    return _grid(pixels, titles, "augmentation", "the first training batch as the model "
                 f"receives it ({augmentation_said(cfg)}), same seed")


def augmentation_said(cfg: TrainConfig) -> str:
    """What the run's augmentation does, naming only what is on."""
    d, a = cfg.data, cfg.aug
    done = ([f"random crop after {d.padding} px of zero padding"] if d.padding else []) + (
        [f"horizontal flip p {d.flip_prob:g}"] if d.flip_prob else []) + (
        [f"RandAugment {a.randaugment}"] if a.randaugment else []) + (
        [f"random erasing p {a.erasing_prob:g}"] if a.erasing_prob else []) + (
        [f"MixUp alpha {a.mixup_alpha:g}"] if a.mixup_alpha else []) + (
        [f"CutMix alpha {a.cutmix_alpha:g}"] if a.cutmix_alpha else [])
    return ", ".join(done) or "no augmentation"


# ---- the page -----------------------------------------------------------------------------------

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:left;font-size:14px}figure{margin:1.5em 0}"
         "img{max-width:100%}figcaption{color:#555;font-size:13px}")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode()
    alt = html.escape(fig.alt)
    series = (f" data-series='{html.escape(json.dumps(fig.series), quote=True)}'"
              if fig.series else "")
    return (f'<figure id="{fig.name}"{series}><img src="data:image/png;base64,{data}" '
            f'alt="{alt}"><figcaption>{alt}</figcaption></figure>')


def single_run_page(run: RunData, device: str, batch_size: int | None,
                    data_root: Path | None) -> tuple[str, list[Figure]]:
    s = run.summary
    parts = [f"<h1>{html.escape(s['name'])}</h1>", _table(
        ["status", "best top-1 (epoch)", "epochs", "wall time (/budget)", "model",
         "dataset"],
        [[s["status"], run_best(s), f"{s['epochs_done']}/{s['epochs']}",
          run_wall(s), s["model"], s["dataset"]]])]
    if (found := s.get("lr_found")) and isinstance(found.get("lr"), (int, float)):
        parts.append(f"<p>Learning rate found by the range test (<code>--optim.lr auto</code>): "
                     f"{found['lr']:.2e}, {html.escape(str(found.get('rule')))} rule, "
                     f"{found.get('steps')} steps.</p>")
    if s.get("micro_batch") is not None:
        parts.append(f"<p>Micro-batch chosen (<code>--data.micro-batch auto</code>): "
                     f"{s['micro_batch']} images a step, {s['accum_steps']} accumulation "
                     "step(s) per process.</p>")
    if s.get("budget_s") is not None:
        parts.append(f"<p>Time budget {wall_clock(s['budget_s'])}: used "
                     f"{wall_clock(s['budget_used_s'])} (planned epochs: {s['epochs']}).</p>")
    changed = differing_from_defaults(run.cfg, run.run_dir)
    parts.append("<h2>Options that differ from the defaults</h2>" + (_table(
        ["option", "default", "this run"],
        [[k, json.dumps(d), json.dumps(v)] for k, (d, v) in changed.items()])
        if changed else "<p>none</p>"))
    figures = curve_figures([run])
    lag = ema_lag(run)
    parts.append("<h2>Learning curves</h2>" + "".join(_figure(f) for f in figures)
                 + (f"<p>{html.escape(lag)}</p>" if lag else ""))
    found = held_out(run, device, batch_size, data_root)
    if found is None:
        parts.append("<p>No best checkpoint yet: the held-out figures come after the first "
                     "validation.</p>")
        return "".join(parts), figures
    held, data = found
    shown = [confusion_figure(held), per_class_figure(held)]
    wrong = mistakes_figure(held)
    confused = top_confusions(held)
    parts.append("<h2>Best checkpoint on the held-out images</h2>"
                 + f"<p>{html.escape(held.about)}</p>" + "".join(_figure(f) for f in shown)
                 + ("<h3>Most frequent confusions</h3><ul>" + "".join(
                     f"<li>{html.escape(c)}</li>" for c in confused) + "</ul>" if confused
                    else ""))
    parts.append("<h2>Most confident mistakes</h2>" + (_figure(wrong) if wrong else
                                                        "<p>No held-out image is wrong.</p>"))
    preview = preview_figure(run.cfg, data)
    parts.append("<h2>What the model receives</h2>" + _figure(preview))
    return "".join(parts), figures + shown + ([wrong] if wrong else []) + [preview]


def comparison_page(runs: list[RunData]) -> tuple[str, list[Figure]]:
    """The runs' table (status, best, their differing options), each metric's final and best
    value, and one chart per metric with the runs overlaid, one colour per run throughout."""
    labels = run_labels(runs)
    differing = compare([r.summary for r in runs])
    table = _table(["run", "status", "best (epoch)", "epochs", "wall time", *differing],
                   [[label, r.summary["status"], run_best(r.summary, named=True),
                     f"{r.summary['epochs_done']}/{r.summary['epochs']}",
                     run_wall(r.summary),
                     *(json.dumps(relative(r.summary["config"].get(k), r.run_dir))
                       for k in differing)] for r, label in zip(runs, labels)])
    figures = comparison_figures(runs, labels)
    lags = [f"{label}: {lag}" for run, label in zip(runs, labels) if (lag := ema_lag(run))]
    return (f"<h1>{len(runs)} runs</h1>{table}<h2>Final and best values</h2>"
            f"{values_table(runs, labels)}<h2>Learning curves</h2>"
            + "".join(_figure(f) for f in figures)
            + "".join(f"<p>{html.escape(lag)}</p>" for lag in lags), figures)


def write_report(run_dirs: list[Path], out: Path | None = None, device: str = "cpu",
                 batch_size: int | None = None, data_root: Path | None = None) -> Path:
    """Write the page (default WORK_DIR/report.html; ./report.html for several runs) and its
    figures as <stem>-<figure>.png beside it; returns the page's path."""
    pyplot()  # the extra first: one line before any work
    runs = [read_run(d) for d in run_dirs]
    if out is None:
        out = runs[0].run_dir / "report.html" if len(runs) == 1 else Path("report.html")
    if len(runs) == 1:
        body, figures = single_run_page(runs[0], device, batch_size, data_root)
    else:
        body, figures = comparison_page(runs)
    title = html.escape(runs[0].summary["name"] if len(runs) == 1 else f"{len(runs)} runs")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title} - convnext-cifar "
            f"report</title><style>{STYLE}</style></head><body>{body}</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    for fig in figures:
        write_file(out.with_name(f"{out.stem}-{fig.name}.png"), fig.png, "report figure")
    write_file(out, readable(page).encode(), "report")
    return out
