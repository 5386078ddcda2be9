"""data/cifar.py: CIFAR-10 and CIFAR-100 read exactly from their Python 2 pickles, checked
downloads, damaged and foreign files refused in one line."""

import dataclasses
import hashlib
import io
import os
import tarfile
import urllib.request

import numpy as np
import pytest
import torch
from cifar_files import dump_py3, learnable_images, write_cifar10, write_cifar100

from convnext_cifar.config import DataConfig
from convnext_cifar.data import kinds as data_kinds
from convnext_cifar.data.cifar import CIFAR10, CIFAR100
from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.errors import UserError


def data_cfg(root, **kw):
    return dataclasses.replace(DataConfig(), root=root, download=False, **kw)


def load_cifar10(c):
    return load_dataset(c)


def _archive(tmp_path):
    src = tmp_path / "src"
    write_cifar10(src, learnable_images(10, 0), learnable_images(4, 1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


class _Response(io.BytesIO):
    """What urlopen returns, as far as download reads it."""

    def __init__(self, blob: bytes):
        super().__init__(blob)
        self.headers = {"Content-Length": str(len(blob))}


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    write_cifar100(root, learnable_images(300, 0, 100), learnable_images(50, 1, 100))
    return root


def test_reads_python2_pickles_exactly(tmp_path):
    train, test = learnable_images(37, seed=3), learnable_images(11, seed=4)
    write_cifar10(tmp_path, train, test)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02" and b"U\x04data" in raw  # Python 2 byte-string keys
    ds = load_cifar10(data_cfg(tmp_path))
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (37, 3, 32, 32)
    assert torch.equal(ds.train.images, torch.from_numpy(train[0]))
    assert torch.equal(ds.train.labels, torch.from_numpy(train[1]))
    assert torch.equal(ds.val.images, torch.from_numpy(test[0]))
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert (ds.mean, ds.std) == (CIFAR10.mean, CIFAR10.std)  # CIFAR-10's own, when not given
    own = load_cifar10(data_cfg(tmp_path, mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0)))
    assert (own.mean, own.std) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))


def test_user_copy_with_other_batch_sizes_loads_with_one_warning(tmp_path, capsys):
    train, test = learnable_images(23, seed=5), learnable_images(7, seed=6)
    write_cifar10(tmp_path, train, test, dump=dump_py3)  # re-pickled by Python 3
    ds = load_cifar10(data_cfg(tmp_path, limit_val=5))
    assert len(ds.train.images) == 23 and len(ds.val.images) == 5
    (note,) = ds.notes
    assert "not byte-identical to the official archive" in note and "data_batch_1" in note
    assert load_cifar10(data_cfg(tmp_path)).notes == []  # said once for these files (a note
    # in the user's cache); the same folder with other files is said again
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes() + b"x")
    os.utime(tmp_path / "cifar-10-batches-py" / "test_batch", ns=(1, 1))
    assert len(load_cifar10(data_cfg(tmp_path, limit_val=5)).notes) == 1


def test_missing_data_without_download_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="CIFAR-10 not found.*--data.root"):
        load_cifar10(data_cfg(tmp_path))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "cannot read"),
    (lambda p: p.unlink(), "missing"),
    (lambda p: dump_py3({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, p),
     "expected uint8"),
    (lambda p: dump_py3({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, p),
     r"labels must be in \[0, 9\]"),
])
def test_damaged_batch_files_are_reported(tmp_path, damage, message):
    write_cifar10(tmp_path, learnable_images(10, 0), learnable_images(4, 1))
    damage(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    with pytest.raises(UserError, match=message):
        load_cifar10(data_cfg(tmp_path))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    write_cifar10(tmp_path, learnable_images(10, 0), learnable_images(4, 1))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    dump_py3({"data": Payload(), "labels": []}, tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(UserError, match="refusing to load"):
        load_cifar10(data_cfg(tmp_path))
    assert not marker.exists()


def test_download_verifies_checksum_and_unpacks(tmp_path, monkeypatch, capsys):
    blob = _archive(tmp_path)
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: urls.append(url) or _Response(blob))
    monkeypatch.setitem(data_kinds.DATASETS, "cifar10", dataclasses.replace(
        CIFAR10, archive_md5=hashlib.md5(blob).hexdigest()))
    ds = load_cifar10(dataclasses.replace(DataConfig(), root=tmp_path / "dl", download=True))
    assert len(ds.train.images) == 10 and not list((tmp_path / "dl").glob("*.part"))
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    err = capsys.readouterr().err  # progress: the whole (small) archive in one read, 100 %
    assert "downloading https://www.cs.toronto.edu" in err and "(100 %)" in err

    monkeypatch.setitem(data_kinds.DATASETS, "cifar10", dataclasses.replace(
        CIFAR10, archive_md5="0" * 32))
    with pytest.raises(UserError, match="MD5"):
        load_cifar10(dataclasses.replace(DataConfig(), root=tmp_path / "dl2", download=True))
    assert not (tmp_path / "dl2" / "cifar-10-batches-py").exists()


def test_cifar100_fine_and_coarse_labels_and_names(cifar100_root):
    fine = load_dataset(data_cfg(cifar100_root, dataset="cifar100"))
    train, _ = learnable_images(300, 0, 100)
    assert fine.num_classes == 100 and fine.classes[7] == "fine_07"
    assert torch.equal(fine.train.images, torch.from_numpy(train))
    assert (fine.mean, fine.std) == (CIFAR100.mean, CIFAR100.std)  # CIFAR-100's own
    coarse = load_dataset(data_cfg(cifar100_root, dataset="cifar100", labels="coarse"))
    assert coarse.num_classes == 20 and coarse.classes[3] == "coarse_03"
    assert torch.equal(coarse.train.labels, fine.train.labels // 5)
    assert len(fine.notes) == 1 and "not byte-identical" in fine.notes[0]


def test_cifar100_download_checks_the_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar100(src, learnable_images(20, 0, 100), learnable_images(5, 1, 100))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    blob, urls = buf.getvalue(), []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: urls.append(url) or io.BytesIO(blob))
    monkeypatch.setitem(data_kinds.DATASETS, "cifar100", dataclasses.replace(
        CIFAR100, archive_md5=hashlib.md5(blob).hexdigest()))
    data = load_dataset(dataclasses.replace(data_cfg(tmp_path / "dl", dataset="cifar100"),
                                            download=True))
    assert len(data.train.images) == 20
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train").unlink(), "missing"),
    (lambda d: (d / "test").write_bytes((d / "test").read_bytes()[:500]), "cannot read"),
    (lambda d: dump_py3({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]},
                        d / "train"), r"labels must be in \[0, 99\]"),
])
def test_damaged_cifar100_is_one_clear_error(tmp_path, damage, message):
    folder = write_cifar100(tmp_path, learnable_images(20, 0, 100), learnable_images(5, 1, 100))
    damage(folder)
    with pytest.raises(UserError, match=message):
        load_dataset(data_cfg(tmp_path, dataset="cifar100"))
    with pytest.raises(UserError, match="CIFAR-100 not found"):
        load_dataset(data_cfg(tmp_path / "elsewhere", dataset="cifar100"))
