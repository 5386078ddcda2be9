"""End to end: N processes under torchrun train like one process (slow: torchrun launches)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from support import decoded_cache, small_run_args

from convnext_cifar import cli
from convnext_cifar.outputs.workdir import find_states
from convnext_cifar.training.state import load_state

pytestmark = pytest.mark.slow  # torchrun launches

ARGS = ("--sched.epochs", "2", "--sched.warmup-epochs", "1", "--data.limit-train", "200",
        "--data.limit-val", "299", "--model.drop-path-rate", "0", "--log-interval", "2")


def torchrun(*args, nproc=2, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(nproc), "-m", "convnext_cifar", *args],
                          capture_output=True, text=True, timeout=timeout)


def final_state(work):
    return load_state(find_states(work)[-1])["components"]


def final_model(work):
    return final_state(work)["model"]


def metric_records(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def assert_close_runs(a, b, atol):
    ma, mb = final_model(a), final_model(b)
    worst = max((ma[k] - mb[k]).abs().max().item() for k in ma)
    assert worst < atol, worst
    ra, rb = metric_records(a), metric_records(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-3), key
        if "top5" in x:
            assert abs(x["top1"] - y["top1"]) <= 100 / 299 + 1e-9  # at most one image flips


@pytest.fixture(scope="module")
def single(cifar_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("one")
    assert cli.main(small_run_args(cifar_root, work, *ARGS)) == 0
    return work


@pytest.fixture(scope="module")
def double(cifar_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("two")
    out = torchrun(*small_run_args(cifar_root, work, *ARGS))
    assert out.returncode == 0, out.stderr[-3000:]
    return work, out


def noisy_args(root, work):
    """30 short epochs with drop-path on: each rank draws its own masks."""
    return small_run_args(root, work, *ARGS[2:6], "--sched.epochs", "30",
                          "--data.limit-train", "100", "--log-interval", "1",
                          "--model.drop-path-rate", "0.3")


RECIPE = ("--aug.mixup-alpha", "0.8", "--aug.cutmix-alpha", "1.0", "--aug.mix-mode", "elem",
          "--aug.randaugment", "rand-m9-mstd0.5-inc1", "--aug.erasing-prob", "0.25",
          "--ema.decay", "0.9", "--optim.layer-decay", "0.8")


def two_nodes(args, cwds, port):
    """Two torchrun 'nodes' of one process each on this machine; each in its own folder, so a
    relative --work-dir is a node-local work dir, as on machines without a shared disk."""
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                              "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr",
                              "127.0.0.1", "--master-port", str(port), "-m", "convnext_cifar",
                              *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for rank, cwd in enumerate(cwds)]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(single, double):
    assert_close_runs(single, double[0], atol=1e-4)


def test_sharded_eval_counts_each_image_once(double, capsys):
    work, out = double
    val = [r for r in metric_records(work) if "top1" in r]
    assert out.stdout.count("val  loss") == 2  # printed by rank 0 only
    # The same weights evaluated by one process, unsharded: the same top-1 to the image (only a
    # near-tie could flip between batchings), and the very same for the best epoch's file.
    capsys.readouterr()
    assert cli.main(["eval", str(work / "best.safetensors"), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    best = max(val, key=lambda r: r["top1"])
    assert single["num_images"] == 299 and sum(map(sum, single["confusion"])) == 299
    assert abs(single["top1"] - best["top1"]) <= 100 / 299 + 1e-9


def test_only_rank_0_writes(double):
    work, out = double
    names = sorted(p.name for p in work.iterdir())
    assert names == [".lock", "best.safetensors", "config.json", "epoch_1.safetensors",
                     "epoch_2.safetensors", "metrics.jsonl", "state_00000008.pt",  # the last
                     "status.json", "train.log"]  # rank 0's console
    steps = [r["step"] for r in metric_records(work) if "step" in r]
    assert steps == [2, 4, 6, 8]  # each log point once, not once per rank
    assert out.stdout.count("done: best top1") == 1


def test_accumulation_matches_the_full_batch(single, cifar_root, tmp_path):
    assert cli.main(small_run_args(cifar_root, tmp_path, *ARGS, "--optim.accum-steps", "2")) == 0
    assert_close_runs(single, tmp_path, atol=1e-4)


def test_batch_must_split_over_processes(cifar_root, tmp_path):
    out = torchrun(*small_run_args(cifar_root, tmp_path, *ARGS, "--data.batch-size", "51"))
    assert out.returncode != 0
    assert out.stderr.count("must split evenly over 2 processes") == 1  # rank 0 speaks


def test_sigterm_under_torchrun_stops_all_ranks_and_resume_is_exact(cifar_root, tmp_path):
    uninterrupted = tmp_path / "whole"
    out = torchrun(*noisy_args(cifar_root, uninterrupted))
    assert out.returncode == 0, out.stderr[-3000:]
    per_rank = final_state(uninterrupted)["rng"]["per_rank"]
    assert len(per_rank) == 2 and not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])

    work = tmp_path / "stopped"
    args = noisy_args(cifar_root, work)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "convnext_cifar", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while not find_states(work) and time.monotonic() - start < 120:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped_at = final_state(work)["run"]
    assert stopped_at["epoch"] < 30, "the run ended before the signal"
    assert "state saved to" in err and f"train --resume {work}" in err
    out = torchrun(*args, "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert final_state(work)["run"]["epoch"] == 30
    steps = [r["step"] for r in metric_records(work) if "step" in r]
    assert steps == list(range(1, 30 * 2 + 1))
    # every rank continued its own noise stream and the data draws: the very same run
    a, b = final_model(uninterrupted), final_model(work)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_with_mixing_augmentation_and_ema_train_like_one(cifar_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(small_run_args(cifar_root, one, *ARGS, *RECIPE)) == 0
    out = torchrun(*small_run_args(cifar_root, two, *ARGS, *RECIPE))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_close_runs(one, two, atol=1e-4)
    ema_one, ema_two = final_state(one)["ema"], final_state(two)["ema"]
    worst = max((ema_one[k] - ema_two[k]).abs().max().item() for k in ema_one)
    assert worst < 1e-4, worst
    assert all("ema_top1" in r for r in metric_records(two) if "top1" in r)


def test_two_processes_with_a_distillation_teacher_train_like_one(cifar_root, tmp_path,
                                                                   trained):
    """Each rank's teacher sees its slice of the global batch; agreement is counted over the
    ranks' shares of the held-out images once each, as one process counts it."""
    one, two = tmp_path / "one", tmp_path / "two"
    distill = ("--distill.teacher", str(trained), "--distill.image-size", "40", *RECIPE[:4])
    assert cli.main(small_run_args(cifar_root, one, *ARGS, *distill)) == 0
    out = torchrun(*small_run_args(cifar_root, two, *ARGS, *distill))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_close_runs(one, two, atol=1e-4)
    val_one, val_two = ([r for r in metric_records(w) if "top1" in r] for w in (one, two))
    for a, b in zip(val_one, val_two):
        assert a["teacher_top1"] == b["teacher_top1"]
        assert abs(a["agreement"] - b["agreement"]) <= 100 / 299 + 1e-9
        assert a["teacher_kl"] == pytest.approx(b["teacher_kl"], rel=1e-3)


