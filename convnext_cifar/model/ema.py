"""The exponential moving average of a model's weights (`ModelEma`), and the decay a run's EMA
runs with (`ema_schedule`, with `--ema.decay auto`) and whether it will lag the raw weights."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

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
