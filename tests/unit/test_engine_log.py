"""EngineLogReplica / EngineLogOwner: ordering, duplicates, epochs, seqs, snapshots."""

from __future__ import annotations

import random

import msgspec
import pycrdt
import pytest

from blocks.block_map import BlockMap
from blocks.delta import OP_CLEAR, OP_REMOVE, OP_STORE, KvDelta, KvOp
from blocks.tiers import TIER_GPU, TIER_HOST
from mesh.engine_log.entry import LogError, NotOwnerError, decode_entry, encode_entry
from mesh.engine_log.epoch import Epoch, EpochDoc
from mesh.engine_log.live import PyLiveState
from mesh.engine_log.owner import CompactionPolicy, EngineLogOwner
from mesh.engine_log.replica import EngineLogReplica
from mesh.engine_log.snapshot import apply_delta, snapshot_deltas
from router.index import PrefixIndex


def owner_and_replica(
    policy: CompactionPolicy | None = None,
) -> tuple[EngineLogOwner, EngineLogReplica, bytes]:
    rep = EngineLogReplica("e")
    owner = EngineLogOwner(rep, "n0", random.Random(1), policy or CompactionPolicy())
    first = owner.start_epoch(Epoch(1, "n0", 0, owner.new_doc_id()), PyLiveState(), {})
    return owner, EngineLogReplica("e"), first


def st(worker: str, seq: int, *hashes: int) -> KvDelta:
    return KvDelta(worker, seq, [KvOp(OP_STORE, list(hashes))])


def test_out_of_order_and_duplicate_updates_yield_each_delta_once_in_order() -> None:
    owner, rep, first = owner_and_replica()
    ups = [first] + [owner.append([st("e", s, s)]) for s in range(20)]
    order = list(range(1, 21))
    random.Random(3).shuffle(order)
    seen: list[int] = []
    for i in order + order[:5]:  # shuffled, then duplicates
        seen += [d.seq for d in rep.apply(owner.epoch, ups[i])]
    assert seen == []  # nothing visible before the snapshot entry
    seen += [d.seq for d in rep.apply(owner.epoch, ups[0])]
    assert seen == list(range(20))
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
    assert len(owner.live) == 0


def test_entry_is_batch_granular() -> None:
    owner, _, _ = owner_and_replica()
    rng = random.Random(2)
    batch = [st("e", s, *(rng.getrandbits(64) for _ in range(16))) for s in range(8)]
    upd = owner.append(batch)
    assert len(owner.replica.current) == 2  # snapshot + one entry for the 8 deltas
    assert decode_entry(owner.replica.current.entries()[1]) == batch
    payload = len(encode_entry(batch))
    assert len(upd) <= payload + 40  # CRDT overhead: a few dozen bytes per entry


def test_snapshot_deltas_clear_then_store_with_seq() -> None:
    live = {
        "e": BlockMap.from_pairs([(3, 3), (1, 1), (b"x", 7), (-5, 7), (2**64 - 1, 8)]),
        "e#dp1": BlockMap(),
    }
    snap = snapshot_deltas(live, {"e": 9, "e#dp2": 4})
    assert snap == [
        KvDelta(
            "e",
            9,
            [
                KvOp(OP_CLEAR, []),
                KvOp(OP_STORE, [3, 1]),  # identity pairs: no engine hashes needed
                KvOp(OP_STORE, [7, 7, 8], [b"x", -5, 2**64 - 1]),
            ],
        ),
        KvDelta("e#dp1", -1, [KvOp(OP_CLEAR, [])]),
        KvDelta("e#dp2", 4, [KvOp(OP_CLEAR, [])]),
    ]
    rebuilt: dict[str, BlockMap] = {}
    for d in decode_entry(encode_entry(snap)):
        apply_delta(rebuilt, d)
    assert rebuilt["e"] == live["e"] and rebuilt["e"].counts() == {3: 1, 1: 1, 7: 2, 8: 1}


