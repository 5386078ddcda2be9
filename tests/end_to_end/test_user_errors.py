"""End to end: every mistake a user can make is one line, exit code 2, and loses nothing."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cifar_files import dump_py3, learnable_images, write_cifar100, write_image_folder
from safetensors.torch import save
from support import png_claiming, run_cli, small_run_args

from convnext_cifar import cli
from convnext_cifar.model import build as model_build
from convnext_cifar.outputs.workdir import find_states


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished(cifar_root, tmp_path_factory):
    """A finished run: its files are the 'existing checkpoints' no case may touch."""
    work = tmp_path_factory.mktemp("finished")
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "2", "--sched.warmup-epochs",
                                   "0", "--data.limit-train", "100", "--data.limit-val", "50")) == 0
    return work


def damaged_data(root, tmp, damage):
    copy = tmp / "data"
    shutil.copytree(root, copy)
    damage(copy / "cifar-10-batches-py")
    return copy


def _write(path, data):
    path.write_bytes(data)
    return path


def _femto_with_our_metadata(finished, tmp, name="convnextv2_femto", classes=10):
    from safetensors import safe_open

    with safe_open(str(finished / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    torch.manual_seed(0)
    sd = timm.create_model(name, num_classes=classes).state_dict()
    return _write(tmp / "other.safetensors", save({k: v.contiguous() for k, v in sd.items()},
                                                  metadata=meta))


def _with_metadata(finished, tmp, **changes):
    """best.safetensors with some metadata values replaced (still our format)."""
    from safetensors import safe_open

    with safe_open(str(finished / "best.safetensors"), "pt") as f:
        meta, tensors = {**f.metadata(), **changes}, {k: f.get_tensor(k) for k in f.keys()}
    return _write(tmp / "edited.safetensors", save(tensors, metadata=meta))


def _config_of(finished, **data):
    """The finished run's config as metadata JSON, with `data` options changed."""
    config = json.loads((finished / "config.json").read_text())
    config["data"].update(data)
    return json.dumps(config)


def _png(tmp):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp / "one.png")
    return tmp / "one.png"


