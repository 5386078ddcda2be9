"""Many runs, nothing lost: rollbacks, re-runs, changed data and hostile folders (issue 17).

Every case goes through the real command line (in-process `cli.main`, or a subprocess where a
process's memory or a second process matters).
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_files import write_image_folder
from conftest import signal_at_step, small_run_args
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

from convnext_cifar import cli, folders
from convnext_cifar.checkpoints import find_states, load_state

SHORT = ("--sched.epochs", "4", "--sched.warmup-epochs", "1", "--data.limit-train", "200",
         "--data.limit-val", "100", "--keep-last", "10", "--log-interval", "2")  # 4 steps/epoch


ONE_EPOCH = ("--sched.epochs", "1", "--sched.warmup-epochs", "0", "--data.limit-train", "100",
             "--data.limit-val", "50")


def records(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def folder_args(root, work, *extra):
    return small_run_args(root, work, "--data.dataset", "folder", "--data.batch-size", "10",
                          "--data.decode-processes", "1", "--sched.warmup-epochs", "0", *extra)


# ---- 1. a rollback keeps the resumed line ---------------------------------------------------

def test_resuming_an_older_state_sets_the_newer_line_aside(cifar_root, tmp_path, monkeypatch,
                                                           capsys):
    args = small_run_args(cifar_root, tmp_path, *SHORT)
    assert cli.main(args) == 0
    abandoned = records(tmp_path)
    assert [p.name for p in find_states(tmp_path)] == [
        "state_00000004.pt", "state_00000008.pt", "state_00000012.pt", "state_00000016.pt"]
    capsys.readouterr()
    # roll back to epoch 2 with another learning rate, and stop two steps later (SIGTERM)
    restore = signal_at_step(monkeypatch, 2)
    changed = ["--resume-allow-changes", "--optim.lr", "1e-3"]
    assert cli.main(args + ["--resume", str(tmp_path / "state_00000008.pt"), *changed]) == 143
    err = capsys.readouterr().err
    (aside,) = (tmp_path / "set-aside").iterdir()
    assert "not the newest state: set aside state_00000012.pt, state_00000016.pt" in err
    assert str(aside) in err
    moved = sorted(p.name for p in aside.iterdir())
    assert {"state_00000012.pt", "state_00000016.pt", "epoch_3.safetensors",
            "epoch_4.safetensors", "metrics.jsonl"} <= set(moved)
    assert [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()] \
        == [r for r in abandoned if r["epoch"] > 2]
    named = err.split("state saved to ")[1].split(".")[0] + ".pt"
    assert Path(named).exists() and Path(named).name == "state_00000010.pt"  # the file it names
    # the resumed line is now the run: auto continues it, and its states are kept
    restore()
    capsys.readouterr()
    assert cli.main(args + ["--resume", "auto", *changed]) == 0
    assert "resumed from " + named in capsys.readouterr().out
    newest = load_state(find_states(tmp_path)[-1])
    assert newest["components"]["run"]["step"] == 16
    assert json.loads(newest["config"])["optim"]["lr"] == 1e-3
    steps = [r["step"] for r in records(tmp_path) if "step" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16
    late = [r for r in records(tmp_path) if r["epoch"] > 2]
    assert late and late != [r for r in abandoned if r["epoch"] > 2]  # the new line's own
    assert (tmp_path / "best.safetensors").exists()


# ---- 3, 4. the dataset's identity and a stable held-out split --------------------------------

def test_resume_and_eval_refuse_other_data_but_not_a_moved_copy(tmp_path, capsys):
    data = write_image_folder(tmp_path / "pets", {"train": {"cat": 20, "dog": 20, "eel": 20}})
    work = tmp_path / "run"
    args = folder_args(data, work, "--data.val-fraction", "0.25", "--sched.epochs", "2")
    restore_args = args + ["--resume", "auto"]
    assert cli.main(args) == 0
    held = (work / "val_files.txt").read_text().splitlines()
    assert held and all(p.startswith("train/") for p in held)
    with safe_open(str(work / "best.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["dataset"])
    assert recorded["classes"] == ["cat", "dog", "eel"] and recorded["val"]
    # a moved but identical folder resumes and evaluates
    moved = shutil.copytree(data, tmp_path / "moved")
    moved_args = [a if a != str(data) else str(moved) for a in restore_args]
    assert cli.main(moved_args) == 0  # resumes at its end: nothing left to train
    capsys.readouterr()
    assert cli.main(["eval", str(work / "best.safetensors"), "--data.root", str(moved),
                     "--json"]) == 0
    assert "other images" not in capsys.readouterr().err
    # a renamed class: resume refuses, naming the difference
    (data / "train" / "eel").rename(data / "train" / "fox")
    assert cli.main(restore_args) == 2
    err = capsys.readouterr().err
    assert "is not the data the run trained on (classes missing: eel; classes not in the " \
           "run: fox)" in err
    (data / "train" / "fox").rename(data / "train" / "eel")
    # added images: another file list; resume refuses, eval of the run's own root refuses
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 9, 0, 0)).save(data / "train" / "dog" / f"new{i}.png")
    assert cli.main(restore_args) == 2
    assert "the train files (fingerprint" in capsys.readouterr().err
    before = sorted(p.name for p in work.iterdir())
    assert cli.main(["eval", str(work / "best.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no longer holds the held-out images" in err and "--data.root" in err
    assert sorted(p.name for p in work.iterdir()) == before
    # ... unless named: then it says the numbers are for these images
    assert cli.main(["eval", str(work / "best.safetensors"), "--data.root", str(data)]) in (0,)
    assert "holds other images than the run's held-out split" in capsys.readouterr().err
    # the new images moved only themselves between the splits
    other = tmp_path / "run2"
    assert cli.main([a if a != str(work) else str(other) for a in args]) == 0
    now = (other / "val_files.txt").read_text().splitlines()
    assert [p for p in now if "/new" not in p] == held


def test_eval_of_a_folder_run_needs_only_its_held_out_split(tmp_path, capsys):
    data = write_image_folder(tmp_path / "pets", {"train": {"a": 10, "b": 10},
                                                  "val": {"a": 4, "b": 4}})
    work = tmp_path / "run"
    assert cli.main(folder_args(data, work, "--sched.epochs", "1")) == 0
    shutil.rmtree(data / "train")
    capsys.readouterr()
    assert cli.main(["eval", str(work / "best.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 8


# ---- 5, 6. hostile files and folders --------------------------------------------------------

def animated_gif(width, height, frames):
    """A GIF whose canvas is width x height with `frames` 1x1 frames: a few kB on disk, and
    width x height x 3 bytes per frame once every frame is expanded."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0))
    out += bytes([0, 0, 0, 255, 255, 255]) + b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for i in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00\x2c" + struct.pack("<HHHH", i % width, 0, 1, 1)
        out += b"\x00\x02\x02\x44\x01\x00"
    return bytes(out + b"\x3b")


