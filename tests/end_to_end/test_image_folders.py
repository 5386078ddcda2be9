"""End to end: image folders as users have them: formats, links, EXIF, animated GIFs, the decode
cache (streamed, shared, read-only data)."""

import csv
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from cifar_files import write_image_folder
from PIL import Image
from support import decoded_cache, folder_args, folder_cfg, save_sideways, small_run_args

from convnext_cifar import cli
from convnext_cifar.config import DataConfig
from convnext_cifar.data import cache as data_cache
from convnext_cifar.data.images import decode_rgb
from convnext_cifar.data.kinds import load_dataset


def animated_gif(width, height, frames):
    """A GIF whose canvas is width x height with `frames` 1x1 frames: a few kB on disk, and
    width x height x 3 bytes per frame once every frame is expanded."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0))
    out += bytes([0, 0, 0, 255, 255, 255]) + b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for i in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00\x2c" + struct.pack("<HHHH", i % width, 0, 1, 1)
        out += b"\x00\x02\x02\x44\x01\x00"
    return bytes(out + b"\x3b")


def test_folder_run_records_normalisation_and_eval_checks_the_classes(folder_root, tmp_path,
                                                                      capsys):
    from support import small_run_args

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


def test_training_eval_and_predict_read_a_photo_upright(tmp_path, capsys):
    from cifar_files import write_image_folder

    root = write_image_folder(tmp_path / "photos", {"train": {"a": 20, "b": 20},
                                                    "val": {"a": 5, "b": 5}})
    upright = np.asarray(Image.open(root / "val" / "a" / "0000.png").convert("RGB"))
    (root / "val" / "a" / "0000.png").unlink()
    save_sideways(root / "val" / "a" / "0000.png", upright)  # the same picture, stored sideways
    Image.fromarray(upright).save(tmp_path / "upright.png")
    from convnext_cifar.data.kinds import load_dataset

    data = load_dataset(DataConfig(dataset="folder", root=root, decode_processes=1))
    index = data.val.labels.tolist().index(0)  # the first image of class a
    assert (data.val.images[index] == decode_rgb(tmp_path / "upright.png")).all()
    work = tmp_path / "run"
    assert cli.main(small_run_args(root, work, "--data.dataset", "folder", "--sched.epochs", "1",
                                   "--sched.warmup-epochs", "0", "--data.batch-size", "10",
                                   "--data.decode-processes", "1")) == 0
    capsys.readouterr()
    assert cli.main(["predict", str(work / "best.safetensors"), str(root / "val" / "a" /
                                                                   "0000.png"),
                     str(tmp_path / "upright.png"), "--json"]) == 0
    first, second = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert first["top_k"] == second["top_k"]
    assert len(first["top_k"]) == 2  # the default top-5 of a 2-class model: both classes


@pytest.mark.slow  # ~9 s: a subprocess expanding a 2000 x 2000 frame
def test_an_animated_gif_is_read_by_its_first_frame_only(tmp_path):
    gif = tmp_path / "bomb.gif"
    gif.write_bytes(animated_gif(2000, 2000, 500))  # 6 GB once expanded
    assert gif.stat().st_size < 20_000
    code = ("import resource, sys; from pathlib import Path; from convnext_cifar.data.images "
            "import read_image, decode_rgb; before = resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss; img = decode_rgb(Path(sys.argv[1])); small = read_image(Path("
            "sys.argv[1]), 32, 'squash'); print(tuple(img.shape), tuple(small.shape), "
            "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(gif)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(3, 2000, 2000) (3, 32, 32)")
    assert int(out.stdout.split()[-1]) < 500  # MB: one frame (12 MB) and its resize, not 500


def test_links_in_a_folder_never_loop_nor_cross_classes(tmp_path, capsys):
    data = write_image_folder(tmp_path / "d", {"train": {"a": 6, "b": 6}, "val": {"a": 2,
                                                                                 "b": 2}})
    os.symlink(data / "train" / "a", data / "train" / "a" / "loop")  # a folder inside itself
    os.symlink(data / "train" / "a", data / "train" / "b" / "borrowed")  # a's images under b
    os.symlink(data / "train" / "a" / "0000.png", data / "train" / "b" / "one.png")
    os.symlink(tmp_path / "nowhere", data / "train" / "b" / "dangling.png")
    outside = write_image_folder(tmp_path / "more", {"x": {"b": 3}})
    os.symlink(outside / "x" / "b", data / "train" / "b" / "extra")  # a linked folder: kept
    work = tmp_path / "run"
    assert cli.main(folder_args(data, work, "--sched.epochs", "1")) == 0
    err = capsys.readouterr().err
    assert "left out 4 link(s)" in err and "Traceback" not in err
    from convnext_cifar.data.kinds import load_dataset

    loaded = load_dataset(DataConfig(dataset="folder", root=data, decode_processes=1))
    files = list(zip(loaded.train.files, loaded.train.labels.tolist()))
    assert len(files) == 6 + 6 + 3 and len({f for f, _ in files}) == len(files)
    assert all(label == 0 for f, label in files if f.startswith("train/a/"))
    assert sorted(f for f, label in files if label == 1 and "extra" in f) == [
        f"train/b/extra/{i:04d}.png" for i in range(3)]


@pytest.mark.slow  # writes and decodes 600 images of 160 px in a subprocess: ~11 s
def test_the_cache_is_streamed_and_takes_one_copy_of_memory(tmp_path):
    count, size = 600, 160  # 46 MB decoded
    folder = tmp_path / "big" / "train" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for i in range(count):
        Image.fromarray(np.roll(tile, i, axis=0)).save(folder / f"{i:04d}.bmp")
    code = ("import resource, sys; from pathlib import Path; "
            "from convnext_cifar.config import DataConfig; "
            "from convnext_cifar.data.kinds import load_dataset; import torch, torchvision.io; "
            "from torchvision.transforms.v2 import functional; import PIL.Image; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"d = load_dataset(DataConfig(dataset='folder', root=Path(sys.argv[1]), "
            f"image_size={size}, val_fraction=0.1, decode_processes=2, "
            "placement=sys.argv[2])); "
            "print(len(d.train) + len(d.val), "
            "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    decoded = count * 3 * size * size
    for placement in ("disk", "device"):  # decode into the cache; then a hit, read into memory
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big"), placement],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        images, grew = (int(v) for v in out.stdout.split())
        assert images == count
        if placement == "disk":  # written a few chunks at a time (~20 MB here), left on disk
            assert "decoding" in out.stderr and grew < 0.75 * decoded, (grew, decoded)
        else:  # one copy (the cache used to be held twice more while written: 2.8x)
            assert "decoding" not in out.stderr and grew < 1.2 * decoded + 24 * 2**20, (
                grew, decoded)


@pytest.mark.slow
def test_two_runs_filling_and_pruning_one_cache_both_finish(tmp_path):
    data = write_image_folder(tmp_path / "d", {"train": {"a": 40, "b": 40}, "val": {"a": 5,
                                                                                    "b": 5}})
    code = ("import sys; from pathlib import Path; from convnext_cifar.config import "
            "DataConfig; from convnext_cifar.data.kinds import load_dataset\n"
            "for size in (32, 36, 40, 44, 48, 52):\n"
            "    load_dataset(DataConfig(dataset='folder', root=Path(sys.argv[1]), "
            "image_size=size, decode_processes=1))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data)], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    entries = list(decoded_cache().glob("train-*.safetensors"))
    assert len(entries) == data_cache.KEEP_CACHES


def test_a_read_only_dataset_caches_in_the_cache_dir(tmp_path, monkeypatch, capsys):
    data = write_image_folder(tmp_path / "d", {"train": {"a": 5, "b": 5}, "val": {"a": 2,
                                                                                 "b": 2}})
    real_writer = data_cache.atomic_writer

    def read_only(path):
        if str(path).startswith(str(data)):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_writer(path)

    monkeypatch.setattr(data_cache, "atomic_writer", read_only)
    work = tmp_path / "run"
    assert cli.main(folder_args(data, work, "--sched.epochs", "1")) == 0
    assert "could not cache" not in capsys.readouterr().err  # the user's cache: not the data's
    assert len(list(decoded_cache().glob("*.safetensors"))) == 2
    cache = tmp_path / "cache"
    assert cli.main(folder_args(data, tmp_path / "run2", "--sched.epochs", "1",
                                "--data.cache-dir", str(cache))) == 0
    assert "could not cache" not in capsys.readouterr().err
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not (data / data_cache.FOLDER_CACHE).exists() or not list(
        (data / data_cache.FOLDER_CACHE).iterdir())
    # the cache folder is a resumable change, as are the decode workers and the memory share
    assert cli.main(folder_args(data, tmp_path / "run2", "--sched.epochs", "1", "--resume",
                                "auto", "--data.decode-processes", "2",
                                "--data.memory-share", "0.5")) == 0


LATIN = os.fsdecode(b"caf\xe9")  # a class folder from a Windows zip: its name is not UTF-8


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    """Class folders and files named as other systems name them: markup, formula, Latin-1,
    tab and newline in names."""
    root = tmp_path_factory.mktemp("odd") / "data"
    write_image_folder(root, {"train": {"[draft]": 6, "=dog": 6, LATIN: 6},
                              "val": {"[draft]": 2, "=dog": 2, LATIN: 2}})
    val = root / "val" / "[draft]"
    (val / "0000.png").rename(val / "=1+1.png")
    (val / "x[").mkdir()  # the path .../x[/]y.png holds rich's closing tag [/]
    (val / "0001.png").rename(val / "x[" / "]y.png")
    (root / "val" / "=dog" / "0000.png").rename(root / "val" / "=dog" / "tab\there.png")
    (root / "val" / "=dog" / "0001.png").rename(root / "val" / "=dog" / "new\nline.png")
    (root / "val" / LATIN / "0000.png").rename(root / "val" / LATIN / os.fsdecode(b"\xff.png"))
    return root


def test_names_from_other_systems_train_evaluate_and_predict_losslessly(odd_names, tmp_path,
                                                                       capsys, monkeypatch):
    """Latin-1 names stopped `train` with a UnicodeEncodeError; `[draft]` vanished from tables
    and `x[/]y.png` crashed predict's; `=1+1.png` became a formula in the CSV; a tab or newline
    in a name made the tab-separated output and val_files.txt ambiguous."""
    work = tmp_path / "run"
    assert cli.main(folder_args(odd_names, work, "--sched.epochs", "1",
                                "--data.batch-size", "6")) == 0
    lines = (work / "val_files.txt").read_bytes().split(b"\n")
    assert b"val/=dog/tab\\there.png" in lines and b"val/=dog/new\\nline.png" in lines
    assert b"val/caf\xe9/\xff.png" in lines  # the bytes as the file system has them
    capsys.readouterr()
    assert cli.main(["eval", str(work / "best.safetensors"), "--compile", "off"]) == 0
    assert "[draft]" in capsys.readouterr().out  # shown, not read as rich markup
    out_csv = tmp_path / "p.csv"
    assert cli.main(["predict", str(work / "best.safetensors"), str(odd_names / "val"),
                     "--csv", str(out_csv), "--top-k", "1"]) == 0
    rows = list(csv.reader(out_csv.read_bytes().decode("utf-8", "surrogateescape").splitlines()))
    paths = [r[0] for r in rows[1:]]
    assert f"'{odd_names}/val/=dog/tab\there.png" not in paths  # "'" only where a cell starts so
    assert any(p.endswith("/=1+1.png") for p in paths) and all(not c.startswith("=")
                                                                for r in rows for c in r)
    assert {r[1] for r in rows[1:]} <= {"[draft]", "'=dog", LATIN}
    capsys.readouterr()
    assert cli.main(["predict", str(work / "best.safetensors"), str(odd_names / "val")]) == 0
    tsv = capsys.readouterr().out.splitlines()
    assert len(tsv) == 6 and any(x.startswith(f"{odd_names}/val/=dog/tab\\there.png\t")
                                 for x in tsv)
    monkeypatch.setattr("convnext_cifar.outputs.console.is_terminal", lambda stream: True)
    monkeypatch.setenv("COLUMNS", "400")  # no path wrapped in its cell
    assert cli.main(["predict", str(work / "best.safetensors"), str(odd_names / "val")]) == 0
    table = capsys.readouterr().out  # the path's [/] was read as a closing tag, and raised
    assert "]y.png" in table and "[draft]" in table


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"__metadata__": 5}', b"\xff" * 40])
def test_a_damaged_cache_header_is_decoded_again(tmp_path, capsys, header):
    """A header that is JSON of another shape raised AttributeError instead of a cache miss."""
    data = write_image_folder(tmp_path / "d", {"train": {"a": 6, "b": 6}, "val": {"a": 2,
                                                                                 "b": 2}})
    args = ("--sched.epochs", "1", "--data.batch-size", "4")
    assert cli.main(folder_args(data, tmp_path / "one", *args)) == 0
    for entry in decoded_cache().glob("*.safetensors"):
        entry.write_bytes(len(header).to_bytes(8, "little") + header + entry.read_bytes()[8:])
    capsys.readouterr()
    assert cli.main(folder_args(data, tmp_path / "two", *args)) == 0
    assert "decoding 12 images of" in capsys.readouterr().err  # a miss: decoded again


def test_disk_placement_without_a_writable_cache_dir_is_one_line(tmp_path, capsys):
    data = write_image_folder(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 2,
                                                                                 "b": 2}})
    (tmp_path / "afile").write_text("not a folder")
    assert cli.main(folder_args(data, tmp_path / "run", "--data.placement", "disk",
                                "--data.cache-dir", str(tmp_path / "afile" / "cache"))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("convnext-cifar: error: invalid --data.placement 'disk': these images "
                          "have no decode cache to read from")


@pytest.mark.parametrize("layout", ["class folders at the root", "train and validation"])
def test_the_layouts_other_tools_read_train_and_evaluate(tmp_path, capsys, layout):
    if layout == "class folders at the root":  # torchvision's ImageFolder
        data = write_image_folder(tmp_path / "d", {"x": {"cat": 12, "dog": 12}}) / "x"
        extra = ("--data.val-fraction", "0.25")
    else:  # timm's split name
        data = write_image_folder(tmp_path / "d", {"train": {"cat": 9, "dog": 9},
                                                  "validation": {"cat": 3, "dog": 3}})
        extra = ()
    work = tmp_path / "run"
    assert cli.main(folder_args(data, work, "--sched.epochs", "1", *extra)) == 0
    held = (work / "val_files.txt").read_text().split()
    assert held and all(p.startswith("validation/") for p in held) == (not extra)
    capsys.readouterr()
    assert cli.main(["eval", str(work), "--json", "--compile", "off"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == len(held)
    assert not (data / ".convnext-cifar-cache").exists()  # the user's cache holds the decoded
