"""Build timm's ConvNeXt-V2 from ModelConfig and load pretrained weights into it, verified.

Every pretrained source ends up as a state dict in timm's layout; `load_backbone` then loads it
with one rule for all of them: the backbone must load completely, the head may be fresh, and one
line says what was loaded, what was left fresh and what was ignored.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch

from convnext_cifar.config import ModelConfig
from convnext_cifar.errors import UserError
from convnext_cifar.files import write_file
from convnext_cifar.formats import SourceWeights, infer_variant, load_source

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HEAD_PREFIX = "head."  # timm's NormMlpClassifierHead: final norm (head.norm) and head.fc
BACKBONE_PREFIXES = ("stem.", "stages.")
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub's host before treating it as offline


def build_model(cfg: ModelConfig, num_classes: int, is_main: bool = True) -> torch.nn.Module:
    """The timm model with a fresh `num_classes` head, initialised from `cfg.pretrained`.

    `is_main`: this process prints the load report (one process of a multi-process run does).
    """
    import timm

    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                              drop_path_rate=cfg.drop_path_rate,
                              head_init_scale=cfg.head_init_scale)  # scales the fresh head
    if cfg.pretrained.lower() != "none":
        source = read_pretrained(cfg, model)
        report = load_backbone(model, source.state_dict, source.ignored)
        if is_main:
            print(f"pretrained {cfg.pretrained} ({source.layout} layout): {report}", flush=True)
    return model


def read_pretrained(cfg: ModelConfig, model: torch.nn.Module) -> SourceWeights:
    """Weights in timm's layout from a local file (any supported layout) or a timm tag."""
    spec = cfg.pretrained
    if Path(spec).expanduser().exists() or spec.endswith(WEIGHT_SUFFIXES) or "/" in spec:
        source = load_source(spec, cfg.pretrained_format, cfg.pretrained_prefix,
                             cfg.pretrained_weights)
    elif cfg.pretrained_weights == "ema":
        raise UserError(f"--model.pretrained {spec} is a timm tag, which holds one set of "
                        "weights; --model.pretrained-weights ema needs a training checkpoint")
    else:
        source = SourceWeights(_timm_hub_state_dict(spec, model), "timm", spec)
    variant = infer_variant(source.state_dict)
    if variant is not None and variant != cfg.name:
        raise UserError(f"--model.pretrained {spec} holds {variant} weights but --model.name is "
                        f"{cfg.name}; make them match")
    return source


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


def reachable(address: str, timeout: float) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` (DNS included)."""
    parts = urlsplit(address if "://" in address else "http://" + address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)  # name lookups ignore the timeout
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


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

    from convnext_cifar import __version__

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
                "converted_by": f"convnext-cifar {__version__}"}
    tensors = {k: v.contiguous() for k, v in report.tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_file(dst, save(tensors, metadata=metadata), advice="nothing was written")
    return name, report


# ---- EMA of the weights ------------------------------------------------------------------------

# Measured on real CIFAR-10 images (an outside check): decay 0.999 over a 942-step run ended
# 6.9 top-1 points behind the raw weights, 75.37 vs 82.32.
EMA_LAG_EVIDENCE = "decay 0.999 over a 942-step run ended 75.37 top-1 against 82.32 raw"


def ema_schedule(decay: float | str, warmup_steps: int, total_steps: int) -> tuple[float, int]:
    """The (decay, warmup) an EMA runs with: as given, or for `decay="auto"` one whose horizon
    1/(1-decay) is a tenth of the run (clamped to [0.9, 0.9999]) with timm's warmup (gamma 1
    unless --ema.warmup-steps says otherwise), so the average keeps up from the first steps."""
    if decay != "auto":
        return float(decay), warmup_steps
    return min(0.9999, max(0.9, 1.0 - 10.0 / max(total_steps, 1))), warmup_steps or 1


def ema_lag_warning(decay: float, total_steps: int) -> str:
    """'' when the EMA's horizon fits the run; else why it will lag and what to do."""
    if decay <= 0:
        return ""
    horizon = 1.0 / (1.0 - decay)
    if horizon <= total_steps / 3:
        return ""
    return (f"--ema.decay {decay:g} averages over about {horizon:,.0f} optimizer steps, "
            f"{horizon / max(total_steps, 1):.0%} of this {total_steps:,}-step run: the EMA will "
            f"lag the raw weights all along (on real images, {EMA_LAG_EVIDENCE}); "
            "--ema.decay auto picks a decay from the run's length")


class ModelEma:
    """An fp32 exponential moving average of a model's weights, updated on the device.

    The decay after optimizer step t (1-based) is timm's ModelEmaV3.get_decay(t): 0 at the first
    step (the average starts as a copy), then `decay`; with `warmup_steps` N > 0 it ramps in as
    min(decay, 1 - (1 + (t - 1) / N) ** -2/3) (ModelEmaV3 with use_warmup, warmup_gamma N).
    Stateful: its state is the averaged module's state dict. `forward` is the module to call
    (`wrap(module)`: compiled, say, as the run's own forward is).
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup_steps: int = 0,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        import copy

        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.forward = wrap(self.module) if wrap is not None else self.module
        self.decay, self.warmup_steps = decay, warmup_steps
        self._pairs: tuple | None = None  # (model, ema tensors, model tensors, non-float pairs)

    def decay_at(self, step: int) -> float:
        t = step - 1
        if t <= 0:
            return 0.0
        if self.warmup_steps:
            return min(self.decay, 1.0 - (1.0 + t / self.warmup_steps) ** (-2.0 / 3.0))
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Move the average towards `model` after optimizer step `step` (no host sync)."""
        if self._pairs is None or self._pairs[0] is not model:  # paired once, not every step
            pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
            floats = [(a, b) for a, b in pairs if a.is_floating_point()]
            self._pairs = (model, [a for a, _ in floats], [b for _, b in floats],
                           [(a, b) for a, b in pairs if not a.is_floating_point()])
        _, ema, new, others = self._pairs
        for a, b in others:
            a.copy_(b)
        torch._foreach_lerp_(ema, [b.float() for b in new], 1.0 - self.decay_at(step))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
