"""One command for a CUDA machine: is the GPU path right, then how fast, under a hard budget.

    python benchmarks/gpu_check.py OUT_DIR [--work DIR] [--budget-s 300]
    python benchmarks/gpu_check.py OUT_DIR --dry        # the same steps at tiny sizes on the CPU

Every step runs in a process of its own, its output drained as it runs, stopped (SIGTERM to its
process group, SIGKILL after a grace) when its cap or the check's time is spent; what it
measured so far, and its last lines, are kept. The order makes a cold machine return figures
first: the first training step compiles the graphs the later ones reuse.

  environment        torch, CUDA, cuDNN, NCCL, Triton, the GPU, nvidia-smi once; tyro importable
                     (else: stop)
  cuda_tests         the tests marked `cuda`: ok only if they ran and passed, not skipped
  throughput_b128    benchmarks/throughput.py at batch 128, default compile, and the baseline
                     (its own cap: a cold compile must not take the check's whole budget)
  train_resume_eval  `train` on generated CIFAR-layout data: SIGTERM in epoch 2, --resume auto,
                     `eval` of best.safetensors reproduces the recorded top-1; the 100-epoch
                     reference projected from the last full epoch's recorded seconds (training,
                     validation, state writes), start-up and compile given apart (a projection)
  throughput_b128_reduce_overhead   the same at batch 128 with CUDA graphs
  train_reduce_overhead  a real `train --compile-mode reduce-overhead` with EMA and flip TTA,
                     SIGTERM and resume: recompiles and skipped CUDA graphs counted
  eval, throughput_b1024, profile   eval alone; batch 1024; torch.profiler's kernels of a step
  host_memory        one epoch with the images forced into pinned host memory
  torchrun           one process under torchrun (NCCL on a GPU, gloo with --dry)
  micro_batch_auto   `train --data.micro-batch auto` on a batch too large for the GPU (Tiny at
                     224 px): the micro-batch chosen, what did not fit, evaluation's back-off
  resume_exact       `--deterministic`: a run stopped by SIGTERM and resumed against one that
                     was not, compared weight for weight (the largest difference is reported)
  recipe, placement  the official-recipe preset; benchmarks/placement.py (device, host, disk)

Every process runs with TORCH_LOGS=recompiles: a step that recompiled or skipped CUDA graphs
says how often. OUT_DIR receives only gpu_check.json, gpu_check.md and gpu_check_log.md (each
step's command, exit code and last lines), rewritten after every step: they are small enough to
come back from a machine that returns a few files. Data, runs and training states go to --work
(default: a temporary folder). Only the standard library is needed here (argparse, not tyro);
the steps need the project's packages, tyro included.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TEST_FILES = [str(ROOT / "tests" / name) for name in (  # the files with `cuda` tests
    "data/test_loader.py", "data/test_placement.py", "use/test_evaluate.py",
    "training/test_loop.py", "model/test_optim.py")]
TARGETS = {"train_b128": 40_000, "train_b1024": 80_000, "eval": 150_000, "reference_s": 180}
OUTPUTS = ("gpu_check.json", "gpu_check.md", "gpu_check_log.md")
LOG_LINES = 40  # of each step, in gpu_check_log.md
GRACE_S = 10  # between the SIGTERM that stops a step's processes and the SIGKILL (beyond the
# budget: GPU.md's `--budget-s 440` inside `timeout 500` leaves room for it)
FIRST_TRAINING_CAP_S = 200  # the first step that trains compiles cold: its own deadline


def sizes(dry: bool) -> dict:
    """Everything that differs between a real check and a dry one."""
    if dry:
        return {"model": "convnextv2_atto", "train_images": 300, "test_images": 60,
                "train_batch": 20, "eval_batch": 16, "big_batch": 40, "steps": 2, "windows": 1,
                "extra": ["--model.name", "convnextv2_atto"], "baseline_workers": 1}
    return {"model": "convnextv2_tiny", "train_images": 10_000, "test_images": 10_000,
            "train_batch": 128, "eval_batch": 1024, "big_batch": 1024, "steps": 100,
            "windows": 3, "extra": [], "baseline_workers": 4}


# ---- steps: each returns a dict with "ok" -------------------------------------------------------

def environment(check: Check) -> dict:
    code = ("import json, platform, torch\n"
            "env = {'python': platform.python_version(), 'torch': torch.__version__,\n"
            "       'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}\n"
            "try:\n    import tyro; env['tyro'] = tyro.__version__\n"
            "except ImportError:\n    env['tyro'] = None\n"
            "try:\n    import triton; env['triton'] = triton.__version__\n"
            "except ImportError:\n    env['triton'] = None\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    env.update(gpu=p.name, capability=f'{p.major}.{p.minor}',\n"
            "               memory_gb=round(p.total_memory / 2**30, 1),\n"
            "               bf16=torch.cuda.is_bf16_supported(),\n"
            "               cudnn=torch.backends.cudnn.version(),\n"
            "               nccl='.'.join(map(str, torch.cuda.nccl.version())))\n"
            "print(json.dumps(env))")
    out = check.run("environment", [sys.executable, "-c", code], cap=60)
    try:
        env = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": "could not read the environment", **check.tail(out)}
    env["cpu_count"], env["host"] = os.cpu_count(), platform.node()
    env["nvidia_smi"] = nvidia_smi(check)
    if not env.get("tyro"):
        check.stop = ("tyro is not importable: the train, eval and throughput steps need it; "
                      "install its wheels as ../shared/GPU.md says and run the check again")
        return {**env, "ok": False, "error": check.stop}
    return {**env, "ok": True}


def nvidia_smi(check: Check) -> list[str] | str:
    """The driver's view of the GPUs, once: name, driver, memory, clocks, power, temperature."""
    if not shutil.which("nvidia-smi"):
        return "not found"
    out = check.run("nvidia-smi", ["nvidia-smi", "--format=csv,noheader", "--query-gpu=name,"
                                   "driver_version,memory.total,memory.used,utilization.gpu,"
                                   "clocks.max.sm,power.limit,temperature.gpu"], cap=20)
    return out.stdout.strip().splitlines() or f"exit {out.returncode}"


