"""Which optimizer steps the device skipped, learned without making the host wait for the device.

The trainer decides on the device whether a step is applied (a non-finite loss or gradient sets
the fused Adam's ``found_inf``; the update, the EMA and GradScaler's scale react to it there). The
host still has to count skipped steps and keep its step counter and schedule right, so each step's
flag is copied, non-blocking, into a pinned host slot and an event is recorded after it. The host
reads a slot once its event has completed (``Event.query()``, no wait) -- one or a few steps late,
never stalling the queue. On the CPU there is nothing asynchronous: a flag is ready at once.
"""
from __future__ import annotations

from collections import deque

import torch


class StepFlags:
    """A ring of pinned host slots for per-step "skipped" flags (0-d bool device tensors)."""

    def __init__(self, device: torch.device, slots: int = 64):
        self._cuda = device.type == "cuda"
        self._host = torch.zeros(slots, dtype=torch.bool, pin_memory=self._cuda)
        self._events = [torch.cuda.Event() for _ in range(slots)] if self._cuda else None
        self._queue: deque[int] = deque()
        self._next = 0

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, skipped: torch.Tensor) -> None:
        """Queue the flag of the step just issued; make room with :meth:`ready` first when full."""
        assert len(self._queue) < len(self._host), "StepFlags is full: call ready() before push()"
        slot = self._next
        self._next = (slot + 1) % len(self._host)
        self._host[slot].copy_(skipped, non_blocking=True)
        if self._events is not None:
            self._events[slot].record()
        self._queue.append(slot)

    def ready(self, block: bool = False) -> list[bool]:
        """The flags, oldest first, of the steps the device has finished (all of them when ``block``)."""
        out = []
        while self._queue:
            slot = self._queue[0]
            if self._events is not None and not self._events[slot].query():
                if not block and len(self._queue) < len(self._host):
                    break
                self._events[slot].synchronize()  # note: CPU-GPU sync point (only when asked or the ring is full)
            out.append(bool(self._host[slot]))
            self._queue.popleft()
        return out