def _deflated(tmp, obj):
    """`obj` saved by torch, its archive then re-packed with deflate (~1000:1 for zeros)."""
    import zipfile

    plain = _pth(tmp, obj, "plain.pth")
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(tmp / "bomb.pth", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return tmp / "bomb.pth"


def _state_without(finished, tmp, component, key):
    state = torch.load(find_states(finished)[-1], weights_only=True)
    del state["components"][component][key]
    return _pth(tmp, state, "state_00000099.pt")


def _state_with_config(finished, tmp, config):
    state = torch.load(find_states(finished)[-1], weights_only=True)
    state["config"] = config
    return _pth(tmp, state, "state_00000099.pt")


def _pth(tmp, obj, name="w.pth"):
    torch.save(obj, tmp / name)
    return tmp / name


def _cifar100(tmp, damage):
    write_cifar100(tmp / "c100", learnable_images(10, 0, 100), learnable_images(5, 1, 100))
    damage(tmp / "c100" / "cifar-100-python")
    return tmp / "c100"


def _folder(tmp, damage):
    write_image_folder(tmp / "pics", {"train": {"a": 2}, "val": {"a": 2}})
    damage(tmp / "pics")
    return ["--data.dataset", "folder", "--data.root", str(tmp / "pics")]


CASES = {
    "missing dataset, no download": (
        lambda c: ["--data.root", str(c.tmp / "nowhere")], "CIFAR-10 not found"),
    "missing batch file": (
        lambda c: ["--data.root", str(damaged_data(c.root, c.tmp, lambda d: (
            d / "data_batch_3").unlink()))], "missing"),
    "truncated batch file": (
        lambda c: ["--data.root", str(damaged_data(c.root, c.tmp, lambda d: (
            d / "data_batch_2").write_bytes((d / "data_batch_2").read_bytes()[:999])))],
        "cannot read"),
    "wrongly shaped batch file": (
        lambda c: ["--data.root", str(damaged_data(c.root, c.tmp, lambda d: dump_py3(
            {"data": np.zeros((5, 1024), np.uint8), "labels": [0] * 5}, d / "test_batch")))],
        "expected uint8 (N, 3072)"),
    "labels out of range": (
        lambda c: ["--data.root", str(damaged_data(c.root, c.tmp, lambda d: dump_py3(
            {"data": np.zeros((2, 3072), np.uint8), "labels": [3, 12]}, d / "data_batch_1")))],
        "labels must be in [0, 9]"),
    "eval: no such checkpoint": (
        lambda c: ["eval", str(c.tmp / "best.safetensors")], "does not exist"),
    "eval: a directory": (lambda c: ["eval", str(c.tmp)], "is a directory"),  # not a run's
    "eval: empty file": (
        lambda c: ["eval", str(_write(c.tmp / "e.safetensors", b""))], "is empty"),
    "eval: truncated checkpoint": (
        lambda c: ["eval", str(_write(c.tmp / "t.safetensors", (
            c.finished / "best.safetensors").read_bytes()[:20000]))],
        "not a readable safetensors checkpoint"),
    "eval: not a checkpoint": (
        lambda c: ["eval", str(_write(c.tmp / "notes.safetensors", b"hello " * 100))],
        "not a readable safetensors checkpoint"),
    "eval: weights of another tool": (
        lambda c: ["eval", str(_write(c.tmp / "timm.safetensors", save(
            {"w": torch.zeros(2)})))], "was not written by convnext-cifar"),
    "eval: another architecture": (
        lambda c: ["eval", str(_femto_with_our_metadata(c.finished, c.tmp))],
        "does not match the model its metadata describes"),
    "eval: another class count": (
        lambda c: ["eval", str(_femto_with_our_metadata(c.finished, c.tmp, "convnextv2_atto",
                                                        100))],
        "field classes names 10 classes but the weights' head has 100"),
    "eval: metadata of the wrong type": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, classes='"10"'))],
        "edited.safetensors has damaged metadata (field classes is '10', not a list"),
    "eval: metrics of the wrong type": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, metrics='{"top1": "x"}'))],
        "has damaged metadata (field metrics is"),
    # item 8 of issue 29: metadata is range-checked, each problem one line naming the field
    "eval: an image size no run has": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, config=_config_of(
            c.finished, image_size=4096)))],
        "(field config: invalid --data.image-size 4096: must be at most 1,024)"),
    "predict: an image size no run has": (  # predict of one image took 3.5 GB
        lambda c: ["predict", str(_with_metadata(c.finished, c.tmp, config=_config_of(
            c.finished, image_size=4096))), str(_png(c.tmp))],
        "(field config: invalid --data.image-size 4096: must be at most 1,024)"),
    "eval: metadata nested too deep": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, classes="[" * 5000 + "]" * 5000))],
        "(field classes nests deeper than 64 levels)"),
    "eval: metadata nested deeper than a config": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, dataset="[" * 70 + "]" * 70))],
        "(field dataset nests deeper than 64 levels (at"),
    "eval: a huge integer in metadata": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, metrics='{"top1": 1%s}' % (
            "0" * 30)))], "(field metrics: top1 is an integer of 31 digits"),
    "eval: an integer of thousands of digits": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, epoch="9" * 5000))],
        "(field epoch holds an integer of thousands of digits"),
    "eval: more class names than the head": (
        lambda c: ["eval", str(_with_metadata(c.finished, c.tmp, classes=json.dumps(
            [str(i) for i in range(500_000)])))], "not a list of at most 100,000 distinct"),
    "pretrained: a compressed archive (zip bomb)": (
        lambda c: ["--model.pretrained", str(_deflated(c.tmp, {"w": torch.zeros(2**23)}))],
        "declares 32 MB unpacked from 0.0 MB on disk (a compressed archive"),
    "pretrained: another architecture": (
        lambda c: ["--model.pretrained", str(_pth(c.tmp, {"state_dict": timm.create_model(
            "convnextv2_femto").state_dict()}))],
        "holds convnextv2_femto weights but --model.name is convnextv2_atto"),
    "pretrained: executable pickle": (
        lambda c: ["--model.pretrained", str(_pth(c.tmp, {"state_dict": {}, "x": Payload(
            c.tmp / "pwned")}))], "refused, nothing in it was run"),
    "pretrained: truncated": (
        lambda c: ["--model.pretrained", str(_write(c.tmp / "cut.pth", _pth(c.tmp, {
            "w": torch.zeros(1000)}).read_bytes()[:700]))], "not a readable PyTorch checkpoint"),
    "resume: no such state": (
        lambda c: ["--resume", str(c.tmp / "state_00000001.pt")],
        "no such work dir or training state"),
    "resume: not a training state": (
        lambda c: ["--resume", str(_pth(c.tmp, {"model": {"w": torch.zeros(1)}}))],
        "not a convnext-cifar training state"),
    "resume: executable pickle": (
        lambda c: ["--resume", str(_pth(c.tmp, {"format": Payload(c.tmp / "pwned")}))],
        "refused, nothing in it was run"),
    "resume: truncated state": (
        lambda c: ["--resume", str(_write(c.tmp / "state_00000002.pt", find_states(
            c.finished)[-1].read_bytes()[:5000]))], "not a readable PyTorch checkpoint"),
    "resume: another architecture": (
        lambda c: ["--resume", str(find_states(c.finished)[-1]), "--model.name",
                   "convnextv2_femto"], "model.name ('convnextv2_atto' -> 'convnextv2_femto')"),
    "resume: a state missing a key": (
        lambda c: ["--resume", str(_state_without(c.finished, c.tmp, "run", "step"))],
        "state_00000099.pt is a damaged training state"),
    "resume: a state missing its log position": (
        lambda c: ["--resume", str(_state_without(c.finished, c.tmp, "log", "bytes"))],
        "state_00000099.pt is a damaged training state"),
    "resume: a state whose config nests too deep": (
        lambda c: ["--resume", str(_state_with_config(c.finished, c.tmp, "[" * 99 + "]" * 99))],
        "damaged training state (its config nests deeper than 64 levels (at [0][0]"),
    "config: nested too deep": (
        lambda c: ["--config", str(_write(c.tmp / "c.json", b"[" * 100_000 + b"]" * 100_000))],
        "c.json nests deeper than 64 levels"),  # was a RecursionError traceback
    "config: a huge integer": (
        lambda c: ["--config", str(_write(c.tmp / "c.json", b'{"seed": 1%s}' % (b"0" * 4000)))],
        "c.json: seed is an integer of 4001 digits; at most 64-bit integers are read"),
    "config: malformed JSON": (
        lambda c: ["--config", str(_write(c.tmp / "c.json", b"{\"seed\": "))],
        "not valid JSON"),
    "config: unknown field": (
        lambda c: ["--config", str(_write(c.tmp / "c.json", b'{"optim": {"lrr": 1}}'))],
        "unknown config field(s) optim.lrr"),
    "option out of range": (lambda c: ["--optim.lr", "-1"], "invalid --optim.lr -1.0"),
    "option of the wrong type": (lambda c: ["--seed", "abc"], "Error parsing --seed"),
    "unknown model name": (lambda c: ["--model.name", "resnet50"], "invalid --model.name"),
    "device: not a device": (lambda c: ["--device", "cpu:x"], "invalid --device 'cpu:x'"),
    "device: no MPS here": (lambda c: ["--device", "mps"], "--device mps: MPS"),
    "device: no such GPU": (lambda c: ["--device", "cuda:1"], "--device cuda:1: CUDA is not"),
    "cifar100: missing": (
        lambda c: ["--data.dataset", "cifar100", "--data.root", str(c.tmp / "nowhere")],
        "CIFAR-100 not found"),
    "cifar100: damaged": (
        lambda c: ["--data.dataset", "cifar100", "--data.root", str(_cifar100(c.tmp, lambda d: (
            d / "test").write_bytes(b"\x80\x02garbage")))], "cannot read"),
    "folder: no class folders": (
        lambda c: _folder(c.tmp, lambda r: shutil.rmtree(r / "train" / "a")),
        "holds no class folders"),
    "folder: empty class folder": (
        lambda c: _folder(c.tmp, lambda r: (r / "train" / "b").mkdir()), "holds no images"),
    "folder: classes differ": (
        lambda c: _folder(c.tmp, lambda r: (r / "val" / "a").rename(r / "val" / "z")),
        "have different classes"),
    "folder: undecodable image": (
        lambda c: _folder(c.tmp, lambda r: (r / "train" / "a" / "0000.png").write_bytes(b"x")),
        "cannot read image"),
    "folder: decompression bomb": (
        lambda c: _folder(c.tmp, lambda r: (r / "train" / "a" / "bomb.png").write_bytes(
            png_claiming(100_000, 100_000))), "bomb.png: its header claims 100000 x 100000"),
    "unwritable work dir": (
        lambda c: ["--work-dir", str(_write(c.tmp / "a_file", b"x") / "run")],
        "cannot create work dir"),
}


