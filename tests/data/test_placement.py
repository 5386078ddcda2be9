"""data/placement.py: the images go where they fit (device, host, disk), pinned one split at a
time."""

import dataclasses

import pytest
import torch
from support import data_cfg, folder_cfg, folder_data, needs_cuda, random_images

from convnext_cifar.data import cache as data_cache
from convnext_cifar.data import folders as data_folders
from convnext_cifar.data import placement as data_placement
from convnext_cifar.data.cache import DiskImages
from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.data.placement import choose, host_peak, pinned_bytes
from convnext_cifar.data.placement import choose as placement
from convnext_cifar.errors import UserError


def _read_only(path):
    raise PermissionError(13, "Read-only file system", str(path))


def test_placement_keeps_what_fits_on_the_device_else_host_else_disk(monkeypatch, folder_root):
    gb = 2**30
    assert placement(1 * gb, 10 * gb, 10 * gb, 0.8, cpu=False) == "device"
    assert placement(9 * gb, 10 * gb, 64 * gb, 0.8, cpu=False) == "host"
    assert placement(9 * gb, 10 * gb, 64 * gb, 0.8, cpu=True) == ""  # no separate host memory
    assert placement(60 * gb, 10 * gb, 64 * gb, 0.8, cpu=False) == ""
    assert placement(60 * gb, 10 * gb, 64 * gb, 0.8, cpu=False, disk=True) == "disk"
    assert placement(1, 10 * gb, 64 * gb, 1e-12, cpu=False) == "host"  # a forced tiny share
    monkeypatch.setattr(data_placement, "host_free_memory", lambda: 200_000)  # a forced small limit
    monkeypatch.setattr(data_placement, "free_memory", lambda device: 200_000)
    data = load_dataset(folder_cfg(folder_root, image_size=64))  # a folder: stays on disk
    assert data.placement == "disk" and isinstance(data.train.images, DiskImages)
    assert "read from the decode cache on disk" in data.notes[-1]
    with pytest.raises(UserError) as e:
        load_dataset(folder_cfg(folder_root, image_size=64, placement="device"))
    message = str(e.value)
    assert "41 x 3 x 64 x 64 bytes" in message and "on cpu" in message
    # 64 * sqrt(0.8 * 200000 / (503808 + 41 * 8 label bytes))
    assert "use --data.placement auto, or --data.image-size 36 or less" in message
    monkeypatch.setattr(data_cache, "atomic_writer", _read_only)  # no cache: no disk tier
    monkeypatch.setattr(data_folders, "host_free_memory", lambda: 200_000)
    with pytest.raises(UserError, match=r"use a writable --data.cache-dir \(then train is read "
                       r"from disk\), or --data.image-size (\d+) or less"):
        load_dataset(folder_cfg(folder_root, image_size=80))
    with pytest.raises(UserError, match="no decode cache to read from"):
        load_dataset(folder_cfg(folder_root, image_size=40, placement="disk"))
    with pytest.raises(UserError, match="invalid --data.placement 'disk': CIFAR-10 is read"):
        data_cfg(folder_root, placement="disk")


def test_pinning_is_counted_with_its_power_of_two_blocks_and_one_split_at_a_time():
    gb = 2**30
    assert pinned_bytes(5 * gb) == 8 * gb and pinned_bytes(4 * gb) == 4 * gb
    # 5 GB of training images then 1 GB held out: the peak is while the first is copied
    assert host_peak([5 * gb, 1 * gb]) == 6 * gb + 8 * gb
    assert choose(6 * gb, 2 * gb, 100 * gb, 0.8, cpu=False, host_need=8 * gb) == "host"
    assert choose(6 * gb, 2 * gb, 9 * gb, 0.8, cpu=False, host_need=8 * gb) == ""


@pytest.mark.cuda
@needs_cuda
def test_cuda_pinned_placement_copies_one_split_at_a_time():
    from convnext_cifar.data.dataset import Dataset, Split
    from convnext_cifar.data.placement import place

    images, labels = random_images(64)
    data = Dataset(Split(images, labels), ["a"] * 10, (0.0,) * 3, (1.0,) * 3, {},
                   train=Split(images.clone(), labels.clone()))
    placed = place(data, torch.device("cuda"), 1e-12)  # a share nothing fits in: host memory
    assert placed.placement == "host" and placed.train.images.is_pinned()
    assert torch.equal(placed.val.images, images)


def test_auto_placement_streams_a_folder_too_big_for_memory(pics, monkeypatch):
    monkeypatch.setattr(data_placement, "free_memory", lambda device: 100_000)
    monkeypatch.setattr(data_placement, "host_free_memory", lambda: 100_000)
    data = load_dataset(folder_data(pics))
    assert data.placement == "disk" and isinstance(data.val.images, DiskImages)
    small = dataclasses.replace(folder_data(pics), limit_train=5, limit_val=5)
    assert load_dataset(small).placement == "device"  # 10 images fit
