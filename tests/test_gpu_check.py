"""benchmarks/gpu_check.py: every step runs (dry, on the CPU), writes only its reports, and
stops under its budget."""

import json
import subprocess
import sys
import time

import pytest
from support import ROOT

ORDER = ["environment", "cuda_tests", "throughput_b128", "train_resume_eval",
         "throughput_b128_reduce_overhead", "train_reduce_overhead", "eval", "throughput_b1024",
         "profile", "host_memory", "torchrun", "micro_batch_auto", "resume_exact", "recipe",
         "placement"]


def gpu_check(out, work, *args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out),
                           "--work", str(work), "--dry", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # about three minutes on 2 cores: eleven steps, each launching processes
def test_gpu_check_dry_runs_every_step_and_writes_only_its_reports(tmp_path):
    out = gpu_check(tmp_path / "out", tmp_path / "work")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu_check.json", "gpu_check.md", "gpu_check_log.md"]
    assert sum(p.stat().st_size for p in (tmp_path / "out").iterdir()) < 1_000_000
    assert (tmp_path / "work" / "run" / "best.safetensors").exists()  # the bulk stays in work
    steps = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert list(steps) == ORDER
    for name in ORDER:
        if name != "cuda_tests":  # skipped without a GPU: not ok, and said so
            assert steps[name]["ok"], (name, steps[name])
    assert not steps["cuda_tests"]["ok"] and steps["cuda_tests"]["tests_skipped"] >= 1
    run = steps["train_resume_eval"]
    assert run["signal_exit"] == 143 and run["eval_reproduces"] and run["steps_logged_once"]
    # the projection from the last full epoch's recorded seconds, start-up and compile apart
    assert set(run["epoch_s_measured"]) == {"train_s", "validate_s", "state_s"}
    assert run["projected_reference_100_epochs_s"] > 100 * run["reference_epoch_s"]["train_s"]
    assert run["startup_s"] > 0 and run["compile_s"] >= 0
    assert "Projected 100-epoch reference" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert steps["resume_exact"]["bit_exact"] and steps["resume_exact"]["max_abs_weight_diff"] == 0
    assert steps["train_reduce_overhead"]["resume_exit"] == 0
    micro = steps["micro_batch_auto"]  # 0.06 GiB: the CPU's budget splits the batch
    assert micro["chosen"].startswith(f"--data.micro-batch auto: {micro['micro_batch']} images")
    assert micro["micro_batch"] * micro["accum_steps"] == 20
    assert steps["environment"]["nvidia_smi"]  # "not found" here, its lines on a GPU machine
    rows = {name: steps[name]["rows"] for name in ORDER if "throughput" in name or name in (
        "eval", "recipe")}
    assert sum(r["kind"] == "baseline" for r in rows["throughput_b128"]) == 1
    assert rows["throughput_b128_reduce_overhead"][0]["compile_mode"] == "reduce-overhead"
    assert rows["eval"][0]["eval_img_per_s"] > 0 and "loop_img_per_s" not in rows["eval"][0]
    assert rows["recipe"][0]["preset"] == "cifar10-official-recipe"
    assert steps["profile"]["ops_per_step"] > 0 and steps["profile"]["top"]
    placed = {r["placement"]: r for r in steps["placement"]["placement"]}
    assert sorted(placed) == ["device", "disk", "host"] and placed["disk"]["feed_cold_img_per_s"]
    assert placed["disk"]["loop_img_per_s"] > 0 and placed["device"]["loop_img_per_s"] > 0
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert markdown in out.stdout and "| train_resume_eval | ok" in markdown
    assert "Placement (benchmarks/placement.py)" in markdown
    assert "## train --resume auto (exit 0)" in (tmp_path / "out" / "gpu_check_log.md").read_text()


