"""DeepEP's `Config` and the buffer sizes dualcomm chooses when a caller leaves them to it.

DeepEP's callers size their `Buffer` with `Config.get_nvl_buffer_size_hint` /
`get_rdma_buffer_size_hint` (Megatron-Core does), and those hints are 0 for the rdma tier up
to 8 ranks, because DeepEP assumes 8 GPUs per node. dualcomm's rings only have to hold one
token record each (any number of tokens streams through them), so here:

- the hints size one ring per linked sender for `num_max_*_chunked_recv_tokens` records of
  the given hidden size (with room for top-k, FP8 scales and the record header);
- a size of 0 for a tier that has links means "choose for me";
- a size beyond what a ring can use on the CPU (DeepEP's tests ask for 2 GB) is trimmed to
  `DUALCOMM_MAX_BUFFER_BYTES` (256 MiB by default), since the CPU transports back every byte
  with host memory or /dev/shm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dualcomm import _checks

#: Bytes of a record's header (source rank, source index, destination mask).
RECORD_HEADER_BYTES = 24
#: Top-k entries a hinted ring leaves room for (index int64 + weight float32 each).
HINT_MAX_TOPK = 32
#: Ring bytes per linked sender when a caller passes 0 for a tier that has links.
AUTO_RING_BYTES = 4 << 20
#: DeepEP's `NUM_MAX_NVL_PEERS`: a node (an NVLink domain) holds at most 8 ranks, so a
#: group of more than 8 is `group.size() // 8` nodes of 8 to DeepEP whatever the hosts.
MAX_RANKS_PER_NODE = 8
#: Default cap of one tier's ring bytes (see `DUALCOMM_MAX_BUFFER_BYTES`).
DEFAULT_MAX_BUFFER_BYTES = 256 << 20


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _checks.fail(name, "an integer (environment variable)", repr(raw)) from None
    if value < 1:
        raise _checks.fail(name, "a positive integer (environment variable)", value)
    return value


def env_ranks_per_node() -> int | None:
    """`DUALCOMM_RANKS_PER_NODE`: the emulated node size for callers that cannot pass
    `ranks_per_node` (an unmodified DeepEP client)."""
    return _env_int("DUALCOMM_RANKS_PER_NODE", None)


def env_num_channels() -> int | None:
    """`DUALCOMM_NUM_CHANNELS`: the channels per buffer for callers that cannot pass
    `num_channels` (an unmodified DeepEP client); unset: from `Buffer.num_sms`."""
    return _env_int("DUALCOMM_NUM_CHANNELS", None)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_channels(num_sms: int, ranks_on_host: int, cores: int | None = None) -> int:
    """DeepEP runs one channel per two SMs; a CPU channel needs a core of its own, so the
    count is also capped by this host's cores shared among the ranks on it (more threads
    than cores only make the channels wait for each other)."""
    cores = usable_cores() if cores is None else cores
    return max(1, min(num_sms // 2, cores // max(1, ranks_on_host)))


def max_buffer_bytes() -> int:
    value = _env_int("DUALCOMM_MAX_BUFFER_BYTES", DEFAULT_MAX_BUFFER_BYTES)
    assert value is not None
    return value


def _record_bytes_bound(hidden_bytes: int) -> int:
    """A record of `hidden_bytes` of data, with top-k up to `HINT_MAX_TOPK` and FP8 scales
    (one float32 per 128 one-byte elements; `hidden_bytes` counts two bytes per element)."""
    scales = (hidden_bytes // 2 + 127) // 128 * 4
    return RECORD_HEADER_BYTES + hidden_bytes + scales + HINT_MAX_TOPK * 12


def deep_ep_ranks_per_node(ranks_on_host: int) -> int:
    """The node size DeepEP gives ranks that share a host: all of them, up to
    `MAX_RANKS_PER_NODE`; a host of 16 is two nodes of 8, as DeepEP's `rank / 8` makes it
    (its internode tests run so). Counts that 8 does not divide stay one node (DeepEP
    cannot run them at all)."""
    if ranks_on_host > MAX_RANKS_PER_NODE and ranks_on_host % MAX_RANKS_PER_NODE == 0:
        return MAX_RANKS_PER_NODE
    return ranks_on_host


def _hint_layout(num_ranks: int) -> tuple[int, int]:
    """(nodes, ranks per node) a hint assumes: `DUALCOMM_RANKS_PER_NODE` if set, else
    DeepEP's layout of a CPU job on one host (nodes of up to 8 ranks)."""
    rpn = env_ranks_per_node() or deep_ep_ranks_per_node(num_ranks)
    if num_ranks % rpn:
        raise _checks.fail("num_ranks", f"a multiple of DUALCOMM_RANKS_PER_NODE={rpn}", num_ranks)
    return num_ranks // rpn, rpn


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(eq=False)
class Config:
    """DeepEP's performance knobs, with DeepEP's positional order and defaults.

    As DeepEP's (a C++ object), two configs are equal only if they are one object, and a
    config can be a dict key (callers cache their tuned configs by it).

    dualcomm's CPU path streams any number of tokens through rings of whatever size the
    buffer has, so the chunk sizes do not change what moves; they are checked as DeepEP checks
    them and they size the buffer hints below. `num_sms` is recorded for the GPU path.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for name in (
            "num_sms",
            "num_max_nvl_chunked_send_tokens",
            "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens",
            "num_max_rdma_chunked_recv_tokens",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_sms" else 1):
                raise _checks.fail(name, "a non-negative int" if name == "num_sms" else "a positive int", repr(v))
        if self.num_max_nvl_chunked_send_tokens >= self.num_max_nvl_chunked_recv_tokens:
            raise _checks.fail(
                "num_max_nvl_chunked_send_tokens",
                f"less than num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}",
                self.num_max_nvl_chunked_send_tokens,
            )
        # DeepEP rounds the rdma receive chunk up to a multiple of the send chunk.
        self.num_max_rdma_chunked_recv_tokens = _round_up(
            self.num_max_rdma_chunked_recv_tokens, self.num_max_rdma_chunked_send_tokens
        )
        if self.num_max_rdma_chunked_send_tokens > self.num_max_rdma_chunked_recv_tokens // 2:
            raise _checks.fail(
                "num_max_rdma_chunked_send_tokens",
                f"at most half of num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens}",
                self.num_max_rdma_chunked_send_tokens,
            )

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """`num_nvl_bytes` for rings holding `num_max_nvl_chunked_recv_tokens` records of
        `hidden_bytes` from each rank of the node."""
        _, rpn = _hint_layout(_positive("num_ranks", num_ranks))
        per_ring = self.num_max_nvl_chunked_recv_tokens * _record_bytes_bound(
            _non_negative("hidden_bytes", hidden_bytes)
        )
        return _round_up(rpn * per_ring, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """`num_rdma_bytes` for rings holding `num_max_rdma_chunked_recv_tokens` records of
        `hidden_bytes` from each other node; 0 for one node."""
        nodes, _ = _hint_layout(_positive("num_ranks", num_ranks))
        if nodes == 1:
            return 0
        per_ring = self.num_max_rdma_chunked_recv_tokens * _record_bytes_bound(
            _non_negative("hidden_bytes", hidden_bytes)
        )
        return _round_up(nodes * per_ring, 128)


def _positive(name: str, v: object) -> int:
    return _checks.integer(name, v, 1, "a positive int")


def _non_negative(name: str, v: object) -> int:
    return _checks.integer(name, v, 0, "a non-negative int")


def resolve_ring_bytes(requested: int, senders: int, has_links: bool) -> int:
    """The bytes a tier's rings get: none for a tier without links (one node has no rdma
    tier), `AUTO_RING_BYTES` per sender for 0, else `requested` trimmed to `max_buffer_bytes()`."""
    if not has_links:
        return 0
    if requested == 0:
        requested = AUTO_RING_BYTES * senders
    return min(requested, max_buffer_bytes())
