"""errors.py: which errors a user can fix (exit 2), a diverged run (exit 1), an interruption
(128 + signal), and a pruned trial (not a user error: tune handles it)."""

import signal
import sys

import pytest

from convnext_cifar.errors import Interrupted, Pruned, TrainingDiverged, UserError, need_extra


def test_exit_codes_travel_with_the_errors():
    assert getattr(UserError("x"), "exit_code", 2) == 2  # cli.py's default for a UserError
    diverged = TrainingDiverged("nan at step 3")
    assert isinstance(diverged, UserError) and diverged.exit_code == 1
    stopped = Interrupted("SIGTERM: stopped", 128 + signal.SIGTERM)
    assert stopped.exit_code == 143 and str(stopped) == "SIGTERM: stopped"
    assert not isinstance(stopped, UserError)  # its own line, its own exit code


def test_a_pruned_trial_is_not_a_user_error():
    assert not isinstance(Pruned("pruned after epoch 2"), UserError)


def test_a_missing_extra_is_one_line_naming_it_and_how_to_install(monkeypatch):
    assert need_extra("json", "reading", "none").dumps([1]) == "[1]"
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError) as e:
        need_extra("onnx", "ONNX export", "export")
    assert str(e.value) == "ONNX export needs the export extra: pip install '.[export]' from the " \
                           "project's clone"
