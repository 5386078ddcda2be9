"""training/signals.py: SIGTERM or a first Ctrl-C finish the step and end with the resume
command; a second Ctrl-C quits at once; the handlers before the run come back after it."""

import os
import signal
from pathlib import Path

import pytest
import torch

from convnext_cifar.config import TrainConfig
from convnext_cifar.distributed import Dist
from convnext_cifar.training.signals import StopSignals
from convnext_cifar.training.state import Position


def test_a_signal_asks_for_a_stop_and_the_handlers_come_back(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested and not stop.agreed(Dist(), False, torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.agreed(Dist(), False, torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert "SIGTERM: finishing this step, then writing a resumable state" in capsys.readouterr().err


def test_a_second_ctrl_c_quits_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_the_interruption_says_where_it_stopped_and_how_to_resume():
    stop = StopSignals()
    stop.signum = signal.SIGINT
    cfg = TrainConfig(work_dir=Path("work_dirs/run"))
    mid = stop.interrupted(Path("work_dirs/run/state_00000012.pt"), Position(1, 2, 12), cfg)
    assert mid.exit_code == 130 and str(mid) == (
        "SIGINT: stopped at epoch 2, batch 2 (step 12); state saved to "
        "work_dirs/run/state_00000012.pt. Resume with: convnext-cifar train --resume "
        "work_dirs/run")
    end = StopSignals().interrupted(Path("s.pt"), Position(3, 0, 30), cfg)
    assert end.exit_code == 143 and "stopped at the end of epoch 3 (step 30)" in str(end)
