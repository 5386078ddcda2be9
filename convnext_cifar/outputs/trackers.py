"""The trackers beside metrics.jsonl, each a `metrics_log.Sink`: TensorBoard
(`--log.tensorboard`), MLflow (`--log.mlflow URI`) and Weights & Biases (`--log.wandb PROJECT`).
A tracker is one class here and one entry in `trackers_for`. All take the finished run's report:
TensorBoard its figures as images and the hparams with the final metrics, MLflow and W&B the best
checkpoint and the report as artifacts.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from convnext_cifar.config import TrainConfig, flatten, to_dict
from convnext_cifar.errors import need_extra
from convnext_cifar.files import first_line, write_file
from convnext_cifar.metrics import TIMINGS
from convnext_cifar.network import reachable
from convnext_cifar.outputs.metrics_log import Sink
from convnext_cifar.outputs.runs import summarize
from convnext_cifar.outputs.workdir import BEST_FILE
from convnext_cifar.terminal import warn

EXPERIMENT = "convnext-cifar"
PROBE_SECONDS = 3.0


def trackers_for(cfg: TrainConfig) -> list[Sink]:
    """The trackers `cfg.log` turns on, in the order they receive each record."""
    return ([TensorBoardSink(cfg.run_dir / "tb", cfg)] if cfg.log.tensorboard else []) + (
        [MlflowSink(cfg.log.mlflow, cfg)] if cfg.log.mlflow else []) + (
        [WandbSink(cfg.log.wandb, cfg)] if cfg.log.wandb else [])


def tracker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics: train/loss, train/lr, ... for a log window;
    val/loss, val/top1, val/ema_top1, ... and time/train_s, ... for a validation (epoch and step
    are the axes)."""
    train = "loss" in record
    out = {}
    for key, value in record.items():
        if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value,
                                                                                 (int, float)):
            continue
        # val_loss -> val/loss, ema_val_loss -> val/ema_loss, top1 -> val/top1, and what a
        # validation record says the epoch took: train_s -> time/train_s
        if not train and key in TIMINGS:
            out[f"time/{key}"] = float(value)
            continue
        out[f"train/{key}" if train else "val/" + key.replace("val_", "")] = float(value)
    return out


class TensorBoardSink(Sink):
    """Records as TensorBoard scalars under WORK_DIR/tb/, x axis the optimizer step:
    train/{loss,lr,grad_norm,img_per_s} and val/{loss,top1,top5,...} (val/ema_* with EMA).

    A resumed run opens the writer with purge_step = the state's step + 1, so TensorBoard drops
    whatever the interrupted run logged after that state: no point twice, none missing.
    """

    takes_report = True

    def __init__(self, folder: Path, cfg: TrainConfig):
        self.folder, self.cfg, self.writer = Path(folder), cfg, None

    def open(self, step: int, resumed: bool) -> None:
        tensorboard = need_extra("torch.utils.tensorboard", "--log.tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(str(self.folder),
                                                purge_step=step + 1 if resumed else None)

    def add(self, record: dict[str, Any], step: int) -> None:
        for tag, value in tracker_metrics(record).items():
            self.writer.add_scalar(tag, value, step)

    def publish(self, report: Path | None) -> None:
        """The confusion heatmap and the augmentation preview as images; the hparams with the
        run's best top-1 and its epoch."""
        if report is not None:
            _tensorboard_images(self.writer, report)
        _tensorboard_hparams(self.writer, self.cfg)

    def close(self, outcome: str) -> None:
        if self.writer is not None:
            self.writer.close()


class HeldBackSink(Sink):
    """A tracker that sends a record only once the training state that saw it is on disk: a
    resumed run then never sends a point twice. `live` says whether it is sending at all."""

    def __init__(self) -> None:
        self.run_id = ""  # the tracker's run: restored from a state, or set by `open`
        self.pending: list[tuple[dict[str, Any], int]] = []  # since the last state was taken
        self.sealed: list[tuple[dict[str, Any], int]] = []  # seen by a state not yet on disk

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = str(state.get("run_id", ""))

    @property
    def live(self) -> bool:
        return False

    def add(self, record: dict[str, Any], step: int | None) -> None:
        if self.live:
            self.pending.append((record, int(step or 0)))

    def seal(self) -> None:
        self.sealed += self.pending
        self.pending = []

    def take(self) -> list[tuple[dict[str, Any], int]]:
        """The records the state now on disk has seen, to send ([] when not live)."""
        sent, self.sealed = self.sealed, []
        return sent if self.live else []


