"""training/micro_batch.py on its own: the candidates, the bytes a forward keeps (counted
tensor by tensor), the CPU's budget, trial steps that run out of memory (injected) backing off
to a smaller micro-batch with nothing they touched changed, the choice read back and said."""

import random

import pytest
import torch
from support import random_images, tiny_run

from convnext_cifar.config import DataConfig, TrainConfig
from convnext_cifar.errors import UserError
from convnext_cifar.runtime import Runtime
from convnext_cifar.training import micro_batch
from convnext_cifar.training.micro_batch import (
    GIB,
    candidates,
    choice_line,
    choose,
    kept_bytes,
    memory_cap,
    micro_batch_of,
    resolve_auto_micro_batch,
    step_estimate,
    with_micro_batch,
)

CPU = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)


def a_run(memory: float = 0.0, batch: int = 16):
    cfg = TrainConfig(data=DataConfig(batch_size=batch, micro_batch="auto",
                                      micro_batch_memory=memory))
    return tiny_run(CPU, *random_images(64), cfg)


def out_of_memory_above(monkeypatch, rows: int, error=None):
    """Training convolutions of more than `rows` images fail as a GPU's allocator would."""
    real = torch.nn.Module.__call__

    def call(self, *args, **kwargs):
        if self.training and len(args[0]) > rows:
            raise error or torch.OutOfMemoryError(f"CUDA out of memory (injected: {len(args[0])})")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Conv2d, "__call__", call)


def test_the_candidates_divide_the_share_largest_first():
    assert candidates(128) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert candidates(96) == [96, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    assert candidates(1) == [1]


def test_a_forward_keeps_each_storage_once_and_not_the_weights():
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    # Linear keeps its input (10 floats an image), ReLU its output, which is the second
    # Linear's input (20 floats, one storage); the weights are not counted
    for rows in (1, 3, 7):
        assert kept_bytes(net, torch.randn(rows, 10), CPU) == rows * (10 + 20) * 4


def test_the_estimate_is_the_weights_four_times_and_a_per_image_part_that_scales():
    run = a_run()
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fixed, per_image = step_estimate(run, x)
    weights = sum(t.numel() * 4 for t in (*run.model.parameters(), *run.model.buffers()))
    assert fixed >= 4 * weights + x.numel() * 4
    assert kept_bytes(run.model, x[:4], CPU) == pytest.approx(
        fixed - 4 * weights - x.numel() * 4 + 4 * per_image, rel=1e-6)


def test_the_cap_is_the_option_or_the_default_share(monkeypatch):
    assert memory_cap(torch.device("cpu"), 1.5) == int(1.5 * GIB)
    monkeypatch.setattr(micro_batch, "host_free_memory", lambda: 10 * GIB)
    assert memory_cap(torch.device("cpu"), 0.0) == 5 * GIB


def test_on_the_cpu_the_largest_micro_batch_within_the_budget_is_chosen():
    probe = a_run()
    x, _, _ = micro_batch.trial_batch(probe, 16)
    fixed, per_image = step_estimate(probe, x)
    budget = (fixed + 6 * per_image) / GIB  # room for 6 images: 4 is the largest divisor
    choice = choose(a_run(memory=budget))
    assert (choice["micro_batch"], choice["accum_steps"]) == (4, 4)
    assert [t["micro_batch"] for t in choice["tried"]] == [16, 8, 4]
    assert "over the" in choice["tried"][0]["why"] and choice["tried"][-1]["fits"]
    assert choice["memory_cap"] == int(budget * GIB)


def test_running_out_of_memory_backs_off_and_the_trials_leave_no_trace(monkeypatch):
    run = a_run()
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    first = next(iter(run.loader.epoch(0)))[0]
    out_of_memory_above(monkeypatch, 4)
    choice = choose(run)
    assert (choice["micro_batch"], choice["accum_steps"]) == (4, 4)
    assert [(t["micro_batch"], t["fits"]) for t in choice["tried"]] == [
        (16, False), (8, False), (4, True)]
    assert choice["tried"][0]["why"] == "out of memory"
    assert all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())
    assert not run.step_fn.optimizer.state
    assert all(p.grad is None for p in run.model.parameters())
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng
    assert torch.equal(next(iter(run.loader.epoch(0)))[0], first)  # the same draws


def test_the_cpu_allocators_refusal_counts_as_running_out_of_memory(monkeypatch):
    refusal = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 70368744177664 bytes.")
    out_of_memory_above(monkeypatch, 2, refusal)
    assert choose(a_run())["micro_batch"] == 2


