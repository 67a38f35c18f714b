"""Drive an open-loop workload through one system and record every request.

A *target* sends one request and reports what the client saw: kvmesh router
nodes over gRPC ``Generate``, or SGLang's router over HTTP ``/generate``
(SGLang's native API; its cache-aware policy routes on the prompt's token
ids). With several router replicas, each request goes to the next replica in
turn (what a DNS or L4 load balancer does: it knows nothing of prompts). TTFT
is client-side (send -> first token) for both, so they are compared like for
like.

Failed requests count: in the hit rate as misses (their prompt tokens are in
the denominator, none cached), in the ideals as requests sent, and in
``ttft_p90_all_ms`` (the SLO's figure) as slower than any answer, so a system
cannot look better by failing requests.

While the run lasts, a sampler polls every engine's ``/admin/stats``
(running + waiting requests) to measure load imbalance the same way for
every system.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp
import grpc

from blocks.hashing import DEFAULT_BLOCK_SIZE
from kvmesh.benchmarks.goodput import QUANTILE
from kvmesh.benchmarks.ideals import ideals
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.loadgen import generate_once
from kvmesh.stats import percentile
from kvmesh.workloads import BenchSession, Workload
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc


class Reply(NamedTuple):
    """What the client saw of one request, whatever the target."""

    ok: bool
    engine_id: str  # "" when the target does not say (SGLang)
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float
    output: list[int]
    error: str


@dataclass(slots=True)
class Rec:
    session_id: str
    turn: int
    t_send: float  # seconds since the run's start
    t_done: float
    ok: bool
    engine_id: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_ms: float
    latency_ms: float
    error: str = ""
    prompt: list[int] = field(default_factory=list, repr=False)
    output: list[int] = field(default_factory=list, repr=False)


class GrpcTarget:
    """kvmesh router node(s); ``policy`` '' = each node's default."""

    def __init__(self, addresses: list[str], policy: str = "") -> None:
        self.addresses = addresses
        self.policy = policy
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pb_grpc.RouterStub] = []
        self._next = 0

    async def open(self) -> None:
        self._channels = [aio_channel(a, tls=False, config=ONE_NODE) for a in self.addresses]
        self._stubs = [pb_grpc.RouterStub(c) for c in self._channels]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def generate(self, prompt: list[int], max_tokens: int, session_id: str, rid: str) -> Reply:
        stub = self._stubs[self._next % len(self._stubs)]
        self._next += 1
        rec, out = await generate_once(
            stub,
            prompt,
            max_tokens,
            policy=self.policy,
            session_key=session_id,
            request_id=rid,
            timeout=300.0,
        )
        return Reply(rec.ok, rec.engine_id, rec.prompt_tokens, rec.cached_tokens, rec.ttft_ms, out, rec.error)


class SglangTarget:
    """SGLang's router (sglang-router) in front of the same engines: one
    instance, or several independent ones taking requests in turn."""

    def __init__(self, urls: str | list[str], quickack: bool = False) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        # Acknowledge every segment at once (TCP_QUICKACK) instead of
        # delaying the ACK: shows what a sender's Nagle costs this client.
        self.quickack = quickack
        self._next = 0
        self._http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def generate(self, prompt: list[int], max_tokens: int, session_id: str, rid: str) -> Reply:
        assert self._http is not None
        body = {
            "input_ids": prompt,
            "stream": True,
            "rid": rid,
            "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True},
        }
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        t0 = time.perf_counter()
        ttft = -1.0
        out: list[int] = []
        meta: dict = {}
        try:
            async with self._http.post(f"{url}/generate", json=body) as r:
                if r.status != 200:
                    return Reply(
                        False, "", len(prompt), 0, 0.0, out, f"HTTP {r.status}: {(await r.text())[:200]}"
                    )
                if self.quickack and r.connection is not None and r.connection.transport is not None:
                    sock = r.connection.transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    obj = json.loads(data)
                    ids = obj.get("output_ids") or []
                    if ids and ttft < 0:
                        ttft = (time.perf_counter() - t0) * 1000.0
                    out = list(ids)  # SGLang streams cumulative output
                    meta = obj.get("meta_info") or {}
        except (TimeoutError, aiohttp.ClientError) as e:
            return Reply(False, "", len(prompt), 0, 0.0, out, f"{type(e).__name__}: {e}")
        ok = bool(meta.get("finish_reason"))
        return Reply(
            ok,
            "",
            int(meta.get("prompt_tokens", len(prompt))),
            int(meta.get("cached_tokens", 0)),
            max(ttft, 0.0),
            out,
            "" if ok else "stream ended without a finish",
        )


