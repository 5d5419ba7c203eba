"""DeepEP's `EventHandle` and `EventOverlap`, backed by operations on the buffer's progress engine.

`dispatch(..., async_finish=True)` and `combine(..., async_finish=True)` return as soon as
the operation is queued (a dispatch first waits for the receive counts, as DeepEP's does)
and the data moves on the engine's thread while Python computes. The returned tensors are
complete once `current_stream_wait()` returns, or when the `with event:` block is left.
Without `async_finish` the call waits itself and returns a completed event.

On CPU tensors the "current stream" is the calling Python thread: work it issued before a
call is already done when the call starts, so an `EventHandle` captured there is complete
the moment it exists, and `previous_event` arguments order nothing that is not ordered.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any


class EventHandle:
    """DeepEP's `EventHandle()`: a point on the current stream (`Buffer.capture()`).

    With CUDA in use it records a CUDA event on the current stream, and waiting makes the
    current stream wait for it without blocking the host. CPU work is issued and finished in
    order on the calling thread, so there the point is reached when the handle is made."""

    def __init__(self) -> None:
        self._cuda: Any = None
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._cuda = torch.cuda.Event()
                self._cuda.record()
        except (ImportError, RuntimeError):
            self._cuda = None

    def current_stream_wait(self) -> None:
        if self._cuda is not None:
            import torch

            torch.cuda.current_stream().wait_event(self._cuda)

    @property
    def done(self) -> bool:
        return self._cuda is None or bool(self._cuda.query())

    def wait(self) -> None:
        if self._cuda is not None:
            self._cuda.synchronize()

    def __repr__(self) -> str:
        return f"EventHandle(done={self.done})"


class EventOverlap:
    """DeepEP's `EventOverlap`: waits for an operation and keeps its tensors alive until then.

    Args:
        event: what to wait for: the native event of a dualcomm operation, an `EventHandle`,
            or None (nothing to wait for).
        extra_tensors: tensors kept alive with the event (DeepEP's stand-in for
            `record_stream`).
        on_done: dualcomm's own use: a step that completes the results once the operation has
            finished (the bias of a combine is added there). Every way of learning that the
            event is done (`current_stream_wait`, `done`, leaving `with`) runs it first, so
            nothing reports completion before the result tensors are fully written.
    """

    def __init__(
        self,
        event: Any = None,
        extra_tensors: tuple[Any, ...] | None = None,
        on_done: Callable[[Any], None] | None = None,
    ) -> None:
        self.event = event
        #: A synchronous call's native event once `retire`d (for `timestamps`).
        self._retired: Any = None
        self.extra_tensors = extra_tensors
        self._on_done = on_done
        self._release_handle_by_call = False
        self._then: list[Callable[[], None]] = []
        #: Called once after the next `current_stream_wait()` (DeepEP's deterministic-dispatch hook).
        self.hook_after_wait: Callable[[], Any] | None = None

    def current_stream_wait(self, release_handle: bool = False) -> None:
        """Blocks (without the GIL) until the operation is done; raises if it failed. With
        `release_handle`, the event (and what it keeps alive) is dropped afterwards."""
        self._settle()
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None

    def _settle(self) -> None:
        if self.event is None:
            self._run_then()
            return
        if isinstance(self.event, EventHandle):
            self.event.current_stream_wait()  # the stream waits; the host does not
            return
        result = self.event.wait()
        if self._on_done is not None:
            from dualcomm._arrays import on_host

            on_done, self._on_done = self._on_done, None
            with on_host():
                on_done(result)
        self._run_then()

    def _run_then(self) -> None:
        while self._then:
            self._then.pop(0)()

    def then(self, step: Callable[[], None]) -> None:
        """Runs `step` once the operation and its completing steps are done (dualcomm's own
        use: the copies back to a GPU of a staged call); at once if there is nothing to wait
        for, or only a stream point (an `EventHandle`: the host work before it is done)."""
        self._then.append(step)
        if self.event is None or isinstance(self.event, EventHandle):
            self._run_then()

    def retire(self) -> EventOverlap:
        """A synchronous call's event, waited for: as DeepEP's (`EventOverlap(None)`), its
        `event` is None from now on; `timestamps()` still reports the operation."""
        self.current_stream_wait()
        self._retired, self.event = self.event, None
        return self

    def register_hook_after_wait(self, hook_after_wait: Callable[[], Any]) -> None:
        """Runs `hook_after_wait` once, right after the next `current_stream_wait()`."""
        if self.hook_after_wait is not None:
            from dualcomm._checks import fail

            raise fail("hook_after_wait", "no hook registered yet on this EventOverlap", "a second hook")
        self.hook_after_wait = hook_after_wait

    @property
    def done(self) -> bool:
        """Whether the operation and every step that completes its results have finished."""
        if self.event is None:
            return True
        if not bool(self.event.done):
            return False
        # The operation ended: finish its results here (or raise its error) before saying so.
        self._settle()
        return True

    def timestamps(self) -> tuple[float, float] | None:
        """When the operation started and ended on the progress engine (`time.time()` clock)."""
        stamps = getattr(self.event if self.event is not None else self._retired, "timestamps", None)
        return None if stamps is None else tuple(stamps())  # type: ignore[return-value]

    def __call__(self, release_handle: bool = False) -> EventOverlap:
        """`with event(release_handle=True): ...` drops the event after the wait at the exit."""
        self._release_handle_by_call = release_handle
        return self

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        release, self._release_handle_by_call = self._release_handle_by_call, False
        if self.event is not None:
            self.current_stream_wait(release_handle=release)
