"""Engine discovery's pure core (router/discovery.py): names and templates,
and the reconciliation of DNS answers with the mesh registry -- examples,
then a simulated mesh under noisy DNS (hypothesis)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.ownership import owner_of
from mesh.registry import Registry
from router.discovery import DiscoveryConfig, DiscoveryCore, DiscoveryError, DnsSource, Plan
from router.engine_registry import EngineSpec

TEMPLATE = "url=http://{host}:{port},kv=tcp://{host}:5557,replay=tcp://{host}:5558,model=m,block_size=16"


def _src(text: str = "engines", template: str = TEMPLATE, port: int = 8000) -> DnsSource:
    return DnsSource.parse(text, template, port)


# --- names and templates -------------------------------------------------------------


def test_an_address_becomes_an_engine_of_the_template_with_a_stable_id():
    s = _src("engines.default.svc.cluster.local:9000")
    assert (s.name, s.port, s.source) == (
        "engines.default.svc.cluster.local",
        9000,
        "dns:engines.default.svc.cluster.local",
    )
    spec = s.spec_for("10.0.0.5")
    assert spec == EngineSpec(
        engine_id="engines-10-0-0-5",
        endpoint="http://10.0.0.5:9000",
        model="m",
        block_size=16,
        kv_events_endpoint="tcp://10.0.0.5:5557",
        replay_endpoint="tcp://10.0.0.5:5558",
        source="dns:engines.default.svc.cluster.local",
    )
    # Another node, another process: the same address gives the same engine.
    assert _src("engines.default.svc.cluster.local:9000").spec_for("10.0.0.5") == spec
    assert s.spec_for("10.0.0.6").engine_id == "engines-10-0-0-6"


def test_a_name_may_bring_its_own_template_and_id():
    s = DnsSource.parse("llama=id=llama-{host},url=http://{host}:8000,model=llama", TEMPLATE, 8000)
    spec = s.spec_for("10.1.2.3")
    assert (spec.engine_id, spec.endpoint, spec.model, spec.kv_events_endpoint) == (
        "llama-10.1.2.3",
        "http://10.1.2.3:8000",
        "llama",
        "",
    )
    assert _src("engines").port == 8000  # the config's default port


@pytest.mark.parametrize(
    ("text", "template", "why"),
    [
        ("", TEMPLATE, "not a DNS name"),
        ("bad name", TEMPLATE, "not a DNS name"),
        ("a..b", TEMPLATE, "not a DNS name"),
        ("engines:0", TEMPLATE, "1..65535"),
        ("engines:http", TEMPLATE, "1..65535"),
        ("engines", "id=fixed,url=http://{host}:1", "must contain {host}"),
        ("engines", "url=http://{hots}:1", "placeholders"),
        ("engines", "kv=tcp://{host}:1", "url="),
        ("engines", "url=http://{host}:1,block_size=0", "block_size"),
        ("engines", "url=http://{host}:1,source=x", "bad engine field"),
    ],
)
def test_bad_names_and_templates_are_clear_errors(text, template, why):
    with pytest.raises(DiscoveryError, match="--engines-from-dns") as e:
        DnsSource.parse(text, template, 8000)
    assert why in str(e.value)


def test_config_checks_its_numbers_and_id_collisions():
    DiscoveryConfig(names=["a", "b:9000"]).check()
    for bad in (
        DiscoveryConfig(names=["a"], interval=0),
        DiscoveryConfig(names=["a"], grace=-1),
        DiscoveryConfig(names=["a"], port=70000),
        DiscoveryConfig(names=["a", "a:9000"]),  # given twice
        DiscoveryConfig(names=["engines.ns1", "engines.ns2"]),  # both would be engines-<addr>
    ):
        with pytest.raises(DiscoveryError):
            bad.check()
    # An id of its own removes the collision.
    DiscoveryConfig(names=["engines.ns1", "engines.ns2=id=ns2-{host},url=http://{host}:8000"]).check()


# --- reconciliation: examples ----------------------------------------------------------


class Mesh:
    """One name's discovery on several nodes over one registry (gossip is instant)."""

    def __init__(self, nodes: list[str], grace: float, source: DnsSource | None = None) -> None:
        self.source = source or _src()
        self.nodes = {n: DiscoveryCore(self.source, grace) for n in nodes}
        self.registry: dict[str, EngineSpec] = {}
        self.log: list[tuple[float, str, str, str]] = []  # (time, node, "add"/"update"/"remove", id)

    def owner(self, eid: str) -> str:
        return owner_of(eid, self.nodes)  # type: ignore[return-value]  # never None: nodes is not empty

    def round(self, node: str, answer: list[str], now: float) -> Plan:
        plan = self.nodes[node].observe(answer, dict(self.registry), lambda e: self.owner(e) == node, now)
        for r in plan.register:
            self.registry[r.spec.engine_id] = r.spec
            self.log.append((now, node, "update" if r.update else "add", r.spec.engine_id))
        for g in plan.remove:
            del self.registry[g.engine_id]
            self.log.append((now, node, "remove", g.engine_id))
        return plan

    def ids(self) -> set[str]:
        return {e for e, s in self.registry.items() if s.source == self.source.source}


