"""outputs/metrics_log.py: every record to every sink in order, each sink's resumable state by
its component name, and metrics.jsonl written whole-line and read back whole-line."""

import json

import pytest

from convnext_cifar.errors import UserError
from convnext_cifar.outputs.metrics_log import JsonlSink, MetricsLog, Sink, read_records


class Recording(Sink):
    state_name = "recording"
    takes_report = True

    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def open(self, step, resumed):
        self.calls.append((self.name, "open", step, resumed))

    def add(self, record, step):
        self.calls.append((self.name, "add", record["epoch"], step))

    def commit(self):
        self.calls.append((self.name, "commit"))

    def publish(self, report):
        self.calls.append((self.name, "publish", report))

    def close(self, outcome):
        self.calls.append((self.name, "close", outcome))


def test_every_sink_gets_every_call_in_order_with_the_records_step():
    calls = []
    log = MetricsLog([Recording(calls, "a"), Recording(calls, "b")])
    log.open(40, resumed=True)
    log.write({"epoch": 1, "step": 10, "loss": 1.0})
    log.write({"epoch": 1, "top1": 50.0}, step=12)  # a validation: its step given beside it
    log.commit()
    log.publish(None)
    log.close("finished")
    assert calls == [("a", "open", 40, True), ("b", "open", 40, True), ("a", "add", 1, 10),
                     ("b", "add", 1, 10), ("a", "add", 1, 12), ("b", "add", 1, 12),
                     ("a", "commit"), ("b", "commit"), ("a", "publish", None),
                     ("b", "publish", None), ("a", "close", "finished"),
                     ("b", "close", "finished")]
    assert log.takes_report and not MetricsLog([Sink()]).takes_report


def test_a_sink_with_state_is_a_training_state_component_by_its_name(tmp_path):
    jsonl, plain = JsonlSink(tmp_path / "m.jsonl"), Sink()
    assert MetricsLog([jsonl, plain]).stateful() == {"log": jsonl}
    assert MetricsLog([]).stateful() == {}  # the processes that write no files


def test_metrics_jsonl_is_cut_back_to_the_state_and_emptied_by_a_fresh_start(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.open(0, resumed=False)
    sink.add({"epoch": 1, "loss": 2.0}, 1)
    state = sink.state_dict()
    sink.add({"epoch": 2, "loss": 1.0}, 2)
    assert [r["epoch"] for r in read_records(sink.path)] == [1, 2]
    sink.load_state_dict(state)  # a resumption: what follows the state goes
    assert [r["epoch"] for r in read_records(sink.path)] == [1]
    sink.open(0, resumed=False)
    assert sink.size() == 0


def test_a_line_being_written_is_left_out_when_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1, "top1": 3.0}) + "\n" + '{"epoch": 2, "to')
    assert read_records(path) == [{"epoch": 1, "top1": 3.0}]
    assert read_records(tmp_path / "none.jsonl") == []


def test_an_unwritable_log_is_one_line(tmp_path):
    sink = JsonlSink(tmp_path / "missing" / "metrics.jsonl")
    with pytest.raises(UserError, match="could not write .*metrics.jsonl"):
        sink.add({"epoch": 1}, 1)