def cuda_tests(check: Check) -> dict:
    out = check.run("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-o", "addopts=",
                                   "--import-mode=importlib", "-m", "cuda", "-p",
                                   "no:cacheprovider", *CUDA_TEST_FILES],
                    cap=240)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    counts = {f"tests_{kind}": _count(last, kind) for kind in ("passed", "failed", "skipped")}
    ok = out.returncode == 0 and counts["tests_passed"] > 0 and not counts["tests_skipped"]
    why = {} if ok else {"error": "not all of them ran and passed"}
    return {"ok": ok, **why, "summary": last, **counts, "returncode": out.returncode,
            **({} if ok else check.tail(out))}


def stopped_in_epoch_2(check: Check, title: str, work: Path, args: list[str]) -> dict:
    """`train args`, SIGTERM once epoch 2 has logged a step, then `--resume auto` from its own
    config: the exits, the first process's wall time and what its status said then."""
    start = time.monotonic()
    running, logged = check.start(args), work / "metrics.jsonl"
    while running.poll() is None and check.left() > 0:
        if any(r.get("epoch") == 2 and "step" in r for r in _records(logged)):
            running.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    first = check.finish(f"{title} (SIGTERM in epoch 2)", running)
    result = {"signal_exit": first.returncode, "first_run_s": round(time.monotonic() - start, 1),
              "first_status": _read_json(work / "status.json") or {}}
    if first.returncode != 143:
        return {**result, "ok": False, "error": "the run did not stop on SIGTERM in epoch 2",
                **check.tail(first)}
    resumed = check.run(f"{title} --resume auto", [
        sys.executable, "-m", "convnext_cifar", "train", "--config", str(work / "config.json"),
        "--resume", "auto"], cap=600)
    return {**result, "resume_exit": resumed.returncode, "ok": resumed.returncode == 0,
            **({} if resumed.returncode == 0 else check.tail(resumed))}


