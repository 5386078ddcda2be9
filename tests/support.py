"""Helpers the tests share: command lines for quick runs on the generated data, signals and kills at
chosen moments, small models and runs, dataset configs, readers of what a run wrote, and the
paths of the repository, the tests and their fixtures."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open

from convnext_cifar.config import (
    DataConfig,
)
from convnext_cifar.data.cifar import CIFAR10
from convnext_cifar.data.dataset import Dataset, Split
from convnext_cifar.data.loader import DeviceLoader, Normalize
from convnext_cifar.distributed import Dist
from convnext_cifar.model.optim import build_optimizer
from convnext_cifar.outputs.workdir import find_states
from convnext_cifar.runtime import Runtime, prepare_model
from convnext_cifar.training import step as training_step
from convnext_cifar.training.build import Run
from convnext_cifar.training.state import load_state
from convnext_cifar.training.step import TrainStep, cross_entropy_sum

TESTS = Path(__file__).parent
ROOT = TESTS.parent
PACKAGE = ROOT / "convnext_cifar"
FIXTURES = TESTS / "fixtures" / "convnextv2_atto"  # upstream atto files (see its README)



def decoded_cache() -> Path:
    """Where this test's image folders are decoded to: the user cache folder's decoded/ (each
    test has its own $XDG_CACHE_HOME: conftest.py)."""
    return Path(os.environ["XDG_CACHE_HOME"]) / "convnext-cifar" / "decoded"


def small_run_args(root: Path, work_dir: Path, *extra: str) -> list[str]:
    """`train` arguments for a quick CPU run of atto on the generated data."""
    return ["train", "--preset", "smoke", "--data.root", str(root), "--data.no-download",
            "--work-dir", str(work_dir), "--data.batch-size", "50", "--data.limit-train", "0",
            "--data.limit-val", "0", "--log-interval", "5", "--device", "cpu", "--compile", "off",
            *extra]


def signal_at_step(monkeypatch, at_step: int, signum: int = signal.SIGTERM):
    """Deliver `signum` to this process (through the real handler) right after training step
    `at_step`; returns the function that restores the real step."""

    real, calls = training_step.TrainStep.__call__, []

    def step_then_signal(self, x, y, n=None):
        out = real(self, x, y, n)
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(training_step.TrainStep, "__call__", step_then_signal)
    return lambda: monkeypatch.setattr(training_step.TrainStep, "__call__", real)


def die_after_state(monkeypatch, count: int = 1):
    """A hard kill (SystemExit) right after the `count`-th training state is on disk; returns
    the function that restores the real save."""
    from convnext_cifar.training.state import TrainingState

    real, saved = TrainingState.save, []

    def save_then_die(state, *args, **kwargs):
        path = real(state, *args, **kwargs)
        saved.append(path)
        if len(saved) == count:
            if state.writer.pending:  # the background write finishes; nothing after it runs
                state.writer.pending[0].result()
            raise SystemExit("killed")
        return path

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    return lambda: monkeypatch.setattr(TrainingState, "save", real)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "convnext_cifar", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def data_cfg(root, **kw):
    return dataclasses.replace(DataConfig(), root=root, download=False, **kw)


def folder_cfg(root, **kw):
    return data_cfg(root, dataset="folder", decode_processes=1, **kw)


def png_claiming(width, height):
    """A tiny, valid-looking PNG whose header claims width x height pixels."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


CPU = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                             num_classes=10)


def tiny_run(rt, images, labels, cfg):
    """A Run of the tiny model on given device-resident data (no dataset files)."""
    model, fwd = prepare_model(tiny_model(), rt)
    normalize = Normalize(CIFAR10.mean, CIFAR10.std, 32, rt.device, True)
    data = Dataset(Split(images, labels), [str(i) for i in range(10)], CIFAR10.mean, CIFAR10.std,
                   {}, train=Split(images, labels))
    step = TrainStep(fwd, build_optimizer(model, cfg.optim, rt.device), rt, cross_entropy_sum(0.0),
                     5.0)
    loader = DeviceLoader(images, labels, cfg.data, 0, normalize)
    return Run(cfg, rt, Dist(), data, model, fwd, step, loader)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


NAME = "convnextv2-atto_cifar10-smoke"


