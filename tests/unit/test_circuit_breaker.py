from hypothesis import given
from hypothesis import strategies as st

from router.circuit_breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker


def test_opens_after_threshold_and_probes_back():
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=1.0, max_cooldown_s=8.0))
    for t in range(2):
        b.on_failure(float(t))
        assert b.state == CLOSED and b.allows(float(t))
    b.on_failure(2.0)
    assert b.state == OPEN and not b.allows(2.5)
    assert b.allows(3.0) and b.state == HALF_OPEN
    b.on_attempt(3.0)
    assert not b.allows(3.1), "only one probe at a time while half-open"
    b.on_failure(3.2)  # probe failed: cooldown doubles
    assert b.state == OPEN and not b.allows(4.5) and b.allows(5.2)
    b.on_attempt(5.2)
    b.on_success(5.3)
    assert b.state == CLOSED and b.allows(5.3) and b.failures == 0


def test_success_resets_consecutive_failures():
    b = CircuitBreaker(BreakerConfig(failure_threshold=2))
    b.on_failure(0.0)
    b.on_success(0.1)
    b.on_failure(0.2)
    assert b.state == CLOSED


@given(st.lists(st.tuples(st.sampled_from(["ok", "fail", "ask"]), st.floats(0, 5)), max_size=60))
def test_cooldown_never_exceeds_cap_and_open_blocks(ops):
    cfg = BreakerConfig(failure_threshold=2, cooldown_s=0.5, max_cooldown_s=4.0)
    b = CircuitBreaker(cfg)
    now = 0.0
    for op, dt in ops:
        now += dt
        if op == "ok":
            b.on_success(now)
        elif op == "fail":
            b.on_failure(now)
        else:
            if b.allows(now):
                b.on_attempt(now)
        assert b._cooldown <= cfg.max_cooldown_s
        if b.state == OPEN:
            assert not b.allows(b._opened_at + b._cooldown - 1e-6) or b._cooldown == 0


def test_every_change_of_state_is_told_once_with_the_failures() -> None:
    seen: list[tuple[str, str, int]] = []
    b = CircuitBreaker(
        BreakerConfig(failure_threshold=2, cooldown_s=1.0), on_change=lambda *c: seen.append(c)
    )
    b.on_failure(0.0)
    b.on_failure(0.1)  # opens
    b.on_failure(0.2)  # already open: no change
    assert not b.allows(0.5) and b.allows(1.2)  # half-open once
    assert b.allows(1.3)
    b.on_attempt(1.3)
    b.on_failure(1.4)  # the probe failed: open again
    b.allows(3.5)
    b.on_attempt(3.5)
    b.on_success(3.6)
    b.on_success(3.7)  # closed already: no change
    assert seen == [
        (CLOSED, OPEN, 2),
        (OPEN, HALF_OPEN, 3),
        (HALF_OPEN, OPEN, 4),
        (OPEN, HALF_OPEN, 4),
        (HALF_OPEN, CLOSED, 0),
    ]


def test_a_node_logs_its_breakers_opening_and_closing() -> None:
    from structlog.testing import capture_logs

    from router.config import RouterConfig
    from router.engine_registry import EngineSpec
    from router.node import RouterNode

    node = RouterNode(RouterConfig(node_id="n1", insecure=True))
    node.engines.put(EngineSpec(engine_id="e1", endpoint="http://127.0.0.1:1"))
    breaker = node.engines["e1"].breaker
    with capture_logs() as logs:
        for t in range(breaker.config.failure_threshold):
            breaker.on_failure(float(t))
        breaker.on_success(99.0)
    events = [
        (e["event"], e["log_level"], e.get("engine"), e.get("node")) for e in logs if "breaker" in e["event"]
    ]
    assert events == [
        ("router.engine_breaker_opened", "warning", "e1", "n1"),
        ("router.engine_breaker_closed", "info", "e1", "n1"),
    ]
    # Registered again with another spec while open: the new breaker starts
    # closed, and that is said; the old one, still held by attempts in flight, says nothing more.
    for t in range(breaker.config.failure_threshold):
        breaker.on_failure(100.0 + t)
    with capture_logs() as logs:
        node.engines.put(EngineSpec(engine_id="e1", endpoint="http://127.0.0.1:2"))
        breaker.on_success(200.0)
    said = [(e["event"], e.get("was")) for e in logs if "breaker" in e["event"]]
    assert said == [("router.engine_breaker_closed", "open")]
    assert node.engines["e1"].breaker.state == "closed"


def test_a_callback_that_fails_changes_nothing_of_the_breaker() -> None:
    def broken(old: str, new: str, failures: int) -> None:
        raise BrokenPipeError("the log's pipe closed")

    b = CircuitBreaker(
        BreakerConfig(failure_threshold=1, cooldown_s=1.0, max_cooldown_s=8.0), on_change=broken
    )
    b.on_failure(0.0)
    assert b.state == OPEN and b.allows(1.0) and b.state == HALF_OPEN
    b.on_attempt(1.0)
    b.on_failure(1.1)  # the probe failed: cooldown 2 s
    assert b.allows(3.1)
    b.on_attempt(3.1)
    b.on_success(3.2)
    assert b.state == CLOSED and b.failures == 0
    b.on_failure(4.0)
    assert not b.allows(4.9) and b.allows(5.0)  # the cooldown is back to 1 s
