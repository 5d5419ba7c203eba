"""The order in which `overlapped_forward_backward` interleaves two micro-batches: each
all-to-all one of them starts stays in flight while the other computes, and the backward
goes first (so the combine backward hides under the attention forward)."""

from __future__ import annotations

from collections.abc import Generator

from dualcomm.model.stage import drive


def test_each_all_to_all_is_in_flight_while_the_other_micro_batch_computes() -> None:
    log: list[str] = []

    class FakePending:
        def __init__(self, name: str) -> None:
            self.name = name
            log.append(f"start {name}")

        def wait(self) -> str:
            log.append(f"wait {self.name}")
            return self.name

    def steps(pieces: list[tuple[str, str]]) -> Generator[FakePending, str, str]:
        for compute, comm in pieces:
            log.append(compute)
            got = yield FakePending(comm)
            assert got == comm
        log.append("done")
        return "ok"

    backward = steps([("B head", "combine-bwd"), ("B experts", "dispatch-bwd")])
    forward = steps([("F attention", "dispatch"), ("F experts", "combine")])
    assert drive(backward, forward) == ["ok", "ok"]
    assert log == [
        "B head",
        "start combine-bwd",
        "F attention",  # hides the combine backward
        "start dispatch",
        "wait combine-bwd",
        "B experts",  # hides the dispatch
        "start dispatch-bwd",
        "wait dispatch",
        "F experts",  # hides the dispatch backward
        "start combine",
        "wait dispatch-bwd",
        "done",
        "wait combine",
        "done",
    ]
