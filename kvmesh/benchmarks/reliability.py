"""Reliability benchmark: faults and bad input caused on purpose, and what kvmesh did about each.

``kvmesh bench reliability`` writes docs/reliability.md: one row per fault or
input, the behaviour kvmesh promises for it (README, docs/architecture.md),
the tests that hold that promise, and what this run measured. Every scenario
runs real processes on loopback (``kvmesh.procs``: simulated engines and
router nodes started with ``--insecure``) with the nodes' default timings, so
the figures are what a default deployment does on this machine.

1. **Engine killed under load.** Three nodes, three engines at real timing;
   an open-loop client sends ``load_rps`` requests a second, round-robin over
   the nodes, for ``before_seconds``, SIGKILLs one engine and goes on for
   ``after_seconds``. Every call is counted by outcome, ``STATUS:reason``
   (the reason is the node's ``kvmesh-reason`` trailing metadata, ``-`` when
   no node sent one). A failure is as promised when the call had tokens from
   the killed engine and ended UNAVAILABLE ``engine_failed``: a request whose
   engine dies before its first token is retried elsewhere.
2. **Engine restarted.** The killed engine is started again on the same
   ports: a new process, an empty cache, batches numbered from 0 again. One
   request at a time goes through the mesh (continuations of the
   conversations the client was having); after each, every node's
   ``Admin.GetIndexDigest`` is compared with the engine's ``/admin/cache``
   (:mod:`kvmesh.probes`) until they match on every node, timed from the
   restart.
3. **Lost last batch.** On a quiet engine, ``POST /admin/drop_events
   {"count": 1}``, then one request straight to it that takes a single
   engine step: its one KV-event batch is lost on PUB and nothing follows to
   reveal the gap. Timed from that request's end until every node's index
   matches the engine again (the owner's replay probe,
   ``--replay-probe-after``); repeated ``lost_batch_repeats`` times.
4. **Router node killed under load.** The same load; the node owning the
   most engines is SIGKILLed. Calls on its connections fail at the client,
   which then leaves it out (as a round-robin balancer drops a failed
   backend); the survivors' calls are counted apart. Timed from the kill:
   every survivor lists it ``dead`` (``ListMembers``), its engines are owned
   by survivors, and, once a few more requests ran, every survivor's index
   matches every engine's cache (the stream resumed, nothing lost).
5. **Bad input.** ``bad_inputs`` random malformed Generate, Route and Admin
   calls against a live node, and random bytes on its mesh port; the node
   must answer each with a status that says why (never UNKNOWN or INTERNAL)
   and keep serving. The row also counts the examples the fuzz tests
   (tests/integration/test_fuzz.py) try per run, read from their settings.
6. **Churn soak.** One node, one engine with a small cache, a closed loop of
   distinct prompts (every request makes the engine evict) for
   ``soak_seconds`` after a warm-up that fills the cache: the node's RSS
   (VmRSS) and index entries at the start and the end.

Scenarios 1 to 4 share one fleet, in the order 1, 2, 3, 4 (2 restarts the
engine 1 killed; 4 kills a node, so it comes last); 5 and 6 share another
(6 first, so bad input does not disturb its memory baseline). A scenario
that fails to run leaves its row with the error and the others go on.

This module runs the scenarios and records what it saw; the figures, the
verdicts and the page are pure functions of that, in
:mod:`kvmesh.benchmarks.reliability_report`.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh import procs
from kvmesh.benchmarks.reliability_report import (
    CLAIMS,
    DESCRIBE,
    FUZZ_TESTS,
    REPO_ROOT,
    Call,
    bad_inputs_figures,
    engine_kill_figures,
    fuzz_examples,
    lost_batch_figures,
    missing_tests,
    router_kill_figures,
    soak_figures,
)
from kvmesh.client import ONE_NODE, aio_channel
from kvmesh.probes import Digest, index_digest, read_engine_digest
from kvmesh_pb.mesh.v1 import mesh_pb2 as mpb
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.config import RouterConfig
from router.errors import REASON_KEY

__all__ = ["QUICK", "ReliabilityConfig", "bad_generate_request", "quick", "restart_engine", "run_reliability"]


@dataclass(frozen=True)
class ReliabilityConfig:
    """The fleets, the load and each scenario's length (``kvmesh bench reliability`` starts here)."""

    engines: int = 3
    nodes: int = 3
    engine_blocks: int = 2000  # KV cache of each engine of the mesh, in blocks
    load_rps: float = 10.0  # open-loop arrivals per second, round-robin over the nodes
    before_seconds: float = 4.0  # load before the kill
    after_seconds: float = 6.0  # load after the kill
    conversations: int = 12  # shared prefixes the load's prompts continue
    prefix_tokens: int = 512
    suffix_tokens: tuple[int, int] = (32, 256)  # random tokens after the prefix (inclusive range)
    max_tokens: tuple[int, int] = (16, 64)  # output tokens (inclusive range), ignore_eos
    deadline_seconds: float = 30.0  # client deadline of every call
    settle_seconds: float = 30.0  # bound on every wait for the mesh (membership, takeover, convergence)
    restart_poll_seconds: float = 1.0  # after each request of the restart scenario, how long to look
    lost_batch_repeats: int = 5
    soak_seconds: float = 60.0
    soak_warmup_seconds: float = 5.0  # and until the engine has evicted
    soak_engine_blocks: int = 400
    soak_concurrency: int = 4
    soak_time_scale: float = 0.05  # a fast engine: the node, not the engine, sets the pace
    bad_inputs: int = 600  # random bad API calls (and a quarter as many on the mesh port)
    seed: int = 0


