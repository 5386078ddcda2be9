"""End to end: `eval`, `predict` and `export` on trained checkpoints: predictions equal eval's,
exported files equal the model, bad input is one line."""

import csv
import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from cifar_files import write_image_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save
from support import ONE_EPOCH, folder_args, small_run_args

from convnext_cifar import cli
from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.data.loader import Normalize
from convnext_cifar.model.checkpoints import load_weights
from convnext_cifar.use import export as use_export
from convnext_cifar.use import predict as use_predict
from convnext_cifar.use.evaluate import load_model, predict_logits


def eval_probabilities(best, root):
    """What `eval` computes for every test image, image by image: its softmax."""
    run = load_model(best)
    data = load_dataset(run.cfg.data, run.rt.device, train=False)
    with torch.inference_mode():
        x = run.normalize(data.val.images)
        return predict_logits(run.forward, x, run.rt).softmax(1), data.val.images


def eager_logits(best, x):
    run = load_model(best)
    with torch.inference_mode():
        return run.model(x.contiguous()).float()


def test_eval_of_a_folder_run_needs_only_its_held_out_split(tmp_path, capsys):
    data = write_image_folder(tmp_path / "pets", {"train": {"a": 10, "b": 10},
                                                  "val": {"a": 4, "b": 4}})
    work = tmp_path / "run"
    assert cli.main(folder_args(data, work, "--sched.epochs", "1")) == 0
    shutil.rmtree(data / "train")
    capsys.readouterr()
    assert cli.main(["eval", str(work / "best.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 8


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


def test_predict_reads_predicts_and_prints_batch_by_batch(cifar_root, tmp_path, monkeypatch,
                                                         capsys):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *ONE_EPOCH)) == 0
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(30):
        Image.new("RGB", (32, 32), (i * 8, 100, 50)).save(pics / f"{i:02d}.png")

    events, real = [], use_predict.decode_chunks

    def decode(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            events.append(("decoded", len(chunk[1])))
            yield chunk

    monkeypatch.setattr(use_predict, "decode_chunks", decode)
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


    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *ONE_EPOCH)) == 0
    monkeypatch.setattr(use_export, "EXTERNAL_DATA_BYTES", 0)  # as if the weights passed 2 GB
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
    from convnext_cifar.use.evaluate import load_model

    with torch.inference_mode():
        want = load_model(work / "best.safetensors").model(x).float()
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_predict_on_png_files_equals_eval_per_image(trained, cifar_root, tmp_path, capsys):
    best = trained / "best.safetensors"
    probs, images = eval_probabilities(best, cifar_root)
    folder = tmp_path / "pngs" / "nested"
    folder.mkdir(parents=True)
    for i, img in enumerate(images[:40]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    capsys.readouterr()
    assert cli.main(["predict", str(best), str(tmp_path / "pngs"), "--json", "--top-k", "3",
                     "--batch-size", "16"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 40
    classes = load_weights(best).classes
    for i, line in enumerate(lines):
        assert line["path"].endswith(f"{i:03d}.png")
        want = probs[i].topk(3)
        assert [t["class"] for t in line["top_k"]][0] == classes[int(want.indices[0])]
        got = torch.tensor([t["prob"] for t in line["top_k"]])
        torch.testing.assert_close(got, want.values, atol=1e-5, rtol=0)


def test_predict_reports_unreadable_files_and_still_predicts_the_rest(trained, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"nope")
    out_csv = tmp_path / "out.csv"
    capsys.readouterr()
    rc = cli.main(["predict", str(trained / "best.safetensors"), str(good),
                   str(tmp_path / "bad.png"), str(tmp_path / "missing.png"), "--csv",
                   str(out_csv), "--top-k", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "bad.png" in err and "missing.png" in err
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert len(rows) == 2 and rows[1][0] == str(good)
    assert cli.main(["predict", str(trained / "best.safetensors"), str(good), "--top-k",
                     "11"]) == 2
    assert "--top-k 11: must be between 1 and the 10 classes" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (lambda t: ["predict", str(t / "nope.safetensors"), "x.png"], "does not exist"),
    (lambda t: ["predict", str(t / "metrics.jsonl"), "x.png"], "not a readable safetensors"),
    (lambda t: ["export", str(t / "nope.safetensors"), "x.onnx"], "does not exist"),
    (lambda t: ["export", str(t / "best.safetensors"), "model.tflite"],
     "name the file *.onnx or *.pt2"),
    (lambda t: ["export", str(t / "best.safetensors"), "/no/such/dir/m.onnx"], "not a folder"),
])
def test_predict_and_export_bad_input_is_one_line(trained, tmp_path, capsys, args, message):
    capsys.readouterr()
    assert cli.main(args(trained)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("suffix, preprocessing", [  # an ONNX export takes ~13 s
    (".onnx", True), (".pt2", False), pytest.param(".onnx", False, marks=pytest.mark.slow),
    pytest.param(".pt2", True, marks=pytest.mark.slow)])
def test_exported_files_match_eager_logits_at_batch_1_and_7(trained, tmp_path, suffix,
                                                            preprocessing):
    best = trained / "best.safetensors"
    out = tmp_path / f"model{suffix}"
    args = ["export", str(best), str(out)] + (["--include-preprocessing"] if preprocessing else [])
    assert cli.main(args) == 0
    meta_expected = load_weights(best)
    mean, std = meta_expected.config.data.mean, meta_expected.config.data.std
    if suffix == ".onnx":
        model = onnx.load(str(out))
        meta = {p.key: json.loads(p.value) for p in model.metadata_props}
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
    else:
        extra = {"convnext_cifar.json": ""}
        program = torch.export.load(str(out), extra_files=extra)
        meta = json.loads(extra["convnext_cifar.json"])
        run = lambda x: program.module()(x)  # noqa: E731
    assert meta["classes"] == meta_expected.classes and meta["image_size"] == 32
    assert meta["mean"] == pytest.approx(list(mean)) and meta["std"] == pytest.approx(list(std))
    for n in (1, 7):
        pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
        normalised = Normalize(mean, std, 32, "cpu", channels_last=False)(pixels)
        want = eager_logits(best, normalised)
        got = run(pixels if preprocessing else normalised)
        assert got.shape == (n, 10)
        assert (got - want).abs().max() <= 1e-4


def test_export_without_the_extra_names_it(trained, tmp_path, monkeypatch, capsys):
    import sys

    for name in ("onnx", "onnxscript"):  # as if the extra were not installed
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(trained / "best.safetensors"), str(out)]) == 2
    assert "pip install '.[export]' from the project's clone" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_output_options_never_replace_a_runs_files(trained, tmp_path, capsys):
    """`report --out W/best.safetensors` and `predict --csv W/epoch_1.safetensors` replaced the
    checkpoint and exited 0; any other existing file only with --force, or of the same kind."""
    png = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(png)
    best, first = trained / "best.safetensors", trained / "epoch_1.safetensors"
    before = {p: p.read_bytes() for p in (best, first, trained / "metrics.jsonl")}
    for args in (["report", str(trained), "--out", str(best)],
                 ["predict", str(best), str(png), "--csv", str(first)],
                 ["predict", str(best), str(png), "--csv", str(trained / "metrics.jsonl"),
                  "--force"],
                 ["export", str(best), str(first), "--format", "pt2", "--force"],
                 ["convert", str(best), str(first)]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert "is never overwritten; give another path" in err and err.count("\n") == 1
    assert all(p.read_bytes() == data for p, data in before.items())
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert cli.main(["predict", str(best), str(png), "--csv", str(notes)]) == 2
    assert "exists and is no .csv file; give another path, or --force" in capsys.readouterr().err
    assert cli.main(["predict", str(best), str(png), "--csv", str(notes), "--force"]) == 0
    assert notes.read_text().startswith("path,class_1,prob_1")
    old_csv = tmp_path / "old.csv"
    old_csv.write_text("old")
    assert cli.main(["predict", str(best), str(png), "--csv", str(old_csv)]) == 0  # its kind


def test_the_small_edges_of_eval_and_predict(trained, tmp_path, capsys):
    """A work dir is its best.safetensors; a training state and a missing folder are one line
    that says what they are; the CIFAR copy's warning is said once for its files."""
    assert cli.main(["eval", str(trained), "--json", "--compile", "off"]) == 0  # was refused
    by_dir = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", str(trained / "best.safetensors"), "--json", "--compile",
                     "off"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["top1"] == by_dir["top1"]
    assert "not byte-identical" not in out.err  # said at the first command, not again
    state = sorted(trained.glob("state_*.pt"))[-1]
    assert cli.main(["eval", str(state)]) == 2  # was: a safetensors header error
    assert f"{state} is a training state, for `train --resume`; evaluate" in (
        capsys.readouterr().err)
    assert cli.main(["predict", str(trained), str(tmp_path / "missing_dir")]) == 2
    assert "missing_dir: no such file or folder" in capsys.readouterr().err  # not "no images"


def test_the_first_command_on_a_copy_of_cifar_says_it_is_not_the_official_files(trained,
                                                                                capsys):
    for seen in (True, False):
        assert cli.main(["eval", str(trained), "--json", "--compile", "off"]) == 0
        assert ("not byte-identical to the official archive" in capsys.readouterr().err) == seen


def test_export_int8_then_eval_the_shipped_file(trained, tmp_path, capsys, monkeypatch,
                                                cifar_root):
    from convnext_cifar.use import quantize

    monkeypatch.setattr(quantize, "SPEED_SECONDS", 0.02)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(trained), str(out), "--int8",
                     "--int8.calibration-images", "128"]) == 0
    said = capsys.readouterr().out
    assert "INT8 against fp32 on 300 held-out" in said and "top-1 agreement" in said
    report = json.loads((tmp_path / "model.parity.json").read_text())
    assert report["settings"]["calibration_images"] == 128
    assert cli.main(["eval", str(out), "--json", "--data.root", str(cifar_root)]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(report["int8_top1"])
    assert cli.main(["export", str(trained), str(out), "--int8", "--int8.max-drop", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid --int8.max-drop -1" in err
