"""use/quantize.py: `export --int8` keeps a trained model's held-out top-1 (the parity report
says so, measured), refuses a file that loses too much (a deliberately bad calibration) or a
training split that is not the run's, and writes nothing it refuses."""

import json

import onnx
import pytest
from onnxruntime.quantization.registry import QDQRegistry

from convnext_cifar.config import QDQ_OP_TYPES, Int8Config
from convnext_cifar.errors import UserError
from convnext_cifar.use import quantize
from convnext_cifar.use.evaluate import evaluate_checkpoint
from convnext_cifar.use.onnx_file import open_onnx
from convnext_cifar.use.quantize import cpu_isa, export_int8, parity_path


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    monkeypatch.setattr(quantize, "SPEED_SECONDS", 0.02)


@pytest.fixture(scope="module")
def int8_file(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model.onnx"
    report = export_int8(trained, out, Int8Config(calibration_images=256), say=lambda _: None)
    return out, report


def test_the_int8_file_keeps_the_held_out_top1(trained, int8_file, cifar_root):
    out, report = int8_file
    fp32 = evaluate_checkpoint(trained, device="cpu", compile=False)
    assert report["images"] == 300 and report["fp32_top1"] == pytest.approx(fp32["top1"])
    assert fp32["top1"] > 80  # a model that learned: a drop would show
    assert report["fp32_top1"] - report["int8_top1"] <= 0.5
    assert report["agreement"] >= 97 and report["max_logit_diff"] < 1.0
    assert report["int8_bytes"] <= 0.31 * report["fp32_bytes"]
    assert out.stat().st_size == report["int8_bytes"]
    assert json.loads(parity_path(out).read_text()) == report
    for key in ("fp32_img_per_s_batch1", "int8_img_per_s_batch1", "fp32_img_per_s_batch64",
                "int8_img_per_s_batch64"):
        assert report[key] > 0
    assert report["isa"] == cpu_isa() and report["cpu"]
    # eval on the shipped file measures what the report says
    assert evaluate_checkpoint(out, cifar_root)["top1"] == pytest.approx(report["int8_top1"])


def test_the_int8_file_says_what_it_is_and_keeps_the_float_ops_float(int8_file):
    out, report = int8_file
    _, _, meta = open_onnx(out)
    assert meta["precision"] == "int8" and meta["int8"]["int8_top1"] == report["int8_top1"]
    assert meta["int8"]["settings"]["calibration_images"] == 256
    graph = onnx.load(str(out)).graph
    inputs = {n.output[0]: n.op_type for n in graph.node}
    quantized = {n.op_type for n in graph.node
                 if any(inputs.get(i) == "DequantizeLinear" for i in n.input)}
    assert "Conv" in quantized
    # LayerNormalization and the head's Gemm take float inputs, not dequantized ones
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Gemm"):
            assert inputs.get(node.input[1]) != "DequantizeLinear"  # float weights


def test_a_bad_calibration_is_refused_and_nothing_is_written(trained, tmp_path, monkeypatch):
    good = quantize.calibration_batches
    monkeypatch.setattr(quantize, "calibration_batches",
                        lambda *a: [b * 0.02 for b in good(*a)])  # ranges far too narrow
    out = tmp_path / "bad.onnx"
    with pytest.raises(UserError, match=r"the INT8 file loses \d+\.\d\d top-1 points on 300 "
                                        r"held-out images .* more than --int8.max-drop 0.5; "
                                        "nothing was written"):
        export_int8(trained, out, Int8Config(calibration_images=64), say=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # no file, no report, no temporary folder
    report = export_int8(trained, out, Int8Config(calibration_images=64, force=True),
                         say=lambda _: None)
    assert report["fp32_top1"] - report["int8_top1"] > 0.5 and out.is_file()


def test_calibration_draws_the_same_training_images_for_a_seed(trained):
    from convnext_cifar.runtime import Runtime
    from convnext_cifar.use.evaluate import load_model

    loaded = load_model(trained, rt=Runtime(__import__("torch").device("cpu"), "fp32", False,
                                            False))
    data = quantize.calibration_data(loaded, None)
    a = quantize.calibration_batches(data, loaded, Int8Config(calibration_images=70), False)
    b = quantize.calibration_batches(data, loaded, Int8Config(calibration_images=70), False)
    c = quantize.calibration_batches(data, loaded, Int8Config(calibration_images=70, seed=1),
                                     False)
    assert [len(x) for x in a] == [64, 6]
    assert all((x == y).all() for x, y in zip(a, b)) and not (a[0] == c[0]).all()
    raw = quantize.calibration_batches(data, loaded, Int8Config(calibration_images=5), True)
    assert raw[0].dtype.is_floating_point is False and raw[0].shape == (5, 3, 32, 32)


def test_another_training_split_is_refused(trained, cifar_root, tmp_path):
    import shutil

    from cifar_files import learnable_images, write_cifar10

    other = tmp_path / "other"
    write_cifar10(other, learnable_images(1000, seed=5), learnable_images(300, seed=1))
    with pytest.raises(UserError, match="are not the ones .* was trained on .*the train files"):
        export_int8(trained, tmp_path / "x.onnx", Int8Config(), data_root=other,
                    say=lambda _: None)
    assert not (tmp_path / "x.onnx").exists()
    shutil.rmtree(other)


def test_the_cpu_instruction_set_is_read_from_the_flags():
    assert cpu_isa("flags\t: fpu avx2 avx512f avx512_vnni amx_int8 amx_tile\n") == "AMX"
    assert cpu_isa("flags\t: fpu avx2 avx512f avx512_vnni\n") == "AVX512-VNNI"
    assert cpu_isa("flags\t: fpu avx2 avx_vnni\n") == "AVX-VNNI"
    assert cpu_isa("flags\t: fpu avx2\n") == "AVX2"
    assert cpu_isa("")  # no flags: torch's own answer


def test_the_node_types_are_onnx_runtimes_and_bad_values_are_one_line():
    assert set(QDQ_OP_TYPES) == set(QDQRegistry)
    with pytest.raises(UserError, match="invalid --int8.float-ops 'Softmax': must name ONNX node"):
        Int8Config(float_ops=("Softmax",))
    with pytest.raises(UserError, match="invalid --int8.calibration-images 0"):
        Int8Config(calibration_images=0)
    with pytest.raises(UserError, match="invalid --int8.max-drop -1"):
        Int8Config(max_drop=-1)
    with pytest.raises(UserError, match="invalid --int8.parity-images -1"):
        Int8Config(parity_images=-1)


@pytest.mark.slow
def test_an_int8_file_with_the_preprocessing_inside_keeps_the_top1(trained, tmp_path, cifar_root):
    out = tmp_path / "inside.onnx"
    report = export_int8(trained, out, Int8Config(calibration_images=128),
                         include_preprocessing=True, say=lambda _: None)
    assert open_onnx(out)[1].uint8_input
    assert report["fp32_top1"] - report["int8_top1"] <= 0.5 and report["agreement"] >= 97
    assert evaluate_checkpoint(out, cifar_root)["top1"] == pytest.approx(report["int8_top1"])
