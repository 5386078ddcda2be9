"""Checkpoint layouts of other toolboxes, read safely and turned into timm's ConvNeXt-V2 layout.

    timm        stem.0 / stages.i.blocks.j.{conv_dw,norm,mlp.fc1,mlp.grn,mlp.fc2} / head.{norm,fc}
    mmpretrain  backbone.downsample_layers / backbone.stages.i.j.{depthwise_conv,norm,
                pointwise_conv1,grn.gamma|beta,pointwise_conv2} / backbone.norm3 / head.fc
    official    facebookresearch/ConvNeXt-V2: downsample_layers / stages.i.j.{dwconv,norm,pwconv1,
                grn.gamma|beta,pwconv2} / norm / head; raw FCMAE dumps add `encoder.` and sparse
                `kernel` tensors, which are made dense the way that repository's fine-tuning does.

Nothing in a checkpoint is executed: `.pth` files go through `files.load_pth`
(`torch.load(weights_only=True)`; classes of the toolboxes that write checkpoints, such as
MMEngine's HistoryBuffer, become inert placeholders, and any other global refuses the file).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convnext_cifar.errors import UserError
from convnext_cifar.files import load_pth, parse_json, require_file, safetensors_metadata

# (dims, depths) of timm's convnextv2_* variants, for inferring the size from the weights
VARIANTS = {
    "convnextv2_atto": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "convnextv2_femto": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "convnextv2_pico": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "convnextv2_nano": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "convnextv2_tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "convnextv2_base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "convnextv2_large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
    "convnextv2_huge": ((352, 704, 1408, 2816), (3, 3, 27, 3)),
}
CONTAINER_KEYS = ("state_dict", "model", "module")
# Where training checkpoints keep the EMA of the weights, beside the raw ones.
EMA_KEYS = ("model_ema", "state_dict_ema")  # official ConvNeXt-V2 / timm train.py
MAX_CLASSES = 100_000  # far more than any head trained here: a longer list is no class list
FCMAE_ONLY = ("decoder", "mask_token", "proj.", "pred.")  # FCMAE pre-training parts, not encoder


@dataclass
class SourceWeights:
    """A state dict already in timm's layout, and what was set aside on the way."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    origin: str
    ignored: list[str] = field(default_factory=list)
    classes: list[str] | None = None  # the names of the head's outputs, where the file says


def class_names(value: object) -> list[str] | None:
    """`value` as a list of class names, when it is one (a list or tuple of strings, at most
    MAX_CLASSES, none repeated); else None: names a file gives in another shape are not used."""
    if (isinstance(value, (list, tuple)) and 0 < len(value) <= MAX_CLASSES
            and all(isinstance(c, str) for c in value) and len(set(value)) == len(value)):
        return list(value)
    return None


def _safetensors_classes(path: Path) -> list[str] | None:
    """The class names in a safetensors file's metadata ("classes", a JSON list, as this
    project's weights and timm files it converted write them)."""
    text = safetensors_metadata(path).get("classes")
    try:
        return class_names(parse_json(text, "classes")) if text else None
    except UserError:
        return None


