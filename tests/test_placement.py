"""--data.placement disk: images stream from the decode cache through staging buffers, with the
same batches as device placement, each rank reading only its slice, resident memory bounded."""

import dataclasses
import json
import os
import threading

import numpy as np
import pytest
import torch
from cifar_files import write_image_folder
from conftest import small_run_args
from safetensors.torch import load_file

from convnext_cifar import cli, placement
from convnext_cifar.augment import build_batch_transform
from convnext_cifar.config import AugConfig, DataConfig
from convnext_cifar.data import DeviceLoader, Normalize, Staging
from convnext_cifar.datasets import load_dataset
from convnext_cifar.distributed import Dist
from convnext_cifar.folders import channel_stats, stats_of
from convnext_cifar.placement import DiskImages

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    root = tmp_path_factory.mktemp("pics")
    write_image_folder(root, {"train": {"a": 30, "b": 12, "c": 6}, "val": {"a": 6, "b": 5, "c": 4}})
    (root / "train" / "b" / "0003.png").write_bytes(b"not an image")  # a skipped cache row
    return root


def folder(root, **kw):
    return DataConfig(dataset="folder", root=root, download=False, decode_processes=1,
                      skip_bad_images=True, **kw)


def test_disk_images_read_any_rows_in_any_order_as_memory_has_them(pics):
    disk = load_dataset(folder(pics, placement="disk"))
    memory = load_dataset(folder(pics, placement="device"))
    assert disk.placement == "disk" and memory.placement == "device"
    images = disk.train.images
    assert isinstance(images, DiskImages) and isinstance(memory.train.images, torch.Tensor)
    assert len(images) == 47 and images.shape == memory.train.images.shape  # one row skipped
    assert images.nbytes == memory.train.images.nbytes
    assert torch.equal(disk.train.labels, memory.train.labels)
    pick = torch.tensor([46, 3, 3, 20, 19, 21, 0, 46, 5])  # unsorted, repeated, adjacent
    assert torch.equal(images[pick], memory.train.images[pick])
    assert torch.equal(images[10:30:3], memory.train.images[10:30:3])
    assert torch.equal(torch.cat(list(images.split(10))), memory.train.images)
    assert (disk.mean, disk.std) == (memory.mean, memory.std)