# What ``--quick`` changes: shorter windows and soak, fewer repeats and bad inputs.
QUICK: dict[str, Any] = {
    "before_seconds": 3.0,
    "after_seconds": 4.0,
    "lost_batch_repeats": 2,
    "soak_seconds": 10.0,
    "soak_warmup_seconds": 3.0,
    "bad_inputs": 200,
}


def quick(cfg: ReliabilityConfig) -> ReliabilityConfig:
    """``cfg`` with ``--quick``'s shorter runs."""
    return replace(cfg, **QUICK)


_WORDS = ("", " ", "\x00", "é" * 40, "🙂", "sim-model", "precise", "x" * 300, "../../etc/passwd", "%s%n")


def _bad_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_WORDS)
    return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF)))) for _ in range(20))


def _mutate(req: pb.GenerateRequest, rng: random.Random) -> None:
    """One fault in ``req``: a field out of range, of the wrong kind, or absent."""
    s = req.sampling
    faults: list[Callable[[], object]] = [
        lambda: req.ClearField("prompt"),
        lambda: req.prompt.token_ids.ClearField("ids"),
        lambda: req.prompt.token_ids.ids.extend(rng.choice((2**31, 2**32 - 1)) for _ in range(3)),
        lambda: req.prompt.token_ids.ids.extend(rng.randrange(256, 32000) for _ in range(200_000)),
        lambda: setattr(req.prompt, "text", _bad_text(rng)),
        lambda: setattr(s, "max_tokens", rng.choice((2**32 - 1, 10_000_000, 131_072))),
        lambda: setattr(s, "temperature", rng.choice((float("nan"), float("inf"), -1.0, 1e30))),
        lambda: setattr(s, "top_p", rng.choice((float("nan"), -0.5, 2.0, 0.0))),
        lambda: s.stop.extend(_bad_text(rng) for _ in range(rng.randint(1, 40))),
        lambda: setattr(req, "model", _bad_text(rng) or "no-such-model"),
        lambda: setattr(req, "policy", _bad_text(rng) or "no-such-policy"),
        lambda: setattr(req, "lora_name", _bad_text(rng) or "no-such-adapter"),
        lambda: setattr(req, "cache_salt", _bad_text(rng)),
        lambda: setattr(req, "request_id", _bad_text(rng)),
        lambda: setattr(req, "session_key", _bad_text(rng)),
    ]
    rng.choice(faults)()


def bad_generate_request(rng: random.Random) -> pb.GenerateRequest:
    """A small valid request with one to three faults (the same ``rng`` state, the same request)."""
    req = pb.GenerateRequest(
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[rng.randrange(256, 32000) for _ in range(48)])),
        sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
    )
    for _ in range(rng.randint(1, 3)):
        _mutate(req, rng)
    return req


def _bad_spec(rng: random.Random) -> pb.EngineSpec:
    """An engine spec with at least one bad field (an empty id, a URL that is none, a zero size)."""
    return pb.EngineSpec(
        engine_id=rng.choice(("", "bad", _bad_text(rng))),
        endpoint=rng.choice(("", "not a url", "ftp://x", "http://", _bad_text(rng))),
        model=_bad_text(rng),
        block_size=rng.choice((0, 2**32 - 1, 16)),
        kv_events_endpoint=rng.choice(("", "tcp://", "nonsense", _bad_text(rng))),
        data_parallel_size=rng.choice((0, 2**32 - 1, 1)),
    )


# -- processes ------------------------------------------------------------------


def _reason(e: grpc.aio.AioRpcError) -> str:
    for key, value in e.trailing_metadata() or ():
        if key == REASON_KEY:
            return str(value)
    return ""


def rss_kb(pid: int) -> int:
    """Resident set size of a process (VmRSS), in kB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _engine_args(host: str, http: int, kv: str, replay: str, extra: list[str]) -> list[str]:
    endpoints = ["--kv-events-endpoint", kv, "--kv-replay-endpoint", replay]
    return ["sim-engine", "--host", host, "--port", str(http), *endpoints, *extra]


def restart_engine(old: procs.Proc, extra: list[str]) -> procs.Proc:
    """A new simulated engine process on ``old``'s ports (``old`` is gone)."""
    host, _, port = old.info["url"].removeprefix("http://").rpartition(":")
    kv, replay = old.info["kv_endpoint"], old.info["replay_endpoint"]
    p = procs.start(old.name, _engine_args(host, int(port), kv, replay, extra))
    p.info.update(url=old.info["url"], kv_endpoint=kv, replay_endpoint=replay)
    return p


