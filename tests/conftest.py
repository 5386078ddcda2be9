import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the cores (pyproject's -n): one torch thread each, also in the
    # processes the tests start (they inherit this). Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def signal_at_step(monkeypatch, at_step: int, signum: int = signal.SIGTERM):
    """Deliver `signum` to this process (through the real handler) right after training step
    `at_step`; returns the function that restores the real step."""
    from convnext_cifar import engine

    real, calls = engine.TrainStep.__call__, []

    def step_then_signal(self, x, y, n=None):
        out = real(self, x, y, n)
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(engine.TrainStep, "__call__", step_then_signal)
    return lambda: monkeypatch.setattr(engine.TrainStep, "__call__", real)


def die_after_state(monkeypatch, count: int = 1):
    """A hard kill (SystemExit) right after the `count`-th training state is on disk; returns
    the function that restores the real save."""
    from convnext_cifar.resume import TrainingState

    real, saved = TrainingState.save, []

    def save_then_die(*args, **kwargs):
        path = real(*args, **kwargs)
        saved.append(path)
        if len(saved) == count:
            raise SystemExit("killed")
        return path

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    return lambda: monkeypatch.setattr(TrainingState, "save", real)
