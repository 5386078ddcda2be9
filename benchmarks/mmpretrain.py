"""MMPretrain's own training and validation loops on the seed config, side by side with this
project's, in one process on one machine: the figures behind "faster than the toolbox".

Optional and never in CI: MMPretrain is installed on demand, into the environment that holds
this package (what installs with torch 2.14):

    pip install mmengine==0.10.7
    pip install --no-deps mmcv-lite==2.2.0 mmpretrain==1.2.0
    pip install einops importlib-metadata mat4py modelindex
    python -m benchmarks.mmpretrain --data data                # real CIFAR-10 under data/
    python -m benchmarks.mmpretrain --generate /tmp/cifar       # generated CIFAR-layout images

MMPretrain side: `mmengine.runner.Runner.from_cfg` on `benchmarks/mmpretrain_seed_config.py`
(the reference experiment in MMPretrain's format, its `_base_` files from the installed
package), cut to one epoch of --train-images and a validation of --val-images; a hook takes the
time at every iteration's end, so its figures cover its DataLoader (2 workers, per-image
pipeline), data preprocessor, model, loss, clipping and AdamW, as its Runner does them, after
--warmup iterations. This project's side: `benchmarks/throughput.py --quick`, the default
configuration `train` uses on this device (its real `train_one_epoch` and `evaluate`), the same
model and batch. Both start from random weights (speed does not depend on them; nothing is
downloaded). CPU only here; on a GPU both sides run on it.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

CONFIG = Path(__file__).with_name("mmpretrain_seed_config.py")
INSTALL = ("pip install mmengine==0.10.7 && pip install --no-deps mmcv-lite==2.2.0 "
           "mmpretrain==1.2.0 && pip install einops importlib-metadata mat4py modelindex")


@dataclass(frozen=True)
class Args:
    data: Path | None = None
    """Folder holding cifar-10-batches-py/ (the real CIFAR-10, or any data in its layout)."""
    generate: Path | None = None
    """Write generated CIFAR-layout images here first and use them (no download needed)."""
    train_images: int = 3840
    """Training images MMPretrain's epoch runs over (30 iterations at batch 128)."""
    val_images: int = 2048
    """Held-out images both validations run over."""
    warmup: int = 5
    """MMPretrain iterations left out of its figure (start-up, worker spin-up)."""
    batch_size: int = 128
    """Training batch on both sides (the seed config's)."""
    eval_batch_size: int = 256
    """Validation batch on both sides (this project's default)."""
    out: Path | None = None
    """Append the result as one JSON line to this file."""


def _cifar_dataset_class():
    """MMPretrain's CIFAR10, checking that the files are there rather than their checksums, so
    generated data in CIFAR's layout is read exactly as the real archive would be."""
    from mmpretrain.datasets import CIFAR10
    from mmpretrain.registry import DATASETS

    @DATASETS.register_module(force=True)
    class CIFAR10Layout(CIFAR10):
        def _check_integrity(self):
            root = Path(self.data_prefix["root"]) / self.base_folder
            return all((root / name).is_file() for name, _ in self.train_list + self.test_list)

    return "CIFAR10Layout"


def _timing_hook():
    """The end time of every training and validation iteration."""
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    @HOOKS.register_module(force=True)
    class IterationClock(Hook):
        priority = "VERY_LOW"
        train: list[float] = []
        val: list[float] = []

        def before_train_epoch(self, runner):
            IterationClock.train.append(time.perf_counter())

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            IterationClock.train.append(time.perf_counter())

        def before_val_epoch(self, runner):
            IterationClock.val.append(time.perf_counter())

        def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            IterationClock.val.append(time.perf_counter())

    return IterationClock


