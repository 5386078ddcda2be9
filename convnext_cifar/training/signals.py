"""Stopping cleanly: SIGTERM or a first Ctrl-C finish the current step, write a resumable state
and end the run with the command that resumes it; a second Ctrl-C quits at once."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import Interrupted
from convnext_cifar.training.state import Position


class StopSignals:
    """SIGTERM or a first Ctrl-C ask the loop to stop after the current step; a second Ctrl-C
    raises KeyboardInterrupt at once (nothing more is written)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a resumable "
              "state (Ctrl-C again to quit at once, without it)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def agreed(self, dist: Dist, at_log: bool, device: torch.device) -> bool:
        """Whether to stop now: one process at once; DDP ranks together, at log points only."""
        if not dist.enabled:
            return self.requested
        return at_log and dist.any(self.requested, device)

    def interrupted(self, path: Path, position: Position, cfg: TrainConfig) -> Interrupted:
        """The exception that ends the run after the state at `path` was written."""
        signum = self.signum or signal.SIGTERM  # a rank that agreed to stop without the signal
        where = (f"epoch {position.epoch + 1}, batch {position.batch}" if position.batch
                 else f"the end of epoch {position.epoch}")
        return Interrupted(
            f"{signal.Signals(signum).name}: stopped at {where} (step {position.step}); state "
            f"saved to {path}. Resume with: convnext-cifar train --resume {cfg.run_dir}",
            128 + signum)
