"""data/folders.py: class folders read with their labels, any image size, the held-out split by
a stable hash, bad folders and unreadable images."""


import numpy as np
import pytest
import torch
from cifar_files import write_image_folder
from PIL import Image
from support import folder_cfg, png_claiming

from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.errors import UserError


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


def test_val_fraction_holds_out_each_file_by_a_stable_hash_of_its_path(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 40, "b": 20, "c": 2}})
    with pytest.raises(UserError, match="no val/, validation/ or test/ folder.*--data.val-fr"):
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
     r"holds class folders \(cats, dogs\) and no held-out split; hold out part of them with "
     r"--data.val-fraction 0.1"),
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


def test_class_folders_at_the_root_hold_out_a_stable_share(tmp_path):
    """torchvision's ImageFolder layout, root/<class>/<image>: with --data.val-fraction it
    trains (it was refused), and adding images moves only those between the splits."""
    write_image_folder(tmp_path / "x", {"y": {"cat": 30, "dog": 30}})
    root = tmp_path / "x" / "y"
    data = load_dataset(folder_cfg(root, val_fraction=0.2))
    assert data.classes == ["cat", "dog"] and all(f.split("/")[0] in data.classes
                                                  for f in data.val.files)
    assert len(data.val.files) + len(data.train.files) == 60
    write_image_folder(tmp_path / "more", {"y": {"cat": 40}}, seed=9)  # 10 new cats
    for i in range(30, 40):
        (tmp_path / "more" / "y" / "cat" / f"{i:04d}.png").rename(root / "cat" / f"{i:04d}.png")
    grown = load_dataset(folder_cfg(root, val_fraction=0.2))
    new = {f"cat/{i:04d}.png" for i in range(30, 40)}
    assert set(grown.val.files) - new == set(data.val.files)  # the old files stay where they were
    assert set(grown.train.files) - new == set(data.train.files)


def test_timms_validation_folder_is_the_held_out_split(tmp_path):
    write_image_folder(tmp_path, {"train": {"a": 4, "b": 4}, "validation": {"a": 2, "b": 1}})
    data = load_dataset(folder_cfg(tmp_path))
    assert sorted(data.val.files) == ["validation/a/0000.png", "validation/a/0001.png",
                                      "validation/b/0000.png"]
