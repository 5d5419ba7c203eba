"""`deep_ep.utils`: the event classes (Megatron-Core imports them from here) and, in submodules,
the helpers DeepEP's own tests import (`math`, `testing`, `envs`, and DeepEP 2's `refs` and
`gate`), for CPU tensors."""

from dualcomm.event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
