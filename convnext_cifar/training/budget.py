"""--sched.budget: a run that plans its own length to end on time.

Before the first epoch of a fresh run, a short probe measures what an epoch costs here: a few
training steps (the first ones, which compile and warm up, are not timed, and said so), a few
validation batches, and the copy of a training state off the live tensors. Every component the
probe touches (weights, optimizer, scaler, random streams, the loader's draws, the EMA) is
restored afterwards, so the run trains exactly as the same run with its planned epochs set by
hand would. The plan: the most epochs whose training, validations, checkpoints and state copies
fit in what is left of the budget, the warmup scaled with them (the config's share of epochs),
so that the cosine reaches its floor at the end. It is recorded in the training state; a resumed
run keeps it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, parse_duration
from convnext_cifar.model.ema import ema_schedule
from convnext_cifar.model.optim import set_lr
from convnext_cifar.training.build import Run
from convnext_cifar.training.probe import restored
from convnext_cifar.use.evaluate import predict_logits

WARM_STEPS = 2  # untimed: compile, allocator, caches
TIMED_STEPS = 8
VAL_BATCHES = 3
MAX_EPOCHS = 1_000_000  # as --sched.epochs allows
CLOCK = time.perf_counter  # what the probe times with (a test's fake clock replaces it)


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds, as measured by the probe: one training step, one whole validation, one state
    copy (the part of a state write the loop waits for; also what a weights file costs)."""

    step_s: float
    val_s: float
    state_s: float


def epochs_within(budget_s: float, spent_s: float, steps: int, costs: Costs, cfg: TrainConfig
                  ) -> int:
    """The most epochs (at least 1) whose steps, validations (every --val-interval and the
    last), weights files (every --ckpt-interval and the last) and state copies (every
    --state-interval and the last) fit in `budget_s - spent_s`."""
    left = budget_s - spent_s
    low, high = 1, MAX_EPOCHS  # the cost grows with the epochs: bisect for the last that fits
    while low < high:
        middle = (low + high + 1) // 2
        if epochs_cost(middle, steps, costs, cfg) <= left:
            low = middle
        else:
            high = middle - 1
    return low


def planned(cfg: TrainConfig, epochs: int, warmup: int | None = None) -> TrainConfig:
    """`cfg` with `epochs` and the warmup scaled to keep its share of the run (or `warmup`)."""
    if warmup is None:
        warmup = min(epochs - 1, round(epochs * cfg.sched.warmup_epochs / cfg.sched.epochs))
    return dataclasses.replace(cfg, sched=dataclasses.replace(cfg.sched, epochs=epochs,
                                                              warmup_epochs=warmup))


def with_plan(cfg: TrainConfig, plan: dict[str, Any] | None) -> TrainConfig:
    """`cfg` as a recorded plan set it (unchanged without a budget or a plan)."""
    if not cfg.sched.budget or not plan:
        return cfg
    return planned(cfg, plan["epochs"], plan.get("warmup_epochs"))


