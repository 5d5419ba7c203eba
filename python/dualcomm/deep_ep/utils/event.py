"""`deep_ep.utils.event`."""

from dualcomm.event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
