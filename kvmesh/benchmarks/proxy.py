"""Generate proxy throughput: a kvmesh router in front of fast simulated
engines vs a bare grpcio server with the same streaming shape, same client,
same run. Each client task loops ``Generate`` (a ``prompt_tokens``-token
prompt, ``max_tokens`` streamed tokens) for ``seconds``; requests/s and
streamed messages/s are counted at the client."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time

import grpc

from kvmesh import procs
from kvmesh.loadgen import generate_once
from kvmesh.v1 import router_pb2_grpc as pb_grpc


async def _drive(addr: str, concurrency: int, seconds: float, prompt_tokens: int, max_tokens: int) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(256, 32000) for _ in range(prompt_tokens)] for _ in range(64)]
    ch = grpc.aio.insecure_channel(addr)
    stub = pb_grpc.RouterStub(ch)
    done = failed = toks = 0
    # Warm-up: connections, engine caches.
    for p in prompts[:8]:
        await generate_once(stub, p, max_tokens)
    t_end = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done, failed, toks
        i = k
        while time.perf_counter() < t_end:
            rec, out = await generate_once(stub, prompts[i % len(prompts)], max_tokens, policy="")
            i += concurrency
            if rec.ok:
                done += 1
                toks += len(out)
            else:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    await ch.close()
    return {"requests_per_s": done / wall, "messages_per_s": (done * (max_tokens + 2)) / wall,
            "failed": failed, "requests": done, "wall_s": wall}


def _start_echo() -> tuple[subprocess.Popen, str]:
    popen = subprocess.Popen([sys.executable, "-m", "kvmesh.benchmarks.echo_server", "--port", "0"],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             start_new_session=True)
    assert popen.stdout is not None
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(popen.stdout.readline()), daemon=True)
    t.start()
    t.join(20)
    if not box or not box[0].startswith("READY"):
        popen.kill()
        raise RuntimeError("echo server did not start")
    return popen, box[0].split("grpc=")[1].strip()


def run_proxy(seconds: float = 8.0, concurrency: int = 32, prompt_tokens: int = 2000, max_tokens: int = 16,
              engines: int = 2) -> dict:
    popen, addr = _start_echo()
    try:
        echo = asyncio.run(_drive(addr, concurrency, seconds, prompt_tokens, max_tokens))
    finally:
        popen.terminate()
        popen.wait(10)
    engs = [procs.start_sim_engine(f"proxy-engine-{i}", ["--time-scale", "0.01", "--log-level", "warning"])
            for i in range(engines)]
    router = None
    try:
        router = procs.start_router("proxy-router", [procs.engine_flag(f"e{i}", p) for i, p in enumerate(engs)],
                                    ["--policy", "precise", "--log-level", "warning"])
        kv = asyncio.run(_drive(router.info["grpc"], concurrency, seconds, prompt_tokens, max_tokens))
    finally:
        if router is not None:
            router.stop()
        for p in engs:
            p.stop()
    return {"echo": echo, "kvmesh": kv, "ratio": kv["requests_per_s"] / echo["requests_per_s"],
            "shape": {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "concurrency": concurrency,
                      "seconds": seconds, "engines": engines, "engine_time_scale": 0.01}}
