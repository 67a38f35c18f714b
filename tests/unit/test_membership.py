"""State transitions of the pure SWIM membership machine (mesh/membership.py).

Messages are routed by hand (instant delivery, explicit drops) so each test
controls exactly which packets arrive.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable

import pytest
import structlog

from mesh.awareness import Awareness
from mesh.membership import Membership, MembershipConfig, MembershipError
from mesh.suspicion import suspicion_timeouts
from mesh.swim_messages import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Ack,
    Alive,
    Dead,
    Gossip,
    Join,
    JoinReply,
    Leave,
    MemberEvent,
    MemberRecord,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)

QUIET = structlog.wrap_logger(
    structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL)
)
CFG = MembershipConfig()


def node(name: str, cfg: MembershipConfig = CFG, now: float = 0.0, seed: int = 0, inc: int = 0) -> Membership:
    rng = random.Random(f"{seed}/{name}")
    return Membership(name, f"{name}:7946", cfg, now, rng, incarnation=inc, logger=QUIET)


class Net:
    """Instant, in-order delivery among Membership nodes with optional drops."""

    def __init__(self, nodes: Iterable[Membership]) -> None:
        self.nodes = {n.addr: n for n in nodes}
        self.down: set[str] = set()
        self.blocked: set[tuple[str, str]] = set()  # directed (src addr, dst addr)
        self.log: list[object] = []  # every delivered message
        self.events: dict[str, list[MemberEvent]] = {n.node_id: [] for n in self.nodes.values()}

    def block(self, a: Membership, b: Membership) -> None:
        self.blocked |= {(a.addr, b.addr), (b.addr, a.addr)}

    def deliver(self, msgs: Iterable[object], now: float) -> None:
        q = deque(msgs)
        for _ in range(100_000):
            if not q:
                break
            m = q.popleft()
            if (m.src, m.dst) in self.blocked or m.dst in self.down or m.src in self.down:
                continue
            dst = self.nodes.get(m.dst)
            if dst is None:
                continue
            self.log.append(m)
            q.extend(dst.handle(m, now))
        self._collect()

    def _collect(self) -> None:
        for n in self.nodes.values():
            self.events[n.node_id].extend(n.events())

    def run(self, t0: float, t1: float, step: float = 0.05) -> float:
        t = t0
        while t < t1:
            for addr, n in list(self.nodes.items()):
                if addr not in self.down:
                    self.deliver(n.tick(t), t)
            t = round(t + step, 6)
        return t

    def kinds(self, observer: str, about: str) -> list[str]:
        return [e.kind for e in self.events[observer] if e.node == about]


def joined_cluster(names: Iterable[str], cfg: MembershipConfig = CFG) -> tuple[Net, list[Membership]]:
    nodes = [node(n, cfg) for n in names]
    net = Net(nodes)
    for n in nodes[1:]:
        net.deliver(n.join([nodes[0].addr], 0.0), 0.0)
    net.run(0.0, 2.0)  # let gossip spread the joins
    for n in nodes:
        assert {m.node for m in n.live_members()} == {x.node_id for x in nodes}
    return net, nodes


def test_config_defaults_are_memberlist_lan() -> None:
    c = MembershipConfig()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.suspicion_mult, c.suspicion_max_timeout_mult, c.retransmit_mult) == (4, 6, 4)
    assert (c.gossip_interval, c.gossip_nodes, c.push_pull_interval) == (0.2, 3, 30.0)
    with pytest.raises(MembershipError):
        MembershipConfig(probe_timeout=2.0)
    with pytest.raises(MembershipError):
        MembershipConfig(gossip_nodes=-1)


def test_join_gets_full_member_list_from_seed() -> None:
    a, b, c = node("a"), node("b"), node("c")
    net = Net([a, b, c])
    net.deliver(b.join([a.addr], 0.0), 0.0)
    out = c.join([a.addr, c.addr], 0.0)  # own address in the seed list is skipped
    assert [type(m) for m in out] == [Join] and out[0].dst == a.addr
    net.deliver(out, 0.0)
    assert c.joined
    # c learned b from a's JoinReply (push-pull), not from b.
    assert {m.node for m in c.live_members()} == {"a", "b", "c"}
    assert net.kinds("c", "b") == ["joined"]
    assert net.kinds("a", "c") == ["joined"]


def test_join_retries_until_a_seed_answers() -> None:
    a, b = node("a"), node("b")
    net = Net([a, b])
    net.down.add(a.addr)
    net.deliver(b.join([a.addr], 0.0), 0.0)
    assert not b.joined
    net.down.clear()
    joins_before = sum(isinstance(m, Join) for m in net.log)
    net.run(0.0, CFG.join_retry_interval + 0.2)
    assert b.joined
    assert sum(isinstance(m, Join) for m in net.log) == joins_before + 1
    net.run(2.2, 10.0)
    assert sum(isinstance(m, Join) for m in net.log) == joins_before + 1  # no more retries


def test_healthy_cluster_stays_alive_without_suspicion() -> None:
    net, nodes = joined_cluster("abcd")
    net.run(2.0, 40.0)
    assert sum(isinstance(m, Ping) for m in net.log) >= 4 * 30
    for n in nodes:
        assert all(m.state == ALIVE for m in n.members())
        assert not any(e.kind in (SUSPECT, DEAD) for e in net.events[n.node_id])


def test_probe_failure_suspects_then_declares_dead_after_suspicion_timeout() -> None:
    net, (a, b, c) = joined_cluster("abc")
    net.down.add(c.addr)  # c crashes
    t_crash = 2.0
    net.run(t_crash, 60.0)
    for obs in ("a", "b"):
        evs = [e for e in net.events[obs] if e.node == "c"]
        assert [e.kind for e in evs][-2:] == ["suspect", "dead"]
        suspect_at, dead_at = evs[-2].at, evs[-1].at
        # 3 members -> k = 0 confirmations wanted -> timeout is the minimum (4 s).
        lo, _ = suspicion_timeouts(4, 6, 3, 1.0)
        assert lo == pytest.approx(4.0)
        assert lo - 0.06 <= dead_at - suspect_at <= lo + 0.1
    assert a.member("c").state == DEAD and b.member("c").state == DEAD
    assert {m.node for m in a.live_members()} == {"a", "b"}


def test_suspicion_is_refuted_with_higher_incarnation() -> None:
    net, (a, b, c) = joined_cluster("abc")
    # a hears (from c) that b is suspect.
    a.handle(Gossip(c.addr, a.addr, (Suspect("b", 0, "c"),)), 3.0)
    assert a.member("b").state == SUSPECT
    # b hears it about itself and refutes: incarnation 1, Alive gossiped.
    b.handle(Gossip(c.addr, b.addr, (Suspect("b", 0, "c"),)), 3.0)
    assert b.incarnation == 1
    net.run(3.0, 4.0)
    assert a.member("b") == MemberRecord("b", b.addr, 1, ALIVE)
    assert "alive" in net.kinds("a", "b")
    net.run(4.0, 40.0)  # the cancelled suspicion timer never fires
    assert DEAD not in net.kinds("a", "b") and DEAD not in net.kinds("c", "b")


def test_probe_of_suspect_carries_suspicion_and_ack_refutes_it() -> None:
    a, b = node("a"), node("b")
    a.handle(Gossip("x:1", a.addr, (Alive("b", b.addr, 0), Suspect("b", 0, "x"))), 0.0)
    assert a.member("b").state == SUSPECT
    ping = next(m for m in a.tick(2.0) if isinstance(m, Ping))
    assert Suspect("b", 0, "a") in ping.updates  # buddy system
    ack = next(m for m in b.handle(ping, 2.0) if isinstance(m, Ack))
    assert b.incarnation == 1 and ack.incarnation == 1
    a.handle(ack, 2.01)
    assert a.member("b") == MemberRecord("b", b.addr, 1, ALIVE)
    assert [e.kind for e in a.events()][-1] == "alive"


def test_refutation_beats_accusations_at_or_above_own_incarnation_only() -> None:
    a = node("a")
    a.handle(Gossip("x:1", a.addr, (Dead("a", 0, "x"),)), 1.0)
    assert a.incarnation == 1
    a.handle(Gossip("x:1", a.addr, (Suspect("a", 5, "x"),)), 1.0)
    assert a.incarnation == 6
    a.handle(Gossip("x:1", a.addr, (Suspect("a", 2, "x"),)), 1.0)  # stale: ignored
    assert a.incarnation == 6
    a.handle(Gossip("x:1", a.addr, (Leave("a", 6),)), 1.0)  # we did not leave
    assert a.incarnation == 7
    assert a.member("a").state == ALIVE


def test_incarnation_ordering_rules() -> None:
    a = node("a")

    def apply(u: object, t: float = 1.0) -> MemberRecord:
        a.handle(Gossip("x:1", a.addr, (u,)), t)
        return a.member("b")

    assert apply(Alive("b", "b:1", 1)) == MemberRecord("b", "b:1", 1, ALIVE)
    assert apply(Suspect("b", 0, "x")).state == ALIVE  # older incarnation: ignored
    assert apply(Suspect("b", 1, "x")).state == SUSPECT  # equal: suspect beats alive
    assert apply(Alive("b", "b:1", 1)).state == SUSPECT  # equal: alive loses
    assert apply(Alive("b", "b:1", 2)).state == ALIVE  # higher: refuted
    assert apply(Dead("b", 1, "x")).state == ALIVE  # older
    assert apply(Dead("b", 2, "x")) == MemberRecord("b", "b:1", 2, DEAD)
    assert apply(Suspect("b", 2, "x")).state == DEAD  # suspect never revives
    assert apply(Alive("b", "b:1", 2)).state == DEAD
    assert apply(Alive("b", "b:2", 3)) == MemberRecord("b", "b:2", 3, ALIVE)  # rejoin, new addr
    assert apply(Leave("b", 3)).state == LEFT
    assert apply(Dead("b", 3, "x")).state == LEFT
    assert apply(Alive("b", "b:2", 4)).state == ALIVE
    assert [e.kind for e in a.events()] == ["joined", "suspect", "alive", "dead", "joined", "left", "joined"]


def test_confirmations_shorten_the_suspicion_timer() -> None:
    names = [f"m{i}" for i in range(10)]
    a = node("a")
    for n in names:
        a.handle(Gossip("x:1", a.addr, (Alive(n, n + ":1", 0),)), 0.0)
    a.handle(Gossip("x:1", a.addr, (Suspect("m0", 0, "m1"),)), 10.0)
    lo, hi = suspicion_timeouts(4, 6, 11, 1.0)
    assert a.next_deadline() <= 10.0 + hi
    a.tick(10.0 + lo + 0.01)
    assert a.member("m0").state == SUSPECT  # one accuser is not enough for the minimum
    # Two independent confirmations (k = suspicion_mult - 2) drive it to the minimum.
    a.handle(Gossip("x:1", a.addr, (Suspect("m0", 0, "m2"), Suspect("m0", 0, "m3"))), 10.5)
    a.tick(10.0 + lo + 0.02)
    assert a.member("m0").state == DEAD


def test_indirect_probe_saves_node_whose_direct_link_is_lossy() -> None:
    def run(indirect: int) -> Net:
        cfg = MembershipConfig(indirect_checks=indirect)
        net, (a, b, _c, _d) = joined_cluster("abcd", cfg)
        net.block(a, b)  # a <-> b direct link drops everything
        net.run(2.0, 60.0)
        return net

    net = run(3)
    assert any(isinstance(m, PingReq) for m in net.log)
    assert any(
        isinstance(m, Ack) and m.dst == "a:7946" and m.src != "b:7946" and m.responder == "b" for m in net.log
    )  # b's ack relayed to a
    for obs in "abcd":
        for about in "ab":
            assert SUSPECT not in net.kinds(obs, about) and DEAD not in net.kinds(obs, about)
    # Control: without indirect probes the same lossy link gets a and b suspected.
    net0 = run(0)
    assert SUSPECT in net0.kinds("a", "b") or SUSPECT in net0.kinds("b", "a")


def test_relay_nacks_when_target_is_silent() -> None:
    a, b = node("a"), node("b")
    out = b.handle(PingReq(a.addr, b.addr, 77, "c", "c:7946"), 1.0)
    assert len(out) == 1 and isinstance(out[0], Ping) and out[0].dst == "c:7946"
    assert b.tick(1.0 + CFG.probe_timeout - 0.01) == []
    nacks = [m for m in b.tick(1.0 + CFG.probe_timeout) if isinstance(m, Nack)]
    assert nacks == [Nack(b.addr, a.addr, 77)]


def test_awareness_rises_on_unanswered_probes_and_recovers() -> None:
    net, (a, b, c) = joined_cluster("abc")
    net.down |= {b.addr, c.addr}  # a is cut off: no acks, no nacks
    net.run(2.0, 6.0)
    assert a.awareness >= 2
    net.down.clear()
    net.run(6.0, 60.0)
    assert a.awareness == 0


def test_awareness_score_is_clamped_and_scales_timeouts() -> None:
    aw = Awareness(max_multiplier=3)
    assert (aw.score, aw.scale(0.5)) == (0, 0.5)
    aw.apply_delta(5)
    assert (aw.score, aw.scale(0.5)) == (2, 1.5)  # at most max_multiplier - 1
    aw.apply_delta(-10)
    assert aw.score == 0
    with pytest.raises(ValueError):
        Awareness(max_multiplier=0)


def test_leave_is_not_mistaken_for_failure() -> None:
    net, (_a, _b, c) = joined_cluster("abc")
    net.deliver(c.leave(3.0), 3.0)
    assert c.leaving and c.member("c").state == LEFT
    net.run(3.0, 5.0)  # c keeps gossiping its Leave for a moment...
    assert c.leave_done()
    net.down.add(c.addr)  # ...then stops
    net.run(5.0, 60.0)
    for obs in "ab":
        assert net.kinds(obs, "c") == ["joined", "left"]
        assert net.nodes[f"{obs}:7946"].member("c").state == LEFT


def test_restarted_node_with_lost_incarnation_rejoins_after_being_declared_dead() -> None:
    net, (a, b, c) = joined_cluster("abc")
    b.handle(Gossip(a.addr, b.addr, (Suspect("b", 0, "a"),)), 2.0)  # b refutes: incarnation 1
    net.run(2.0, 3.0)
    net.down.add(b.addr)
    net.run(3.0, 30.0)
    assert a.member("b").state == DEAD and a.member("b").incarnation == 1
    b2 = node("b", seed=99)  # restart: same id and address, incarnation lost
    assert b2.incarnation == 0
    net.nodes[b2.addr] = b2
    net.down.discard(b2.addr)
    net.deliver(b2.join([a.addr], 30.0), 30.0)
    assert b2.incarnation == 2  # learned its old incarnation (1, dead) and refuted above it
    net.run(30.0, 33.0)
    for n in (a, c):
        assert n.member("b") == MemberRecord("b", b2.addr, 2, ALIVE)
    assert net.kinds("a", "b")[-1] == "joined"


def test_quickly_restarted_node_adopts_newer_incarnation_it_hears_about() -> None:
    a = node("a")
    b = node("b", inc=0)
    a.handle(Gossip("x:1", a.addr, (Alive("b", b.addr, 5),)), 0.0)
    out = b.join([a.addr], 1.0)
    b.handle(a.handle(out[0], 1.0)[0], 1.0)
    assert b.incarnation == 6


def _named(name: str, addr: str, now: float = 0.0, seed: int = 0) -> Membership:
    return Membership(name, addr, CFG, now, random.Random(f"{seed}/{addr}"), logger=QUIET)


@pytest.mark.parametrize("after", [3.0, 60.0])  # b joined moments ago, or long ago
def test_a_second_live_node_with_a_taken_id_yields_and_the_first_keeps_it(after: float) -> None:
    net, (a, b, c) = joined_cluster("abc")
    t = net.run(2.0, after)
    dup = _named("b", "elsewhere:7946", now=t)  # an operator starts another node named b
    net.nodes[dup.addr] = dup
    net.events["b"] = []
    net.deliver(dup.join([a.addr], t), t)
    t = net.run(t, t + 5.0)
    assert dup.yielded and dup.id_conflict == b.addr  # it came second: it stops (the shell exits)
    assert not b.yielded  # the first one keeps its id (it may have logged the conflict too)
    net.down.add(dup.addr)  # the node stopped
    net.run(t, t + 5.0)
    for n in (a, c):  # b is b again, where it was, for everyone
        assert n.member("b").addr == b.addr and n.member("b").state == ALIVE
    # the event the shell logs (both nodes' events land in net.events["b"]: same id)
    assert ("id_conflict", b.addr) in [(e.kind, e.addr) for e in net.events["b"]]


def test_a_restart_on_another_address_takes_the_id_back_without_a_conflict() -> None:
    net, (a, b, c) = joined_cluster("abc")
    t = net.run(2.0, 5.0)
    net.down.add(b.addr)  # b's process is gone (a pod rescheduled: a new address)
    b2 = _named("b", "moved:7946", now=t, seed=7)
    net.nodes[b2.addr] = b2
    net.deliver(b2.join([a.addr], t), t)
    net.run(t, t + 40.0)
    assert not b2.yielded and not b2.id_conflict
    for n in (a, c):
        assert n.member("b").addr == b2.addr and n.member("b").state == ALIVE


def test_a_stale_record_of_a_previous_life_at_our_incarnation_is_refuted_not_taken_for_a_live_node() -> None:
    # A restart on a new address: the seed knew incarnation 3 of the old
    # process, another member a later 4 (members keep the first of equal
    # incarnations, so our refutation to 4 did not replace it there).
    b2 = _named("b", "moved:7946", now=100.0)
    b2.join(["a:7946"], 100.0)
    seed_view = (MemberRecord("a", "a:7946", 0, ALIVE), MemberRecord("b", "b:7946", 3, ALIVE))
    b2.handle(JoinReply("a:7946", b2.addr, "a", seed_view), 100.0)
    assert b2.incarnation == 4
    b2.handle(PushPull("c:7946", b2.addr, "c", (MemberRecord("b", "b:7946", 4, ALIVE),)), 101.0)
    assert b2.incarnation == 5 and not b2.yielded and not b2.id_conflict


def test_push_pull_merges_and_treats_remote_dead_as_suspect() -> None:
    a, b = node("a"), node("b")
    a.handle(Gossip("x:1", a.addr, (Alive("b", b.addr, 0), Alive("c", "c:1", 0))), 0.0)
    b.handle(Gossip("x:1", b.addr, (Alive("a", a.addr, 0), Alive("c", "c:1", 0), Alive("d", "d:1", 0))), 0.0)
    b.handle(Gossip("x:1", b.addr, (Dead("c", 0, "x"),)), 0.0)
    out = a.handle(PushPull(b.addr, a.addr, "b", tuple(b.members())), 1.0)
    assert a.member("d").state == ALIVE  # learned
    assert a.member("c").state == SUSPECT  # b's "dead" is only a suspicion here
    assert len(out) == 1 and isinstance(out[0], PushPull) and out[0].reply and out[0].dst == b.addr
    assert b.handle(out[0], 1.0) == []  # a reply is not answered again


def test_gossip_about_unknown_member_triggers_push_pull_with_sender() -> None:
    a = node("a")
    out = a.handle(Gossip("x:1", a.addr, (Suspect("ghost", 0, "x"),)), 1.0)
    assert a.member("ghost") is None  # a suspicion alone does not create a member...
    assert [(type(m), m.dst) for m in out] == [(PushPull, "x:1")]  # ...but we ask for x's view
    assert a.handle(Gossip("x:1", a.addr, (Dead("ghost", 0, "x"),)), 2.0) == []  # rate-limited


def test_periodic_push_pull_and_reconnect_to_dead_members() -> None:
    a = node("a", MembershipConfig(probe_interval=1e6))  # no probes: b stays alive
    a.handle(Gossip("x:1", a.addr, (Alive("b", "b:1", 0), Alive("c", "c:1", 0), Alive("d", "d:1", 0))), 0.0)
    a.handle(Gossip("x:1", a.addr, (Dead("c", 0, "x"), Dead("d", 0, "x"))), 0.0)
    pp = [(t, m.dst) for t in range(0, 61) for m in a.tick(float(t)) if isinstance(m, PushPull)]
    to_b = [t for t, d in pp if d == "b:1"]
    assert 15 <= to_b[0] <= 30 and len(to_b) == 2  # one live member every 30 s
    dead = [d for _, d in pp if d != "b:1"]
    assert len(dead) == 6  # reconnect every 10 s ...
    assert dead[0::2] in (["c:1"] * 3, ["d:1"] * 3) and set(dead) == {"c:1", "d:1"}  # ... round-robin


def test_gossip_round_sends_to_at_most_gossip_nodes_members_only_when_queued() -> None:
    # No probes or push-pull in this test: only the gossip timer runs.
    a = node("a", MembershipConfig(probe_interval=1e6, push_pull_interval=1e6, reconnect_interval=1e6))
    ups = tuple(Alive(f"m{i}", f"m{i}:1", 0) for i in range(6))
    a.handle(Gossip("x:1", a.addr, ups), 0.0)
    assert a.pending_broadcasts() == 6
    out = [m for m in a.tick(0.3) if isinstance(m, Gossip)]
    assert 1 <= len(out) <= CFG.gossip_nodes and len({m.dst for m in out}) == len(out)
    for _ in range(200):  # drain the queue (transmit limit), then gossip stops
        a.tick(_ * 0.2 + 0.5)
    assert a.pending_broadcasts() == 0
    assert not any(isinstance(m, Gossip) for m in a.tick(100.0))


def test_dead_members_are_reclaimed() -> None:
    cfg = MembershipConfig(dead_reclaim_time=5.0)
    a = node("a", cfg)
    a.handle(Gossip("x:1", a.addr, (Alive("b", "b:1", 0),)), 0.0)
    a.handle(Gossip("x:1", a.addr, (Dead("b", 0, "x"),)), 1.0)
    a.tick(4.0)
    assert a.member("b") is not None
    for t in range(5, 9):
        a.tick(float(t))
    assert a.member("b") is None
    # After reclaim, the same id can come back as a fresh member.
    a.handle(Gossip("x:1", a.addr, (Alive("b", "b:1", 0),)), 10.0)
    assert a.member("b").state == ALIVE


def test_ping_for_another_node_id_is_ignored() -> None:
    a = node("a")
    assert a.handle(Ping("x:1", a.addr, 1, "someone-else", "x"), 0.0) == []
    a.handle(Gossip("x:1", a.addr, (Alive("x", "x:1", 0),)), 0.0)
    out = a.handle(Ping("x:1", a.addr, 1, "a", "x"), 0.0)
    assert len(out) == 1 and (out[0].dst, out[0].seq, out[0].responder) == ("x:1", 1, "a")


def test_probe_from_unknown_or_dead_member_triggers_push_pull() -> None:
    a = node("a")
    out = a.handle(Ping("y:1", a.addr, 1, "a", "y"), 1.0)  # y knows us, we do not know y
    assert out[0] == Ack(a.addr, "y:1", 1, "a", 0)
    assert isinstance(out[1], PushPull) and out[1].dst == "y:1" and not out[1].reply
    # Rate-limited per address.
    assert len(a.handle(Ping("y:1", a.addr, 2, "a", "y"), 2.0)) == 1
    assert len(a.handle(Ping("y:1", a.addr, 3, "a", "y"), 1.0 + CFG.push_pull_backoff)) == 2
    # A member we believe dead that probes us gets our view (and will refute).
    a.handle(Gossip("x:1", a.addr, (Alive("z", "z:1", 0), Dead("z", 0, "x"))), 1.0)
    out = a.handle(Ping("z:1", a.addr, 4, "a", "z"), 1.0)
    assert isinstance(out[1], PushPull) and MemberRecord("z", "z:1", 0, DEAD) in out[1].members


@pytest.mark.parametrize(
    "bad",
    [
        "not a message",
        Gossip("x:1", "a:7946", (Alive("b", "b:1", -1),)),
        Gossip("x:1", "a:7946", (Alive("c", "c:1", 0), "junk")),
        JoinReply("x:1", "a:7946", "x", (MemberRecord("b", "b:1", 0, "zombie"),)),
        Ping("", "a:7946", 1, "a", "x"),
        Ping("x:1", "a:7946", 1, "a", ""),
        Gossip("x:1", "a:7946", None),  # type: ignore[arg-type]  # bad input on purpose
        Ack("x:1", "a:7946", 1, "a", -1),
    ],
)
def test_bad_input_raises_clear_error_and_changes_nothing(bad: object) -> None:
    a = node("a")
    a.handle(Gossip("x:1", a.addr, (Alive("z", "z:1", 0),)), 0.0)
    a.events()
    before = a.members()
    with pytest.raises(MembershipError):
        a.handle(bad, 1.0)  # type: ignore[arg-type]  # bad input on purpose
    assert a.members() == before and a.events() == []


def test_outputs_only_address_known_members_or_seeds() -> None:
    net, nodes = joined_cluster("abcd")
    net.run(2.0, 30.0)
    addrs = {n.addr for n in nodes}
    assert net.log and all(m.dst in addrs and m.src in addrs for m in net.log)