def test_snapshot_size_estimate_is_a_tight_upper_bound() -> None:
    # The compaction trigger compares log bytes with this estimate: too low and
    # it would compact on every append, too high and the log grows past K x.
    rng = random.Random(4)
    big = 1 << 63
    pairs = [(rng.getrandbits(63) | big, rng.getrandbits(63) | big) for _ in range(300)]
    pairs += [(rng.randbytes(32), rng.getrandbits(63) | big) for _ in range(100)]
    live = {
        "e": BlockMap.from_pairs(pairs),
        "e#dp1": BlockMap.from_pairs((h, h) for _, h in pairs[:50]),
    }
    owner, _, _ = owner_and_replica()
    owner.start_epoch(Epoch(1, "n0", 1, 5), PyLiveState(live), {"e": 9})
    real = len(encode_entry(snapshot_deltas(live, {"e": 9})))
    assert owner.log_bytes == real
    assert real <= owner.snapshot_bytes() <= real + 100
    # ... and stays so when appends change the mapping
    owner.append([KvDelta("e", 10, [KvOp(OP_REMOVE, [], [p[0] for p in pairs[::2]])])])
    owner.append([KvDelta("e", 11, [KvOp(OP_STORE, [big + 1, big + 2], [b"y" * 32, big + 3])])])
    real = len(owner.live.snapshot_entry({"e": 11}))
    assert real <= owner.snapshot_bytes() <= real + 100
    assert owner.live_blocks == sum(len(s) for s in owner.live.live_sets().values())


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
                if op.kind == OP_STORE:
                    w.update(op.hashes)
                elif op.kind == OP_REMOVE:
                    w.difference_update(op.hashes)
                else:
                    w.clear()
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
        "e",
        Epoch(2, "n1", 0, 99),
        encode_entry(snapshot_deltas({"e": BlockMap.from_pairs([(1, 1)])}, {"e": 0})),
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


class _OldOp(msgspec.Struct, array_like=True):  # KvOp before engine hashes
    kind: int
    hashes: list[int]


class _OldDelta(msgspec.Struct, array_like=True):
    worker: str
    seq: int
    ops: list[_OldOp]


def test_entries_written_before_engine_hashes_still_decode_and_replay() -> None:
    enc = msgspec.msgpack.encode
    snap = enc([_OldDelta("e", 3, [_OldOp(OP_CLEAR, []), _OldOp(OP_STORE, [1, 2])])])
    entry = enc([_OldDelta("e", 4, [_OldOp(OP_REMOVE, [1]), _OldOp(OP_STORE, [5])])])
    assert decode_entry(entry) == [KvDelta("e", 4, [KvOp(OP_REMOVE, [1]), KvOp(OP_STORE, [5])])]
    assert (
        msgspec.msgpack.decode(enc(_OldDelta("e", 0, [_OldOp(OP_STORE, [7])])), type=KvDelta).ops[0].ehashes
        == []
    )
    ep = Epoch(1, "n0", 0, 11)
    ed = EpochDoc.create("e", ep, snap)
    ed.log.append(entry)
    rep = EngineLogReplica("e")
    assert [d.seq for d in rep.apply(ep, ed.update_since())] == [3, 4]
    assert rep.materialise() == {"e": {2, 5}}
    # without engine hashes a block is named by its router hash
    assert rep.materialise_live().pairs("e") == [(2, 2), (5, 5)]
    assert rep.resume_seqs() == {"e": 5}


def test_engine_hashes_are_validated_before_writing() -> None:
    owner, _, _ = owner_and_replica()
    for bad in (
        [KvDelta("e", 0, [KvOp(OP_STORE, [1, 2], [10])])],  # not parallel
        [KvDelta("e", 0, [KvOp(OP_CLEAR, [], [10])])],
        [KvDelta("e", 0, [KvOp(OP_STORE, [1], [1 << 64])])],  # not msgpack-encodable
        [KvDelta("e", 0, [KvOp(OP_STORE, [1], ["str"])])],  # type: ignore[list-item]  # bad input on purpose
    ):
        with pytest.raises(LogError):
            owner.append(bad)
    assert len(owner.live) == 0 and len(owner.replica.current) == 1
    owner.append([KvDelta("e", 0, [KvOp(OP_STORE, [1, 1], [b"a", -2]), KvOp(OP_REMOVE, [], [b"a"])])])
    assert owner.mappings() == {"e": [(-2, 1)]}


