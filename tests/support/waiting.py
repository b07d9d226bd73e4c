"""Polling with deadlines: the only way tests wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold in time (an AssertionError, so pytest shows it as a failure)."""


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
             message: str | Callable[[], str] | None = None,
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises ``WaitTimeout`` after ``timeout`` seconds, with ``message`` (a string, or a callable
    asked at that moment, e.g. to describe the current state) and the last value seen.
    Exceptions of the types in ``ignore`` count as "not yet"; others propagate at once.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last, last_exc = value, None
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            detail = f"last error: {last_exc!r}" if last_exc else f"last value: {last!r}"
            name = getattr(predicate, "__name__", "condition")
            raise WaitTimeout(f"{what or name} not true after {timeout:.1f}s ({detail})")
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def assert_stays(predicate: Callable[[], object], duration: float, interval: float = 0.1,
                 message: str | None = None) -> None:
    """Assert that ``predicate`` holds on every check for ``duration`` seconds.

    For "this must not happen" checks; keep ``duration`` short and make sure, before calling
    it, that whatever could make it false has had its chance to run (e.g. wait until the
    object was processed at least once).
    """
    deadline = time.monotonic() + duration
    while True:
        value = predicate()
        if not value:
            name = getattr(predicate, "__name__", "condition")
            raise AssertionError(f"{message or name} stopped holding (value {value!r})")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)
