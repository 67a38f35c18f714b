"""Rendezvous ownership: stable, balanced, minimal movement, order-independent."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from mesh.ownership import OwnershipAction, OwnershipTracker, owner_of, owners, score

ENGINES = [f"engine-{i}" for i in range(400)]
NODES = [f"node-{i}" for i in range(8)]


def test_no_live_members_no_owner() -> None:
    assert owner_of("e", []) is None


def test_owner_is_a_live_member_and_order_independent() -> None:
    for e in ENGINES[:50]:
        o = owner_of(e, NODES)
        assert o in NODES
        assert owner_of(e, list(reversed(NODES))) == o
        assert owner_of(e, set(NODES)) == o


def test_balanced_over_members() -> None:
    counts = Counter(owner_of(e, NODES) for e in ENGINES)
    # 400 engines over 8 nodes: 50 each on average; HRW is close to uniform.
    assert set(counts) == set(NODES)
    assert min(counts.values()) > 25 and max(counts.values()) < 80, counts


def test_only_the_departed_members_engines_move() -> None:
    before = owners(ENGINES, NODES)
    gone = "node-3"
    after = owners(ENGINES, [n for n in NODES if n != gone])
    for e in ENGINES:
        if before[e] != gone:
            assert after[e] == before[e]
        else:
            assert after[e] != gone


def test_a_joiner_takes_only_engines_it_now_owns() -> None:
    before = owners(ENGINES, NODES)
    after = owners(ENGINES, NODES + ["node-new"])
    moved = [e for e in ENGINES if before[e] != after[e]]
    assert moved and all(after[e] == "node-new" for e in moved)
    assert 20 < len(moved) < 90  # ~ 1/9 of 400


def test_tracker_takes_and_releases_exactly_the_rendezvous_diff() -> None:
    live = NODES
    after = [n for n in NODES if n != "node-1"]
    for me in NODES:
        t = OwnershipTracker(me, retake_backoff=0.5)
        for a in t.plan(ENGINES, live, 0.0):
            t.taken(a.engine_id)
        assert t.owned == {e for e, o in owners(ENGINES, live).items() if o == me}
        p = t.plan(ENGINES, after, 1.0)
        b, a = owners(ENGINES, live), owners(ENGINES, after)
        assert [x.engine_id for x in p if x.take] == sorted(e for e in ENGINES if a[e] == me and b[e] != me)
        assert [x.engine_id for x in p if not x.take] == sorted(
            e for e in ENGINES if b[e] == me and a[e] != me
        )
        assert [x.engine_id for x in p] == sorted(x.engine_id for x in p)  # one pass, engine order
    t = OwnershipTracker("node-1", retake_backoff=0.5)
    assert t.plan(ENGINES, after, 0.0) == []


def test_tracker_waits_retake_backoff_after_being_fenced_and_releases_deregistered() -> None:
    t = OwnershipTracker("node-0", retake_backoff=0.5)
    mine = [e for e, o in owners(ENGINES, NODES).items() if o == "node-0"]
    for a in t.plan(ENGINES, NODES, 0.0):
        t.taken(a.engine_id)
    assert t.fenced(mine[0], 1.0) and not t.fenced(mine[0], 1.0)
    assert t.plan(ENGINES, NODES, 1.4) == []  # backing off
    assert t.plan(ENGINES, NODES, 1.5) == [OwnershipAction(mine[0], take=True)]
    t.taken(mine[0])
    rest = [e for e in ENGINES if e != mine[1]]
    assert t.plan(rest, NODES, 2.0) == [OwnershipAction(mine[1], take=False, why="not registered")]


def test_score_is_stable_across_processes() -> None:
    """No dependence on PYTHONHASHSEED: another interpreter computes the same."""
    code = (
        "from mesh.ownership import score, owner_of; print(score('e1','n1'), owner_of('e7', ['a','b','c']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=str(__import__("pathlib").Path(__file__).parents[2]),
    ).stdout.split()
    assert int(out[0]) == score("e1", "n1")
    assert out[1] == owner_of("e7", ["a", "b", "c"])


def test_ids_are_length_prefixed() -> None:
    # ("ab", "c") and ("a", "bc") must not collide by concatenation.
    assert score("ab", "c") != score("a", "bc")
