"""The ports the test and benchmark processes are given, and a start that
meets a port another process took meanwhile (a CI run lost a test to that)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh import procs


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low - 1024 < 1000:
        pytest.skip(f"no room below this host's ephemeral range (it starts at {low}): the kernel chooses")
    ports = [procs.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(1024 <= p < low for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The ports free_port hands out, the first of them one a listener holds."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = procs.free_port
    given: list[int] = []

    def first_the_taken_one(host: str = "127.0.0.1") -> int:
        port = taken.getsockname()[1] if not given else real(host)
        given.append(port)
        return port

    monkeypatch.setattr(procs, "free_port", first_the_taken_one)
    yield given
    taken.close()


def test_a_sim_engine_whose_port_was_taken_starts_on_fresh_ports(handed: list[int]) -> None:
    engine = procs.start_sim_engine("clash", ["--num-gpu-blocks", "64"])
    try:
        assert len(handed) == 6  # three ports, twice
        assert engine.info["url"].endswith(f":{handed[3]}")
    finally:
        engine.stop()


def test_a_process_failing_for_another_reason_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_start = procs.start

    def counted(name: str, args: list[str], **kw: object) -> procs.Proc:
        calls.append(1)
        return real_start(name, args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(procs, "start", counted)
    with pytest.raises(RuntimeError) as err:
        procs.start_sim_engine("bad", ["--num-gpu-blocks", "-5"])
    assert not isinstance(err.value, procs.PortClash)
    assert calls == [1]


def test_with_no_room_below_the_ephemeral_range_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "_ephemeral_low", lambda: 1024)
    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_router_whose_port_was_taken_starts_on_a_fresh_one_and_says_why(
    monkeypatch: pytest.MonkeyPatch, handed: list[int]
) -> None:
    started: list[procs.Proc] = []
    real_start = procs.start

    def kept(name: str, args: list[str], **kw: object) -> procs.Proc:
        try:
            p = real_start(name, args, **kw)  # type: ignore[arg-type]
        except procs.PortClash as e:
            assert f"cannot listen on 127.0.0.1:{handed[0]}: Address already in use" in str(e)
            raise
        started.append(p)
        return p

    monkeypatch.setattr(procs, "start", kept)
    router = procs.start_router("clash-r", [])
    try:
        assert len(handed) == 2 and started == [router]
        assert router.info["grpc"].endswith(f":{handed[1]}")
    finally:
        router.stop()
