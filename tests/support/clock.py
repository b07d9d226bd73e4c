"""Shifting the operator's clock with faketime so a block boundary passes during a test."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from gpupool.blocks import next_boundary


class ShiftedClock:
    """A faketime offset that puts the shifted clock ``lead`` seconds before a block boundary.

    ``real_at(boundary)`` is the real monotonic-ish wall time at which the shifted clock reaches
    the boundary, so a test can poll with a deadline measured from it.
    """

    def __init__(self, lead: float = 20.0) -> None:
        now = datetime.now(UTC)
        self.boundary = next_boundary(now + timedelta(seconds=lead + 60))
        self.offset = int((self.boundary - now).total_seconds() - lead)
        self.started_real = time.time()

    @property
    def faketime(self) -> str:
        return f"+{self.offset}s"

    def shifted_now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    def seconds_to_boundary(self) -> float:
        return (self.boundary - self.shifted_now()).total_seconds()

    def faketime_at_same_clock(self) -> str:
        """The offset for a process started now that continues the same shifted clock."""
        return self.faketime
