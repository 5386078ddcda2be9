"""Distillation at equal student wall time on this machine: the student alone against soft,
hard and cached-logit distillation from a teacher trained longer, top-1 and agreement, per seed.

    python -m benchmarks.distill --out benchmarks/results-distill-cpu-2core.json
    python -m benchmarks.distill --quick                   # a minute: checks the script runs

The data: generated CIFAR-layout images of a task a small network does not solve in a few
epochs (each class two oriented gratings and a tint under heavy noise and random shifts;
classes 2k and 2k+1 share one grating, so their confusions carry the "dark knowledge"
distillation passes on). The teacher: the same recipe trained `--teacher-epochs` (default 3x
the student's). Students (ConvNeXt-V2-Atto from scratch, as `train --preset smoke` builds it):

  alone    the usual loss only, `--epochs` epochs
  soft     --distill.kind soft (KL at temperature T, alpha 0.5), online: the teacher sees each
           augmented batch
  hard     --distill.kind hard (the teacher's top class, DeiT), online
  cached   soft, but from teacher logits computed once per image on the un-augmented training
           images and looked up per batch: what "consistent teaching" (Beyer et al.) warns of

Equal wall time: a two-epoch probe of each variant measures its training seconds per epoch
(the second epoch: the first pays one-time costs); each distillation variant then gets the
epochs that fit in the student-alone run's training time (fewer: the teacher's forward costs
time). The teacher's cost in img/s is reported too.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro


@dataclass(frozen=True)
class Args:
    out: Path | None = None
    """Write the results here as JSON."""
    work: Path = Path("/tmp/convnext-cifar-distill-bench")
    """Folder for the data, the teacher and the students' runs (emptied first)."""
    train_images: int = 8000
    """Generated training images."""
    val_images: int = 2000
    """Generated held-out images."""
    epochs: int = 8
    """The student-alone run's epochs; the others get the same wall time."""
    teacher_epochs: int = 0
    """The teacher's epochs (0: 3x --epochs)."""
    seeds: tuple[int, ...] = (0, 1)
    """Student seeds (the teacher uses seed 0)."""
    temperature: float = 2.0
    """Soft and cached distillation temperature."""
    alpha: float = 0.5
    """Distillation weight."""
    quick: bool = False
    """Tiny sizes: checks the script end to end in about a minute."""
    reuse_teacher: bool = False
    """Keep the data and teacher an earlier run left in --work (same sizes); retrain students."""


AMPLITUDE, NOISE, TINT = 14.0, 80.0, 4.0  # a task atto does not solve in a few epochs


def write_data(root: Path, train: int, val: int, seed: int = 0) -> None:
    """CIFAR-10's pickle layout with a hard, structured task (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    angles = rng.uniform(0, np.pi, (5, 2))  # pair k: grating A_k (shared) and B_k, B_k'
    freqs = rng.uniform(0.25, 0.9, (5, 2))

    def grating(angle, freq):
        return np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))

    protos = []
    for c in range(10):
        k = c // 2
        b_angle = angles[k, 1] + (np.pi / 2 if c % 2 else 0.0)
        protos.append(grating(angles[k, 0], freqs[k, 0]) + 0.5 * grating(b_angle, freqs[k, 1]))
    tints = rng.uniform(-TINT, TINT, (10, 3))

    def batch(n):
        labels = rng.integers(0, 10, n)
        shifts = rng.integers(-8, 9, (n, 2))
        out = np.empty((n, 3, 32, 32), np.float32)
        for i, (c, (dy, dx)) in enumerate(zip(labels, shifts)):
            pattern = np.roll(protos[c], (dy, dx), axis=(0, 1)) * rng.uniform(AMPLITUDE / 2,
                                                                              AMPLITUDE)
            distractor = grating(rng.uniform(0, np.pi), rng.uniform(0.25, 0.9))  # any class
            out[i] = 128 + pattern[None] + AMPLITUDE * distractor[None] + tints[c][:, None, None]
        out += rng.normal(0, NOISE, out.shape)
        return np.clip(out, 0, 255).astype(np.uint8).reshape(n, -1), labels.tolist()

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(train), 5), start=1):
        data, labels = batch(len(part))
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({"data": data, "labels": labels}))
    data, labels = batch(val)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": [f"class_{c}" for c in range(10)]}))


def train_args(args: Args, root: Path, work: Path, epochs: int, seed: int, *extra: str
               ) -> list[str]:
    return ["train", "--preset", "smoke", "--data.root", str(root), "--data.no-download",
            "--data.limit-train", "0", "--data.limit-val", "0", "--work-dir", str(work),
            "--device", "cpu", "--compile", "off", "--sched.epochs", str(epochs),
            "--sched.warmup-epochs", str(min(1, epochs - 1)), "--seed", str(seed),
            "--log-interval", "1000", "--keep-last", "1", *extra]


def records(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def summary(work: Path) -> dict:
    val = [r for r in records(work) if "top1" in r]
    return {"epochs": len(val), "train_s": round(sum(r["train_s"] for r in val), 1),
            "final_top1": val[-1]["top1"], "best_top1": max(r["top1"] for r in val),
            "final_agreement": val[-1].get("agreement"),
            "teacher_kl": val[-1].get("teacher_kl")}


class CachedLogits:
    """`--distill` with the teacher's logits computed once per training image (un-augmented)
    and looked up for each batch: a stand-in for the real teacher, for this benchmark only."""

    def __init__(self, teacher, images, batch_size):
        import torch

        self.teacher, self.batch_size, self.order, self.calls = teacher, batch_size, None, 0
        normalize = teacher.loaded.normalize
        with torch.no_grad():
            self.logits = torch.cat([teacher.loaded.model(normalize(chunk)).float()
                                     for chunk in images.split(256)])

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def __call__(self, x):
        k = self.calls
        self.calls += 1
        return self.logits[self.order[k * self.batch_size:(k + 1) * self.batch_size]]


def run_cached(args: list[str], batch_size: int) -> int:
    """`train` with the teacher's logits cached once per image (patched in, this call only)."""
    from convnext_cifar import cli
    from convnext_cifar.data import loader as loader_module
    from convnext_cifar.training import build

    real_load, real_order = build.load_teacher, loader_module.DeviceLoader._order
    made: list[CachedLogits] = []

    def cached_teacher(cfg, rt, data, student, rows):
        made.append(CachedLogits(real_load(cfg, rt, data, student, rows), data.train.images,
                                 batch_size))
        return made[-1]

    def recorded_order(self, gens):
        order = real_order(self, gens)
        if made:
            made[-1].order, made[-1].calls = order, 0
        return order

    build.load_teacher, loader_module.DeviceLoader._order = cached_teacher, recorded_order
    try:
        return cli.main(args)
    finally:
        build.load_teacher, loader_module.DeviceLoader._order = real_load, real_order


