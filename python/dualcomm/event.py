"""DeepEP's `EventOverlap`, for CPU tensors.

On CPU a dispatch or combine has finished moving data when the call returns, so the event
is already complete: `current_stream_wait()` returns at once and the context manager only
keeps the tensors alive. Code written for DeepEP's overlap pattern runs unchanged.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any


class EventOverlap:
    def __init__(self, event: Any = None, extra_tensors: tuple[Any, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes the current stream wait for the operation (complete on CPU: no wait)."""
        wait = getattr(self.event, "wait", None)
        if callable(wait):
            wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.current_stream_wait()