def test_two_processes_on_an_image_folder_train_like_one(tmp_path):
    from cifar_files import write_image_folder

    root = write_image_folder(tmp_path / "pics", {"train": {"a": 40, "b": 40, "c": 20},
                                                  "val": {"a": 10, "b": 10, "c": 9}})
    args = ("--data.dataset", "folder", *ARGS[:4], "--model.drop-path-rate", "0",
            "--log-interval", "2")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(small_run_args(root, one, *args)) == 0
    decoded_cache().rename(tmp_path / "cache-of-one")  # rank 0 decodes again
    out = torchrun(*small_run_args(root, two, *args))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("decoding 100 images") == 1  # rank 0 decoded, rank 1 read the cache
    assert_close_runs(one, two, atol=1e-4)


def test_two_processes_streaming_from_disk_with_the_balanced_sampler_train_like_one(tmp_path):
    """One process with the images in memory, two reading theirs from the decode cache, both
    drawing a class-balanced order: the same run."""
    from cifar_files import write_image_folder

    root = write_image_folder(tmp_path / "pics", {"train": {"a": 70, "b": 20, "c": 10},
                                                  "val": {"a": 10, "b": 10, "c": 9}})
    args = ("--data.dataset", "folder", *ARGS[:4], "--model.drop-path-rate", "0",
            "--log-interval", "2", "--data.sampler", "balanced")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(small_run_args(root, one, *args, "--data.placement", "device")) == 0
    out = torchrun(*small_run_args(root, two, *args, "--data.placement", "disk"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_close_runs(one, two, atol=1e-4)


def test_nodes_without_a_shared_work_dir_resume_what_rank_0_saved(cifar_root, tmp_path):
    args = [a if a != "WORK" else "run" for a in noisy_args(cifar_root, "WORK")]
    whole = [tmp_path / "whole0", tmp_path / "whole1"]
    stopped = [tmp_path / "node0", tmp_path / "node1"]
    for d in whole + stopped:
        d.mkdir()
    for proc in two_nodes(args, whole, free_port()):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    procs = two_nodes(args, stopped, free_port())
    start = time.monotonic()
    while not find_states(stopped[0] / "run") and time.monotonic() - start < 300:
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.communicate(timeout=300)
    assert final_state(stopped[0] / "run")["run"]["epoch"] < 30, "ended before the signal"
    assert not find_states(stopped[1] / "run")  # node 1's work dir holds no state to resume
    procs = two_nodes(args + ["--resume", "auto"], stopped, free_port())
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    steps = [r["step"] for r in metric_records(stopped[0] / "run") if "step" in r]
    assert steps == list(range(1, 30 * 2 + 1))
    a, b = final_model(whole[0] / "run"), final_model(stopped[0] / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)  # rank 1 resumed from rank 0's state