def train_resume_eval(check: Check) -> dict:
    check.ensure_data()
    work = check.work / "run"
    result = stopped_in_epoch_2(check, "train", work, check.train_args(work, epochs=3))
    if not result["ok"]:
        return result
    evaluated = check.run("eval", [sys.executable, "-m", "convnext_cifar", "eval",
                                   str(work / "best.safetensors"), "--json"], cap=300)
    records = _records(work / "metrics.jsonl")
    val = [r for r in records if "top1" in r]
    steps = [r["step"] for r in records if "img_per_s" in r]
    best = max(val, key=lambda r: r["top1"]) if val else None
    try:
        top1 = json.loads(evaluated.stdout.strip().splitlines()[-1])["top1"]
    except (IndexError, json.JSONDecodeError, KeyError):
        top1 = None
    result.update(eval_top1=top1, recorded_top1=best["top1"] if best else None,
                  eval_reproduces=top1 is not None and best is not None and top1 == best["top1"],
                  steps_logged_once=steps == sorted(set(steps)),
                  **projection(check, val, result))
    result["ok"] = result["eval_reproduces"] and result["steps_logged_once"]
    return result if result["ok"] else {**result, **check.tail(evaluated)}


def projection(check: Check, val: list[dict], run: dict) -> dict:
    """The 100-epoch reference (50,000 training and 10,000 test images) from this run's records:
    the last full epoch's recorded seconds of training, validation and state writes, scaled to
    the reference's image counts; the compile (epoch 1's training beyond it) and the start-up
    (the first process's wall time beyond its own training) apart. A projection, not a run."""
    timed = [r for r in val if "train_s" in r]
    first_status = run.get("first_status") or {}
    if len(timed) < 2 or "elapsed_s" not in first_status:
        return {"projection": "not enough epochs recorded"}
    last, first = timed[-1], timed[0]
    s = check.size
    per_epoch = {"train_s": last["train_s"] * 50_000 / s["train_images"],
                 "validate_s": last["validate_s"] * 10_000 / s["test_images"],
                 "state_s": last["state_s"]}
    compile_s = max(first["train_s"] - last["train_s"], 0.0)
    startup_s = max(run["first_run_s"] - first_status["elapsed_s"], 0.0)
    total = startup_s + compile_s + 100 * sum(per_epoch.values())
    return {"epoch_s_measured": {k: last[k] for k in ("train_s", "validate_s", "state_s")},
            "reference_epoch_s": {k: round(v, 2) for k, v in per_epoch.items()},
            "compile_s": round(compile_s, 1), "startup_s": round(startup_s, 1),
            "projected_reference_100_epochs_s": round(total),
            "projection": "start-up + compile + 100 x the last full epoch's training, "
                          "validation and state-write seconds scaled to 50,000 / 10,000 "
                          "images; not a run"}


def train_reduce_overhead(check: Check) -> dict:
    """A real `train --compile-mode reduce-overhead` (CUDA graphs; compiled off on the dry
    CPU), EMA and flip TTA on, stopped and resumed: how often it recompiled, and whether torch
    skipped CUDA graphs anywhere."""
    check.ensure_data()
    work = check.work / "reduce_overhead"
    args = [*check.train_args(work, epochs=2), "--compile-mode", "reduce-overhead",
            "--ema.decay", "auto", "--eval.tta", "flip", "--data.limit-train",
            str(min(4000, check.size["train_images"]))]
    result = stopped_in_epoch_2(check, "train reduce-overhead", work, args)
    result.pop("first_status", None)
    skips = check.facts.get("cudagraph_skips", 0)
    return {**result, "ok": result["ok"] and not skips,
            **({"error": "torch skipped CUDA graphs"} if skips else {})}