def test_values_a_replica_would_not_decode_as_ints_are_refused() -> None:
    # bool and float encode fine but a replica's typed decode rejects them;
    # deltas of exact types skip that decode, these must not.
    owner, _, _ = owner_and_replica()
    for bad in (
        [KvDelta("e", 0, [KvOp(OP_STORE, [True], [10])])],
        [KvDelta("e", 0, [KvOp(OP_STORE, [1.0], [10])])],  # type: ignore[list-item]  # bad input on purpose
        [KvDelta("e", 0, [KvOp(OP_STORE, [1], [2.5])])],  # type: ignore[list-item]  # bad input on purpose
        [KvDelta("e", 0, [KvOp(OP_STORE, [2**64 - 1, -1], [1, 2])])],
        [KvDelta("e", True, [KvOp(OP_STORE, [1], [2])])],
    ):
        with pytest.raises(LogError):
            owner.append(bad)
    assert len(owner.live) == 0 and len(owner.replica.current) == 1
    # A tuple is not a list but decodes to one: accepted, as it always was.
    owner.append([KvDelta("e", 0, [KvOp(OP_STORE, (5, 2**64 - 1), (7, b"x"))])])  # type: ignore[arg-type]  # tuples on purpose
    assert sorted(owner.mappings()["e"], key=str) == sorted([(7, 5), (b"x", 2**64 - 1)], key=str)


# --- cache tiers -----------------------------------------------------------------


class _PreTierOp(msgspec.Struct, array_like=True):  # KvOp before tiers
    kind: int
    hashes: list[int]
    ehashes: list[int | bytes] = []


class _PreTierDelta(msgspec.Struct, array_like=True):
    worker: str
    seq: int
    ops: list[_PreTierOp]


def test_tiers_survive_the_log_snapshots_and_compaction() -> None:
    owner, rep, first = owner_and_replica(CompactionPolicy(factor=2.0, min_ops=4))
    rep.apply(owner.epoch, first)
    index = PrefixIndex()
    for s in range(40):
        d = KvDelta(
            "e",
            s,
            [
                KvOp(OP_STORE, [s + 1000], [s + 1], TIER_GPU),
                KvOp(OP_STORE, [s + 1000], [s + 1], TIER_HOST),  # its host copy
                KvOp(OP_REMOVE, [s + 999], [s], TIER_GPU),  # the GPU evicts the previous block
                KvOp(OP_REMOVE, [s + 995], [s - 4], TIER_HOST),  # the host tier keeps five
            ],
        )
        for ch in rep.apply(owner.epoch, owner.append([d])):
            index.apply(ch)
        c = owner.maybe_compact()
        if c is not None:
            for ch in rep.apply(*c):
                index.apply(ch)
    assert owner.epoch.gen >= 2  # compacted: the snapshot carried the host tier
    want_host = {s + 1000 for s in range(35, 40)}
    assert rep.materialise() == {"e": {1039}} == owner.replica.materialise()
    assert rep.materialise_tiers() == {"e": {TIER_GPU: {1039}, TIER_HOST: want_host}}
    assert index.worker_hashes("e", TIER_HOST) == want_host and index.worker_hashes("e") == {1039}
    # A new owner's mapping has the host tier's blocks as triples.
    pairs = owner.mappings()["e"]
    assert sorted(p for p in pairs if len(p) == 3) == [(s + 1, s + 1000, TIER_HOST) for s in range(35, 40)]
    # The size estimate still bounds the real snapshot.
    real = len(owner.live.snapshot_entry({"e": 39}))
    assert real <= owner.snapshot_bytes() <= real + 150


def test_entries_written_before_tiers_are_gpu_ops_and_a_pre_tier_reader_reads_gpu_ops() -> None:
    enc = msgspec.msgpack.encode
    old = enc([_PreTierDelta("e", 4, [_PreTierOp(OP_STORE, [5], [b"x"])])])
    assert decode_entry(old) == [KvDelta("e", 4, [KvOp(OP_STORE, [5], [b"x"], TIER_GPU)])]
    # A node that predates tiers decodes a tiered entry (as GPU ops) instead of failing.
    new = encode_entry([KvDelta("e", 5, [KvOp(OP_STORE, [6], [7], TIER_HOST)])])
    seen = msgspec.msgpack.decode(new, type=list[_PreTierDelta])
    assert seen == [_PreTierDelta("e", 5, [_PreTierOp(OP_STORE, [6], [7])])]


def test_an_unknown_tier_is_refused_before_writing() -> None:
    owner, _, _ = owner_and_replica()
    with pytest.raises(LogError, match="tier"):
        owner.append([KvDelta("e", 0, [KvOp(OP_STORE, [1], [], 4)])])
    assert len(owner.live) == 0
