"""Non-owner apply: how fast one node applies other nodes' replicated log entries.

Every node applies every engine's log, so this rate, divided by the block
events per second of one busy engine, is how many engines one node keeps up
with (issue 12). The same entries (msgpack of ``list[KvDelta]``, as owners
write them: one delta of one op of ``entry_blocks`` blocks with its engine
hashes) go through:

* ``python``: ``decode_or_skip`` (msgspec's typed decode + ``validate_delta``)
  then ``PrefixIndex.apply`` per delta, the pure-Python path;
* ``python_decode_native_index``: the same decode, then ``NativeIndex.apply``;
* ``native``: ``kvmesh_native.decode_entry`` (``decode_packed``) then
  ``NativeIndex.apply_packed``: no Python object per block;
* ``native_decode_only``: ``decode_packed`` alone (what is left is the index);

and end to end through ``MeshState.apply_remote``, from the encoded gossip
payloads of an owner's real pycrdt updates (``decode_payload``, pycrdt's
apply and observer, the replica's bookkeeping, then the index), merged
``entries_per_update`` entries of an engine to one update as a gossip round
merges them:
``mesh_python`` (Python decode, ``PrefixIndex``), ``mesh_python_decode_native_index``
and ``mesh_native`` (packed entries, ``NativeIndex``, what a router node with
the native module runs).

The stream: ``n_engines`` engines in turn; each keeps ``window`` entries of
blocks live and, once it holds that many, alternates removing its oldest
entry's blocks with storing new ones; a quarter of each store is a prefix
shared with other engines. Rates are blocks (router hashes in ops) per second
of this process's CPU time, one run each; every path's index is checked equal
to the Python one.

    python -m kvmesh.benchmarks.nonowner [--blocks 1000000] [--engines 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from blocks.delta import OP_REMOVE, OP_STORE, EngineHash, KvDelta, KvOp
from mesh.engine_log.entry import decode_or_skip, encode_entry
from mesh.engine_log.epoch import Epoch
from mesh.engine_log.packed import PACKED_BUILT, IndexChange, decode_packed
from mesh.state import MeshState
from mesh.state_messages import Delta, decode_payload, encode_payload, merge_deltas
from router.index import PrefixIndex
from router.native_index import NativeIndex, apply_change, index_of

__all__ = ["BUSY_ENGINE_EVENTS", "bench_non_owner", "main"]

# Block events per second of one busy engine (stores plus evictions): the
# unit of "engines one node keeps up with".
BUSY_ENGINE_EVENTS = 3_000
_SHARED_PREFIXES = 64
_ENGINES_PER_PUSH = 100
_EPOCH = Epoch(1, "bench-owner", 0, 1)
_SPEC = {"endpoint": "tcp://127.0.0.1:1", "model": "bench-model"}


def _stream(n_blocks: int, n_engines: int, entry_blocks: int, window: int, seed: int) -> list[KvDelta]:
    rng = random.Random(seed)
    shared = entry_blocks // 4
    prefixes = [[rng.getrandbits(64) for _ in range(shared)] for _ in range(_SHARED_PREFIXES)]
    live: list[list[tuple[list[int], list[EngineHash]]]] = [[] for _ in range(n_engines)]
    stores = [0] * n_engines
    out: list[KvDelta] = []
    blocks = 0
    i = 0
    while blocks < n_blocks:
        e = i % n_engines
        held = live[e]
        if len(held) >= window and i // n_engines % 2:
            hashes, ehashes = held.pop(0)
            op = KvOp(OP_REMOVE, hashes, ehashes)
        else:
            # Distinct prefixes inside one engine's window: a REMOVE never
            # drops a block the engine still holds through a newer store.
            prefix = prefixes[(e * 7 + stores[e]) % _SHARED_PREFIXES]
            hashes = prefix + [rng.getrandbits(64) for _ in range(entry_blocks - shared)]
            ehashes = [rng.getrandbits(63) for _ in hashes]
            held.append((hashes, ehashes))
            stores[e] += 1
            op = KvOp(OP_STORE, hashes, ehashes)
        out.append(KvDelta(f"e{e}", i // n_engines, [op]))
        blocks += len(hashes)
        i += 1
    return out


def _cpu(run: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.process_time()
    run()
    return time.process_time() - t0


def _apply(index: Any, changes: list[IndexChange]) -> None:
    for ch in changes:
        apply_change(index, ch)


def _fingerprint(index: Any, n_engines: int) -> tuple[Any, ...]:
    return (len(index), index.stats()["entries"], tuple(index.blocks_of(f"e{e}") for e in range(n_engines)))


def _entry_paths(entries: list[tuple[str, bytes]], native: bool) -> dict[str, tuple[float, Any]]:
    """Path name -> (CPU seconds, final index) for the entry-level paths."""
    out: dict[str, tuple[float, Any]] = {}

    def python_decode(index: Any) -> Callable[[], None]:
        def run() -> None:
            apply = index.apply
            for engine, raw in entries:
                for d in decode_or_skip(engine, _EPOCH, raw):
                    apply(d)

        return run

    idx = PrefixIndex()
    out["python"] = (_cpu(python_decode(idx)), idx)
    if not native:
        return out
    idx = index_of("native")
    out["python_decode_native_index"] = (_cpu(python_decode(idx)), idx)

    idx = index_of("native")

    def packed() -> None:
        apply = idx.apply_packed
        for engine, raw in entries:
            pe = decode_packed(engine, _EPOCH, raw)
            if pe is not None:
                apply(pe)

    out["native"] = (_cpu(packed), idx)

    def decode_only() -> None:
        for engine, raw in entries:
            decode_packed(engine, _EPOCH, raw)

    out["native_decode_only"] = (_cpu(decode_only), None)
    return out


def _pushes(
    stream: list[KvDelta], n_engines: int, per_update: int, seed: int
) -> tuple[list[bytes], list[bytes]]:
    """The owner's gossip: (setup payloads: registry and takeovers; the
    payloads of the stream). A gossip round carries what every engine
    appended since the last one: here ``per_update`` entries of each engine,
    merged into one pycrdt update per engine, ``_ENGINES_PER_PUSH`` engines to
    a push (about the push's soft cap of a megabyte at 128-block entries)."""
    owner = MeshState("bench-owner", 0.0, random.Random(seed), hint_ttl=2.0)
    setup = []
    for e in range(n_engines):
        reg = owner.register_engine(f"e{e}", _SPEC)
        took = owner.take_ownership(f"e{e}", 0.0).message
        setup.append(encode_payload(merge_deltas("bench-owner", [reg, took])))
    pushes = []
    per_round = n_engines * per_update  # the stream is round-robin over the engines
    for r0 in range(0, len(stream), per_round):
        by_engine: dict[str, list[Delta]] = {}
        for d in stream[r0 : r0 + per_round]:
            by_engine.setdefault(d.worker, []).append(owner.local_deltas(d.worker, [d]))
        merged = [merge_deltas("bench-owner", ds) for ds in by_engine.values()]
        for i in range(0, len(merged), _ENGINES_PER_PUSH):
            pushes.append(encode_payload(merge_deltas("bench-owner", merged[i : i + _ENGINES_PER_PUSH])))
    return setup, pushes


def _mesh_path(
    setup: list[bytes], pushes: list[bytes], packed: bool, native_index: bool
) -> tuple[float, Any]:
    state = MeshState("bench-replica", 0.0, random.Random(1), hint_ttl=2.0, packed=packed)
    index = index_of("native" if native_index else "python")
    for raw in setup:
        msg = decode_payload(raw)
        assert isinstance(msg, Delta)
        _apply(index, state.apply_remote(msg, 0.0).index_changes)

    def run() -> None:
        for raw in pushes:
            msg = decode_payload(raw)
            assert isinstance(msg, Delta)
            _apply(index, state.apply_remote(msg, 0.0).index_changes)

    return _cpu(run), index


def bench_non_owner(
    n_blocks: int = 1_000_000,
    n_engines: int = 1_000,
    seed: int = 0,
    *,
    entry_blocks: int = 128,
    window: int = 4,
    entries_per_update: int = 4,
    mesh: bool = True,
) -> dict[str, Any]:
    """Non-owner apply rates (see the module docstring): ``{"paths": {name:
    {"seconds", "blocks_per_s"}}, "blocks", "entries", ...}``, plus
    ``"engines_kept_up"`` per path (rate / ``BUSY_ENGINE_EVENTS``). Paths
    that need the native module are left out without it (``"native"`` False)."""
    if min(n_blocks, n_engines, entry_blocks, window, entries_per_update) < 1:
        raise ValueError("n_blocks, n_engines, entry_blocks, window and entries_per_update must be >= 1")
    native = PACKED_BUILT and NativeIndex is not None
    stream = _stream(n_blocks, n_engines, entry_blocks, window, seed)
    blocks = sum(len(op.hashes) for d in stream for op in d.ops)
    entries = [(d.worker, encode_entry([d])) for d in stream]
    timed = _entry_paths(entries, native)
    if mesh:
        setup, pushes = _pushes(stream, n_engines, entries_per_update, seed)
        timed["mesh_python"] = _mesh_path(setup, pushes, packed=False, native_index=False)
        if native:
            timed["mesh_python_decode_native_index"] = _mesh_path(
                setup, pushes, packed=False, native_index=True
            )
            timed["mesh_native"] = _mesh_path(setup, pushes, packed=True, native_index=True)
    want = _fingerprint(timed["python"][1], n_engines)
    for name, (_, index) in timed.items():
        if index is not None and _fingerprint(index, n_engines) != want:
            raise AssertionError(f"non-owner path {name} built another index than the Python path")
    paths = {
        name: {
            "seconds": round(secs, 4),
            "blocks_per_s": round(blocks / secs) if secs > 0 else None,
            "engines_kept_up": round(blocks / secs / BUSY_ENGINE_EVENTS) if secs > 0 else None,
        }
        for name, (secs, _) in timed.items()
    }
    return {
        "blocks": blocks,
        "entries": len(entries),
        "engines": n_engines,
        "entry_blocks": entry_blocks,
        "entries_per_update": entries_per_update,
        "index_blocks": want[0],
        "native": native,
        "busy_engine_events_per_s": BUSY_ENGINE_EVENTS,
        "paths": paths,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--engines", type=int, default=1_000)
    p.add_argument("--entry-blocks", type=int, default=128)
    p.add_argument("--entries-per-update", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mesh", action="store_true", help="skip the end-to-end MeshState paths")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    r = bench_non_owner(
        a.blocks,
        a.engines,
        a.seed,
        entry_blocks=a.entry_blocks,
        entries_per_update=a.entries_per_update,
        mesh=not a.no_mesh,
    )
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"non-owner apply: {r['blocks']:,} blocks in {r['entries']:,} entries of {r['entry_blocks']} blocks, "
        f"{r['engines']:,} engines, {r['index_blocks']:,} blocks indexed at the end (CPU time, one run)"
    )
    if not r["native"]:
        print("native module not built: Python paths only")
    base = r["paths"]["python"]["blocks_per_s"]
    for name, v in r["paths"].items():
        rate = v["blocks_per_s"]
        print(
            f"  {name:34s} {rate:>12,} blocks/s ({rate / base:4.1f}x)  "
            f"engines at {BUSY_ENGINE_EVENTS:,} events/s: {v['engines_kept_up']:,}"
        )


if __name__ == "__main__":
    main()