def resume_exact(check: Check) -> dict:
    """Under --deterministic, a run stopped by SIGTERM and resumed against one that was not:
    the largest weight difference (0 on the CPU; on a GPU Inductor's per-process choices are
    outside cuDNN's flag, so the figure is the finding)."""
    check.ensure_data()
    runs = {name: check.work / f"exact_{name}" for name in ("whole", "resumed")}
    whole = check.run("train --deterministic", [
        sys.executable, "-m", "convnext_cifar",
        *check.train_args(runs["whole"], epochs=2), "--deterministic"], cap=400)
    result = stopped_in_epoch_2(check, "train --deterministic", runs["resumed"], [
        *check.train_args(runs["resumed"], epochs=2), "--deterministic"])
    result.pop("first_status", None)
    if whole.returncode or not result["ok"]:
        return {**result, "ok": False, "error": "a run did not finish", **check.tail(whole)}
    code = ("import sys; from safetensors.torch import load_file\n"
            "a, b = (load_file(p) for p in sys.argv[1:])\n"
            "print(max((a[k].double() - b[k].double()).abs().max().item() for k in a))")
    out = check.run("compare weights", [sys.executable, "-c", code, *(
        str(w / "epoch_2.safetensors") for w in runs.values())], cap=60)
    try:
        diff = float(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {**result, "ok": False, "error": "could not compare the weights",
                **check.tail(out)}
    return {**result, "max_abs_weight_diff": diff, "bit_exact": diff == 0.0,
            "ok": diff == 0.0 or not check.dry}


def host_memory(check: Check) -> dict:
    """One epoch with the images forced out of device memory."""
    check.ensure_data()
    work = check.work / "host"
    out = check.run("host_memory", [sys.executable, "-m", "convnext_cifar",
                                    *check.train_args(work, 1), "--data.memory-share", "1e-9"],
                    cap=300)
    train = [r for r in _records(work / "metrics.jsonl") if "img_per_s" in r]
    if check.dry:  # the CPU has no separate host memory: the run must refuse, in one line
        ok = out.returncode == 2 and "GB free on cpu" in out.stderr
        return {"ok": ok, "returncode": out.returncode, **({} if ok else check.tail(out))}
    ok = out.returncode == 0 and "pinned host memory" in out.stderr
    return {"ok": ok, "returncode": out.returncode,
            "train_img_per_s": train[-1]["img_per_s"] if train else None,
            **({} if ok else check.tail(out))}


def torchrun(check: Check) -> dict:
    check.ensure_data()
    work = check.work / "torchrun"
    out = check.run("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "1", "-m", "convnext_cifar",
                                 *check.train_args(work, 1)], cap=300)
    ok = out.returncode == 0 and (work / "best.safetensors").exists()
    return {"ok": ok, "returncode": out.returncode, "backend": "gloo" if check.dry else "nccl",
            **({} if ok else check.tail(out))}


def micro_batch_auto(check: Check) -> dict:
    """`train --data.micro-batch auto` with a batch too large for the GPU (Tiny at 224 px, 2048
    a batch) and evaluation batches too large too: the micro-batch chosen, what did not fit,
    and evaluation's back-off (dry: the CPU's byte budget, 0.06 GiB: atto takes 5 of 20)."""
    check.ensure_data()
    work = check.work / "micro_batch"
    extra = (["--data.micro-batch-memory", "0.06"] if check.dry else
             ["--data.image-size", "224", "--data.batch-size", "2048", "--data.eval-batch-size",
              "8192", "--data.limit-train", "4096", "--compile", "off"])
    out = check.run("micro_batch_auto", [sys.executable, "-m", "convnext_cifar",
                                         *check.train_args(work, 1), "--data.micro-batch",
                                         "auto", *extra], cap=300)
    chosen = [line for line in out.stdout.splitlines()
              if line.startswith("--data.micro-batch auto: ")]
    backed_off = [line.strip() for line in out.stderr.splitlines()
                  if "evaluation ran out of memory" in line]
    status = _read_json(work / "status.json") or {}
    ok = out.returncode == 0 and bool(chosen) and "micro_batch" in status
    return {"ok": ok, "returncode": out.returncode, "chosen": chosen[-1] if chosen else None,
            "micro_batch": status.get("micro_batch"), "accum_steps": status.get("accum_steps"),
            "eval_backed_off": backed_off, **({} if ok else check.tail(out))}


def throughput(name: str, *extra: str, baseline: bool = False, cap: float = 240):
    """A step: benchmarks/throughput.py for one configuration, in its own process, at most
    `cap` seconds."""

    def step(check: Check) -> dict:
        s = check.size
        args = [sys.executable, "-m", "benchmarks.throughput", "--quick", "--json",
                "--model", s["model"], "--steps", str(s["steps"]), "--windows", str(s["windows"]),
                "--eval-batch-size", str(s["eval_batch"]), "--baseline-workers",
                str(s["baseline_workers"]), *([] if baseline else ["--no-baseline"]), *extra]
        if check.dry:
            args += ["--peak-sizes", "128"]
        out = check.run(name, args, cap=cap)
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        return {"ok": out.returncode == 0 and bool(rows), "rows": rows,
                **({} if out.returncode == 0 else check.tail(out))}

    return step


def profile(check: Check) -> dict:
    s = check.size
    out = check.run("profile", [sys.executable, "-m", "benchmarks.profile_step", "--json",
                                "--model", s["model"], "--batch-size",
                                str(s["train_batch"]), "--steps", "3"], cap=180)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, **check.tail(out)}
    return {"ok": out.returncode == 0, **result}


