"""An engine's owner writes the frames its adapter drained in one burst as
one log entry (RouterNode._owner_delta), bounded by MeshConfig.max_entry_blocks,
on the path the node runs (packed when its index is native): the index and
the log say exactly what the engine published, in far fewer entries than
frames."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import zmq

from blocks.delta import OP_STORE, KvDelta, KvOp
from blocks.hashing import DEFAULT_BLOCK_SIZE
from engine_adapters.kv_events import BlockStored, KVEventBatch, encode_batch
from kvmesh import procs
from mesh.core import MeshConfig
from mesh.engine_log.entry import decode_entry
from router.config import RouterConfig
from router.engine_registry import EngineSpec
from router.native_index import NativeIndex
from router.node import RouterNode
from tests.eventually import eventually

BS = DEFAULT_BLOCK_SIZE
FRAMES = 60
BLOCKS = 8  # per frame


def _frame(i: int) -> bytes:
    """Frame ``i``: BLOCKS new blocks (engine hashes i*BLOCKS...), a chain of its own."""
    ehs = [1000 + i * BLOCKS + b for b in range(BLOCKS)]
    tokens = [(i * 7919 + t) % 50_000 for t in range(BS * BLOCKS)]
    ev = BlockStored(block_hashes=ehs, parent_block_hash=None, token_ids=tokens, block_size=BS, lora_id=None)
    return encode_batch(KVEventBatch(ts=time.time(), events=[ev], data_parallel_rank=0), "map")


@pytest.mark.parametrize("max_entry_blocks", [4096, 3 * BLOCKS])
async def test_a_burst_of_frames_is_one_entry_and_nothing_is_lost(max_entry_blocks: int) -> None:
    port = procs.free_port()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    spec = EngineSpec(
        "e0", f"http://127.0.0.1:{procs.free_port()}", kv_events_endpoint=f"tcp://127.0.0.1:{port}"
    ).validate()
    cfg = RouterConfig(
        listen=f"127.0.0.1:{procs.free_port()}",
        node_id="n0",
        insecure=True,
        mesh=dataclasses.replace(MeshConfig(), max_entry_blocks=max_entry_blocks),
    )
    node = RouterNode(cfg)
    await node.start()
    try:
        await eventually(lambda: node.ready, 20, "the node to be ready", interval=0.02)
        await node.register_engine(spec)

        def send(i: int) -> None:
            pub.send_multipart([b"", i.to_bytes(8, "big"), _frame(i)])

        # The first frame, again until the adapter's subscription is up.
        await eventually(lambda: "e0" in node.core.owned(), 20, "ownership", interval=0.02)
        deadline = time.monotonic() + 20
        while node.index.blocks_of("e0") < BLOCKS:
            assert time.monotonic() < deadline, "the adapter never received a frame"
            send(0)
            await asyncio.sleep(0.1)
        log = node.core.state.logs["e0"]
        before = len(log.current)
        # A burst: every frame queued before the adapter runs again (the loop
        # is blocked while the I/O thread delivers them).
        for i in range(1, FRAMES):
            send(i)
        time.sleep(0.5)
        await eventually(
            lambda: node.index.blocks_of("e0") == FRAMES * BLOCKS, 20, "every block indexed", interval=0.02
        )
        entries = log.current.entries()[before:]
        deltas = [d for raw in entries for d in decode_entry(raw)]
        # Nothing lost, nothing twice, in order.
        assert [d.seq for d in deltas] == list(range(1, FRAMES))
        assert log.last_seq["e0"] == FRAMES - 1
        written = sorted(eh for d in deltas for op in d.ops for eh in op.ehashes)
        assert written == [1000 + b for b in range(BLOCKS, FRAMES * BLOCKS)]
        per_entry = [sum(len(op.hashes) for d in decode_entry(raw) for op in d.ops) for raw in entries]
        if max_entry_blocks >= FRAMES * BLOCKS:
            assert len(entries) <= 3, f"{len(entries)} entries for one burst of {FRAMES - 1} frames"
        else:
            # Split where an entry reached the bound (a frame is never split).
            assert max(per_entry) <= max_entry_blocks
            assert len(entries) >= (FRAMES - 1) * BLOCKS // max_entry_blocks
        if isinstance(node.index, NativeIndex):
            assert node.core.config.packed_entries  # the packed owner path was the one exercised
    finally:
        await node.stop()
        pub.close(linger=0)


async def test_a_bad_frame_in_a_burst_loses_only_itself() -> None:
    cfg = RouterConfig(listen=f"127.0.0.1:{procs.free_port()}", node_id="n0", insecure=True)
    node = RouterNode(cfg)
    await node.start()
    try:
        await eventually(lambda: node.ready, 20, "the node to be ready", interval=0.02)
        # No event endpoint: owned, no adapter; the burst is handed in as an adapter would.
        await node.register_engine(EngineSpec("e0", f"http://127.0.0.1:{procs.free_port()}").validate())
        await eventually(lambda: "e0" in node.core.owned(), 20, "ownership", interval=0.02)
        node._owner_delta("e0", KvDelta("e0", 1, [KvOp(OP_STORE, [11])]))
        node._owner_delta("e0", KvDelta("e0", 2, [KvOp(OP_STORE, [1 << 64])]))  # not a u64: refused
        node._owner_delta("e0", KvDelta("e0", 3, [KvOp(OP_STORE, [13])]))
        await asyncio.sleep(0.05)
        assert node.index.worker_hashes("e0") == {11, 13}
        log = node.core.state.logs["e0"]
        assert [d.seq for raw in log.current.entries()[1:] for d in decode_entry(raw)] == [1, 3]
        assert log.last_seq["e0"] == 3
    finally:
        await node.stop()