def _id(addr: str) -> str:
    return _src().engine_id(addr)


def test_new_addresses_are_registered_once_and_steady_state_writes_nothing():
    m = Mesh(["n1", "n2"], grace=10)
    p = m.round("n1", ["10.0.0.1", "10.0.0.2"], 0.0)
    assert sorted(r.spec.engine_id for r in p.register) == [_id("10.0.0.1"), _id("10.0.0.2")]
    assert m.round("n2", ["10.0.0.2", "10.0.0.1"], 0.5).is_empty()  # already registered by n1
    for t in range(1, 20):
        for n in m.nodes:
            assert m.round(n, ["10.0.0.1", "10.0.0.2"], float(t)).is_empty()
    assert len(m.log) == 2


def test_only_the_owner_removes_and_only_after_the_grace():
    m = Mesh(["n1", "n2", "n3"], grace=10)
    addrs = [f"10.0.0.{i}" for i in range(1, 9)]
    m.round("n1", addrs, 0.0)
    gone = "10.0.0.3"
    owner = m.owner(_id(gone))
    others = [n for n in m.nodes if n != owner]
    rest = [a for a in addrs if a != gone]
    # The others lose the address for far longer than the grace: they never remove it.
    for t in range(1, 40):
        for n in others:
            assert not m.round(n, rest, float(t)).remove
        assert m.round(owner, addrs, float(t)).is_empty()
    assert _id(gone) in m.ids()
    # The owner loses it at t=40: removed at the first answer at least `grace` later.
    removed_at = None
    for t in range(40, 60):
        p = m.round(owner, rest, float(t))
        if p.remove:
            assert [g.engine_id for g in p.remove] == [_id(gone)] and p.remove[0].addr == gone
            removed_at = t
            break
    assert removed_at == 50
    assert m.ids() == {_id(a) for a in rest}


def test_an_address_back_within_the_grace_restarts_the_timer():
    m = Mesh(["n1"], grace=10)
    m.round("n1", ["10.0.0.1", "10.0.0.2"], 0.0)
    for t in range(1, 9):
        assert not m.round("n1", ["10.0.0.1"], float(t)).remove
    m.round("n1", ["10.0.0.1", "10.0.0.2"], 9.0)  # back: the next loss starts afresh
    for t in range(10, 19):
        assert not m.round("n1", ["10.0.0.1"], float(t)).remove
    assert [g.engine_id for g in m.round("n1", ["10.0.0.1"], 20.0).remove] == [_id("10.0.0.2")]


def test_a_failed_resolution_is_no_answer_and_an_empty_answer_is_one():
    m = Mesh(["n1"], grace=5)
    m.round("n1", ["10.0.0.1"], 0.0)
    # Failures: observe is never called (the shell skips the round), so no time
    # without an answer counts towards the grace; an empty answer does.
    m.round("n1", [], 100.0)
    assert _id("10.0.0.1") in m.ids()
    assert [g.engine_id for g in m.round("n1", [], 105.0).remove] == [_id("10.0.0.1")]


