"""Command line: typed configs in, calls out. The one place a UserError becomes exit code 2.

    convnext-cifar train [--preset NAME | --config FILE] [--section.option VALUE ...]
    convnext-cifar tune [train options] --tune.trials N --tune.space KEY=SPEC ...
    convnext-cifar eval CKPT [--data.root DIR] [--json]
    convnext-cifar predict CKPT PATH... [--top-k K] [--json | --csv FILE]
    convnext-cifar export CKPT OUT.onnx|OUT.pt2|DIR [--int8] [--format hf [--push USER/NAME]]
    convnext-cifar runs [DIR...] [--json|--csv|--table] [--sort KEY] [--filter KEY=VALUE]
    convnext-cifar report WORK_DIR... [--out FILE]
    convnext-cifar convert SRC DST.safetensors [--model.name NAME] [--prefix P]
    convnext-cifar lr-find [train options] [--lr-find.steps N] [--lr-find.out FILE.png]

Heavy modules (torch, timm) are imported only inside the commands, so `--help` is quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import tyro

from convnext_cifar import __version__
from convnext_cifar.cli_errors import parse
from convnext_cifar.config import (
    DataConfig,
    Int8Config,
    LrFindConfig,
    TrainConfig,
    TuneConfig,
    config_json,
    load_config_file,
)
from convnext_cifar.errors import Interrupted, UserError
from convnext_cifar.presets import PRESETS

PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
DEFAULT_PRESET = next(iter(PRESETS))


def _option_value(args: list[str], flag: str) -> str | None:
    """The value given to `flag` (as `--flag V` or `--flag=V`), if any; the last one wins."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def starting_config(args: list[str]) -> TrainConfig:
    """The defaults that command-line overrides apply on top of: a preset, a config.json, or
    the config of the run that `--resume WORK_DIR|STATE` continues."""
    preset, config = _option_value(args, "--preset"), _option_value(args, "--config")
    resume = _option_value(args, "--resume")
    if preset is not None and config is not None:
        raise UserError("give either --preset or --config, not both")
    if config is not None:
        return load_config_file(Path(config))
    if preset is None and resume not in (None, "auto"):
        from convnext_cifar.training.state import resumed_config

        return resumed_config(Path(resume))
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return _warmup_within(PRESETS[preset or DEFAULT_PRESET](), args)


def _warmup_within(default: TrainConfig, args: list[str]) -> TrainConfig:
    """A preset's warmup shortened to fit a `--sched.epochs` given without
    `--sched.warmup-epochs` (`--preset smoke --sched.epochs 1`), with a note; a warmup the user
    gives is checked as it is."""
    epochs = _option_value(args, "--sched.epochs")
    if (epochs is None or not epochs.isdigit() or int(epochs) < 1
            or _option_value(args, "--sched.warmup-epochs") is not None
            or default.sched.warmup_epochs < int(epochs)):
        return default
    warmup = int(epochs) - 1
    print(f"note: the preset's {default.sched.warmup_epochs} warmup epoch(s) do not fit "
          f"--sched.epochs {epochs}: warming up for {warmup}", file=sys.stderr)
    return dataclasses.replace(default, sched=dataclasses.replace(default.sched,
                                                                  warmup_epochs=warmup))


def _first_sentence(doc: str | None) -> str:
    return " ".join((doc or "").split()).split(". ")[0].rstrip(".")


def _train_command(default: TrainConfig):
    def train(
        cfg: Annotated[TrainConfig, tyro.conf.arg(name="")] = default,
        preset: Annotated[PresetName, tyro.conf.arg(  # type: ignore[valid-type]
            help="Experiment to start from: " + "; ".join(
                f"{name}: {_first_sentence(cls.__doc__)}" for name, cls in PRESETS.items())
        )] = DEFAULT_PRESET,
        config: Annotated[Path | None, tyro.conf.arg(
            help="Start from a saved config.json (e.g. a run's own); options given override it."
        )] = None,
        resume: Annotated[str | None, tyro.conf.arg(
            help="Continue a run with its own config: a work dir (its newest training state), "
                 "a state_*.pt file, or auto (the newest state in the work dir of this config, "
                 "or a fresh start if there is none)."
        )] = None,
        resume_allow_changes: Annotated[bool, tyro.conf.arg(
            help="Resume even if the model, data, optimiser or schedule options differ."
        )] = False,
        print_config: Annotated[bool, tyro.conf.arg(
            help="Print the resolved config as JSON and exit, writing nothing."
        )] = False,
    ) -> int:
        """Fine-tune ConvNeXt-V2; default: the reference CIFAR-10 experiment."""
        if print_config:
            return _print_config(cfg, resume)

        def run() -> int:
            from convnext_cifar.training.loop import fit

            fit(cfg, resume=resume, allow_changes=resume_allow_changes,
                started=_STARTED[0] if _STARTED else None)
            return 0

        return run

    return train


