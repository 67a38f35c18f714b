"""MeshState convergence, fencing, compaction and resume under a lossy network."""

from __future__ import annotations

import random

import pytest

from blocks.block_map import BlockMap
from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from blocks.hashing import chain_hash, root_seed
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import BlockRemoved, BlockStored
from engine_adapters.sim_engine.cache import NotEnoughBlocks, PrefixCache
from mesh.engine_log.entry import NotOwnerError, decode_entry
from mesh.engine_log.owner import CompactionPolicy
from mesh.registry import Registry
from mesh.state import MeshState
from mesh.state_messages import (
    Delta,
    MessageError,
    Summary,
    decode_payload,
    encode_payload,
    merge_deltas,
)

WORKERS = {"e1": ["e1", "e1#dp1"], "e2": ["e2"]}


def apply_model(model: dict[str, set[int]], d: KvDelta) -> None:
    """The index as the router keeps it (independent of mesh code)."""
    s = model.setdefault(d.worker, set())
    for op in d.ops:
        if op.kind == OP_STORE:
            s.update(op.hashes)
        elif op.kind == OP_REMOVE:
            s.difference_update(op.hashes)
        else:
            s.clear()


def nonempty(model: dict[str, set[int]]) -> dict[str, set[int]]:
    return {w: s for w, s in model.items() if s}


class Engine:
    """A worker's event stream: the ground truth, replayable from any seq."""

    def __init__(self, rng: random.Random, workers: list[str]) -> None:
        self.rng = rng
        self.history: dict[str, list[KvDelta]] = {w: [] for w in workers}
        self.truth: dict[str, set[int]] = {w: set() for w in workers}

    def step(self) -> None:
        w = self.rng.choice(list(self.history))
        live = self.truth[w]
        r = self.rng.random()
        ops = []
        if r < 0.04:
            ops.append(KvOp(OP_CLEAR, []))
        if live and r < 0.45:
            ops.append(KvOp(OP_REMOVE, self.rng.sample(sorted(live), min(len(live), 3))))
        ops.append(KvOp(OP_STORE, [self.rng.getrandbits(64) for _ in range(self.rng.randint(1, 6))]))
        if self.rng.random() < 0.1 and live:  # re-store of an existing block
            ops.append(KvOp(OP_STORE, [next(iter(live))]))
        d = KvDelta(w, len(self.history[w]), ops)
        self.history[w].append(d)
        apply_model(self.truth, d)


class Net:
    """Loss, duplication and reordering; bytes on the wire (encode/decode)."""

    def __init__(self, rng: random.Random, loss: float = 0.25, dup: float = 0.15) -> None:
        self.rng, self.loss, self.dup = rng, loss, dup
        self.queue: list[tuple[int, bytes]] = []

    def send(self, dst: int, msg: Delta) -> None:
        raw = encode_payload(msg)
        for _ in range(2 if self.rng.random() < self.dup else 1):
            if self.rng.random() >= self.loss:
                self.queue.append((dst, raw))

    def deliver_some(self, nodes: list[Node], now: float, frac: float = 0.5) -> None:
        self.rng.shuffle(self.queue)
        k = int(len(self.queue) * frac)
        batch, self.queue = self.queue[:k], self.queue[k:]
        for dst, raw in batch:
            nodes[dst].receive(raw, now)


class Node:
    def __init__(self, i: int, rng: random.Random, policy: CompactionPolicy) -> None:
        self.i = i
        self.state = MeshState(
            f"n{i}", 0.0, random.Random(rng.getrandbits(64)), compaction=policy, hint_ttl=2.0
        )
        self.index: dict[str, set[int]] = {}
        self.cursor: dict[str, dict[str, int]] = {}  # engine -> worker -> next seq to ingest
        self.seen: list[KvDelta] = []

    def receive(self, raw: bytes, now: float) -> None:
        for d in self.state.apply_remote(decode_payload(raw), now).index_changes:
            apply_model(self.index, d)
            self.seen.append(d)

    def ingest(self, engine_id: str, eng: Engine, rng: random.Random) -> list[Delta]:
        """Owner: feed the engine's events from the cursor in small batches."""
        cur = self.cursor[engine_id]
        pending = []
        for w, hist in eng.history.items():
            pending.extend(hist[cur.get(w, 0) :])
        out = []
        while pending:
            n = rng.randint(1, 3)
            batch, pending = pending[:n], pending[n:]
            out.append(self.state.local_deltas(engine_id, batch))
            for d in batch:
                apply_model(self.index, d)
                cur[d.worker] = d.seq + 1
        return out


