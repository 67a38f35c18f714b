"""The owner's log entry made natively (``NativeBlockMapper.map_frame_packed``,
native/src/entry_enc.rs) against the reference path: random frames of every
shape, good and bad (test_native_parity's strategies), go to two native
mappers, one through ``map_frame`` (the ``KvDelta`` path) and one through
``map_frame_packed``; the entry must hold that delta and its bytes must be
``encode_entry([delta])`` byte for byte (msgspec's smallest int, str, bin and
array forms), readable by a replica's ``decode_entry``. ``join_entries``
makes one entry of many, equal to encoding all their deltas at once and
applied to an index as the parts are."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from blocks.delta import KvDelta
from blocks.tiers import TIERS
from blocks.workers import engine_of
from engine_adapters import native
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import BlockRemoved, BlockStored, EventDecodeError, KVEventBatch, encode_batch
from mesh.engine_log.entry import encode_entry
from mesh.engine_log.packed import PackedEntry
from router.index import PrefixIndex
from router.native_index import NativeIndex
from tests.unit.test_native_parity import MODEL, payload

pytestmark = pytest.mark.skipif(
    not native.NATIVE_BUILT or NativeIndex is None,
    reason=f"NATIVE PATH NOT TESTED: {native.NOT_BUILT_REASON}",
)

SEQS = [-1, 0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
WORKERS = ["w", "e#dp1", "é" * 12, "x" * 31, "x" * 32, "x" * 255, "x" * 256]


def _kn() -> Any:
    return native._module()


def _state(m: native.NativeBlockMapper) -> tuple[Any, ...]:
    return m.stats, sorted(m.export(), key=repr), m.live_by_tier(), len(m)


def _check_entry(entry: PackedEntry, delta: KvDelta) -> None:
    """``entry`` is the log entry of exactly ``delta``."""
    assert entry.raw == encode_entry([delta])
    assert entry.to_deltas() == [delta]
    assert entry.heads == ((delta.worker, delta.seq),)
    assert entry.blocks == sum(len(op.hashes) for op in delta.ops)
    assert len(entry) == 1
    engine = engine_of(delta.worker)
    if engine:  # a replica's decoder refuses an empty engine id, whatever the entry
        back = _kn().decode_entry(engine, entry.raw)
        assert back.to_deltas() == [delta]
        assert back.heads == entry.heads and back.blocks == entry.blocks


def _both(
    ref: native.NativeBlockMapper, packed: native.NativeBlockMapper, data: bytes, seq: int
) -> tuple[native.Frame, PackedEntry, KvDelta] | None:
    """One frame through each mapper (None: undecodable by both, neither changed)."""
    before = _state(packed)
    with capture_logs() as ref_logs:
        try:
            frame, delta = ref.map_frame(data, seq)
        except EventDecodeError:
            with pytest.raises(EventDecodeError):
                packed.map_frame_packed(data, seq)
            assert _state(packed) == _state(ref) == before
            return None
    with capture_logs() as packed_logs:
        got_frame, entry = packed.map_frame_packed(data, seq)
    assert got_frame == frame
    assert packed_logs == ref_logs  # the same notes, logged alike
    assert _state(packed) == _state(ref)
    return frame, entry, delta


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(payload(), min_size=1, max_size=8),
    registered=st.sampled_from([None, 2]),
    worker=st.sampled_from(WORKERS),
    seqs=st.lists(st.sampled_from(SEQS), min_size=8, max_size=8),
)
def test_map_frame_packed_is_map_frame_as_one_log_entry(
    frames: list[bytes], registered: int | None, worker: str, seqs: list[int]
) -> None:
    ref = native.NativeBlockMapper(MODEL, worker, registered)
    packed = native.NativeBlockMapper(MODEL, worker, registered)
    for data, seq in zip(frames, seqs, strict=False):
        out = _both(ref, packed, data, seq)
        if out is not None:
            _check_entry(out[1], out[2])
    assert packed.block_map == ref.block_map


def _frame(*events: object) -> bytes:
    return encode_batch(KVEventBatch(1.0, list(events), 0))  # type: ignore[arg-type]


# Every width msgspec picks for an engine hash: ints at each boundary, bytes
# of every bin header.
EDGE_INTS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
             -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]  # fmt: skip
EDGE_BYTES = [b"", b"\x00", b"b" * 255, b"b" * 256, b"b" * 65535, b"b" * 65536]


@pytest.mark.parametrize("worker", ["", "e", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65535,
                                    "x" * 65536, "é" * 20])  # fmt: skip
def test_every_int_str_bin_and_array_width_is_msgspecs(worker: str) -> None:
    ehashes: list[Any] = [*EDGE_INTS, *EDGE_BYTES]
    tiers = [BlockStored([10_000 + i], None, [i], 1, medium="GPU" if i % 2 else "CPU") for i in range(20)]
    frames = [
        # One store of every width (an array16 of hashes), chained.
        _frame(BlockStored(ehashes, None, list(range(len(ehashes))), 1, medium="GPU")),
        # Tiers alternating: an op each, more than a fixarray of ops holds.
        _frame(*tiers),
        # Removes of known and unknown blocks; a reuse of an engine hash with other content.
        _frame(
            BlockRemoved(ehashes[::2] + [123456789], medium="GPU"),
            BlockStored([-1], None, [77], 1, medium="GPU"),
        ),
        # More blocks than array16 holds, in one op.
        _frame(BlockStored(list(range(2**20, 2**20 + 65536)), None, [1] * 65536, 1, medium="GPU")),
        _frame(),
    ]
    ref = native.NativeBlockMapper(MODEL, worker, 1)
    packed = native.NativeBlockMapper(MODEL, worker, 1)
    sizes = []
    for seq, data in zip([0, 255, 65536, 2**64 - 1, -1], frames, strict=True):
        out = _both(ref, packed, data, seq)
        assert out is not None
        _check_entry(out[1], out[2])
        sizes.append((len(out[2].ops), max((len(op.hashes) for op in out[2].ops), default=0)))
    # The shapes meant: 27 blocks in one op; 20 ops; one REMOVE of the 14 blocks
    # removed and the reused hash's old block, then its STORE; 65,536 blocks; nothing.
    assert sizes == [(1, 27), (20, 1), (2, 15), (1, 65536), (0, 0)]


def test_seq_and_worker_no_entry_holds_are_refused_before_anything_changes() -> None:
    data = _frame(BlockStored([1, 2], None, [1, 2], 1, medium="GPU"))
    m = native.NativeBlockMapper(MODEL, "w", 1)
    for seq, err in [(-2, OverflowError), (2**64, OverflowError), (-(2**70), OverflowError),
                     (True, TypeError), (1.0, TypeError), ("1", TypeError)]:  # fmt: skip
        with pytest.raises(err):
            m.map_frame_packed(data, seq)  # type: ignore[arg-type]
    assert len(m) == 0 and m.stats.stored == 0
    m.worker = "\ud800"  # a lone surrogate: not UTF-8, no entry holds it
    with pytest.raises(TypeError):
        m.map_frame_packed(data, 0)
    assert len(m) == 0
    m.worker = "w"
    _, entry = m.map_frame_packed(data, 0)
    assert entry.blocks == 2 and len(m) == 2


def test_the_dispatch_needs_a_native_mapper() -> None:
    data = _frame(BlockStored([1], None, [1], 1, medium="GPU"))
    with pytest.raises(TypeError, match="NativeBlockMapper"):
        native.map_frame_packed(BlockMapper(MODEL, "w", 1), data, 0)
    frame, entry = native.map_frame_packed(native.NativeBlockMapper(MODEL, "w", 1), data, 0)
    assert frame.events == 1 and entry.heads == (("w", 0),)
    with pytest.raises(EventDecodeError):
        native.map_frame_packed(native.NativeBlockMapper(MODEL, "w", 1), b"\xc1", 0)


# --- joined entries ------------------------------------------------------------------------

ENGINE_WORKERS = ["e", "e#dp1", "e#dp12"]


def _index_view(idx: Any, workers: list[str], prefixes: list[list[int]]) -> tuple[Any, ...]:
    return (
        idx.stats(),
        len(idx),
        [(w, idx.tier_blocks(w), [sorted(idx.worker_hashes(w, t)) for t in TIERS]) for w in workers],
        [(idx.match(p), idx.match_tiers(p)) for p in prefixes],
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.tuples(st.sampled_from(ENGINE_WORKERS), payload()), min_size=1, max_size=10),
    decoded=st.lists(st.booleans(), min_size=10, max_size=10),
    cut=st.integers(0, 10),
)
def test_joined_entries_are_one_entry_of_all_their_deltas(
    frames: list[tuple[str, bytes]], decoded: list[bool], cut: int
) -> None:
    mappers = {w: native.NativeBlockMapper(MODEL, w, 2) for w in ENGINE_WORKERS}
    entries: list[PackedEntry] = []
    for seq, ((w, data), dec) in enumerate(zip(frames, decoded, strict=False)):
        try:
            _, entry = mappers[w].map_frame_packed(data, seq)
        except EventDecodeError:
            continue
        # A replica's entry (decoded from the log) joins as the owner's does.
        entries.append(_kn().decode_entry("e", entry.raw) if dec else entry)
    if not entries:
        with pytest.raises(ValueError):
            _kn().join_entries(entries)
        return
    deltas = [d for e in entries for d in e.to_deltas()]
    joined = _kn().join_entries(entries)
    assert joined.raw == encode_entry(deltas)
    assert joined.to_deltas() == deltas
    assert joined.heads == tuple(h for e in entries for h in e.heads)
    assert joined.blocks == sum(e.blocks for e in entries)
    assert len(joined) == len(deltas)
    assert _kn().decode_entry("e", joined.raw).to_deltas() == deltas
    # Joined in two steps, the ranges shifted twice: the same entry.
    cut = min(cut, len(entries) - 1)
    left = _kn().join_entries(entries[: cut + 1])
    twice = _kn().join_entries([left, *entries[cut + 1 :]]) if cut + 1 < len(entries) else left
    assert twice.raw == joined.raw and twice.to_deltas() == deltas and twice.heads == joined.heads

    assert NativeIndex is not None
    whole, parts, ref = NativeIndex(), NativeIndex(), PrefixIndex()
    whole.apply_packed(joined)
    for e in entries:
        parts.apply_packed(e)
    for d in deltas:
        ref.apply(d)
    hashes = [h for d in deltas for op in d.ops for h in op.hashes]
    prefixes = [hashes[:n] for n in range(0, len(hashes) + 1, 3)] + [hashes[::-1]]
    assert _index_view(whole, ENGINE_WORKERS, prefixes) == _index_view(parts, ENGINE_WORKERS, prefixes)
    assert _index_view(whole, ENGINE_WORKERS, prefixes) == _index_view(ref, ENGINE_WORKERS, prefixes)


def test_join_entries_edges() -> None:
    kn = _kn()
    m = native.NativeBlockMapper(MODEL, "e", 1)
    _, one = m.map_frame_packed(_frame(BlockStored([1], None, [1], 1, medium="GPU")), 0)
    assert kn.join_entries([one]) is one
    with pytest.raises(ValueError):
        kn.join_entries([])
    with pytest.raises(TypeError):
        kn.join_entries([one, b"\x91"])
    # More deltas than a fixarray holds: an array16 header, as msgspec writes it.
    many = kn.join_entries([one] * 17)
    assert many.raw[:3] == b"\xdc\x00\x11"
    assert many.raw == encode_entry(one.to_deltas() * 17)


def test_a_mapper_made_on_one_thread_is_dropped_on_another_without_error() -> None:
    """A node built on a thread of its own (an embedding, the fuzz test) may
    be collected on another: the mapper is freed there, not refused."""
    import gc
    import sys
    import threading

    seen: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(native.NativeBlockMapper("m", "w0")))
        t.start()
        t.join()
        box.clear()
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert not seen, [str(u.exc_value) for u in seen]