# The options eval and predict share with train, named as train names them (the old short
# names stay as aliases).
_T = typing.TypeVar("_T")
EvalBatchSize = Annotated[_T, tyro.conf.arg(name="data.eval-batch-size", aliases=("--batch-size",))]
Tta = Annotated[Literal["none", "flip"] | None, tyro.conf.arg(name="eval.tta", aliases=("--tta",))]
Compile = Literal["auto", "on", "off"]
COMPILE = {"auto": None, "on": True, "off": False}  # None: as the run recorded


def _check_batch(batch_size: int | None) -> None:
    """--data.eval-batch-size of eval, predict and report, checked as train checks its own."""
    if batch_size is not None:
        DataConfig(eval_batch_size=batch_size)


def _print_config(cfg: TrainConfig, resume: str | None) -> int:
    """The config `train` would run with: run name and work dir filled in (the work dir is
    chosen as `train` would, nothing created); a mean/std left None is the dataset's standard
    or measured one, filled in when the run starts."""
    from convnext_cifar.outputs.workdir import choose_work_dir

    cfg = dataclasses.replace(cfg, name=cfg.run_name)
    cfg, _ = choose_work_dir(cfg, resume)
    print(config_json(cfg))
    return 0


def _lr_find_command(default: TrainConfig):
    def lr_find(
        cfg: Annotated[TrainConfig, tyro.conf.arg(name="")] = default,
        lr_find: Annotated[LrFindConfig, tyro.conf.arg(name="lr-find")] = LR_FIND_DEFAULTS,
        preset: Annotated[PresetName, tyro.conf.arg(  # type: ignore[valid-type]
            help="Experiment to test (as for train).")] = DEFAULT_PRESET,
        config: Annotated[Path | None, tyro.conf.arg(
            help="Test the run a saved config.json describes; options given override it."
        )] = None,
    ) -> int:
        """Find a learning rate: a short range test on the run the train options describe;
        prints the loss against the LR and a suggestion, draws it; writes no work dir."""

        def run() -> int:
            from convnext_cifar.training.lr_find import find_lr

            find_lr(cfg, lr_find)
            return 0

        return run

    return lr_find


LR_FIND_DEFAULTS = LrFindConfig()


def _tune_command(default: TrainConfig):
    def tune(
        cfg: Annotated[TrainConfig, tyro.conf.arg(name="")] = default,
        tune: TuneConfig = TuneConfig(),  # noqa: B008 (a frozen dataclass)
        preset: Annotated[PresetName, tyro.conf.arg(  # type: ignore[valid-type]
            help="Experiment every trial starts from (as for train).")] = DEFAULT_PRESET,
        config: Annotated[Path | None, tyro.conf.arg(
            help="Start every trial from a saved config.json; options given override it."
        )] = None,
    ) -> int:
        """Search hyperparameters with Optuna: each trial a run in WORK_DIR/trial-<n>/."""

        def run() -> int:
            from convnext_cifar.tune import tune as run_study

            return run_study(cfg, tune)

        return run

    return tune