def quick_train(root, *extra):
    """`train` of the smoke preset on the generated data, default work dir, one short epoch."""
    return ["train", "--preset", "smoke", "--data.root", str(root), "--data.no-download",
            "--device", "cpu", "--compile", "off", "--sched.epochs", "1",
            "--sched.warmup-epochs", "0", "--data.limit-train", "100", "--data.limit-val", "50",
            "--data.batch-size", "25", "--log-interval", "2", *extra]




def random_images(n):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,))


def save_sideways(path: Path, upright: np.ndarray, **save) -> None:
    """`upright` stored rotated a quarter turn with EXIF orientation 6 (display: turn it 90
    degrees clockwise), as phones store portrait photos."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, k=1).copy()).save(path, exif=exif, **save)






ONE_EPOCH = ("--sched.epochs", "1", "--sched.warmup-epochs", "0", "--data.limit-train", "100",
             "--data.limit-val", "50")


def folder_args(root, work, *extra):
    return small_run_args(root, work, "--data.dataset", "folder", "--data.batch-size", "10",
                          "--data.decode-processes", "1", "--sched.warmup-epochs", "0", *extra)


def folder_data(root, **kw):
    return DataConfig(dataset="folder", root=root, download=False, decode_processes=1,
                      skip_bad_images=True, **kw)


FEW = ("--sched.epochs", "2", "--sched.warmup-epochs", "0", "--data.limit-train", "150",
       "--data.limit-val", "120", "--log-interval", "1")


EXACT = ("--sched.epochs", "3", "--sched.warmup-epochs", "1", "--data.limit-train", "200",
         "--data.limit-val", "100", "--model.drop-path-rate", "0.1", "--keep-last", "10",
         "--log-interval", "3")  # 4 steps an epoch: log points fall mid-epoch too


def read_weights(path):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta.pop("config"))
    config.pop("work_dir")
    return tensors, meta, config


def timeless_records(work):
    """metrics.jsonl's records without the wall-clock measurements (metrics.TIMINGS)."""
    return [without_timings(json.loads(line))
            for line in (work / "metrics.jsonl").read_text().splitlines()]


def without_timings(record: dict) -> dict:
    from convnext_cifar.metrics import TIMINGS

    return {k: v for k, v in record.items() if k not in TIMINGS}


def assert_same_run(a, b):
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        ta, ma, ca = read_weights(a / name)
        tb, mb, cb = read_weights(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        assert ma == mb and ca == cb, name
    assert timeless_records(a) == timeless_records(b)
    sa, sb = (load_state(find_states(w)[-1])["components"] for w in (a, b))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def atto_checkpoint(path: Path, classes=("a", "b", "c"), **config) -> Path:
    """A best.safetensors as `train` writes it, of a fresh convnextv2_atto run on CPU (no data
    needed): what eval, predict and export read."""
    from convnext_cifar.config import TrainConfig
    from convnext_cifar.model.checkpoints import save_weights
    from convnext_cifar.presets import CIFAR10Smoke

    cfg = dataclasses.replace(CIFAR10Smoke(), device="cpu", compile="off", **config)
    torch.manual_seed(0)
    model = timm.create_model(cfg.model.name, num_classes=len(classes))
    assert isinstance(cfg, TrainConfig)
    save_weights(path, model.state_dict(), cfg, list(classes), 1, {"top1": 50.0},
                 {"device": "cpu"}, identity=None)
    return path


def wandb_offline_records(work_dir: Path) -> list:
    """Every record of every offline W&B run under WORK_DIR/wandb/, in the order written: the
    .wandb files read as the LevelDB-style log they are (7-byte file header, then 32 KiB
    blocks of chunks: crc32c 4, length 2, type 1; FULL=1 FIRST=2 MIDDLE=3 LAST=4), each record
    a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(Path(work_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        data, at, record = path.read_bytes(), 7, b""
        while at + 7 <= len(data):
            if 32768 - at % 32768 < 7:  # a block's tail too short for a header: padding
                at += 32768 - at % 32768
                continue
            length, kind = int.from_bytes(data[at + 4:at + 6], "little"), data[at + 6]
            if length == 0 and kind == 0:
                break
            record += data[at + 7:at + 7 + length]
            at += 7 + length
            if kind in (1, 4):  # a whole record
                parsed = wandb_internal_pb2.Record()
                parsed.ParseFromString(record)
                records.append(parsed)
                record = b""
    return records


def wandb_offline_history(work_dir: Path) -> list[dict]:
    """The metrics rows (history records) of the offline W&B runs under WORK_DIR/wandb/."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item} for r in wandb_offline_records(work_dir)
            if r.WhichOneof("record_type") == "history"]