class _Prompts:
    """Continuations of ``conversations`` shared prefixes, with a random suffix and output length."""

    def __init__(self, cfg: ReliabilityConfig, seed: int) -> None:
        rng = random.Random(cfg.seed)
        self.cfg = cfg
        self.prefixes = [
            [rng.randrange(256, 32000) for _ in range(cfg.prefix_tokens)] for _ in range(cfg.conversations)
        ]
        self.rng = random.Random(seed)
        self.n = 0

    def next(self, tag: str, conversation: int | None = None) -> tuple[pb.GenerateRequest, int]:
        rng, cfg = self.rng, self.cfg
        conv = rng.randrange(len(self.prefixes)) if conversation is None else conversation
        suffix = [rng.randrange(256, 32000) for _ in range(rng.randint(*cfg.suffix_tokens))]
        self.n += 1
        req = pb.GenerateRequest(
            request_id=f"{tag}-{self.n}",
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=self.prefixes[conv] + suffix)),
            sampling=pb.SamplingParams(max_tokens=rng.randint(*cfg.max_tokens), ignore_eos=True),
        )
        return req, conv


class _Client:
    """Channels to the nodes; round-robin over the ones it has not seen fail.

    A call that fails UNAVAILABLE without a reason never reached a node
    (connection refused or reset): the node is left out from then on, as a
    client-side round-robin balancer drops a backend in transient failure."""

    def __init__(self, addrs: Sequence[str]) -> None:
        self.channels = [aio_channel(a, tls=False, config=ONE_NODE) for a in addrs]
        self.stubs = [pb_grpc.RouterStub(c) for c in self.channels]
        self.admins = [pb_grpc.AdminStub(c) for c in self.channels]
        self.down: set[int] = set()
        self._i = 0

    def next_node(self) -> int | None:
        for _ in range(len(self.stubs)):
            node = self._i % len(self.stubs)
            self._i += 1
            if node not in self.down:
                return node
        return None

    async def call(self, node: int, req: pb.GenerateRequest, t0: float, deadline: float, conv: int) -> Call:
        c = Call(node, time.perf_counter() - t0, conversation=conv)
        try:
            async for msg in self.stubs[node].Generate(req, timeout=deadline):
                kind = msg.WhichOneof("event")
                if kind == "routed":
                    c.engine, c.attempts = msg.routed.engine_id, msg.routed.attempt
                elif kind == "chunk":
                    c.tokens += len(msg.chunk.token_ids)
        except grpc.aio.AioRpcError as e:
            c.status, c.reason = e.code().name, _reason(e)
            if c.status == "UNAVAILABLE" and not c.reason:
                self.down.add(node)
        c.t_done = time.perf_counter() - t0
        return c

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


async def _open_loop(
    client: _Client, prompts: _Prompts, cfg: ReliabilityConfig, t0: float, tag: str
) -> list[Call]:
    """One call every 1/``load_rps`` s from ``t0`` for before + after seconds, whatever the answers."""
    n = int(cfg.load_rps * (cfg.before_seconds + cfg.after_seconds))
    tasks: list[asyncio.Task[Call]] = []
    for i in range(n):
        delay = t0 + i / cfg.load_rps - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        node = client.next_node()
        if node is None:
            break
        req, conv = prompts.next(tag)
        tasks.append(asyncio.create_task(client.call(node, req, t0, cfg.deadline_seconds, conv)))
    return list(await asyncio.gather(*tasks))


async def _under_load(
    client: _Client, prompts: _Prompts, cfg: ReliabilityConfig, tag: str, fault: Callable[[], None]
) -> tuple[list[Call], float]:
    """The open-loop load with ``fault`` done ``before_seconds`` in; the calls and the fault's time."""
    t0 = time.perf_counter()
    load = asyncio.create_task(_open_loop(client, prompts, cfg, t0, tag))
    await asyncio.sleep(max(0.0, t0 + cfg.before_seconds - time.perf_counter()))
    t_fault = time.perf_counter() - t0
    fault()
    return await load, t_fault


async def _digests_match(
    http: aiohttp.ClientSession, url: str, admins: Sequence[pb_grpc.AdminStub], engine_id: str
) -> bool:
    """Every node's index digest of ``engine_id`` equals the engine's cache,
    read before and after the nodes (so the engine did not move meanwhile)."""
    want = await read_engine_digest(http, url)
    for a in admins:
        if await index_digest(a, engine_id) != want:
            return False
    return await read_engine_digest(http, url) == want


