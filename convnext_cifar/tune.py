"""`convnext-cifar tune`: a hyperparameter search on Optuna (the `tune` extra).

Each trial is an ordinary run in WORK_DIR/trial-<n>/ (config, metrics, checkpoints, status), so
`runs`, `eval`, `predict` and `report` work on trials unchanged. The study lives in Optuna's
relational storage (default sqlite:///WORK_DIR/study.db; PostgreSQL or MySQL URLs work too), so
the same command started by several processes shares one study: `--tune.trials N` is the
study's total. A trial reports its validation metric from inside the one training loop after
every validation, and a pruned trial stops there with status `pruned`.

Never lose a study: a process holds a lock file in its trial's folder while it runs the trial.
A trial left RUNNING by a process of this host that died (SIGTERM, kill -9) has that lock free:
the next process here takes it over and resumes it from the trial's own training state (the
same Optuna trial, so the total stays N). Trials of other hosts are left to their own host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnext_cifar.config import (
    TrainConfig,
    TuneConfig,
    coerce,
    options,
    to_dict,
    type_name,
    with_options,
)
from convnext_cifar.errors import Pruned, TrainingDiverged, UserError, install_extra
from convnext_cifar.files import first_line, write_file
from convnext_cifar.model.build import check_pretrained
from convnext_cifar.network import masked
from convnext_cifar.outputs.metrics_log import read_records
from convnext_cifar.outputs.workdir import CONFIG_FILE, METRICS_FILE, FileLock, WorkDirLock
from convnext_cifar.training.loop import fit, preflight

EXTRA = install_extra("tune")
TRIAL_LOCK = ".tune-lock"  # in each trial folder, held by the process running it
SPEC = re.compile(r"^(log|uniform|int|choice)\((.*)\)$")


# ---- the search space ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key, underscores: optim.lr
    kind: str  # log, uniform, int, choice
    values: tuple[Any, ...]  # (low, high) or the choices


def parse_space(specs: tuple[str, ...], base: TrainConfig) -> list[Dimension]:
    """Every KEY=SPEC checked (key, type, range) before anything runs: one line naming the bad
    part otherwise. Every choice and the ends of each range (each value of a short int range)
    must make a config the run accepts, checked as the run checks it before reading data."""
    dims: list[Dimension] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise UserError(f"--tune.space {spec!r}: write KEY=SPEC, e.g. optim.lr=log(1e-4,1e-2)")
        tp = options().get(key)
        if tp is None:
            raise UserError(f"--tune.space {spec!r}: {key} is not a train option (see "
                            "`convnext-cifar train --help`; e.g. optim.lr, model.drop_path_rate)")
        if key in ("name", "work_dir", "seed") or any(d.key == key for d in dims):
            raise UserError(f"--tune.space {spec!r}: {key} cannot be searched "
                            "(or is given twice)")
        match = SPEC.match(text.strip().replace(" ", ""))
        if not match:
            raise UserError(f"--tune.space {spec!r}: {text!r} is not log(a,b), uniform(a,b), "
                            "int(a,b) or choice(v1,v2,...)")
        kind, args = match[1], [a for a in match[2].split(",") if a != ""]
        dims.append(_dimension(spec, key, kind, args, tp))
    for dim in dims:  # every value it may draw that can be told apart must pass as the run would
        for value in _checked_values(dim):
            where = f"--tune.space {dim.key}: {value!r}"
            cfg = with_options(base, {dim.key: value}, where)
            try:
                preflight(cfg)
                check_pretrained(cfg.model)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
    return dims


INT_VALUES_CHECKED = 256  # an int range this short has each value checked, a longer one its ends


def _checked_values(dim: Dimension) -> tuple[Any, ...]:
    """The choices; both ends of a float range; each value of a short int range (a divisor
    such as --optim.accum-steps can fail between two ends that pass)."""
    if dim.kind == "int" and dim.values[1] - dim.values[0] < INT_VALUES_CHECKED:
        return tuple(range(dim.values[0], dim.values[1] + 1))
    return dim.values


def _dimension(spec: str, key: str, kind: str, args: list[str], tp: Any) -> Dimension:
    name = type_name(tp)
    if kind == "choice":
        if not args:
            raise UserError(f"--tune.space {spec!r}: choice() needs at least one value")
        values = []
        for a in args:
            try:
                raw = json.loads(a)
            except json.JSONDecodeError:
                raw = a
            try:
                values.append(coerce(raw, tp, key))
            except UserError:
                raise UserError(f"--tune.space {spec!r}: {a!r} is not a valid {name} for "
                                f"{key}") from None
        return Dimension(key, kind, tuple(values))
    if len(args) != 2:
        raise UserError(f"--tune.space {spec!r}: {kind}() takes two numbers, low and high")
    try:
        low, high = float(args[0]), float(args[1])
    except ValueError:
        raise UserError(f"--tune.space {spec!r}: {args[0]!r} and {args[1]!r} must be "
                        "numbers") from None
    numeric = {float, int} & set(getattr(tp, "__args__", ())) | ({tp} & {float, int})
    if kind == "int" and int not in numeric:
        raise UserError(f"--tune.space {spec!r}: {key} is a {name}, not an int")
    if kind in ("log", "uniform") and float not in numeric:
        raise UserError(f"--tune.space {spec!r}: {key} is a {name}, not a float")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UserError(f"--tune.space {spec!r}: the range needs low < high")
    if kind == "log" and low <= 0:
        raise UserError(f"--tune.space {spec!r}: log() needs low > 0")
    if kind == "int":
        if low != int(low) or high != int(high):
            raise UserError(f"--tune.space {spec!r}: int() takes whole numbers")
        return Dimension(key, kind, (int(low), int(high)))
    return Dimension(key, kind, (low, high))


def distributions(dims: list[Dimension]) -> dict[str, Any]:
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            out[d.key] = od.CategoricalDistribution([_plain(v) for v in d.values])
        elif d.kind == "int":
            out[d.key] = od.IntDistribution(*d.values)
        else:
            out[d.key] = od.FloatDistribution(*d.values, log=d.kind == "log")
    return out


def _plain(value: Any) -> Any:
    """A choice as Optuna stores it (None, bool, int, float or str)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(
        value)