def test_a_removal_is_not_undone_by_a_node_that_still_sees_the_address():
    m = Mesh(["n1", "n2"], grace=5)
    addr = next(f"10.0.1.{i}" for i in range(256) if m.owner(_id(f"10.0.1.{i}")) == "n1")
    m.round("n1", [addr], 0.0)
    m.round("n2", [addr], 0.0)
    m.round("n1", [], 1.0)
    assert m.round("n1", [], 6.0).remove  # the owner's answers lost it for the grace
    # n2's (stale) answers still hold it: it saw the engine registered, so it
    # takes the removal as decided and does not register it back.
    for t in range(7, 30):
        assert m.round("n2", [addr], float(t)).is_empty()
    assert m.ids() == set()
    # The address leaves n2's answers and returns: a new engine there, registered again.
    m.round("n2", [], 30.0)
    assert [r.spec.engine_id for r in m.round("n2", [addr], 31.0).register] == [_id(addr)]
    # The owner, whose answers lost it, registers it when it sees it again, too.
    m2 = Mesh(["n1", "n2"], grace=5)
    m2.round("n1", [addr], 0.0)
    m2.round("n1", [], 1.0)
    m2.round("n1", [], 6.0)
    assert [r.spec.engine_id for r in m2.round("n1", [addr], 7.0).register] == [_id(addr)]


def test_engines_of_other_sources_are_never_touched():
    m = Mesh(["n1"], grace=0)
    hand = EngineSpec.parse("id=gpu0,url=http://10.9.9.9:8000")
    other = dataclasses.replace(_src("other").spec_for("10.0.0.7"), source="dns:other")
    clash = EngineSpec.parse(f"id={_id('10.0.0.1')},url=http://elsewhere:1")  # by hand, our id
    m.registry = {hand.engine_id: hand, other.engine_id: other, clash.engine_id: clash}
    p = m.round("n1", ["10.0.0.1", "10.0.0.2"], 0.0)
    assert p.conflicts == [_id("10.0.0.1")]
    assert [r.spec.engine_id for r in p.register] == [_id("10.0.0.2")]
    for t in range(1, 10):
        m.round("n1", [], float(t))
    assert m.registry == {hand.engine_id: hand, other.engine_id: other, clash.engine_id: clash}


def test_a_changed_template_is_applied_by_the_owner_only():
    old = Mesh(["n1", "n2"], grace=5)
    old.round("n1", ["10.0.0.1"], 0.0)
    eid = _id("10.0.0.1")
    owner = old.owner(eid)
    other = next(n for n in old.nodes if n != owner)
    new_src = _src(template=TEMPLATE.replace("model=m", "model=m2"))
    new = DiscoveryCore(new_src, 5)
    # A node with the new template that does not own the engine leaves it be...
    assert new.observe(["10.0.0.1"], old.registry, lambda e: False, 1.0).is_empty()
    # ...its owner rewrites it.
    p = new.observe(["10.0.0.1"], old.registry, lambda e: e == eid, 2.0)
    assert [(r.spec.model, r.update) for r in p.register] == [("m2", True)]
    assert other != owner


def test_a_new_owner_registers_what_a_previous_owner_removed():
    m = Mesh(["n1", "n2"], grace=5)
    addr = next(f"10.0.1.{i}" for i in range(256) if m.owner(_id(f"10.0.1.{i}")) == "n1")
    m.round("n1", [addr], 0.0)
    m.round("n2", [addr], 0.0)
    m.round("n1", [], 1.0)
    assert m.round("n1", [], 6.0).remove  # n1's answers (wrongly) lost it for the grace
    assert m.round("n2", [addr], 7.0).is_empty()  # n2 holds: n1 decides
    del m.nodes["n1"]  # n1 leaves the mesh: n2 owns the engine and its answers decide
    assert [r.spec.engine_id for r in m.round("n2", [addr], 8.0).register] == [_id(addr)]


def test_a_template_that_fits_no_address_is_refused_per_address():
    # An id of its own plus a host the template's URL cannot hold: the spec is invalid.
    core = DiscoveryCore(DnsSource("x", 1, "id=x-{host},url=http://{host}:1"), 1)
    p = core.observe(["10.0.0.1", "bad,host"], {}, lambda e: True, 0.0)
    assert [r.addr for r in p.register] == ["10.0.0.1"] and p.refused == ["bad,host"]


def test_memory_is_bounded_by_what_is_present_or_registered():
    core = DiscoveryCore(_src(), grace=1)
    for t in range(200):
        core.observe([f"10.0.{t}.{i}" for i in range(5)], {}, lambda e: True, float(t))
    assert len(core._seen) == 5


