"""use/predict.py on its own (the command: end_to_end/test_eval_predict_export.py): which files
are images, the top-k of each, and the CSV written whole or not at all."""

import csv

import numpy as np
import pytest
from PIL import Image
from support import atto_checkpoint

from convnext_cifar.errors import UserError
from convnext_cifar.use.predict import CsvWriter, Prediction, image_paths, predict


def pictures(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return folder


def test_files_and_folders_are_listed_in_order_and_the_rest_named(tmp_path):
    pics = pictures(tmp_path / "pics" / "deep", 2)
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    one = pictures(tmp_path / "one", 1) / "0.png"
    found, failed = image_paths([tmp_path / "pics", one, tmp_path / "nowhere"])
    assert found == [pics / "0.png", pics / "1.png", one]
    assert failed == [(tmp_path / "nowhere", "no such file or folder")]


def test_each_image_gets_the_top_k_most_probable_first(tmp_path):
    ckpt = atto_checkpoint(tmp_path / "best.safetensors")
    pics = pictures(tmp_path / "pics", 5)
    k, chunks = predict(ckpt, [pics], batch_size=2, device="cpu")
    assert k == 3  # 5 by default, or every class when there are fewer
    batches = list(chunks)
    assert batches[0] == ([], [])  # the paths that are not files come first (none here)
    predictions = [p for found, _ in batches[1:] for p in found]
    assert [p.path for p in predictions] == [str(pics / f"{i}.png") for i in range(5)]
    for p in predictions:
        assert sorted(p.classes) == ["a", "b", "c"] and p.probs == sorted(p.probs, reverse=True)
        assert sum(p.probs) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match="--top-k 4: must be between 1 and the 3 classes"):
        predict(ckpt, [pics], top_k=4, device="cpu")
    with pytest.raises(UserError, match="nowhere: no such file or folder"):
        predict(ckpt, [tmp_path / "nowhere"], device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        predict(ckpt, [tmp_path / "empty"], device="cpu")


def test_the_csv_appears_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.csv"
    with CsvWriter(path, 2) as table:
        table.write([Prediction("a.png", ["cat", "dog"], [0.75, 0.25])])
        assert not path.exists()  # written to a temporary name until every row is in
    assert list(csv.reader(path.open())) == [
        ["path", "class_1", "prob_1", "class_2", "prob_2"],
        ["a.png", "cat", "0.750000", "dog", "0.250000"]]
    with pytest.raises(RuntimeError), CsvWriter(tmp_path / "half.csv", 1) as table:
        raise RuntimeError("stopped")
    assert not (tmp_path / "half.csv").exists()
    with pytest.raises(UserError, match="give --csv a writable path"):
        CsvWriter(tmp_path / "missing" / "out.csv", 1).__enter__()
