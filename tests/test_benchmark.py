"""The benchmark script runs (smoke test, not a timing assertion) and counts FLOPs correctly."""

import json
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.throughput import _conv_backward_flop


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "r.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--quick", "--model", "convnextv2_atto",
         "--batch-size", "8", "--eval-batch-size", "16", "--steps", "2", "--windows", "1",
         "--baseline-workers", "1", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    project, base = rows
    assert (project["kind"], base["kind"]) == ("project", "baseline")
    assert (project["precision"], project["compile"]) == ("fp32", True)  # the CPU defaults
    for key in ("data_img_per_s", "loop_img_per_s", "bare_img_per_s", "eval_img_per_s",
                "loop_first_s", "peak_tflops", "achieved_tflops", "peak_rss_mb"):
        assert project[key] > 0, key
    assert project["loop_min"] <= project["loop_img_per_s"] <= project["loop_max"]
    assert 2.5 < project["train_flops_per_image"] / project["forward_flops_per_image"] < 3.5
    assert project["vs_baseline"] == project["loop_img_per_s"] / base["loop_img_per_s"]
    assert project["torch"] == torch.__version__ and project["threads"] >= 1


def test_depthwise_backward_flops_are_not_multiplied_by_groups():
    conv = torch.nn.Conv2d(64, 64, 7, padding=3, groups=64)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        y = conv(x)
    forward = counter.get_total_flops()
    assert forward == 2 * (2 * 64 * 8 * 8) * 49
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 2 * forward  # grad input + grad weight
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() > 3 * forward  # torch's own count is too high here


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\nfrom convnext_cifar import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    cli.main(['train', '--help'])\n"
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
