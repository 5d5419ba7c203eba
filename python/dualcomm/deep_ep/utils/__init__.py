"""`deep_ep.utils`: the event classes (Megatron-Core imports them from here) and, in submodules,
the helpers DeepEP's own tests import (`math`, `testing`, `envs`), for CPU tensors."""

from dualcomm.event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