def mmpretrain_side(args: Args, root: Path, work: Path) -> dict:
    from mmengine.config import Config
    from mmengine.runner import Runner

    kind = _cifar_dataset_class()
    clock = _timing_hook()
    import mmpretrain

    configs = work / "configs"  # the seed config beside the installed package's _base_ files
    configs.mkdir()
    (configs / CONFIG.name).write_text(CONFIG.read_text())
    (configs / "_base_").symlink_to(Path(mmpretrain.__file__).parent / ".mim/configs/_base_")
    cfg = Config.fromfile(str(configs / CONFIG.name))
    cfg.model.backbone.init_cfg = None  # random weights: nothing to download
    cfg.work_dir = str(work / "run")
    for loader, count, batch in (("train_dataloader", args.train_images, args.batch_size),
                                 ("val_dataloader", args.val_images, args.eval_batch_size)):
        cfg[loader].batch_size = batch
        cfg[loader].dataset.type = kind
        cfg[loader].dataset.data_root = str(root)
        cfg[loader].dataset.indices = count  # the first N images
    cfg.test_dataloader = cfg.val_dataloader
    cfg.train_cfg.max_epochs = 1
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=-1, save_last=False)
    cfg.custom_hooks = [dict(type="IterationClock")]
    cfg.log_level = "WARNING"
    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()  # one epoch, then its validation
    wall = time.perf_counter() - start
    train_ends, val_ends = clock.train[args.warmup:], clock.val[1:]  # val: after its first batch
    train_images = (len(train_ends) - 1) * args.batch_size
    val_images = args.val_images - args.eval_batch_size
    return {"train_img_s": round(train_images / (train_ends[-1] - train_ends[0]), 1),
            "eval_img_s": round(val_images / (val_ends[-1] - val_ends[0]), 1),
            "train_iterations_timed": len(train_ends) - 1, "wall_s": round(wall, 1),
            "workers": cfg.train_dataloader.num_workers}


def project_side(args: Args) -> dict:
    from benchmarks import throughput

    rows = throughput.main(throughput.Args(quick=True, baseline=False,
                                           batch_size=args.batch_size,
                                           eval_batch_size=args.eval_batch_size))
    ours = next(r for r in rows if r["kind"] == "project")
    return {"train_img_s": round(ours["loop_img_per_s"], 1),
            "eval_img_s": round(ours["eval_img_per_s"], 1),
            "configuration": {k: ours[k] for k in ("precision", "channels_last", "compile")}}


def _cpuinfo(field: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def instruction_set() -> str:
    """The vector units that decide CPU speed: AVX2, or AVX512 with VNNI, bf16, AMX."""
    flags = set(_cpuinfo("flags").split())
    extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "bf16"),
                                      ("amx_tile", "AMX")) if flag in flags]
    if "avx512f" in flags:
        return "AVX512" + (f" ({', '.join(extras)})" if extras else "")
    return "AVX2" if "avx2" in flags else platform.machine()


def _stop(message: str) -> None:
    print(f"benchmarks.mmpretrain: {message}", file=sys.stderr)
    sys.exit(2)


def main(args: Args) -> dict:
    try:
        import mmpretrain
    except ImportError:
        _stop(f"MMPretrain is not installed; install it with: {INSTALL}")
    import mmengine
    import torch

    if (args.data is None) == (args.generate is None):
        _stop("give --data DIR (CIFAR-10's layout) or --generate DIR")
    if args.data is not None and not (args.data / "cifar-10-batches-py").is_dir():
        _stop(f"no cifar-10-batches-py/ in {args.data}; give the folder that holds it")
    root = args.data or args.generate
    if args.generate is not None:
        from benchmarks.gpu_check import write_cifar

        write_cifar(root, max(args.train_images, 5), args.val_images)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = mmpretrain_side(args, root, Path(tmp))
    ours = project_side(args)
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpu": _cpuinfo("model name") or platform.machine(),
        "instruction_set": instruction_set(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "mmpretrain": mmpretrain.__version__,
        "mmengine": mmengine.__version__, "data": "generated" if args.generate else str(root),
        "model": "convnextv2_tiny (random init)", "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "mmpretrain_side": theirs, "convnext_cifar": ours,
        "train_speedup": round(ours["train_img_s"] / theirs["train_img_s"], 2),
        "eval_speedup": round(ours["eval_img_s"] / theirs["eval_img_s"], 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
