"""Generate proxy throughput: a kvmesh router in front of engines that cost
next to nothing vs a bare grpcio server with the same streaming shape, same
client, same run.

Each client task loops ``Generate`` (the same ``prompt_tokens``-token prompts,
``max_tokens`` streamed tokens, ``ignore_eos``) for ``seconds``; requests,
streamed messages and tokens are counted at the client.

What each server sends per request:

- the bare grpcio echo server (``echo_server.py``): ``routed``, then one
  ``chunk`` message per token (``max_tokens`` of them), then ``finished``;
- the kvmesh router: ``routed``, the engine's tokens as they arrive (one
  ``chunk`` message per batch of engine events already received: one per token
  when it keeps up, several tokens per message when it falls behind; it never
  waits to batch), then ``finished``. ``tokens_per_chunk`` shows which.

The engines are ``echo_engine.py``: vLLM's completions stream and nothing
else, one SSE event per token, ``echo_engine.TOKEN_INTERVAL_S`` apart
(``engine="sim"`` runs the simulated engine at time scale 0.01 instead).
On two cores the engines share the client's core, so an engine that costs
as much CPU per request as the router would bound the run before the router
does; the echo engine keeps the bound on the router. Both runs stream the
same ``max_tokens`` tokens.

Fairness: the server under test (echo server or router) is pinned to the same
CPU set in both runs (``server_cpus``, the last CPU of this process's
affinity), and the client (this process) and the engines to the other CPUs
(``client_cpus``). So both servers get the same CPU, and the router's engines
never take CPU from the router; they do share the client's CPUs, which can
only slow the kvmesh run. The CPU time each side used is reported (``cpu``, in
cores; ``other`` is the rest of the machine, noise when large), with the
server's CPU ms per request and their ratio (``cpu_ratio``, echo / router).
With a single CPU nothing is pinned (``pinned`` is false).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import grpc

from kvmesh import procs
from kvmesh.benchmarks.cpu import cpu_s, machine_busy_s, self_cpu_s
from kvmesh.benchmarks.echo_engine import TOKEN_INTERVAL_S
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc

ENGINE_TIME_SCALE = 0.01


def cpu_sets() -> tuple[set[int], set[int]] | None:
    """(server CPUs, client+engine CPUs), or None if there is only one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):  # a thread that just exited
            pass


async def _drive(
    addr: str,
    concurrency: int,
    seconds: float,
    prompt_tokens: int,
    max_tokens: int,
    server_pid: int,
    engine_pids: list[int],
) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(256, 32000) for _ in range(prompt_tokens)] for _ in range(64)]
    reqs = [
        pb.GenerateRequest(
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=p)),
            sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        for p in prompts
    ]
    ch = aio_channel(addr, tls=False, config=ONE_NODE)
    stub = pb_grpc.RouterStub(ch)
    done = failed = toks = msgs = chunk_msgs = 0

    async def once(req: pb.GenerateRequest) -> tuple[bool, int, int, int]:
        n_tok = n_msg = n_chunk = 0
        ok = False
        try:
            async for m in stub.Generate(req, timeout=60.0):
                n_msg += 1
                kind = m.WhichOneof("event")
                if kind == "chunk":
                    n_chunk += 1
                    n_tok += len(m.chunk.token_ids)
                elif kind == "finished":
                    ok = m.finished.finish_reason != "error"
        except grpc.aio.AioRpcError:
            ok = False
        return ok and n_tok == max_tokens, n_tok, n_msg, n_chunk

    # Warm-up: connections, engine caches (every prompt once).
    for r in reqs:
        await once(r)
    t_end = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done, failed, toks, msgs, chunk_msgs
        i = k
        while time.perf_counter() < t_end:
            ok, n_tok, n_msg, n_chunk = await once(reqs[i % len(reqs)])
            i += concurrency
            if ok:
                done += 1
                toks += n_tok
                msgs += n_msg
                chunk_msgs += n_chunk
            else:
                failed += 1

    c0 = {"server": cpu_s(server_pid), "client": self_cpu_s(), "engines": sum(map(cpu_s, engine_pids))}
    m0 = machine_busy_s()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    m1 = machine_busy_s()
    c1 = {"server": cpu_s(server_pid), "client": self_cpu_s(), "engines": sum(map(cpu_s, engine_pids))}
    await ch.close()
    cpu = {k: (c1[k] - c0[k]) / wall for k in c0}
    if not engine_pids:
        del cpu["engines"]
    # Anything else running on the machine meanwhile (noise: rerun if large).
    cpu["other"] = max(0.0, (m1 - m0) / wall - sum(cpu.values()))
    return {
        "requests_per_s": done / wall,
        "messages_per_s": msgs / wall,
        "tokens_per_s": toks / wall,
        "tokens_per_chunk": toks / chunk_msgs if chunk_msgs else 0.0,
        "failed": failed,
        "requests": done,
        "wall_s": wall,
        "cpu": cpu,
        "server_cpu_ms_per_request": cpu["server"] * wall / done * 1000.0 if done else 0.0,
    }


