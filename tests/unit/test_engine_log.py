"""EngineLogReplica / EngineLogOwner: ordering, duplicates, epochs, seqs, snapshots."""

from __future__ import annotations

import random

import pycrdt
import pytest

from engine_adapters.kv_delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from mesh.engine_log import (
    CompactionPolicy,
    EngineLogOwner,
    EngineLogReplica,
    Epoch,
    EpochDoc,
    LogError,
    NotOwnerError,
    decode_entry,
    encode_entry,
    snapshot_deltas,
)


def owner_and_replica(policy: CompactionPolicy | None = None) -> tuple[EngineLogOwner, EngineLogReplica, bytes]:
    rep = EngineLogReplica("e")
    owner = EngineLogOwner(rep, "n0", random.Random(1), policy or CompactionPolicy())
    first = owner.start_epoch(Epoch(1, "n0", 0, owner.new_doc_id()), {}, {})
    return owner, EngineLogReplica("e"), first


def st(worker: str, seq: int, *hashes: int) -> KvDelta:
    return KvDelta(worker, seq, [KvOp(OP_STORE, list(hashes))])


def test_out_of_order_and_duplicate_updates_yield_each_delta_once_in_order() -> None:
    owner, rep, first = owner_and_replica()
    ups = [first] + [owner.append([st("e", s, s)]) for s in range(20)]
    order = list(range(1, 21))
    random.Random(3).shuffle(order)
    seen: list[int] = []
    sink_seen: list[int] = []
    rep.sink = lambda d: sink_seen.append(d.seq)
    for i in order + order[:5]:  # shuffled, then duplicates
        seen += [d.seq for d in rep.apply(owner.epoch, ups[i])]
    assert seen == []  # nothing visible before the snapshot entry
    seen += [d.seq for d in rep.apply(owner.epoch, ups[0])]
    assert seen == list(range(20)) == sink_seen
    assert rep.apply(owner.epoch, ups[7]) == []
    assert rep.materialise() == {"e": set(range(20))}
    assert rep.resume_seqs() == {"e": 20}


def test_last_seq_follows_log_order_across_engine_restart_and_synthetic_reset() -> None:
    owner, rep, first = owner_and_replica()
    rep.apply(owner.epoch, first)
    for d in [st("e", 41, 1), st("e", 42, 2), KvDelta("e", -1, [KvOp(OP_CLEAR, [])]), st("e", 0, 3)]:
        rep.apply(owner.epoch, owner.append([d]))
    # engine restarted: its sequence starts again at 0; the synthetic reset (-1) is skipped
    assert rep.resume_seqs() == {"e": 1}
    assert rep.materialise() == {"e": {3}}
    assert owner.replica.resume_seqs() == {"e": 1}


def test_append_validates_before_writing() -> None:
    owner, _, _ = owner_and_replica()
    n = len(owner.replica.current)
    for bad in (
        [st("e2", 0, 1)],
        [st("e", -2, 1)],
        [st("e", 0, 1 << 64)],
        [st("e", 0, 1), KvDelta("e", 1, [KvOp(9, [])])],
        [],
    ):
        with pytest.raises(LogError):
            owner.append(bad)
    assert len(owner.replica.current) == n
    assert owner.live == {}


def test_entry_is_batch_granular() -> None:
    owner, rep, first = owner_and_replica()
    rng = random.Random(2)
    batch = [st("e", s, *(rng.getrandbits(64) for _ in range(16))) for s in range(8)]
    upd = owner.append(batch)
    assert len(owner.replica.current) == 2  # snapshot + one entry for the 8 deltas
    assert decode_entry(owner.replica.current.entries()[1]) == batch
    payload = len(encode_entry(batch))
    assert len(upd) <= payload + 40  # CRDT overhead: a few dozen bytes per entry


