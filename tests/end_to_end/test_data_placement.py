"""End to end: disk placement trains bit for bit as device placement, resumes mid-epoch, and
reads what it loaded whatever another run does to the cache."""

import json

import pytest
import torch
from safetensors.torch import load_file
from support import signal_at_step, small_run_args, without_timings

from convnext_cifar import cli
from convnext_cifar.data import placement as data_placement


def run_weights(work):
    return load_file(work / "epoch_2.safetensors")


RESUMED = ("--data.dataset", "folder", "--data.skip-bad-images", "--sched.epochs", "2",
           "--data.batch-size", "16", "--data.decode-processes", "1", "--data.sampler",
           "balanced", "--aug.mixup-alpha", "0.8")


@pytest.fixture(scope="module")
def whole_disk_run(pics, tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole")
    assert cli.main(small_run_args(pics, whole, *RESUMED, "--data.placement", "disk")) == 0
    return whole


@pytest.mark.parametrize("extra", [
    pytest.param((), marks=pytest.mark.slow),  # the plain path: also in the rank test above
    ("--data.sampler", "balanced", "--aug.randaugment", "rand-m9-mstd0.5-inc1",
     "--aug.mixup-alpha", "0.8")])
def test_disk_placement_trains_bit_for_bit_as_device_placement(pics, tmp_path, extra):
    args = ("--data.dataset", "folder", "--data.skip-bad-images", "--sched.epochs", "2",
            "--data.batch-size", "16", "--data.decode-processes", "1", *extra)
    assert cli.main(small_run_args(pics, tmp_path / "device", *args,
                                   "--data.placement", "device")) == 0
    assert cli.main(small_run_args(pics, tmp_path / "disk", *args,
                                   "--data.placement", "disk")) == 0
    a, b = run_weights(tmp_path / "device"), run_weights(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [(tmp_path / w / "metrics.jsonl").read_text().splitlines()
               for w in ("device", "disk")]
    strip = [[without_timings(json.loads(line)) for line in m]
             for m in metrics]
    assert len(strip[0]) == 4 and strip[0] == strip[1]  # losses, norms, every metric


@pytest.mark.slow  # five short runs
@pytest.mark.parametrize("then", ["disk", "device"])  # resumed where it was, or moved
def test_a_run_streaming_from_disk_resumes_mid_epoch_bit_exactly(pics, whole_disk_run, tmp_path,
                                                                 monkeypatch, then):

    args, whole = RESUMED, whole_disk_run
    restore = signal_at_step(monkeypatch, 4)  # mid epoch 2 (3 steps an epoch)
    assert cli.main(small_run_args(pics, tmp_path / "cut", *args,
                                   "--data.placement", "disk")) == 143
    restore()
    assert cli.main(small_run_args(pics, tmp_path / "cut", *args, "--data.placement", then,
                                   "--resume", "auto")) == 0
    a, b = run_weights(whole), run_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_whose_cache_another_run_prunes_and_replaces_trains_as_if_untouched(
        pics, whole_disk_run, tmp_path, monkeypatch):
    real_place = data_placement.place

    def place_then_prune(data, *args, **kwargs):  # as soon as the run has its images
        placed = real_place(data, *args, **kwargs)
        for split in (placed.train, placed.val):
            path = split.images.path
            path.unlink()  # pruned by another run ...
            path.write_bytes(bytes(1024))  # ... and something else written in its place
        return placed

    monkeypatch.setattr(data_placement, "place", place_then_prune)
    work = tmp_path / "pruned"
    assert cli.main(small_run_args(pics, work, *RESUMED, "--data.placement", "disk")) == 0
    a, b = run_weights(whole_disk_run), run_weights(work)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