def students(args: Args, variants: list[str], launch) -> tuple[dict, dict, dict]:
    """Two-epoch probes (each variant's training seconds of its second epoch), the epochs each
    gets at the student-alone run's time, and every variant's runs per seed."""
    per_epoch = {}
    for name in variants:
        launch(name, args.work / f"probe-{name}", 2, 0)
        per_epoch[name] = [r for r in records(args.work / f"probe-{name}")
                           if "top1" in r][-1]["train_s"]
    epochs = {name: max(1, round(args.epochs * per_epoch["alone"] / per_epoch[name]))
              for name in variants}
    results: dict[str, list] = {name: [] for name in variants}
    for seed in args.seeds:
        for name in variants:
            work = args.work / f"{name}-{seed}"
            launch(name, work, epochs[name], seed)
            results[name].append({"seed": seed, **summary(work)})
    return per_epoch, epochs, results


def main(args: Args) -> dict:
    import shutil

    from convnext_cifar import cli

    if args.quick:
        args = Args(out=args.out, work=args.work, train_images=600, val_images=300, epochs=2,
                    teacher_epochs=3, seeds=(0,))
    root, batch = args.work / "data", 128
    teacher = args.work / "teacher"
    t_epochs = args.teacher_epochs or 3 * args.epochs
    started = time.time()
    if args.reuse_teacher and (teacher / "best.safetensors").is_file():
        for old in args.work.iterdir():
            if old.name not in ("data", "teacher"):
                shutil.rmtree(old)
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        write_data(root, args.train_images, args.val_images)
        assert cli.main(train_args(args, root, teacher, t_epochs, 0)) == 0
    distil = ("--distill.teacher", str(teacher), "--distill.alpha", str(args.alpha),
              "--distill.temperature", str(args.temperature))
    variants = {"alone": (), "soft": (*distil, "--distill.kind", "soft"),
                "hard": (*distil, "--distill.kind", "hard"),
                "cached": (*distil, "--distill.kind", "soft")}

    def launch(name, work, epochs, seed):
        argv = train_args(args, root, work, epochs, seed, *variants[name])
        code = run_cached(argv, batch) if name == "cached" else cli.main(argv)
        assert code == 0, name

    per_epoch, epochs, results = students(args, list(variants), launch)
    teacher_summary = summary(teacher)
    images = args.train_images
    out = {
        "date": time.strftime("%Y-%m-%d"), "threads": __import__("torch").get_num_threads(),
        "data": {"train": args.train_images, "val": args.val_images, "kind": "generated"},
        "student": "convnextv2_atto (smoke preset, from scratch)",
        "teacher": {"epochs": t_epochs, **teacher_summary},
        "alpha": args.alpha, "temperature": args.temperature,
        "train_s_per_epoch": per_epoch,
        "train_img_s": {k: round(images / v, 1) for k, v in per_epoch.items()},
        "epochs_at_equal_time": epochs, "results": results,
        "mean_final_top1": {k: round(sum(r["final_top1"] for r in v) / len(v), 2)
                            for k, v in results.items()},
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
    sys.exit(0)
