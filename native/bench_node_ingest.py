"""A router node's owner ingest end to end, ZMQ included: how long a node
takes to drain its engines' queued KV-event frames into its logs and index.

    .venv/bin/python native/bench_node_ingest.py [--blocks 1000000] [--engines 64] [--runs 3]

``kvmesh bench micro``'s owner ingest times decoding, mapping, the log and
the index in process; a node also receives every frame from a ZMQ socket,
keeps each engine's sequence and statistics, and merges what it gossips.
This measures the node as it runs: a publisher process binds one PUB socket
per engine (``kvmesh.benchmarks.micro``'s population and vLLM frames, in the
order each engine published them) and a ``RouterNode`` (in this process,
``--insecure``, no peers) owns every engine. Each engine's first frame is
sent until its subscription is up; then the publisher sends every other
frame while the node's event loop is held, so that they queue in the SUB
sockets, and the clock runs from the loop's release until every engine's
log holds its last frame. Each run starts a fresh node and publisher; the
seconds and blocks per second of every run are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOLD_S = 8.0  # the event loop held while the publisher sends: every frame queued


def publish(frames_path: str, ports_path: str, warm_path: str, go_path: str) -> None:
    """The publisher process: a PUB per engine; frame 0 of each whenever
    ``warm_path`` changes, then, once ``go_path`` exists, every other frame,
    engines interleaved a few frames at a time as engines publish at once."""
    per: list[list[bytes]] = pickle.loads(Path(frames_path).read_bytes())
    ctx = zmq.Context()
    socks = []
    for _ in per:
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.SNDHWM, 0)
        socks.append(s)
    ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in socks]
    Path(ports_path + ".tmp").write_text(" ".join(map(str, ports)))
    os.rename(ports_path + ".tmp", ports_path)
    seen = ""
    deadline = time.monotonic() + 120
    while not os.path.exists(go_path) and time.monotonic() < deadline:
        k = Path(warm_path).read_text() if os.path.exists(warm_path) else ""
        if k and k != seen:
            seen = k
            for e, s in enumerate(socks):
                s.send_multipart([b"", (0).to_bytes(8, "big"), per[e][0]])
        time.sleep(0.02)
    pos = [1] * len(per)
    while any(p < len(f) for p, f in zip(pos, per, strict=True)):
        for e, s in enumerate(socks):
            for _ in range(4):
                if pos[e] < len(per[e]):
                    s.send_multipart([b"", pos[e].to_bytes(8, "big"), per[e][pos[e]]])
                    pos[e] += 1
    time.sleep(HOLD_S + 30)  # the queued frames stay until the node has them


async def one_run(per: list[list[bytes]], blocks: int, tmp: str) -> tuple[float, int]:
    """One fresh node and publisher: (seconds to drain, index entries)."""
    from kvmesh import procs
    from router.config import RouterConfig
    from router.engine_registry import EngineSpec
    from router.node import RouterNode

    paths = {k: f"{tmp}/{k}" for k in ("frames", "ports", "warm", "go")}
    for k in ("ports", "warm", "go"):
        Path(paths[k]).unlink(missing_ok=True)
    pub = subprocess.Popen(
        [sys.executable, __file__, "--publish", paths["frames"], paths["ports"], paths["warm"], paths["go"]]
    )
    node = None
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(paths["ports"]):
            assert time.monotonic() < deadline, "the publisher did not bind its sockets"
            await asyncio.sleep(0.05)
        ports = list(map(int, Path(paths["ports"]).read_text().split()))
        node = RouterNode(RouterConfig(listen=f"127.0.0.1:{procs.free_port()}", node_id="n0", insecure=True))
        await node.start()
        while not node.ready:
            await asyncio.sleep(0.02)
        engines = [f"e{e}" for e in range(len(per))]
        for e, port in zip(engines, ports, strict=True):
            url = f"http://127.0.0.1:{procs.free_port()}"
            await node.register_engine(
                EngineSpec(e, url, kv_events_endpoint=f"tcp://127.0.0.1:{port}").validate()
            )
        for k in range(100):  # frame 0 again until every subscription has it
            Path(paths["warm"]).write_text(str(k))
            if await _until(lambda: all(node.index.blocks_of(e) > 0 for e in engines), 1.0):
                break
        else:
            raise RuntimeError("the engines' first frames never arrived")
        Path(paths["warm"]).unlink()
        await asyncio.sleep(1.5)  # repeats of frame 0 (read as engine restarts) drained before the clock
        logs = node.core.state.logs
        if not all(logs[e].last_seq.get(e) == 0 for e in engines):
            raise RuntimeError("an engine's first frame was not its log's last")
        Path(paths["go"]).touch()
        time.sleep(HOLD_S)  # the loop held: every frame queues in the SUB sockets
        t0 = time.perf_counter()
        last = {e: len(f) - 1 for e, f in zip(engines, per, strict=True)}
        if not await _until(lambda: all(logs[e].last_seq.get(e) == last[e] for e in engines), 120, 0.002):
            raise RuntimeError("the node did not drain every frame in 120 s")
        return time.perf_counter() - t0, len(node.index)
    finally:
        if node is not None:
            await node.stop()
        pub.kill()
        pub.wait()


async def _until(cond: object, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        await asyncio.sleep(interval)
    return False


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--publish":
        publish(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--engines", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    from kvmesh.benchmarks.micro import _vllm_frames, build_population

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    batches, _ = build_population(a.blocks, a.engines, 0)
    blocks = sum(len(s) for _, _, s in batches)
    per: list[list[bytes]] = [[] for _ in range(a.engines)]
    for e, frame in _vllm_frames(batches):
        per[e].append(frame)
    print(f"{blocks:,} blocks in {sum(map(len, per)):,} frames over {a.engines} engines", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        Path(f"{tmp}/frames").write_bytes(pickle.dumps(per))
        for _ in range(a.runs):
            s, entries = asyncio.run(one_run(per, blocks, tmp))
            print(f"drained in {s:.3f} s: {blocks / s:,.0f} blocks/s; index {entries:,} entries", flush=True)


if __name__ == "__main__":
    main()
