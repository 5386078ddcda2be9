"""training/distill.py: the distillation loss against a hand computation, the teacher's input
is the student's augmented batch (resized and renormalised), agreement and KL against a hand
count, a teacher of other classes refused, and what a resumption checks of the teacher."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from convnext_cifar.config import DistillConfig, TrainConfig
from convnext_cifar.data.kinds import load_dataset
from convnext_cifar.errors import UserError
from convnext_cifar.presets import CIFAR10Smoke
from convnext_cifar.training.build import build_run
from convnext_cifar.training.distill import distillation_loss, teacher_change, teacher_record
from convnext_cifar.training.step import cross_entropy_sum
from convnext_cifar.use.evaluate import evaluate, predict_logits
from tests.support import CPU, atto_checkpoint, data_cfg, tiny_model


def _hand_soft(student, teacher, t):
    """sum over images of sum_c p_t(c) (log p_t(c) - log p_s(c)) at temperature t, times t^2."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = [v / t for v in s_row]
        zt = [v / t for v in t_row]
        ls = [z - math.log(sum(math.exp(w) for w in zs)) for z in zs]
        lt = [z - math.log(sum(math.exp(w) for w in zt)) for z in zt]
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return total * t * t


def _hand_ce(student, labels, smoothing=0.0):
    total = 0.0
    for row, y in zip(student.tolist(), labels):
        logz = math.log(sum(math.exp(v) for v in row))
        logp = [v - logz for v in row]
        total += -(1 - smoothing) * logp[y] - smoothing * sum(logp) / len(row)
    return total


@pytest.mark.parametrize("alpha, t", [(0.5, 1.0), (0.9, 4.0), (1.0, 2.0), (0.0, 3.0)])
def test_the_soft_loss_is_the_hand_computation(alpha, t):
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4) * 3
    labels = [0, 3, 1, 1, 2]
    loss = distillation_loss(cross_entropy_sum(0.2), DistillConfig(
        teacher="t", alpha=alpha, temperature=t))(student, torch.tensor(labels), teacher)
    expected = ((1 - alpha) * _hand_ce(student, labels, 0.2)
                + alpha * _hand_soft(student, teacher.double(), t))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_hard_loss_is_the_cross_entropy_to_the_teachers_top_class():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = [0, 1, 2, 3, 4, 0]
    loss = distillation_loss(cross_entropy_sum(0.1), DistillConfig(
        teacher="t", alpha=0.5, kind="hard"))(student, torch.tensor(labels), teacher)
    expected = 0.5 * _hand_ce(student, labels, 0.1) + 0.5 * _hand_ce(
        student, teacher.argmax(1).tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_targets_of_mixup_pass_through_to_the_label_term():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    soft = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 1.0, 0], [0.25, 0.25, 0.25, 0.25]])
    got = distillation_loss(cross_entropy_sum(0.0), DistillConfig(teacher="t", alpha=0.25))(
        student, soft, teacher)
    plain = -(soft * student.log_softmax(1)).sum()
    kd = F.kl_div(student.log_softmax(1), teacher.log_softmax(1), reduction="sum",
                  log_target=True)
    assert got.item() == pytest.approx((0.75 * plain + 0.25 * kd).item(), rel=1e-5)


def _teacher_file(path, classes, **config):
    return atto_checkpoint(path, classes=tuple(classes), **config)


