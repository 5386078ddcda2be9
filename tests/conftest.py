"""Fixtures the tests share: a small learnable CIFAR-10 in the official layout, image folders,
and finished runs to read."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the cores (pyproject's -n): one torch thread each, also in the
    # processes the tests start (they inherit this). Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The user's cache folder (decode caches, warnings given once): never the real ~/.cache here; each
# test gets its own below (`own_user_cache`), the session's fixtures this one.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="convnext-cifar-test-cache-")

from cifar_files import learnable_images, write_cifar10, write_image_folder  # noqa: E402
from support import FEW, small_run_args  # noqa: E402

from convnext_cifar import cli  # noqa: E402


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small learnable CIFAR-10 in the official on-disk layout (Python 2 pickles).

    1000 training images, 300 test images (not a multiple of any batch size used).
    """
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, learnable_images(1000, seed=0), learnable_images(300, seed=1))
    return root


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    write_image_folder(root, {"train": {"cat": 12, "dog": 10, "eel": 8},
                              "val": {"cat": 4, "dog": 4, "eel": 3}})
    return root


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    root = tmp_path_factory.mktemp("pics")
    write_image_folder(root, {"train": {"a": 30, "b": 12, "c": 6}, "val": {"a": 6, "b": 5, "c": 4}})
    (root / "train" / "b" / "0003.png").write_bytes(b"not an image")  # a skipped cache row
    return root


@pytest.fixture(scope="module")
def run_dir(cifar_root, tmp_path_factory):
    """A finished 2-epoch atto run on the generated CIFAR-10, barely trained (mistakes)."""
    work = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(small_run_args(cifar_root, work, *FEW, "--optim.lr", "1e-4",
                                   "--aug.randaugment", "rand-m9-n2")) == 0
    return work


@pytest.fixture(scope="module")
def trained(cifar_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("trained")
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "2",
                                   "--data.limit-train", "300")) == 0
    return work


@pytest.fixture(autouse=True)
def own_user_cache(tmp_path_factory, monkeypatch):
    """Each test its own user cache folder ($XDG_CACHE_HOME): what one test's commands said
    once or decoded is not another's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