def eval_command(
    ckpt: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="CKPT")],
    data_root: Annotated[Path | None, tyro.conf.arg(name="data.root")] = None,
    download: Annotated[bool, tyro.conf.arg(name="data.download")] = True,
    device: str | None = None,
    batch_size: EvalBatchSize[int | None] = None,
    tta: Tta = None,
    compile: Compile = "auto",
    json_output: Annotated[bool, tyro.conf.arg(name="json")] = False,
) -> int:
    """Evaluate a checkpoint on its dataset's held-out split: top-1, top-5, per-class accuracy,
    confusion matrix.

    Args:
        ckpt: A .safetensors file written by `train`, or a work dir (its best.safetensors).
        data_root: The dataset's root: CIFAR's parent or the image folder (default: recorded).
        download: Download a missing CIFAR dataset (checksum verified).
        device: Torch device: auto (cuda, else mps, else cpu), cpu, mps, cuda, cuda:N (default:
            as recorded, where this machine has it).
        batch_size: Evaluation batch size (default: as recorded).
        tta: Test-time augmentation, none or flip (default: as the run validated).
        compile: torch.compile the model: auto (as the run did), on or off.
        json_output: Print one JSON object instead of tables.
    """
    _check_batch(batch_size)

    def run() -> int:
        from convnext_cifar.outputs.console import print_eval
        from convnext_cifar.use.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(ckpt, data_root, download, device, batch_size, tta,
                                     COMPILE[compile])
        if json_output:
            print(json.dumps(result))
        else:
            print_eval(result)
        return 0

    return run


def predict_command(
    ckpt: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="CKPT")],
    paths: Annotated[tyro.conf.Positional[list[Path]], tyro.conf.arg(metavar="PATH...")],
    batch_size: EvalBatchSize[int] = 256,
    top_k: int | None = None,
    tta: Tta = None,
    device: str | None = None,
    json_output: Annotated[bool, tyro.conf.arg(name="json")] = False,
    csv: Path | None = None,
    compile: Compile = "off",
    force: bool = False,
) -> int:
    """Classify image files (or every image in folders, recursively) with a checkpoint.

    Args:
        ckpt: A .safetensors file written by `train`, or a work dir (its best.safetensors).
        paths: Image files (PNG, JPEG, BMP, WebP, GIF) or folders of them.
        batch_size: Images per batch on the device.
        top_k: Classes listed per image, most probable first (default: 5, or every class
            when there are fewer).
        tta: Test-time augmentation, none or flip (default: as the run validated).
        device: Torch device: auto (cuda, else mps, else cpu), cpu, mps, cuda, cuda:N (default:
            as recorded, where this machine has it).
        json_output: One JSON object per image (path, top-k classes and probabilities).
        csv: Also write the predictions to this CSV file.
        compile: torch.compile the model: off, on or auto (as the run did); pays only for a
            very large pass.
        force: Let --csv replace an existing file that is not a CSV file (a run's own files,
            never).
    """
    _check_batch(batch_size)

    def run() -> int:
        from convnext_cifar.outputs.workdir import check_output
        from convnext_cifar.use.predict import predict

        if csv is not None:
            check_output(csv, "--csv", (".csv",), force)
        k, chunks = predict(ckpt, paths, batch_size, top_k, tta, device,
                            COMPILE[compile])  # checks first
        return _show_predictions(chunks, k, json_output, csv)

    return run


def _show_predictions(chunks, k: int, json_output: bool, csv: Path | None) -> int:
    """Each batch's predictions as they come (any number of files): JSON lines, a table, or
    only the CSV file; one line per unreadable file. 1 when some file could not be read."""
    from convnext_cifar.outputs.console import print_predictions
    from convnext_cifar.use.predict import CsvWriter

    failed = 0
    with CsvWriter(csv, k) if csv is not None else contextlib.nullcontext() as table:
        for predictions, unreadable in chunks:
            if table is not None:
                table.write(predictions)
            if json_output:
                for p in predictions:
                    print(json.dumps(p.as_dict()), flush=True)
            elif csv is None and predictions:
                print_predictions(predictions, k)
            for path, reason in unreadable:
                _say(f"convnext-cifar: cannot read {path}: {reason}")
            failed += len(unreadable)
    return 1 if failed else 0


INT8_DEFAULTS = Int8Config()


