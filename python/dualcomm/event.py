"""DeepEP's `EventOverlap`, backed by an operation on the buffer's progress engine.

`dispatch(..., async_finish=True)` and `combine(..., async_finish=True)` return as soon as
the operation is queued (a dispatch first waits for the receive counts, as DeepEP's does)
and the data moves on the engine's thread while Python computes. The returned tensors are
complete once `current_stream_wait()` returns, or when the `with event:` block is left.
Without `async_finish` the call waits itself and returns a completed event.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any


class EventOverlap:
    def __init__(
        self,
        event: Any = None,
        extra_tensors: tuple[Any, ...] | None = None,
        on_done: Callable[[Any], None] | None = None,
    ) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self._on_done = on_done

    def current_stream_wait(self) -> None:
        """Blocks (without the GIL) until the operation is done; raises if it failed."""
        if self.event is None:
            return
        result = self.event.wait()
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done(result)

    @property
    def done(self) -> bool:
        return self.event is None or bool(self.event.done)

    def timestamps(self) -> tuple[float, float] | None:
        """When the operation started and ended on the progress engine (`time.time()` clock)."""
        return None if self.event is None else tuple(self.event.timestamps())  # type: ignore[return-value]

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.current_stream_wait()
