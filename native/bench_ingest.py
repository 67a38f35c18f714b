"""Owner-side decode + hash + map, native vs pure Python, on the same frames.

    .venv/bin/python native/bench_ingest.py [--blocks 200000] [--per-event 16]

vLLM-format frames (tagged-map events in the array envelope, 16 tokens a
block), one engine per worker: each frame stores one event of chained
blocks under the previous frame's last block and every fourth also
removes the oldest blocks. Python: ``kv_events.decode_batch`` then
``BlockMapper.map_batch``; native: ``NativeBlockMapper.map_frame``; native
+ entry: ``map_frame`` then ``checked_entry`` (the log entry the owner
appends, encoded and validated in Python); packed: ``map_frame_packed``
(the delta as that log entry, made in Rust). All start from empty
mappers; the best of three runs is printed as stored blocks per second of
this process's CPU time (the machines it runs on are shared), with the
deltas checked equal and each packed entry's bytes checked equal to
``encode_entry`` of its delta.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocks.delta import EngineHash, KvDelta
from engine_adapters import native
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import BlockRemoved, BlockStored, KVEventBatch, decode_batch, encode_batch
from mesh.engine_log.entry import checked_entry, encode_entry

BS = 16
MODEL = "bench-model"


def frames(n_blocks: int, per_event: int, engines: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    last: list[EngineHash | None] = [None] * engines
    live: list[list[EngineHash]] = [[] for _ in range(engines)]
    b = 0
    i = 0
    while b < n_blocks:
        e = i % engines
        hashes: list[EngineHash] = [(e << 40) + b + k for k in range(per_event)]
        tokens = [(b + k) * BS + t for k in range(per_event) for t in range(BS)]
        events: list[object] = [BlockStored(hashes, last[e], tokens, BS, medium="GPU")]
        live[e] += hashes
        if i % 4 == 3 and len(live[e]) > 4 * per_event:
            gone, live[e] = live[e][:per_event], live[e][per_event:]
            events.append(BlockRemoved(gone, medium="GPU"))
            last[e] = None  # start a new chain: the old root may be gone
        else:
            last[e] = hashes[-1]
        out.append((e, encode_batch(KVEventBatch(1.0, events, 0))))  # type: ignore[arg-type]
        b += per_event
        i += 1
    return out


def run(fs: list[tuple[int, bytes]], engines: int, step: Callable[[BlockMapper, bytes, int], Any],
        make: Callable[[str], BlockMapper]) -> tuple[float, list[Any]]:  # fmt: skip
    mappers = [make(f"w{e}") for e in range(engines)]
    deltas: list[Any] = []
    gc.collect()
    t0 = time.process_time()
    for seq, (e, payload) in enumerate(fs):
        deltas.append(step(mappers[e], payload, seq))
    return time.process_time() - t0, deltas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=200_000)
    p.add_argument("--per-event", type=int, default=16)
    p.add_argument("--engines", type=int, default=8)
    a = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not native.NATIVE_BUILT:
        sys.exit(native.NOT_BUILT_REASON)
    fs = frames(a.blocks, a.per_event, a.engines)

    def py_step(m: BlockMapper, payload: bytes, seq: int) -> KvDelta:
        return m.map_batch(decode_batch(payload).events, seq)

    def native_step(m: BlockMapper, payload: bytes, seq: int) -> KvDelta:
        return native.map_frame(m, payload, seq)[1]

    def entry_step(m: BlockMapper, payload: bytes, seq: int) -> tuple[KvDelta, bytes]:
        delta = native.map_frame(m, payload, seq)[1]
        return delta, checked_entry(m.worker, [delta])

    def packed_step(m: BlockMapper, payload: bytes, seq: int) -> native.PackedEntry:
        return native.map_frame_packed(m, payload, seq)[1]

    def make_native(w: str) -> BlockMapper:
        return native.NativeBlockMapper(MODEL, w, BS)

    best: dict[str, float] = {}
    results: dict[str, list[Any]] = {}
    for _ in range(3):
        for name, step, make in (
            ("python", py_step, lambda w: BlockMapper(MODEL, w, BS)),
            ("native", native_step, make_native),
            ("entry", entry_step, make_native),
            ("packed", packed_step, make_native),
        ):
            s, deltas = run(fs, a.engines, step, make)
            best[name] = min(best.get(name, s), s)
            results[name] = deltas
    assert results["python"] == results["native"], "the two paths disagree"
    assert [d for d, _ in results["entry"]] == results["native"], "the two paths disagree"
    for (delta, raw), packed in zip(results["entry"], results["packed"], strict=True):
        assert packed.to_deltas() == [delta] and packed.raw == raw == encode_entry([delta]), "packed differs"
    n = a.blocks
    py, nat = n / best["python"], n / best["native"]
    ent, pk = n / best["entry"], n / best["packed"]
    print(f"frames {len(fs)}, stored blocks {n}, {a.per_event} blocks/event, {BS} tokens/block")
    print(f"python decode+hash+map: {py:,.0f} blocks/s")
    print(f"native decode+hash+map (map_frame): {nat:,.0f} blocks/s  ({nat / py:.1f}x)")
    print(f"native map_frame + checked_entry: {ent:,.0f} blocks/s  ({ent / py:.1f}x)")
    print(f"native map_frame_packed (entry made in Rust): {pk:,.0f} blocks/s  ({pk / py:.1f}x)")


if __name__ == "__main__":
    main()
