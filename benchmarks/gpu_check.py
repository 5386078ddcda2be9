"""One command for a CUDA machine: what the GPU path does and how fast, in a few minutes.

    python benchmarks/gpu_check.py OUT_DIR            # on one GPU: figures, under 4 minutes
    python benchmarks/gpu_check.py OUT_DIR --dry      # the same steps at tiny sizes on the CPU

Steps, each timed, each failure recorded and the rest still run (a step that would not fit in
the remaining --budget-s is skipped, and says so):

  environment   GPU, driver, torch, CUDA, bf16 support, memory
  cuda_tests    the tests marked `cuda` (no host sync with the full recipe, host-memory data)
  throughput    benchmarks/throughput.py for ConvNeXt-V2-Tiny 32x32 in bf16: batch 128 and 1024,
                compile mode default and reduce-overhead, eval at batch 1024, the baseline, peak
                GPU memory and utilisation against the bf16 matmul peak measured in the run
  train_resume_eval
                `train` on generated CIFAR-layout data (50,000 + 10,000 images): SIGTERM in
                epoch 2, `--resume auto`, then `eval` of best.safetensors must give the recorded
                top-1; the epoch time, from which a 100-epoch run is projected (labelled so)
  host_memory   one epoch with --data.memory-share forced tiny: images in pinned host memory
  torchrun      a one-process torchrun (NCCL on a GPU, gloo with --dry)

It writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md after every step (so a timeout keeps
what was done) and prints the summary. Only the standard library and the project are needed
(argparse, not tyro, so that it runs where tyro is missing; the train commands need tyro).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TEST_FILES = [str(ROOT / "tests" / "test_engine.py")]  # where the `cuda` tests are
TARGETS = {"train_b128": 40_000, "train_b1024": 80_000, "eval": 150_000, "reference_s": 180}


def sizes(dry: bool) -> dict:
    """Everything that differs between a real check and a dry one."""
    if dry:
        return {"model": "convnextv2_atto", "batches": (8, 16), "eval_batch": 16, "steps": 2,
                "windows": 1, "peak_sizes": (128,), "train_images": 300, "test_images": 60,
                "train_batch": 20, "extra": ["--model.name", "convnextv2_atto"]}
    return {"model": "convnextv2_tiny", "batches": (128, 1024), "eval_batch": 1024,
            "steps": 16, "windows": 3, "peak_sizes": None, "train_images": 50_000,
            "test_images": 10_000, "train_batch": 128, "extra": []}


# ---- steps --------------------------------------------------------------------------------------

def environment(args, size) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 30)
        env["driver"] = smi.stdout.strip() if smi.returncode == 0 else "nvidia-smi failed"
    return env


def cuda_tests(args, size) -> dict:
    out = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                *CUDA_TEST_FILES], 300)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    return {"ok": out.returncode in (0, 5), "summary": last, "returncode": out.returncode}


def throughput(args, size) -> dict:
    from benchmarks import throughput as tp

    rows = []
    for batch in size["batches"]:
        for mode in ("default", "reduce-overhead"):
            bench = tp.Args(model=size["model"], batch_size=batch,
                            eval_batch_size=size["eval_batch"], steps=size["steps"],
                            windows=size["windows"], quick=True, json=True,
                            baseline=(batch, mode) == (size["batches"][0], "default"),
                            baseline_workers=1 if args.dry else 4, compile_mode=mode,
                            peak_sizes=size["peak_sizes"])
            for row in tp.main(bench):
                row["compile_mode"] = mode if row["kind"] == "project" else "-"
                rows.append(row)
            _save_partial(args, "throughput", {"rows": rows})
    return {"rows": rows}


def write_cifar(root: Path, train: int, test: int) -> None:
    """CIFAR-10's on-disk layout (python pickles) with class-coloured, learnable images."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = rng.integers(30, 226, (10, 3))

    def batch(n):
        labels = rng.integers(0, 10, n)
        images = palette[labels][:, :, None, None] + rng.normal(0, 25, (n, 3, 32, 32))
        return np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1), labels.tolist()

    for i, n in enumerate(np.array_split(np.arange(train), 5), start=1):
        data, labels = batch(len(n))
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=2)
    data, labels = batch(test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)]}, f, protocol=2)


