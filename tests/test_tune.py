"""tune.py on its own (studies run for real in end_to_end/test_tune.py): the search space is
checked before anything runs, and a trial's values become a config the run accepts."""

import pytest
import torch

from convnext_cifar.config import TrainConfig
from convnext_cifar.errors import UserError
from convnext_cifar.tune import Dimension, parse_space


def test_the_space_parses_into_checked_dimensions():
    dims = parse_space(("optim.lr=log(1e-4,1e-2)", "--model.drop-path-rate=uniform(0, 0.3)",
                        "sched.warmup_epochs=int(0,5)", "eval.tta=choice(none,flip)",
                        "optim.clip_grad_norm=choice(null,1.0)"), TrainConfig())
    assert dims == [Dimension("optim.lr", "log", (1e-4, 1e-2)),
                    Dimension("model.drop_path_rate", "uniform", (0.0, 0.3)),
                    Dimension("sched.warmup_epochs", "int", (0, 5)),
                    Dimension("eval.tta", "choice", ("none", "flip")),
                    Dimension("optim.clip_grad_norm", "choice", (None, 1.0))]


@pytest.mark.parametrize("spec, message", [
    ("optim.lr", "write KEY=SPEC"),
    ("optim.speed=log(1,2)", "optim.speed is not a train option"),
    ("optim=log(1,2)", "optim is not a train option"),
    ("seed=int(0,9)", "seed cannot be searched"),
    ("optim.lr=normal(0,1)", "is not log\\(a,b\\), uniform\\(a,b\\)"),
    ("optim.lr=log(0,1)", "log\\(\\) needs low > 0"),
    ("optim.lr=uniform(2,1)", "the range needs low < high"),
    ("sched.epochs=uniform(1,9)", "sched.epochs is a int, not a float"),
    ("eval.tta=choice(none,sideways)", "'sideways' is not a valid"),
    ("sched.warmup_epochs=int(0,200)", "warmup_epochs.*must be >= 0 and shorter than"),
    # every value the study may draw is checked as the run would check it
    ("optim.accum_steps=int(1,4)", "optim.accum_steps: 3: .*must divide --data.batch-size 128"),
    ("model.pretrained=choice(none,nosuch)", "model.pretrained: 'nosuch': .*neither an existing"),
    ("model.pretrained=choice(none,/no/such.pth)", "weights file /no/such.pth does not exist"),
])
def test_a_bad_space_is_one_line_naming_the_bad_part(spec, message):
    with pytest.raises(UserError, match=message):
        parse_space((spec,), TrainConfig())


def test_a_key_given_twice_is_refused():
    with pytest.raises(UserError, match="or is given twice"):
        parse_space(("optim.lr=log(1e-4,1e-2)", "optim.lr=log(1e-3,1e-2)"), TrainConfig())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the choice is valid")
def test_a_device_that_is_not_here_is_refused_in_the_space():
    with pytest.raises(UserError, match="device: 'cuda': --device cuda: CUDA is not available"):
        parse_space(("device=choice(cpu,cuda)",), TrainConfig())


def test_an_int_range_is_checked_at_every_value_it_holds():
    assert parse_space(("optim.accum_steps=int(1,2)",), TrainConfig())[0].values == (1, 2)
    with pytest.raises(UserError, match="optim.accum_steps: 3: "):  # both ends divide 128
        parse_space(("optim.accum_steps=int(2,4)",), TrainConfig())


def test_a_trial_finished_after_the_list_was_read_is_not_taken_over(tmp_path, monkeypatch):
    """Two processes: one lists trial 0 as RUNNING, the other finishes it and frees its lock;
    the first must not resume a COMPLETE trial (it did, and counted it twice)."""
    import socket

    optuna = pytest.importorskip("optuna")
    from convnext_cifar.tune import _take_over

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr("host", socket.gethostname())
    (tmp_path / "trial-0").mkdir()
    stale = study.get_trials(deepcopy=True)  # RUNNING, as the first process read it
    study.tell(trial, 50.0)
    monkeypatch.setattr(study, "get_trials", lambda *a, **k: stale)
    assert _take_over(study, tmp_path) is None
