"""`export --int8`: a checkpoint as an INT8 ONNX file (ONNX Runtime static quantization, QDQ,
per-channel weights), calibrated on images of the run's own training split, and its parity with
the fp32 file measured on the held-out split before anything is written.

The steps: the fp32 export (export.py) into a temporary folder; ORT's pre-processing (graph
optimisation; its symbolic shape inference cannot read the dynamo exporter's ReduceMean, so it
is skipped: the exported graph carries its shapes already); calibration on `--int8.calibration-
images` training images drawn with `--int8.seed`, preprocessed as evaluation preprocesses them;
quantization of every supported node type but those `--int8.float-ops` keeps in float; then
both files run on the same held-out images (top-1 of each, agreement, largest logit
difference) and at batch 1 and 64 (img/s). A file that loses more than `--int8.max-drop`
top-1 points is refused unless `--int8.force`; otherwise it is renamed into place and the parity
report written beside it (OUT.parity.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import Int8Config
from convnext_cifar.data.dataset import identity_difference
from convnext_cifar.data.loader import eval_batches
from convnext_cifar.errors import UserError, need_extra
from convnext_cifar.files import write_file
from convnext_cifar.runtime import Runtime, cpu_name
from convnext_cifar.use.evaluate import LoadedModel, load_held_out, load_model
from convnext_cifar.use.export import export_checkpoint
from convnext_cifar.use.onnx_file import OnnxModule, RawImages

SPEED_BATCHES = (1, 64)
SPEED_SECONDS = 1.0  # timed per file and batch size, after a warm-up pass


def parity_path(out: Path) -> Path:
    """The parity report beside an INT8 file: OUT.parity.json."""
    return Path(out).with_suffix(".parity.json")


def export_int8(ckpt_path: Path, out: Path, cfg: Int8Config, include_preprocessing: bool = False,
                data_root: Path | None = None, say=print) -> dict[str, Any]:
    """Write the INT8 file `out` and its parity report; returns the report. Refused (one
    UserError, nothing written) when the INT8 file loses more than `cfg.max_drop` points."""
    need_extra("onnxruntime", "INT8 export (onnxruntime's quantization)", "export")
    loaded = load_model(ckpt_path, rt=Runtime(torch.device("cpu"), "fp32", compile=False,
                                              channels_last=False))
    data = calibration_data(loaded, data_root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.", dir=Path(out).parent))
    try:
        fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
        meta = export_checkpoint(ckpt_path, fp32, "onnx", include_preprocessing)
        raw_input = include_preprocessing
        calibration = calibration_batches(data, loaded, cfg, raw_input)
        say(f"calibrating on {sum(len(b) for b in calibration):,} training images "
            f"({cfg.calibration_method}), quantizing ...")
        quantize(fp32, int8, calibration, cfg, tmp)
        report = parity(fp32, int8, data, loaded, raw_input, cfg)
        report["settings"] = {**asdict(cfg), "float_ops": list(cfg.float_ops)}
        _stamp(int8, meta, report)
        report["int8_bytes"] = int8.stat().st_size
        drop = report["fp32_top1"] - report["int8_top1"]
        if drop > cfg.max_drop and not cfg.force:
            raise UserError(
                f"the INT8 file loses {drop:.2f} top-1 points on {report['images']:,} held-out "
                f"images (fp32 {report['fp32_top1']:.2f}% -> INT8 {report['int8_top1']:.2f}%), "
                f"more than --int8.max-drop {cfg.max_drop}; nothing was written. Calibrate on "
                "more images (--int8.calibration-images), keep more node types in float "
                "(--int8.float-ops), or pass --int8.force to write it anyway")
        shutil.move(str(int8), str(out))
        write_file(parity_path(out), json.dumps(report, indent=2).encode() + b"\n",
                   advice="the INT8 file was written")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


# ---- calibration ----------------------------------------------------------------------------

def calibration_data(loaded: LoadedModel, data_root: Path | None):
    """The run's dataset with its training split, which must be the one the run trained on."""
    data, _ = load_held_out(loaded, data_root, train=True, device="cpu")
    recorded = loaded.checkpoint.identity
    if recorded and (difference := identity_difference(recorded, data.identity, ("train",))):
        root = loaded.cfg.data.root if data_root is None else data_root
        raise UserError(f"the training images under {root} are not the ones {loaded.path} "
                        f"was trained on ({difference}); INT8 calibration uses the run's own "
                        "training split: point --data.root at it")
    return data