def _pth_classes(obj: object) -> list[str] | None:
    """MMEngine's `meta.dataset_meta.classes` (what MMPretrain's checkpoints record)."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    dataset_meta = meta.get("dataset_meta") if isinstance(meta, dict) else None
    return class_names(dataset_meta.get("classes")) if isinstance(dataset_meta, dict) else None


def read_file(path: Path, weights: str = "raw") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a .safetensors or .pth file, unwrapped; plus the entries set aside.

    `weights`: "raw", or "ema" for the exponential moving average a training checkpoint keeps
    beside them (MMEngine's EMAHook, the official ConvNeXt-V2 code, timm's train.py).
    """
    path = require_file(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if weights == "ema":
            raise UserError(f"{path} holds one set of weights, no EMA; use --model.pretrained-"
                            "weights raw (convert: --weights raw)")
        try:
            return load_file(str(path)), []
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    return _unwrap(_select_weights(load_pth(path), weights, path), path)


def _read_with_classes(path: Path, weights: str
                       ) -> tuple[dict[str, torch.Tensor], list[str], list[str] | None]:
    """`read_file`, plus the class names the file records (None where it names none)."""
    path = require_file(path, "weights file")
    if path.suffix == ".safetensors":
        return (*read_file(path, weights), _safetensors_classes(path))
    obj = load_pth(path)
    return (*_unwrap(_select_weights(obj, weights, path), path), _pth_classes(obj))


def _select_weights(obj: object, weights: str, path: Path) -> object:
    """The part of a training checkpoint that holds the raw or the EMA weights.

    MMEngine's EMAHook swaps them when it saves: `state_dict` then holds the EMA weights and
    `ema_state_dict` the raw ones (as `module.<key>`, beside a `steps` counter).
    """
    if not isinstance(obj, dict):
        return obj
    if "ema_state_dict" in obj and isinstance(obj.get("state_dict"), dict):
        if weights == "ema":
            return {"state_dict": obj["state_dict"], **_others(obj, "state_dict")}
        raw = {k[len("module."):]: v for k, v in obj["ema_state_dict"].items()
               if k.startswith("module.")}
        return {"state_dict": raw, **_others(obj, "state_dict")}
    ema_key = next((k for k in EMA_KEYS if isinstance(obj.get(k), dict)), None)
    if weights == "ema":
        if ema_key is None:
            raise UserError(f"{path} holds no EMA weights (no ema_state_dict, model_ema or "
                            "state_dict_ema); use --model.pretrained-weights raw (convert: "
                            "--weights raw)")
        return {"model": obj[ema_key], **_others(obj, ema_key, *CONTAINER_KEYS)}
    return obj


def _others(obj: dict, *taken: str) -> dict:
    """The entries of a checkpoint besides `taken`, as non-tensors: reported as set aside."""
    return {k: None for k in obj if k not in taken}


def _unwrap(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    ignored: list[str] = []
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                ignored = [k for k in obj if k != key]
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    ignored += [k for k in obj if k not in tensors]
    if not tensors:
        raise UserError(f"{path} holds no tensors; is it a model checkpoint?")
    if all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, ignored


# ---- layouts ----------------------------------------------------------------------------------

def detect_layout(keys) -> str:
    keys = list(keys)
    if any(".depthwise_conv." in k or ".pointwise_conv1." in k for k in keys):
        return "mmpretrain"
    if any(".dwconv." in k or ".pwconv1." in k or k.startswith("encoder.") for k in keys):
        return "official"
    if any(".conv_dw." in k or k.startswith("stem.") for k in keys):
        return "timm"
    raise UserError("cannot tell the checkpoint layout from its keys (e.g. "
                    f"{', '.join(keys[:3])}); pass --model.pretrained-format")


_COMMON = [  # (pattern, replacement) shared by the official and MMPretrain layouts
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.grn\.gamma$", ".mlp.grn.weight"),
    (r"\.grn\.beta$", ".mlp.grn.bias"),
]
_RENAMES = {
    "mmpretrain": _COMMON + [
        (r"\.depthwise_conv\.", ".conv_dw."),
        (r"\.pointwise_conv1\.", ".mlp.fc1."),
        (r"\.pointwise_conv2\.", ".mlp.fc2."),
        (r"^norm3\.", "head.norm."),
    ],
    "official": _COMMON + [
        (r"\.dwconv\.", ".conv_dw."),
        (r"\.pwconv1\.", ".mlp.fc1."),
        (r"\.pwconv2\.", ".mlp.fc2."),
        (r"^norm\.", "head.norm."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ],
}
_BACKBONE = re.compile(r"^(downsample_layers|stages)\.|^norm3?\.")


def _rename(state_dict: dict[str, torch.Tensor], layout: str
            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, ignored = {}, []
    for key, value in state_dict.items():
        if not (_BACKBONE.match(key) or key.startswith("head.")):
            ignored.append(key)  # e.g. MMPretrain's norms of other out_indices
            continue
        new = key
        for pattern, repl in _RENAMES[layout]:
            new = re.sub(pattern, repl, new)
        if ".mlp.grn." in new:
            value = value.reshape(-1)  # (C,), (1,C) and (1,1,1,C) all become (C,)
        out[new] = value
    return out, ignored


def densify_fcmae(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A raw FCMAE pre-training dump -> the dense official layout (official remap rules).

    Drops `encoder.`, turns sparse `kernel` tensors into dense conv weights, removes the `.ln.` /
    `.linear.` levels of Minkowski layers and flattens (1, C) biases; decoder parts are set aside.
    """
    out, ignored = {}, []
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            key = key[len("encoder."):]
        elif key.startswith(FCMAE_ONLY):
            ignored.append(key)
            continue
        if key.endswith(".kernel"):
            key = key[: -len(".kernel")] + ".weight"
            if value.ndim == 3:  # (k*k, in, out) sparse conv -> (out, in, k, k)
                kk, cin, cout = value.shape
                k = math.isqrt(kk)
                value = value.permute(2, 1, 0).reshape(cout, cin, k, k).transpose(3, 2)
            elif value.ndim == 2:  # (k*k, C) depthwise -> (C, 1, k, k)
                kk, dim = value.shape
                k = math.isqrt(kk)
                value = value.permute(1, 0).reshape(dim, 1, k, k).transpose(3, 2)
        elif ".ln." in key or ".linear." in key:
            key = key.replace(".ln.", ".").replace(".linear.", ".")
        if key.endswith(".bias") and value.ndim != 1:
            value = value.reshape(-1)
        out[key] = value.contiguous()
    return out, ignored


def to_timm(state_dict: dict[str, torch.Tensor], layout: str = "auto", prefix: str = ""
            ) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """A state dict of any supported layout in timm's: returns (state dict, layout, set aside).

    `prefix` keeps only the keys under it (like MMPretrain's init_cfg prefix='backbone').
    """
    ignored: list[str] = []
    if prefix:
        dotted = prefix.rstrip(".") + "."
        ignored = [k for k in state_dict if not k.startswith(dotted)]
        state_dict = {k[len(dotted):]: v for k, v in state_dict.items() if k.startswith(dotted)}
        if not state_dict:
            raise UserError(f"no keys start with prefix '{dotted}' in the weights")
    if layout == "auto":
        layout = detect_layout(state_dict)
    if layout == "timm":
        return dict(state_dict), layout, ignored
    if layout == "mmpretrain":
        state_dict = {k[len("backbone."):] if k.startswith("backbone.") else k: v
                      for k, v in state_dict.items()}
    if layout == "official" and any(k.startswith("encoder.") or k.endswith(".kernel")
                                    for k in state_dict):
        state_dict, dropped = densify_fcmae(state_dict)
        ignored += dropped
    out, dropped = _rename(state_dict, layout)
    if not out:
        raise UserError(f"no ConvNeXt-V2 tensors found for layout '{layout}'; check "
                        "--model.pretrained-format and the prefix")
    return out, layout, ignored + dropped


def infer_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The timm convnextv2_* name whose dims and depths the (timm-layout) weights have."""
    if "stem.0.weight" not in state_dict:
        return None
    dims, depths = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in state_dict
                  if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        dw = state_dict.get(f"stages.{i}.blocks.0.conv_dw.weight")
        dims.append(dw.shape[0] if dw is not None else 0)
    for name, (v_dims, v_depths) in VARIANTS.items():
        if tuple(dims) == v_dims and tuple(depths) == v_depths:
            return name
    return None


def load_source(spec: str, layout: str = "auto", prefix: str = "",
                weights: str = "raw") -> SourceWeights:
    """Read a local weights file of any supported layout into timm's layout."""
    path = Path(spec).expanduser()
    raw, ignored, classes = _read_with_classes(path, weights)
    state_dict, layout, dropped = to_timm(raw, layout, prefix)
    head = state_dict.get("head.fc.weight")
    if head is None or classes is None or len(classes) != head.shape[0]:
        classes = None  # names that do not describe this head are no names
    return SourceWeights(state_dict, layout, str(path), ignored + dropped, classes)
