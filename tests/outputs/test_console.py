"""outputs/console.py: the live progress, the run clock's projection, and the validation line."""

import pytest

from convnext_cifar.outputs.console import Progress, RunClock


def test_live_progress_shows_epoch_loss_and_speed(capsys):
    progress = Progress(epochs=2, live=True)
    progress.start_epoch(1, steps=4)
    for _ in range(4):
        progress.advance()
    progress.log_train({"epoch": 1, "step": 4, "loss": 1.25, "lr": 1e-3, "grad_norm": 2.0,
                        "img_per_s": 321.0}, 4, 4)
    progress.end_epoch()
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "4/4" in out and "loss 1.2500" in out and "321 img/s" in out
    assert "eta" in out


def test_run_clock_counts_steps_and_the_validations_still_due():
    clock = RunClock(epochs=10, steps_per_epoch=100, batch_size=128, val_interval=3)
    assert clock.left_s(0, 0) is None  # nothing measured yet
    clock.step_s = 0.5
    # validations after epochs 3, 6, 9 and the last (10)
    assert clock.validations_after(0) == 4 and clock.validations_after(6) == 2
    assert clock.left_s(250, 2) == pytest.approx(750 * 0.5)  # no validation timed yet
    clock.val_s = 4.0
    assert clock.left_s(250, 2) == pytest.approx(750 * 0.5 + 4 * 4.0)
    assert clock.left_s(1000, 10) == 0


def test_the_validation_line_shows_the_chosen_metric_raw_and_ema(capsys):
    from convnext_cifar.outputs.console import Progress

    record = {"epoch": 3, "val_loss": 0.5, "top1": 84.0, "top5": 100.0,
              "balanced_accuracy": 66.67, "macro_f1": 60.0, "ema_top1": 96.0, "ema_top5": 100.0,
              "ema_balanced_accuracy": 97.78, "ema_macro_f1": 95.0}
    Progress(10, live=False).log_val(record, 97.78, "balanced_accuracy")
    Progress(10, live=False).log_val({k: v for k, v in record.items() if "ema" not in k}, 84.0)
    chosen, plain = capsys.readouterr().out.splitlines()
    assert chosen == ("epoch 3/10 val  loss 0.5000  top1 84.00  top5 100.00  balanced_accuracy "
                      "66.67  ema top1 96.00 top5 100.00 balanced_accuracy 97.78  "
                      "(best balanced_accuracy 97.78)")
    assert plain == "epoch 3/10 val  loss 0.5000  top1 84.00  top5 100.00  (best top1 84.00)"


def test_wrapped_keeps_each_item_whole_and_sizes_read_short():
    from convnext_cifar.outputs.console import size, wrapped

    items = ["a=1", "bbbbbbbbbb=2", "c=" + "x" * 30]
    assert wrapped(items, 20, "  ") == ["  a=1  bbbbbbbbbb=2", "  c=" + "x" * 30]
    assert (size(880_000), size(351_200_000), size(12_400_000_000), size(None)) == (
        "880 kB", "351 MB", "12 GB", "-")


def test_runs_delimited_escapes_tabs_and_neutralises_formulas():
    from convnext_cifar.outputs.console import runs_delimited

    row = {"run": "=a\tb", "name": "n", "study": None, "status": "finished", "config": {"k": 1}}
    tsv = runs_delimited([row], ["k"], csv_output=False).splitlines()
    assert tsv[1].split("\t")[0] == "=a\\tb" and tsv[1].split("\t")[-1] == "1"
    assert runs_delimited([row], ["k"], csv_output=True).splitlines()[1].startswith("'=a\tb,")