def test_large_batches_are_read_by_several_threads_into_the_same_places(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    images = torch.randint(0, 256, (200, 3, 128, 128), dtype=torch.uint8)  # 48 KiB rows
    path = tmp_path / "rows.bin"
    path.write_bytes(b"\0" * 8 + images.numpy().tobytes())
    disk = DiskImages(path, 8, np.arange(200), 128)
    index = np.concatenate([np.arange(150, 100, -1), np.arange(40), [7, 7, 199]])  # 3.5 MiB
    groups = []
    with ThreadPoolExecutor(4) as pool:
        real_map = pool.map
        pool.map = lambda fn, parts: (groups.append(len(parts)), real_map(fn, parts))[1]
        out = torch.empty((len(index), 3, 128, 128), dtype=torch.uint8)
        disk.read_into(index, out, pool)
    assert groups == [3]  # at least a MiB a group
    assert torch.equal(out, images[torch.from_numpy(index)])


def test_a_cache_cut_short_while_read_is_one_line_saying_what_to_do(tmp_path):
    from convnext_cifar.errors import UserError

    path = tmp_path / "rows.bin"
    path.write_bytes(bytes(10 * 3 * 32 * 32))
    disk = DiskImages(path, 0, np.arange(10), 32)
    assert disk[[9]].shape == (1, 3, 32, 32)
    os.truncate(path, 5 * 3 * 32 * 32)
    with pytest.raises(UserError, match="ended early.*--resume auto"):
        disk[[2, 9]]


def test_a_cache_pruned_or_replaced_by_another_run_is_still_read_as_loaded(tmp_path):
    import pickle

    path = tmp_path / "train-key.safetensors"
    first = torch.arange(4 * 3 * 32 * 32, dtype=torch.int64).to(torch.uint8).view(4, 3, 32, 32)
    path.write_bytes(first.numpy().tobytes())
    disk = DiskImages(path, 0, np.arange(4), 32)  # the run has loaded it, not yet read it
    replaced = tmp_path / "other"
    replaced.write_bytes(bytes(2 * 3 * 32 * 32))  # another run's entry, shorter, all zeros
    os.replace(replaced, path)
    assert torch.equal(disk[[3, 0]], first[[3, 0]])
    path.unlink()  # pruned
    assert torch.equal(disk[:], first)
    path.write_bytes(first.numpy().tobytes())
    copy = pickle.loads(pickle.dumps(disk))  # another process: opens the path again
    assert torch.equal(copy[[1]], first[[1]])


def test_the_cache_keeps_the_pixel_histogram_that_mean_and_std_come_from(pics):
    data = load_dataset(folder(pics, placement="device"))
    assert data.train.histogram is not None  # written with the cache: no second read
    assert data.train.histogram.sum() == 3 * 47 * 32 * 32  # the skipped image is not counted
    measured = channel_stats(data.train.images)  # from the images themselves
    assert stats_of(data.train.histogram) == measured and data.mean == measured[0]


class Recording(DiskImages):
    """DiskImages that notes which images each read asked for."""

    def __init__(self, images: DiskImages):
        super().__init__(images.path, images.offset, images.rows, images.size)
        self.reads: list[list[int]] = []

    def read_into(self, index, out, pool=None):
        self.reads.append(sorted(index.tolist()))
        super().read_into(index, out, pool)


def loader(images, labels, dist, transform=None, **kw):
    cfg = DataConfig(batch_size=16, **kw)
    normalize = Normalize((0, 0, 0), (1, 1, 1), 32, CPU, False)
    return DeviceLoader(images, labels, cfg, 0, normalize, dist, transform)


@pytest.mark.parametrize("mixing, world", [(False, 2), (True, 4)])  # MixUp: partners N-1-i
def test_each_rank_reads_only_its_slice_and_the_ranks_make_the_one_process_batch(pics, mixing,
                                                                                 world):
    data = load_dataset(folder(pics, placement="disk"))
    memory = load_dataset(folder(pics, placement="device"))
    transform = build_batch_transform(AugConfig(mixup_alpha=0.8, mix_mode="elem"), 3,
                                      data.mean, data.std) if mixing else None
    one = [x for x, _, _ in loader(memory.train.images, memory.train.labels, Dist(),
                                   transform).epoch(1)]
    order = torch.randperm(47, generator=torch.Generator().manual_seed(1))  # seed 0, epoch 1
    per_rank = []
    for rank in range(world):
        images = Recording(data.train.images)
        dist = Dist(rank=rank, world=world)
        per_rank.append([x for x, _, _ in loader(images, data.train.labels, dist,
                                                 transform).epoch(1)])
        for b, read in enumerate(images.reads):
            batch = order[16 * b:16 * (b + 1)]
            lo, hi = dist.shard(len(batch))
            rows = np.arange(lo, hi) if transform is None else transform.rows(len(batch), lo, hi)
            assert read == sorted(batch[rows].tolist())  # its slice (and MixUp partners) only
            assert len(read) < len(batch)
    for b, whole in enumerate(one):
        torch.testing.assert_close(torch.cat([part[b] for part in per_rank]), whole,
                                   rtol=0, atol=0)


def test_the_next_batch_is_read_while_the_current_one_is_used(pics):
    data = load_dataset(folder(pics, placement="disk"))
    images = Recording(data.train.images)
    second_read = threading.Event()
    real = images.read_into

    def read_into(index, out, pool=None):
        real(index, out, pool)
        if len(images.reads) == 2:
            second_read.set()

    images.read_into = read_into
    batches = loader(images, data.train.labels, Dist()).epoch(0)
    next(batches)  # batch 0 handed out; the step that uses it would run now
    assert second_read.wait(10)  # batch 1 is read meanwhile, not when it is asked for
    assert len(images.reads) == 2
    batches.close()


def test_staging_gathers_host_tensors_as_indexing_does():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(40)
    staging = Staging(images, labels, CPU, 8)
    takes = [torch.randperm(40)[:8] for _ in range(5)] + [torch.tensor([3, 3, 1])]
    for take, (x, y) in zip(takes, staging.stream(iter(takes))):
        assert torch.equal(x, images[take]) and torch.equal(y, labels[take])


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_streaming_an_epoch_from_disk_holds_the_staging_buffers_not_the_cache(tmp_path):
    size, count = 64, 12_000  # a 141 MiB cache
    path = tmp_path / "cache.bin"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(b"\0" * 24)  # a header before the images, as the cache file has
        for _ in range(count // 1000):
            f.write(rng.integers(0, 256, (1000, 3, size, size), dtype=np.uint8).tobytes())
    images = DiskImages(path, 24, np.arange(count), size)
    staging = Staging(images, torch.zeros(count, dtype=torch.int64), CPU, 256)
    before = resident_bytes()
    seen = 0
    order = torch.randperm(count)
    for x, _ in staging.stream(iter(order.split(256))):
        seen += int(x[:, :, 0, 0].sum())  # touch every batch
    grown = resident_bytes() - before
    assert seen > 0
    assert grown < 24 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB"
    assert torch.equal(images[order[:5]].view(5, -1)[:, :3],
                       torch.from_numpy(np.fromfile(path, np.uint8, offset=24).reshape(
                           count, -1)[order[:5].numpy(), :3]))


def run_weights(work):
    return load_file(work / "epoch_2.safetensors")


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
    strip = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in m]
             for m in metrics]
    assert len(strip[0]) == 4 and strip[0] == strip[1]  # losses, norms, every metric