def without_progress(err: str) -> str:
    """stderr without the image folder's decoding progress ("decoding 2 images of ... ...")."""
    return "".join(line for line in err.splitlines(keepends=True)
                   if not line.startswith("decoding "))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def command(case, finished, cifar_root, tmp_path):
    class Ctx:
        root, tmp = cifar_root, tmp_path

    Ctx.finished = finished
    build, message = CASES[case]
    extra = build(Ctx)
    if extra[0] in ("eval", "predict"):
        return extra, message
    if extra[0] == "--config":
        return ["train", *extra, "--work-dir", str(tmp_path / "run")], message
    # a training command aimed at a new work dir, or (resume) at the finished one
    work = finished if "--resume" in extra and "another architecture" in case else tmp_path / "run"
    return small_run_args(cifar_root, work) + extra, message


@pytest.mark.slow  # a subprocess; test_errors runs the same case through the real command
def test_missing_data_through_the_real_cli(tmp_path):
    out = run_cli("train", "--preset", "smoke", "--data.root", str(tmp_path / "nothing"),
                  "--data.no-download", "--work-dir", str(tmp_path / "w"), "--device", "cpu")
    assert out.returncode == 2
    assert out.stderr.startswith("convnext-cifar: error: CIFAR-10 not found")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_eval_of_missing_checkpoint_is_one_line(tmp_path):
    out = run_cli("eval", str(tmp_path / "best.safetensors"))
    assert out.returncode == 2 and "does not exist" in out.stderr and out.stderr.count("\n") == 1


