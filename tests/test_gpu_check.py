"""benchmarks/gpu_check.py --dry: every step of the GPU check at tiny sizes on the CPU, so the
one-command GPU check cannot rot between the rare sessions that have a GPU. About a minute on 2
cores (six steps, each launching processes): in the slow set, which .ci/run runs after the
fast suite."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_dry_runs_every_step_and_writes_its_report(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                          str(tmp_path), "--dry"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "cuda_tests", "throughput", "train_resume_eval",
                           "torchrun", "host_memory"]
    for name in ("cuda_tests", "train_resume_eval", "torchrun", "host_memory"):
        assert steps[name]["ok"], (name, steps[name])
    run = steps["train_resume_eval"]
    assert run["signal_in_epoch_2"] and run["eval_reproduces"] and run["steps_logged_once"]
    rows = steps["throughput"]["rows"]
    assert {(r["batch_size"], r["compile_mode"]) for r in rows if r["kind"] == "project"} == {
        (8, "default"), (8, "reduce-overhead"), (16, "default"), (16, "reduce-overhead")}
    assert sum(r["kind"] == "baseline" for r in rows) == 1
    assert all(r["loop_img_per_s"] > 0 and r["utilisation_pct"] > 0 for r in rows
               if r["kind"] == "project")
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown in out.stdout and "| fp32 default eager | 8 |" in markdown
    assert "train_resume_eval**: ok" in markdown