class LoadSampler:
    """Time-averaged in-flight (running + waiting) per engine, from /admin/stats."""

    PERIOD_S = 0.25

    def __init__(self, engine_urls: list[str], period: float = PERIOD_S) -> None:
        self.urls = engine_urls
        self.period = period
        self.sums = [0.0] * len(engine_urls)
        self.peak = [0] * len(engine_urls)
        self.samples = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while not self._stop.is_set():
                got = await asyncio.gather(*(self._one(http, u) for u in self.urls))
                vals = [v for v in got if v is not None]
                if len(vals) == len(got):  # a sample counts only if every engine answered
                    for i, v in enumerate(vals):
                        self.sums[i] += v
                        self.peak[i] = max(self.peak[i], v)
                    self.samples += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), self.period)
                except TimeoutError:
                    pass

    async def _one(self, http: aiohttp.ClientSession, url: str) -> int | None:
        try:
            async with http.get(f"{url}/admin/stats") as r:
                st = await r.json()
            return int(st["running"]) + int(st["waiting"])
        except (TimeoutError, aiohttp.ClientError, KeyError, ValueError):
            return None

    def stop(self) -> None:
        self._stop.set()

    def imbalance(self) -> float:
        """max / mean of the engines' time-averaged in-flight requests (1 = even)."""
        if not self.samples:
            return 0.0
        avg = [s / self.samples for s in self.sums]
        m = statistics.fmean(avg)
        return max(avg) / m if m > 0 else 0.0


async def run_workload(
    target: GrpcTarget | SglangTarget,
    workload: Workload,
    engine_urls: list[str],
    on_done: Callable[[Rec], None] | None = None,
    deadline_s: float = 600.0,
) -> tuple[list[Rec], float, LoadSampler]:
    """Run every session open loop; returns (records, wall seconds, sampler)."""
    await target.open()
    sampler = LoadSampler(engine_urls)
    records: list[Rec] = []
    t0 = time.perf_counter()

    async def session(s: BenchSession) -> None:
        delay = s.start_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        history = list(s.system)
        for k, user in enumerate(s.user_turns):
            prompt = history + user if s.append_answers else s.system + user
            ts = time.perf_counter() - t0
            ok, eid, ptok, cached, ttft, out, err = await target.generate(
                prompt, s.max_tokens[k], s.session_id, f"{workload.name}-{s.session_id}-t{k}"
            )
            td = time.perf_counter() - t0
            r = Rec(
                s.session_id,
                k,
                ts,
                td,
                ok,
                eid,
                ptok,
                cached,
                len(out),
                ttft,
                (td - ts) * 1000.0,
                err,
                prompt,
                out,
            )
            records.append(r)
            if on_done is not None:
                on_done(r)
            if not ok:
                return  # the conversation cannot go on without its answer
            history = prompt + out
            if s.think_s > 0 and k + 1 < len(s.user_turns):
                await asyncio.sleep(s.think_s)

    samp = asyncio.create_task(sampler.run())
    try:
        await asyncio.wait_for(asyncio.gather(*(session(s) for s in workload.sessions)), deadline_s)
    finally:
        wall = time.perf_counter() - t0
        sampler.stop()
        await samp
        await target.close()
    return records, wall, sampler


def ttft_p90_all(records: list[Rec]) -> float | None:
    """TTFT p90 over every request sent, a failed one counting as slower than
    any answer: the smallest TTFT within which at least 90% of them were
    answered (so it is at most an SLO exactly when :func:`within_slo` is at
    least 0.9); None when the failures alone reach the slowest 10%."""
    if not records:
        return None
    ok = sorted(r.ttft_ms for r in records if r.ok)
    i = math.ceil(QUANTILE * len(records) - 1e-9) - 1
    return ok[max(0, i)] if i < len(ok) else None


def within_slo(records: list[Rec], slo_ms: float) -> float:
    """The share of the requests sent answered with a first token within ``slo_ms``."""
    if not records:
        return 0.0
    return sum(1 for r in records if r.ok and r.ttft_ms <= slo_ms) / len(records)


def summarize(
    records: list[Rec],
    wall_s: float,
    sampler: LoadSampler | None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    capacity_blocks: int = 0,
    slo_ms: float | None = None,
) -> dict:
    """Every per-system figure of the routing benchmark. ``capacity_blocks``:
    the fleet's cache blocks in all, for the pooled ideals; ``slo_ms``: the
    TTFT SLO whose ``within_slo`` share is reported."""
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens if r.ok else len(r.prompt) for r in records)
    cached = sum(r.cached_tokens for r in ok)
    ttft = [r.ttft_ms for r in ok]
    lat = [r.latency_ms for r in ok]
    span = (max(r.t_done for r in ok) - min(r.t_send for r in ok)) if ok else wall_s
    order = sorted(records, key=lambda r: r.t_send)
    per_engine: dict[str, int] = {}
    for r in ok:
        if r.engine_id:
            per_engine[r.engine_id] = per_engine.get(r.engine_id, 0) + 1
    best = ideals([(r.prompt, r.output if r.ok else []) for r in order], capacity_blocks, block_size)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "hit_rate": cached / prompt if prompt else 0.0,
        **best.as_dict(),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "ttft_p90_all_ms": ttft_p90_all(records),
        **({"slo_ms": slo_ms, "within_slo": within_slo(records, slo_ms)} if slo_ms is not None else {}),
        "latency_p50_ms": percentile(lat, 50),
        "latency_p90_ms": percentile(lat, 90),
        "latency_p99_ms": percentile(lat, 99),
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "output_tps": sum(r.output_tokens for r in ok) / span if span > 0 else 0.0,
        "imbalance_inflight": sampler.imbalance() if sampler else 0.0,
        "peak_inflight": max(sampler.peak) if sampler else 0,
        "requests_by_engine": per_engine,
        "wall_s": wall_s,
        "errors": sorted({r.error for r in records if not r.ok})[:5],
    }