def export_command(
    ckpt: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="CKPT")],
    out: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="OUT")],
    fmt: Annotated[Literal["onnx", "pt2", "hf"] | None, tyro.conf.arg(name="format")] = None,
    include_preprocessing: bool = False,
    int8: bool = False,
    int8_options: Annotated[Int8Config, tyro.conf.arg(name="int8")] = INT8_DEFAULTS,
    data_root: Annotated[Path | None, tyro.conf.arg(name="data.root")] = None,
    license: str | None = None,
    push: str | None = None,
    force: bool = False,
) -> int:
    """Export a checkpoint for other runtimes: ONNX (fp32 or INT8), a torch.export archive, or
    a model folder for timm and the Hugging Face Hub.

    Args:
        ckpt: A .safetensors file written by `train`, or a work dir (its best.safetensors).
        out: The file to write (*.onnx, *.pt2), or the folder of --format hf.
        fmt: onnx, pt2 or hf (a timm model folder with a model card; default: OUT's suffix).
        include_preprocessing: Take uint8 NCHW images at the stored size and normalise (and
            resize) inside the graph, instead of normalised float input at the image size.
        int8: Write an INT8 ONNX file, calibrated on the run's training images and checked
            against fp32 on its held-out images (report beside it: OUT.parity.json).
        data_root: The run's dataset root, where it moved (INT8 calibration, the card's metrics).
        license: The model card's licence where the weights inherit none (trained from scratch
            or from a local file); the pretrained weights' own licence otherwise.
        push: Upload the --format hf folder to this Hub repository (user/name).
        force: Replace an existing OUT that is not an .onnx or .pt2 file (a run's own files,
            never).
    """

    def run() -> int:
        from convnext_cifar.outputs.workdir import check_output
        from convnext_cifar.use.export import export_checkpoint, export_kind

        kind = export_kind(out, fmt, int8, license, push)
        if kind == "hf":
            return _export_hf(ckpt, out, license, data_root, push)
        check_output(out, "OUT", (".onnx", ".pt2"), force)
        if int8:
            return _export_int8(ckpt, out, int8_options, include_preprocessing, data_root)
        meta = export_checkpoint(ckpt, out, kind, include_preprocessing)
        print(f"{ckpt} -> {out}: input {meta['input']}, output {meta['output']}, "
              f"{len(meta['classes'])} classes")
        return 0

    return run


def _export_hf(ckpt: Path, out: Path, licence: str | None, data_root: Path | None,
               repo: str | None) -> int:
    from convnext_cifar.use.hub import export_hf, push

    metrics = export_hf(ckpt, out, licence, data_root)
    print(f"{ckpt} -> {out}/: model.safetensors, config.json, README.md (held-out top-1 "
          f"{metrics['top1']:.2f}%, balanced {metrics['balanced_accuracy']:.2f}%, macro-F1 "
          f"{metrics['macro_f1']:.2f}%)")
    if repo:
        print(f"pushed to {push(out, repo)}")
    return 0


def _export_int8(ckpt: Path, out: Path, options: Int8Config, include_preprocessing: bool,
                 data_root: Path | None) -> int:
    from convnext_cifar.outputs.console import print_parity
    from convnext_cifar.use.quantize import export_int8, parity_path

    report = export_int8(ckpt, out, options, include_preprocessing, data_root)
    print_parity(report, out, parity_path(out))
    return 0


def runs_command(
    folders: Annotated[tyro.conf.Positional[list[Path]], tyro.conf.arg(metavar="DIR...")] = [  # noqa: B006
        Path("work_dirs")],
    json_output: Annotated[bool, tyro.conf.arg(name="json")] = False,
    csv_output: Annotated[bool, tyro.conf.arg(name="csv")] = False,
    table: bool = False,
    sort: str | None = None,
    filter: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = (),  # noqa: A002
) -> int:
    """Compare runs: every work dir under the folders, with the options that differ.

    Args:
        folders: Work dirs, or folders holding them (default: work_dirs).
        json_output: One JSON object: {"runs": [...], "differing": [...]}.
        csv_output: CSV, a run a line (the columns of the tab-separated output).
        table: The table even when the output is not a terminal (piped: tab-separated lines).
        sort: best, last, img/s (highest first); wall, size, epochs, run, status or an option
            such as optim.lr (lowest first).
        filter: KEY=VALUE, repeatable: status=finished, dataset=folder, study=NAME, optim.lr=0.001.
    """

    def run() -> int:
        from convnext_cifar.outputs.runs import show_runs

        return show_runs(folders, "json" if json_output else "csv" if csv_output else
                         "table" if table else "auto", sort, filter)

    return run