RESUMED = ("--data.dataset", "folder", "--data.skip-bad-images", "--sched.epochs", "2",
           "--data.batch-size", "16", "--data.decode-processes", "1", "--data.sampler",
           "balanced", "--aug.mixup-alpha", "0.8")


@pytest.fixture(scope="module")
def whole_disk_run(pics, tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole")
    assert cli.main(small_run_args(pics, whole, *RESUMED, "--data.placement", "disk")) == 0
    return whole


@pytest.mark.slow  # five short runs
@pytest.mark.parametrize("then", ["disk", "device"])  # resumed where it was, or moved
def test_a_run_streaming_from_disk_resumes_mid_epoch_bit_exactly(pics, whole_disk_run, tmp_path,
                                                                 monkeypatch, then):
    from conftest import signal_at_step

    args, whole = RESUMED, whole_disk_run
    restore = signal_at_step(monkeypatch, 4)  # mid epoch 2 (3 steps an epoch)
    assert cli.main(small_run_args(pics, tmp_path / "cut", *args,
                                   "--data.placement", "disk")) == 143
    restore()
    assert cli.main(small_run_args(pics, tmp_path / "cut", *args, "--data.placement", then,
                                   "--resume", "auto")) == 0
    a, b = run_weights(whole), run_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_placement_streams_a_folder_too_big_for_memory(pics, monkeypatch):
    monkeypatch.setattr(placement, "free_memory", lambda device: 100_000)
    monkeypatch.setattr(placement, "host_free_memory", lambda: 100_000)
    data = load_dataset(folder(pics))
    assert data.placement == "disk" and isinstance(data.val.images, DiskImages)
    small = dataclasses.replace(folder(pics), limit_train=5, limit_val=5)
    assert load_dataset(small).placement == "device"  # 10 images fit


def test_a_run_whose_cache_another_run_prunes_and_replaces_trains_as_if_untouched(
        pics, whole_disk_run, tmp_path, monkeypatch):
    real_place = placement.place

    def place_then_prune(data, *args, **kwargs):  # as soon as the run has its images
        placed = real_place(data, *args, **kwargs)
        for split in (placed.train, placed.val):
            path = split.images.path
            path.unlink()  # pruned by another run ...
            path.write_bytes(bytes(1024))  # ... and something else written in its place
        return placed

    monkeypatch.setattr(placement, "place", place_then_prune)
    work = tmp_path / "pruned"
    assert cli.main(small_run_args(pics, work, *RESUMED, "--data.placement", "disk")) == 0
    a, b = run_weights(whole_disk_run), run_weights(work)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