async def _wait_match(
    http: aiohttp.ClientSession,
    engines: Mapping[str, str],
    admins: Sequence[pb_grpc.AdminStub],
    timeout: float,
    period: float = 0.02,
) -> bool:
    """Until every node's index matches every engine (id -> url) at once (True), or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if all([await _digests_match(http, u, admins, e) for e, u in engines.items()]):
                return True
        except (grpc.aio.AioRpcError, aiohttp.ClientError):
            pass
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(period)


async def _wait_idle(http: aiohttp.ClientSession, urls: Iterable[str], timeout: float) -> None:
    """Until no engine has a request running or waiting (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = 0
        for u in urls:
            async with http.get(f"{u}/admin/stats") as r:
                st = await r.json()
            busy += int(st["running"]) + int(st["waiting"])
        if not busy:
            return
        await asyncio.sleep(0.1)


async def _members(admin: pb_grpc.AdminStub) -> dict[str, pb.Member]:
    resp = await admin.ListMembers(pb.ListMembersRequest(), timeout=5.0)
    return {m.node_id: m for m in resp.members}


async def _wait_formed(admins: Sequence[pb_grpc.AdminStub], engine_ids: set[str], timeout: float) -> None:
    """Every node sees every member alive and every engine owned by one of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        good = 0
        for a in admins:
            try:
                ms = await _members(a)
            except grpc.aio.AioRpcError:
                continue
            owned = {e for m in ms.values() for e in m.owned_engines}
            good += (
                len(ms) == len(admins)
                and all(m.state == "alive" for m in ms.values())
                and owned == engine_ids
            )
        if good == len(admins):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the mesh did not form (every member alive, every engine owned) in time")


@dataclass
class _Mesh:
    """The fleet of scenarios 1-4: engines (id -> process) and router nodes."""

    cfg: ReliabilityConfig
    engines: dict[str, procs.Proc]
    nodes: list[procs.Proc]
    prompts: _Prompts = field(init=False)
    killed_engine: tuple[str, float] | None = None  # (id, monotonic time of the kill)
    served: Counter[tuple[str, int]] = field(default_factory=Counter)  # (engine, conversation) OK calls

    def __post_init__(self) -> None:
        self.prompts = _Prompts(self.cfg, self.cfg.seed + 1)

    def engine_extra(self, i: int) -> list[str]:
        return ["--seed", str(i), "--num-gpu-blocks", str(self.cfg.engine_blocks), "--log-level", "warning"]

    def urls(self) -> dict[str, str]:
        return {e: p.info["url"] for e, p in self.engines.items()}

    def stop(self) -> None:
        for p in [*self.nodes, *self.engines.values()]:
            p.stop()


def _start_mesh(cfg: ReliabilityConfig) -> _Mesh:
    mesh = _Mesh(cfg, {}, [])
    try:
        start = procs.start_sim_engine
        engines = [partial(start, f"rel-engine-{i}", mesh.engine_extra(i)) for i in range(cfg.engines)]
        mesh.engines.update((f"e{i}", p) for i, p in enumerate(procs.start_all(engines)))
        flags = [procs.engine_flag(e, p) for e, p in mesh.engines.items()]
        common = ["--log-level", "warning", "--seed", str(cfg.seed)]
        mesh.nodes.append(procs.start_router("rel-node-a", flags, common))
        join = [*common, "--join", mesh.nodes[0].info["grpc"]]
        mesh.nodes += procs.start_all(
            [partial(procs.start_router, f"rel-node-{chr(97 + j)}", [], join) for j in range(1, cfg.nodes)]
        )
        asyncio.run(_formed([p.info["grpc"] for p in mesh.nodes], set(mesh.engines), cfg.settle_seconds))
    except Exception:
        mesh.stop()
        raise
    return mesh


async def _formed(addrs: Sequence[str], engine_ids: set[str], timeout: float) -> None:
    client = _Client(addrs)
    try:
        await _wait_formed(client.admins, engine_ids, timeout)
    finally:
        await client.close()


# -- scenario 1: an engine killed under load -------------------------------------


async def _engine_kill(mesh: _Mesh) -> dict[str, Any]:
    cfg = mesh.cfg
    victim = sorted(mesh.engines)[-1]
    client = _Client([p.info["grpc"] for p in mesh.nodes])

    def kill() -> None:
        mesh.engines[victim].kill()
        mesh.killed_engine = (victim, time.monotonic())

    try:
        calls, t_kill = await _under_load(client, mesh.prompts, cfg, "engine-kill", kill)
    finally:
        await client.close()
    mesh.served.update((c.engine, c.conversation) for c in calls if c.status == "OK")
    figures = engine_kill_figures(calls, victim, t_kill)
    return figures | {
        "engine": victim,
        "load_rps": cfg.load_rps,
        "before_s": cfg.before_seconds,
        "window_s": cfg.before_seconds + cfg.after_seconds,
    }


# -- scenario 2: the killed engine started again ----------------------------------


async def _restart_requests(
    mesh: _Mesh, client: _Client, http: aiohttp.ClientSession, engine: str, t0: float
) -> dict[str, Any]:
    """One request at a time through the mesh until every node's index
    matches the restarted engine; the conversations it served before come
    first (its stale index entries draw them to it)."""
    cfg, url = mesh.cfg, mesh.engines[engine].info["url"]
    convs = [conv for (e, conv), _ in mesh.served.most_common() if e == engine] or [0]
    out: dict[str, Any] = {"requests": 0, "served_by_engine": 0, "first_served_s": None, "match_s": None}
    while time.perf_counter() - t0 < cfg.settle_seconds:
        node = client.next_node()
        if node is None:
            raise RuntimeError("the client saw every node fail")
        req, conv = mesh.prompts.next("restart", convs[out["requests"] % len(convs)])
        call = await client.call(node, req, t0, cfg.deadline_seconds, conv)
        out["requests"] += 1
        if call.status == "OK" and call.engine == engine:
            out["served_by_engine"] += 1
            if out["first_served_s"] is None:
                out["first_served_s"] = call.t_done
        look_until = time.perf_counter() + cfg.restart_poll_seconds
        while time.perf_counter() < look_until:
            if await _digests_match(http, url, client.admins, engine):
                out["match_s"] = time.perf_counter() - t0
                return out
            await asyncio.sleep(0.02)
    return out


async def _engine_restart(mesh: _Mesh) -> dict[str, Any]:
    if mesh.killed_engine is None:
        raise RuntimeError("no engine was killed (the engine-kill scenario did not run)")
    engine, killed_at = mesh.killed_engine
    i = sorted(mesh.engines).index(engine)
    mesh.engines[engine] = restart_engine(mesh.engines[engine], mesh.engine_extra(i))
    t0 = time.perf_counter()
    down_s = time.monotonic() - killed_at
    client = _Client([p.info["grpc"] for p in mesh.nodes])
    try:
        async with aiohttp.ClientSession() as http:
            new = await read_engine_digest(http, mesh.engines[engine].info["url"])
            held: list[Digest | None] = [await index_digest(a, engine) for a in client.admins]
            before = await _engine_status(client.admins, engine)
            out = await _restart_requests(mesh, client, http, engine, t0)
            after = await _engine_status(client.admins, engine)
    finally:
        await client.close()
    return out | {
        "engine": engine,
        "down_s": down_s,
        "stale_blocks": max((d[0] for d in held if d is not None), default=0),
        "engine_blocks_at_restart": new[0],
        "resets": after.resets - before.resets,
        "as_promised": out["match_s"] is not None,
    }


# -- scenario 3: a lost last batch --------------------------------------------------


async def _engine_status(admins: Sequence[pb_grpc.AdminStub], engine: str) -> pb.EngineStatus:
    """The engine's status as its owner reports it (the owner runs its adapter)."""
    resp = await admins[0].ListEngines(pb.ListEnginesRequest())
    owner = next(e.owner_node for e in resp.engines if e.spec.engine_id == engine)
    for a in admins:
        st = await a.GetStats(pb.GetStatsRequest())
        if st.node_id == owner:
            resp = await a.ListEngines(pb.ListEnginesRequest())
            return next(e for e in resp.engines if e.spec.engine_id == engine)
    raise RuntimeError(f"the owner of {engine}, {owner!r}, is not one of the nodes")


async def _next_seq(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/admin/stats") as r:
        return int((await r.json())["next_seq"])


async def _lose_last_batch(
    http: aiohttp.ClientSession,
    url: str,
    admins: Sequence[pb_grpc.AdminStub],
    engine: str,
    rng: random.Random,
    timeout: float,
) -> tuple[float | None, int, int]:
    """One repeat: (seconds until every node matched, batches lost, batches the probes found)."""
    before = await _engine_status(admins, engine)
    first = await _next_seq(http, url)
    async with http.post(f"{url}/admin/drop_events", json={"count": 1}) as r:
        r.raise_for_status()
    body = {
        "model": procs.SIM_MODEL,
        "prompt": [rng.randrange(256, 32000) for _ in range(160)],
        "max_tokens": 1,
    }
    async with http.post(f"{url}/v1/completions", json=body) as r:
        await r.read()
    t0 = time.perf_counter()
    matched = await _wait_match(http, {engine: url}, admins, timeout)
    took = time.perf_counter() - t0 if matched else None
    after = await _engine_status(admins, engine)
    return took, await _next_seq(http, url) - first, after.probe_batches - before.probe_batches


async def _lost_batch(mesh: _Mesh) -> dict[str, Any]:
    cfg = mesh.cfg
    engine = sorted(mesh.engines)[0]
    url = mesh.engines[engine].info["url"]
    adapter_cfg = RouterConfig().event_adapter
    probe_after = adapter_cfg.replay_probe_after
    # The owner notices the quiet within a probe period, asks, waits up to a
    # replay timeout; gossip then reaches the other nodes within a second.
    bound = probe_after + adapter_cfg.replay_timeout + 1.0
    client = _Client([p.info["grpc"] for p in mesh.nodes])
    rng = random.Random(cfg.seed + 3)
    took: list[float | None] = []
    lost: list[int] = []
    probed: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            await _wait_idle(http, mesh.urls().values(), cfg.settle_seconds)
            for _ in range(cfg.lost_batch_repeats):
                if not await _wait_match(http, {engine: url}, client.admins, cfg.settle_seconds):
                    raise RuntimeError(f"the nodes' indexes of {engine} never matched it before the loss")
                t, n, p = await _lose_last_batch(http, url, client.admins, engine, rng, cfg.settle_seconds)
                took.append(t)
                lost.append(n)
                probed.append(p)
    finally:
        await client.close()
    return lost_batch_figures(took, lost, probed, bound) | {"engine": engine, "probe_after_s": probe_after}


# -- scenario 4: a router node killed under load -------------------------------------


@dataclass
class _Watch:
    """When each survivor first saw the victim suspect and dead, and its engines owned by others."""

    victim: str
    engines: set[str]
    survivors: int
    suspect: dict[int, float] = field(default_factory=dict)
    dead: dict[int, float] = field(default_factory=dict)
    owned: dict[int, float] = field(default_factory=dict)

    def see(self, i: int, members: Mapping[str, pb.Member], now: float) -> None:
        v = members.get(self.victim)
        if v is not None and v.state in ("suspect", "dead"):
            self.suspect.setdefault(i, now)
        if v is not None and v.state == "dead":
            self.dead.setdefault(i, now)
        others = {e for m in members.values() if m.node_id != self.victim for e in m.owned_engines}
        if self.engines <= others:
            self.owned.setdefault(i, now)

    def done(self) -> bool:
        return len(self.dead) == len(self.owned) == self.survivors

    def last(self, seen: Mapping[int, float], t_kill: float) -> float | None:
        return max(seen.values()) - t_kill if len(seen) == self.survivors else None


async def _watch(admins: Sequence[pb_grpc.AdminStub], w: _Watch, t0: float, until: float) -> None:
    while not w.done() and time.perf_counter() - t0 < until:
        for i, a in enumerate(admins):
            try:
                w.see(i, await _members(a), time.perf_counter() - t0)
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.05)


async def _after_takeover(mesh: _Mesh, survivors: _Client, t_kill_abs: float) -> float | None:
    """A few requests through the survivors, then the time (from the kill)
    until every survivor's index matches every engine."""
    for _ in range(2 * len(mesh.engines)):
        node = survivors.next_node()
        if node is None:
            raise RuntimeError("the client saw every survivor fail")
        req, conv = mesh.prompts.next("after-takeover")
        await survivors.call(node, req, time.perf_counter(), mesh.cfg.deadline_seconds, conv)
    async with aiohttp.ClientSession() as http:
        await _wait_idle(http, mesh.urls().values(), mesh.cfg.settle_seconds)
        if await _wait_match(http, mesh.urls(), survivors.admins, mesh.cfg.settle_seconds):
            return time.perf_counter() - t_kill_abs
    return None


async def _router_kill(mesh: _Mesh) -> dict[str, Any]:
    cfg = mesh.cfg
    client = _Client([p.info["grpc"] for p in mesh.nodes])
    try:
        members = await _members(client.admins[0])
        ids = [p.info["node"] for p in mesh.nodes]
        k = max(range(len(ids)), key=lambda j: (len(members[ids[j]].owned_engines), j))
        victim_engines = set(members[ids[k]].owned_engines)
        w = _Watch(ids[k], victim_engines, len(ids) - 1)
        survivor_admins = [a for j, a in enumerate(client.admins) if j != k]
        t0 = time.perf_counter()
        watcher = asyncio.create_task(_watch(survivor_admins, w, t0, cfg.before_seconds + cfg.settle_seconds))
        calls, t_kill = await _under_load(client, mesh.prompts, cfg, "router-kill", mesh.nodes[k].kill)
        await watcher
        survivors = _Client([p.info["grpc"] for j, p in enumerate(mesh.nodes) if j != k])
        try:
            match_s = await _after_takeover(mesh, survivors, t0 + t_kill)
        finally:
            await survivors.close()
    finally:
        await client.close()
    figures = router_kill_figures(calls, k, t_kill)
    dead_s, takeover_s = w.last(w.dead, t_kill), w.last(w.owned, t_kill)
    return figures | {
        "victim": ids[k],
        "victim_engines": sorted(victim_engines),
        "load_rps": cfg.load_rps,
        "before_s": cfg.before_seconds,
        "suspect_s": w.last(w.suspect, t_kill),
        "dead_s": dead_s,
        "takeover_s": takeover_s,
        "match_s": match_s,
        "as_promised": figures["survivors_failed"] == 0 and None not in (dead_s, takeover_s, match_s),
    }


# -- scenarios 5 and 6: one node, one small engine ------------------------------------


async def _soak_clients(
    stub: pb_grpc.RouterStub, cfg: ReliabilityConfig, stop: asyncio.Event, done: Counter[str]
) -> None:
    rng = random.Random(cfg.seed + 6)

    async def one() -> None:
        while not stop.is_set():
            ids = [rng.randrange(256, 32000) for _ in range(rng.randint(256, 512))]
            req = pb.GenerateRequest(
                prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)),
                sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
            )
            try:
                async for _ in stub.Generate(req, timeout=cfg.deadline_seconds):
                    pass
                done["OK"] += 1
            except grpc.aio.AioRpcError as e:
                done[f"{e.code().name}:{_reason(e) or '-'}"] += 1

    await asyncio.gather(*(one() for _ in range(cfg.soak_concurrency)))


