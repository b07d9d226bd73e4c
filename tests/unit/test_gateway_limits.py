"""The local limiter: sliding-window RPM/TPM and concurrency, exact, with a fake clock."""

from __future__ import annotations

import asyncio
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.gateway.keys import Limits
from gpupool.gateway.limits import LocalLimiter, retry_after_header


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter() -> tuple[LocalLimiter, FakeClock]:
    clock = FakeClock()
    return LocalLimiter(clock=clock), clock


BIG = 10**9


def test_rpm_is_a_sliding_window() -> None:
    lim, clock = limiter()
    limits = Limits(rpm=3, tpm=BIG, concurrency=BIG)
    for dt in (0, 10, 20):
        clock.t = 1000 + dt
        adm = lim.acquire_now("k", limits, 0)
        assert adm.admitted
        asyncio.run(lim.finish("k", adm.lease, 0))
    clock.t = 1030
    refused = lim.acquire_now("k", limits, 0)
    assert not refused.admitted
    assert refused.reason == "rpm"
    assert refused.retry_after == 30  # the first admission leaves the window at 1060
    clock.t = 1059.999
    assert not lim.acquire_now("k", limits, 0).admitted
    clock.t = 1060
    assert lim.acquire_now("k", limits, 0).admitted
    # no fixed-window doubling: at most 3 in any 60 s, even across a minute edge
    clock.t = 1069.9
    assert not lim.acquire_now("k", limits, 0).admitted


def test_tpm_reserves_settles_and_keeps_aborted_estimates() -> None:
    lim, clock = limiter()
    limits = Limits(rpm=BIG, tpm=100, concurrency=BIG)
    a = lim.acquire_now("k", limits, 60)
    assert a.admitted
    refused = lim.acquire_now("k", limits, 50)
    assert (refused.admitted, refused.reason) == (False, "tpm")
    assert refused.retry_after == 60
    asyncio.run(lim.finish("k", a.lease, 10))  # settled from usage
    b = lim.acquire_now("k", limits, 50)
    assert b.admitted
    asyncio.run(lim.finish("k", b.lease, None))  # aborted: keeps its 50
    assert lim.usage("k") == (2, 60, 0)
    c = lim.acquire_now("k", limits, 41)
    assert not c.admitted
    clock.t += 60
    assert lim.usage("k") == (0, 0, 0)
    assert lim.acquire_now("k", limits, 100).admitted


def test_tpm_retry_after_is_when_enough_tokens_leave() -> None:
    lim, clock = limiter()
    limits = Limits(rpm=BIG, tpm=100, concurrency=BIG)
    for dt, tokens in ((0, 30), (10, 30), (20, 30)):
        clock.t = 1000 + dt
        assert lim.acquire_now("k", limits, tokens).admitted
    clock.t = 1030
    refused = lim.acquire_now("k", limits, 50)  # needs 40 freed: the first two entries
    assert refused.reason == "tpm"
    assert refused.retry_after == 40  # the second leaves at 1070


def test_settling_after_the_window_changes_nothing() -> None:
    lim, clock = limiter()
    limits = Limits(rpm=BIG, tpm=100, concurrency=BIG)
    a = lim.acquire_now("k", limits, 80)
    clock.t += 61
    asyncio.run(lim.finish("k", a.lease, 500))
    assert lim.usage("k") == (0, 0, 0)


def test_concurrency_and_no_partial_consumption() -> None:
    lim, _ = limiter()
    limits = Limits(rpm=10, tpm=BIG, concurrency=2)
    a = lim.acquire_now("k", limits, 1)
    b = lim.acquire_now("k", limits, 1)
    c = lim.acquire_now("k", limits, 1)
    assert (a.admitted, b.admitted, c.admitted) == (True, True, False)
    assert c.reason == "concurrency"
    assert lim.usage("k") == (2, 2, 2)  # the refusal consumed no request and no token
    asyncio.run(lim.finish("k", a.lease, 1))
    assert lim.acquire_now("k", limits, 1).admitted


def test_too_large_is_refused_without_retry() -> None:
    lim, _ = limiter()
    adm = lim.acquire_now("k", Limits(rpm=10, tpm=100, concurrency=1), 101)
    assert (adm.admitted, adm.reason) == (False, "too_large")
    assert lim.usage("k") == (0, 0, 0)


def test_keys_are_independent() -> None:
    lim, _ = limiter()
    limits = Limits(rpm=1, tpm=BIG, concurrency=BIG)
    assert lim.acquire_now("a", limits, 0).admitted
    assert lim.acquire_now("b", limits, 0).admitted
    assert not lim.acquire_now("a", limits, 0).admitted


async def test_exact_under_concurrent_acquires() -> None:
    lim = LocalLimiter()
    limits = Limits(rpm=37, tpm=BIG, concurrency=BIG)
    results = await asyncio.gather(*(lim.acquire("k", limits, 1) for _ in range(500)))
    assert sum(r.admitted for r in results) == 37


def test_retry_after_header_rounds_up() -> None:
    assert retry_after_header(0.001) == "1"
    assert retry_after_header(1.2) == "2"
    assert retry_after_header(60) == "60"


# A random schedule of acquire/finish at random times: at no instant may any 60 s window hold
# more than rpm admissions or more than tpm tokens (reservation, or usage once settled and no
# more than the reservation), and never more than `concurrency` requests in flight.
ops = st.lists(st.tuples(st.sampled_from(["acquire", "finish", "abort"]),
                         st.floats(min_value=0, max_value=20), st.integers(0, 40)),
               min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=ops, rpm=st.integers(1, 8), tpm=st.integers(1, 120), conc=st.integers(1, 4))
def test_never_more_admitted_than_the_limits(ops: list[tuple[str, float, int]], rpm: int,
                                             tpm: int, conc: int) -> None:
    lim, clock = limiter()
    limits = Limits(rpm=rpm, tpm=tpm, concurrency=conc)
    admitted: list[tuple[float, int, str]] = []  # (time, tokens charged, lease)
    charged: dict[str, int] = {}
    running: deque[str] = deque()
    for op, dt, tokens in ops:
        clock.t += dt
        if op == "acquire":
            adm = lim.acquire_now("k", limits, tokens)
            if adm.admitted:
                admitted.append((clock.t, tokens, adm.lease))
                charged[adm.lease] = tokens
                running.append(adm.lease)
            else:
                assert adm.retry_after > 0 or adm.reason == "too_large"
        elif running:
            lease = running.popleft()
            if op == "finish":
                used = tokens % (charged[lease] + 1)  # usage never above the estimate
                asyncio.run(lim.finish("k", lease, used))
                charged[lease] = used
            else:
                asyncio.run(lim.finish("k", lease, None))
        assert len(running) <= conc
        for t, _, _ in admitted:
            window = [(ts, lease) for ts, _, lease in admitted if t - 60 < ts <= t]
            assert len(window) <= rpm
            assert sum(charged[lease] for _, lease in window) <= tpm
