"""dualcomm: expert-parallel dispatch and combine for Mixture-of-Experts training.

A DeepEP-compatible `Buffer` over a Rust communication core that routes each token across
the network once per destination node and forwards it inside the node, and that also runs
without GPUs or InfiniBand (CPU tensors, in-process loopback worlds).
"""

from dualcomm._native import (
    BufferBrokenError,
    BufferDestroyedError,
    CommTimeoutError,
    ConfigMismatchError,
    DualcommError,
    Handle,
    InternalError,
    InvalidArgumentError,
    PeerAbortedError,
    PeerLostError,
    ProtocolError,
    SystemResourceError,
    TransportUnavailableError,
    __version__,
)
from dualcomm.buffer import Buffer, Config, LoopbackGroup
from dualcomm.elastic import ElasticBuffer, EPHandle
from dualcomm.event import EventOverlap

__all__ = [
    "Buffer",
    "BufferBrokenError",
    "BufferDestroyedError",
    "CommTimeoutError",
    "Config",
    "ConfigMismatchError",
    "DualcommError",
    "EPHandle",
    "ElasticBuffer",
    "EventOverlap",
    "Handle",
    "InternalError",
    "InvalidArgumentError",
    "LoopbackGroup",
    "PeerAbortedError",
    "PeerLostError",
    "ProtocolError",
    "SystemResourceError",
    "TransportUnavailableError",
    "__version__",
]
