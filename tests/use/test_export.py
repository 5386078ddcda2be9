"""use/export.py on its own (ONNX through the command line: end_to_end/): a checkpoint as a
torch.export archive whose graph, with or without the preprocessing, gives the model's logits."""

import io
import json
import zipfile

import pytest
import torch
from support import atto_checkpoint

from convnext_cifar.data.loader import Normalize
from convnext_cifar.errors import UserError
from convnext_cifar.use.evaluate import load_model
from convnext_cifar.use.export import METADATA_FILE, export_checkpoint


@pytest.mark.parametrize("preprocessing", [False, True])
def test_the_archive_gives_the_models_logits_at_any_batch(tmp_path, preprocessing):
    ckpt = atto_checkpoint(tmp_path / "best.safetensors")
    out = tmp_path / "model.pt2"
    meta = export_checkpoint(ckpt, out, include_preprocessing=preprocessing)
    assert meta["classes"] == ["a", "b", "c"] and meta["input_size"] == 32
    with zipfile.ZipFile(out) as archive:
        name = next(n for n in archive.namelist() if n.endswith(METADATA_FILE))
        assert json.loads(archive.read(name))["checkpoint_sha256"] == meta["checkpoint_sha256"]
    program = torch.export.load(io.BytesIO(out.read_bytes())).module()
    loaded = load_model(ckpt, "cpu", compile=False)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    normalize = Normalize(*loaded.normalisation, 32, "cpu", False)
    with torch.inference_mode():
        expected = loaded.model.float()(normalize(images).contiguous())
        got = program(images if preprocessing else normalize(images))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_unknown_suffix_or_folder_is_one_line(tmp_path):
    ckpt = atto_checkpoint(tmp_path / "best.safetensors")
    with pytest.raises(UserError, match="cannot tell the export format from 'model.bin'"):
        export_checkpoint(ckpt, tmp_path / "model.bin")
    with pytest.raises(UserError, match="is not a folder"):
        export_checkpoint(ckpt, tmp_path / "missing" / "model.pt2")


def test_the_shipped_config_names_no_local_path_and_keeps_a_timm_tag():
    import dataclasses
    from pathlib import Path

    from convnext_cifar.config import DataConfig, DistillConfig, ModelConfig, TrainConfig, to_dict
    from convnext_cifar.use import export

    cfg = TrainConfig(work_dir=Path("/home/me/runs/a"),
                      data=DataConfig(root=Path("/home/me/data"), cache_dir=Path("/home/me/c")))
    shipped = export._without_paths(to_dict(cfg))
    assert shipped["work_dir"] is None and shipped["data"]["cache_dir"] is None
    assert shipped["data"]["root"] == "data" and "/home/me" not in json.dumps(shipped)
    assert shipped["model"]["pretrained"] == cfg.model.pretrained  # a tag is not a path
    original = to_dict(cfg)
    assert original["data"]["root"] == "/home/me/data"  # the run's own config is untouched
    files = dataclasses.replace(cfg, model=ModelConfig(pretrained="/home/me/w/fcmae.pt"),
                                distill=DistillConfig(teacher="/home/me/t/best.safetensors"))
    shipped = export._without_paths(to_dict(files))
    assert shipped["model"]["pretrained"] == "fcmae.pt"
    assert shipped["distill"]["teacher"] == "best.safetensors"
