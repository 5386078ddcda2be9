"""benchmarks/: the scripts time what `train` builds, and run and report every figure (slow)."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.throughput import _conv_backward_flop


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "r.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--quick", "--model", "convnextv2_atto",
         "--batch-size", "8", "--eval-batch-size", "16", "--steps", "2", "--windows", "1",
         "--baseline-workers", "1", "--num-classes", "7", "--peak-sizes", "128", "256",
         "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    project, base = rows
    assert (project["kind"], base["kind"]) == ("project", "baseline")
    # the CPU defaults for atto (compiling it is not worth it there: runtime.CPU_COMPILE_MODELS)
    assert (project["precision"], project["compile"]) == ("fp32", False)
    assert project["peak_matmul_n"] in (128, 256)
    for key in ("data_img_per_s", "loop_img_per_s", "bare_img_per_s", "eval_img_per_s",
                "loop_first_s", "peak_tflops", "achieved_tflops", "peak_rss_mb"):
        assert project[key] > 0, key
    assert project["loop_min"] <= project["loop_img_per_s"] <= project["loop_max"]
    assert 2.5 < project["train_flops_per_image"] / project["forward_flops_per_image"] < 3.5
    assert 0.02e9 < project["forward_flops_per_image"] < 0.025e9  # atto: 0.55 GMAC at 224 px
    assert project["vs_baseline"] == project["loop_img_per_s"] / base["loop_img_per_s"]
    assert project["torch"] == torch.__version__ and project["threads"] >= 1


@pytest.mark.slow
def test_the_decode_and_placement_benchmarks_run_and_report(tmp_path):
    decode = subprocess.run([sys.executable, "-m", "benchmarks.decode", "--png", "300", "--jpeg",
                             "20", "--json"], capture_output=True, text=True, timeout=600)
    assert decode.returncode == 0, decode.stderr
    result = json.loads(decode.stdout)
    assert result["png_32"]["images"] == 310 and result["loop"]["folder"] > 0
    placed = subprocess.run([sys.executable, "-m", "benchmarks.placement", "--sizes", "32",
                             "--images", "400", "--batches", "2", "--json", "--out",
                             str(tmp_path / "p.json")], capture_output=True, text=True,
                            timeout=600)
    assert placed.returncode == 0, placed.stderr
    rows = {r["placement"]: r for r in json.loads(placed.stdout)["rows"]}
    assert sorted(rows) == ["device", "disk", "host"]
    assert all(r["feed_img_per_s"] > 0 and r["loader_img_per_s"] > 0 for r in rows.values())
    assert rows["disk"]["feed_cold_img_per_s"] > 0 and "feed_cold_img_per_s" not in rows["host"]
    assert rows["device"]["cache_mb"] == rows["disk"]["cache_mb"] == 400 * 3 * 32 * 32 / 2**20


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


def test_the_benchmark_times_what_train_builds():
    """The benchmark's run comes from engine.build_run with the reference config: the same
    model, optimizer groups, loss and loader `train` uses, for its class count."""
    from benchmarks.throughput import Args, bench_config, synthetic_dataset
    from convnext_cifar.presets import CIFAR10FineTune
    from convnext_cifar.runtime import resolve_runtime
    from convnext_cifar.training.build import build_run

    args = Args(model="convnextv2_atto", batch_size=8, steps=2, num_classes=7)
    device = torch.device("cpu")
    cfg = bench_config(args, device, "fp32", True, False)
    ref = CIFAR10FineTune()
    assert (cfg.optim, cfg.sched, cfg.model.drop_path_rate, cfg.model.label_smoothing) == (
        ref.optim, ref.sched, ref.model.drop_path_rate, ref.model.label_smoothing)
    run = build_run(cfg, resolve_runtime(cfg), data=synthetic_dataset(args, device, 7))
    assert run.model.head.fc.out_features == 7 and len(run.loader) == 2
    x, y, n = next(run.loader.epoch(0))
    assert x.shape == (8, 3, 32, 32) and int(y.max()) < 7


def test_the_state_write_benchmark_measures_what_the_loop_waits_for(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.state_write", "--model",
                           "convnextv2_atto", "--states", "2", "--json", "--work",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["states"] == 2 and 30 < result["state_mb"] < 50  # atto + AdamW moments
    assert len(result["blocked_s"]) == len(result["on_disk_s"]) == 2
    assert all(0 < b <= d for b, d in zip(result["blocked_s"], result["on_disk_s"]))
    assert list(tmp_path.iterdir()) == []  # its temporary work dir is gone


def _seed_config() -> dict:
    """benchmarks/mmpretrain_seed_config.py as MMEngine reads it: a file of plain assignments."""
    from benchmarks.mmpretrain import CONFIG

    values: dict = {}
    exec(compile(CONFIG.read_text(), str(CONFIG), "exec"), {}, values)  # noqa: S102 (our file)
    return values


def test_the_mmpretrain_seed_config_is_the_reference_experiment():
    """What MMPretrain runs beside us is the experiment `train` runs by default."""
    from convnext_cifar.presets import PRESETS

    cfg, seed = PRESETS["cifar10"](), _seed_config()
    assert seed["_base_"] == ["_base_/models/convnext_v2/tiny.py",
                              "_base_/datasets/cifar10_bs16.py",
                              "_base_/schedules/cifar10_bs128.py", "_base_/default_runtime.py"]
    assert seed["model"]["head"]["num_classes"] == 10
    assert seed["model"]["train_cfg"] == {"_delete_": True}  # no MixUp/CutMix
    assert seed["model"]["backbone"]["init_cfg"]["prefix"] == "backbone."
    assert seed["train_dataloader"]["batch_size"] == cfg.data.batch_size
    optimizer = seed["optim_wrapper"]["optimizer"]
    assert (optimizer["type"], optimizer["lr"], optimizer["weight_decay"]) == (
        "AdamW", cfg.optim.lr, cfg.optim.weight_decay)
    assert tuple(optimizer["betas"]) == cfg.optim.betas
    assert seed["optim_wrapper"]["clip_grad"]["max_norm"] == cfg.optim.clip_grad_norm
    paramwise = seed["optim_wrapper"]["paramwise_cfg"]  # no decay on norms, biases and GRN
    assert paramwise["norm_decay_mult"] == paramwise["bias_decay_mult"] == 0.0
    assert {k: v["decay_mult"] for k, v in paramwise["custom_keys"].items()} == {
        ".gamma": 0.0, ".beta": 0.0}
    warmup, cosine = seed["param_scheduler"]
    assert (warmup["start_factor"], warmup["end"]) == (cfg.sched.start_factor,
                                                       cfg.sched.warmup_epochs)
    assert (cosine["begin"], cosine["end"], cosine["eta_min"]) == (
        cfg.sched.warmup_epochs, cfg.sched.epochs, cfg.sched.min_lr)
    assert seed["train_cfg"] == {"by_epoch": True, "max_epochs": cfg.sched.epochs,
                                 "val_interval": cfg.val_interval}
    assert seed["default_hooks"]["logger"]["interval"] == cfg.log_interval
    assert seed["default_hooks"]["checkpoint"]["interval"] == cfg.ckpt_interval
    assert seed["randomness"]["seed"] == cfg.seed


def test_the_mmpretrain_benchmark_without_mmpretrain_says_how_to_install(tmp_path):
    script = ("import runpy, sys; sys.modules['mmpretrain'] = None  # not importable\n"
              f"sys.argv = ['mmpretrain', '--generate', {str(tmp_path)!r}]\n"
              "runpy.run_module('benchmarks.mmpretrain', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "pip install mmengine==0.10.7" in proc.stderr and not list(tmp_path.iterdir())


def quick_run(module: str, tmp_path) -> dict:
    """`python -m MODULE --quick` with its work folder and JSON in tmp_path; the JSON."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--work",
                           str(tmp_path / "w"), "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_distillation_benchmark_runs_every_variant(tmp_path):
    result = quick_run("benchmarks.distill", tmp_path)
    assert set(result["results"]) == {"alone", "soft", "hard", "cached"}
    for name, runs in result["results"].items():
        assert runs[0]["epochs"] == result["epochs_at_equal_time"][name]
        assert (runs[0]["final_agreement"] is None) == (name == "alone")