def _start_engine(name: str, kind: str) -> procs.Proc:
    if kind == "sim":
        return procs.start_sim_engine(
            name, ["--time-scale", str(ENGINE_TIME_SCALE), "--log-level", "warning"]
        )
    p = procs.start(name, ["--port", "0"], module="kvmesh.benchmarks.echo_engine")
    return p


def _engine_flag(engine_id: str, p: procs.Proc) -> str:
    if "kv_endpoint" in p.info:
        return procs.engine_flag(engine_id, p)
    return f"id={engine_id},url={p.info['url']},model={procs.SIM_MODEL}"


def run_proxy(
    seconds: float = 8.0,
    concurrency: int = 32,
    prompt_tokens: int = 2000,
    max_tokens: int = 16,
    engines: int = 2,
    engine: str = "echo",
) -> dict:
    sets = cpu_sets()
    own = os.sched_getaffinity(0)
    if sets is not None:
        pin(os.getpid(), sets[1])  # the client
    try:
        echo_srv = procs.start("proxy-echo", ["--port", "0"], module="kvmesh.benchmarks.echo_server")
        try:
            if sets is not None:
                pin(echo_srv.popen.pid, sets[0])
            echo = asyncio.run(
                _drive(
                    echo_srv.info["grpc"],
                    concurrency,
                    seconds,
                    prompt_tokens,
                    max_tokens,
                    echo_srv.popen.pid,
                    [],
                )
            )
        finally:
            echo_srv.stop(10)
        engs = [_start_engine(f"proxy-engine-{i}", engine) for i in range(engines)]
        router = None
        try:
            router = procs.start_router(
                "proxy-router",
                [_engine_flag(f"e{i}", p) for i, p in enumerate(engs)],
                ["--policy", "precise", "--log-level", "warning"],
            )
            if sets is not None:
                pin(router.popen.pid, sets[0])
            kv = asyncio.run(
                _drive(
                    router.info["grpc"],
                    concurrency,
                    seconds,
                    prompt_tokens,
                    max_tokens,
                    router.popen.pid,
                    [p.popen.pid for p in engs],
                )
            )
        finally:
            if router is not None:
                router.stop()
            for p in engs:
                p.stop()
    finally:
        pin(os.getpid(), own)
    return {
        "echo": echo,
        "kvmesh": kv,
        "ratio": kv["requests_per_s"] / echo["requests_per_s"],
        # Server CPU per request, echo / router: what the router costs on
        # top of a bare server, whoever else shares the machine.
        "cpu_ratio": echo["server_cpu_ms_per_request"] / kv["server_cpu_ms_per_request"]
        if kv["server_cpu_ms_per_request"]
        else 0.0,
        "shape": {
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "concurrency": concurrency,
            "seconds": seconds,
            "engines": engines,
            "engine": engine,
            "engine_time_scale": ENGINE_TIME_SCALE if engine == "sim" else None,
            "pinned": sets is not None,
            "server_cpus": sorted(sets[0]) if sets else [],
            "client_cpus": sorted(sets[1]) if sets else [],
            "echo_sends": f"routed + {max_tokens} chunks of 1 token + finished",
            "kvmesh_sends": "routed + the engine's tokens as received (no waiting) + finished",
            "engine_token_interval_s": TOKEN_INTERVAL_S if engine == "echo" else None,
        },
    }
