"""metrics.py: the one list of validation metric names every record, table, option and tracker
takes them from."""

import typing

import pytest

from convnext_cifar.config import EvalConfig, TuneConfig
from convnext_cifar.metrics import BEST_METRICS, LOSS, METRICS, TUNE_METRICS, ema
from convnext_cifar.use.evaluate import EvalResult


def test_a_validation_record_holds_exactly_the_named_metrics():
    result = EvalResult(4, 0.5, 75.0, 100.0, [[2, 0], [1, 1]])
    record = result.record()
    assert list(record) == [LOSS, *METRICS]
    assert record == {"val_loss": 0.5, "top1": 75.0, "top5": 100.0, "balanced_accuracy": 75.0,
                      "macro_f1": pytest.approx(100 * (0.8 + 2 / 3) / 2)}


def test_the_options_take_their_choices_from_the_list():
    assert typing.get_args(typing.get_type_hints(EvalConfig)["best_metric"]) == BEST_METRICS
    assert typing.get_args(typing.get_type_hints(TuneConfig)["metric"]) == TUNE_METRICS
    assert EvalConfig().best_metric == BEST_METRICS[0] and TuneConfig().metric == TUNE_METRICS[0]
    assert set(BEST_METRICS) <= set(METRICS)
    assert all(m in METRICS or m.removeprefix("ema_") in METRICS for m in TUNE_METRICS)
    assert ema("top1") == "ema_top1" and ema(LOSS) == "ema_val_loss"