def anti_entropy(nodes: list[Node], now: float, rounds: int = 4) -> None:
    for _ in range(rounds):
        for a in nodes:
            for b in nodes:
                if a is not b:
                    for m in a.state.diff(decode_payload(encode_payload(b.state.summary()))):
                        b.receive(encode_payload(m), now)
        for n in nodes:
            for m in n.state.take_outgoing():
                for o in nodes:
                    if o is not n:
                        o.receive(encode_payload(m), now)


def check_log_seqs(state: MeshState, engine_id: str) -> None:
    """After the snapshot, each worker's seqs are consecutive: none lost, none twice."""
    rep = state.logs[engine_id]
    entries = rep.current.entries()
    expect: dict[str, int] = {}
    for d in decode_entry(entries[0]):
        expect[d.worker] = d.seq + 1
    for raw in entries[1:]:
        for d in decode_entry(raw):
            assert d.seq == expect.get(d.worker, 0), (d.worker, d.seq, expect.get(d.worker))
            expect[d.worker] = d.seq + 1


@pytest.mark.parametrize("seed", range(10))
def test_convergence_with_loss_dup_reorder_handover_and_compaction(seed: int) -> None:
    rng = random.Random(seed)
    n_nodes = rng.randint(3, 5)
    policy = CompactionPolicy(factor=2.0, min_ops=24)
    nodes = [Node(i, rng, policy) for i in range(n_nodes)]
    net = Net(rng)
    engines = {e: Engine(random.Random(rng.getrandbits(64)), ws) for e, ws in WORKERS.items()}
    owner = {e: 0 for e in engines}
    for e in engines:
        net.send(1, nodes[0].state.register_engine(e, {"endpoint": f"http://{e}", "block_size": 16}))
        t = nodes[0].state.take_ownership(e, 0.0)
        nodes[0].cursor[e] = dict(t.resume)
        for j in range(1, n_nodes):
            net.send(j, t.message)
    stale: dict[str, list[int]] = {e: [] for e in engines}
    handovers = stale_writes = max_gen = retakes = 0
    for step in range(160):
        now = step * 0.01
        for e, eng in engines.items():
            eng.step()
            writers = [owner[e], *stale[e]]
            for w in writers:
                try:
                    msgs = nodes[w].ingest(e, eng, rng)
                except NotOwnerError:
                    if w != owner[e]:
                        stale[e].remove(w)
                        continue
                    # Fenced by a concurrent epoch of the same term (it was handed
                    # ownership before hearing of an intermediate owner): the shell
                    # re-takes ownership, since membership still says it owns e.
                    assert e in nodes[w].state.take_lost_ownership()
                    t = nodes[w].state.take_ownership(e, now)
                    nodes[w].cursor[e] = dict(t.resume)
                    retakes += 1
                    msgs = [t.message, *nodes[w].ingest(e, eng, rng)]
                stale_writes += len(msgs) if w != owner[e] else 0
                max_gen = max(max_gen, nodes[w].state.epoch(e).gen)
                for m in msgs:
                    for j in range(n_nodes):
                        if j != w:
                            net.send(j, m)
            if rng.random() < 0.03:  # handover: the old owner does not know yet
                new = rng.choice([i for i in range(n_nodes) if i != owner[e]])
                t = nodes[new].state.take_ownership(e, now)
                nodes[new].cursor[e] = dict(t.resume)
                if owner[e] not in stale[e]:
                    stale[e].append(owner[e])
                owner[e] = new
                handovers += 1
                for j in range(n_nodes):
                    if j != new:
                        net.send(j, t.message)
        net.deliver_some(nodes, now)
        if step % 40 == 39:
            anti_entropy(nodes, now, rounds=1)
    assert handovers >= 1 and stale_writes >= 1 and max_gen >= 1, "scenario too tame"
    net.deliver_some(nodes, 2.0, frac=1.0)
    # The current owners catch up with their engines, then the mesh repairs.
    for e, eng in engines.items():
        nodes[owner[e]].ingest(e, eng, rng)
    anti_entropy(nodes, 2.0)
    for node in nodes:
        for e, eng in engines.items():
            rep = node.state.logs[e]
            assert rep.epoch.owner == f"n{owner[e]}"
            assert nonempty(node.state.logs[e].materialise()) == nonempty(eng.truth)
            assert node.state.resume_seqs(e) == {w: len(h) for w, h in eng.history.items() if h}
            check_log_seqs(node.state, e)
        truth = {w: s for eng in engines.values() for w, s in eng.truth.items() if s}
        assert nonempty(node.index) == truth, f"node {node.i} index diverged"
        assert node.state.engines().keys() == engines.keys()
    assert all(e not in nodes[i].state.owned_engines() for e in engines for i in stale[e])
    summaries = {encode_payload(n.state.summary().engines) for n in nodes}
    assert len(summaries) == 1, "summaries differ after anti-entropy"