@pytest.mark.slow  # ~26 s: a 25 s budget run to its end (the fast suite keeps the no-tyro check)
def test_the_budget_kills_a_step_keeps_what_was_measured_and_skips_the_rest(tmp_path):
    start = time.monotonic()
    out = gpu_check(tmp_path / "out", tmp_path / "work", "--budget-s", "25", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.monotonic() - start < 25 + 30  # the budget, and the interpreter's start and end
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu_check.json", "gpu_check.md", "gpu_check_log.md"]
    steps = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert list(steps) == ORDER  # every step is in the report, run or not
    assert steps["environment"]["ok"]
    ran = [name for name in ORDER if "skipped" not in steps[name]]
    assert ORDER[:len(ran)] == ran  # in order, and none after the budget ran out
    killed = [name for name in ran if steps[name].get("killed")]
    assert all("s left of the budget" in steps[name]["skipped"] for name in ORDER[len(ran):])
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| profile | skipped" in markdown
    if not killed:  # a step ended less than a second before the budget: the next one never ran
        assert steps[ORDER[len(ran)]]["skipped"] in ("0 s left of the budget",
                                                     "1 s left of the budget")
        return
    assert len(killed) == 1 and any("killed: the check's time was spent" in line
                                     for line in steps[killed[0]]["tail"])
    assert f"| {killed[0]} | KILLED" in markdown



def test_without_tyro_the_check_stops_in_one_line(tmp_path):
    blocker = tmp_path / "no_tyro"
    blocker.mkdir()
    (blocker / "tyro.py").write_text("raise ImportError('tyro is not installed here')\n")
    env_code = (f"import os, sys, runpy; os.environ['PYTHONPATH'] = '{blocker}' + os.pathsep + "
                f"os.environ.get('PYTHONPATH', ''); sys.argv = ['gpu_check', '{tmp_path / 'out'}',"
                f" '--work', '{tmp_path / 'work'}', '--dry']; "
                f"runpy.run_path('{ROOT / 'benchmarks' / 'gpu_check.py'}', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    steps = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert not steps["environment"]["ok"] and "tyro is not importable" in steps[
        "environment"]["error"]
    assert all(steps[name]["skipped"] == "the environment step stopped the check"
               for name in ORDER[1:])
    assert out.stderr.strip().splitlines()[-1].startswith("gpu_check: tyro is not importable")


def test_the_check_runs_every_file_that_holds_cuda_tests():
    from benchmarks.gpu_check import CUDA_TEST_FILES

    marked = {str(p) for p in sorted((ROOT / "tests").rglob("test_*.py"))
              if "\n@pytest.mark.cuda\n" in p.read_text()}
    assert set(CUDA_TEST_FILES) == marked


def _check(tmp_path, budget=60):
    import argparse

    from benchmarks import gpu_check

    return gpu_check.Check(argparse.Namespace(out=tmp_path / "out", dry=True, budget_s=budget,
                                              work=tmp_path / "work"))


def test_a_polled_step_is_drained_so_a_chatty_child_never_stalls(tmp_path):
    check = _check(tmp_path)
    chatty = ("import sys\nfor i in range(20000):\n    print('x' * 60)\n"
              "print('Recompiling function f', file=sys.stderr)")
    running = check.launch([sys.executable, "-c", chatty])
    deadline = time.monotonic() + 60
    while running.poll() is None and time.monotonic() < deadline:  # as the SIGTERM step polls
        time.sleep(0.05)
    done = check.finish("chatty", running)  # 1.2 MB: far more than a pipe holds
    assert done.returncode == 0 and done.stdout.count("\n") == 20000
    assert check.facts["recompiles"] == 1 and "Recompiling" in check.facts["recompiles_first"]


def test_past_its_time_a_step_gets_sigterm_then_sigkill(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    check = _check(tmp_path)
    polite = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(143))"
              "\nprint('up', flush=True)\ntime.sleep(60)")
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    started = time.monotonic()
    done = check.run("polite", [sys.executable, "-c", polite], cap=2)
    assert done.returncode == -9 and "killed: the check's time was spent" in done.stderr
    assert "up" in done.stdout and time.monotonic() - started < 10  # ended by the SIGTERM
    started = time.monotonic()
    done = check.run("stubborn", [sys.executable, "-c", stubborn], cap=2)
    assert done.returncode == -9 and 2 <= time.monotonic() - started < 10  # SIGKILL after grace
