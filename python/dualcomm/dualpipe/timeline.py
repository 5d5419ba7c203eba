"""A per-rank record of what ran when: compute chunks of the schedule (F, B, W, and the
overlapped F&B pairs), the expert-parallel all-to-alls on the progress engine, and the time
Python spent blocked waiting for them. From it the pipeline bubble and the share of
communication hidden under compute are read off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

#: Kinds of compute spans, as the schedules name them.
COMPUTE_KINDS = ("F", "B", "W", "FB")
#: Kinds of communication spans (intervals on the progress engine).
COMM_KINDS = ("dispatch", "combine")
#: Python blocked on an all-to-all (starting it, or waiting for its data).
WAIT = "wait"


@dataclass
class Span:
    kind: str
    label: str
    start: float
    end: float


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the overlap of two unions of disjoint, sorted intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


@dataclass
class Timeline:
    """Spans of one rank, on the `time.time()` clock (the progress engine's clock too)."""

    enabled: bool = False
    spans: list[Span] = field(default_factory=list)

    def clear(self) -> None:
        self.spans = []

    @contextmanager
    def span(self, kind: str, label: str = "") -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.time()
        try:
            yield
        finally:
            self.spans.append(Span(kind, label, start, time.time()))

    def add(self, kind: str, label: str, start: float, end: float) -> None:
        if self.enabled:
            self.spans.append(Span(kind, label, start, end))

    def summary(self) -> dict[str, float]:
        """Busy compute time; all-to-all time on the engine; how much of that Python spent
        blocked on it (exposed) rather than computing (hidden); and all blocked time, which
        also counts waiting for slower peers before an all-to-all could start."""
        return summarize([(s.kind, s.start, s.end) for s in self.spans])


def summarize(spans: list[tuple[str, float, float]]) -> dict[str, float]:
    compute = sum(e - s for k, s, e in spans if k in COMPUTE_KINDS)
    comm = _union([(s, e) for k, s, e in spans if k in COMM_KINDS])
    waits = _union([(s, e) for k, s, e in spans if k == WAIT])
    comm_s = _length(comm)
    exposed = _intersection(comm, waits)
    return {
        "compute_s": compute,
        "comm_s": comm_s,
        "comm_exposed_s": exposed,
        "blocked_s": _length(waits),
        "comm_hidden_fraction": 1.0 - exposed / comm_s if comm_s > 0 else 0.0,
    }


#: The timeline of this process. Schedules and the bundled model record into it when enabled.
TIMELINE = Timeline()
