"""use/evaluate.py: evaluation counts every image once, balanced accuracy and macro F1 by hand,
flip TTA with CUDA graphs."""

import pytest
import torch
from support import CPU, needs_cuda, tiny_model

from convnext_cifar.data.cifar import CIFAR10
from convnext_cifar.data.loader import Normalize
from convnext_cifar.distributed import Dist
from convnext_cifar.runtime import Runtime, prepare_model
from convnext_cifar.use.evaluate import EvalResult, predict_logits


class SimulatedRank(Dist):
    """Rank r of `world` whose collectives are left to the test: it keeps what it would sum."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        object.__setattr__(self, "sums", [])

    def all_reduce_sum(self, tensor):
        self.sums.append(tensor.clone())
        return tensor


class ReplayedOutput(torch.nn.Module):
    """Stands in for a CUDA-graph replay: every call writes its result into one buffer."""

    def __init__(self, model):
        super().__init__()
        self.model, self.buffer, self.calls = model, None, []

    def forward(self, x):
        out = self.model(x)
        self.calls.append(len(x))
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = torch.empty_like(out)
        return self.buffer.copy_(out)


def test_sharded_eval_counts_every_image_exactly_once():
    from convnext_cifar.training.loop import evaluate

    model, fwd = prepare_model(tiny_model(), CPU)
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (37,))
    norm = Normalize(CIFAR10.mean, CIFAR10.std, 32, "cpu", True)
    whole = evaluate(fwd, images, labels, 8, norm, CPU, 10)
    ranks = [SimulatedRank(r, 3) for r in range(3)]
    for rank in ranks:
        evaluate(fwd, images, labels, 8, norm, CPU, 10, rank)
    sums = torch.stack([r.sums[0] for r in ranks]).sum(0)  # loss, top-1, top-5 counts
    confusion = torch.stack([r.sums[1] for r in ranks]).sum(0).view(10, 10)
    assert confusion.sum() == 37 and confusion.tolist() == whole.confusion
    assert sums[1].item() * 100 / 37 == pytest.approx(whole.top1)
    assert sums[2].item() * 100 / 37 == pytest.approx(whole.top5)
    assert sums[0].item() / 37 == pytest.approx(whole.loss, rel=1e-5)


def test_flip_tta_keeps_the_first_output_when_a_replay_overwrites_it():
    model = tiny_model().eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = predict_logits(model, x, CPU, "flip")
        got = predict_logits(ReplayedOutput(model), x, CPU, "flip")
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graphs_keep_flip_tta_and_a_compiled_tail_free_run():
    rt = Runtime(torch.device("cuda"), "bf16", compile=True, channels_last=True,
                 compile_mode="reduce-overhead")
    model, forward = prepare_model(tiny_model(), rt)
    model.eval()
    x = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = predict_logits(model, x, rt, "flip")
        for _ in range(3):  # warm-up replays, then the graph
            replayed = predict_logits(forward, x, rt, "flip")
    torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2)


def test_balanced_accuracy_and_macro_f1_against_a_hand_computation():
    # rows: true class; class 2 never occurs in the labels (it is left out of both means)
    res = EvalResult(13, 0.0, 0.0, 0.0, [[8, 2, 0], [1, 1, 1], [0, 0, 0]])
    assert res.balanced_accuracy == pytest.approx(100 * (8 / 10 + 1 / 3) / 2)
    f1_0 = 2 * 8 / (10 + 9)  # precision 8/9, recall 8/10
    f1_1 = 2 * 1 / (3 + 3)  # precision 1/3, recall 1/3
    assert res.macro_f1 == pytest.approx(100 * (f1_0 + f1_1) / 2)
    assert EvalResult(2, 0, 0, 0, [[0, 1], [1, 0]]).macro_f1 == 0.0  # nothing right


class RunsOutOfMemoryAbove(torch.nn.Module):
    """A model whose device runs out of memory for batches of more than `rows` images."""

    def __init__(self, model, rows, error=None):
        super().__init__()
        self.model, self.rows, self.error, self.calls = model, rows, error, []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.rows:
            raise self.error or torch.OutOfMemoryError(f"CUDA out of memory ({len(x)} images)")
        return self.model(x)


def test_evaluation_backs_off_where_it_runs_out_of_memory_and_counts_the_same(capsys):
    from convnext_cifar.use import evaluate as evaluation
    from convnext_cifar.use.evaluate import evaluate

    model, _ = prepare_model(tiny_model(), CPU)
    model.eval()
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (37,))
    norm = Normalize(CIFAR10.mean, CIFAR10.std, 32, "cpu", True)
    whole = evaluate(model, images, labels, 16, norm, CPU, 10)
    evaluation.BackOff.said.clear()
    small = RunsOutOfMemoryAbove(model, 5)
    backed_off = evaluate(small, images, labels, 16, norm, CPU, 10)
    assert backed_off.confusion == whole.confusion and backed_off.top1 == whole.top1
    assert backed_off.loss == pytest.approx(whole.loss, rel=1e-6)
    # 16 fails, 8 fails, 4 fits; the smaller size holds for the rest of the pass
    assert small.calls[:3] == [16, 8, 4] and set(small.calls[3:]) <= {4, 1}
    assert sum(n for n in small.calls if n <= 5) == 37
    err = capsys.readouterr().err
    assert err.count("evaluation ran out of memory on cpu at 16 images a batch; it goes on in "
                     "batches of 4 (--data.eval-batch-size 4 saves the retries)") == 1
    evaluate(small, images, labels, 16, norm, CPU, 10)
    assert "evaluation ran out of memory" not in capsys.readouterr().err  # said once


def test_evaluation_does_not_back_off_from_other_errors_or_below_one_image():
    from convnext_cifar.use.evaluate import evaluate

    model, _ = prepare_model(tiny_model(), CPU)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    norm = Normalize(CIFAR10.mean, CIFAR10.std, 32, "cpu", True)
    with pytest.raises(RuntimeError, match="shape"):
        evaluate(RunsOutOfMemoryAbove(model, 2, RuntimeError("shape")), images, labels, 8, norm,
                 CPU, 10)
    with pytest.raises(torch.OutOfMemoryError):
        evaluate(RunsOutOfMemoryAbove(model, 0), images, labels, 8, norm, CPU, 10)