async def _evictions(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/admin/stats") as r:
        return int((await r.json())["evictions"])


async def _soak(cfg: ReliabilityConfig, node: procs.Proc, engine: procs.Proc) -> dict[str, Any]:
    url, pid = engine.info["url"], node.popen.pid
    stop, done = asyncio.Event(), Counter[str]()
    async with (
        aio_channel(node.info["grpc"], tls=False, config=ONE_NODE) as ch,
        aiohttp.ClientSession() as http,
    ):
        stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
        clients = asyncio.create_task(_soak_clients(stub, cfg, stop, done))
        t_warm = time.monotonic()
        await asyncio.sleep(cfg.soak_warmup_seconds)
        while await _evictions(http, url) == 0 and time.monotonic() - t_warm < cfg.settle_seconds:
            await asyncio.sleep(0.2)
        warmup_s = time.monotonic() - t_warm
        ev0, n0 = await _evictions(http, url), sum(done.values())
        entries0 = (await admin.GetStats(pb.GetStatsRequest())).index_entries
        rss, times = [rss_kb(pid)], [0.0]
        t0 = time.monotonic()
        while time.monotonic() - t0 < cfg.soak_seconds:
            await asyncio.sleep(min(1.0, max(0.0, t0 + cfg.soak_seconds - time.monotonic())))
            rss.append(rss_kb(pid))
            times.append(time.monotonic() - t0)
        entries1 = (await admin.GetStats(pb.GetStatsRequest())).index_entries
        ev1, n1 = await _evictions(http, url), sum(done.values())
        stop.set()
        await clients
    failed = sum(v for k, v in done.items() if k != "OK")
    return soak_figures(rss, times, (entries0, entries1), cfg.soak_engine_blocks) | {
        "seconds": cfg.soak_seconds,
        "warmup_s": warmup_s,
        "requests": n1 - n0,
        "failed": failed,
        "outcomes": dict(done),
        "evictions": ev1 - ev0,
    }


def _code(e: grpc.aio.AioRpcError) -> str:
    return f"{e.code().name}:{_reason(e)}" if _reason(e) else e.code().name


async def _api_call(
    stub: pb_grpc.RouterStub, admin: pb_grpc.AdminStub, rng: random.Random, known: set[str]
) -> str:
    """One random bad call; its status (with the node's reason when it gave one)."""
    kind = rng.random()
    try:
        if kind < 0.6:
            async for _ in stub.Generate(bad_generate_request(rng), timeout=10.0):
                pass
        elif kind < 0.8:
            g = bad_generate_request(rng)
            route = pb.RouteRequest(
                request_id=g.request_id,
                model=g.model,
                prompt=g.prompt,
                policy=g.policy,
                lora_name=g.lora_name,
                dry_run=rng.random() < 0.5,
            )
            await stub.Route(route, timeout=10.0)
        elif kind < 0.9:
            resp = await admin.RegisterEngine(pb.RegisterEngineRequest(spec=_bad_spec(rng)), timeout=10.0)
            if resp.status.spec.engine_id not in known:  # accepted after all: undo it
                await admin.DeregisterEngine(pb.DeregisterEngineRequest(engine_id=resp.status.spec.engine_id))
            return "OK (registered, then removed)"
        elif kind < 0.95:
            await admin.DeregisterEngine(
                pb.DeregisterEngineRequest(engine_id=_bad_text(rng) + "?"), timeout=10.0
            )
        else:
            await admin.GetIndexDigest(pb.GetIndexDigestRequest(engine_id=_bad_text(rng) + "?"), timeout=10.0)
    except grpc.aio.AioRpcError as e:
        return _code(e)
    return "OK"


async def _mesh_garbage(ch: grpc.aio.Channel, rng: random.Random) -> str:
    deliver = ch.unary_unary(
        "/kvmesh.mesh.v1.Mesh/Deliver",
        request_serializer=lambda b: b,
        response_deserializer=mpb.DeliverReply.FromString,
    )
    raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2048)))
    try:
        reply = await deliver(raw, timeout=10.0)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return f"OK ({reply.rejected} rejected)" if reply.rejected else "OK"


