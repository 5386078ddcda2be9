"""Build timm's ConvNeXt-V2 from ModelConfig and load pretrained weights into it, verified.

Every pretrained source ends up as a state dict in timm's layout (formats.py reads the other
toolboxes' layouts); `load_backbone` then loads it with one rule for all of them: the backbone
must load completely, the head may be fresh, and one line says what was loaded, what was left
fresh and what was ignored. `convert_to_timm` writes any of them as a timm safetensors file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convnext_cifar import __version__
from convnext_cifar.config import ModelConfig
from convnext_cifar.errors import UserError
from convnext_cifar.files import readable, require_file, write_file
from convnext_cifar.model.formats import SourceWeights, infer_variant, load_source
from convnext_cifar.network import reachable

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HEAD_PREFIX = "head."  # timm's NormMlpClassifierHead: final norm (head.norm) and head.fc
BACKBONE_PREFIXES = ("stem.", "stages.")
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub's host before treating it as offline


def build_model(cfg: ModelConfig, num_classes: int, is_main: bool = True,
                classes: list[str] | None = None) -> torch.nn.Module:
    """The timm model with a fresh `num_classes` head, initialised from `cfg.pretrained`.

    `classes`: the run's class names; where the weights name theirs too, the head's rows follow
    the names (`match_head`). `is_main`: this process prints the load report (one process of a
    multi-process run does).
    """
    import timm

    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                              drop_path_rate=cfg.drop_path_rate,
                              head_init_scale=cfg.head_init_scale)  # scales the fresh head
    if cfg.pretrained.lower() != "none":
        source = read_pretrained(cfg, model)
        state_dict, said = match_head(model, source.state_dict, source.classes, classes)
        report = load_backbone(model, state_dict, source.ignored)
        if is_main:
            print(f"pretrained {cfg.pretrained} ({source.layout} layout): {report}", flush=True)
            if said:
                print(f"pretrained {cfg.pretrained}: {said}", flush=True)
    return model


def match_head(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
               theirs: list[str] | None, ours: list[str] | None
               ) -> tuple[dict[str, torch.Tensor], str]:
    """The weights with their classifier (head.fc) laid out for the run's classes, and one line
    saying what changed ('' when nothing did).

    Where both lists of names are known, each of the run's classes takes the row of the class of
    the same name, and a class the weights do not have keeps the model's fresh row: the same
    names in another order are re-ordered, other names are a fresh head. A head of the run's
    class count whose weights name no classes is kept as it is, and said so.
    """
    weight, bias = state_dict.get("head.fc.weight"), state_dict.get("head.fc.bias")
    own = model.state_dict()
    if weight is None or bias is None or "head.fc.weight" not in own or ours is None:
        return state_dict, ""
    fresh_w, fresh_b = own["head.fc.weight"], own["head.fc.bias"]
    if theirs is None:
        if weight.shape == fresh_w.shape:
            return state_dict, (f"its {len(ours)}-class head is kept: the weights name no "
                                "classes, so they are taken to be this run's, in its order")
        return state_dict, ""
    if theirs == ours or weight.shape[1:] != fresh_w.shape[1:]:
        return state_dict, ""
    rows = [dict(zip(theirs, range(len(theirs)))).get(name) for name in ours]
    kept = sum(r is not None for r in rows)
    if not kept:
        rest = {k: v for k, v in state_dict.items() if not k.startswith("head.fc.")}
        return rest, (f"head.fc fresh: none of the weights' {len(theirs)} classes "
                      f"({_listed(theirs)}) is one of this run's ({_listed(ours)})")
    new_w, new_b = fresh_w.clone().to(weight.dtype), fresh_b.clone().to(bias.dtype)
    for i, r in enumerate(rows):
        if r is not None:
            new_w[i], new_b[i] = weight[r], bias[r]
    if kept == len(ours) == len(theirs):
        said = "head.fc re-ordered: the weights hold the run's classes in another order"
    else:
        missing = [name for name, r in zip(ours, rows) if r is None]
        said = (f"head.fc rows taken by class name for {kept} of the run's {len(ours)} classes;"
                f" fresh for {_listed(missing)}")
    return {**state_dict, "head.fc.weight": new_w, "head.fc.bias": new_b}, said


def _listed(names: list[str]) -> str:
    shown = ", ".join(readable(n) for n in names[:5])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def _is_file_spec(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.endswith(WEIGHT_SUFFIXES) or "/" in spec


def check_pretrained(cfg: ModelConfig) -> None:
    """What can be told about --model.pretrained without reading or fetching weights: a file
    that is there, or a timm tag of this model (one UserError otherwise). `tune` checks every
    value it may draw with it; reading the weights checks the rest."""
    spec = cfg.pretrained
    if spec.lower() == "none":
        return
    if _is_file_spec(spec):
        require_file(Path(spec).expanduser(), "weights file")
        return
    if cfg.pretrained_weights == "ema":
        raise UserError(f"--model.pretrained {spec} is a timm tag, which holds one set of "
                        "weights; --model.pretrained-weights ema needs a training checkpoint")
    import timm

    arch = spec.split(".")[0]
    if spec not in timm.list_pretrained(arch + ".*"):
        raise UserError(f"--model.pretrained {spec!r} is neither an existing file nor a timm "
                        "pretrained tag (see timm.list_pretrained('convnextv2*')), nor 'none'")
    if arch != cfg.name:
        raise UserError(f"--model.pretrained {spec} is for {arch}, but --model.name is "
                        f"{cfg.name}; make them match")


def read_pretrained(cfg: ModelConfig, model: torch.nn.Module) -> SourceWeights:
    """Weights in timm's layout from a local file (any supported layout) or a timm tag."""
    check_pretrained(cfg)
    spec = cfg.pretrained
    if _is_file_spec(spec):
        source = load_source(spec, cfg.pretrained_format, cfg.pretrained_prefix,
                             cfg.pretrained_weights)
    else:
        source = SourceWeights(_timm_hub_state_dict(spec, model), "timm", spec)
    variant = infer_variant(source.state_dict)
    if variant is not None and variant != cfg.name:
        raise UserError(f"--model.pretrained {spec} holds {variant} weights but --model.name is "
                        f"{cfg.name}; make them match")
    return source


