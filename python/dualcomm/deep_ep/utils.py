"""`deep_ep.utils`: the event classes, where Megatron-Core imports them from."""

from dualcomm.event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
