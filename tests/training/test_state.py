"""training/state.py: a training state saves and restores every component by its name, and is
written in the background while training goes on."""


import threading

import pytest
import torch

from convnext_cifar import errors
from convnext_cifar.outputs.workdir import find_states
from convnext_cifar.training.state import Position, TrainingState, load_state


def test_training_state_saves_and_restores_every_component_by_name(tmp_path):
    from convnext_cifar.config import TrainConfig
    from convnext_cifar.distributed import Dist

    class Counter:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"value": torch.tensor(self.value)}

        def load_state_dict(self, state):
            self.value = int(state["value"])

    cfg = TrainConfig(work_dir=tmp_path, keep_last=1)
    model, position = torch.nn.Linear(2, 2), Position(step=3)
    saved = TrainingState(cfg, Dist(), 1, {"run": position, "model": model, "extra": Counter(7)})
    path = saved.save()
    saved.written()  # written in the background: on disk from here
    state = load_state(path)
    assert path.name == "state_00000003.pt"
    assert set(state["components"]) == {"run", "model", "extra"}
    fresh, target = Counter(0), torch.nn.Linear(2, 2)
    TrainingState(cfg, Dist(), 1, {"run": Position(), "model": target, "extra": fresh}).restore(
        state, path)
    assert fresh.value == 7 and torch.equal(target.weight, model.weight)
    more = TrainingState(cfg, Dist(), 1, {"run": Position(), "model": target, "ema": Counter(0)})
    with pytest.raises(errors.UserError, match="holds no ema"):
        more.restore(state, path)
    # a component declared optional may be missing from older states: it stays as it is
    newer = Counter(5)
    TrainingState(cfg, Dist(), 1, {"run": Position(), "model": target, "ema": newer},
                  optional=("ema",)).restore(state, path)
    assert newer.value == 5
    position.step = 5
    saved.save()
    saved.written()
    assert [p.name for p in find_states(tmp_path)] == ["state_00000005.pt"]  # keep_last 1


def _state(tmp_path, model, **cfg):
    from convnext_cifar.config import TrainConfig
    from convnext_cifar.distributed import Dist

    return TrainingState(TrainConfig(work_dir=tmp_path, **cfg), Dist(), 1,
                         {"run": Position(step=1), "model": model})


def test_a_state_holds_the_tensors_as_they_were_when_it_was_taken(tmp_path, monkeypatch):
    """Training goes on while the state is written: the file has the values of the moment
    `save` returned, and `on_disk` runs on the caller's thread once the file is complete."""
    from convnext_cifar.training import state as state_module

    model = torch.nn.Linear(2, 2)
    taken = model.weight.detach().clone()
    release, real = threading.Event(), state_module.save_state

    def slow_save(path, snapshot):
        release.wait(5)
        real(path, snapshot)

    monkeypatch.setattr(state_module, "save_state", slow_save)
    state, calls = _state(tmp_path, model), []
    path = state.save(on_disk=lambda: calls.append(path.exists()))
    with torch.no_grad():
        model.weight.add_(1.0)  # the next steps change the live tensors at once
    assert not path.exists() and calls == []  # still being written, nobody told yet
    release.set()
    state.written()
    assert calls == [True]
    assert torch.equal(load_state(path)["components"]["model"]["weight"], taken)


def test_a_failed_write_is_raised_at_the_next_save_or_when_the_run_ends(tmp_path, monkeypatch):
    from convnext_cifar.training import state as state_module

    def full_disk(path, snapshot):
        raise errors.UserError(f"could not write training state {path}: No space left")

    monkeypatch.setattr(state_module, "save_state", full_disk)
    state = _state(tmp_path, torch.nn.Linear(2, 2))
    state.save()
    with pytest.raises(errors.UserError, match="No space left"):
        state.save()
    state.save()
    with pytest.raises(errors.UserError, match="No space left"), state.writing():
        pass
    state.save()
    with pytest.raises(RuntimeError, match="the run's own error"), state.writing():
        raise RuntimeError("the run's own error")  # not hidden by the write's


def test_the_plateau_counts_validations_without_a_gain_beyond_the_delta():
    position = Position()
    for value, delta, plateau in ((50.0, 0.5, 0),  # the first validation is a gain
                                  (50.4, 0.5, 1),  # less than the delta: no gain
                                  (50.5, 0.5, 2),  # exactly the delta: no gain either
                                  (51.1, 0.5, 0),  # +1.1 over the last counted best
                                  (51.0, 0.0, 1)):
        position.observe(value, delta)
        assert position.plateau == plateau
    assert position.plateau_best == 51.1
    restored = Position()
    restored.load_state_dict(position.state_dict())
    assert (restored.plateau, restored.plateau_best) == (1, 51.1)
    old = Position()
    old.load_state_dict({"epoch": 3, "batch": 0, "step": 9})  # a state from before the plateau
    assert (old.plateau, old.plateau_best, old.stopped_early) == (0, -1.0, False)