def calibration_batches(data, loaded: LoadedModel, cfg: Int8Config, raw_input: bool
                        ) -> list[torch.Tensor]:
    """`cfg.calibration_images` training images (all, if fewer), drawn with `cfg.seed`, as the
    file takes them: normalised at the image size, or uint8 at the stored size."""
    images = data.train.images
    count = min(cfg.calibration_images, len(images))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = images[order[:count].sort().values]
    labels = torch.zeros(count, dtype=torch.int64)
    return [x for x, _ in eval_batches(chosen, labels, 64, file_input(loaded, raw_input))]


def file_input(loaded: LoadedModel, raw_input: bool):
    """What turns uint8 images at the stored size into the file's input."""
    if raw_input:
        return RawImages(*loaded.normalisation, loaded.cfg.data.image_size, "cpu", False)
    return loaded.normalize


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of batches."""

    def __init__(self, name: str, batches: list[torch.Tensor]):
        self.items = iter([{name: b.contiguous().numpy()} for b in batches])

    def get_next(self):
        return next(self.items, None)


def quantize(fp32: Path, out: Path, batches: list[torch.Tensor], cfg: Int8Config, tmp: Path
             ) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )
    from onnxruntime.quantization.registry import QDQRegistry

    pre = tmp / "pre.onnx"
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    ops = [op for op in QDQRegistry if op not in cfg.float_ops]
    logging.disable(logging.WARNING)  # the quantizer warns on the root logger for every norm
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        name = OnnxModule(pre).input_name
        # uint8 activations with int8 weights (U8S8): x86's fast integer kernels (measured:
        # S8S8 ran slower than fp32 here, RESULTS.md)
        quantize_static(str(pre), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=cfg.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=ops,
                        calibrate_method=methods[cfg.calibration_method])
    finally:
        logging.disable(logging.NOTSET)


# ---- parity ---------------------------------------------------------------------------------

def parity(fp32: Path, int8: Path, data, loaded: LoadedModel, raw_input: bool, cfg: Int8Config
           ) -> dict[str, Any]:
    """Both files on the same held-out images and at batch 1 and 64 on this CPU."""
    a, b = OnnxModule(fp32), OnnxModule(int8)
    val = data.val
    count = len(val.images) if cfg.parity_images == 0 else min(cfg.parity_images, len(val.images))
    normalize = file_input(loaded, raw_input)
    hits = {"fp32": 0, "int8": 0}
    agree, max_diff = 0, 0.0
    for x, y in eval_batches(val.images, val.labels, 256, normalize, 0, count):
        la, lb = a(x), b(x)
        pa, pb = la.argmax(1), lb.argmax(1)
        hits["fp32"] += int((pa == y).sum())
        hits["int8"] += int((pb == y).sum())
        agree += int((pa == pb).sum())
        max_diff = max(max_diff, float((la - lb).abs().max()))
    example = next(eval_batches(val.images, val.labels, max(SPEED_BATCHES), normalize))[0]
    return {"images": count, "fp32_top1": 100.0 * hits["fp32"] / count,
            "int8_top1": 100.0 * hits["int8"] / count, "agreement": 100.0 * agree / count,
            "max_logit_diff": max_diff, "fp32_bytes": fp32.stat().st_size,
            **{f"{k}_img_per_s_batch{n}": images_per_second(m, example, n)
               for n in SPEED_BATCHES for k, m in (("fp32", a), ("int8", b))},
            "cpu": cpu_name(), "isa": cpu_isa(), "cpus": os.cpu_count(),
            "onnxruntime": _ort_version()}


def images_per_second(module: OnnxModule, example: torch.Tensor, batch: int,
                      seconds: float | None = None) -> float:
    """Images a second at `batch` (repeated from `example`), timed over about `seconds` after
    a warm-up pass."""
    seconds = SPEED_SECONDS if seconds is None else seconds
    x = example[:batch]
    if len(x) < batch:
        x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    module(x)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        module(x)
        runs += 1
    return batch * runs / elapsed


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The widest integer-matmul instruction set of this CPU: AMX, AVX512-VNNI, AVX-VNNI,
    AVX512, AVX2 (from /proc/cpuinfo's flags; else torch's CPU capability)."""
    flags = set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"),
                       ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX512"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return torch.backends.cpu.get_cpu_capability()


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _stamp(int8: Path, meta: dict[str, Any], report: dict[str, Any]) -> None:
    """The fp32 file's metadata on the INT8 file, its precision int8, and the parity figures."""
    import onnx

    model = onnx.load(str(int8))
    stamped = {**meta, "precision": "int8", "int8": {**report}}
    del model.metadata_props[:]
    for key, value in stamped.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(int8))
