"""training/state.py: a training state saves and restores every component by its name."""


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
    assert [p.name for p in find_states(tmp_path)] == ["state_00000005.pt"]  # keep_last 1
