import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cifar_files import learnable_images, write_cifar10  # noqa: E402


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small learnable CIFAR-10 in the official on-disk layout (Python 2 pickles).

    1000 training images, 300 test images (not a multiple of any batch size used).
    """
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, learnable_images(1000, seed=0), learnable_images(300, seed=1))
    return root


def small_run_args(root: Path, work_dir: Path, *extra: str) -> list[str]:
    """`train` arguments for a quick CPU run of atto on the generated data."""
    return ["train", "--preset", "smoke", "--data.root", str(root), "--data.no-download",
            "--work-dir", str(work_dir), "--data.batch-size", "50", "--data.limit-train", "0",
            "--data.limit-val", "0", "--log-interval", "5", "--device", "cpu", "--compile", "off",
            *extra]
