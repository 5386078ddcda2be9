"""CIFAR-100 and image folders: reading, formats and modes, the cache, splits, placement."""

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from cifar_files import dump_py3, learnable_images, write_cifar100, write_image_folder
from PIL import Image

from convnext_cifar import datasets, folders, images
from convnext_cifar import placement as place_module
from convnext_cifar.config import DataConfig
from convnext_cifar.datasets import CIFAR100, load_dataset
from convnext_cifar.errors import UserError
from convnext_cifar.images import read_image
from convnext_cifar.placement import DiskImages
from convnext_cifar.placement import choose as placement


def cfg(root, **kw):
    return dataclasses.replace(DataConfig(), root=root, download=False, **kw)


def folder_cfg(root, **kw):
    return cfg(root, dataset="folder", decode_processes=1, **kw)


# ---- CIFAR-100 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    write_cifar100(root, learnable_images(300, 0, 100), learnable_images(50, 1, 100))
    return root


def test_cifar100_fine_and_coarse_labels_and_names(cifar100_root):
    fine = load_dataset(cfg(cifar100_root, dataset="cifar100"))
    train, _ = learnable_images(300, 0, 100)
    assert fine.num_classes == 100 and fine.classes[7] == "fine_07"
    assert torch.equal(fine.train.images, torch.from_numpy(train))
    assert (fine.mean, fine.std) == (CIFAR100.mean, CIFAR100.std)  # CIFAR-100's own
    coarse = load_dataset(cfg(cifar100_root, dataset="cifar100", labels="coarse"))
    assert coarse.num_classes == 20 and coarse.classes[3] == "coarse_03"
    assert torch.equal(coarse.train.labels, fine.train.labels // 5)
    assert len(fine.notes) == 1 and "not byte-identical" in fine.notes[0]


def test_cifar100_download_checks_the_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar100(src, learnable_images(20, 0, 100), learnable_images(5, 1, 100))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    blob, urls = buf.getvalue(), []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: urls.append(url) or io.BytesIO(blob))
    monkeypatch.setitem(datasets.DATASETS, "cifar100", dataclasses.replace(
        CIFAR100, archive_md5=hashlib.md5(blob).hexdigest()))
    data = load_dataset(dataclasses.replace(cfg(tmp_path / "dl", dataset="cifar100"),
                                            download=True))
    assert len(data.train.images) == 20
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train").unlink(), "missing"),
    (lambda d: (d / "test").write_bytes((d / "test").read_bytes()[:500]), "cannot read"),
    (lambda d: dump_py3({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]},
                        d / "train"), r"labels must be in \[0, 99\]"),
])
def test_damaged_cifar100_is_one_clear_error(tmp_path, damage, message):
    folder = write_cifar100(tmp_path, learnable_images(20, 0, 100), learnable_images(5, 1, 100))
    damage(folder)
    with pytest.raises(UserError, match=message):
        load_dataset(cfg(tmp_path, dataset="cifar100"))
    with pytest.raises(UserError, match="CIFAR-100 not found"):
        load_dataset(cfg(tmp_path / "elsewhere", dataset="cifar100"))


# ---- image files: every format and mode -----------------------------------------------------

def rgb_image(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) % 256], -1).astype(np.uint8)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name, save", [
    ("rgb.png", lambda a, p: Image.fromarray(a).save(p)),
    ("gray.png", lambda a, p: Image.fromarray(a).convert("L").save(p)),
    ("palette.png", lambda a, p: Image.fromarray(a).convert("P").save(p)),
    ("rgba.png", lambda a, p: Image.fromarray(a).convert("RGBA").save(p)),
    ("rgb.bmp", lambda a, p: Image.fromarray(a).save(p)),
    ("rgb.webp", lambda a, p: Image.fromarray(a).save(p, lossless=True)),
    ("rgb.gif", lambda a, p: Image.fromarray(a).convert("P").save(
        p, save_all=True, append_images=[Image.new("P", a.shape[1::-1])])),  # 2 frames
    ("rgb.jpg", lambda a, p: Image.fromarray(a).save(p, quality=95)),
    ("gray.jpeg", lambda a, p: Image.fromarray(a).convert("L").save(p)),
    ("cmyk.jpg", lambda a, p: Image.fromarray(a).convert("CMYK").save(p)),
])
def test_every_format_and_mode_becomes_rgb_like_pillow_reads_it(tmp_path, name, save):
    array = rgb_image()
    path = tmp_path / name
    save(array, path)
    with Image.open(path) as img:
        img.seek(0)
        want = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    got = images.decode_rgb(path)
    assert got.dtype == torch.uint8 and got.shape == (3, 30, 40)
    lossy = name.endswith((".jpg", ".jpeg"))  # decoders may differ by a level or two
    assert (got.int() - want.int()).abs().max() <= (3 if lossy else 0), name
    assert read_image(path, 32, "center-crop").shape == (3, 32, 32)