def _mk(n: int, seed: int = 0, policy: CompactionPolicy | None = None) -> list[MeshState]:
    rng = random.Random(seed)
    return [
        MeshState(f"n{i}", 0.0, random.Random(rng.getrandbits(64)), compaction=policy, hint_ttl=2.0)
        for i in range(n)
    ]


def _store(worker: str, seq: int, hashes: list[int]) -> KvDelta:
    return KvDelta(worker, seq, [KvOp(OP_STORE, hashes)])


def test_stale_owner_writes_never_reach_replicas_that_know_the_new_epoch() -> None:
    a, b, c = _mk(3)
    t = a.take_ownership("e", 0.0)
    for s in (b, c):
        s.apply_remote(t.message, 0.0)
    m1 = a.local_deltas("e", [_store("e", 0, [1, 2, 3])])
    b.apply_remote(m1, 0.0)  # c misses it
    t2 = b.take_ownership("e", 0.0)
    assert t2.resume == {"e": 1}
    assert t2.epoch.term == 2 and t2.epoch.owner == "n1"
    c.apply_remote(t2.message, 0.0)
    # a (stale, partitioned) keeps writing garbage markers in its old epoch.
    big = 1 << 60  # realistic 64-bit hashes: the compaction trigger counts bytes
    zombie = [a.local_deltas("e", [_store("e", 1 + k, [big + k])]) for k in range(3)]
    seen_by_c = []
    for z in zombie:
        seen_by_c += c.apply_remote(z, 0.0).index_changes
        seen_by_c += b.apply_remote(z, 0.0).index_changes
    assert seen_by_c == []
    assert c.logs["e"].materialise() == {"e": {1, 2, 3}}
    # A stale compaction by the old owner does not beat the takeover either.
    old = a.owners["e"]
    old.policy = CompactionPolicy(factor=1.01, min_ops=1)
    comp = a.local_deltas(
        "e", [KvDelta("e", 4, [KvOp(OP_REMOVE, [big, big + 1, big + 2]), KvOp(OP_STORE, [big + 9])])]
    )
    assert len(comp.logs) == 2 and comp.logs[1].epoch.gen == 1
    assert c.apply_remote(comp, 0.0).index_changes == []
    # The stale owner learns the new epoch: fenced, and told so.
    changes = a.apply_remote(t2.message, 0.0).index_changes
    assert "e" not in a.owned_engines()
    assert a.take_lost_ownership() == ["e"]
    with pytest.raises(NotOwnerError):
        a.local_deltas("e", [_store("e", 5, [1])])
    model: dict[str, set[int]] = {"e": {1, 2, 3, big, big + 1, big + 2, big + 9}}
    for d in changes:
        apply_model(model, d)
    assert model == {"e": {1, 2, 3}}
    assert a.logs["e"].materialise() == {"e": {1, 2, 3}}


def test_takeover_when_new_owner_missed_entries_resumes_exactly() -> None:
    a, b = _mk(2)
    t = a.take_ownership("e", 0.0)
    b.apply_remote(t.message, 0.0)
    msgs = [a.local_deltas("e", [_store("e", s, [s])]) for s in range(5)]
    for m in msgs[:2]:
        b.apply_remote(m, 0.0)
    b.apply_remote(msgs[4], 0.0)  # held pending: seq 2, 3 missing
    assert b.logs["e"].materialise() == {"e": {0, 1}}
    t2 = b.take_ownership("e", 0.0)
    assert t2.resume == {"e": 2}  # replay 2.. from the engine: nothing lost, nothing twice
    for s in range(2, 5):
        b.local_deltas("e", [_store("e", s, [s])])
    assert b.logs["e"].materialise() == {"e": {0, 1, 2, 3, 4}}
    assert b.resume_seqs("e") == {"e": 5}
    check_log_seqs(b, "e")