def train_args(args, size, work: Path, epochs: int) -> list[str]:
    return ["train", "--preset", "cifar10", "--model.pretrained", "none", "--data.root",
            str(args.out / "data"), "--data.no-download", "--work-dir", str(work),
            "--sched.epochs", str(epochs), "--sched.warmup-epochs", str(min(1, epochs - 1)),
            "--log-interval", "5",
            "--data.batch-size", str(size["train_batch"]), "--data.eval-batch-size",
            str(size["eval_batch"]), *size["extra"]]


def ensure_data(args, size) -> None:
    if not (args.out / "data" / "cifar-10-batches-py" / "test_batch").exists():
        write_cifar(args.out / "data", size["train_images"], size["test_images"])


def train_resume_eval(args, size) -> dict:
    ensure_data(args, size)
    work = args.out / "run"
    cmd = [sys.executable, "-m", "convnext_cifar", *train_args(args, size, work, 3)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() - start < 240:
        records = _records(metrics)
        if any(r.get("epoch") == 2 and "step" in r for r in records):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    first = time.monotonic() - start
    result = {"signal_exit": proc.returncode, "first_run_s": first,
              "signal_in_epoch_2": proc.returncode == 143}
    if proc.returncode != 143:
        return {**result, "ok": False, "stderr": err[-2000:]}
    resume = _run([sys.executable, "-m", "convnext_cifar", "train", "--config",
                   str(work / "config.json"), "--resume", "auto"], 600)
    result.update(resume_exit=resume.returncode, resume_s=time.monotonic() - start - first)
    records = _records(metrics)
    val = [r for r in records if "top1" in r]
    train = [r for r in records if "img_per_s" in r]
    best = max(val, key=lambda r: r["top1"]) if val else None
    evaluated = _run([sys.executable, "-m", "convnext_cifar", "eval",
                      str(work / "best.safetensors"), "--json"], 300)
    top1 = json.loads(evaluated.stdout)["top1"] if evaluated.returncode == 0 else None
    steps = [r["step"] for r in train]
    epoch_images = size["train_images"]
    img_per_s = train[-1]["img_per_s"] if train else None
    result.update(
        eval_top1=top1, recorded_top1=best["top1"] if best else None,
        eval_reproduces=top1 is not None and best is not None and top1 == best["top1"],
        steps_logged_once=steps == sorted(set(steps)), train_img_per_s=img_per_s,
        epoch_s=epoch_images / img_per_s if img_per_s else None)
    if img_per_s and not args.dry:  # labelled: a projection from the measured epoch, not a run
        result["projected_reference_100_epochs_s"] = (
            result["first_run_s"] + 100 * epoch_images / img_per_s)
    result["ok"] = bool(resume.returncode == 0 and result["eval_reproduces"]
                        and result["steps_logged_once"])
    if not result["ok"]:
        result["stderr"] = (resume.stderr + evaluated.stderr)[-2000:]
    return result


def host_memory(args, size) -> dict:
    """Two epochs with the images forced out of device memory."""
    ensure_data(args, size)
    work = args.out / "host"
    out = _run([sys.executable, "-m", "convnext_cifar",
                *train_args(args, size, work, 2), "--data.memory-share", "1e-9"], 300)
    records = _records(work / "metrics.jsonl")
    train = [r for r in records if "img_per_s" in r]
    if args.dry:  # the CPU has no separate host memory: the run must refuse, in one line
        return {"ok": out.returncode == 2 and "GB free on cpu" in out.stderr,
                "returncode": out.returncode, "stderr": out.stderr[-500:]}
    return {"ok": out.returncode == 0 and "pinned host memory" in out.stderr,
            "returncode": out.returncode, "train_img_per_s": train[-1]["img_per_s"] if train
            else None, "stderr": out.stderr[-1000:]}


def torchrun(args, size) -> dict:
    ensure_data(args, size)
    work = args.out / "torchrun"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "1", "-m", "convnext_cifar",
                *train_args(args, size, work, 1)], 400)
    return {"ok": out.returncode == 0 and (work / "best.safetensors").exists(),
            "returncode": out.returncode, "backend": "gloo" if args.dry else "nccl",
            "stderr": out.stderr[-1500:]}