def plan_of(found: tuple[Any, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The plan a training state recorded (None: none, or no state)."""
    return None if found is None else found[1]["components"]["run"].get("plan")


def measure(run: Run, components: dict[str, Any], clock: Callable[[], float] | None = None
            ) -> Costs:
    """The probe: time a few steps, validation batches and a state copy, then restore every
    component to what it was. Under torchrun every rank probes the same steps and the costs
    are averaged over the ranks, so every rank plans the same."""
    device, clock = run.rt.device, clock or CLOCK
    with restored(components, clock) as snapshot_s:
        set_lr(run.step_fn.optimizer, 0.0)  # the probe's steps change nothing that stays
        step_s = _step_s(run, clock)
        val_s = _validation_s(run, clock)
    costs = torch.tensor([step_s, val_s, snapshot_s[0]], dtype=torch.float64, device=device)
    return Costs(*(run.dist.all_reduce_sum(costs) / run.dist.world).tolist())


def _step_s(run: Run, clock: Callable[[], float]) -> float:
    """Seconds a full batch's step takes: up to TIMED_STEPS of the first epoch's full batches
    after WARM_STEPS untimed ones (fewer where the epoch is shorter; a last, smaller batch is
    never timed: it would make the steps look cheaper)."""
    device, steps, start, timed = run.rt.device, len(run.loader), None, 0
    warm = min(WARM_STEPS, max(steps - 2, 0))
    for i, (x, y, n) in enumerate(run.loader.epoch(0)):
        if i == 0:
            rows = len(x)
        if len(x) < rows and timed:
            break
        if i == warm:
            _sync(device)
            start = clock()
        run.step_fn(x, y, n)
        timed += i >= warm
        if timed >= TIMED_STEPS:
            break
    _sync(device)
    return (clock() - start) / max(timed, 1)


@torch.inference_mode()
def _validation_s(run: Run, clock: Callable[[], float]) -> float:
    """A whole validation's seconds, from a few batches of it (after one untimed)."""
    val, size = run.data.val, run.cfg.data.eval_batch_size
    batches = [val.images[i:i + size] for i in range(0, min(len(val.images),
                                                             size * (VAL_BATCHES + 1)), size)]
    run.forward.eval()
    images, started = 0, None
    for i, batch in enumerate(batches):
        if i == 1 or len(batches) == 1:
            _sync(run.rt.device)
            started = clock()
        x = run.normalize(batch.to(run.rt.device))
        predict_logits(run.forward if len(x) == size else run.model, x, run.rt, run.cfg.eval.tta)
        images += len(x) if started is not None else 0
    _sync(run.rt.device)
    run.forward.train()
    per_image = (clock() - started) / max(images, 1)
    return per_image * len(val.images) / run.dist.world * (2 if run.ema is not None else 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_run(run: Run, components: dict[str, Any], spent_s: float,
             clock: Callable[[], float] | None = None) -> tuple[Run, dict[str, Any]]:
    """A fresh budgeted run planned: (the run with its planned config, the plan to record)."""
    cfg, clock = run.cfg, clock or CLOCK
    budget_s = parse_duration(cfg.sched.budget)
    started = clock()
    costs = measure(run, components, clock)
    spent_s += clock() - started
    epochs = epochs_within(budget_s, spent_s, len(run.loader), costs, cfg)
    expected = spent_s + epochs_cost(epochs, len(run.loader), costs, cfg)
    plan = {"budget_s": budget_s, "epochs": epochs,
            "warmup_epochs": planned(cfg, epochs).sched.warmup_epochs, **dataclasses.asdict(costs),
            "setup_s": round(spent_s, 3), "planned_s": round(expected, 3),
            "started": time.time() - spent_s}
    return replanned(run, plan), plan


def replanned(run: Run, plan: dict[str, Any]) -> Run:
    """The run with the plan's epochs (the EMA's automatic decay follows the new length)."""
    cfg = with_plan(run.cfg, plan)
    if run.ema is not None and cfg.ema.decay == "auto":
        run.ema.decay, run.ema.warmup_steps = ema_schedule(
            cfg.ema.decay, cfg.ema.warmup_steps, cfg.sched.epochs * len(run.loader))
    return dataclasses.replace(run, cfg=cfg)


def epochs_cost(epochs: int, steps: int, costs: Costs, cfg: TrainConfig) -> float:
    """Seconds `epochs` epochs cost, as epochs_within counts them."""
    def times(interval: int) -> int:
        return epochs // interval + (1 if epochs % interval else 0)
    validations = times(cfg.val_interval)  # each may write best.safetensors too
    return (epochs * steps * costs.step_s + validations * (costs.val_s + costs.state_s)
            + (times(cfg.ckpt_interval) + times(cfg.state_interval)) * costs.state_s)


def plan_line(plan: dict[str, Any], cfg: TrainConfig, elapsed_s: float | None = None) -> str:
    """The plan in words; on a resume with how much of the budget is left."""
    end = time.strftime("%H:%M", time.localtime(plan["started"] + plan["planned_s"]))
    line = (f"budget {_duration(plan['budget_s'])}: {plan['epochs']} epochs planned "
            f"(warmup {cfg.sched.warmup_epochs}), expected to end at {end} after "
            f"{_duration(plan['planned_s'])}; measured {plan['step_s'] * 1e3:.0f} ms a step, "
            f"{plan['val_s']:.1f} s a validation, after {WARM_STEPS} untimed warm-up steps "
            "(compile excluded)")
    if elapsed_s is not None:
        left = plan["budget_s"] - plan["setup_s"] - elapsed_s
        line = (f"resumed within budget {_duration(plan['budget_s'])}: the plan of "
                f"{plan['epochs']} epochs stays; {_duration(max(left, 0))} of it left")
    return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes
            else f"{secs}s")


def shortened(plan: dict[str, Any], epoch: int, used_s: float, per_epoch_s: float,
              epochs: int, slack: float = 0.02) -> int:
    """The planned epochs, or fewer when the run has fallen behind its plan (a busier machine
    than the probe saw): after `epoch` of `epochs` epochs with `used_s` of the budget spent,
    the epochs still ahead at `per_epoch_s` each would end more than `slack` past the budget,
    so only those that fit what is left are kept (at least one more). Never more than
    planned: the plan is a ceiling."""
    if epoch >= epochs or per_epoch_s <= 0:
        return epochs
    if used_s + (epochs - epoch) * per_epoch_s <= plan["budget_s"] * (1 + slack):
        return epochs
    fit = int((plan["budget_s"] - used_s) // per_epoch_s)
    return max(epoch + 1, min(epochs, epoch + fit))


def shortened_line(epoch: int, before: int, after: int, used_s: float, budget_s: float) -> str:
    return (f"behind the budget's plan after epoch {epoch} ({_duration(used_s)} of "
            f"{_duration(budget_s)} used): {after} epochs instead of {before}; the cosine now "
            f"ends at epoch {after}")
