"""files.py: atomic writes that leave the old file or the new one, one-line errors for paths,
clean-up after killed writers, restricted unpickling, the first line of an error."""

import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from convnext_cifar.errors import UserError
from convnext_cifar.files import (
    atomic_write_bytes,
    atomic_writer,
    file_hash,
    first_line,
    load_array_pickle,
    load_pth,
    remove_stale_temp_files,
    require_file,
    temp_path,
    write_file,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_write_file_names_the_path_and_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"could not write checkpoint .*missing/x: .*; keep it"):
        write_file(tmp_path / "missing" / "x", b"1", "checkpoint", "keep it")


def test_only_temporaries_of_dead_writers_are_removed_from_a_shared_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    mine = temp_path(tmp_path / "entry")  # this process: alive
    theirs = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{dead}."))
    for p in (mine, theirs):
        p.write_bytes(b"")
    remove_stale_temp_files(tmp_path, shared=True)
    assert mine.exists() and not theirs.exists()
    remove_stale_temp_files(tmp_path)  # a folder only this process writes: all are stale
    assert not mine.exists()


def test_require_file_says_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="weights file .* does not exist"):
        require_file(tmp_path / "no", "weights file")
    with pytest.raises(UserError, match="is a directory"):
        require_file(tmp_path, "weights file")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        require_file(tmp_path / "empty", "weights file")


def test_first_line_keeps_the_useful_part():
    error = RuntimeError("Error(s) in loading. Missing keys: a, b\nmore detail")
    assert first_line(error) == "Error(s) in loading"
    assert first_line(error, sentence=False) == "Error(s) in loading. Missing keys: a, b"
    assert first_line(ValueError()) == "ValueError"


class _Evil:
    def __reduce__(self):
        return os.kill, (os.getpid(), signal.SIGKILL)


def test_pickles_that_would_run_code_are_refused_without_running_it(tmp_path):
    pth = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, pth)
    with pytest.raises(UserError, match="needs arbitrary code to unpickle.*nothing in it was run"):
        load_pth(pth)
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _Evil()}))
    with pytest.raises(UserError, match="refusing to load posix.kill"):
        load_array_pickle(batch, "download it again")


def test_dataset_pickles_give_arrays_with_str_keys(tmp_path):
    batch = tmp_path / "b"
    batch.write_bytes(pickle.dumps({b"labels": [1, 2], "data": np.zeros((2, 3), np.uint8)},
                                   protocol=2))
    got = load_array_pickle(batch, "fix")
    assert sorted(got) == ["data", "labels"] and got["data"].shape == (2, 3)
    with pytest.raises(UserError, match="missing .*nothing; fix"):
        load_array_pickle(tmp_path / "nothing", "fix")


def test_file_hash_reads_any_size(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"a" * (3 << 20))
    assert file_hash(path, "md5") == "6a11a8872b36343799a15617bea78cef"


def test_parse_json_bounds_depth_and_integers_naming_the_field():
    from convnext_cifar.files import MAX_JSON_DEPTH, parse_json

    assert parse_json('{"a": [1, {"b": null}], "c": -9223372036854775807}', "x") == {
        "a": [1, {"b": None}], "c": -(2**63 - 1)}
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(deep, "x") is not None
    for text in ("[" + deep + "]", "[" * 10**5 + "]" * 10**5):  # ours, then json's own limit
        with pytest.raises(UserError, match="^what nests deeper than 64 levels"):
            parse_json(text, "what")
    with pytest.raises(UserError, match=r"^what: a\[1\].b is an integer of 19 digits"):
        parse_json('{"a": [0, {"b": 9223372036854775808}]}', "what")
    with pytest.raises(UserError, match="^what holds an integer of thousands of digits"):
        parse_json("1" * 5000, "what")
    with pytest.raises(UserError, match=r"^what is not valid JSON \(Expecting"):
        parse_json("{", "what")


def test_shown_keeps_a_message_short():
    from convnext_cifar.files import shown

    assert len(shown(10**4000)) < 50 and len(shown("x" * 10**6)) < 70
    assert shown([[[[[1]]]]]) == "[[[[...]]]]" and shown("ab") == "'ab'"


def test_a_compressed_pth_is_refused_from_its_directory_before_reading(tmp_path, monkeypatch):
    import zipfile

    import torch

    from convnext_cifar import files

    torch.save({"w": torch.zeros(2**20)}, tmp_path / "plain.pth")  # 4 MiB
    with zipfile.ZipFile(tmp_path / "plain.pth") as src, \
            zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    monkeypatch.setattr(files, "UNPACKED_SLACK", 0)  # the test's archive is small
    assert files.load_pth(tmp_path / "plain.pth")["w"].numel() == 2**20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read a bomb"))
    with pytest.raises(UserError, match=r"bomb.pth declares 4 MB unpacked from 0.0 MB on disk"):
        files.load_pth(tmp_path / "bomb.pth")
