"""`train --distill.teacher`: a student learns from a trained run of this project; what the run
records and shows (agreement, the teacher's top-1, `runs`, the report); a SIGTERM or a kill
resumes bit-exactly; the teacher's path may move, its bytes may not; mistakes are one line."""

import html
import json
import shutil

import pytest
import torch

from convnext_cifar import cli
from convnext_cifar.config import TrainConfig
from convnext_cifar.errors import UserError
from convnext_cifar.outputs.workdir import find_states
from convnext_cifar.tune import parse_space
from tests.support import (
    EXACT,
    assert_same_run,
    atto_checkpoint,
    die_after_state,
    read_weights,
    signal_at_step,
    small_run_args,
    timeless_records,
)

DISTIL = ("--distill.alpha", "0.7", "--distill.temperature", "2", "--distill.image-size", "40",
          "--aug.mixup-alpha", "0.8")


def run(root, work, teacher, *extra):
    return cli.main(small_run_args(root, work, *EXACT, "--distill.teacher", str(teacher),
                                   *DISTIL, *extra))


@pytest.fixture(scope="module")
def teacher(trained, tmp_path_factory):
    """The trained fixture's best weights, copied (tests below move and replace the file)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    shutil.copy(trained / "best.safetensors", path)
    return path


@pytest.fixture(scope="module")
def reference(cifar_root, teacher, tmp_path_factory):
    work = tmp_path_factory.mktemp("distilled")
    assert run(cifar_root, work, teacher) == 0
    return work


def _val(work):
    return [r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
            if "top1" in r]


def test_a_distilled_run_records_agreement_and_the_teachers_top1(reference, cifar_root, capsys,
                                                                 teacher):
    val = _val(reference)
    assert len(val) == 3
    assert len({r["teacher_top1"] for r in val}) == 1  # measured once
    assert all(0 <= r["agreement"] <= 100 and r["teacher_kl"] >= 0 for r in val)
    log = (reference / "train.log").read_text()
    assert "teacher teacher.safetensors: convnextv2_atto at 40x40, held-out top-1 " \
           f"{val[0]['teacher_top1']:.2f}; distillation soft, alpha 0.7, T 2.0" in log
    assert f"agreement {val[-1]['agreement']:.2f} kl " in log
    config = json.loads((reference / "config.json").read_text())
    assert config["distill"] == {"teacher": str(teacher), "alpha": 0.7, "temperature": 2.0,
                                 "kind": "soft", "image_size": 40}
    capsys.readouterr()
    assert cli.main(["runs", str(reference), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["teacher"] == "teacher.safetensors"
    assert row["last_agreement"] == val[-1]["agreement"]


def test_the_report_shows_the_agreement_curve(reference, trained, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.html"
    assert cli.main(["report", str(reference), "--out", str(out)]) == 0
    page = html.unescape(out.read_text())
    # the figure's alt text names the lines actually drawn: all three series had data
    assert ("agreement with the distillation teacher per epoch: the share of held-out images "
            "whose top class is the teacher's, beside the teacher's and the student's top-1 "
            "(agreement with the teacher, teacher top-1, student top-1)") in page
    assert "mean KL divergence of the student's held-out predictions" in page
    plain = tmp_path / "plain.html"  # a run without a teacher: no distillation figures
    assert cli.main(["report", str(trained), "--out", str(plain)]) == 0
    assert "distillation teacher" not in plain.read_text()
    assert not (tmp_path / "plain-distillation.png").exists()
    assert (tmp_path / "r-distillation.png").exists() and (tmp_path / "r-teacher_kl.png").exists()


def test_sigterm_then_resume_is_bit_exact_with_a_teacher(cifar_root, tmp_path, reference,
                                                         teacher, monkeypatch):
    restore = signal_at_step(monkeypatch, 6)  # mid-epoch 2
    assert run(cifar_root, tmp_path, teacher) == 143
    restore()
    assert run(cifar_root, tmp_path, teacher, "--resume", "auto") == 0
    assert_same_run(reference, tmp_path)


def test_a_kill_after_a_state_then_resume_is_bit_exact_with_a_teacher_moved(
        cifar_root, tmp_path, reference, teacher, monkeypatch):
    restore = die_after_state(monkeypatch, 1)
    with pytest.raises(SystemExit):
        run(cifar_root, tmp_path / "w", teacher)
    restore()
    moved = tmp_path / "moved.safetensors"  # the same bytes at another path: the same teacher
    shutil.copy(teacher, moved)
    assert cli.main(["train", "--resume", str(tmp_path / "w"),
                     "--distill.teacher", str(moved)]) == 0
    work = tmp_path / "w"  # the same weights and records (the config names the new path)
    assert timeless_records(work) == timeless_records(reference)
    names = sorted(p.name for p in work.glob("*.safetensors"))
    assert names == sorted(p.name for p in reference.glob("*.safetensors"))
    for name in names:
        a, b = read_weights(work / name)[0], read_weights(reference / name)[0]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_resumption_with_another_teacher_is_refused_and_changes_nothing(
        cifar_root, tmp_path, teacher, trained, monkeypatch, capsys):
    restore = signal_at_step(monkeypatch, 2)
    assert run(cifar_root, tmp_path, teacher) == 143
    restore()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    other = tmp_path.parent / "other.safetensors"
    shutil.copy(trained / "epoch_1.safetensors", other)  # same model and classes, other weights
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path), "--distill.teacher", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds other weights than the run's teacher" in err
    assert "--resume-allow-changes" in err
    assert cli.main(["train", "--resume", str(tmp_path), "--distill.teacher", ""]) == 2
    assert "distillation was on" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path), "--distill.alpha", "0.2"]) == 2
    assert "the config differs in distill.alpha (0.7 -> 0.2)" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before
    assert len(find_states(tmp_path)) == 1


@pytest.mark.parametrize("teacher_arg, message", [
    ("nowhere.safetensors", "nowhere.safetensors"),
    ("FOREIGN", "not weights this project reads (cannot tell the checkpoint layout"),
    ("OTHER_CLASSES", "its classes are not this dataset's (only the teacher has: a, b, c; "
                      "only the data has: airplane"),
])
def test_a_teacher_that_is_not_a_checkpoint_is_one_line(cifar_root, tmp_path, capsys,
                                                        teacher_arg, message):
    if teacher_arg == "FOREIGN":
        import torch
        from safetensors.torch import save_file

        teacher_arg = str(tmp_path / "foreign.safetensors")
        save_file({"w": torch.zeros(2)}, teacher_arg)
    if teacher_arg == "OTHER_CLASSES":
        teacher_arg = str(atto_checkpoint(tmp_path / "abc.safetensors"))
    capsys.readouterr()
    assert run(cifar_root, tmp_path / "w", teacher_arg) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "w" / "best.safetensors").exists()


def test_tune_can_search_the_distillation_weight_and_temperature(teacher):
    base = TrainConfig()
    dims = parse_space(("distill.alpha=uniform(0,1)", "distill.temperature=log(1,8)",
                        "distill.kind=choice(soft,hard)"), base)
    assert [d.key for d in dims] == ["distill.alpha", "distill.temperature", "distill.kind"]
    with pytest.raises(UserError, match="distill.alpha"):
        parse_space(("distill.alpha=uniform(0,2)",), base)