def test_compaction_keeps_contents_and_resume_and_bounds_log() -> None:
    a, b = _mk(2, policy=CompactionPolicy(factor=2.0, min_ops=8))
    t = a.take_ownership("e", 0.0)
    b.apply_remote(t.message, 0.0)
    rng = random.Random(5)
    truth: dict[str, set[int]] = {}
    index: dict[str, set[int]] = {}
    epochs = set()
    seqs = {"e": 0, "e#dp1": 0}
    for _ in range(300):
        w = rng.choice(["e", "e#dp1"])
        live = sorted(truth.get(w, ()))
        ops = [KvOp(OP_STORE, [rng.getrandbits(64) for _ in range(4)])]
        if len(live) > 10:
            ops.append(KvOp(OP_REMOVE, rng.sample(live, 4)))
        d = KvDelta(w, seqs[w], ops)
        seqs[w] += 1
        apply_model(truth, d)
        m = a.local_deltas("e", [d])
        for ch in b.apply_remote(m, 0.0).index_changes:
            apply_model(index, ch)
        epochs.add(a.epoch("e"))
        owner = a.owners["e"]
        # the log never outgrows K x a snapshot by more than one entry
        assert owner.log_bytes <= 2 * max(owner.snapshot_bytes(), 9 * 8) + 200
        assert owner.live_blocks == sum(len(s) for s in owner.live.live_sets().values())
    assert len(epochs) > 3, "compaction never ran"
    assert {e.term for e in epochs} == {1}  # compaction keeps the term
    assert a.logs["e"].materialise() == truth == b.logs["e"].materialise()
    assert nonempty(index) == nonempty(truth)
    assert b.resume_seqs("e") == {w: s for w, s in seqs.items()}
    assert b.epoch("e") == a.epoch("e")


def test_epoch_switch_clears_workers_missing_from_snapshot() -> None:
    a, b, c = _mk(3)
    t = a.take_ownership("e", 0.0)
    b.apply_remote(t.message, 0.0)
    c.apply_remote(t.message, 0.0)
    m = a.local_deltas("e", [_store("e#dp1", 0, [7, 8])])
    b.apply_remote(m, 0.0)  # c never sees e#dp1
    t2 = c.take_ownership("e", 0.0)
    changes = b.apply_remote(t2.message, 0.0).index_changes
    assert changes[0] == KvDelta("e#dp1", -1, [KvOp(OP_CLEAR, [])])
    model = {"e#dp1": {7, 8}}
    for d in changes:
        apply_model(model, d)
    assert nonempty(model) == {}
    assert t2.resume == {}


def test_pending_higher_epoch_fences_but_keeps_old_contents_until_snapshot_arrives() -> None:
    a, b, c = _mk(3)
    t = a.take_ownership("e", 0.0)
    for s in (b, c):
        s.apply_remote(t.message, 0.0)
    m = a.local_deltas("e", [_store("e", 0, [1])])
    b.apply_remote(m, 0.0)
    c.apply_remote(m, 0.0)
    t2 = b.take_ownership("e", 0.0)
    later = b.local_deltas("e", [_store("e", 1, [2])])
    # c gets the new epoch's second update before its snapshot: held pending.
    assert c.apply_remote(later, 0.0).index_changes == []
    assert c.logs["e"].known_epoch == t2.epoch
    assert c.epoch("e") == t.epoch  # still reading the old epoch
    assert c.apply_remote(a.local_deltas("e", [_store("e", 1, [5])]), 0.0).index_changes == []  # fenced
    changes = c.apply_remote(t2.message, 0.0).index_changes
    model: dict[str, set[int]] = {}
    for d in changes:
        apply_model(model, d)
    assert model == {"e": {1, 2}}
    assert c.resume_seqs("e") == {"e": 2}