def placement(check: Check) -> dict:
    args = ([sys.executable, "-m", "benchmarks.placement", "--json", "--sizes", "32",
             "--images", "600", "--batch-size", "32", "--batches", "4", "--loop-model",
             "convnextv2_atto", "--loop-steps", "2"] if check.dry else
            [sys.executable, "-m", "benchmarks.placement", "--json", "--sizes", "32", "128",
             "--images", "20000", "5000", "--loop-model", "convnextv2_tiny", "--loop-steps",
             "16"])
    out = check.run("placement", args, cap=240)
    try:
        rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    except (IndexError, KeyError, json.JSONDecodeError):
        return {"ok": False, **check.tail(out)}
    ok = out.returncode == 0 and all("error" not in r for r in rows)
    return {"ok": ok, "placement": rows, **({} if ok else check.tail(out))}


STEPS = [  # (name, step, seconds it needs at the least to be worth starting)
    ("environment", environment, 5),
    ("cuda_tests", cuda_tests, 20),
    ("throughput_b128", throughput("throughput_b128", "--batch-size", "128", baseline=True,
                                   cap=FIRST_TRAINING_CAP_S), 30),
    ("train_resume_eval", train_resume_eval, 40),
    ("throughput_b128_reduce_overhead", throughput(
        "throughput_b128_reduce_overhead", "--batch-size", "128", "--compile-mode",
        "reduce-overhead"), 30),
    ("train_reduce_overhead", train_reduce_overhead, 40),
    ("eval", throughput("eval", "--eval-only", "--batch-size", "128"), 20),
    ("throughput_b1024", throughput("throughput_b1024", "--batch-size", "BIG"), 30),
    ("profile", profile, 20),
    ("host_memory", host_memory, 20),
    ("torchrun", torchrun, 20),
    ("micro_batch_auto", micro_batch_auto, 40),
    ("resume_exact", resume_exact, 40),
    ("recipe", throughput("recipe", "--batch-size", "128", "--preset",
                          "cifar10-official-recipe"), 30),
    ("placement", placement, 40),
]


# ---- running, timing, reporting ------------------------------------------------------------------

