"""Type stub of the native module built from rust/dualcomm-python (kept honest by stubtest)."""

from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BufferBrokenError",
    "BufferDestroyedError",
    "CommTimeoutError",
    "ConfigMismatchError",
    "DualcommError",
    "Endpoint",
    "Event",
    "Handle",
    "InternalError",
    "InvalidArgumentError",
    "LoopbackWorld",
    "PeerAbortedError",
    "PeerLostError",
    "ProtocolError",
    "ShmSegment",
    "SystemResourceError",
    "TcpListener",
    "TransportUnavailableError",
    "VerbsPort",
    "__version__",
    "find_verbs_device",
    "routing_tables",
    "unlink_segment",
]

__version__: str

class DualcommError(RuntimeError): ...
class InvalidArgumentError(DualcommError): ...
class CommTimeoutError(DualcommError): ...
class PeerLostError(DualcommError): ...
class ProtocolError(DualcommError): ...
class BufferDestroyedError(DualcommError): ...
class ConfigMismatchError(DualcommError): ...
class TransportUnavailableError(DualcommError): ...
class PeerAbortedError(DualcommError): ...
class BufferBrokenError(DualcommError): ...
class SystemResourceError(DualcommError): ...
class InternalError(DualcommError): ...

@final
class LoopbackWorld:
    def __new__(cls, world_size: int) -> LoopbackWorld: ...
    @property
    def world_size(self) -> int: ...

@final
class ShmSegment:
    def __new__(
        cls,
        job: str,
        rank: int,
        num_nodes: int,
        ranks_per_node: int,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        nvl_only: bool = False,
    ) -> ShmSegment: ...

def unlink_segment(job: str, rank: int) -> None: ...
def find_verbs_device(spec: str | None = None) -> str: ...

@final
class TcpListener:
    def __new__(cls, host: str) -> TcpListener: ...
    @property
    def address(self) -> str: ...

@final
class VerbsPort:
    def __new__(
        cls,
        rank: int,
        num_nodes: int,
        ranks_per_node: int,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        timeout_s: float,
        rdma_only: bool = False,
    ) -> VerbsPort: ...
    @property
    def card(self) -> bytes: ...
    @property
    def device(self) -> str: ...

@final
class Handle:
    @property
    def num_recv_tokens(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def buffer_id(self) -> int: ...
    def recv_per_src(self) -> npt.NDArray[np.int64]: ...
    def node_matrix(self) -> npt.NDArray[np.int64]: ...
    def recv_src_rank(self) -> npt.NDArray[np.uint32]: ...
    def recv_src_idx(self) -> npt.NDArray[np.uint32]: ...

@final
class Event:
    def wait(self) -> list[int] | None: ...
    @property
    def done(self) -> bool: ...
    def wait_ns(self) -> list[int]: ...
    def timestamps(self) -> tuple[float, float]: ...

@final
class Endpoint:
    @staticmethod
    def loopback(
        world: LoopbackWorld,
        num_nodes: int,
        ranks_per_node: int,
        rank: int,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        timeout_s: float,
    ) -> Endpoint: ...
    @staticmethod
    def shm(
        segment: ShmSegment,
        job: str,
        num_nodes: int,
        ranks_per_node: int,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        timeout_s: float,
    ) -> Endpoint: ...
    @staticmethod
    def shm_tcp(
        segment: ShmSegment,
        job: str,
        listener: TcpListener,
        num_nodes: int,
        ranks_per_node: int,
        rank: int,
        peers: list[str],
        secret: bytes,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        timeout_s: float,
    ) -> Endpoint: ...
    @staticmethod
    def tcp(
        listener: TcpListener,
        num_nodes: int,
        ranks_per_node: int,
        rank: int,
        peers: list[str],
        secret: bytes,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        timeout_s: float,
    ) -> Endpoint: ...
    @staticmethod
    def verbs(port: VerbsPort, cards: list[bytes]) -> Endpoint: ...
    @staticmethod
    def shm_verbs(segment: ShmSegment, job: str, port: VerbsPort, cards: list[bytes]) -> Endpoint: ...
    @staticmethod
    def join_channels(endpoints: list[Endpoint]) -> Endpoint: ...
    @property
    def channels(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def num_nodes(self) -> int: ...
    @property
    def ranks_per_node(self) -> int: ...
    @property
    def id(self) -> int: ...
    @property
    def destroyed(self) -> bool: ...
    @property
    def address(self) -> str | None: ...
    def layout(
        self, topk_idx: npt.NDArray[np.int64], num_experts: int
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.bool_]]: ...
    def local_buffer(self, rdma: bool) -> npt.NDArray[np.uint8]: ...
    def low_latency_combine(
        self,
        x: npt.NDArray[np.uint8],
        dtype: str,
        handle: Handle,
        slots: npt.NDArray[np.int64],
        topk_weights: npt.NDArray[np.float32],
        out_dtype: str,
    ) -> tuple[npt.NDArray[np.uint8], Event]: ...
    def dispatch(
        self,
        x: npt.NDArray[np.uint8],
        x_dtype: str,
        hidden: int,
        scales: npt.NDArray[np.uint8] | None,
        is_token_in_rank: npt.NDArray[np.bool_] | None,
        handle: Handle | None,
        topk_idx: npt.NDArray[np.int64] | None,
        topk_weights: npt.NDArray[np.float32] | None,
        num_experts: int,
        expert_alignment: int,
        num_tokens_per_expert: npt.NDArray[np.int64] | None = None,
        num_worst_tokens: int = 0,
    ) -> tuple[
        npt.NDArray[np.uint8],
        npt.NDArray[np.uint8] | None,
        npt.NDArray[np.int64] | None,
        npt.NDArray[np.float32] | None,
        list[int] | None,
        Handle,
        Event,
    ]: ...
    def combine(
        self,
        x: npt.NDArray[np.uint8],
        dtype: str,
        handle: Handle,
        topk_weights: npt.NDArray[np.float32] | None,
        out_dtype: str,
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32] | None, Event]: ...
    def stats(self) -> dict[str, int]: ...
    def abort(self, op: str, reason: str) -> None: ...
    def enable_shrink(self) -> None: ...
    @property
    def shrink(self) -> bool: ...
    def set_masked(self, rank: int, masked: bool) -> None: ...
    def masked_ranks(self) -> list[bool]: ...
    def clear_mask(self) -> None: ...
    def destroy(self) -> None: ...

def routing_tables(
    topk_idx: npt.NDArray[np.int64], num_experts: int, num_nodes: int, ranks_per_node: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.bool_]]: ...
