"""Steps that leave no trace: what a short probe of a built run changes (its weights,
optimizer, scaler, random streams, the loader's draws, the EMA), snapshotted before and
restored after, so the run then trains as if the probe had never run. The budget's cost probe
and the learning-rate range test use it."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

from convnext_cifar.training.build import Run
from convnext_cifar.training.state import GlobalRng


def touched(run: Run) -> dict[str, Any]:
    """Every component a training step of `run` changes, by name."""
    return {"model": run.model, "optimizer": run.step_fn.optimizer, "scaler": run.step_fn.scaler,
            "rng": GlobalRng(run.rt.device, run.dist), "loader": run.loader,
            **({"ema": run.ema} if run.ema is not None else {})}


@contextlib.contextmanager
def restored(components: dict[str, Any], clock=time.perf_counter) -> Iterator[list[float]]:
    """Snapshot the components' states, run the body, put them back (also after an error).
    Yields a list that receives the seconds the snapshot took (what a state copy costs)."""
    started = clock()
    snapshot = {name: copy.deepcopy(c.state_dict()) for name, c in components.items()}
    cost = [clock() - started]
    try:
        yield cost
    finally:
        for name, c in components.items():
            c.load_state_dict(snapshot[name])
