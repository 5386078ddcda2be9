"""An exported ONNX file (fp32 or INT8) run with ONNX Runtime on the CPU as a torch module, and
its metadata read back into the checkpoint it came from (config, classes, dataset identity), so
that `eval` and `predict` run it with the same preprocessing and checks as the checkpoint.
Nothing here imports the rest of use/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, from_dict
from convnext_cifar.data.loader import Normalize
from convnext_cifar.errors import UserError, need_extra
from convnext_cifar.files import require_file, shown
from convnext_cifar.model.checkpoints import Checkpoint
from convnext_cifar.model.formats import MAX_CLASSES, class_names

SUFFIX = ".onnx"
# The metadata keys a file exported by convnext-cifar carries (json values), beyond the
# descriptive ones (input, output, checkpoint name and hash).
REQUIRED = ("classes", "config", "epoch", "metrics", "weights", "mean", "std", "input_size")


def is_onnx(path: Path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


class OnnxModule(torch.nn.Module):
    """An ONNX Runtime session called like the model: a CPU tensor in, fp32 logits out."""

    def __init__(self, path: Path, threads: int = 0):
        super().__init__()
        need_extra("onnxruntime", "running an ONNX file (onnxruntime)", "export")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise UserError(f"{path} is not an ONNX file ONNX Runtime can load "
                            f"({str(e).splitlines()[0][:200]}); export it again") from None
        first = self.session.get_inputs()[0]
        self.input_name, self.uint8_input = first.name, first.type == "tensor(uint8)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu").contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


class RawImages(Normalize):
    """The normaliser of a file with the preprocessing inside: uint8 images go in as they are."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def open_onnx(path: Path) -> tuple[Checkpoint, OnnxModule, dict[str, Any]]:
    """(the checkpoint the file was exported from, without weights; the session as a module;
    the file's metadata, json-decoded), one UserError for a file of another kind."""
    path = require_file(Path(path), "ONNX file")
    module = OnnxModule(path)
    raw = module.metadata()
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise UserError(f"{path} was not exported by this version of convnext-cifar (its "
                        f"metadata lacks {', '.join(missing)}); export the checkpoint again with "
                        "`convnext-cifar export`")
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
        ckpt = Checkpoint({}, from_dict(TrainConfig, meta["config"]), meta["classes"],
                          meta["epoch"], meta["metrics"], meta["weights"], meta.get("dataset"))
    except (ValueError, TypeError, KeyError, UserError) as e:
        raise UserError(f"{path} has damaged metadata ({e}); export the checkpoint again"
                        ) from None
    if class_names(ckpt.classes) is None:
        raise UserError(f"{path} has damaged metadata (classes is {shown(ckpt.classes)}, not a "
                        f"list of at most {MAX_CLASSES:,} distinct names); export it again")
    width = module.session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width != len(ckpt.classes):
        raise UserError(f"{path} outputs {width} logits but its metadata names "
                        f"{len(ckpt.classes)} classes; the file was edited: export it again")
    return ckpt, module, meta