def _timm_hub_state_dict(tag: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fetch a timm pretrained tag (checked by check_pretrained) through timm's own resolution
    (HF hub, URL, cache)."""
    from timm.models import get_pretrained_cfg, load_pretrained
    from timm.models.convnext import checkpoint_filter_fn

    captured: dict[str, torch.Tensor] = {}

    def capture(state_dict, m):  # timm calls this with the downloaded weights
        captured.update(checkpoint_filter_fn(state_dict, m))
        return {}  # load nothing here: load_backbone checks and reports the real load

    pretrained_cfg = get_pretrained_cfg(tag).to_dict()
    try:
        with hub_offline_unless_reachable(pretrained_cfg) as unreachable:
            load_pretrained(model, pretrained_cfg=pretrained_cfg, num_classes=0,
                            filter_fn=capture, strict=False)
    except Exception as e:  # network, hub and cache errors come in many types
        why = (f"{unreachable} cannot be reached and they are not in the local cache"
               if unreachable else f"{type(e).__name__}: {e}")
        raise UserError(f"could not fetch pretrained weights {tag} ({why}); this needs internet "
                        "access, or pass a local file to --model.pretrained") from None
    return captured


@contextlib.contextmanager
def hub_offline_unless_reachable(pretrained_cfg: dict) -> Iterator[str]:
    """Fetch from the Hugging Face hub only when it answers; else from the local cache alone.

    Without this, an offline machine spends a minute in the hub client's retries before the same
    error. HF_HUB_OFFLINE=1 is honoured as it is. Yields the unreachable address ('' if none).
    """
    from huggingface_hub import constants

    # HF_HUB_OFFLINE is read at call time by the hub client (huggingface_hub 0.2x-1.x); were it
    # ever gone, fetch as the client would, with its own retries.
    if getattr(constants, "HF_HUB_OFFLINE", True) or not pretrained_cfg.get("hf_hub_id"):
        yield ""
        return
    address = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
               or getattr(constants, "ENDPOINT", "https://huggingface.co"))
    if reachable(address, HUB_PROBE_SECONDS):
        yield ""
        return
    constants.HF_HUB_OFFLINE = True  # cache only
    try:
        yield address
    finally:
        constants.HF_HUB_OFFLINE = False


@dataclass
class LoadReport:
    """What a load did: tensors loaded (fitted to the model), left fresh, and set aside."""

    tensors: dict[str, torch.Tensor]
    fresh: list[str]
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

        return (f"loaded {len(self.tensors)} tensors; fresh: {names(self.fresh) or 'nothing'}; "
                f"ignored: {names(self.ignored) or 'nothing'}")


def layout_mismatch(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> str:
    """'' when `state_dict` fits `model` exactly; else the first differing keys, for a message."""
    own = model.state_dict()
    problems = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                if k in state_dict and state_dict[k].shape != v.shape]
    problems += [f"missing {k}" for k in own if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in own]
    more = f" ... ({len(problems)} in all)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _same_but_unit_dims(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and a.squeeze().shape == b.squeeze().shape


def fit_to_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                 ignored: list[str] | None = None) -> LoadReport:
    """Match a timm-layout state dict to `model`: the whole backbone, the head where it fits.

    Head tensors that are absent or shaped for another class count stay fresh; a backbone tensor
    that is absent or of another shape, or a backbone tensor the model has no place for, is an
    error naming it. Tensors that differ from the model's only by size-1 dimensions (timm's
    1x1-conv MLP of the small variants against Linear weights) are reshaped.
    """
    own = model.state_dict()
    loaded, fresh, missing, mismatched = {}, [], [], []
    for key, target in own.items():
        source = state_dict.get(key)
        if source is not None and source.shape != target.shape and _same_but_unit_dims(
                source, target):
            source = source.reshape(target.shape)
        if source is not None and source.shape == target.shape:
            loaded[key] = source.to(target.dtype)
        elif key.startswith(HEAD_PREFIX):
            fresh.append(key)
        elif source is None:
            missing.append(key)
        else:
            mismatched.append(f"{key} {tuple(source.shape)} vs {tuple(target.shape)}")
    extra = sorted(k for k in set(state_dict) - set(own) if k.startswith(BACKBONE_PREFIXES))
    if missing or mismatched or extra:
        problems = []
        for label, keys in (("missing", missing), ("shape", mismatched), ("unexpected", extra)):
            if keys:
                more = " ..." if len(keys) > 4 else ""
                problems.append(f"{label} {', '.join(keys[:4])}{more}")
        raise UserError("pretrained weights do not fit the model (" + "; ".join(problems)
                        + "); check --model.name against the weights")
    ignored = list(ignored or []) + sorted(set(state_dict) - set(own))
    return LoadReport(loaded, fresh, ignored)


def load_backbone(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                  ignored: list[str] | None = None) -> LoadReport:
    """Load a timm-layout state dict into `model` as `fit_to_model` allows; report what it did."""
    report = fit_to_model(model, state_dict, ignored)
    model.load_state_dict({**model.state_dict(), **report.tensors})
    return report


def convert_to_timm(src: str, dst: Path, name: str | None = None, layout: str = "auto",
                    prefix: str = "", weights: str = "raw") -> tuple[str, LoadReport]:
    """Write `src` (any supported layout) as a timm-layout safetensors file that timm loads.

    The ConvNeXt-V2 size is inferred from the weights (and checked against `name` when given);
    every tensor is verified against the timm model and saved in its exact shape.
    """
    import timm
    from safetensors.torch import save

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise UserError(f"convert writes safetensors: give a DST ending in .safetensors, not {dst}")
    source = load_source(src, layout, prefix, weights)
    variant = infer_variant(source.state_dict)
    if name is None and variant is None:
        raise UserError(f"{src}: the weights match no timm convnextv2_* size; pass --model.name")
    if name is not None and variant is not None and name != variant:
        raise UserError(f"{src} holds {variant} weights, not {name}; drop --model.name or fix it")
    name = name or variant
    head = source.state_dict.get("head.fc.weight")
    num_classes = head.shape[0] if head is not None else 0
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    report = fit_to_model(model, source.state_dict, source.ignored)
    metadata = {"format": "timm", "model": name, "num_classes": str(num_classes),
                "source_layout": source.layout, "source_file": Path(src).name,
                "source_weights": weights,
                "converted_by": f"convnext-cifar {__version__}",
                **({"classes": json.dumps(source.classes)} if source.classes else {})}
    tensors = {k: v.contiguous() for k, v in report.tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_file(dst, save(tensors, metadata=metadata), advice="nothing was written")
    return name, report
