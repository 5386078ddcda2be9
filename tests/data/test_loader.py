"""data/loader.py: normalisation, the seeded per-epoch order, sharded and resumed loaders, the
balanced sampler, and staging from host memory or disk."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from support import folder_data, needs_cuda, tiny_run

from convnext_cifar.config import AugConfig, DataConfig, TrainConfig
from convnext_cifar.data.augment import build_batch_transform
from convnext_cifar.data.cache import DiskImages
from convnext_cifar.data.cifar import CIFAR10
from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.data.loader import DeviceLoader, Normalize, Staging, eval_batches
from convnext_cifar.distributed import Dist
from convnext_cifar.runtime import Runtime


def plain(size=32, channels_last=True, mean=(0, 0, 0), std=(1, 1, 1)):
    return Normalize(mean, std, size, "cpu", channels_last)


def mix_with_next(x, y, generators, epoch):
    """A global-batch transform: blends each image with the next one by a random weight, as a
    MixUp would, and turns labels into matching soft targets."""
    lam = torch.rand(len(x), 1, 1, 1, generator=generators.on_device, device=x.device)
    lam = lam * float(generators.host.random())  # a host draw too
    mixed = lam * x.float() + (1 - lam) * x.float().roll(1, 0)
    onehot = torch.nn.functional.one_hot(y % 50, 50).float()
    soft = lam.view(-1, 1) * onehot + (1 - lam.view(-1, 1)) * onehot.roll(1, 0)
    return mixed, soft + epoch


CPU_DEVICE = torch.device("cpu")


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
    normalize = Normalize((0, 0, 0), (1, 1, 1), 32, CPU_DEVICE, False)
    return DeviceLoader(images, labels, cfg, 0, normalize, dist, transform)


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_normalize_values_format_and_upsampling():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = plain(mean=CIFAR10.mean, std=CIFAR10.std)(images)
    mean = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() - mean) / std)
    assert x.is_contiguous(memory_format=torch.channels_last)
    big = plain(64, channels_last=False, mean=CIFAR10.mean, std=CIFAR10.std)(images)
    assert big.shape == (4, 3, 64, 64) and big.is_contiguous()


def test_loader_is_seeded_covers_each_image_once_per_epoch_and_reshuffles():
    n = 103
    images = torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 32, 32).to(torch.uint8).contiguous()
    labels = torch.arange(n)
    c = DataConfig(batch_size=10, padding=0, flip_prob=0.0)
    loader = DeviceLoader(images, labels, c, seed=5, normalize=plain())
    assert len(loader) == 11
    batches = list(loader.epoch(0))
    seen = torch.cat([y for _, y, _ in batches])
    assert sorted(seen.tolist()) == list(range(n)) and [len(y) for _, y, _ in batches][-1] == 3
    assert [g for _, _, g in batches] == [10] * 10 + [3]
    for x, y, _ in batches:  # each image travels with its own label
        assert torch.equal(x[:, 0, 0, 0].long(), y)
    again = torch.cat([y for _, y, _ in DeviceLoader(images, labels, c, 5, plain()).epoch(0)])
    assert torch.equal(seen, again)
    assert not torch.equal(seen, torch.cat([y for _, y, _ in loader.epoch(1)]))
    drop = DeviceLoader(images, labels, dataclasses.replace(c, drop_last=True), 5, plain())
    assert len(drop) == 10 and all(len(y) == 10 for _, y, _ in drop.epoch(0))


def test_eval_batches_cover_every_image_once_in_order():
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(23)
    ys = torch.cat([y for _, y in eval_batches(images, labels, 10, plain())])
    assert torch.equal(ys, labels)


@pytest.mark.parametrize("transform", [None, "mixing"])
def test_sharded_loader_slices_the_same_global_batches_and_augmentations(transform):
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50)
    c = DataConfig(batch_size=8)
    fn = mix_with_next if transform else None
    whole = list(DeviceLoader(images, labels, c, 3, plain(), transform=fn).epoch(2))
    parts = [list(DeviceLoader(images, labels, c, 3, plain(), Dist(r, 3), fn).epoch(2))
             for r in range(3)]
    for i, (x, y, n) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)  # same crops and flips
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
        assert [p[i][2] for p in parts] == [n] * 3
    assert [len(p[-1][1]) for p in parts] == [1, 1, 0]  # the last global batch holds 2 images


def test_batch_transform_sees_the_global_batch_and_the_loader_generator():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(40)
    c = DataConfig(batch_size=8, padding=0, flip_prob=0.0)
    seen = []

    def record(x, y, generators, epoch):
        seen.append((x.clone(), y.clone(), epoch))
        return mix_with_next(x, y, generators, epoch)

    loader = DeviceLoader(images, labels, c, 3, plain(), Dist(1, 2), record)
    (x, t, n), *_ = loader.epoch(4)
    gx, gy, epoch = seen[0]
    assert (len(gx), n, epoch) == (8, 8, 4) and gx.dtype == torch.uint8  # the whole global batch
    assert torch.equal(gx, images[gy])  # crop/flip off: the very images of those labels
    assert x.shape == (4, 3, 32, 32) and t.shape == (4, 50) and x.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.full((4,), 1.0 + 50 * 4))  # soft targets, this slice


def test_loader_resumes_mid_epoch_with_the_same_draws():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    c = DataConfig(batch_size=8)
    loader = DeviceLoader(images, torch.arange(40), c, 1, plain(), transform=mix_with_next)
    whole, saved = [], None
    for i, batch in enumerate(loader.epoch(2)):
        whole.append(batch)
        if i == 1:
            saved = loader.state_dict()
    again = DeviceLoader(images, torch.arange(40), c, 1, plain(), transform=mix_with_next)
    again.load_state_dict(saved)
    rest = list(again.epoch(2, start=2))
    assert len(rest) == 3
    for (xa, ya, _), (xb, yb, _) in zip(whole[2:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="generator state"):
        next(DeviceLoader(images, torch.arange(40), c, 1, plain()).epoch(0, start=1))


@pytest.mark.cuda
@needs_cuda
def test_cuda_images_in_host_memory_are_batched_onto_the_device():
    """Dataset.placement "host": pinned images, permutation on the CPU, batches copied over."""
    rt = Runtime(torch.device("cuda"), "fp32", compile=False, channels_last=True)
    cfg = TrainConfig(data=DataConfig(batch_size=8, padding=0, flip_prob=0.0))
    images = torch.arange(40).view(40, 1, 1, 1).expand(40, 3, 32, 32).to(torch.uint8)
    run = tiny_run(rt, images.contiguous().pin_memory(), torch.arange(40).pin_memory(), cfg)
    seen = []
    for x, y, _ in run.loader.epoch(0):
        assert x.device.type == "cuda" and y.device.type == "cuda"
        seen += y.tolist()
        loss, _ = run.step_fn(x, y % 10)
        assert torch.isfinite(loss)
    assert sorted(seen) == list(range(40))


@pytest.mark.cuda
@needs_cuda
def test_cuda_batches_are_the_same_from_device_pinned_host_and_disk(tmp_path):
    """Every draw on the GPU, the images gathered there, or staged from pinned host memory or
    from a cache file through the reader thread and copied without blocking: equal batches."""
    import numpy as np

    from convnext_cifar.config import AugConfig
    from convnext_cifar.data.augment import build_batch_transform
    from convnext_cifar.data.cache import DiskImages
    from convnext_cifar.data.loader import DeviceLoader, Normalize

    cuda = torch.device("cuda")
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    path = tmp_path / "cache.bin"
    path.write_bytes(b"\0" * 16 + images.numpy().tobytes())
    sources = {"device": (images.to(cuda), labels.to(cuda)),
               "host": (images.pin_memory(), labels.pin_memory()),
               "disk": (DiskImages(path, 16, np.arange(300), 32), labels)}
    transform = build_batch_transform(AugConfig(mixup_alpha=0.8, randaugment="rand-m9"), 10,
                                      (0.0,) * 3, (1.0,) * 3)
    cfg = DataConfig(batch_size=64, sampler="balanced")
    normalize = Normalize((0.0,) * 3, (1.0,) * 3, 32, cuda, True)
    batches = {name: [(x.cpu(), y.cpu()) for x, y, _ in DeviceLoader(
        *source, cfg, 0, normalize, transform=transform).epoch(3)]
        for name, source in sources.items()}
    for name in ("host", "disk"):
        for (x, y), (x0, y0) in zip(batches[name], batches["device"]):
            assert torch.equal(x, x0) and torch.equal(y, y0), name


def test_the_balanced_sampler_draws_classes_equally_often_from_seeded_generators():
    import torch

    from convnext_cifar.config import DataConfig
    from convnext_cifar.data.loader import DeviceLoader, Normalize

    labels = torch.tensor([0] * 90 + [1] * 8 + [2] * 2)
    images = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    cfg = DataConfig(batch_size=25, sampler="balanced")
    normalize = Normalize((0, 0, 0), (1, 1, 1), 32, torch.device("cpu"), False)
    loader = DeviceLoader(images, labels, cfg, seed=0, normalize=normalize)
    counts = torch.zeros(3)
    for epoch in range(30):
        drawn = torch.cat([y for _, y, _ in loader.epoch(epoch)])
        assert len(drawn) == 100  # an epoch keeps its length: as many draws as images
        counts += torch.bincount(drawn, minlength=3)
    # 3,000 draws, each class 1/3 likely: 1,000 each, sd ~26
    assert (counts - 1000).abs().max() < 110, counts
    again = torch.cat([y for _, y, _ in loader.epoch(7)])
    assert torch.equal(again, torch.cat([y for _, y, _ in loader.epoch(7)]))  # seeded
    uniform = DeviceLoader(images, labels, DataConfig(batch_size=25), 0, normalize)
    assert torch.bincount(torch.cat([y for _, y, _ in uniform.epoch(0)])).tolist() == [90, 8, 2]


@pytest.mark.parametrize("mixing, world", [(False, 2), (True, 4)])  # MixUp: partners N-1-i
def test_each_rank_reads_only_its_slice_and_the_ranks_make_the_one_process_batch(pics, mixing,
                                                                                 world):
    data = load_dataset(folder_data(pics, placement="disk"))
    memory = load_dataset(folder_data(pics, placement="device"))
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
    data = load_dataset(folder_data(pics, placement="disk"))
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
    staging = Staging(images, labels, CPU_DEVICE, 8)
    takes = [torch.randperm(40)[:8] for _ in range(5)] + [torch.tensor([3, 3, 1])]
    for take, (x, y) in zip(takes, staging.stream(iter(takes))):
        assert torch.equal(x, images[take]) and torch.equal(y, labels[take])


def test_staging_for_a_device_that_is_neither_cpu_nor_cuda_moves_every_batch_there():
    """MPS: host or disk placement must not hand CPU tensors to the device's ops ("meta" stands
    in for a device this machine lacks)."""
    images, labels = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10)
    staging = Staging(images, labels, torch.device("meta"), 4)
    batches = list(staging.stream(iter([torch.arange(4), torch.arange(4, 8)])))
    assert [(x.device.type, y.device.type, len(x)) for x, y in batches] == [("meta", "meta", 4)] * 2


def test_streaming_an_epoch_from_disk_holds_the_staging_buffers_not_the_cache(tmp_path):
    size, count = 64, 12_000  # a 141 MiB cache
    path = tmp_path / "cache.bin"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(b"\0" * 24)  # a header before the images, as the cache file has
        for _ in range(count // 1000):
            f.write(rng.integers(0, 256, (1000, 3, size, size), dtype=np.uint8).tobytes())
    images = DiskImages(path, 24, np.arange(count), size)
    staging = Staging(images, torch.zeros(count, dtype=torch.int64), CPU_DEVICE, 256)
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
