"""Admission (router/admission.py): what a node takes on, and what it sheds at once."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.admission import ADMIT, QUEUE, Admission, AdmissionConfig, AdmissionGate, Shed, Verdict
from router.errors import Overloaded
from router.outcomes import Outcomes


def test_admits_up_to_max_in_flight_then_queues_then_sheds() -> None:
    a = Admission(AdmissionConfig(max_in_flight=2, max_queue=1, max_queue_wait=5.0))
    assert [a.offer(k, 0.0) for k in "ab"] == [ADMIT, ADMIT]
    assert a.offer("c", 0.0) == QUEUE
    shed = a.offer("d", 0.0)
    assert isinstance(shed, Shed) and "queued" in shed.why
    assert a.finished("a", 0.1) == "c"  # FIFO: the queued request takes the slot
    assert a.in_flight == 2 and a.queued == 0


def test_sheds_when_the_fleet_would_start_a_request_too_late() -> None:
    a = Admission(AdmissionConfig(max_in_flight=1000, max_queue=1000, max_queue_wait=1.0, rate_window=10.0))
    # The fleet starts 10 requests a second (100 first tokens over the 10 s window).
    for i in range(100):
        a.offer(("old", i), i / 10)
        a.started(("old", i), i / 10 + 0.05)
        a.finished(("old", i), i / 10 + 0.06)
    now = 10.0
    assert a.start_rate(now) == pytest.approx(10.0, rel=0.02)
    # A burst the fleet has not yet fallen behind on is taken whole: the
    # rate so far is the demand's, not what the fleet can do.
    assert all(a.offer(("burst", i), now) == ADMIT for i in range(20))
    # Half a second later none of them has started: the fleet is behind.
    # Each unstarted request adds a tenth of a second, and 20 are waiting.
    later = now + a.config.backlog_age
    shed = a.offer(("late", 0), later)
    assert isinstance(shed, Shed) and "estimated wait" in shed.why
    for i in range(15):  # the fleet starts most of them: about ten may wait again
        a.started(("burst", i), later + 0.01)
    verdicts = [a.offer(("new", i), later + 0.02) for i in range(10)]
    admitted = [v for v in verdicts if v == ADMIT]
    assert 3 <= len(admitted) <= 7
    assert all(isinstance(v, Shed) and "estimated wait" in v.why for v in verdicts[len(admitted) :])


def test_a_burst_after_a_quiet_spell_is_not_overload() -> None:
    # Few requests a second, each started at once; then a burst of 40.
    a = Admission(AdmissionConfig(max_queue_wait=2.0, rate_window=5.0))
    for i in range(20):
        a.offer(("quiet", i), i / 4)
        a.started(("quiet", i), i / 4 + 0.05)
        a.finished(("quiet", i), i / 4 + 0.5)
    now = 5.0
    assert a.start_rate(now) < 5  # so 40 waiting would "take" 8 s at that rate
    assert all(a.offer(("burst", i), now + i * 0.001) == ADMIT for i in range(40))
    for i in range(40):  # the fleet starts them quickly: no shedding after either
        a.started(("burst", i), now + 0.1)
    assert a.offer("next", now + 0.2) == ADMIT


class _Fleet:
    """A fleet that starts (and at once finishes) the oldest admitted request
    every ``1 / rate`` seconds, with one new request offered per start."""

    def __init__(self, a: Admission) -> None:
        self.a = a
        self.fifo: list[object] = []
        self.t = 0.0
        self.n = 0

    def offer(self, now: float) -> Verdict:
        self.n += 1
        key = ("req", self.n)
        v = self.a.offer(key, now)
        if v == ADMIT:
            self.fifo.append(key)
        return v

    def run(self, seconds: float, rate: float, *, offers: int) -> None:
        end = self.t + seconds
        while self.t + 1 / rate <= end:
            self.t += 1 / rate
            if self.fifo:
                key = self.fifo.pop(0)
                self.a.started(key, self.t)
                self.a.finished(key, self.t)
            for _ in range(offers):
                self.offer(self.t)


def _learned(rate: float, config: AdmissionConfig) -> tuple[Admission, _Fleet]:
    """An admission whose fleet fell behind at ``rate`` starts a second (a
    surge of 60, then as many arrivals as starts for 6 s): that is its capacity."""
    a = Admission(config)
    fleet = _Fleet(a)
    assert all(fleet.offer(0.0) == ADMIT for _ in range(60))  # nothing known yet: the grace
    assert a.capacity == 0
    fleet.run(6.0, rate, offers=1)
    assert a.capacity == pytest.approx(rate, rel=0.2)
    return a, fleet


def test_a_surge_past_the_capacity_seen_is_shed_before_the_grace_ends() -> None:
    # The first surge is taken whole (nothing known yet); the fleet falls
    # behind at 10 starts a second: that rate is what it can do.
    a, fleet = _learned(10.0, AdmissionConfig(max_queue_wait=2.0))
    fleet.run(30.0, 10.0, offers=0)  # arrivals stop; the backlog drains
    assert a.unstarted == 0
    # A new surge: the oldest of it has not waited backlog_age, but at 10
    # starts a second only about 2 s x 10 of it can start in time.
    now = fleet.t + 0.01
    verdicts = [fleet.offer(now) for _ in range(60)]
    admitted = verdicts.count(ADMIT)
    assert a.oldest_age(now) < a.config.backlog_age
    assert 15 <= admitted <= 25
    assert all(isinstance(v, Shed) and "not yet started" in v.why for v in verdicts[admitted:])


def test_the_capacity_follows_a_fleet_that_grows_or_shrinks() -> None:
    a, fleet = _learned(10.0, AdmissionConfig(max_queue_wait=2.0))
    # The fleet grew: it now starts 40 a second, and 80 arrive a second. The
    # early rule holds the wait at 2 s of the old capacity, which this fleet
    # drains in half a second, so the oldest never waits backlog_age: the
    # capacity must rise from the starts themselves.
    fleet.run(6.0, 40.0, offers=2)
    assert a.capacity == pytest.approx(40.0, rel=0.15)
    assert a.unstarted == pytest.approx(2.0 * 40.0, rel=0.15)
    # It shrinks back to 10 a second: the backlog it was left measures that.
    fleet.run(12.0, 10.0, offers=2)
    assert a.capacity == pytest.approx(10.0, rel=0.15)
    assert a.unstarted <= 2.0 * 10.0 * 1.15


def _simulate(
    a: Admission, offers: list[tuple[float, object]], ttft: Callable[[object], float], decode: float = 1.0
) -> list[tuple[float, object, Verdict]]:
    """Offers at their times; an admitted request starts ``ttft(key)`` later
    and ends ``decode`` after that (engines without a slot limit)."""
    events: list[tuple[float, int, int, object]] = [(t, 1, i, k) for i, (t, k) in enumerate(offers)]
    heapq.heapify(events)
    seq = len(offers)
    out = []
    while events:
        t, kind, _, key = heapq.heappop(events)
        seq += 1
        if kind == 1:
            v = a.offer(key, t)
            out.append((t, key, v))
            if v == ADMIT:
                heapq.heappush(events, (t + ttft(key), 0, seq, key))
        elif kind == 0:
            a.started(key, t)
            heapq.heappush(events, (t + decode, 2, seq, key))
        else:
            a.finished(key, t)
    return out


def _shed_between(log: list[tuple[float, object, Verdict]], lo: float, hi: float) -> int:
    return sum(1 for t, _, v in log if lo <= t < hi and isinstance(v, Shed))


def test_one_slow_request_is_not_a_backlog() -> None:
    # 20 a second, each started in 0.2 s, but one takes 3 s (a long prompt):
    # the fleet is "behind" while it waits, yet nothing queues.
    offers: list[tuple[float, object]] = [(i / 20, ("steady", i)) for i in range(20 * 50)]
    offers += [(60.0 + j * 1e-4, ("burst", j)) for j in range(100)]
    a = Admission(AdmissionConfig())
    log = _simulate(a, offers, lambda k: 3.0 if k == ("steady", 200) else 0.2)
    assert a.capacity == 0  # demand is not capacity
    assert _shed_between(log, 0, 61) == 0  # the burst on the idle fleet is taken whole


def test_a_pause_between_offers_is_not_measured_as_a_backlog() -> None:
    # 20 requests queue behind a stuck one; one offer at 0.6 s, the next a
    # minute later: nobody saw whether a queue stood in between.
    offers: list[tuple[float, object]] = [(0.0, ("r", i)) for i in range(21)]
    offers += [(0.6, "x"), (60.0, "y")] + [(101 + i / 5, ("s", i)) for i in range(5 * 100)]

    def ttft(k: object) -> float:
        if k == ("r", 0):
            return 100.0
        return 1.0 + k[1] * 0.1 if isinstance(k, tuple) and k[0] == "r" else 0.2

    a = Admission(AdmissionConfig())
    log = _simulate(a, offers, ttft)
    assert a.capacity == 0
    assert _shed_between(log, 101, 301) == 0


def test_a_capacity_measured_low_never_locks_the_node() -> None:
    a, fleet = _learned(3.0, AdmissionConfig(max_queue_wait=0.5))
    fleet.run(30.0, 3.0, offers=0)  # the backlog drains
    assert a.unstarted == 0
    # Then a light load, each started in 0.2 s: 1 / capacity alone exceeds
    # max_queue_wait, yet nothing is shed.
    t0 = fleet.t + 30.0
    offers: list[tuple[float, object]] = [(t0 + i / 2, ("light", i)) for i in range(200)]
    log = _simulate(a, offers, lambda k: 0.2)
    assert _shed_between(log, t0, t0 + 100) == 0


def test_a_fleet_faster_than_its_capacity_lifts_it_at_once() -> None:
    a, fleet = _learned(10.0, AdmissionConfig(max_queue_wait=2.0))
    fleet.run(10.0, 10.0, offers=0)
    assert a.unstarted == 0
    # The requests got short: 160 a second arrive and each starts in 0.2 s,
    # so 32 wait at once; the old figure would shed past 2 s x 10. What the
    # fleet starts lifts it within a fraction of a second, long before a
    # backlog could be measured (max_queue_wait).
    t0 = fleet.t + 5.0
    offers: list[tuple[float, object]] = [(t0 + i / 160, ("short", i)) for i in range(160 * 20)]
    log = _simulate(a, offers, lambda k: 0.2)
    assert _shed_between(log, t0 + 0.5, t0 + 20) == 0
    assert a.capacity >= 120


def test_the_capacity_is_forgotten_after_capacity_ttl() -> None:
    a, fleet = _learned(10.0, AdmissionConfig(capacity_ttl=30.0))
    fleet.run(30.0, 10.0, offers=0)
    assert a.capacity > 0 and a.unstarted == 0
    now = fleet.t + 31.0  # the last backlog is older than capacity_ttl
    assert a.capacity_at(now) == 0
    assert all(fleet.offer(now) == ADMIT for _ in range(60))  # the grace decides alone again


def test_an_idle_fleet_is_not_mistaken_for_a_stuck_one() -> None:
    a = Admission(AdmissionConfig(max_queue_wait=1.0))
    # Nothing started yet: the wait is the age of the oldest unstarted request.
    assert all(a.offer(i, 0.0) == ADMIT for i in range(50))
    assert a.estimated_wait(0.5) == pytest.approx(0.5)
    assert isinstance(a.offer("late", 1.5), Shed)  # nothing started in 1.5 s: stuck
    for i in range(50):  # the fleet catches up
        a.started(i, 1.6)
    assert a.offer("after", 1.7) == ADMIT


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("oxsf"), st.integers(0, 30)), max_size=200))
def test_counts_stay_consistent_whatever_the_order(ops: list[tuple[str, int]]) -> None:
    a = Admission(AdmissionConfig(max_in_flight=5, max_queue=5, max_queue_wait=1e9))
    admitted: set[int] = set()
    queued: list[int] = []
    t = 0.0
    for op, k in ops:
        t += 0.01
        if op == "o" and k not in admitted and k not in queued:
            v = a.offer(k, t)
            if v == ADMIT:
                admitted.add(k)
            elif v == QUEUE:
                queued.append(k)
        elif op == "s" and k in admitted:
            a.started(k, t)
        elif op == "f" and k in admitted:
            admitted.discard(k)
            nxt = a.finished(k, t)
            if nxt is not None:
                assert nxt == queued.pop(0)
                admitted.add(nxt)
        elif op == "x" and k in queued:
            assert a.leave_queue(k)
            queued.remove(k)
        assert a.in_flight == len(admitted) <= 5
        assert a.queued == len(queued) <= 5


async def test_the_gate_queues_then_admits_or_sheds_after_max_queue_wait() -> None:
    gate = AdmissionGate(AdmissionConfig(max_in_flight=1, max_queue=2, max_queue_wait=0.2))
    await gate.enter("a")
    waiter = asyncio.create_task(gate.enter("b"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    gate.leave("a")
    await asyncio.wait_for(waiter, 1.0)  # admitted in a's place
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(Overloaded, match=r"no engine slot within 0\.2 s"):
        await gate.enter("c")
    assert asyncio.get_running_loop().time() - t0 < 1.0
    assert gate.admission.in_flight == 1 and gate.admission.queued == 0


async def test_a_client_that_gives_up_in_the_queue_frees_nothing_it_did_not_hold() -> None:
    gate = AdmissionGate(AdmissionConfig(max_in_flight=1, max_queue=2, max_queue_wait=5.0))
    await gate.enter("a")
    waiter = asyncio.create_task(gate.enter("b"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (gate.admission.in_flight, gate.admission.queued, gate.admission.shed_total) == (1, 0, 0)
    gate.leave("a")
    assert gate.admission.in_flight == 0


def test_outcomes_count_everything_and_log_a_few_per_second() -> None:
    o = Outcomes(period=1.0, burst=2)
    logged = [o.record("RESOURCE_EXHAUSTED", "overloaded", t / 100)[0] for t in range(50)]
    assert logged.count(True) == 2
    assert o.record("RESOURCE_EXHAUSTED", "overloaded", 1.5) == (True, 48)  # the next window says so
    assert o.record("OK", "", 1.5) == (False, 0)
    assert o.counts["RESOURCE_EXHAUSTED:overloaded"] == 51 and o.counts["OK"] == 1


def test_a_burst_that_does_not_recur_still_says_how_many_lines_it_left_out() -> None:
    o = Outcomes(period=1.0, burst=2)
    for t in range(50):
        o.record("RESOURCE_EXHAUSTED", "overloaded", t / 100)
    o.record("UNAVAILABLE", "no_engine", 0.2)  # logged: nothing left out of its window
    assert o.unlogged(0.9) == []  # the window is not over
    assert o.unlogged(1.2) == [("RESOURCE_EXHAUSTED", "overloaded", 48)]
    assert o.unlogged(5.0) == []  # said once
    assert o.record("RESOURCE_EXHAUSTED", "overloaded", 5.0) == (True, 0)  # and not again by the next line


def test_a_count_taken_by_the_next_line_is_not_said_again_and_a_reason_can_be_forgotten() -> None:
    o = Outcomes(period=1.0, burst=1)
    for t in range(5):
        o.record("router.attempt_failed", "e1", t / 10)
        o.record("router.attempt_failed", "x:e1", t / 10)
    assert o.record("router.attempt_failed", "e1", 1.2) == (True, 4)  # the next line took it
    assert o.unlogged(1.3) == [("router.attempt_failed", "x:e1", 4)]  # only the other's
    o.forget_reason("e1")
    assert "router.attempt_failed:e1" not in o.counts and o.counts["router.attempt_failed:x:e1"] == 5
    assert o.unlogged(9.0) == []


def test_requests_stuck_on_one_hung_engine_are_not_a_stuck_fleet() -> None:
    # A trickle (one a second: too few starts for a rate), each started in
    # 0.2 s, but the three sent to a hung engine never start: the fleet keeps
    # up with everything else, so nothing is shed.
    stuck = {("t", 3), ("t", 6), ("t", 9)}
    offers: list[tuple[float, object]] = [(float(i), ("t", i)) for i in range(60)]
    a = Admission(AdmissionConfig(max_queue_wait=2.0))
    log = _simulate(a, offers, lambda k: 1e9 if k in stuck else 0.2)
    assert _shed_between(log, 0, 61) == 0  # the oldest waited from t=3 on: the old rule shed from t=5.5
    # A fleet that starts nothing at all is stuck: past min_starts waiting, it sheds.
    b = Admission(AdmissionConfig(max_queue_wait=2.0))
    verdicts = [b.offer(("s", i), float(i) / 2) for i in range(30)]
    assert any(isinstance(v, Shed) for v in verdicts[b.config.min_starts :])