def report_command(
    folders: Annotated[tyro.conf.Positional[list[Path]], tyro.conf.arg(metavar="WORK_DIR...")],
    out: Path | None = None,
    device: str = "cpu",
    data_root: Annotated[Path | None, tyro.conf.arg(name="data.root")] = None,
    batch_size: EvalBatchSize[int | None] = None,
    force: bool = False,
) -> int:
    """Write one self-contained HTML page showing a run (or comparing several), its figures as
    PNG files beside it.

    Args:
        folders: Work dirs of runs (several: their curves overlaid, their options compared).
        out: The page to write (default WORK_DIR/report.html; ./report.html for several).
        device: Torch device evaluating the best checkpoint (cpu, auto, cuda, ...).
        data_root: The dataset's root, when it moved (default: as the run recorded it).
        batch_size: Evaluation batch size (default: as recorded).
        force: Let --out replace an existing file that is not an HTML page (a run's own
            files, never).
    """
    _check_batch(batch_size)

    def run() -> int:
        from convnext_cifar.outputs.report import write_report
        from convnext_cifar.outputs.workdir import check_output

        if out is not None:
            check_output(out, "--out", (".html", ".htm"), force)

        page = write_report(folders, out, device, batch_size, data_root)
        print(f"report: {page}")
        return 0

    return run


def convert_command(
    src: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="SRC")],
    dst: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="DST")],
    model_name: Annotated[str | None, tyro.conf.arg(name="model.name")] = None,
    prefix: str = "",
    layout: Annotated[Literal["auto", "timm", "mmpretrain", "official"],
                      tyro.conf.arg(name="format")] = "auto",
    weights: Literal["raw", "ema"] = "raw",
) -> int:
    """Convert MMPretrain, official ConvNeXt-V2 or timm weights into a timm safetensors file.

    Args:
        src: Weights file: MMPretrain/MMEngine .pth, official ConvNeXt-V2 .pth/.pt, or timm.
        dst: Output .safetensors in timm's layout (timm.create_model / load_state_dict load it).
        model_name: timm convnextv2_* name; inferred from the weights if not given, else checked.
        prefix: Take only the keys under this prefix (e.g. backbone), like MMPretrain's init_cfg.
        layout: Layout of SRC; auto tells it from the keys.
        weights: raw, or ema: the EMA a training checkpoint keeps beside the weights.
    """

    def run() -> int:
        from convnext_cifar.model.build import convert_to_timm
        from convnext_cifar.outputs.workdir import check_output

        check_output(dst, "DST", (".safetensors",))

        name, report = convert_to_timm(str(src), dst, model_name, layout, prefix, weights)
        print(f"{src} -> {dst} ({name}): {report}")
        return 0

    return run


def commands(default: TrainConfig) -> dict[str, Callable]:
    """Every command by its name, `train` and `tune` starting from `default`: the one table."""
    return {"train": _train_command(default), "tune": _tune_command(default),
            "eval": eval_command, "predict": predict_command, "export": export_command,
            "runs": runs_command, "report": report_command, "convert": convert_command,
            "lr-find": _lr_find_command(default)}


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0): the budget counts the
    interpreter's start-up and imports too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_STARTED: list[float] = []  # when this command started (time.monotonic()): budgets count from it


def main(argv: list[str] | None = None) -> int:
    # from the console script, the interpreter's start-up and imports count too
    _STARTED[:] = [time.monotonic() - (process_age_s() if argv is None else 0.0)]
    args = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a file name in bytes that are not UTF-8 (a
        if hasattr(stream, "reconfigure"):  # Windows zip) is shown escaped, never a crash
            stream.reconfigure(errors="backslashreplace")
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except BrokenPipeError:  # output piped into `head` and the like: end quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail too
        return 141  # 128 + SIGPIPE


def _run(args: list[str]) -> int:
    if args[:1] in (["--version"], ["-V"]):
        print(f"convnext-cifar {__version__}")
        return 0
    try:
        default = (starting_config(args) if args[:1] in (["train"], ["tune"], ["lr-find"])
                   else PRESETS[DEFAULT_PRESET]())
        command = parse(commands(default), args)
        return command() if callable(command) else command
    except UserError as e:
        _say(f"convnext-cifar: error: {e}")
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        _say("convnext-cifar: interrupted; nothing more was written")
        return 130
    except Interrupted as e:
        _say(f"convnext-cifar: {e}")
        return e.exit_code


def _say(line: str) -> None:
    """One line on stderr; under torchrun only rank 0 speaks (every rank exits alike)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