def test_snapshot_deltas_clear_then_store_with_seq() -> None:
    snap = snapshot_deltas({"e": {3, 1}, "e#dp1": set()}, {"e": 9, "e#dp2": 4})
    assert snap == [
        KvDelta("e", 9, [KvOp(OP_CLEAR, []), KvOp(OP_STORE, [1, 3])]),
        KvDelta("e#dp1", -1, [KvOp(OP_CLEAR, [])]),
        KvDelta("e#dp2", 4, [KvOp(OP_CLEAR, [])]),
    ]


def test_compaction_bumps_gen_and_replica_reset_reproduces_contents() -> None:
    owner, rep, first = owner_and_replica(CompactionPolicy(factor=2.0, min_ops=4))
    rep.apply(owner.epoch, first)
    index: dict[str, set[int]] = {}
    truth: dict[str, set[int]] = {}
    compactions = 0
    for s in range(60):
        d = KvDelta("e", s, [KvOp(OP_STORE, [s + 100]), KvOp(OP_REMOVE, [s + 99])])
        for ch in rep.apply(owner.epoch, owner.append([d])):
            for op in ch.ops:
                w = index.setdefault(ch.worker, set())
                {OP_STORE: w.update, OP_REMOVE: w.difference_update}.get(op.kind, lambda _: w.clear())(op.hashes)
        truth = {"e": {s + 100}}
        c = owner.maybe_compact()
        if c is not None:
            compactions += 1
            epoch, full = c
            assert epoch.gen == compactions and epoch.term == 1
            rep.apply(epoch, full)
            assert len(owner.replica.current) == 1
    assert compactions >= 5
    assert index == truth == rep.materialise() == owner.replica.materialise()
    assert rep.resume_seqs() == {"e": 60}


def test_epoch_order_term_beats_compactions_and_doc_id_breaks_ties() -> None:
    assert Epoch(2, "a", 0, 5) > Epoch(1, "z", 99, 9)
    assert Epoch(1, "a", 3, 1) > Epoch(1, "a", 2, 9)
    assert Epoch(1, "a", 0, 2) > Epoch(1, "a", 0, 1)


def test_epoch_doc_with_wrong_meta_is_discarded() -> None:
    ed = EpochDoc.create("other", Epoch(1, "n0", 0, 77), encode_entry([]))
    rep = EngineLogReplica("e")
    assert rep.apply(Epoch(1, "n0", 0, 77), ed.update_since()) == []
    assert rep.current is None and rep.pending is None


def test_malformed_update_raises_log_error_and_keeps_state() -> None:
    owner, rep, first = owner_and_replica()
    rep.apply(owner.epoch, first)
    rep.apply(owner.epoch, owner.append([st("e", 0, 1)]))
    with pytest.raises(LogError):
        rep.apply(owner.epoch, b"\x09\x09\x09")
    assert rep.materialise() == {"e": {1}}


def test_foreign_entry_is_skipped_not_fatal() -> None:
    # A second writer (a bug) putting a bad entry in the doc: skipped, rest applies.
    ep = Epoch(1, "n0", 0, 11)
    ed = EpochDoc.create("e", ep, encode_entry([]))
    ed.log.append(b"not msgpack of deltas \xc1")
    ed.log.append(encode_entry([st("e", 0, 5)]))
    rep = EngineLogReplica("e")
    out = rep.apply(ep, ed.update_since())
    assert [d.seq for d in out] == [0]
    assert rep.materialise() == {"e": {5}}


def test_fenced_owner_cannot_append() -> None:
    owner, _, _ = owner_and_replica()
    other = EpochDoc.create(
        "e", Epoch(2, "n1", 0, 99), encode_entry(snapshot_deltas({"e": {1}}, {"e": 0}))
    )
    changes = owner.replica.apply(other.epoch, other.update_since())
    assert [d.worker for d in changes] == ["e"]
    assert not owner.owns()
    with pytest.raises(NotOwnerError):
        owner.append([st("e", 1, 2)])


def test_merged_updates_apply_in_one_go() -> None:
    owner, rep, first = owner_and_replica()
    ups = [first] + [owner.append([st("e", s, s)]) for s in range(100)]
    out = rep.apply(owner.epoch, pycrdt.merge_updates(*ups))
    assert [d.seq for d in out] == list(range(100))
