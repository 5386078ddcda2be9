"""`lr-find`: the learning-rate range test (Smith 2015; fastai's and Lightning's lr_find).

The built run trains at most one epoch with the learning rate growing exponentially from
`start_lr` to `end_lr`, one value per optimizer step; the loss is read after every step (the
only place in the package that syncs each step: it is a measurement), smoothed with a
bias-corrected running average, and the test stops once the smoothed loss exceeds `diverge`
times its lowest value (or is not finite). The run's components are restored afterwards
(probe.py), so `--optim.lr auto` can run it before training and train as if it had not.

Two rules suggest a value from the smoothed curve: `steepest`, the LR where the loss falls
fastest against log(LR); `valley` (fastai's default since 2.5), the point a third and a half
into the longest stretch over which the loss keeps decreasing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from convnext_cifar.config import LrFindConfig, TrainConfig
from convnext_cifar.data.kinds import load_dataset, prepare_dataset
from convnext_cifar.files import atomic_writer
from convnext_cifar.model.optim import set_lr
from convnext_cifar.outputs.workdir import check_output
from convnext_cifar.runtime import configure_backends, resolve_runtime
from convnext_cifar.training.build import Run, build_run
from convnext_cifar.training.micro_batch import resolve_auto_micro_batch
from convnext_cifar.training.probe import restored, touched


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # as each step returned it
    smoothed: list[float]
    stopped: str  # why the ramp ended: "diverged" or "ramp done"
    rule: str
    suggestion: float

    def as_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed,
                "stopped": self.stopped, "rule": self.rule, "suggestion": self.suggestion}


def ramp(cfg: LrFindConfig, steps: int) -> list[float]:
    """`steps` learning rates growing exponentially from start_lr to end_lr."""
    ratio = cfg.end_lr / cfg.start_lr
    return [cfg.start_lr * ratio ** (i / max(steps - 1, 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float) -> list[float]:
    """fastai's bias-corrected exponential moving average."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def steepest(lrs: list[float], losses: list[float]) -> int:
    """The index where the loss falls fastest against log(LR) (central differences)."""
    if len(losses) < 3:
        return 0
    slopes = [(losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, len(losses) - 1)]
    return 1 + min(range(len(slopes)), key=slopes.__getitem__)


def valley(losses: list[float]) -> int:
    """fastai's valley rule: the longest decreasing subsequence of the loss spans a valley; the
    suggestion sits a third plus a sixth of its length after its start (well inside the
    descent, before the bottom where the loss turns)."""
    n = len(losses)
    length = [1] * n  # the longest decreasing run (as a subsequence) ending at i
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
        if length[i] > length[best_end]:
            best_end = i
    start = best_end - length[best_end] + 1
    third = (best_end - start) / 3
    return min(start + int(third) + int(third / 2), n - 1)


NO_DESCENT = 0.02  # a smoothed minimum less than 2 % under the start: the loss never fell
RISE = 1.1  # "the loss starts rising": the raw loss 10 % above its lowest so far


def descended(smoothed: list[float]) -> bool:
    return bool(smoothed) and min(smoothed) < smoothed[0] * (1 - NO_DESCENT)


