"""Drive a workload through routers' gRPC ``Generate`` and measure it.

Sessions run concurrently (up to ``concurrency`` at a time); the turns of one
session run in order, each prompt carrying the engine's previous answers, so
prefix reuse is exactly what a chat client would produce. Requests go
through one :class:`kvmesh.client.AsyncClient` over all the given router
addresses, which spreads them over the nodes (``round_robin``): what a
client of a DNS name in front of the mesh does.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmesh.client import (
    AsyncClient,
    Chunk,
    GenerateOptions,
    KvmeshError,
    Result,
    generate_request,
    static_target,
    stream_events,
)
from kvmesh.stats import percentile
from kvmesh.workloads import Session
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc


@dataclass(slots=True)
class RequestRecord:
    session_id: str
    turn: int
    engine_id: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_ms: float  # client-side: send -> first token chunk
    latency_ms: float
    attempts: int
    ok: bool
    error: str = ""


@dataclass
class RunResult:
    policy: str
    records: list[RequestRecord] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    def summary(self) -> dict[str, float]:
        ok = self.ok
        prompt = sum(r.prompt_tokens for r in ok)
        cached = sum(r.cached_tokens for r in ok)
        ttfts = [r.ttft_ms for r in ok]
        lats = [r.latency_ms for r in ok]
        per_engine: dict[str, int] = {}
        for r in ok:
            per_engine[r.engine_id] = per_engine.get(r.engine_id, 0) + 1
        counts = list(per_engine.values()) or [0]
        return {
            "requests": len(self.records),
            "failed": len(self.records) - len(ok),
            "hit_rate": cached / prompt if prompt else 0.0,
            "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p90_ms": percentile(ttfts, 90),
            "ttft_p99_ms": percentile(ttfts, 99),
            "latency_p50_ms": percentile(lats, 50),
            "latency_p90_ms": percentile(lats, 90),
            "throughput_rps": len(ok) / self.wall_s if self.wall_s else 0.0,
            "output_tps": sum(r.output_tokens for r in ok) / self.wall_s if self.wall_s else 0.0,
            "imbalance": max(counts) / statistics.mean(counts) if ok else 0.0,
            "wall_s": self.wall_s,
        }


async def generate_once(
    client: AsyncClient | pb_grpc.RouterStub,
    token_ids: list[int],
    max_tokens: int,
    policy: str = "",
    session_key: str = "",
    request_id: str = "",
    timeout: float = 120.0,
) -> tuple[RequestRecord, list[int]]:
    """One Generate call; returns its record and the generated token ids.

    ``client``: a :class:`kvmesh.client.AsyncClient`, or the ``RouterStub`` of
    a ``grpc.aio`` channel (its stream is read the same way)."""
    opts: GenerateOptions = {
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "policy": policy,
        "session_key": session_key,
        "request_id": request_id,
    }
    if isinstance(client, AsyncClient):
        events = client.generate(token_ids, timeout=timeout, **opts)
    else:
        events = stream_events(client.Generate(generate_request(token_ids, **opts), timeout=timeout))
    t0 = time.perf_counter()
    ttft = -1.0
    out: list[int] = []
    fin: Result | None = None
    try:
        async for event in events:
            if isinstance(event, Chunk):
                if ttft < 0:
                    ttft = (time.perf_counter() - t0) * 1000.0
                out.extend(event.token_ids)
            elif isinstance(event, Result):
                fin = event
    except KvmeshError as e:
        rec = RequestRecord(
            "",
            0,
            "",
            len(token_ids),
            0,
            0,
            0.0,
            (time.perf_counter() - t0) * 1000.0,
            0,
            False,
            f"{e.status}: {e.message}",
        )
        return rec, out
    latency = (time.perf_counter() - t0) * 1000.0
    ok = fin is not None and fin.finish_reason != "error"
    rec = RequestRecord(
        session_id="",
        turn=0,
        engine_id=fin.engine_id if fin else "",
        prompt_tokens=fin.prompt_tokens if fin else len(token_ids),
        cached_tokens=fin.cached_prompt_tokens if fin else 0,
        output_tokens=len(out),
        ttft_ms=max(ttft, 0.0),
        latency_ms=latency,
        attempts=fin.attempts if fin else 0,
        ok=ok,
        error="" if ok else "no finish" if fin is None else "engine error",
    )
    return rec, out


async def run_sessions(
    addresses: list[str],
    sessions: list[Session],
    policy: str = "",
    concurrency: int = 16,
    on_request: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    client = AsyncClient(static_target(addresses), tls=False)
    result = RunResult(policy=policy)
    sem = asyncio.Semaphore(concurrency)

    async def one_session(s: Session) -> None:
        async with sem:
            history = list(s.system)
            for k, user in enumerate(s.user_turns):
                prompt = history + user
                rec, answer = await generate_once(
                    client,
                    prompt,
                    s.max_tokens,
                    policy=policy,
                    session_key=s.session_id,
                    request_id=f"{policy or 'req'}-{s.session_id}-t{k}",
                )
                rec.session_id, rec.turn = s.session_id, k
                result.records.append(rec)
                if on_request is not None:
                    on_request(rec)
                history = prompt + answer

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one_session(s) for s in sessions))
    finally:
        result.wall_s = time.perf_counter() - t0
        await client.close()
    return result