def test_full_state_brings_a_joiner_up_to_date() -> None:
    a, b = _mk(2)
    a.register_engine("e", {"endpoint": "http://e:8000", "block_size": 16, "dp_size": 2})
    a.take_ownership("e", 0.0)
    a.local_deltas("e", [_store("e", 0, [1, 2]), _store("e#dp1", 0, [3])])
    a.slots.set_local({"e": (2, 300)}, 1.0)
    a.add_hint("e", [10, 11], 1.0)
    raw = encode_payload(a.full_state(1.0))
    changes = b.apply_remote(decode_payload(raw), 1.1).index_changes
    model: dict[str, set[int]] = {}
    for d in changes:
        apply_model(model, d)
    assert model == {"e": {1, 2}, "e#dp1": {3}}
    assert b.engines() == {"e": {"endpoint": "http://e:8000", "block_size": 16, "dp_size": 2}}
    assert b.slots.totals()["e"].requests == 2 and b.slots.totals()["e"].tokens == 300
    assert b.hint_overlap([10, 11, 12], 1.2) == {"e": 2}
    assert b.diff(a.summary()) == [] or all(not d.logs for d in b.diff(a.summary()))
    assert a.diff(b.summary()) == []


def test_registry_register_deregister_replicates_and_retires_owned_log() -> None:
    a, b = _mk(2)
    b.apply_remote(a.register_engine("e", {"endpoint": "http://e"}), 0.0)
    t = b.take_ownership("e", 0.0)
    a.apply_remote(t.message, 0.0)
    a.apply_remote(b.local_deltas("e", [_store("e", 0, [1, 2])]), 0.0)
    dereg = a.deregister_engine("e")
    assert a.engines() == {}
    b.apply_remote(dereg, 0.0)
    assert b.engines() == {}
    out = b.take_outgoing()
    assert len(out) == 1 and "e" not in b.owned_engines()
    changes = a.apply_remote(out[0], 0.0).index_changes
    model = {"e": {1, 2}}
    for d in changes:
        apply_model(model, d)
    assert nonempty(model) == {}
    assert a.resume_seqs("e") == {}  # registered again, it is read from its replay buffer's start
    with pytest.raises(ValueError):
        a.register_engine("bad#dp1", {"endpoint": "x"})
    with pytest.raises(ValueError):
        a.register_engine("e2", {"endpoint": "x", "block_size": 0})


def test_a_deregistration_is_forwarded_by_the_nodes_it_reaches() -> None:
    """A relay forwards what changed its registry, deregistrations included,
    though a delete does not move the registry's state vector."""
    a, b, c = _mk(3)
    reg = a.register_engine("e", {"endpoint": "http://e"})
    for s in (b, c):
        s.apply_remote(reg, 0.0)
    relayed = b.apply_remote(a.deregister_engine("e"), 0.0).new  # c hears of it only through b
    assert relayed is not None and relayed.registry
    c.apply_remote(relayed, 0.0)
    assert b.engines() == {} and c.engines() == {}
    assert b.apply_remote(relayed, 0.0).new is None  # heard twice: nothing to forward


def test_a_value_that_is_not_a_plain_string_is_no_engine() -> None:
    """A nested CRDT text holding a spec (a foreign or buggy writer) reads as
    a string in the map's JSON; it is refused, as a spec read value by value is."""
    import pycrdt

    a, b = _mk(2)
    b.apply_remote(a.register_engine("good", {"endpoint": "http://good"}), 0.0)
    a.registry._map["text"] = pycrdt.Text('{"endpoint": "http://evil"}')
    b.apply_remote(Delta(sender="n0", registry=a.registry.update_since()), 0.0)
    assert set(b.engines()) == {"good"}


def test_anti_entropy_repairs_a_missed_deregistration() -> None:
    """The deregistration's push lost on the way to b: the registries' state
    vectors are equal (a delete does not move them), so their content's
    digest tells anti-entropy, which sends it whole."""
    a, b = _mk(2)
    b.apply_remote(a.register_engine("e", {"endpoint": "http://e"}), 0.0)
    a.register_engine("f", {"endpoint": "http://f"})
    b.apply_remote(a.diff(b.summary())[0], 0.0)
    a.deregister_engine("e")  # lost
    assert a.registry.state_vector() == b.registry.state_vector()
    assert a.registry.digest() != b.registry.digest()
    fix = [d for d in a.diff(b.summary()) if d.registry]
    assert len(fix) == 1
    b.apply_remote(fix[0], 0.0)
    assert b.engines() == a.engines() == {"f": {"endpoint": "http://f"}}
    assert a.registry.digest() == b.registry.digest()
    assert not [d for d in a.diff(b.summary()) if d.registry]  # repaired: nothing more to send
    assert not [d for d in b.diff(a.summary()) if d.registry]