def test_cached_logits_are_looked_up_by_the_batchs_images():
    from benchmarks.distill import CachedLogits

    cached = CachedLogits.__new__(CachedLogits)
    cached.logits, cached.batch_size, cached.calls = torch.arange(10.0)[:, None], 4, 0
    cached.order = torch.tensor([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
    assert cached(None).flatten().tolist() == [3, 1, 4, 0]
    assert cached(None).flatten().tolist() == [9, 2, 6, 5]
    assert cached(None).flatten().tolist() == [8, 7]


@pytest.mark.slow
def test_the_throughput_benchmark_times_the_loop_with_a_teacher(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--quick", "--model", "convnextv2_atto",
         "--teacher", "convnextv2_atto", "--no-baseline", "--batch-size", "8",
         "--eval-batch-size", "16", "--steps", "2", "--windows", "1", "--peak-sizes", "128",
         "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    alone, taught = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "teacher" not in alone and taught["teacher"] == "convnextv2_atto"
    assert taught["loop_over_without_teacher"] == pytest.approx(
        taught["loop_img_per_s"] / alone["loop_img_per_s"])


@pytest.mark.slow
def test_the_int8_benchmark_reports_every_engine_and_node_type_choice(tmp_path):
    result = quick_run("benchmarks.int8", tmp_path)
    from benchmarks.int8 import VARIANTS

    atto = result["models"]["convnextv2_atto"]
    assert set(atto["variants"]) == set(VARIANTS)
    assert atto["eager_img_per_s_batch1"] > 0 and atto["eager_img_per_s_batch64"] > 0
    for report in atto["variants"].values():
        assert report["images"] == 200 and report["int8_bytes"] < report["fp32_bytes"]
        assert report["fp32_top1"] == pytest.approx(atto["eager_top1"])


def test_the_int8_benchmarks_node_type_choices_are_valid():
    from benchmarks.int8 import VARIANTS, float_ops
    from convnext_cifar.config import INT8_FLOAT_OPS_DEFAULT, Int8Config

    for variant in VARIANTS.values():
        Int8Config(float_ops=float_ops(variant))  # each a valid --int8.float-ops
    assert "Conv" not in float_ops("all but Conv")
    assert VARIANTS["LayerNorm + head float (default)"] == INT8_FLOAT_OPS_DEFAULT


@pytest.mark.slow
def test_the_budget_benchmark_compares_planned_and_cut_off_runs(tmp_path):
    result = quick_run("benchmarks.budget", tmp_path)
    (row,) = result["runs"]
    assert row["budget_s"] == 25 and row["exit"] == 0 and row["planned_epochs"] >= 1
    assert row["cutoff_schedule_epochs"] >= 2 * row["planned_epochs"]
    assert row["cutoff_wall_s"] < row["budget_s"] + 20  # SIGTERM at the budget, then a state


@pytest.mark.slow
def test_the_planning_benchmark_runs_the_grid_the_suggestion_and_early_stop(tmp_path):
    result = quick_run("benchmarks.planning", tmp_path)
    assert set(result["lr"]["grid"]) == {"0.001", "0.01"}
    assert result["lr"]["suggestion"] > 0 and result["lr"]["suggested_run"]["epochs"] == 1
    early = result["early_stop"]
    assert early["full"]["epochs"] == 4 and early["early"]["epochs"] <= 4


@pytest.mark.slow
def test_the_micro_batch_benchmark_sets_the_estimate_beside_the_measured_peak(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.micro_batch", "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["micro_batch"], r["accum_steps"]) for r in rows] == [(16, 1), (8, 2)]
    for row in rows:
        assert 0 < row["estimate_bytes"] and 0 < row["peak_bytes"] and row["img_per_s"] > 0
        assert row["estimate_bytes"] == (row["fixed_bytes"]
                                         + row["per_image_bytes"] * row["micro_batch"])
