"""Build timm's ConvNeXt-V2 from ModelConfig and load pretrained weights into it, verified.

Every pretrained source ends up as a state dict in timm's layout; `load_backbone` then loads it
with one rule for all of them: the backbone must load completely, the head may be fresh, and one
line says what was loaded, what was left fresh and what was ignored.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from convnext_cifar.checkpoints import require_file
from convnext_cifar.config import ModelConfig
from convnext_cifar.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HEAD_PREFIX = "head."  # timm's NormMlpClassifierHead: final norm (head.norm) and head.fc


def build_model(cfg: ModelConfig, num_classes: int, verbose: bool = True) -> torch.nn.Module:
    """The timm model with a fresh `num_classes` head, initialised from `cfg.pretrained`."""
    import timm

    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                              drop_path_rate=cfg.drop_path_rate)
    if cfg.pretrained.lower() != "none":
        state_dict = read_pretrained(cfg.pretrained, model)
        report = load_backbone(model, state_dict)
        if verbose:
            print(f"pretrained {cfg.pretrained}: {report}", flush=True)
    return model


def read_pretrained(spec: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict in timm's layout from a local file or a timm pretrained tag."""
    path = Path(spec).expanduser()
    if path.exists() or spec.endswith(WEIGHT_SUFFIXES) or "/" in spec:
        return read_weights_file(path)
    return _timm_hub_state_dict(spec, model)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth file, unwrapped from common checkpoint containers."""
    path = require_file(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} needs arbitrary code to unpickle and was refused, not run "
                        f"({first[:200]}); convert it to safetensors where you trust it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({e}); it may be "
                        "truncated or of another kind") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors; is it a model checkpoint?")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _timm_hub_state_dict(tag: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fetch a timm pretrained tag through timm's own resolution (HF hub, URL, cache)."""
    import timm
    from timm.models import get_pretrained_cfg, load_pretrained
    from timm.models.convnext import checkpoint_filter_fn

    arch = tag.split(".")[0]
    if tag not in timm.list_pretrained(arch + ".*"):
        raise UserError(f"--model.pretrained {tag!r} is neither an existing file nor a timm "
                        "pretrained tag (see timm.list_pretrained('convnextv2*')), nor 'none'")
    expected = model.pretrained_cfg.get("architecture")
    if arch != expected:
        raise UserError(f"--model.pretrained {tag} is for {arch}, but --model.name is "
                        f"{expected}; make them match")
    captured: dict[str, torch.Tensor] = {}

    def capture(state_dict, m):  # timm calls this with the downloaded weights
        captured.update(checkpoint_filter_fn(state_dict, m))
        return {}  # load nothing here: load_backbone checks and reports the real load

    try:
        load_pretrained(model, pretrained_cfg=get_pretrained_cfg(tag).to_dict(),
                        num_classes=0, filter_fn=capture, strict=False)
    except Exception as e:  # network, hub and cache errors come in many types
        raise UserError(f"could not fetch pretrained weights {tag} ({type(e).__name__}: {e}); "
                        "this needs internet access, or pass a local file to "
                        "--model.pretrained") from None
    return captured


@dataclass
class LoadReport:
    loaded: list[str]
    fresh: list[str]
    ignored: list[str]

    def __str__(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")

        return (f"loaded {len(self.loaded)} tensors; fresh: {names(self.fresh) or 'nothing'}; "
                f"ignored: {names(self.ignored) or 'nothing'}")


def _same_but_unit_dims(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and a.squeeze().shape == b.squeeze().shape


def load_backbone(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> LoadReport:
    """Load `state_dict` (timm layout): the whole backbone, the head where it fits.

    Head tensors that are absent or shaped for another class count stay fresh; a backbone tensor
    that is absent or of another shape is an error naming it. Tensors that differ from the
    model's only by size-1 dimensions (timm's 1x1-conv MLP of the small variants) are reshaped.
    """
    own = model.state_dict()
    loaded, fresh, missing, mismatched = {}, [], [], []
    for key, target in own.items():
        source = state_dict.get(key)
        if source is not None and source.shape != target.shape and _same_but_unit_dims(
                source, target):
            source = source.reshape(target.shape)
        if source is not None and source.shape == target.shape:
            loaded[key] = source
        elif key.startswith(HEAD_PREFIX):
            fresh.append(key)
        elif source is None:
            missing.append(key)
        else:
            mismatched.append(f"{key} {tuple(source.shape)} vs {tuple(target.shape)}")
    if missing or mismatched:
        problems = [f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
                    ] if missing else []
        problems += [f"shape {', '.join(mismatched[:5])}"] if mismatched else []
        raise UserError("pretrained weights do not fit the model ("
                        + "; ".join(problems) + "); check --model.name against the weights")
    model.load_state_dict({**own, **loaded})
    ignored = sorted(set(state_dict) - set(own))
    return LoadReport(sorted(loaded), fresh, ignored)