def test_an_update_decodes_only_the_specs_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet registering engines one by one costs each node one decode per
    registration, not one per engine known (which made a thousand engines
    cost every node tens of seconds)."""
    a, b = _mk(2)
    decoded: list[str] = []
    real = Registry._decode
    monkeypatch.setattr(Registry, "_decode", lambda self, e, raw: decoded.append(e) or real(self, e, raw))
    for i in range(50):
        b.apply_remote(a.register_engine(f"e{i}", {"endpoint": f"http://e{i}"}), 0.0)
    assert sorted(decoded) == sorted(f"e{i}" for i in range(50))
    assert b.engines() == a.engines() and len(b.engines()) == 50
    b.apply_remote(a.register_engine("e7", {"endpoint": "http://e7-moved"}), 0.0)
    assert decoded[-1] == "e7" and len(decoded) == 51
    assert b.engines()["e7"] == {"endpoint": "http://e7-moved"}


def test_bad_input_is_rejected_and_nothing_is_lost() -> None:
    a, b = _mk(2)
    t = a.take_ownership("e", 0.0)
    b.apply_remote(t.message, 0.0)
    good = a.local_deltas("e", [_store("e", 0, [1])])
    with pytest.raises(ValueError):
        a.local_deltas("e", [_store("other", 1, [2])])  # worker of another engine
    with pytest.raises(ValueError):
        a.local_deltas("e", [_store("e", 1, [-5])])
    with pytest.raises(ValueError):
        a.local_deltas("e", [KvDelta("e", 1, [KvOp(7, [])])])
    assert a.logs["e"].materialise() == {"e": {1}}
    with pytest.raises(MessageError):
        decode_payload(b"\x01garbage")
    bad = Delta(sender="x", logs=[good.logs[0].__class__("e", t.epoch, b"\x05\x06junk")])
    assert b.apply_remote(bad, 0.0).index_changes == []  # logged, skipped
    assert [d.seq for d in b.apply_remote(good, 0.0).index_changes] == [0]
    bad_reg = Delta(sender="x", registry=b"\x07nope")
    b.apply_remote(bad_reg, 0.0)
    assert b.logs["e"].materialise() == {"e": {1}}
    with pytest.raises(NotOwnerError):
        b.local_deltas("e", [_store("e", 1, [2])])


def test_merge_deltas_batches_log_updates_into_one_per_epoch() -> None:
    a, b = _mk(2)
    t = a.take_ownership("e", 0.0)
    msgs = [t.message] + [a.local_deltas("e", [_store("e", s, [s])]) for s in range(50)]
    merged = merge_deltas("n0", msgs)
    assert len(merged.logs) == 1
    changes = b.apply_remote(decode_payload(encode_payload(merged)), 0.0).index_changes
    assert [d.seq for d in changes] == list(range(50))  # empty snapshot: no deltas
    assert b.logs["e"].materialise() == {"e": set(range(50))}


def test_summary_round_trip_and_diff_is_minimal() -> None:
    a, b = _mk(2)
    t = a.take_ownership("e", 0.0)
    b.apply_remote(t.message, 0.0)
    for s in range(10):
        m = a.local_deltas("e", [_store("e", s, [s])])
        if s < 7:
            b.apply_remote(m, 0.0)
    s_b = decode_payload(encode_payload(b.summary()))
    assert isinstance(s_b, Summary)
    diff = a.diff(s_b)
    logs = [lu for d in diff for lu in d.logs]
    assert len(logs) == 1
    changes = b.apply_remote(diff[0], 0.0).index_changes
    assert [d.seq for d in changes] == [7, 8, 9]
    assert all(not d.logs for d in a.diff(b.summary()))


# --- handover of the engine hash -> router hash mapping ---------------------------

MODEL = "toy-model"
BS = 4


def cache_batches(
    cache: PrefixCache, rng: random.Random, prefixes: list[list[int]], n: int, clear_p: float = 0.0
) -> list[list]:
    """``n`` engine batches of a vLLM-like prefix cache under prompts sharing
    a few prefixes (small pool: evictions in most batches)."""
    out = []
    for step in range(n):
        rid = f"r{step}"
        prompt = rng.choice(prefixes) + [rng.randrange(500) for _ in range(rng.randint(1, 3 * BS))]
        outputs = [rng.randrange(500) for _ in range(rng.randint(0, 2 * BS))]
        try:
            cache.allocate(rid, prompt, reserve_tokens=len(outputs))
        except NotEnoughBlocks:
            pass
        else:
            cache.commit_full_blocks(rid, prompt)
            cache.commit_full_blocks(rid, prompt + outputs)
            cache.release(rid)
        if rng.random() < clear_p:
            cache.clear()
        out.append(cache.drain_events())
    return out


class RouterTruth:
    """Router hashes of what a cache really holds, from its snapshot."""

    def __init__(self) -> None:
        self.known: dict[int, int] = {}  # engine hash -> router hash (a hash names a prefix)

    def __call__(self, cache: PrefixCache) -> set[int]:
        blocks = {b["hash"]: b for b in cache.snapshot()}

        def rh(eh: int) -> int:
            if eh not in self.known:
                b = blocks[eh]
                parent = root_seed(MODEL) if b["parent"] is None else rh(b["parent"])
                self.known[eh] = chain_hash(parent, b["tokens"])
            return self.known[eh]

        return {rh(eh) for eh in blocks}


def _pre_handover_activity(batches: list[list], live_eh: set) -> tuple[int, int]:
    """(removals of, stores chained to) engine blocks live at the handover."""
    removed = chained = 0
    for events in batches:
        for ev in events:
            if isinstance(ev, BlockRemoved):
                removed += len(live_eh.intersection(ev.block_hashes))
            elif isinstance(ev, BlockStored) and ev.parent_block_hash in live_eh:
                chained += 1
    return removed, chained


@pytest.mark.parametrize("seed", range(3))
def test_new_owner_resumes_the_mapping_from_the_log(seed: int) -> None:
    """Owner A maps a PrefixCache's events and logs them; B takes over, gets
    the mapping from the log, maps the rest of the events: B's live set is the
    router hashes of the cache's real contents, pre-handover blocks included."""
    rng = random.Random(seed)
    workers = ["e", "e#dp1"]
    caches = {w: PrefixCache(num_gpu_blocks=40, block_size=BS, hash_seed=seed) for w in workers}
    prefixes = [[rng.randrange(500) for _ in range(BS * k)] for k in (1, 2, 3, 4)]
    before = {w: cache_batches(caches[w], rng, prefixes, 120, clear_p=0.01) for w in workers}
    a, b, c = _mk(3, seed, CompactionPolicy(factor=2.0, min_ops=16))
    t = a.take_ownership("e", 0.0)
    b.apply_remote(t.message, 0.0)
    c.apply_remote(t.message, 0.0)
    index: dict[str, set[int]] = {}
    mappers = {w: BlockMapper(MODEL, w) for w in workers}
    for seq in range(120):
        for w in workers:
            msg = a.local_deltas("e", [mappers[w].map_batch(before[w][seq], seq)])
            for ch in b.apply_remote(decode_payload(encode_payload(msg)), 0.0).index_changes:
                apply_model(index, ch)
            c.apply_remote(decode_payload(encode_payload(msg)), 0.0)
    assert a.epoch("e").gen >= 1, "no compaction before the handover"

    t2 = b.take_ownership("e", 1.0)
    assert t2.resume == {w: 120 for w in workers}
    assert set(t2.mappings) == set(workers)
    restored = {w: BlockMapper.from_pairs(MODEL, w, t2.mappings[w]) for w in workers}
    for w in workers:
        assert (
            restored[w].block_map == mappers[w].block_map
            and restored[w].block_map.refs == mappers[w].block_map.counts()
        )
    c.apply_remote(decode_payload(encode_payload(t2.message)), 1.0)  # c follows the new epoch

    after = {w: cache_batches(caches[w], rng, prefixes, 150) for w in workers}
    for w in workers:
        removed, chained = _pre_handover_activity(after[w], set(mappers[w].block_map.to_router))
        assert removed > 0 and chained > 0, "scenario does not exercise the handover"
    naive = {w: BlockMapper(MODEL, w) for w in workers}  # what B would do without the log's mapping
    naive_index: dict[str, set[int]] = {w: set(s) for w, s in index.items()}
    for seq in range(120, 270):
        for w in workers:
            events = after[w][seq - 120]
            d = restored[w].map_batch(events, seq)
            msg = b.local_deltas("e", [d])
            apply_model(index, d)
            c.apply_remote(decode_payload(encode_payload(msg)), 2.0)
            apply_model(naive_index, naive[w].map_batch(events, seq))

    truth = RouterTruth()
    for w in workers:
        real = truth(caches[w])
        assert real, "empty cache: nothing to compare"
        assert index[w] == real
        assert restored[w].live_router_hashes() == real
        assert restored[w].stats.unknown_removed == 0 and restored[w].stats.unknown_parent == 0
        assert b.logs["e"].materialise()[w] == real == c.logs["e"].materialise()[w]
        assert BlockMap.from_pairs(c.logs["e"].materialise_live().pairs(w)) == restored[w].block_map
        # the control: a mapper started empty leaves stale blocks and misses new ones
        assert naive_index[w] != real
        assert naive[w].stats.unknown_removed > 0 and naive[w].stats.unknown_parent > 0