def test_the_same_spec_registered_on_two_nodes_is_one_engine_in_the_crdt_registry():
    spec = dataclasses.asdict(_src().spec_for("10.0.0.1"))
    a, b = Registry(client_id=1), Registry(client_id=2)
    ua = a.register(spec["engine_id"], spec)
    ub = b.register(spec["engine_id"], spec)  # concurrent: neither has seen the other
    a.apply(ub)
    b.apply(ua)
    assert a.engines() == b.engines() == {spec["engine_id"]: spec}


# --- reconciliation: a mesh under noisy DNS ---------------------------------------------

ADDRS = [f"10.0.0.{i}" for i in range(1, 7)]
NODES = ["n1", "n2", "n3"]
GRACE = 4.0


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[set[str]], dict[str, list[set[str] | None]]]:
    """The true address set per step, and each node's answers (None: failed)
    with addresses dropped (stale or partial answers)."""
    steps = draw(st.integers(10, 40))
    truth: list[set[str]] = []
    cur = set(draw(st.sets(st.sampled_from(ADDRS))))
    for _ in range(steps):
        if draw(st.booleans()):
            cur = cur ^ {draw(st.sampled_from(ADDRS))}
        truth.append(set(cur))
    answers: dict[str, list[set[str] | None]] = {}
    for n in NODES:
        seq: list[set[str] | None] = []
        for t in range(steps):
            kind = draw(st.sampled_from(["ok", "ok", "ok", "drop", "fail"]))
            if kind == "fail":
                seq.append(None)
            elif kind == "drop":
                seq.append(truth[t] - set(draw(st.sets(st.sampled_from(ADDRS), max_size=3))))
            else:
                seq.append(set(truth[t]))
        answers[n] = seq
    return truth, answers


@settings(max_examples=150, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_under_noisy_dns_removals_are_justified_and_the_registry_converges(history, rnd):
    truth, answers = history
    m = Mesh(NODES, GRACE)
    hand = EngineSpec.parse("id=by-hand,url=http://10.0.0.1:8000")  # same host as a discovered one
    m.registry[hand.engine_id] = hand
    heard: dict[str, list[tuple[float, set[str]]]] = {n: [] for n in NODES}  # successful answers
    for t in range(len(truth)):
        order = list(NODES)
        rnd.shuffle(order)
        for n in order:
            ans = answers[n][t]
            if ans is None:
                continue  # a failed resolution: the shell does not call observe
            heard[n].append((float(t), ans))
            plan = m.round(n, sorted(ans), float(t))
            for g in plan.remove:
                # Removed by the engine's owner, from whose answers the address
                # was missing for the whole grace.
                assert n == m.owner(g.engine_id)
                window = [a for when, a in heard[n] if when >= t - GRACE]
                assert window and all(g.addr not in a for a in window), (g, window)
                assert float(t) - GRACE >= min(when for when, _ in heard[n])
    assert m.registry[hand.engine_id] == hand  # never touched
    # DNS settles: every node sees the truth for longer than the grace.
    end = len(truth)
    final = truth[-1]
    for t in range(end, end + int(GRACE) + 2):
        for n in NODES:
            m.round(n, sorted(final), float(t))
    assert m.ids() == {_id(a) for a in final}
    assert m.registry[hand.engine_id] == hand
    # ... and then it stays quiet: no writes at all.
    for n in NODES:
        assert m.round(n, sorted(final), float(end + 100)).is_empty()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=5, max_size=60))
def test_removals_of_an_engine_are_bounded_by_its_owners_long_absences(owner_sees):
    """Other nodes always see the address; the owner's answers come and go.
    The engine is removed at most once per absence of the owner's that lasted
    the grace: the others never put it back while the owner keeps missing it."""
    m = Mesh(NODES, GRACE)
    addr = "10.0.0.1"
    owner = m.owner(_id(addr))
    for t, sees in enumerate(owner_sees):
        for n in NODES:
            m.round(n, [addr] if (n != owner or sees) else [], float(t))
    removals = sum(1 for _, _, what, _ in m.log if what == "remove")
    long_absences, run = 0, 0
    for sees in [*owner_sees, True]:
        if not sees:
            run += 1
        else:
            long_absences += run > GRACE
            run = 0
    assert removals <= long_absences
