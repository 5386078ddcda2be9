"""data/cache.py: the decode cache hits and misses as files change, is read back exactly (any
rows, any order, several threads), and survives killed writers and other runs."""

import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from cifar_files import write_image_folder
from PIL import Image
from support import decoded_cache, folder_cfg, folder_data

from convnext_cifar.config import DataConfig
from convnext_cifar.data import cache as data_cache
from convnext_cifar.data.cache import DiskImages
from convnext_cifar.data.folders import channel_stats, stats_of
from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.errors import UserError


def _count_decodes(monkeypatch) -> list:
    """The calls to the cache's decoder from now on (a cache hit makes none)."""
    calls = []
    real = data_cache.decode_chunks
    monkeypatch.setattr(data_cache, "decode_chunks",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_the_cache_hits_and_misses_when_a_file_changes(tmp_path, monkeypatch):
    write_image_folder(tmp_path, {"train": {"a": 5, "b": 5}, "val": {"a": 2, "b": 2}})
    first = load_dataset(folder_cfg(tmp_path))
    cache = sorted(p.name for p in decoded_cache().iterdir())  # the user's cache, not the data's
    assert not (tmp_path / data_cache.FOLDER_CACHE).exists()
    assert [n.split("-")[0] for n in cache] == ["train", "val"]
    calls = _count_decodes(monkeypatch)
    second = load_dataset(folder_cfg(tmp_path))
    assert calls == [] and torch.equal(first.train.images, second.train.images)  # a hit
    changed = tmp_path / "train" / "b" / "0002.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = load_dataset(folder_cfg(tmp_path))
    assert len(calls) == 1 and len(calls[0][0]) == 10  # train/ decoded again; val/ still cached
    assert (third.train.images[7] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()
    load_dataset(folder_cfg(tmp_path, image_size=48))  # another size: another entry
    assert len(calls) == 3


def test_a_replaced_file_is_a_cache_miss_even_with_its_size_and_mtime(tmp_path):
    from convnext_cifar.data.kinds import load_dataset

    data = write_image_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1,
                                                                                 "b": 1}},
                              suffix=".bmp")
    cfg = DataConfig(dataset="folder", root=data, decode_processes=1)
    first = load_dataset(cfg)
    target = data / "train" / "a" / "0001.bmp"
    stat = target.stat()
    red = tmp_path / "red.bmp"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(red)
    assert red.stat().st_size == stat.st_size
    shutil.copyfile(red, target)  # in place, as `cp -p` does: same inode, size and mtime
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_dataset(cfg)
    assert (second.train.images[1] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()
    assert not torch.equal(first.train.images, second.train.images)
    blue = tmp_path / "blue.bmp"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(blue)
    os.utime(blue, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(blue, target)  # renamed over it, as `rsync -a` does: another inode
    third = load_dataset(cfg)
    assert (third.train.images[1] == torch.tensor([0, 0, 255]).view(3, 1, 1)).all()


def test_a_killed_cache_write_is_cleaned_up_and_a_running_one_is_not(tmp_path):
    from convnext_cifar.data.kinds import load_dataset

    data = write_image_folder(tmp_path / "d", {"train": {"a": 3}, "val": {"a": 1}})
    cache = decoded_cache()
    cache.mkdir(parents=True)
    host = socket.gethostname().replace(".", "_")
    dead = cache / f".train-x.safetensors.{host}.{2**22 + 12345}.abcdef.tmp"
    live = cache / f".train-y.safetensors.{host}.{os.getpid()}.abcdef.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"being written")
    load_dataset(DataConfig(dataset="folder", root=data, decode_processes=1))
    assert not dead.exists() and live.exists()


def test_disk_images_read_any_rows_in_any_order_as_memory_has_them(pics):
    disk = load_dataset(folder_data(pics, placement="disk"))
    memory = load_dataset(folder_data(pics, placement="device"))
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
    data = load_dataset(folder_data(pics, placement="device"))
    assert data.train.histogram is not None  # written with the cache: no second read
    assert data.train.histogram.sum() == 3 * 47 * 32 * 32  # the skipped image is not counted
    measured = channel_stats(data.train.images)  # from the images themselves
    assert stats_of(data.train.histogram) == measured and data.mean == measured[0]


def test_a_cache_an_earlier_version_wrote_beside_the_data_is_still_used(tmp_path, monkeypatch):
    write_image_folder(tmp_path, {"train": {"a": 5, "b": 5}, "val": {"a": 2, "b": 2}})
    first = load_dataset(folder_cfg(tmp_path))
    beside = tmp_path / data_cache.FOLDER_CACHE
    beside.mkdir()
    for entry in decoded_cache().glob("*.safetensors"):  # <split>-<tag>-<key>: 0.1.x's name
        split, _, key = entry.name.split("-", 2)
        entry.rename(beside / f"{split}-{key}")
    calls = _count_decodes(monkeypatch)
    again = load_dataset(folder_cfg(tmp_path))
    assert calls == [] and torch.equal(first.train.images, again.train.images)  # a hit
    assert list(decoded_cache().glob("*.safetensors")) == []  # nothing decoded anew