def _from_plain(dim: Dimension, value: Any) -> Any:
    for choice in dim.values:
        if _plain(choice) == value:
            return choice
    return value


# ---- the study ----------------------------------------------------------------------------------

def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"tune runs on Optuna: {EXTRA}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(tune: TuneConfig, work_dir: Path, name: str, seed: int):
    """The study (created or loaded), its storage URL. The sampler is seeded with `seed` plus
    the number of trials the study holds when a trial is drawn (`reseeded`), so one process
    repeats its draws and processes sharing the study never draw alike."""
    optuna = _optuna()
    storage = tune.storage or f"sqlite:///{(work_dir / 'study.db').resolve()}"
    sampler = _sampler(tune, seed)
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
              "hyperband": optuna.pruners.HyperbandPruner,
              "none": optuna.pruners.NopPruner}[tune.pruner]()
    try:
        return optuna.create_study(storage=storage, study_name=tune.study or name,
                                   direction="maximize", sampler=sampler, pruner=pruner,
                                   load_if_exists=True), storage
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server
        raise UserError(f"--tune.storage {masked(storage)}: cannot open the study "
                        f"({first_line(e, sentence=False)})") from None


def _sampler(tune: TuneConfig, seed: int):
    import optuna

    return (optuna.samplers.TPESampler(seed=seed) if tune.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=seed))


def counted(study) -> int:
    """Trials that count towards N: complete, pruned, failed, running (any process)."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                           TrialState.RUNNING) for t in study.get_trials(deepcopy=False))


def tune(base: TrainConfig, tcfg: TuneConfig) -> int:
    """Run trials until the study holds `tcfg.trials`; then print them and write
    best_config.json. Returns 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("tune runs one process per trial; start it without torchrun (several "
                        "tune processes may share one study)")
    if tcfg.metric == "ema_top1" and base.ema.decay == 0:
        raise UserError("--tune.metric ema_top1 needs an EMA: set --ema.decay (e.g. auto)")
    base = dataclasses.replace(base, name=base.run_name)
    work_dir = base.work_dir or Path("work_dirs") / f"{base.run_name}-tune"
    dims = parse_space(tcfg.space, base)
    if tcfg.trials and not dims:
        raise UserError("give the search space: --tune.space KEY=SPEC (e.g. "
                        "optim.lr=log(1e-4,1e-2)), once per option")
    work_dir.mkdir(parents=True, exist_ok=True)
    with _asking(work_dir):  # two processes creating one new SQLite study at once would race
        study, storage = open_study(tcfg, work_dir, base.run_name, base.seed)
    print(f"study {study.study_name} in {masked(storage)}: {counted(study)} of {tcfg.trials} "
          f"trials so far; trials in {work_dir}/trial-<n>/", flush=True)
    while True:
        taken = _take_over(study, work_dir)
        resume = None
        if taken is not None:
            trial, lock = taken
            resume = "auto"  # from the trial's newest state (or afresh if it wrote none)
            print(f"trial {trial.number}: its process died; resuming it from its own training "
                  "state", flush=True)
        else:
            with _asking(work_dir):  # count and ask as one step among this folder's processes
                n = counted(study)
                if n >= tcfg.trials:
                    break
                study.sampler = _sampler(tcfg, base.seed + len(study.get_trials(deepcopy=False)))
                trial = study.ask(distributions(dims))
                lock = _claim(trial, work_dir)
        with lock:
            _run_trial(study, trial, base, dims, tcfg, work_dir, resume)
    summarize(study, work_dir, base, tcfg)
    return 0


def _asking(work_dir: Path) -> FileLock:
    """The lock of WORK_DIR/.ask-lock, waited for, so that processes sharing the work dir never
    count N-1 together and both add a trial."""
    return FileLock(work_dir / ".ask-lock", wait=True)


def _claim(trial, work_dir: Path) -> contextlib.ExitStack:
    """The fresh trial's folder, locked by this process (released when the stack closes)."""
    folder = work_dir / f"trial-{trial.number}"
    folder.mkdir(parents=True, exist_ok=True)
    held = contextlib.ExitStack()
    held.enter_context(WorkDirLock(folder, TRIAL_LOCK))  # a fresh trial: nobody else has it
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("work_dir", str(folder))
    return held


