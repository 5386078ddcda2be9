"""Trackers beside metrics.jsonl: MLflow (`--log.mlflow URI`), and what a finished run sends
to its trackers (the report, its figures as TensorBoard images, the hparams, the best
checkpoint).

MLflow gets the flattened config as params (`optim.lr`), every metrics.jsonl record as metrics
at the same steps (train/loss, val/top1, ... as in TensorBoard), and the best checkpoint and
the report as artifacts. Records are sent when a training state is written, so MLflow never
holds more than the newest state has seen: a resumed run continues the same MLflow run (its id
is in the state) and sends what followed that state once. A tracking server that cannot be
reached is one line at the start; one that fails later is one line, and the run goes on.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from convnext_cifar.config import TrainConfig, flatten, to_dict
from convnext_cifar.errors import UserError
from convnext_cifar.report import metric_names

EXPERIMENT = "convnext-cifar"
PROBE_SECONDS = 3.0


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


class MlflowLog:
    """One MLflow run per training run. Stateful: its state is the MLflow run id."""

    def __init__(self, uri: str, cfg: TrainConfig):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise UserError("--log.mlflow needs the mlflow extra: pip install "
                            "'convnext-cifar[mlflow]'") from None
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about its tables
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri, self.cfg = uri, cfg
        self.client_class = MlflowClient
        self.client: Any = None
        self.run_id = ""  # restored from a state, or set by `open`
        self.pending: list[tuple[dict[str, Any], int]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = str(state.get("run_id", ""))

    def open(self, step: int) -> None:
        """Continue the run id the state gave (resumed at optimizer step `step`), or start a
        run (with the params); a store that cannot be used leaves the run untracked, with one
        line saying why. A run that already holds points past `step` (a rollback to an older
        state) is not continued: a new MLflow run takes the resumed line, tagged with the old."""
        scheme = urlsplit(self.uri).scheme
        if scheme in ("http", "https"):
            from convnext_cifar.model import reachable

            if not reachable(self.uri, PROBE_SECONDS):
                _warn(f"MLflow tracking server {self.uri} cannot be reached; this run is not "
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
                    _warn(f"MLflow run {self.run_id} is not in {self.uri} ({_first(e)}); "
                          "continuing in a new MLflow run")
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
            _warn(f"MLflow at {self.uri} is not usable ({_first(e)}); this run is not tracked "
                  "there (metrics.jsonl has everything)")
            self.client = None

    def _params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(self.cfg)).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def add(self, record: dict[str, Any], step: int | None) -> None:
        if self.client is not None:
            self.pending.append((record, int(step or 0)))

    def commit(self) -> None:
        """Send the records since the last state (called once a state is on disk)."""
        if self.client is None or not self.pending:
            self.pending.clear()
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for record, step in self.pending
                   for name, value in metric_names(record).items()]
        self.pending.clear()
        self._guard(lambda: [self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
                             for i in range(0, len(metrics), 900)])

    def artifact(self, path: Path) -> None:
        if self.client is not None and Path(path).exists():
            self._guard(lambda: self.client.log_artifact(self.run_id, str(path)))

    def close(self, status: str) -> None:
        """End the MLflow run: FINISHED, KILLED (interrupted: it may resume) or FAILED."""
        if self.client is None:
            return
        self.commit()
        state = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self._guard(lambda: self.client.set_terminated(self.run_id, status=state))

    def _guard(self, send) -> None:
        try:
            send()
        except Exception as e:  # noqa: BLE001 - a tracking failure never ends the training
            _warn(f"MLflow at {self.uri} failed ({_first(e)}); the run goes on without it")
            self.client = None


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def publish(cfg: TrainConfig, log: Any, device: str) -> None:
    """After the last epoch (rank 0): the report and its figures, to the trackers that are on.
    TensorBoard gets the confusion heatmap and the augmentation preview as images and the
    hparams with the final metrics; MLflow the best checkpoint and the report."""
    if log.tensorboard is None and log.mlflow is None:
        return
    try:
        from convnext_cifar.run_report import write_report

        page = write_report([cfg.run_dir], device=device)
    except UserError as e:
        _warn(f"no report for the trackers: {e}")
        page = None
    if log.tensorboard is not None:
        if page is not None:
            _tensorboard_images(log.tensorboard.writer, page)
        _tensorboard_hparams(log.tensorboard.writer, cfg)
    if log.mlflow is not None:
        log.mlflow.artifact(cfg.run_dir / "best.safetensors")
        if page is not None:
            for path in sorted(page.parent.glob(f"{page.stem}*")):
                log.mlflow.artifact(path)


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
    from convnext_cifar.runs import summarize

    summary = summarize(cfg.run_dir) or {}
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
               for k, v in flatten(to_dict(cfg)).items() if k not in ("name", "work_dir")}
    metrics = {"hparam/best_top1": float(summary.get("best_top1") or 0.0),
               "hparam/best_epoch": float(summary.get("best_epoch") or 0)}
    writer.add_hparams(hparams, metrics, run_name="hparams")
    writer.flush()