def test_resize_modes():
    wide = torch.zeros(3, 32, 64, dtype=torch.uint8)
    wide[:, :, :16] = 255  # a white band on the left quarter
    crop = images.resize(wide, 32, "center-crop")  # 32 x 64 -> keeps the middle 32 columns
    squash = images.resize(wide, 32, "squash")  # -> both sides to 32: the band is 8 wide
    assert crop.shape == squash.shape == (3, 32, 32)
    assert crop.float().mean() < 5 and 50 < squash.float().mean() < 80
    same = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(images.resize(same, 32, "center-crop"), same)


def png_claiming(width, height):
    """A tiny, valid-looking PNG whose header claims width x height pixels."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    import torchvision.io

    monkeypatch.setattr(torchvision.io, "decode_image",
                        lambda *a, **k: pytest.fail("decoded a bomb"))
    with pytest.raises(images.BadImage, match="100000 x 100000 pixels.*refused before decoding"):
        images.decode_rgb(bomb)


# ---- image folders ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    write_image_folder(root, {"train": {"cat": 12, "dog": 10, "eel": 8},
                              "val": {"cat": 4, "dog": 4, "eel": 3}})
    return root


def test_folder_reads_classes_labels_and_measures_mean_std(folder_root):
    data = load_dataset(folder_cfg(folder_root))
    assert data.classes == ["cat", "dog", "eel"]
    assert data.train.labels.tolist() == [0] * 12 + [1] * 10 + [2] * 8
    assert data.val.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 3
    with Image.open(folder_root / "train" / "dog" / "0003.png") as img:
        want = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert torch.equal(data.train.images[12 + 3], want)  # 32 x 32 PNG: stored as it is
    x = data.train.images.transpose(0, 1).reshape(3, -1).double()
    assert data.mean == pytest.approx(tuple(x.mean(1).tolist()))
    assert data.std == pytest.approx(tuple(x.std(1).tolist()))
    given = load_dataset(folder_cfg(folder_root, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0)))
    assert (given.mean, given.std) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


def test_folder_any_size_is_resized_and_test_is_an_alias_of_val(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}}, size=57,
                       suffix=".jpg")
    data = load_dataset(folder_cfg(tmp_path, image_size=40))
    assert data.train.images.shape == (6, 3, 40, 40) and len(data.val.images) == 4


def test_the_cache_hits_and_misses_when_a_file_changes(tmp_path, monkeypatch):
    write_image_folder(tmp_path, {"train": {"a": 5, "b": 5}, "val": {"a": 2, "b": 2}})
    first = load_dataset(folder_cfg(tmp_path))
    cache = sorted(p.name for p in (tmp_path / ".convnext-cifar-cache").iterdir())
    assert [n.split("-")[0] for n in cache] == ["train", "val"]
    calls = []
    real = folders.decode_chunks
    monkeypatch.setattr(folders, "decode_chunks", lambda *a, **k: calls.append(a) or real(*a, **k))
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


def test_val_fraction_holds_out_each_file_by_a_stable_hash_of_its_path(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 40, "b": 20, "c": 2}})
    with pytest.raises(UserError, match="no val/ or test/ folder.*--data.val-fraction"):
        load_dataset(folder_cfg(tmp_path))
    data = load_dataset(folder_cfg(tmp_path, val_fraction=0.25))
    held = set(data.val.files)
    assert len(held) + len(data.train.files) == 62 and not held & set(data.train.files)
    assert 8 <= len(held) <= 24  # about a quarter, drawn file by file
    assert all(n >= 1 for n in torch.bincount(data.val.labels, minlength=3).tolist())
    assert all(n >= 1 for n in torch.bincount(data.train.labels, minlength=3).tolist())
    again = load_dataset(folder_cfg(tmp_path, val_fraction=0.25))
    assert again.val.files == data.val.files  # the same seed, the same split
    assert set(load_dataset(folder_cfg(tmp_path, val_fraction=0.25, split_seed=1)).val.files
               ) != held
    # adding and removing images moves only those images
    (tmp_path / "train" / "a" / "0003.png").unlink()
    (tmp_path / "train" / "b" / "0004.png").unlink()
    for i in range(10):
        Image.new("RGB", (32, 32), (i, 9, 9)).save(tmp_path / "train" / "a" / f"new{i}.png")
    changed = load_dataset(folder_cfg(tmp_path, val_fraction=0.25))
    gone = {"train/a/0003.png", "train/b/0004.png"}
    added = {f"train/a/new{i}.png" for i in range(10)}
    assert set(changed.val.files) - added == held - gone
    assert set(changed.train.files) - added == set(data.train.files) - gone


@pytest.mark.parametrize("build, message", [
    (lambda r: (r / "train").mkdir(parents=True), "holds no class folders"),
    (lambda r: None, "has no train/ folder"),
    (lambda r: write_image_folder(r, {"x": {"cats": 1, "dogs": 1}}),  # ImageFolder layout
     r"holds class folders \(cats, dogs\) but no train/ folder; move them into .*/train/ and "
     r"hold out part of them with --data.val-fraction 0.1"),
    (lambda r: (write_image_folder(r, {"train": {"a": 2}, "val": {"a": 1}}),
                (r / "train" / "b").mkdir()), r"class folder .*train/b holds no images"),
    (lambda r: write_image_folder(r, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1}}),
     r"different classes \(only in train: b; only in val: c\)"),
    (lambda r: (write_image_folder(r, {"train": {"a": 2}, "val": {"a": 1}}),
                (r / "train" / "a" / "0001.png").write_bytes(b"not a png at all")),
     r"cannot read image .*train/a/0001.png: not a readable image"),
    (lambda r: (write_image_folder(r, {"train": {"a": 2}, "val": {"a": 1}}),
                (r / "train" / "a" / "big.png").write_bytes(png_claiming(100_000, 100_000))),
     r"cannot read image .*big.png: its header claims 100000 x 100000 pixels"),
])
def test_bad_folders_are_one_clear_error(tmp_path, build, message):
    build(tmp_path)
    root = tmp_path / "x" if (tmp_path / "x").is_dir() else tmp_path
    with pytest.raises(UserError, match=message):
        load_dataset(folder_cfg(root))
    assert not (root / ".convnext-cifar-cache").exists()  # nothing written


def test_skip_bad_images_leaves_them_out_and_says_how_many(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    (tmp_path / "train" / "a" / "0001.png").write_bytes(b"garbage")
    (tmp_path / "train" / "b" / "zz.png").write_bytes(png_claiming(100_000, 100_000))
    data = load_dataset(folder_cfg(tmp_path, skip_bad_images=True))
    assert data.train.labels.tolist() == [0, 0, 1, 1, 1]
    (note,) = data.notes
    assert "skipped 2 image(s)" in note and "0001.png" in note


def test_placement_keeps_what_fits_on_the_device_else_host_else_disk(monkeypatch, folder_root):
    gb = 2**30
    assert placement(1 * gb, 10 * gb, 10 * gb, 0.8, cpu=False) == "device"
    assert placement(9 * gb, 10 * gb, 64 * gb, 0.8, cpu=False) == "host"
    assert placement(9 * gb, 10 * gb, 64 * gb, 0.8, cpu=True) == ""  # no separate host memory
    assert placement(60 * gb, 10 * gb, 64 * gb, 0.8, cpu=False) == ""
    assert placement(60 * gb, 10 * gb, 64 * gb, 0.8, cpu=False, disk=True) == "disk"
    assert placement(1, 10 * gb, 64 * gb, 1e-12, cpu=False) == "host"  # a forced tiny share
    monkeypatch.setattr(place_module, "host_free_memory", lambda: 200_000)  # a forced small limit
    monkeypatch.setattr(place_module, "free_memory", lambda device: 200_000)
    data = load_dataset(folder_cfg(folder_root, image_size=64))  # a folder: stays on disk
    assert data.placement == "disk" and isinstance(data.train.images, DiskImages)
    assert "read from the decode cache on disk" in data.notes[-1]
    with pytest.raises(UserError) as e:
        load_dataset(folder_cfg(folder_root, image_size=64, placement="device"))
    message = str(e.value)
    assert "41 x 3 x 64 x 64 bytes" in message and "on cpu" in message
    # 64 * sqrt(0.8 * 200000 / (503808 + 41 * 8 label bytes))
    assert "use --data.placement auto, or --data.image-size 36 or less" in message
    monkeypatch.setattr(folders, "atomic_writer", _read_only)  # no cache: no disk tier
    monkeypatch.setattr(folders, "host_free_memory", lambda: 200_000)
    with pytest.raises(UserError, match=r"use a writable --data.cache-dir \(then train is read "
                       r"from disk\), or --data.image-size (\d+) or less"):
        load_dataset(folder_cfg(folder_root, image_size=80))
    with pytest.raises(UserError, match="no decode cache to read from"):
        load_dataset(folder_cfg(folder_root, image_size=40, placement="disk"))
    with pytest.raises(UserError, match="invalid --data.placement 'disk': CIFAR-10 is read"):
        cfg(folder_root, placement="disk")


def _read_only(path):
    raise PermissionError(13, "Read-only file system", str(path))


def test_folder_run_records_normalisation_and_eval_checks_the_classes(folder_root, tmp_path,
                                                                      capsys):
    from conftest import small_run_args

    from convnext_cifar import cli

    args = small_run_args(folder_root, tmp_path / "run", "--data.dataset", "folder",
                          "--sched.epochs", "2", "--data.batch-size", "10")
    assert cli.main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    data = load_dataset(folder_cfg(folder_root))
    assert config["data"]["mean"] == pytest.approx(list(data.mean))
    capsys.readouterr()
    best = str(tmp_path / "run" / "best.safetensors")
    assert cli.main(["eval", best, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 11
    other = write_image_folder(tmp_path / "other", {"train": {"cat": 2, "dog": 2, "eel": 2},
                                                     "val": {"cat": 2, "dog": 2, "eel": 2}}, seed=5)
    assert cli.main(["eval", best, "--data.root", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 6
    wrong = write_image_folder(tmp_path / "wrong", {"train": {"cat": 2, "fox": 2},
                                                     "val": {"cat": 2, "fox": 2}})
    assert cli.main(["eval", best, "--data.root", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "does not hold the classes" in err and "missing: dog, eel" in err
    assert "not trained on: fox" in err
