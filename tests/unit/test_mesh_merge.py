"""Seeds resolved again while a node runs, and two meshes that formed apart
merging: ``Membership.add_seeds``, ``MeshCore.add_seeds``, and the registry
forwarding that a merge depends on (``MeshState._apply_registry``)."""

from __future__ import annotations

import random

import pytest

from blocks.delta import OP_STORE, KvDelta, KvOp
from mesh.membership import MembershipError
from mesh.ownership import owner_of
from mesh.state import MeshState
from mesh.swim_messages import Join, PushPull
from tests.unit.test_membership import CFG, Net, node
from tests.unit.test_mesh_core import SPEC
from tests.unit.test_mesh_core import Net as CoreNet

# --- membership ---------------------------------------------------------------------------


def test_joined_node_push_pulls_addresses_outside_its_mesh_once_per_backoff() -> None:
    a, b, c = node("a"), node("b"), node("c")
    net = Net([a, b, c])
    net.deliver(b.join([a.addr], 0.0), 0.0)
    out = a.add_seeds([a.addr, b.addr, c.addr, c.addr], 1.0)  # itself and a member: nothing
    assert [(type(m), m.dst) for m in out] == [(PushPull, c.addr)]
    assert a.add_seeds([c.addr], 1.0 + CFG.push_pull_backoff / 2) == []  # unanswered: wait
    net.deliver(out, 1.0)
    for n in (a, c):  # each side merged the other's list
        assert {m.node for m in n.live_members()} == {"a", "b", "c"}
    assert a.add_seeds([b.addr, c.addr], 20.0) == []  # all members now


def test_joining_node_takes_new_addresses_as_seeds() -> None:
    a, b = node("a"), node("b")
    net = Net([a, b])
    net.down.add("x:7946")
    net.deliver(b.join(["x:7946"], 0.0), 0.0)
    assert not b.joined
    assert b.add_seeds([a.addr], 0.5) == []  # no push-pull: the join retry goes there
    joins = [m for m in b.tick(CFG.join_retry_interval) if isinstance(m, Join)]
    assert {m.dst for m in joins} == {"x:7946", a.addr}
    net.deliver(joins, CFG.join_retry_interval)
    assert b.joined and {m.node for m in b.live_members()} == {"a", "b"}


def test_leaving_node_ignores_seeds_and_bad_addresses_raise() -> None:
    a = node("a")
    with pytest.raises(MembershipError):
        a.add_seeds([""], 0.0)
    a.leave(1.0)
    assert a.add_seeds(["b:7946"], 2.0) == []


def test_two_meshes_formed_apart_merge_into_one_member_list() -> None:
    left = [node(n) for n in ("a1", "a2", "a3")]
    right = [node(n) for n in ("b1", "b2")]
    net = Net(left + right)
    for side in (left, right):
        for n in side[1:]:
            net.deliver(n.join([side[0].addr], 0.0), 0.0)
    net.run(0.0, 3.0)
    assert {m.node for m in left[2].live_members()} == {"a1", "a2", "a3"}
    assert {m.node for m in right[1].live_members()} == {"b1", "b2"}
    # One node of one side resolves the name again and finds the other side.
    net.deliver(left[1].add_seeds([n.addr for n in left + right], 3.0), 3.0)
    net.run(3.0, 6.0)
    everyone = {n.node_id for n in left + right}
    for n in left + right:
        assert {m.node for m in n.live_members()} == everyone, n.node_id


# --- mesh core: membership and state ------------------------------------------------------


def _write(net: CoreNet, eid: str, owner: str, seq: int) -> None:
    """The owner's adapter hands over one batch of the engine (stores a block)."""
    d = KvDelta(eid, seq, [KvOp(OP_STORE, [1000 + seq])])
    assert net.nodes[owner].engine_deltas(eid, [d], net.now)


def test_two_meshes_that_own_the_same_engine_merge_to_one_owner_and_one_log() -> None:
    net = CoreNet(seed=3)
    net.add("a1", [])
    net.add("a2", ["a1"])
    net.add("b1", [])
    net.pump()
    net.run(2.0)
    for n in ("a1", "b1"):  # both meshes register e1 (both were given --engine e1)
        net.nodes[n].register_engine("e1", SPEC, net.now)
    net.pump()
    net.run(1.0)
    a_owner, b_owner = owner_of("e1", ["a1", "a2"]), "b1"
    assert net.owner("e1") == sorted({a_owner, b_owner})  # one owner per mesh
    # Each side's owner consumed the engine from its start: the same stream.
    for seq in range(5):
        for owner in (a_owner, b_owner):
            _write(net, "e1", owner, seq)
    net.pump()
    net.run(1.0)

    net.nodes["b1"].add_seeds(["a1", "a2", "b1"], net.now)
    net.pump()
    net.run(6.0)
    live = ["a1", "a2", "b1"]
    for n, c in net.nodes.items():
        assert [m.node for m in c.live_members()] == live, n
        assert c.engines() == {"e1": SPEC}, n  # the registry merged without losing e1
    winner = owner_of("e1", live)
    assert net.owner("e1") == [winner]
    # The winner resumes after the last batch its log holds; the rest comes from the engine.
    resume = net.nodes[winner].resume_seqs("e1")
    assert resume in ({}, {"e1": 5}), resume
    for seq in range(resume.get("e1", 0), 7):
        _write(net, "e1", winner, seq)
    net.pump()
    net.run(3.0)
    want = {1000 + s for s in range(7)}
    epochs = {c.state.epoch("e1") for c in net.nodes.values()}
    assert len(epochs) == 1 and next(iter(epochs)).owner == winner, epochs
    for n in net.nodes:
        assert net.index[n].worker_hashes("e1") == want, n


# --- registry forwarding --------------------------------------------------------------------


def test_a_concurrent_registration_never_looks_like_a_deregistration() -> None:
    """X and Y register the same engine at once; Z hears both and forwards what
    changed. Whichever value loses on Z, its writer must not see the engine
    disappear (it would retire the engine's log): Z forwards the whole
    registry, winner included, not just the delete of the loser."""
    spec = {"endpoint": "tcp://e1:5557", "model": "m"}
    for seed in range(8):
        rng = random.Random(seed)
        x, y, z = (MeshState(n, 0.0, random.Random(rng.random()), hint_ttl=2.0) for n in "xyz")
        dx, dy = x.register_engine("e1", spec), y.register_engine("e1", spec)
        z.apply_remote(dx, 0.0)
        forwarded = z.apply_remote(dy, 0.0).new
        assert forwarded is not None and forwarded.registry is not None
        for writer in (x, y):
            writer.apply_remote(forwarded, 0.0)
            assert writer.engines() == {"e1": spec}, (seed, writer.node_id)
