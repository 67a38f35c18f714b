"""MeshCore as a black box: a tiny in-test network of real cores, driven by hand."""

from __future__ import annotations

import random

import pytest

from blocks.delta import OP_STORE, KvDelta, KvOp
from mesh.core import MeshConfig, MeshCore
from mesh.effects import EngineAdded, EngineRemoved, StartOwning, StopOwning
from mesh.engine_log.entry import LogError
from mesh.gossip import StateGossip
from mesh.ownership import owner_of
from mesh.state_messages import Delta, MessageError, StatePush, SyncReply, SyncRequest, encode_payload
from router.index import PrefixIndex
from router.native_index import apply_change

SPEC = {"endpoint": "tcp://127.0.0.1:5557", "model": "m"}


class Net:
    """Deliver every send at once (optionally dropping), tick all nodes together."""

    def __init__(self, seed: int = 0, drop: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.drop = drop
        self.nodes: dict[str, MeshCore] = {}
        self.index: dict[str, PrefixIndex] = {}
        self.effects: dict[str, list] = {}
        self.now = 0.0

    def add(self, name: str, seeds: list[str]) -> MeshCore:
        c = MeshCore(name, name, self.now, random.Random(f"{name}/{len(self.nodes)}"))
        self.nodes[name] = c
        self.index[name] = PrefixIndex()
        self.effects[name] = []
        c.join(seeds, self.now)
        return c

    def pump(self) -> None:
        for _ in range(10_000):
            moved = False
            for name in sorted(self.nodes):
                c = self.nodes[name]
                self.effects[name] += c.take_effects()
                for d in c.take_index_changes():
                    # Packed entries when the native module is built (MeshConfig.packed_entries).
                    apply_change(self.index[name], d)
                for m in c.take_sends():
                    moved = True
                    dst = self.nodes.get(m.dst)
                    if dst is None or (self.drop and self.rng.random() < self.drop):
                        continue
                    dst.handle(m, self.now)
            if not moved:
                return

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for name in sorted(self.nodes):
                self.nodes[name].tick(self.now)
            self.pump()

    def owner(self, eid: str) -> list[str]:
        return [n for n, c in sorted(self.nodes.items()) if eid in c.owned()]


def mesh(n: int, **kw) -> Net:
    net = Net(**kw)
    net.add("a", [])
    for i in range(1, n):
        net.add(f"n{i}", ["a"])
    net.run(3.0)
    return net


def test_first_node_is_ready_at_once_and_joiners_after_full_state() -> None:
    net = Net()
    a = net.add("a", [])
    assert a.ready
    b = net.add("b", ["a"])
    assert not b.ready
    net.pump()
    net.run(0.5)
    assert b.ready
    assert [m.node for m in b.live_members()] == ["a", "b"]
    assert b.stats()["sent.SyncRequest.msgs"] >= 1


def test_not_ready_node_owns_nothing() -> None:
    net = Net()
    a = net.add("a", [])
    a.register_engine("e1", SPEC, 0.0)
    b = net.add("b", ["a"])
    # b hears of the engine before its full state arrives: it must not take it.
    assert not b.ready and b.owned() == set()


def test_register_engine_elects_exactly_one_owner_with_effects() -> None:
    net = mesh(4)
    net.nodes["a"].register_engine("e1", SPEC, net.now)
    net.pump()
    net.run(1.0)
    live = sorted(net.nodes)
    assert net.owner("e1") == [owner_of("e1", live)]
    for name, c in net.nodes.items():
        assert c.engines() == {"e1": SPEC}
        assert c.owner_of("e1") == owner_of("e1", live)
        assert any(isinstance(e, EngineAdded) and e.engine_id == "e1" for e in net.effects[name])
    owner = net.owner("e1")[0]
    starts = [e for e in net.effects[owner] if isinstance(e, StartOwning)]
    assert len(starts) == 1 and starts[0].spec == SPEC
    assert starts[0].takeover.resume == {}


def test_owner_deltas_reach_every_index_and_handover_resumes() -> None:
    net = mesh(4)
    net.nodes["a"].register_engine("e1", SPEC, net.now)
    net.pump()
    net.run(1.0)
    owner = net.owner("e1")[0]
    c = net.nodes[owner]
    for seq in range(5):
        assert c.engine_deltas("e1", [KvDelta("e1", seq, [KvOp(OP_STORE, [seq * 10 + 1])])], net.now)
    net.pump()
    net.run(1.5)
    for name, idx in net.index.items():
        assert idx.worker_hashes("e1") == {1, 11, 21, 31, 41}, name
    # A non-owner's deltas are refused and nothing is written.
    other = next(n for n in sorted(net.nodes) if n != owner)
    assert not net.nodes[other].engine_deltas("e1", [KvDelta("e1", 5, [KvOp(OP_STORE, [99])])], net.now)
    # Graceful leave of the owner: another node takes over at seq 5.
    c.leave(net.now)
    net.pump()
    assert any(isinstance(e, StopOwning) for e in net.effects[owner])
    net.run(2.0)
    live = sorted(n for n in net.nodes if n != owner)
    new = owner_of("e1", live)
    assert [n for n in net.owner("e1") if n != owner] == [new]
    start = [e for e in net.effects[new] if isinstance(e, StartOwning)][-1]
    assert start.takeover.resume == {"e1": 5}
    assert not c.ready and c.owned() == set()


def test_bad_deltas_raise_and_write_nothing() -> None:
    net = mesh(2)
    net.nodes["a"].register_engine("e1", SPEC, net.now)
    net.pump()
    net.run(1.0)
    owner = net.nodes[net.owner("e1")[0]]
    with pytest.raises(LogError):
        owner.engine_deltas("e1", [KvDelta("other-engine", 0, [KvOp(OP_STORE, [1])])], net.now)
    assert owner.take_index_changes() == []


def test_crash_moves_ownership_and_converges_under_loss() -> None:
    net = mesh(5, seed=3, drop=0.1)
    net.nodes["a"].register_engine("e1", SPEC, net.now)
    net.nodes["a"].register_engine("e2", SPEC, net.now)
    net.pump()
    net.run(3.0)
    victim = net.owner("e1")[0]
    vc = net.nodes[victim]
    vc.engine_deltas("e1", [KvDelta("e1", 0, [KvOp(OP_STORE, [7, 8])])], net.now)
    net.pump()
    net.run(2.0)
    del net.nodes[victim]  # crash: no goodbye
    net.run(30.0)
    live = sorted(net.nodes)
    for e in ("e1", "e2"):
        assert net.owner(e) == [owner_of(e, live)], e
    for name in live:
        assert net.index[name].worker_hashes("e1") == {7, 8}
        assert victim not in {m.node for m in net.nodes[name].live_members()}


def test_restart_with_same_id_comes_back_cleanly() -> None:
    net = mesh(3)
    net.nodes["a"].register_engine("e1", SPEC, net.now)
    net.pump()
    net.run(1.0)
    owner = net.owner("e1")[0]
    net.nodes[owner].engine_deltas("e1", [KvDelta("e1", 0, [KvOp(OP_STORE, [5])])], net.now)
    net.pump()
    net.run(1.0)
    seeds = [n for n in sorted(net.nodes) if n != owner]
    # Restart at once (before anyone declares it dead), new memory, same id.
    net.nodes[owner] = MeshCore(owner, owner, net.now, random.Random("again"))
    net.index[owner] = PrefixIndex()
    net.nodes[owner].join(seeds, net.now)
    net.pump()
    net.run(5.0)
    c = net.nodes[owner]
    assert c.ready
    assert net.owner("e1") == [owner_of("e1", sorted(net.nodes))]
    assert net.index[owner].worker_hashes("e1") == {5}
    if net.owner("e1") == [owner]:
        start = [e for e in net.effects[owner] if isinstance(e, StartOwning)][-1]
        assert start.takeover.resume == {"e1": 1}
        assert start.takeover.epoch.term >= 2  # above the epoch it wrote before the restart


def test_deregister_clears_every_index() -> None:
    net = mesh(3)
    net.nodes["a"].register_engine("e1", SPEC, net.now)
    net.pump()
    net.run(1.0)
    owner = net.owner("e1")[0]
    net.nodes[owner].engine_deltas("e1", [KvDelta("e1", 0, [KvOp(OP_STORE, [5, 6])])], net.now)
    net.pump()
    net.run(1.0)
    net.nodes["a"].deregister_engine("e1", net.now)
    net.pump()
    net.run(2.0)
    for name, c in net.nodes.items():
        assert c.engines() == {}
        assert c.owned() == set()
        assert net.index[name].worker_hashes("e1") == set(), name
        assert any(isinstance(e, EngineRemoved) for e in net.effects[name])


def test_load_is_summed_over_live_nodes_and_dropped_for_dead() -> None:
    net = mesh(3)
    net.nodes["a"].set_local_load({"e1": (2, 100)}, net.now)
    net.nodes["n1"].set_local_load({"e1": (1, 50), "e2": (4, 10)}, net.now)
    net.run(1.0)
    for c in net.nodes.values():
        assert c.worker_load() == {"e1": (3.0, 150.0), "e2": (4.0, 10.0)}
    net.nodes["n1"].set_local_load({"e1": (0, 0)}, net.now)
    net.run(1.0)
    assert net.nodes["a"].worker_load() == {"e1": (2.0, 100.0)}
    with pytest.raises(ValueError):
        net.nodes["a"].set_local_load({"e1": (-1, 0)}, net.now)
    net.nodes["n1"].set_local_load({"e1": (5, 5)}, net.now)
    net.run(1.0)
    del net.nodes["n1"]
    net.run(30.0)
    assert net.nodes["a"].worker_load() == {"e1": (2.0, 100.0)}


def test_hints_spread_and_expire() -> None:
    net = mesh(3)
    net.nodes["a"].add_hint("e1", [1, 2, 3], net.now)
    net.run(0.5)
    for c in net.nodes.values():
        assert c.hint_overlap([1, 2, 3, 4], net.now) == {"e1": 3}
    net.run(3.0)
    for c in net.nodes.values():
        assert c.hint_overlap([1, 2, 3], net.now) == {}


def test_a_new_hint_is_pushed_within_hint_push_delay_not_the_next_round() -> None:
    net = mesh(3)
    a = net.nodes["a"]
    assert a.config.hint_push_delay < a.config.membership.gossip_interval / 4
    # Just after a round: the next regular one is a whole gossip interval away.
    a.tick(net.now)
    net.pump()
    a.add_hint("e1", [7, 8], net.now)
    assert a.next_deadline() <= net.now + a.config.hint_push_delay
    net.run(0.02, step=0.01)  # < gossip_interval (0.2 s)
    assert [c.hint_overlap([7, 8], net.now) for c in net.nodes.values()] == [{"e1": 2}] * 3


def test_sync_request_reply_repairs_a_missed_push() -> None:
    net = mesh(2)
    a, b = net.nodes["a"], net.nodes["n1"]
    a.register_engine("e1", SPEC, net.now)
    a.tick(net.now + 1.0)  # gossip round: the push is produced...
    lost = [m for m in a.take_sends() if isinstance(m, StatePush)]
    assert lost  # ...and dropped here
    assert b.engines() == {}
    b.handle(SyncRequest("n1", "a", encode_payload(b.state.summary())), net.now)  # wrong way round on purpose
    replies = [m for m in b.take_sends() if isinstance(m, SyncReply)]
    assert replies and replies[0].dst == "n1"
    a.handle(replies[0], net.now)  # a learns b's summary and pushes back what b lacks
    pushes = [m for m in a.take_sends() if isinstance(m, StatePush) and m.dst == "n1"]
    assert pushes
    for m in pushes:
        b.handle(m, net.now)
    assert b.engines() == {"e1": SPEC}


def test_forwarding_is_epidemic_and_bounded() -> None:
    net = mesh(12, seed=5)
    net.nodes["a"].register_engine("e1", SPEC, net.now)
    net.pump()
    net.run(5.0)  # let the takeover's own pushes die out
    owner = net.nodes[net.owner("e1")[0]]
    before = sum(c.stats().get("sent.StatePush.msgs", 0) for c in net.nodes.values())
    owner.engine_deltas("e1", [KvDelta("e1", 0, [KvOp(OP_STORE, [42])])], net.now)
    net.run(1.5)
    assert all(net.index[n].worker_hashes("e1") == {42} for n in net.nodes)
    net.run(3.0)
    after = sum(c.stats().get("sent.StatePush.msgs", 0) for c in net.nodes.values())
    # Each of 12 nodes forwards a new item in rounds of 3 peers until it has
    # reached retransmit_limit(4, 12) = 8: 9 pushes; plus a few anti-entropy pushbacks.
    assert after - before <= 12 * 9 + 24
    assert all(c.stats()["queued_items"] == 0 for c in net.nodes.values())


def test_malformed_messages_raise_and_change_nothing() -> None:
    net = mesh(2)
    a = net.nodes["a"]
    with pytest.raises(MessageError):
        a.handle(StatePush("x", "a", b"\x00garbage"), net.now)
    with pytest.raises(MessageError):
        a.handle(SyncRequest("x", "a", encode_payload(a.state.full_state(net.now))), net.now)
    with pytest.raises(MessageError):
        a.handle(object(), net.now)
    assert a.ready


def test_cold_start_without_a_first_node_bootstraps() -> None:
    net = Net(seed=2)
    names = ["a", "b", "c"]
    for n in names:
        net.add(n, [x for x in names if x != n])
    net.pump()
    assert not any(c.ready for c in net.nodes.values())
    net.run(10.0)
    assert all(c.ready for c in net.nodes.values())
    net.nodes["b"].register_engine("e1", SPEC, net.now)
    net.run(2.0)
    assert net.owner("e1") == [owner_of("e1", names)]


def test_determinism() -> None:
    def run() -> tuple:
        net = mesh(4, seed=9, drop=0.05)
        net.nodes["a"].register_engine("e1", SPEC, net.now)
        net.run(2.0)
        return tuple(
            (n, sorted(c.owned()), c.stats().get("sent.StatePush.bytes"))
            for n, c in sorted(net.nodes.items())
        )

    assert run() == run()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        MeshConfig(anti_entropy_interval=0)
    with pytest.raises(ValueError):
        MeshConfig(gossip_fanout=0)


def test_a_lone_node_holds_no_deltas_and_a_joiner_still_gets_them() -> None:
    """With no peer to tell, queued deltas would only grow memory: a joiner
    takes the full state instead."""
    net = mesh(1)
    a = net.nodes["a"]
    a.register_engine("e1", SPEC, net.now)
    for seq in range(200):
        assert a.engine_deltas("e1", [KvDelta("e1", seq, [KvOp(OP_STORE, [seq + 1])])], net.now)
        net.run(0.05)
    assert len(a.gossip) == 0 and a.gossip.queued_bytes == 0
    assert a.gossip.dropped > 0
    net.add("b", ["a"])
    net.run(3.0)
    assert net.index["b"].worker_hashes("e1") == set(range(1, 201))


def test_gossip_queue_is_bounded_in_bytes_and_count() -> None:
    g = StateGossip(
        "a", fanout=2, retransmit_mult=4, max_push_bytes=1 << 20, max_queued=30, max_queued_bytes=10_000
    )
    for i in range(50):
        g.enqueue(Delta(sender="a", registry=bytes(1000 + i)), float(i))
        assert g.queued_bytes <= 10_000
    assert len(g) == 9 and g.dropped == 41
    # The freshest survive: the newest registry update is still queued.
    push = g.round(60.0, ["b", "c"], 3, random.Random(0))
    assert push is not None and len(push.peers) == 2
    g2 = StateGossip("a", fanout=2, retransmit_mult=4, max_push_bytes=1 << 20, max_queued=5)
    for _ in range(8):
        g2.enqueue(Delta(sender="a", registry=bytes(10)), 0.0)
    assert len(g2) == 5 and g2.dropped == 3
    assert g2.round(1.0, [], 1, random.Random(0)) is None
    assert len(g2) == 0 and g2.dropped == 8