class MlflowSink(HeldBackSink):
    """One MLflow run per training run: the flattened config as params (`optim.lr`), every
    record as metrics at its step (train/loss, val/top1, ... as in TensorBoard), sent when a
    training state is written, so MLflow never holds more than the newest state has seen;
    the best checkpoint and the report as artifacts. A resumed run continues the same MLflow run
    (its id is this sink's state) and sends what followed that state once. A tracking server
    that cannot be reached is one line at the start; one that fails later is one line, and the
    run goes on."""

    state_name = "tracking"
    takes_report = True

    def __init__(self, uri: str, cfg: TrainConfig):
        MlflowClient = need_extra("mlflow", "--log.mlflow", "mlflow").MlflowClient  # noqa: N806
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about its tables
        logging.getLogger("alembic").setLevel(logging.WARNING)
        super().__init__()
        self.uri, self.cfg = uri, cfg
        self.client_class = MlflowClient
        self.client: Any = None

    @property
    def live(self) -> bool:
        return self.client is not None

    def open(self, step: int, resumed: bool = False) -> None:
        """Continue the run id the state gave (resumed at optimizer step `step`), or start a
        run (with the params); a store that cannot be used leaves the run untracked, with one
        line saying why. A run that already holds points past `step` (a rollback to an older
        state) is not continued: a new MLflow run takes the resumed line, tagged with the old."""
        scheme = urlsplit(self.uri).scheme
        if scheme in ("http", "https"):
            if not reachable(self.uri, PROBE_SECONDS):
                warn(f"MLflow tracking server {self.uri} cannot be reached; this run is not "
                     "tracked there (metrics.jsonl has everything)")
                return
        try:
            client = self.client_class(tracking_uri=self.uri)
            tags = {"work_dir": str(self.cfg.run_dir)}
            if self.run_id:
                try:
                    client.get_run(self.run_id)
                    ahead = [m.step for m in client.get_metric_history(self.run_id, "train/loss")
                             if m.step > step]
                except Exception as e:  # noqa: BLE001 - another store, or the run was deleted
                    warn(f"MLflow run {self.run_id} is not in {self.uri} "
                         f"({first_line(e, sentence=False)}); continuing in a new MLflow run")
                    ahead = None
                if ahead == []:
                    client.update_run(self.run_id, status="RUNNING")
                    self.client = client
                    return
                if ahead:
                    print(f"note: MLflow run {self.run_id} went on past step {step}; the resumed "
                          "line continues in a new MLflow run", file=sys.stderr)
                    tags["rolled_back_from"] = self.run_id
            experiment = client.get_experiment_by_name(EXPERIMENT)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(EXPERIMENT))
            run = client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags)
            self.run_id = run.info.run_id
            self.client = client
            self._params()
        except Exception as e:  # noqa: BLE001 - any store error: the run goes on untracked
            warn(f"MLflow at {self.uri} is not usable ({first_line(e, sentence=False)}); this "
                 "run is not tracked there (metrics.jsonl has everything)")
            self.client = None

    def _params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(self.cfg)).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def commit(self) -> None:
        """Send the records the state now on disk has seen."""
        sent = self.take()
        if not sent:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for record, step in sent
                   for name, value in tracker_metrics(record).items()]
        self._guard(lambda: [self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
                             for i in range(0, len(metrics), 900)])

    def artifact(self, path: Path) -> None:
        if self.client is not None and Path(path).exists():
            self._guard(lambda: self.client.log_artifact(self.run_id, str(path)))

    def publish(self, report: Path | None) -> None:
        """The best checkpoint and the report (with its figures) as artifacts."""
        self.artifact(self.cfg.run_dir / BEST_FILE)
        if report is not None:
            for path in sorted(report.parent.glob(f"{report.stem}*")):
                self.artifact(path)

    def close(self, outcome: str) -> None:
        """End the MLflow run: FINISHED, KILLED (interrupted: it may resume) or FAILED."""
        if self.client is None:
            return
        self.seal()  # the run ended: everything it logged goes out
        self.commit()
        state = {"finished": "FINISHED", "interrupted": "KILLED"}.get(outcome, "FAILED")
        self._guard(lambda: self.client.set_terminated(self.run_id, status=state))

    def _guard(self, send) -> None:
        try:
            send()
        except Exception as e:  # noqa: BLE001 - a tracking failure never ends the training
            warn(f"MLflow at {self.uri} failed ({first_line(e, sentence=False)}); the run goes on "
                 "without it")
            self.client = None


WANDB_STEP = "trainer/step"  # the x axis of every W&B metric: the optimizer step
WANDB_RUN_FILE = "wandb-run.json"  # in the work dir: the W&B run and the last step it holds


