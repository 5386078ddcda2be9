"""`export`: a checkpoint as an ONNX file (torch.onnx.export, dynamo) or a PyTorch 2 archive
(torch.export), with a dynamic batch dimension and the class names, image size and
normalisation in the file's metadata. Written to a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from convnext_cifar.config import DataConfig, to_dict
from convnext_cifar.data.loader import Normalize
from convnext_cifar.errors import UserError, need_extra
from convnext_cifar.files import file_hash, write_file
from convnext_cifar.runtime import Runtime
from convnext_cifar.use.evaluate import load_model

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
# Weights above this go to OUT.onnx.data (a protobuf message holds at most 2 GB), with room for
# the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
METADATA_FILE = "convnext_cifar.json"  # the pt2 archive's extra file with the metadata


def export_kind(out: Path, fmt: str | None, int8: bool = False, licence: str | None = None,
                push: str | None = None) -> str:
    """onnx, pt2 or hf, from --format or OUT's suffix; options that belong to another format
    are one UserError."""
    kind = fmt or FORMATS.get(Path(out).suffix.lower())
    if kind is None:
        raise UserError(f"cannot tell the export format from {Path(out).name!r}; name the file "
                        "*.onnx or *.pt2, or pass --format onnx|pt2|hf")
    if int8 and kind != "onnx":
        raise UserError(f"--int8 writes an ONNX file, not {kind}: name OUT *.onnx")
    for given, option in ((licence, "--license"), (push, "--push")):
        if given and kind != "hf":
            raise UserError(f"{option} belongs to --format hf (a model folder), not {kind}")
    return kind


def export_checkpoint(ckpt_path: Path, out: Path, fmt: str | None = None,
                      include_preprocessing: bool = False) -> dict:
    """Write `out`; returns the metadata written into it."""
    out = Path(out)
    fmt = export_kind(out, fmt)
    if fmt not in FORMATS.values():
        raise UserError(f"export_checkpoint writes onnx or pt2, not {fmt}")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: {out.parent} is not a folder")
    if fmt == "onnx":
        _require_onnx()
    loaded = load_model(ckpt_path, rt=Runtime(torch.device("cpu"), "fp32", compile=False,
                                              channels_last=False))
    model, ckpt, data = loaded.model, loaded.checkpoint, loaded.cfg.data
    mean, std = (list(values) for values in loaded.normalisation)
    stored = loaded.stored_size
    metadata = {"classes": ckpt.classes, "image_size": data.image_size,
                "input_size": stored if include_preprocessing else data.image_size,
                "mean": mean, "std": std, "resize": data.resize,
                "input": ("uint8 NCHW RGB 0-255 at input_size; normalised inside"
                          if include_preprocessing else
                          "float32 NCHW, (pixels 0-255 - mean) / std, at image_size"),
                "output": "logits (N, classes)", "checkpoint": loaded.path.name,
                "checkpoint_sha256": file_hash(loaded.path),
                "epoch": ckpt.epoch, "weights": ckpt.weights, "metrics": ckpt.metrics,
                "precision": "fp32", "config": _without_paths(to_dict(ckpt.config)),
                **({"dataset": ckpt.identity} if ckpt.identity is not None else {})}
    if include_preprocessing:
        # uint8 NCHW images at the stored size -> float, normalised, resized -> logits
        model = torch.nn.Sequential(Normalize(mean, std, data.image_size, "cpu", False),
                                    model).eval()
        example = torch.randint(0, 256, (2, 3, stored, stored), dtype=torch.uint8)
    else:
        example = torch.randn(2, 3, data.image_size, data.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    if fmt == "onnx":
        _write_onnx(model, example, batch, metadata, out)
    else:
        write_file(out, _pt2_bytes(model, example, batch, metadata),
                   advice="nothing was written")
    return metadata


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript"):
        need_extra(module, "ONNX export (onnx, onnxscript, onnxruntime)", "export")


def _write_onnx(model, example, batch, metadata, out: Path) -> None:
    """OUT.onnx, with the weights in OUT.onnx.data beside it when they pass protobuf's 2 GB
    limit; written in a temporary folder beside OUT, then renamed (the data file first)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each pass
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                    input_names=["images"], output_names=["logits"],
                                    verbose=False)
    program.model.metadata_props.update({k: json.dumps(v) for k, v in metadata.items()})
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        program.save(tmp / out.name, external_data=weights > EXTERNAL_DATA_BYTES)
        for written in sorted(tmp.iterdir(), key=lambda p: p.name == out.name):
            os.replace(written, out.parent / written.name)
    except OSError as e:
        raise UserError(f"could not write {out}: {e.strerror or e}; nothing was written"
                        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pt2_bytes(model, example, batch, metadata) -> bytes:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={METADATA_FILE: json.dumps(metadata)})
    return buf.getvalue()


def _without_paths(config: dict) -> dict:
    """The run's config as a shipped file may carry it: no local path (work dir, data root,
    cache, weights and teacher files are named by their last part only); `eval` of the file
    takes the data's place with --data.root."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    config["work_dir"] = None
    config["data"]["root"] = str(DataConfig().root)
    config["data"]["cache_dir"] = None
    for section, key in (("model", "pretrained"), ("distill", "teacher")):
        if config.get(section, {}).get(key):
            config[section][key] = Path(config[section][key]).name
    return config