def _take_over(study, work_dir: Path):
    """A RUNNING trial of this host whose process died (its lock is free), with the lock now
    held by this process; None when there is none."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.user_attrs.get("host") != host:
            continue  # another machine's trial: its own host resumes it
        folder = work_dir / f"trial-{frozen.number}"
        storage = study._storage  # noqa: SLF001 - optuna has no public lookup of a trial's id
        trial = optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(
            study._study_id, frozen.number))  # noqa: SLF001
        if not folder.is_dir():  # deleted by hand: nothing to resume, and it must not stay RUNNING
            _fail(study, trial, f"its folder {folder} is gone")
            continue
        held = contextlib.ExitStack()
        try:
            held.enter_context(WorkDirLock(folder, TRIAL_LOCK))
        except UserError:
            continue  # a live process runs it (or its folder went since the check: next time)
        if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:  # noqa: SLF001
            held.close()  # its process finished it after the list above was read: not ours
            continue
        return trial, held
    return None


def _fail(study, trial, why: str) -> None:
    """Mark a trial failed with `why` as its note (unless another process finished it first),
    and say so in one line."""
    from optuna.trial import TrialState

    with contextlib.suppress(RuntimeError):  # optuna refuses notes on a finished trial
        trial.set_user_attr("error", why)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    print(f"trial {trial.number}: failed ({why})", flush=True)


def _run_trial(study, trial, base: TrainConfig, dims: list[Dimension], tcfg: TuneConfig,
               work_dir: Path, resume: str | None) -> None:
    from optuna.trial import TrialState

    params = {d.key: _from_plain(d, trial.params[d.key]) for d in dims}
    folder = work_dir / f"trial-{trial.number}"
    cfg = dataclasses.replace(with_options(base, params, "trial"), name=f"trial-{trial.number}",
                              work_dir=folder)
    print(f"trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()),
          flush=True)

    def report(epoch: int, record: dict[str, Any]) -> bool:
        value = record.get(tcfg.metric)
        if value is None:
            return False
        trial.report(float(value), epoch)
        return trial.should_prune()

    try:
        fit(cfg, resume=resume, on_validation=report)
    except Pruned:
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        print(f"trial {trial.number}: pruned", flush=True)
        return
    except TrainingDiverged as e:
        _fail(study, trial, str(e))
        return
    except (UserError, OSError) as e:
        if not (folder / TRIAL_LOCK).is_file():  # its folder was deleted under it: go on
            _fail(study, trial, f"its folder {folder} was removed while it ran")
            return
        with contextlib.suppress(RuntimeError):
            trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    value = _best(folder, tcfg.metric)
    if math.isnan(value):  # no record of the metric (its metrics file was removed under it)
        _fail(study, trial, f"no {tcfg.metric} in {folder / METRICS_FILE}")
        return
    study.tell(trial, value, skip_if_finished=True)
    print(f"trial {trial.number}: {tcfg.metric} {value:.2f}", flush=True)


def _best(folder: Path, metric: str) -> float:
    values = [r[metric] for r in read_records(folder / METRICS_FILE) if metric in r]
    return max(values) if values else float("nan")


def summarize(study, work_dir: Path, base: TrainConfig, tcfg: TuneConfig) -> None:
    """Print the trials, best first, and write best_config.json (the best trial's config,
    ready for `train --config`)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                  key=lambda t: -t.value)
    rest = [t for t in trials if t.state != TrialState.COMPLETE]
    states = {s: sum(t.state == s for t in trials) for s in TrialState}
    print(f"{len(trials)} trials: {states[TrialState.COMPLETE]} complete, "
          f"{states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed, "
          f"{states[TrialState.RUNNING]} running")
    for t in done + rest:
        value = f"{t.value:7.2f}" if t.value is not None else "      -"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in t.params.items())
        print(f"  trial {t.number:3d}  {t.state.name.lower():8s} {tcfg.metric} {value}  "
              f"{params}")
    if not done:
        return
    best = done[0]
    try:
        config = json.loads((work_dir / f"trial-{best.number}" / CONFIG_FILE).read_text())
    except (OSError, ValueError):  # its folder deleted or damaged: the study holds its values
        params = {d.key: _from_plain(d, best.params[d.key]) for d in parse_space(tcfg.space, base)
                  if d.key in best.params}
        config = to_dict(with_options(base, params, "trial"))
        print(f"note: trial {best.number}'s {CONFIG_FILE} is gone; best_config.json is built from "
              "the study's values on this command's options", flush=True)
    config["work_dir"] = None  # a new run of the best values goes to its own work dir
    config["name"] = to_dict(base)["name"]
    write_file(work_dir / "best_config.json", (json.dumps(config, indent=2) + "\n").encode(),
               "best config")
    print(f"best: trial {best.number}, {tcfg.metric} {best.value:.2f}; "
          f"{work_dir / 'best_config.json'} (train --config it)", flush=True)