@pytest.mark.slow  # ~9 s: a subprocess expanding a 2000 x 2000 frame
def test_an_animated_gif_is_read_by_its_first_frame_only(tmp_path):
    gif = tmp_path / "bomb.gif"
    gif.write_bytes(animated_gif(2000, 2000, 500))  # 6 GB once expanded
    assert gif.stat().st_size < 20_000
    code = ("import resource, sys; from pathlib import Path; from convnext_cifar.images import "
            "read_image, decode_rgb; before = resource.getrusage(resource.RUSAGE_SELF)"
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
    from convnext_cifar.config import DataConfig
    from convnext_cifar.datasets import load_dataset

    loaded = load_dataset(DataConfig(dataset="folder", root=data, decode_processes=1))
    files = list(zip(loaded.train.files, loaded.train.labels.tolist()))
    assert len(files) == 6 + 6 + 3 and len({f for f, _ in files}) == len(files)
    assert all(label == 0 for f, label in files if f.startswith("train/a/"))
    assert sorted(f for f, label in files if label == 1 and "extra" in f) == [
        f"train/b/extra/{i:04d}.png" for i in range(3)]


# ---- 7. devices -----------------------------------------------------------------------------

def test_eval_and_predict_fall_back_from_a_recorded_device_that_is_not_here(cifar_root,
                                                                            tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *ONE_EPOCH)) == 0
    with safe_open(str(work / "best.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config["device"] = "cuda:1"
    gpu = tmp_path / "gpu.safetensors"
    gpu.write_bytes(save(tensors, metadata={**meta, "config": json.dumps(config)}))
    capsys.readouterr()
    assert cli.main(["eval", str(gpu), "--json"]) == 0
    out = capsys.readouterr()
    assert "was trained on cuda:1, which is not here" in out.err
    assert json.loads(out.out)["top1"] == json.loads(meta["metrics"])["top1"]
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    assert cli.main(["predict", str(gpu), str(image), "--json"]) == 0
    assert "not here" in capsys.readouterr().err


# ---- 8. runs reads only runs, and never takes a lock ----------------------------------------

def test_runs_passes_over_what_is_not_a_run(cifar_root, tmp_path, monkeypatch, capsys):
    real = tmp_path / "work_dirs" / "real"
    assert cli.main(small_run_args(cifar_root, real, *ONE_EPOCH)) == 0
    for name, text in (("foreign", '{"foo": 1}'), ("a_list", "[1, 2]"), ("broken", "{"),
                       ("half", '{"model": "x", "data": {}, "optim": {}, "sched": {}}')):
        (tmp_path / "work_dirs" / name).mkdir()
        (tmp_path / "work_dirs" / name / "config.json").write_text(text)
    (real / "status.json").write_text('["not", "a", "status"]')
    with open(real / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"epoch": "x", "top1": "y"}\n')
    locked = tmp_path / "work_dirs" / "locked"
    locked.mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    import fcntl

    taken = []
    real_fcntl, real_flock = fcntl.fcntl, fcntl.flock
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, *a: taken.append(cmd) if cmd in (
        getattr(fcntl, "F_OFD_SETLK", -1), fcntl.F_SETLK) else None or real_fcntl(fd, cmd, *a))
    monkeypatch.setattr(fcntl, "flock", lambda *a: taken.append("flock") or real_flock(*a))
    capsys.readouterr()
    assert cli.main(["runs", str(tmp_path / "work_dirs"), "--json"]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)["runs"]
    assert [Path(r["work_dir"]).name for r in rows] == ["real"] and out.err == ""
    assert rows[0]["status"] == "interrupted" or rows[0]["status"] == "not started"
    assert taken == []  # looked at the lock without taking it


# ---- 10. predict streams; export shares no local path and splits its weights when large -------

def test_predict_reads_predicts_and_prints_batch_by_batch(cifar_root, tmp_path, monkeypatch,
                                                         capsys):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *ONE_EPOCH)) == 0
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(30):
        Image.new("RGB", (32, 32), (i * 8, 100, 50)).save(pics / f"{i:02d}.png")
    from convnext_cifar import predict

    events, real = [], predict.decode_chunks

    def decode(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            events.append(("decoded", len(chunk[1])))
            yield chunk

    monkeypatch.setattr(predict, "decode_chunks", decode)
    real_print = print

    def spy_print(*args, **kwargs):
        if kwargs.get("file") is None:
            events.append(("printed", 1))
        real_print(*args, **kwargs)

    monkeypatch.setattr("builtins.print", spy_print)
    capsys.readouterr()
    assert cli.main(["predict", str(work / "best.safetensors"), str(pics), "--json",
                     "--batch-size", "8"]) == 0
    monkeypatch.undo()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 30
    assert [n for kind, n in events if kind == "decoded"] == [8, 8, 8, 6]
    assert events.index(("printed", 1)) < events.index(("decoded", 6))  # before the last batch


@pytest.mark.slow
def test_onnx_export_splits_large_weights_and_names_no_local_path(cifar_root, tmp_path,
                                                                  monkeypatch):
    import onnx
    import onnxruntime

    from convnext_cifar import export

    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *ONE_EPOCH)) == 0
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)  # as if the weights passed 2 GB
    out = tmp_path / "shared" / "model.onnx"
    out.parent.mkdir()
    assert cli.main(["export", str(work / "best.safetensors"), str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    data = out.parent / "model.onnx.data"
    assert out.stat().st_size < 1_000_000 < 10 * 2**20 < data.stat().st_size
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(meta["checkpoint"]) == "best.safetensors"
    assert not any(str(tmp_path) in value for value in meta.values())
    x = torch.randn(3, 3, 32, 32)
    got = onnxruntime.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0]
    from convnext_cifar.evaluate import load_model

    with torch.inference_mode():
        want = load_model(work / "best.safetensors").model(x).float()
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


# ---- 11. the decode cache -------------------------------------------------------------------

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
            "from convnext_cifar.datasets import load_dataset; import torch, torchvision.io; "
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


def test_a_replaced_file_is_a_cache_miss_even_with_its_size_and_mtime(tmp_path):
    from convnext_cifar.config import DataConfig
    from convnext_cifar.datasets import load_dataset

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
    from convnext_cifar.config import DataConfig
    from convnext_cifar.datasets import load_dataset

    data = write_image_folder(tmp_path / "d", {"train": {"a": 3}, "val": {"a": 1}})
    cache = data / folders.FOLDER_CACHE
    cache.mkdir()
    host = socket.gethostname().replace(".", "_")
    dead = cache / f".train-x.safetensors.{host}.{2**22 + 12345}.abcdef.tmp"
    live = cache / f".train-y.safetensors.{host}.{os.getpid()}.abcdef.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"being written")
    load_dataset(DataConfig(dataset="folder", root=data, decode_processes=1))
    assert not dead.exists() and live.exists()


@pytest.mark.slow
def test_two_runs_filling_and_pruning_one_cache_both_finish(tmp_path):
    data = write_image_folder(tmp_path / "d", {"train": {"a": 40, "b": 40}, "val": {"a": 5,
                                                                                    "b": 5}})
    code = ("import sys; from pathlib import Path; from convnext_cifar.config import "
            "DataConfig; from convnext_cifar.datasets import load_dataset\n"
            "for size in (32, 36, 40, 44, 48, 52):\n"
            "    load_dataset(DataConfig(dataset='folder', root=Path(sys.argv[1]), "
            "image_size=size, decode_processes=1))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data)], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    entries = list((data / folders.FOLDER_CACHE).glob("train-*.safetensors"))
    assert len(entries) == folders.KEEP_CACHES


def test_a_read_only_dataset_caches_in_the_cache_dir(tmp_path, monkeypatch, capsys):
    data = write_image_folder(tmp_path / "d", {"train": {"a": 5, "b": 5}, "val": {"a": 2,
                                                                                 "b": 2}})
    real_writer = folders.atomic_writer

    def read_only(path):
        if str(path).startswith(str(data)):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_writer(path)

    monkeypatch.setattr(folders, "atomic_writer", read_only)
    work = tmp_path / "run"
    assert cli.main(folder_args(data, work, "--sched.epochs", "1")) == 0
    assert "could not cache the decoded images" in capsys.readouterr().err
    cache = tmp_path / "cache"
    assert cli.main(folder_args(data, tmp_path / "run2", "--sched.epochs", "1",
                                "--data.cache-dir", str(cache))) == 0
    assert "could not cache" not in capsys.readouterr().err
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not (data / folders.FOLDER_CACHE).exists() or not list(
        (data / folders.FOLDER_CACHE).iterdir())
    # the cache folder is a resumable change, as are the decode workers and the memory share
    assert cli.main(folder_args(data, tmp_path / "run2", "--sched.epochs", "1", "--resume",
                                "auto", "--data.decode-processes", "2",
                                "--data.memory-share", "0.5")) == 0


def test_pillows_own_pixel_limit_stays_on(tmp_path):
    from PIL import Image as PILImage

    from convnext_cifar.images import image_size, read_image

    before = PILImage.MAX_IMAGE_PIXELS
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    assert image_size(tmp_path / "x.png") == (40, 30)
    read_image(tmp_path / "x.png", 32, "squash")
    assert PILImage.MAX_IMAGE_PIXELS == before is not None
