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


@dataclass
class Span:
    kind: str
    label: str
    start: float
    end: float


@dataclass
class Timeline:
    """Spans of one rank, on the `time.time()` clock (the progress engine's clock too)."""

    enabled: bool = False
    spans: list[Span] = field(default_factory=list)
    #: Seconds Python spent blocked on communication it could not hide, per comm kind.
    exposed: dict[str, float] = field(default_factory=dict)

    def clear(self) -> None:
        self.spans = []
        self.exposed = {}

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

    def add_exposed(self, kind: str, seconds: float) -> None:
        if self.enabled:
            self.exposed[kind] = self.exposed.get(kind, 0.0) + seconds

    def summary(self) -> dict[str, float]:
        """Busy compute time, communication time on the engine, and how much of it was exposed."""
        compute = sum(s.end - s.start for s in self.spans if s.kind in COMPUTE_KINDS)
        comm = sum(s.end - s.start for s in self.spans if s.kind in COMM_KINDS)
        exposed = sum(self.exposed.values())
        return {
            "compute_s": compute,
            "comm_s": comm,
            "comm_exposed_s": exposed,
            "comm_hidden_fraction": (max(0.0, 1.0 - exposed / comm) if comm > 0 else 0.0),
        }


#: The timeline of this process. Schedules and the bundled model record into it when enabled.
TIMELINE = Timeline()