async def _after_bad_input(node: procs.Proc, ch: grpc.aio.Channel) -> dict[str, Any]:
    """Is the node alive and serving, and did bad input leave anything behind?"""
    health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
    stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
    good = pb.GenerateRequest(
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=list(range(300, 364)))),
        sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
    )
    try:
        async for _ in stub.Generate(good, timeout=10.0):
            pass
        good_status = "OK"
    except grpc.aio.AioRpcError as e:
        good_status = _code(e)
    st = await admin.GetStats(pb.GetStatsRequest())
    return {
        "alive": node.popen.poll() is None,
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
        "good_request": good_status,
        "in_flight": st.in_flight,
        "node_unclear_outcomes": {
            k: v for k, v in st.outcomes.items() if k.startswith(("UNKNOWN", "INTERNAL"))
        },
    }


async def _bad_inputs(cfg: ReliabilityConfig, node: procs.Proc) -> dict[str, Any]:
    rng = random.Random(cfg.seed + 5)
    async with aio_channel(node.info["grpc"], tls=False, config=ONE_NODE) as ch:
        stub, admin = pb_grpc.RouterStub(ch), pb_grpc.AdminStub(ch)
        engines0 = sorted(
            e.spec.engine_id for e in (await admin.ListEngines(pb.ListEnginesRequest())).engines
        )
        api = Counter([await _api_call(stub, admin, rng, set(engines0)) for _ in range(cfg.bad_inputs)])
        mesh = Counter([await _mesh_garbage(ch, rng) for _ in range(max(1, cfg.bad_inputs // 4))])
        after = await _after_bad_input(node, ch)
        engines1 = sorted(
            e.spec.engine_id for e in (await admin.ListEngines(pb.ListEnginesRequest())).engines
        )
    fuzz = fuzz_examples((REPO_ROOT / FUZZ_TESTS).read_text())
    return bad_inputs_figures(
        dict(api.most_common()), dict(mesh.most_common()), after, engines0 == engines1, fuzz
    )


# -- running it all ------------------------------------------------------------------


def _attempt(
    name: str, fn: Callable[[], dict[str, Any]], out: dict[str, Any], note: Callable[[str], None]
) -> None:
    """Run one scenario into ``out[name]``; a failure is recorded there, and the run goes on."""
    t = time.monotonic()
    note(f"reliability: {name} ...")
    try:
        out[name] = fn()
        verdict = "as promised" if out[name]["as_promised"] else "NOT as promised"
        note(f"reliability: {name}: {verdict} ({time.monotonic() - t:.0f} s): {DESCRIBE[name](out[name])}")
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
        note(f"reliability: {name} FAILED: {out[name]['error']}")


def _mesh_scenarios(cfg: ReliabilityConfig, out: dict[str, Any], note: Callable[[str], None]) -> None:
    try:
        mesh = _start_mesh(cfg)
    except Exception as e:
        for k in ("engine_kill", "engine_restart", "lost_batch", "router_kill"):
            out[k] = {"error": f"the mesh did not start: {type(e).__name__}: {e}"}
        note(f"reliability: the mesh did not start: {e}")
        return
    try:
        _attempt("engine_kill", lambda: asyncio.run(_engine_kill(mesh)), out, note)
        _attempt("engine_restart", lambda: asyncio.run(_engine_restart(mesh)), out, note)
        _attempt("lost_batch", lambda: asyncio.run(_lost_batch(mesh)), out, note)
        _attempt("router_kill", lambda: asyncio.run(_router_kill(mesh)), out, note)
    finally:
        mesh.stop()


def _single_node_scenarios(cfg: ReliabilityConfig, out: dict[str, Any], note: Callable[[str], None]) -> None:
    extra = ["--num-gpu-blocks", str(cfg.soak_engine_blocks), "--time-scale", str(cfg.soak_time_scale)]
    engine = procs.start_sim_engine("rel-soak-engine", [*extra, "--log-level", "warning"])
    try:
        common = ["--log-level", "warning", "--seed", str(cfg.seed)]
        node = procs.start_router("rel-soak-node", [procs.engine_flag("e0", engine)], common)
    except Exception:
        engine.stop()
        raise
    try:
        _attempt("soak", lambda: asyncio.run(_soak(cfg, node, engine)), out, note)
        _attempt("bad_inputs", lambda: asyncio.run(_bad_inputs(cfg, node)), out, note)
    finally:
        node.stop()
        engine.stop()


def run_reliability(cfg: ReliabilityConfig, note: Callable[[str], None] = print) -> dict[str, Any]:
    """Every scenario; the results dict (``config``, ``scenarios``, ``missing_tests``, ``duration_s``)."""
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    scenarios: dict[str, Any] = {}
    _mesh_scenarios(cfg, scenarios, note)
    try:
        _single_node_scenarios(cfg, scenarios, note)
    except Exception as e:
        for k in ("soak", "bad_inputs"):
            scenarios[k] = {"error": f"the node did not start: {type(e).__name__}: {e}"}
    return {
        "config": asdict(cfg),
        "started": started,
        "scenarios": scenarios,
        "missing_tests": missing_tests(t for c in CLAIMS for t in c.tests),
        "duration_s": time.monotonic() - t0,
    }