class Running:
    """A step's process, whose stdout and stderr two threads read as it runs (a child that
    fills a pipe nobody reads stops, and a polled run would never end)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.parts: tuple[list[str], list[str]] = ([], [])
        self.readers = [threading.Thread(target=_drain, args=(stream, into), daemon=True)
                        for stream, into in zip((proc.stdout, proc.stderr), self.parts)]
        for reader in self.readers:
            reader.start()

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def output(self) -> tuple[str, str]:
        for reader in self.readers:
            reader.join(timeout=5)
        return "".join(self.parts[0]), "".join(self.parts[1])


def _drain(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


class Check:
    """The check's budget, folders and results; each step's process is started here."""

    def __init__(self, args: argparse.Namespace):
        self.out, self.dry, self.budget = args.out, args.dry, args.budget_s
        self.work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.size = sizes(args.dry)
        self.start_time = time.monotonic()
        self.results: dict = {"dry": args.dry, "budget_s": args.budget_s,
                              "work": str(self.work), "steps": {}}
        self.log: list[str] = []
        self.stop = ""
        self.deadline = float("inf")
        self.facts: dict = {}  # the running step's recompiles and skipped CUDA graphs

    def left(self) -> float:
        return min(self.budget - (time.monotonic() - self.start_time),
                   self.deadline - time.monotonic())

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_LOGS": "recompiles"}
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with a GPU
        return env

    def start(self, args: list[str]) -> Running:
        return self.launch([sys.executable, "-m", "convnext_cifar", *args])

    def launch(self, cmd: list[str]) -> Running:
        """`cmd` in a process group of its own, its output drained as it runs."""
        return Running(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=ROOT, env=self.env(),
                                        start_new_session=True))

    def finish(self, title: str, running: Running) -> subprocess.CompletedProcess:
        """Wait for the process within the time left; past it, SIGTERM to its whole group (a
        torchrun launcher then stops its workers, which run in sessions of their own), and
        SIGKILL to the group what is left after GRACE_S (the grace may pass the budget: leave
        that much beside it)."""
        proc, killed = running.proc, False
        try:
            proc.wait(timeout=max(self.left(), 1))
        except subprocess.TimeoutExpired:
            killed = True
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        out, err = running.output()
        if killed:
            err += f"\nkilled: the check's time was spent ({self.budget:.0f} s budget)"
        done = subprocess.CompletedProcess(proc.args, -9 if killed else proc.returncode, out,
                                           err)
        self._note_compiles(out + err)
        self._log(title, done)
        return done

    def run(self, title: str, cmd: list[str], cap: float) -> subprocess.CompletedProcess:
        """`cmd` with at most `cap` seconds and never more than the time left."""
        cmd = [str(self.size["big_batch"]) if c == "BIG" else c for c in cmd]
        self.deadline = time.monotonic() + cap
        try:
            running = self.launch(cmd)
        except OSError as e:
            done = subprocess.CompletedProcess(cmd, 127, "", str(e))
            self._log(title, done)
            return done
        try:
            return self.finish(title, running)
        finally:
            self.deadline = float("inf")

    def _note_compiles(self, text: str) -> None:
        """Recompiles (TORCH_LOGS=recompiles) and CUDA graphs torch skipped, for this step."""
        lines = text.splitlines()
        recompiles = [x for x in lines if "Recompiling function" in x]
        skipped = [x for x in lines if "skipping cudagraphs" in x.lower()]
        for key, found in (("recompiles", recompiles), ("cudagraph_skips", skipped)):
            if found:
                self.facts[key] = self.facts.get(key, 0) + len(found)
                self.facts.setdefault(f"{key}_first", found[0].strip()[:300])

    def tail(self, done: subprocess.CompletedProcess, lines: int = 12) -> dict:
        text = ((done.stdout or "") + (done.stderr or "")).strip().splitlines()
        return {"tail": text[-lines:]} if text else {}

    def train_args(self, work: Path, epochs: int) -> list[str]:
        s = self.size
        return ["train", "--preset", "cifar10", "--model.pretrained", "none", "--data.root",
                str(self.work / "data"), "--data.no-download", "--work-dir", str(work),
                "--sched.epochs", str(epochs), "--sched.warmup-epochs", str(min(1, epochs - 1)),
                "--log-interval", "5", "--data.batch-size", str(s["train_batch"]),
                "--data.eval-batch-size", str(s["eval_batch"]), *s["extra"]]

    def ensure_data(self) -> None:
        if not (self.work / "data" / "cifar-10-batches-py" / "test_batch").exists():
            write_cifar(self.work / "data", self.size["train_images"], self.size["test_images"])

    def _log(self, title: str, done: subprocess.CompletedProcess) -> None:
        text = ((done.stdout or "") + (done.stderr or "")).strip().splitlines()
        command = " ".join(str(c) for c in done.args)[:300]
        self.log += [f"## {title} (exit {done.returncode})", "", f"`{command}`", "", "```",
                     *text[-LOG_LINES:], "```", ""]

    def save(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - self.start_time, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(summary(self.results))
        (self.out / "gpu_check_log.md").write_text("\n".join(self.log)[-400_000:] + "\n")


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


def _count(summary_line: str, kind: str) -> int:
    words = summary_line.replace(",", " ").split()
    return next((int(words[i - 1]) for i, w in enumerate(words)
                 if w.startswith(kind) and i and words[i - 1].isdigit()), 0)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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


def summary(results: dict) -> str:
    """Markdown: the environment, one line per step (ok, FAILED with its cause, or skipped),
    the throughput rows against the targets, and the profiled kernels."""
    steps = results["steps"]
    env = steps.get("environment", {})
    lines = [f"# gpu_check{' (dry, CPU)' if results['dry'] else ''}", "",
             f"{env.get('gpu', 'no GPU')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn', '-')}, NCCL {env.get('nccl', '-')}, Triton "
             f"{env.get('triton', '-')}, tyro {env.get('tyro', '-')}; {results.get('wall_s', 0)}"
             f" s of a {results['budget_s']:.0f} s budget", "", "| step | result | s | facts |",
             "| --- | --- | --- | --- |"]
    for name, value in steps.items():
        state = ("ok" if value.get("ok") else "skipped" if value.get("skipped") else
                 "KILLED" if value.get("killed") else "FAILED")
        facts = {k: v for k, v in value.items()
                 if k not in ("ok", "rows", "tail", "top", "seconds", "skipped")}
        why = value.get("skipped") or value.get("error") or ""
        lines.append(f"| {name} | {state} {why} | {value.get('seconds', '-')} | "
                     f"{json.dumps(facts, default=str)[:400]} |")
    rows = [r | {"step": name} for name, v in steps.items() for r in v.get("rows", [])]
    if rows:
        lines += ["", "| step | config | batch | loop img/s | bare img/s | eval img/s | first "
                  "window s | TFLOP/s | util % | peak GPU MB |", "|" + " --- |" * 10]
        for r in rows:
            name = ("baseline (DataLoader, eager fp32)" if r["kind"] == "baseline" else
                    f"{r['precision']} {r.get('compile_mode', '')}"
                    + (" compiled" if r.get("compile") else " eager"))
            lines.append(
                f"| {r['step']} | {name} | {r.get('batch_size')} | "
                f"{r.get('loop_img_per_s', 0):.0f} | {r.get('bare_img_per_s', 0):.0f} | "
                f"{r.get('eval_img_per_s', 0):.0f} | {r.get('loop_first_s', 0):.1f} | "
                f"{r.get('achieved_tflops', 0):.2f} | {r.get('utilisation_pct', 0):.1f} | "
                f"{r.get('cuda_max_allocated_mb', 0):.0f} |")
        lines += ["", f"Targets (Tiny 32x32 bf16, the loop): >= {TARGETS['train_b128']:,} img/s"
                  f" at batch 128, >= {TARGETS['train_b1024']:,} at 1024, >= "
                  f"{TARGETS['eval']:,} eval img/s; the reference run under "
                  f"{TARGETS['reference_s']} s."]
    run = steps.get("train_resume_eval", {})
    if run.get("projected_reference_100_epochs_s"):
        lines += ["", f"Projected 100-epoch reference: {run['projected_reference_100_epochs_s']} s"
                  f" = start-up {run['startup_s']} s + compile {run['compile_s']} s + 100 x "
                  f"{json.dumps(run['reference_epoch_s'])} (from the last full epoch's "
                  f"{json.dumps(run['epoch_s_measured'])}; a projection, not a run)."]
    placed = steps.get("placement", {}).get("placement")
    if placed:
        keys = ("size", "placement", "images", "feed_cold_img_per_s", "feed_img_per_s",
                "loader_cold_img_per_s", "loader_img_per_s", "loop_img_per_s", "peak_rss_mb")
        lines += ["", "Placement (benchmarks/placement.py):", "", "| " + " | ".join(keys) + " |",
                  "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(f"{r[k]:.0f}" if isinstance(r.get(k), float)
                                    else str(r.get(k, "-")) for k in keys) + " |" for r in placed]
    if steps.get("profile", {}).get("top"):
        lines += ["", "Profiled step (kernels):", "", "```", *steps["profile"]["top"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for " + ", ".join(OUTPUTS) + " only")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for data, runs and states (default: a temporary one)")
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (a test)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="the whole check's time: steps are skipped or killed past it")
    args = parser.parse_args(argv)
    if args.work is not None and args.work.resolve().is_relative_to(args.out.resolve()):
        parser.error("--work must not be inside OUT_DIR (only the small reports go there)")
    check = Check(args)
    for name, step, least in STEPS:
        if check.stop:
            check.results["steps"][name] = {"skipped": "the environment step stopped the check"}
        elif check.left() < (1 if check.dry else least):  # the seconds a GPU step needs
            check.results["steps"][name] = {"skipped": f"{max(check.left(), 0):.0f} s left of "
                                                       "the budget"}
        else:
            print(f"[gpu_check] {name} ({check.left():.0f} s left) ...", flush=True)
            t0, check.facts = time.monotonic(), {}
            try:
                value = step(check)
            except Exception as e:  # a failing step is a finding; the others still run
                value = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            value.update(check.facts, seconds=round(time.monotonic() - t0, 1))
            if not value.get("ok") and any("killed:" in line for line in value.get("tail", [])):
                value["killed"] = True
            check.results["steps"][name] = value
        check.save()
    print(summary(check.results), flush=True)
    if check.stop:
        print(f"gpu_check: {check.stop}", file=sys.stderr)
    return check.results


if __name__ == "__main__":
    main()
