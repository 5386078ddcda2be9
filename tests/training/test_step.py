"""training/step.py: one optimizer step (pre-clip norm, clipping, soft targets, mixed precision,
the uncompiled tail batch), the log window's sums, and the guard against non-finite steps."""

import copy

import pytest
import torch
from support import CPU, random_images, tiny_model, tiny_run

from convnext_cifar.config import DataConfig, OptimConfig, SchedConfig, TrainConfig
from convnext_cifar.model.optim import build_optimizer
from convnext_cifar.runtime import Runtime, prepare_model
from convnext_cifar.training.step import Guard, TrainStep, Window, cross_entropy_sum
from convnext_cifar.use.evaluate import evaluate


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append(len(x))
        return self.model(x)


def test_train_step_logs_preclip_norm_and_clips():
    model, fwd = prepare_model(tiny_model(), CPU)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), CPU.device)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    ref = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(ref(x), y, label_smoothing=0.1).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    step = TrainStep(fwd, opt, CPU, cross_entropy_sum(0.1), clip_grad_norm=1e-3)
    loss, norm = step(x, y)
    torch.testing.assert_close(norm, expected)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_soft_targets_train_like_the_class_indices_they_encode():
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    results = []
    for target in (y, torch.nn.functional.one_hot(y, 10).float()):
        model, fwd = prepare_model(tiny_model(), CPU)
        step = TrainStep(fwd, build_optimizer(model, OptimConfig(), CPU.device), CPU,
                         cross_entropy_sum(0.2), 5.0)
        results.append((step(x, target), model.stem[0].weight.detach().clone()))
    (la, na), wa = results[0]
    (lb, nb), wb = results[1]
    torch.testing.assert_close((la, na), (lb, nb))
    torch.testing.assert_close(wa, wb)
    soft = torch.full((8, 10), 0.1)  # a uniform target: the loss is the mean log-partition
    logits = torch.randn(8, 10)
    expected = -(torch.log_softmax(logits, 1) * soft).sum()
    torch.testing.assert_close(cross_entropy_sum(0.0)(logits, soft), expected)


@pytest.mark.slow  # a cold compile takes a minute on 2 cores
def test_compiled_train_step_matches_eager():
    results = []
    for compiled in (False, True):
        rt = Runtime(torch.device("cpu"), "fp32", compile=compiled, channels_last=True)
        model, fwd = prepare_model(tiny_model(), rt)
        step = TrainStep(fwd, build_optimizer(model, OptimConfig(), rt.device), rt,
                         cross_entropy_sum(0.1), 1.0)
        torch.manual_seed(1)
        x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (8,))
        results.append([step(x, y)[0] for _ in range(3)])
        if compiled:
            assert fwd is not model and hasattr(fwd, "_orig_mod")
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)
    assert results[1][2] < results[1][0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_and_fp16_uses_a_grad_scaler(precision):
    rt = Runtime(torch.device("cpu"), precision, compile=False, channels_last=True)
    model, fwd = prepare_model(tiny_model(), rt)
    step = TrainStep(fwd, build_optimizer(model, OptimConfig(), rt.device), rt,
                     cross_entropy_sum(0.1), 5.0)
    assert step.scaler.is_enabled() == (precision == "fp16")
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    before = model.stem[0].weight.detach().clone()
    losses = [step(x, y)[0] for _ in range(3)]
    assert all(torch.isfinite(v) for v in losses) and losses[0].dtype == torch.float32
    weight = model.stem[0].weight
    assert not torch.equal(before, weight) and weight.dtype == torch.float32


def test_the_tail_batch_runs_uncompiled_in_training_and_in_evaluation():
    rt = Runtime(torch.device("cpu"), "fp32", compile=True, channels_last=True)
    model, _ = prepare_model(tiny_model(), Runtime(torch.device("cpu"), "fp32", False, True))
    graph = Counting(model)  # stands in for the compiled module: counts what it is given
    step = TrainStep(graph, build_optimizer(model, OptimConfig(), rt.device), rt,
                     cross_entropy_sum(0.0), 5.0, eager=model, compiled_rows=8)
    for n in (8, 8, 3):  # two full batches and the epoch's tail
        step(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    assert graph.calls == [8, 8]  # the tail never reached the graph: no second compile
    graph.calls.clear()
    normalize = tiny_run(CPU, *random_images(8), TrainConfig()).normalize
    evaluate(graph, torch.randint(0, 256, (19, 3, 32, 32), dtype=torch.uint8),
             torch.randint(0, 10, (19,)), 8, normalize, rt, 10, eager=model)
    assert graph.calls == [8, 8]


def test_fp16_overflow_steps_are_counted_not_averaged_into_the_norm():
    window = Window(torch.device("cpu"))
    for norm in (2.0, float("inf"), 4.0, float("nan")):
        window.add(torch.tensor(1.0), torch.tensor(norm), 10)
    record = window.flush(1, 4, 1e-3)
    assert record["grad_norm"] == 3.0 and record["skipped_steps"] == 2
    window.add(torch.tensor(1.0), torch.tensor(5.0), 10)
    assert "skipped_steps" not in window.flush(1, 5, 1e-3)


def test_a_real_fp16_overflow_logs_a_finite_norm_and_the_skip(tmp_path):
    rt = Runtime(torch.device("cpu"), "fp16", compile=False, channels_last=True)
    cfg = TrainConfig(data=DataConfig(batch_size=8), sched=SchedConfig(epochs=2, warmup_epochs=1))
    run = tiny_run(rt, *random_images(16), cfg)
    run.step_fn.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**80)  # overflows at once
    window = Window(rt.device)
    for x, y, n in run.loader.epoch(0):
        window.add(*run.step_fn(x, y, n), n)
    record = window.flush(1, 2, 1e-3)
    assert record["skipped_steps"] >= 1 and record["grad_norm"] == record["grad_norm"]


def test_class_weights_against_a_hand_computation():
    import torch
    import torch.nn.functional as F

    from convnext_cifar.config import LossConfig
    from convnext_cifar.training.step import cross_entropy_sum

    labels = [0, 0, 0, 1]
    assert LossConfig("balanced").weights([3, 1, 0]) == pytest.approx([4 / 6, 2.0, 0.0])
    assert LossConfig("none").weights([3, 1]) is None
    assert LossConfig("1,2.5").weights([3, 1]) == [1.0, 2.5]
    w = torch.tensor([4 / 6, 2.0])
    logits = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor(labels)
    logp = F.log_softmax(logits, 1)
    eps = 0.2
    by_hand = sum((1 - eps) * w[y] * -logp[i, y] + eps / 2 * (w * -logp[i]).sum()
                  for i, y in enumerate(labels))
    assert cross_entropy_sum(eps, w)(logits, target) == pytest.approx(float(by_hand), rel=1e-5)
    soft = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.1, 0.9]])  # MixUp targets
    smoothed = soft * (1 - eps) + eps / 2
    by_hand = -(w * smoothed * logp).sum()
    assert cross_entropy_sum(eps, w)(logits, soft) == pytest.approx(float(by_hand), rel=1e-5)


def test_guard_counts_fp16_skips_only_in_a_row():
    guard = Guard(torch.device("cpu"), patience=3)
    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    for loss in (nan, nan, ok, nan, nan):
        guard.update(ok, loss)
    assert guard.tripped_at.item() == -1
    guard.update(ok, nan)
    assert guard.tripped_at.item() == 6