def test_the_dataset_is_checked_before_any_pretrained_weights(monkeypatch, tmp_path, capsys):

    def no_download(*args, **kwargs):
        raise AssertionError("fetched weights before looking at the data")

    monkeypatch.setattr(model_build, "_timm_hub_state_dict", no_download)
    rc = cli.main(["train", "--data.root", str(tmp_path / "none"), "--data.no-download",
                   "--work-dir", str(tmp_path / "w"), "--device", "cpu"])
    assert rc == 2 and "CIFAR-10 not found" in capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, finished, cifar_root, tmp_path,
                                                        capsys):
    args, message = command(case, finished, cifar_root, tmp_path)
    before = digest(finished)
    capsys.readouterr()
    assert cli.main(args) == 2
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith("convnext-cifar: error: ")
    assert "Traceback" not in err and message in err, err
    assert digest(finished) == before
    assert not (tmp_path / "pwned").exists()
    if not ("--resume" in args and "another architecture" in case):
        assert not (tmp_path / "run").exists()  # nothing written: not even the work dir
    assert not list(tmp_path.rglob(".convnext-cifar-cache"))


@pytest.mark.parametrize("case", [  # a subprocess each (~8 s of imports): two fast, two slow
    "missing dataset, no download", "option of the wrong type",
    pytest.param("eval: truncated checkpoint", marks=pytest.mark.slow),
    pytest.param("pretrained: executable pickle", marks=pytest.mark.slow)])
def test_bad_input_through_the_real_command(case, finished, cifar_root, tmp_path):
    args, message = command(case, finished, cifar_root, tmp_path)
    before = digest(finished)
    out = subprocess.run([sys.executable, "-m", "convnext_cifar", *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    err = without_progress(out.stderr)
    assert err.count("\n") == 1 and err.startswith("convnext-cifar: error: ")
    assert "Traceback" not in err and message in err, err
    assert digest(finished) == before
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("args, line", [
    (["train", "--sched.epochs", str(10**21), "--print-config"],
     f"invalid --sched.epochs {10**21}: must be at most 1,000,000"),  # hung, deaf to SIGTERM
    (["train", "--data.batch-size", str(2**40), "--print-config"],
     f"invalid --data.batch-size {2**40}: must be at most 1,048,576"),
    (["train", "--seed", "-1", "--print-config"], "invalid --seed -1: must be >= 0"),
    (["train", "--keep-set-aside", "-1", "--print-config"],
     "invalid --keep-set-aside -1: must be >= 0"),
    (["train", "--log-interval", str(10**12), "--print-config"],
     f"invalid --log-interval {10**12}: must be at most 1,000,000,000"),
    (["tune", "--tune.trials", str(10**9)], f"invalid --tune.trials {10**9}: must be at most"),
    (["report", "nowhere", "--data.eval-batch-size", "-5"],
     "invalid --data.eval-batch-size -5: must be >= 1"),  # a traceback
    (["predict", "x.safetensors", "y.png", "--data.eval-batch-size", str(2**21)],
     f"invalid --data.eval-batch-size {2**21}: must be at most 1,048,576"),
])
def test_absurd_counts_and_sizes_are_one_line_before_anything_runs(capsys, args, line):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"convnext-cifar: error: {line}") and err.count("\n") == 1
