"""Per-node LWW load slots: sum over live nodes, drop, fences, restart."""

from __future__ import annotations

import random

import msgspec
import pytest

from mesh.load_slots import LoadSlots, Slot, WorkerLoad


def test_load_is_sum_over_nodes_and_merge_is_order_independent() -> None:
    a, b, c = LoadSlots("a", 1.0), LoadSlots("b", 1.0), LoadSlots("c", 1.0)
    hist = []
    for i in range(50):
        node = (a, b)[i % 2]
        node.set_local({"e": (i % 7, 100 * i)}, 1.0 + i * 1e-3)
        hist.append(node.local)
    random.Random(0).shuffle(hist)
    for s in hist + hist:
        c.merge(s)
    assert c.slots["a"] == a.local and c.slots["b"] == b.local
    expect = a.local.loads["e"].requests + b.local.loads["e"].requests
    assert c.totals()["e"].requests == expect
    assert c.totals()["e"].tokens == a.local.loads["e"].tokens + b.local.loads["e"].tokens
    assert c.totals({"a"})["e"] == a.local.loads["e"]  # only the named nodes count


def test_negative_counts_refused_and_idle_workers_left_out() -> None:
    a = LoadSlots("a", 0.0)
    assert a.set_local({"e": (1, 10), "f": (2, 0)}, 0.1)
    v = a.local.version
    assert not a.set_local({"e": (1, 10), "f": (2, 0)}, 0.2)  # unchanged: no new version
    assert a.local.version == v
    with pytest.raises(ValueError):
        a.set_local({"e": (-1, 0)}, 0.3)
    assert a.local.loads == {"e": WorkerLoad(1, 10), "f": WorkerLoad(2, 0)}  # nothing applied
    assert a.set_local({"e": (0, 0), "f": (2, 0)}, 0.4)
    assert "e" not in a.local.loads
    assert "e" not in a.totals()


def test_drop_fences_stale_gossip_but_a_newer_slot_returns() -> None:
    a, b = LoadSlots("a", 0.0), LoadSlots("b", 0.0)
    b.set_local({"e": (2, 0)}, 1.0)
    old = b.local
    a.merge(old)
    assert a.totals()["e"].requests == 2
    assert a.drop("b", 2.0)
    assert not a.merge(old)  # stale copy from a third node
    assert "e" not in a.totals()
    back = b.refresh(3.0)  # b was alive after all (or restarted)
    assert a.merge(back) and a.totals()["e"].requests == 2
    a.drop("b", 4.0)
    a.expire(4.0 + a.fence_ttl + 1)
    assert a.merge(old)  # fences are forgotten after their ttl


def test_versions_survive_restart_and_only_owner_writes_its_slot() -> None:
    a1 = LoadSlots("a", 100.0)
    for i in range(5):
        a1.set_local({"e": (i + 1, 0)}, 100.0)  # same clock reading: still increasing
    v = a1.local.version
    a2 = LoadSlots("a", 101.0)  # restarted
    assert a2.local.version > v
    b = LoadSlots("b", 0.0)
    b.merge(a1.local)
    assert b.merge(a2.local)
    assert not a2.merge(Slot("a", 10**18, {"e": WorkerLoad(9, 9)}))


def test_newer_than_and_wire_round_trip() -> None:
    a, b = LoadSlots("a", 0.0), LoadSlots("b", 0.0)
    a.set_local({"e": (1, 5)}, 1.0)
    missing = a.newer_than(b.versions())
    assert [s.node_id for s in missing] == ["a"]
    raw = msgspec.msgpack.encode(missing)
    for s in msgspec.msgpack.decode(raw, type=list[Slot]):
        b.merge(s)
    assert a.newer_than(b.versions()) == []
    assert b.totals()["e"] == WorkerLoad(1, 5)