def test_another_error_in_a_trial_is_not_taken_for_memory(monkeypatch):
    out_of_memory_above(monkeypatch, 2, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        choose(a_run())


def test_when_not_even_one_image_fits_it_says_what_to_do(monkeypatch):
    out_of_memory_above(monkeypatch, 0)
    with pytest.raises(UserError, match=r"--data.micro-batch auto: not even 1 image a step fits "
                                        r"cpu \(out of memory\); use a smaller --model.name"):
        choose(a_run())


def test_the_chosen_run_steps_in_micro_batches_and_its_config_says_which(monkeypatch):
    out_of_memory_above(monkeypatch, 8)
    run, choice, line = resolve_auto_micro_batch(a_run(), None)
    assert run.step_fn.accum_steps == 2 and run.step_fn.compiled_rows == 8
    assert run.cfg.data.micro_batch == 8 and run.cfg.accum_steps() == 2
    assert line.startswith("--data.micro-batch auto: 8 images a step, 2 accumulation step(s) "
                           "per process for the batch of 16, on cpu ")
    assert line.endswith("; 16 did not fit (out of memory)")
    assert choice["device"] == micro_batch.device_name(run)


def test_a_recorded_choice_is_kept_on_its_device_and_made_again_elsewhere(monkeypatch):
    run = a_run()
    recorded = {"micro_batch": 4, "accum_steps": 4, "device": micro_batch.device_name(run),
                "memory_cap": 1, "tried": [{"micro_batch": 4, "fits": True}]}
    monkeypatch.setattr(micro_batch, "choose", lambda run: pytest.fail("chose again"))
    kept, choice, line = resolve_auto_micro_batch(run, recorded)
    assert choice is recorded and "4 images a step" in line
    monkeypatch.undo()
    moved = dict(recorded, device="NVIDIA H100 80GB HBM3 (79.2 GiB) x 1 process(es)")
    again, choice, line = resolve_auto_micro_batch(a_run(), moved)
    assert choice["micro_batch"] == 16 and again.cfg.data.micro_batch == 16
    assert line.endswith("; chosen again: the run chose 4 on NVIDIA H100 80GB HBM3 (79.2 GiB) "
                         "x 1 process(es) (the batch, and so the experiment, stays)")


def test_cuda_graphs_refuse_a_choice_that_accumulates_also_when_kept_on_resume(monkeypatch):
    monkeypatch.setattr(Runtime, "cuda_graphs", property(lambda self: True))
    run = a_run()
    recorded = {"micro_batch": 4, "accum_steps": 4, "device": micro_batch.device_name(run),
                "memory_cap": 1, "tried": [{"micro_batch": 4, "fits": True}]}
    with pytest.raises(UserError, match="only 4 images a step fit cpu, and --compile-mode "
                                        "default replays CUDA graphs"):
        resolve_auto_micro_batch(run, recorded)
    whole = dict(recorded, micro_batch=16, accum_steps=1)  # one step a batch: no accumulation
    assert resolve_auto_micro_batch(a_run(), whole)[1] is whole


def test_no_auto_no_choice():
    run = tiny_run(CPU, *random_images(32), TrainConfig(data=DataConfig(batch_size=16)))
    assert resolve_auto_micro_batch(run, None) == (run, None, "")
    # an auto run resumed with the micro-batch set by hand (--resume-allow-changes): by hand
    recorded = {"micro_batch": 4, "accum_steps": 4, "device": micro_batch.device_name(run)}
    assert resolve_auto_micro_batch(run, recorded) == (run, None, "")


def test_the_choice_read_back_from_a_state_sets_the_config():
    cfg = TrainConfig(data=DataConfig(batch_size=16, micro_batch="auto"))
    choice = {"micro_batch": 4, "accum_steps": 4}
    assert with_micro_batch(cfg, choice).data.micro_batch == 4
    assert with_micro_batch(cfg, choice).accum_steps() == 4
    assert with_micro_batch(cfg, None) is cfg
    fixed = TrainConfig(data=DataConfig(batch_size=16, micro_batch=8))
    assert with_micro_batch(fixed, choice) is fixed
    state = {"components": {"run": {"micro_batch": choice}}}
    assert micro_batch_of(("path", state)) == choice and micro_batch_of(None) is None


def test_the_line_names_what_did_not_fit_and_why():
    choice = {"micro_batch": 32, "accum_steps": 4, "device": "cpu X (24.0 GiB) x 1 process(es)",
              "tried": [{"micro_batch": 128, "fits": False, "why": "an estimated 30.00 GiB"},
                        {"micro_batch": 64, "fits": False, "why": "out of memory"},
                        {"micro_batch": 32, "fits": True}]}
    cfg = TrainConfig()
    assert choice_line(choice, cfg) == (
        "--data.micro-batch auto: 32 images a step, 4 accumulation step(s) per process for the "
        "batch of 128, on cpu X (24.0 GiB) x 1 process(es); 128, 64 did not fit (out of memory)")