class WandbSink(HeldBackSink):
    """One W&B run per training run (project `--log.wandb`): the flattened config, every record
    as metrics at its optimizer step (`trainer/step`; names as TensorBoard and MLflow have them),
    sent once the training state that saw it is on disk; the best checkpoint and the report as
    artifacts. The W&B run id is this sink's state, so a resumed run continues the same W&B run
    and sends what followed that state once; a resume from an older state (a rollback) starts a
    new W&B run, noted with the old id. WANDB_MODE=offline (or WANDB_MODE=disabled) is honoured:
    offline runs go to WORK_DIR/wandb/ for a later `wandb sync`. A service that cannot be
    reached, or any W&B error, is one line and the run goes on untracked."""

    state_name = "wandb"
    takes_report = True

    def __init__(self, project: str, cfg: TrainConfig):
        need_extra("wandb", "--log.wandb", "wandb")  # imported when the run starts
        super().__init__()
        self.project, self.cfg = project, cfg
        self.run: Any = None

    @property
    def live(self) -> bool:
        return self.run is not None

    def open(self, step: int, resumed: bool = False) -> None:
        import os

        import wandb

        mode = os.environ.get("WANDB_MODE", "online")
        base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if mode not in ("offline", "dryrun", "disabled") and not reachable(base, PROBE_SECONDS):
            warn(f"Weights & Biases at {base} cannot be reached; this run is not tracked there "
                 "(metrics.jsonl has everything; WANDB_MODE=offline logs without network)")
            return
        marker = self.cfg.run_dir / WANDB_RUN_FILE
        held = _read_marker(marker)
        notes = {}
        if self.run_id and held.get("id") == self.run_id and held.get("step", -1) > step:
            print(f"note: W&B run {self.run_id} went on past step {step}; the resumed line "
                  "continues in a new W&B run", file=sys.stderr)
            notes["rolled_back_from"] = self.run_id
            self.run_id = ""
        self.run_id = self.run_id or secrets.token_hex(4)  # W&B's own shape: 8 of [0-9a-z]
        try:
            self.run = wandb.init(
                project=self.project, name=self.cfg.run_name, id=self.run_id, resume="allow",
                dir=str(self.cfg.run_dir), config={**flatten(to_dict(self.cfg)), **notes},
                settings=wandb.Settings(silent=True, console="off"))
            self.run.define_metric(WANDB_STEP)
            self.run.define_metric("*", step_metric=WANDB_STEP)
        except Exception as e:  # noqa: BLE001 - any W&B error: the run goes on untracked
            warn(f"Weights & Biases is not usable ({first_line(e, sentence=False)}); this run is "
                 "not tracked there (metrics.jsonl has everything)")
            self.run = None

    def commit(self) -> None:
        """Send the records the state now on disk has seen; note the last step sent."""
        sent = self.take()
        if not sent:
            return

        def send() -> None:
            for record, step in sent:
                self.run.log({**tracker_metrics(record), WANDB_STEP: step})
            write_file(self.cfg.run_dir / WANDB_RUN_FILE, json.dumps(
                {"id": self.run_id, "step": sent[-1][1]}).encode())

        self._guard(send)

    def publish(self, report: Path | None) -> None:
        """The best checkpoint (a model artifact) and the report with its figures."""
        if self.run is None:
            return
        import wandb

        def send() -> None:
            best = self.cfg.run_dir / BEST_FILE
            if best.exists():
                model = wandb.Artifact(f"{self.run_id}-best", type="model")
                model.add_file(str(best))
                self.run.log_artifact(model)
            if report is not None:
                page = wandb.Artifact(f"{self.run_id}-report", type="report")
                for path in sorted(report.parent.glob(f"{report.stem}*")):
                    page.add_file(str(path))
                self.run.log_artifact(page)

        self._guard(send)

    def close(self, outcome: str) -> None:
        """End the W&B run: exit code 0 when finished, 1 otherwise (it may still resume)."""
        if self.run is None:
            return
        self.seal()
        self.commit()
        run, self.run = self.run, None
        try:
            run.finish(exit_code=0 if outcome == "finished" else 1)
        except Exception as e:  # noqa: BLE001 - the run's own files are complete
            warn(f"Weights & Biases failed to close its run ({first_line(e, sentence=False)})")

    def _guard(self, send) -> None:
        try:
            send()
        except Exception as e:  # noqa: BLE001 - a tracking failure never ends the training
            warn(f"Weights & Biases failed ({first_line(e, sentence=False)}); the run goes on "
                 "without it")
            self.run = None


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return held if isinstance(held, dict) else {}


def _tensorboard_images(writer: Any, page: Path) -> None:
    import numpy as np
    from PIL import Image

    for name in ("confusion", "augmentation"):
        png = page.with_name(f"{page.stem}-{name}.png")
        if png.exists():
            image = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"))
            writer.add_image(f"report/{name}", image, dataformats="HWC")
    writer.flush()


def _tensorboard_hparams(writer: Any, cfg: TrainConfig) -> None:
    summary = summarize(cfg.run_dir) or {}
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
               for k, v in flatten(to_dict(cfg)).items() if k not in ("name", "work_dir")}
    metrics = {"hparam/best_top1": float(summary.get("best_top1") or 0.0),
               "hparam/best_epoch": float(summary.get("best_epoch") or 0)}
    writer.add_hparams(hparams, metrics, run_name="hparams")
    writer.flush()
