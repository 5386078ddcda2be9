"""Where a run's records go: `MetricsLog` hands each record (a log window's loss, lr, grad norm
and img/s; a validation's metrics) to a list of sinks with one interface: the console,
metrics.jsonl, and the trackers (outputs/trackers.py). Adding a tracker is one `Sink` class and
one entry in `trackers.trackers_for`.

metrics.jsonl holds one JSON object per line, each written with a single write (a kill never
tears a line); `read_records` reads its complete lines back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from convnext_cifar.errors import UserError


class Sink:
    """One place a run's records go. Every method does nothing unless the sink needs it.

    `state_name`: the training-state component that holds the sink's resumable state
    (`state_dict` / `load_state_dict`), or None for a sink with none. `takes_report`: the sink
    takes the HTML report after the last epoch (`publish`).
    """

    state_name: str | None = None
    takes_report = False

    def open(self, step: int, resumed: bool) -> None:
        """The run starts at optimizer step `step` (after a training state was restored, when
        `resumed`)."""

    def add(self, record: dict[str, Any], step: int) -> None:
        """A record; `step` is the optimizer step it belongs to (its x axis)."""

    def seal(self) -> None:
        """A training state was taken: what the sink holds back until now goes out once that
        state is on disk (`commit`), not what comes after."""

    def commit(self) -> None:
        """The state taken at the last `seal` is on disk: what was sealed may go out."""

    def publish(self, report: Path | None) -> None:
        """After the last epoch: the report page (None: it could not be made)."""

    def close(self, outcome: str) -> None:
        """The run ended: finished, interrupted, diverged, pruned or failed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MetricsLog:
    """A run's sinks, in order; only the process that writes files (rank 0) is given any."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def stateful(self) -> dict[str, Sink]:
        """The sinks with a resumable state, by their training-state component names."""
        return {s.state_name: s for s in self.sinks if s.state_name}

    @property
    def takes_report(self) -> bool:
        return any(s.takes_report for s in self.sinks)

    def open(self, step: int, resumed: bool) -> None:
        for sink in self.sinks:
            sink.open(step, resumed)

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        """Hand `record` to every sink; `step` (the optimizer step of a record without one) is
        its x axis."""
        for sink in self.sinks:
            sink.add(record, record.get("step", step))

    def seal(self) -> None:
        for sink in self.sinks:
            sink.seal()

    def commit(self) -> None:
        for sink in self.sinks:
            sink.commit()

    def publish(self, report: Path | None) -> None:
        for sink in self.sinks:
            sink.publish(report)

    def close(self, outcome: str) -> None:
        for sink in self.sinks:
            sink.close(outcome)


class JsonlSink(Sink):
    """metrics.jsonl. Its state is the file's length: restoring it cuts off what a resumed run
    will write again; a fresh start empties the file."""

    state_name = "log"

    def __init__(self, path: Path):
        self.path = Path(path)

    def open(self, step: int, resumed: bool) -> None:
        if not resumed:
            self.truncate(0)

    def add(self, record: dict[str, Any], step: int) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            raise UserError(f"could not write {self.path}: {e.strerror or e}") from None

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Cut the log back to `size` bytes: what a resumed run will write again goes."""
        if self.path.exists() and self.path.stat().st_size > size:
            os.truncate(self.path, size)

    def state_dict(self) -> dict[str, Any]:
        return {"bytes": self.size()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.truncate(state["bytes"])


def read_records(path: Path, skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl's complete, well-formed records (`well_formed`); a line being appended
    right now is left out. The line numbers of the other lines go to `skipped`."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line.strip() and number < len(lines) and skipped is not None:
                skipped.append(number)  # not the last line: no writer is still at it
            continue
        if well_formed(record):
            records.append(record)
        elif skipped is not None:
            skipped.append(number)
    return records


def well_formed(record: Any) -> bool:
    """A record as a run writes it: an object whose values are finite numbers, its epoch (and
    step, where it has one) a whole number >= 0."""
    if not isinstance(record, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in record.values()):
        return False
    return all(isinstance(record.get(k, 0), int) and record.get(k, 0) >= 0
               for k in ("epoch", "step")) and "epoch" in record


def skipped_note(path: Path, skipped: list[int]) -> str:
    """The one line saying which records were passed over ('' when none)."""
    if not skipped:
        return ""
    return (f"{path}: passed over {len(skipped)} line(s) that are no well-formed record "
            f"(first: line {skipped[0]})")
