"""use/onnx_file.py: an exported .onnx file runs in `eval` and `predict` like the checkpoint it
came from (the same held-out checks, preprocessing and outputs), and anything else is one line."""

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from convnext_cifar.errors import UserError
from convnext_cifar.use.evaluate import evaluate_checkpoint, load_model
from convnext_cifar.use.export import export_checkpoint
from convnext_cifar.use.onnx_file import is_onnx, open_onnx
from convnext_cifar.use.predict import predict


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained run's best weights as fp32 ONNX, plain and with the preprocessing inside."""
    folder = tmp_path_factory.mktemp("onnx")
    plain, inside = folder / "plain.onnx", folder / "inside.onnx"
    export_checkpoint(trained, plain)
    export_checkpoint(trained, inside, include_preprocessing=True)
    return plain, inside


@pytest.mark.parametrize("which", [0, 1])
def test_eval_of_the_onnx_file_equals_the_checkpoints(trained, exported, which, cifar_root):
    expected = evaluate_checkpoint(trained, device="cpu", compile=False)
    got = evaluate_checkpoint(exported[which], cifar_root)
    assert got["num_images"] == expected["num_images"] == 300
    assert got["confusion"] == expected["confusion"] and got["top1"] == expected["top1"]
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-4)
    assert got["recorded"] == expected["recorded"] and got["epoch"] == expected["epoch"]
    flipped = evaluate_checkpoint(exported[which], cifar_root, tta="flip")
    assert flipped["top1"] == evaluate_checkpoint(trained, device="cpu", tta="flip",
                                                  compile=False)["top1"]


def test_predict_on_the_onnx_file_gives_the_checkpoints_probabilities(trained, exported,
                                                                       tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")

    def run(path, **kw):
        _, chunks = predict(path, [tmp_path], batch_size=2, top_k=3, **kw)
        return [p for found, _ in chunks for p in found]

    expected = run(trained, device="cpu")
    for path in exported:
        got = run(path)
        assert [p.classes for p in got] == [p.classes for p in expected]
        np.testing.assert_allclose([p.probs for p in got], [p.probs for p in expected],
                                   atol=1e-5)


def test_the_file_carries_the_checkpoints_config_classes_and_dataset(trained, exported):
    ckpt, module, meta = open_onnx(exported[0])
    original = load_model(trained, "cpu", compile=False).checkpoint
    assert ckpt.config.model == original.config.model and ckpt.classes == original.classes
    assert ckpt.config.work_dir is None and str(original.config.data.root) not in str(ckpt.config)
    assert ckpt.identity == original.identity and meta["precision"] == "fp32"
    assert not module.uint8_input and open_onnx(exported[1])[1].uint8_input
    assert is_onnx(exported[0]) and not is_onnx(trained)


def test_a_foreign_or_edited_onnx_file_is_one_line(exported, tmp_path):
    model = onnx.load(str(exported[0]))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(UserError, match="was not exported by this version of convnext-cifar"):
        load_model(tmp_path / "foreign.onnx")
    model = onnx.load(str(exported[0]))
    for entry in model.metadata_props:
        if entry.key == "classes":
            entry.value = json.dumps(["a", "b"])
    onnx.save(model, str(tmp_path / "edited.onnx"))
    with pytest.raises(UserError, match="outputs 10 logits but its metadata names 2 classes"):
        load_model(tmp_path / "edited.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError, match="is not an ONNX file ONNX Runtime can load"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="ONNX file .*missing.onnx does not exist"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="--device cuda: an .onnx file runs on the CPU"):
        load_model(exported[0], device="cuda")


def test_the_module_returns_fp32_logits_for_any_batch(exported):
    _, module, _ = open_onnx(exported[0])
    for n in (1, 3):
        out = module(torch.randn(n, 3, 32, 32))
        assert out.shape == (n, 10) and out.dtype == torch.float32