def test_compaction_snapshots_carry_the_exact_mapping() -> None:
    """Mapper deltas with bytes engine hashes and router hashes shared by
    several engine blocks (refcounts > 1): every compaction's snapshot rebuilds
    the owner's mapping, and a replica's replay equals the mapper's."""
    rng = random.Random(11)
    a, b = _mk(2, 3, CompactionPolicy(factor=2.0, min_ops=8))
    b.apply_remote(a.take_ownership("e", 0.0).message, 0.0)
    m = BlockMapper(MODEL, "e")
    pool: list = [rng.getrandbits(64) for _ in range(30)] + [rng.randbytes(32) for _ in range(10)]
    gens = set()
    shared = 0
    for seq in range(400):
        live = list(m.block_map.to_router)
        if live and rng.random() < 0.4:
            events: list = [BlockRemoved(rng.sample(live, min(3, len(live))))]
        else:
            parent = rng.choice(live) if live and rng.random() < 0.5 else None
            tokens = [rng.randint(0, 1) for _ in range(BS * rng.randint(1, 3))]
            events = [BlockStored(rng.sample(pool, len(tokens) // BS), parent, tokens, BS)]
        msg = a.local_deltas("e", [m.map_batch(events, seq)])
        b.apply_remote(decode_payload(encode_payload(msg)), 0.0)
        owner = a.owners["e"]
        lm = BlockMap.from_pairs(owner.live.pairs("e"))
        assert lm == m.block_map and lm.counts() == m.block_map.refs
        shared += any(n > 1 for n in m.block_map.refs.values())
        if len(msg.logs) == 2:  # compacted: the new epoch's entry 0 is the snapshot
            gens.add(msg.logs[1].epoch.gen)
            snap = decode_entry(a.logs["e"].current.entries()[0])
            assert len(snap) == 1 and snap[0].seq == seq
            pairs = [p for op in snap[0].ops[1:] for p in zip(op.ehashes or op.hashes, op.hashes)]
            assert dict(pairs) == m.block_map.to_router
            assert BlockMap.from_pairs(b.logs["e"].materialise_live().pairs("e")) == m.block_map
    assert len(gens) >= 5 and shared > 20
    assert BlockMap.from_pairs(b.logs["e"].materialise_live().pairs("e")).counts() == m.block_map.refs
    assert b.take_ownership("e", 1.0).mappings == {"e": m.export()}


def test_a_registry_get_is_a_readable_spec_and_a_copy() -> None:
    import pycrdt

    a = _mk(1)[0]
    a.register_engine("e", {"endpoint": "http://e", "block_size": 16})
    a.registry._map["text"] = pycrdt.Text('{"endpoint": "http://evil"}')
    a.registry.apply(b"\x00\x00")  # the registry reads the map again
    got = a.registry.get("e")
    assert got == {"endpoint": "http://e", "block_size": 16} and a.registry.get("text") is None
    got["endpoint"] = "changed"
    assert a.registry.get("e") == {"endpoint": "http://e", "block_size": 16}