@pytest.mark.parametrize("teacher_data, size", [
    ({}, 48),  # the student's own normalisation: exactly the resized batch
    ({"mean": (100.0, 110.0, 120.0), "std": (60.0, 50.0, 40.0)}, 32),  # its own normalisation
])
def test_the_teacher_sees_exactly_the_students_augmented_batch(cifar_root, tmp_path,
                                                               teacher_data, size):
    data = load_dataset(data_cfg(cifar_root, limit_train=64, limit_val=16), "cpu")
    smoke = CIFAR10Smoke()
    teacher_cfg = dataclasses.replace(smoke.data, **teacher_data)
    path = _teacher_file(tmp_path / "teacher.safetensors", data.classes, data=teacher_cfg)
    cfg = dataclasses.replace(
        smoke, device="cpu", compile="off", data=data_cfg(cifar_root, limit_train=64,
                                                          limit_val=16, batch_size=16),
        aug=dataclasses.replace(smoke.aug, mixup_alpha=0.8, cutmix_alpha=1.0,
                                randaugment="rand-m9-n2", erasing_prob=0.5),
        distill=DistillConfig(teacher=str(path), image_size=size))
    run = build_run(cfg, CPU, data=data, pretrained=False)
    seen = []
    run.teacher.loaded.model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x, y, n = next(iter(run.loader.epoch(0)))
    run.step_fn(x, y, n)
    (teacher_input,) = seen
    student = run.loader.normalize
    if not teacher_data:
        expected = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.equal(teacher_input, expected)
    else:  # the pixels the student's input stands for, normalised as the teacher was trained
        pixels = x / student.inv_std + student.mean
        mean = torch.tensor(teacher_data["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(teacher_data["std"]).view(1, 3, 1, 1)
        torch.testing.assert_close(teacher_input, (pixels - mean) / std, rtol=0, atol=1e-5)
    assert teacher_input.is_contiguous(memory_format=torch.channels_last)
    assert not run.teacher.loaded.model.training
    assert not any(p.requires_grad for p in run.teacher.loaded.model.parameters())


def test_a_teacher_of_other_classes_is_refused_naming_them(cifar_root, tmp_path):
    data = load_dataset(data_cfg(cifar_root, limit_train=32, limit_val=8), "cpu")
    path = _teacher_file(tmp_path / "t.safetensors", ["cat", "dog", "zebra"])
    cfg = dataclasses.replace(CIFAR10Smoke(), device="cpu", compile="off",
                              distill=DistillConfig(teacher=str(path)))
    with pytest.raises(UserError, match=r"its classes are not this dataset's \(only the "
                                        r"teacher has: zebra; only the data has: airplane, "):
        build_run(cfg, CPU, data=data, pretrained=False)


def test_agreement_and_kl_against_a_hand_count():
    torch.manual_seed(3)
    model = tiny_model().eval()
    images, labels = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8), torch.zeros(
        23, dtype=torch.long)
    from convnext_cifar.data.loader import Normalize

    normalize = Normalize((120.0,) * 3, (60.0,) * 3, 32, "cpu", True)
    with torch.inference_mode():
        student = predict_logits(model, normalize(images), CPU).log_softmax(1)
    reference = torch.randn(23, 10).log_softmax(1)
    reference[:7] = student[:7] + 0.0  # some images agree for sure
    result = evaluate(model, images, labels, 5, normalize, CPU, 10, reference=reference)
    same = sum(int(a == b) for a, b in zip(student.argmax(1).tolist(),
                                           reference.argmax(1).tolist()))
    kl = sum(sum(math.exp(r) * (r - s) for r, s in zip(rr, ss))
             for rr, ss in zip(reference.tolist(), student.tolist())) / 23
    assert result.agreement == pytest.approx(100.0 * same / 23)
    assert result.reference_kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert {"agreement", "teacher_kl"} <= set(result.record())
    assert "agreement" not in evaluate(model, images, labels, 5, normalize, CPU, 10).record()


def test_a_resumption_checks_the_teachers_bytes_not_its_path(tmp_path):
    a = atto_checkpoint(tmp_path / "a.safetensors")
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(a.read_bytes())
    from convnext_cifar.files import file_hash

    recorded = {"file": "a.safetensors", "sha256": file_hash(a)}
    assert teacher_change(recorded, DistillConfig(teacher=str(moved))) == ""
    other = atto_checkpoint(tmp_path / "b.safetensors", classes=("x", "y", "z"))
    assert "holds other weights than the run's teacher (a.safetensors" in teacher_change(
        recorded, DistillConfig(teacher=str(other)))
    assert "the run had no teacher" in teacher_change({}, DistillConfig(teacher=str(a)))
    assert "distillation was on" in teacher_change(recorded, DistillConfig())
    assert teacher_change({}, DistillConfig()) == "" and teacher_record(None) == {}


@pytest.mark.parametrize("option, value, message", [
    ("alpha", 1.5, "--distill.alpha 1.5: must be in [0, 1]"),
    ("temperature", 0.0, "--distill.temperature 0.0: must be in (0, 100]"),
    ("image_size", 8, "--distill.image-size 8: must be 0"),
])
def test_bad_distillation_values_name_the_option(option, value, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]")):
        DistillConfig(**{option: value})
    assert TrainConfig().distill == DistillConfig() and not DistillConfig().on


def _run_with_teacher(cifar_root, teacher):
    data = load_dataset(data_cfg(cifar_root, limit_train=64, limit_val=16), "cpu")
    smoke = CIFAR10Smoke()
    cfg = dataclasses.replace(smoke, device="cpu", compile="off",
                              data=data_cfg(cifar_root, limit_train=64, limit_val=16,
                                            batch_size=16),
                              distill=DistillConfig(teacher=str(teacher)))
    return build_run(cfg, CPU, data=data, pretrained=False)


def test_weights_of_another_layout_teach_as_the_run_they_came_from(cifar_root, tmp_path,
                                                                    trained, capsys):
    """`convert` of a run's best weights (timm layout, class names kept) teaches exactly as the
    run's own file does: the same logits for the same batch."""
    from convnext_cifar.model.build import convert_to_timm

    converted = tmp_path / "timm.safetensors"
    convert_to_timm(str(trained / "best.safetensors"), converted)
    own, other = (_run_with_teacher(cifar_root, t) for t in (trained, converted))
    x, _, _ = next(iter(own.loader.epoch(0)))
    assert torch.equal(own.teacher(x), other.teacher(x))
    assert other.teacher.notes == ["teacher timm.safetensors (timm layout, convnextv2_atto)"]


def test_other_weights_without_class_names_are_taken_in_the_datas_order_and_said(
        cifar_root, tmp_path, trained):
    from convnext_cifar.model.checkpoints import load_weights

    plain = tmp_path / "plain.pth"  # a bare timm state dict, as torch.save writes it
    torch.save(load_weights(trained / "best.safetensors").state_dict, plain)
    run = _run_with_teacher(cifar_root, plain)
    (note,) = run.teacher.notes
    assert "its 10-class head is kept: the weights name no classes" in note


def test_other_weights_that_cannot_teach_these_classes_are_refused(cifar_root, tmp_path,
                                                                  trained):
    from convnext_cifar.model.checkpoints import load_weights

    weights = load_weights(trained / "best.safetensors").state_dict
    backbone = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in weights.items() if not k.startswith("head.fc")}, backbone)
    with pytest.raises(UserError, match="no classifier head .* fine-tune it on this data"):
        _run_with_teacher(cifar_root, backbone)
    three = tmp_path / "three.pth"
    torch.save({**weights, "head.fc.weight": weights["head.fc.weight"][:3],
                "head.fc.bias": weights["head.fc.bias"][:3]}, three)
    with pytest.raises(UserError, match="its head has 3 outputs and names no classes"):
        _run_with_teacher(cifar_root, three)
