import dataclasses
import hashlib
import io
import os
import tarfile
import urllib.request

import numpy as np
import pytest
import torch
from cifar_files import dump_py3, learnable_images, write_cifar10

from convnext_cifar import datasets
from convnext_cifar.augment import crop_flip
from convnext_cifar.config import DataConfig
from convnext_cifar.data import DeviceLoader, Normalize, eval_batches
from convnext_cifar.datasets import CIFAR10, load_dataset
from convnext_cifar.distributed import Dist
from convnext_cifar.errors import UserError


def cfg(root, **kw):
    return dataclasses.replace(DataConfig(), root=root, download=False, **kw)


def load_cifar10(c):
    return load_dataset(c)


def plain(size=32, channels_last=True, mean=(0, 0, 0), std=(1, 1, 1)):
    return Normalize(mean, std, size, "cpu", channels_last)


def test_reads_python2_pickles_exactly(tmp_path):
    train, test = learnable_images(37, seed=3), learnable_images(11, seed=4)
    write_cifar10(tmp_path, train, test)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02" and b"U\x04data" in raw  # Python 2 byte-string keys
    ds = load_cifar10(cfg(tmp_path))
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (37, 3, 32, 32)
    assert torch.equal(ds.train.images, torch.from_numpy(train[0]))
    assert torch.equal(ds.train.labels, torch.from_numpy(train[1]))
    assert torch.equal(ds.val.images, torch.from_numpy(test[0]))
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert (ds.mean, ds.std) == (CIFAR10.mean, CIFAR10.std)  # CIFAR-10's own, when not given
    own = load_cifar10(cfg(tmp_path, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0)))
    assert (own.mean, own.std) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


def test_user_copy_with_other_batch_sizes_loads_with_one_warning(tmp_path, capsys):
    train, test = learnable_images(23, seed=5), learnable_images(7, seed=6)
    write_cifar10(tmp_path, train, test, dump=dump_py3)  # re-pickled by Python 3
    ds = load_cifar10(cfg(tmp_path, limit_val=5))
    assert len(ds.train.images) == 23 and len(ds.val.images) == 5
    (note,) = ds.notes
    assert "not byte-identical to the official archive" in note and "data_batch_1" in note
    assert load_cifar10(cfg(tmp_path)).notes == [note]  # the same one line, checked once


def test_missing_data_without_download_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="CIFAR-10 not found.*--data.root"):
        load_cifar10(cfg(tmp_path))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "cannot read"),
    (lambda p: p.unlink(), "missing"),
    (lambda p: dump_py3({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, p),
     "expected uint8"),
    (lambda p: dump_py3({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, p),
     r"labels must be in \[0, 9\]"),
])
def test_damaged_batch_files_are_reported(tmp_path, damage, message):
    write_cifar10(tmp_path, learnable_images(10, 0), learnable_images(4, 1))
    damage(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    with pytest.raises(UserError, match=message):
        load_cifar10(cfg(tmp_path))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    write_cifar10(tmp_path, learnable_images(10, 0), learnable_images(4, 1))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    dump_py3({"data": Payload(), "labels": []}, tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(UserError, match="refusing to load"):
        load_cifar10(cfg(tmp_path))
    assert not marker.exists()


def _archive(tmp_path):
    src = tmp_path / "src"
    write_cifar10(src, learnable_images(10, 0), learnable_images(4, 1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


class _Response(io.BytesIO):
    """What urlopen returns, as far as download reads it."""

    def __init__(self, blob: bytes):
        super().__init__(blob)
        self.headers = {"Content-Length": str(len(blob))}


def test_download_verifies_checksum_and_unpacks(tmp_path, monkeypatch, capsys):
    blob = _archive(tmp_path)
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: urls.append(url) or _Response(blob))
    monkeypatch.setitem(datasets.DATASETS, "cifar10", dataclasses.replace(
        CIFAR10, archive_md5=hashlib.md5(blob).hexdigest()))
    ds = load_cifar10(dataclasses.replace(DataConfig(), root=tmp_path / "dl", download=True))
    assert len(ds.train.images) == 10 and not list((tmp_path / "dl").glob("*.part"))
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    err = capsys.readouterr().err  # progress: the whole (small) archive in one read, 100 %
    assert "downloading https://www.cs.toronto.edu" in err and "(100 %)" in err

    monkeypatch.setitem(datasets.DATASETS, "cifar10", dataclasses.replace(
        CIFAR10, archive_md5="0" * 32))
    with pytest.raises(UserError, match="MD5"):
        load_cifar10(dataclasses.replace(DataConfig(), root=tmp_path / "dl2", download=True))
    assert not (tmp_path / "dl2" / "cifar-10-batches-py").exists()


def _reference_crop_flip(images, padding, offsets, flips):
    """Per-image torchvision-style RandomCrop(32, padding) + flip, for comparison."""
    out = []
    for img, (oy, ox), f in zip(images, offsets.tolist(), flips.tolist()):
        p = torch.nn.functional.pad(img, (padding,) * 4)
        crop = p[:, oy:oy + 32, ox:ox + 32]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_image_reference_and_shows_zero_border():
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zero pixels
    g = torch.Generator().manual_seed(3)
    out = crop_flip(images, 4, 0.5, g)
    g.manual_seed(3)  # the same draws, in the same order
    offsets = torch.randint(0, 9, (64, 2), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _reference_crop_flip(images, 4, offsets, flips))
    for i in range(64):  # zero rows/columns exactly where the offset reaches into the padding
        oy, ox = offsets[i].tolist()
        zero_rows = (out[i] == 0).all(dim=0).all(dim=1).sum().item()
        zero_cols = (out[i] == 0).all(dim=0).all(dim=0).sum().item()
        assert zero_rows == abs(oy - 4) and zero_cols == abs(ox - 4)
    assert 0 < flips.sum() < 64 and len({tuple(o) for o in offsets.tolist()}) > 20


def test_flip_is_exact_and_probability_is_respected():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(crop_flip(images, 0, 1.0, g), images.flip(-1))
    assert torch.equal(crop_flip(images, 0, 0.0, g), images)


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


def mix_with_next(x, y, generators, epoch):
    """A global-batch transform: blends each image with the next one by a random weight, as a
    MixUp would, and turns labels into matching soft targets."""
    lam = torch.rand(len(x), 1, 1, 1, generator=generators.on_device, device=x.device)
    lam = lam * float(generators.host.random())  # a host draw too
    mixed = lam * x.float() + (1 - lam) * x.float().roll(1, 0)
    onehot = torch.nn.functional.one_hot(y % 50, 50).float()
    soft = lam.view(-1, 1) * onehot + (1 - lam.view(-1, 1)) * onehot.roll(1, 0)
    return mixed, soft + epoch


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