STEPS = [("environment", environment, 5), ("cuda_tests", cuda_tests, 20),
         ("throughput", throughput, 90), ("train_resume_eval", train_resume_eval, 60),
         ("torchrun", torchrun, 30), ("host_memory", host_memory, 30)]


# ---- running and reporting ----------------------------------------------------------------------

def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, e.stdout or "", f"timed out after {timeout} s")
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(cmd, 127, "", str(e))


def _records(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


_results: dict = {}


def _save_partial(args, name: str, value: dict) -> None:
    _results["steps"][name] = value
    (args.out / "gpu_check.json").write_text(json.dumps(_results, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(summary(_results))


def summary(results: dict) -> str:
    """A short Markdown report: environment, the throughput table against the targets, and
    one line per check."""
    steps = results["steps"]
    env = steps.get("environment", {})
    lines = [f"# gpu_check {'(dry, CPU)' if results['dry'] else ''}", "",
             f"{env.get('gpu', 'no GPU')}, driver {env.get('driver', '-')}, torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, bf16 {env.get('bf16', '-')}; "
             f"{results.get('wall_s', 0):.0f} s in all", ""]
    rows = steps.get("throughput", {}).get("rows", [])
    if rows:
        lines += ["| config | batch | loop img/s | bare img/s | eval img/s | first window s | "
                  "TFLOP/s | util % of matmul peak | peak GPU MB |", "|" + " --- |" * 9]
        for r in rows:
            name = ("baseline (DataLoader, eager fp32)" if r["kind"] == "baseline" else
                    f"{r['precision']} {r.get('compile_mode')}"
                    + (" compiled" if r.get("compile") else " eager"))
            lines.append(
                f"| {name} | {r['batch_size']} | {r['loop_img_per_s']:.0f} | "
                f"{r.get('bare_img_per_s', 0):.0f} | {r.get('eval_img_per_s', 0):.0f} | "
                f"{r['loop_first_s']:.1f} | {r.get('achieved_tflops', 0):.1f} | "
                f"{r.get('utilisation_pct', 0):.1f} | {r.get('cuda_max_allocated_mb', 0):.0f} |")
        lines += ["", f"Targets (H100, Tiny 32x32 bf16, the loop): >= {TARGETS['train_b128']:,} "
                  f"img/s at batch 128, >= {TARGETS['train_b1024']:,} at 1024, >= "
                  f"{TARGETS['eval']:,} eval img/s.", ""]
    for name, value in steps.items():
        if name in ("environment", "throughput"):
            continue
        state = "ok" if value.get("ok") else ("skipped" if value.get("skipped") else "FAILED")
        detail = {k: v for k, v in value.items() if k not in ("ok", "stderr", "rows")}
        lines.append(f"- **{name}**: {state} {json.dumps(detail, default=str)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (a test)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the steps that would not fit in this many seconds (default "
                             "230 on a GPU, for a check under 4 minutes; no limit with --dry)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = float("inf") if args.dry else 230.0
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if args.dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with a GPU
    size = sizes(args.dry)
    start = time.monotonic()
    _results.clear()
    _results.update(dry=args.dry, steps={})
    for name, step, least in STEPS:
        left = args.budget_s - (time.monotonic() - start)
        if left < least:
            _save_partial(args, name, {"skipped": f"{left:.0f} s of the budget left"})
            continue
        t0 = time.monotonic()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            value = step(args, size)
        except Exception as e:  # a failing step is a finding; the others still run
            value = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        value["seconds"] = round(time.monotonic() - t0, 1)
        _results["wall_s"] = time.monotonic() - start
        _save_partial(args, name, value)
    print(summary(_results), flush=True)
    return _results


if __name__ == "__main__":
    main()
