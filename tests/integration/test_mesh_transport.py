"""The mesh's gRPC shell (mesh/transport.py) between two in-process nodes on
loopback: a peer restarted at the same address is answered at once, not
after the reconnect backoff its old process left on the channel."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kvmesh.procs import free_port
from mesh.swim_messages import Ping
from mesh.transport import MeshTransport, TransportConfig

# A backoff long enough that a reply waiting it out is told from one sent at once.
BACKOFF_MS = 8_000


async def _serve(t: MeshTransport, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    t.add_to_server(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def _wait_for(got: list, n: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while len(got) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return len(got) >= n


def _ping(src: str, dst: str, seq: int) -> Ping:
    return Ping(src=src, dst=dst, seq=seq, target="x", source="y")


@pytest.mark.parametrize("renew", [True, False], ids=["renewed", "without_renewal"])
async def test_a_peer_restarted_at_its_address_is_answered_at_once(
    renew: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not renew:  # the control: shows the backoff is what the renewal saves
        monkeypatch.setattr(MeshTransport, "heard_from", lambda self, src: None)
    a_addr, b_addr = f"127.0.0.1:{free_port('127.0.0.1')}", f"127.0.0.1:{free_port('127.0.0.1')}"
    cfg = TransportConfig(reconnect_backoff_ms=(BACKOFF_MS, BACKOFF_MS), rpc_timeout_s=1.0)
    at_a: list = []
    at_b: list = []
    a = MeshTransport(a_addr, at_a.append, cfg)
    b = MeshTransport(b_addr, at_b.append, cfg)
    sa, sb = await _serve(a, int(a_addr.rpartition(":")[2])), await _serve(b, int(b_addr.rpartition(":")[2]))
    try:
        a.send([_ping(a_addr, b_addr, 1)])
        assert await _wait_for(at_b, 1, 5), "the first ping never arrived"
        await sb.stop(0)  # b's process dies ...
        await b.close()
        a.send([_ping(a_addr, b_addr, 2)])  # ... a's next message fails: its channel backs off
        await asyncio.sleep(0.5)
        assert a.stats.send_failures >= 1
        b = MeshTransport(b_addr, at_b.append, cfg)  # ... and b starts again at the same address
        sb = await _serve(b, int(b_addr.rpartition(":")[2]))
        b.send([_ping(b_addr, a_addr, 3)])  # b says hello (a Join, say)
        assert await _wait_for(at_a, 1, 5)
        a.send([_ping(a_addr, b_addr, 4)])  # and a answers
        answered = await _wait_for(at_b, 2, 2.0)
        assert answered is renew, (answered, a.stats.send_failures)
    finally:
        await a.close()
        await b.close()
        await sa.stop(0)
        await sb.stop(0)


class _Backing:
    """A channel that stays in its reconnect backoff (the peer cannot be reached)."""

    closed = 0

    def get_state(self) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE

    async def close(self) -> None:
        _Backing.closed += 1


async def test_a_peer_that_cannot_be_reached_is_not_dialled_per_batch() -> None:
    """One that reaches this node, which cannot reach it (NAT, a one-way
    firewall): its channel is renewed at most once per longest backoff."""
    t = MeshTransport("127.0.0.1:1", lambda m: None, TransportConfig(reconnect_backoff_ms=(100, 60_000)))
    _Backing.closed = 0
    for _ in range(5):
        t._channels["peer:1"] = _Backing()  # type: ignore[assignment]  # what the next send would dial again
        t.heard_from("peer:1")
    await asyncio.sleep(0)
    assert _Backing.closed == 1
    await t.close()
