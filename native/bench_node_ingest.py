"""A router node's owner ingest end to end, ZMQ included: how long a node
takes to drain its engines' queued KV-event frames into its logs and index.

    .venv/bin/python native/bench_node_ingest.py [--blocks 1000000] [--engines 64] [--runs 3]

``kvmesh bench micro``'s owner ingest times decoding, mapping, the log and
the index in process; a node also receives every frame from a ZMQ socket,
keeps each engine's sequence and statistics, and merges the updates it
would gossip (it has no peers here). This measures the node as it runs: a
publisher process binds one PUB socket per engine on loopback
(``kvmesh.benchmarks.micro``'s population and vLLM frames, in the order
each engine published them) and a ``RouterNode`` (in this process,
``--insecure``, no peers) owns every engine. Each engine's first frame is
sent until its subscription is up; then the publisher sends all the
remaining frames while the node's event loop is held, and says when it has
sent them all; the clock runs from the loop's release until every engine's
log holds its last frame, and the rate counts the blocks of those frames.
The engines' HTTP addresses have nothing behind them, so the node's health
poller finds them down meanwhile (a few failed connects every 2 s, on the
loop). Each run starts a fresh node and publisher; the seconds and blocks
per second of every run are printed, with the implementation the node ran.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAIT_S = 120.0  # the longest any step here waits


def publish(frames_path: str, ports_path: str, warm_path: str, go_path: str) -> None:
    """The publisher process: a PUB per engine; frame 0 of each whenever
    ``warm_path`` changes, then, once ``go_path`` exists, all the remaining
    frames, engines interleaved a few frames at a time as engines publish at
    once; then ``go_path`` + ".sent"."""
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
    deadline = time.monotonic() + 3 * WAIT_S
    while not os.path.exists(go_path):
        if time.monotonic() > deadline:
            return
        try:
            k = Path(warm_path).read_text()
        except FileNotFoundError:
            k = ""
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
    Path(go_path + ".sent").touch()
    time.sleep(WAIT_S)  # the queued frames stay until the node has them (it kills this process)


async def one_run(per: list[list[bytes]], tmp: str) -> float:
    """One fresh node and publisher: seconds to drain."""
    from kvmesh import procs
    from router.config import RouterConfig
    from router.engine_registry import EngineSpec
    from router.node import RouterNode

    paths = {k: f"{tmp}/{k}" for k in ("frames", "ports", "warm", "go", "go.sent")}
    for k in ("ports", "warm", "go", "go.sent"):
        Path(paths[k]).unlink(missing_ok=True)
    pub = subprocess.Popen(
        [sys.executable, __file__, "--publish", paths["frames"], paths["ports"], paths["warm"], paths["go"]]
    )
    node = None
    try:
        if not await _until(lambda: os.path.exists(paths["ports"]) or pub.poll() is not None, WAIT_S):
            raise RuntimeError("the publisher did not bind its sockets")
        if pub.poll() is not None:
            raise RuntimeError(f"the publisher exited ({pub.returncode})")
        ports = list(map(int, Path(paths["ports"]).read_text().split()))
        node = RouterNode(RouterConfig(listen=f"127.0.0.1:{procs.free_port()}", node_id="n0", insecure=True))
        await node.start()
        if not await _until(lambda: node.ready, WAIT_S):
            raise RuntimeError("the node did not become ready")
        engines = [f"e{e}" for e in range(len(per))]
        for e, port in zip(engines, ports, strict=True):
            url = f"http://127.0.0.1:{procs.free_port()}"
            await node.register_engine(
                EngineSpec(e, url, kv_events_endpoint=f"tcp://127.0.0.1:{port}").validate()
            )
        await _warm(node, engines, paths["warm"])
        logs = node.core.state.logs
        Path(paths["go"]).touch()
        _hold_until_sent(pub, paths["go.sent"])
        t0 = time.perf_counter()
        last = {e: len(f) - 1 for e, f in zip(engines, per, strict=True)}
        if not await _until(lambda: all(logs[e].last_seq.get(e) == last[e] for e in engines), WAIT_S, 0.002):
            raise RuntimeError(f"the node did not drain every frame in {WAIT_S:.0f} s")
        return time.perf_counter() - t0
    finally:
        pub.kill()
        pub.wait()
        if node is not None:
            await node.stop()


async def _warm(node: Any, engines: list[str], warm_path: str) -> None:
    """Frame 0 of every engine, again until every subscription has had it;
    then its repeats (read as engine restarts) drained before any clock."""
    for k in range(int(WAIT_S)):
        Path(warm_path).write_text(str(k))
        if await _until(lambda: all(node.index.blocks_of(e) > 0 for e in engines), 1.0):
            break
    else:
        raise RuntimeError("the engines' first frames never arrived")
    Path(warm_path).unlink()
    await asyncio.sleep(1.5)
    if not all(node.core.state.logs[e].last_seq.get(e) == 0 for e in engines):
        raise RuntimeError("an engine's first frame was not its log's last")


def _hold_until_sent(pub: subprocess.Popen[bytes], sent_path: str) -> None:
    """The event loop held (a blocking wait) until the publisher has sent
    every frame: they queue in the node's SUB sockets meanwhile."""
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(sent_path):
        if time.monotonic() > deadline or pub.poll() is not None:
            raise RuntimeError("the publisher did not send every frame")
        time.sleep(0.01)
    time.sleep(0.5)  # the last frames through loopback into the queues


async def _until(cond: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
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
    from engine_adapters.native import NATIVE
    from kvmesh.benchmarks.micro import _vllm_frames, build_population

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    batches, _ = build_population(a.blocks, a.engines, 0)
    per: list[list[bytes]] = [[] for _ in range(a.engines)]
    sent = 0  # blocks of the frames timed: every engine's but its first
    firsts: set[int] = set()
    for (e, frame), (_, _, stored) in zip(_vllm_frames(batches), batches, strict=True):
        per[e].append(frame)
        if e in firsts:
            sent += len(stored)
        firsts.add(e)
    if not all(per):
        ap.error(f"an engine has no frame: give more --blocks or fewer --engines ({a.blocks}, {a.engines})")
    impl = "native" if NATIVE else "pure Python"
    print(
        f"{sent:,} blocks timed in {sum(map(len, per)) - a.engines:,} frames over {a.engines} engines; {impl}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        Path(f"{tmp}/frames").write_bytes(pickle.dumps(per))
        for _ in range(a.runs):
            s = asyncio.run(one_run(per, tmp))
            print(f"drained in {s:.3f} s: {sent / s:,.0f} blocks/s", flush=True)


if __name__ == "__main__":
    main()