def before_the_rise(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the LR where the raw loss first rises 10 % above its lowest so far (Smith's
    rule of thumb: an order of magnitude below where training breaks down)."""
    lowest = losses[0]
    for lr, loss in zip(lrs, losses):
        if not math.isfinite(loss) or loss > RISE * lowest:
            return lr / 10
        lowest = min(lowest, loss)
    return lrs[-1] / 10


def suggest(lrs: list[float], smoothed: list[float], rule: str) -> float:
    index = valley(smoothed) if rule == "valley" else steepest(lrs, smoothed)
    return lrs[index]


def suggestion(result_lrs: list[float], losses: list[float], smoothed: list[float], rule: str
               ) -> tuple[float, str]:
    """(the suggested LR, the rule that gave it): `rule` on a curve that descends; on one that
    never fell before it rose (a short ramp, a model from scratch), neither valley nor
    steepest has a descent to read, so a tenth of where the loss starts rising."""
    if descended(smoothed):
        return suggest(result_lrs, smoothed, rule), rule
    return before_the_rise(result_lrs, losses), "rise/10 (no descent)"


def range_test(run: Run, cfg: LrFindConfig) -> RangeTest:
    """Run the ramp on `run` (restored afterwards) and suggest a learning rate."""
    steps = min(cfg.steps, len(run.loader))
    planned = ramp(cfg, steps)
    lrs: list[float] = []
    losses: list[float] = []
    stopped = "ramp done"
    run.step_fn.forward.train()
    with restored(touched(run)):
        for lr, (x, y, n) in zip(planned, run.loader.epoch(0)):
            set_lr(run.step_fn.optimizer, lr)
            loss, _ = run.step_fn(x, y, n)
            lrs.append(lr)
            # a sync per step (this is a measurement); under torchrun the ranks' mean, so
            # every rank sees the same curve and suggests the same LR
            losses.append(float(run.dist.all_reduce_sum(loss.detach().double().reshape(1))
                                / run.dist.world))
            smoothed = smooth(losses, cfg.smoothing)
            if not math.isfinite(smoothed[-1]) or smoothed[-1] > cfg.diverge * min(smoothed):
                stopped = "diverged"
                break
    smoothed = smooth(losses, cfg.smoothing)
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    kept_lrs, kept = [lrs[i] for i in finite], [smoothed[i] for i in finite]
    if stopped == "diverged" and len(kept) > 1:  # the diverging tail is not a candidate
        kept_lrs, kept = kept_lrs[:-1], kept[:-1]
    if not kept:
        return RangeTest(lrs, losses, smoothed, stopped, cfg.suggest, cfg.start_lr)
    value, rule = suggestion(kept_lrs, losses[:len(kept)], kept, cfg.suggest)
    return RangeTest(lrs, losses, smoothed, stopped, rule, value)


def plot(result: RangeTest, path: Path, title: str) -> None:
    """The smoothed loss against the LR (log axis), raw losses faint, the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(result.lrs, result.losses, color="0.8", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed")
    ax.axvline(result.suggestion, color="C3", linestyle="--",
               label=f"{result.rule}: {result.suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    low, high = min(result.smoothed), min(result.smoothed) * 4
    if math.isfinite(low):
        ax.set_ylim(low - 0.05 * abs(low), high)
    ax.legend()
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def find_lr(cfg: TrainConfig, lr_cfg: LrFindConfig, say=print) -> RangeTest:
    """The `lr-find` command: build the run `cfg` describes (one process; nothing is written
    into a work dir), run the range test, print the curve and the suggestion, draw the PNG."""
    cfg = dataclasses.replace(cfg, name=cfg.run_name)
    out = lr_cfg.out or Path(f"lr-find-{cfg.run_name}.png")
    check_output(out, "--lr-find.out", (".png",))
    rt = resolve_runtime(cfg)
    configure_backends(rt)
    prepare_dataset(cfg.data)
    run = build_run(cfg, rt, data=load_dataset(cfg.data, rt.device))
    run, _, chosen = resolve_auto_micro_batch(run, None)  # --data.micro-batch auto
    if chosen:
        say(chosen)
    result = range_test(run, lr_cfg)
    for line in summary_lines(result, lr_cfg):
        say(line)
    if _has_matplotlib():
        plot(result, out, f"{cfg.run_name}: LR range test ({len(result.lrs)} steps)")
        say(f"plot: {out}")
    else:
        say("no plot: drawing it needs matplotlib (pip install '.[report]' from the project's "
            "clone)")
    return result


def summary_lines(result: RangeTest, cfg: LrFindConfig) -> list[str]:
    """The curve every tenth of the way, then the suggestion with the rule that made it."""
    n = len(result.lrs)
    rows = sorted({round(i * (n - 1) / 10) for i in range(11)}) if n else []
    low = min(range(n), key=result.smoothed.__getitem__) if n else 0
    other = "steepest" if cfg.suggest == "valley" else "valley"
    alternative = suggest(result.lrs, result.smoothed, other) if n else cfg.start_lr
    return ([f"{'lr':>10}  {'loss':>8}  {'smoothed':>8}"]
            + [f"{result.lrs[i]:10.2e}  {result.losses[i]:8.4f}  {result.smoothed[i]:8.4f}"
               for i in rows]
            + [f"{n} steps from {cfg.start_lr:.0e} ({result.stopped}"
               + (f" at {result.lrs[-1]:.2e}" if result.stopped == "diverged" else "")
               + f"); lowest smoothed loss {result.smoothed[low]:.4f} at {result.lrs[low]:.2e}"
               if n else "no steps",
               f"suggested --optim.lr {result.suggestion:.2e} ({result.rule} rule; "
               f"{other}: {alternative:.2e})"])


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None



AUTO_PLACEHOLDER = 1e-3  # what the optimizer is built with until the range test has spoken


def buildable(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with a number for `--optim.lr auto` (the schedule sets every step's LR anyway)."""
    if cfg.optim.lr != "auto":
        return cfg
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=AUTO_PLACEHOLDER))


def with_found_lr(cfg: TrainConfig, found: dict | None) -> TrainConfig:
    """`cfg` with the learning rate a recorded range test found (unchanged otherwise)."""
    if cfg.optim.lr != "auto" or not found:
        return cfg
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=found["lr"]))


def found_lr_of(state: tuple | None) -> dict | None:
    """The range test a training state recorded (None: none, or no state)."""
    return None if state is None else state[1]["components"]["run"].get("lr_found")


def resolve_auto_lr(run: Run) -> tuple[Run, dict]:
    """`--optim.lr auto` on a fresh run: the range test (defaults of `lr-find`), the run with
    the suggestion as its LR, and what to record."""
    lr_cfg = LrFindConfig()
    result = range_test(run, lr_cfg)
    found = {"lr": result.suggestion, "rule": result.rule, "steps": len(result.lrs),
             "stopped": result.stopped}
    return dataclasses.replace(run, cfg=with_found_lr(run.cfg, found)), found


def found_line(found: dict) -> str:
    return (f"--optim.lr auto: {found['lr']:.2e} from a range test of {found['steps']} steps "
            f"({found['rule']} rule; {found['stopped']}; the run's weights and draws restored)")
