"""Routing benchmark: every system in front of the SAME simulated engines.

Systems: kvmesh with each policy on one router node, kvmesh ``precise`` on a
3-node mesh (requests spread over the nodes), and SGLang's router
(``sglang-router``, Rust) with its ``cache_aware`` and ``round_robin``
policies. Each system gets a fresh router process (no routing memory carried
over) and, before each workload, every engine's cache is cleared
(``POST /admin/clear``) and the router's index is seen empty, so each run
starts cold. Engines run at ``--time-scale 1`` (a real A100's timing, see
``engine_adapters/sim_engine/timing.py``) with the same ``--seed``, so an
engine's answer depends only on the prompt: every system sees the same
conversations.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import grpc

from blocks.hashing import DEFAULT_BLOCK_SIZE
from kvmesh import procs
from kvmesh.benchmarks.driver import GrpcTarget, Rec, SglangTarget, run_workload, summarize
from kvmesh.probes import wait_mesh
from kvmesh.stats import percentile
from kvmesh.workloads import Workload
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.policies import POLICY_NAMES

KVMESH_POLICIES = list(POLICY_NAMES)
SYSTEMS = KVMESH_POLICIES + ["precise_mesh3", "sglang_cache_aware", "sglang_round_robin"]


@dataclass
class FleetConfig:
    """The engines every system is measured in front of (``kvmesh bench``'s flags start here)."""

    engines: int = 8
    num_gpu_blocks: int = 4000  # KV cache of each engine, in blocks
    time_scale: float = 1.0
    seed: int = 7
    block_size: int = DEFAULT_BLOCK_SIZE
    # Extra `kvmesh router` flags, e.g. ("--policy-opt", "precise.overlap_weight=2").
    router_args: tuple[str, ...] = ()

    @property
    def prefill_tokens_per_s(self) -> float:
        """The fleet's prefill capacity (timing model: 0.1 ms per uncached token)."""
        return self.engines * 10_000.0 / self.time_scale


@dataclass
class System:
    name: str
    procs: list[procs.Proc] = field(default_factory=list)
    grpc_addrs: list[str] = field(default_factory=list)
    http_url: str = ""
    sgl_popen: subprocess.Popen | None = None

    def target(self) -> GrpcTarget | SglangTarget:
        return SglangTarget(self.http_url) if self.http_url else GrpcTarget(self.grpc_addrs)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        if self.sgl_popen is not None and self.sgl_popen.poll() is None:
            self.sgl_popen.terminate()
            try:
                self.sgl_popen.wait(10)
            except subprocess.TimeoutExpired:
                self.sgl_popen.kill()
                self.sgl_popen.wait(5)


def local_tokenizer_dir() -> str:
    """A directory with a small tokenizer.json, reported by the engines as
    their model path: SGLang's router loads its tokenizer from there instead
    of asking the Hugging Face hub (which this machine must never contact)."""
    import tempfile

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    d = os.path.join(tempfile.gettempdir(), "kvmesh-bench-tokenizer")
    os.makedirs(d, exist_ok=True)
    if not os.path.exists(os.path.join(d, "tokenizer.json")):
        tok = Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
        tok.pre_tokenizer = Whitespace()
        tok.save(os.path.join(d, "tokenizer.json"))
    return d


def start_engines(cfg: FleetConfig) -> list[procs.Proc]:
    engines = []
    model_path = local_tokenizer_dir()
    try:
        for i in range(cfg.engines):
            engines.append(
                procs.start_sim_engine(
                    f"engine-{i}",
                    [
                        "--num-gpu-blocks",
                        str(cfg.num_gpu_blocks),
                        "--time-scale",
                        str(cfg.time_scale),
                        "--seed",
                        str(cfg.seed),
                        "--kv-buffer-steps",
                        "2000",
                        "--log-level",
                        "warning",
                        "--block-size",
                        str(cfg.block_size),
                        "--model-path",
                        model_path,
                    ],
                )
            )
    except Exception:
        for e in engines:
            e.stop()
        raise
    return engines


def _flags(engines: list[procs.Proc], block_size: int) -> list[str]:
    return [procs.engine_flag(f"e{i}", p, block_size=block_size) for i, p in enumerate(engines)]


def start_system(name: str, engines: list[procs.Proc], cfg: FleetConfig) -> System:
    flags = _flags(engines, cfg.block_size)
    common = ["--log-level", "warning", "--seed", str(cfg.seed), *cfg.router_args]
    if name in KVMESH_POLICIES:
        p = procs.start_router(f"router-{name}", flags, ["--policy", name, *common])
        return System(name, [p], [p.info["grpc"]])
    if name == "precise_mesh3":
        first = procs.start_router("mesh-a", flags, ["--policy", "precise", *common])
        sysm = System(name, [first], [first.info["grpc"]])
        try:
            for n in ("mesh-b", "mesh-c"):
                p = procs.start_router(n, [], ["--policy", "precise", "--join", first.info["grpc"], *common])
                sysm.procs.append(p)
                sysm.grpc_addrs.append(p.info["grpc"])
            asyncio.run(wait_mesh(sysm.grpc_addrs, len(engines)))
        except Exception:
            sysm.stop()
            raise
        return sysm
    if name.startswith("sglang_"):
        return _start_sglang(name, name.removeprefix("sglang_"), engines)
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")


def sglang_available() -> str | None:
    """None if sglang-router is importable, else why not."""
    try:
        import sglang_router  # noqa: F401  # imported only to see whether it is installed
    except ImportError as e:
        return f"sglang-router not installed ({e}); pip install -e '.[peers]'"
    return None


def _start_sglang(name: str, policy: str, engines: list[procs.Proc], timeout: float = 60.0) -> System:
    why = sglang_available()
    if why:
        raise RuntimeError(why)
    port = procs.free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *[p.info["url"] for p in engines],
        "--policy",
        policy,
        "--log-level",
        "warn",
        "--prometheus-port",
        str(procs.free_port()),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    popen = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    sysm = System(name, http_url=f"http://127.0.0.1:{port}", sgl_popen=popen)
    try:
        asyncio.run(_wait_sglang(sysm.http_url, len(engines), popen, timeout))
    except Exception:
        sysm.stop()
        raise
    return sysm


async def _wait_sglang(url: str, n: int, popen: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise RuntimeError(f"sglang-router exited with {popen.returncode}")
            try:
                async with http.get(f"{url}/workers") as r:
                    if r.status == 200:
                        body = await r.json()
                        ws = body.get("workers", body) if isinstance(body, dict) else body
                        healthy = [w for w in ws if isinstance(w, dict) and w.get("is_healthy", True)]
                        if len(healthy) >= n:
                            return
            except (TimeoutError, aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError("sglang-router did not list every engine as a healthy worker in time")


async def clear_caches(engine_urls: list[str], grpc_addrs: list[str], timeout: float = 20.0) -> list[str]:
    """Clear every engine; wait until every router node's index is empty.

    Returns a warning per node whose index still held entries at the
    deadline (the run goes on: that is a finding to report, not a reason to
    lose the other systems' results)."""
    async with aiohttp.ClientSession() as http:
        for u in engine_urls:
            async with http.post(f"{u}/admin/clear") as r:
                r.raise_for_status()
    deadline = time.monotonic() + timeout
    warnings: list[str] = []
    for a in grpc_addrs:
        async with grpc.aio.insecure_channel(a) as ch:
            admin = pb_grpc.AdminStub(ch)
            while True:
                st = await admin.GetStats(pb.GetStatsRequest())
                if st.index_entries == 0:
                    break
                if time.monotonic() > deadline:
                    warnings.append(
                        f"router node {st.node_id or a}: index still held {st.index_entries} entries "
                        f"{timeout:.0f} s after every engine cleared its cache"
                    )
                    break
                await asyncio.sleep(0.05)
    return warnings


async def overhead_probe(system: System, engine_urls: list[str], n: int = 20) -> dict[str, float | None]:
    """Idle fleet: TTFT of a 32-token, 1-token-output request through the
    system minus the same request sent straight to an engine (both HTTP/gRPC
    streams read by this client), plus the Route RPC latency for kvmesh."""
    import random

    rng = random.Random(0)

    def prompt() -> list[int]:
        return [rng.randrange(256, 32000) for _ in range(32)]

    direct = SglangTarget(engine_urls[0])
    await direct.open()
    via = system.target()
    await via.open()
    d_ttft: list[float] = []
    v_ttft: list[float] = []
    route: list[float] = []
    try:
        for _ in range(n):
            r = await direct.generate(prompt(), 1, "probe", f"probe-d-{uuid.uuid4().hex[:8]}")
            if r.ok:
                d_ttft.append(r.ttft_ms)
            r = await via.generate(prompt(), 1, "probe", f"probe-v-{uuid.uuid4().hex[:8]}")
            if r.ok:
                v_ttft.append(r.ttft_ms)
        if system.grpc_addrs:
            async with grpc.aio.insecure_channel(system.grpc_addrs[0]) as ch:
                stub = pb_grpc.RouterStub(ch)
                toks = [rng.randrange(256, 32000) for _ in range(2048)]
                for _ in range(n * 5):
                    t = time.perf_counter()
                    await stub.Route(
                        pb.RouteRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=toks)), dry_run=True)
                    )
                    route.append((time.perf_counter() - t) * 1000.0)
    finally:
        await direct.close()
        await via.close()
    med = statistics.median
    return {
        "direct_ttft_p50_ms": med(d_ttft) if d_ttft else 0.0,
        "via_ttft_p50_ms": med(v_ttft) if v_ttft else 0.0,
        "overhead_ms": (med(v_ttft) - med(d_ttft)) if d_ttft and v_ttft else 0.0,
        "route_rpc_p50_ms": med(route) if route else None,
        "route_rpc_p99_ms": percentile(route, 99) if route else None,
    }


class Progress(Protocol):
    """A progress display fed one finished request at a time."""

    def __call__(self, rec: Rec, /) -> None: ...

    def close(self) -> None: ...


def _run_workload(
    name: str,
    system: System,
    w: Workload,
    urls: list[str],
    cfg: FleetConfig,
    per: dict,
    progress: Callable[[str, int], Progress] | None,
    note: Callable[[str], None],
) -> None:
    """One workload through one system, from cold caches; its figures go to ``per[w.name]``."""
    warn = asyncio.run(clear_caches(urls, system.grpc_addrs))
    for x in warn:
        note(f"{name} {w.name}: WARNING {x}")
    per["warnings"] += [f"before {w.name}: {x}" for x in warn]
    bar = progress(f"{w.name:>9} {name}", w.requests) if progress else None
    try:
        recs, wall, sampler = asyncio.run(run_workload(system.target(), w, urls, on_done=bar))
    finally:
        if bar is not None:
            bar.close()
    s = summarize(recs, wall, sampler, cfg.block_size)
    per[w.name] = s
    note(
        f"{name} {w.name}: hit {s['hit_rate']:.3f} (ideal {s['ideal_hit_rate']:.3f}) "
        f"TTFT p90 {s['ttft_p90_ms']:.0f} ms, {s['throughput_rps']:.1f} req/s, "
        f"failed {s['failed']}, {wall:.1f}s" + (f" errors: {s['errors']}" if s["errors"] else "")
    )


def _run_system(
    name: str,
    engines: list[procs.Proc],
    workloads: list[Workload],
    cfg: FleetConfig,
    progress: Callable[[str, int], Progress] | None,
    note: Callable[[str], None],
    probes: int,
) -> dict:
    """Start one system, probe its overhead, run every workload, stop it; its results."""
    urls = [p.info["url"] for p in engines]
    t0 = time.monotonic()
    per: dict = {"warnings": []}
    try:
        system = start_system(name, engines, cfg)
    except Exception as e:
        per["error"] = f"did not start: {e}"
        note(f"{name}: did not start: {e}")
        return per
    note(f"{name}: started in {time.monotonic() - t0:.1f}s")
    try:
        per["warnings"] += asyncio.run(clear_caches(urls, system.grpc_addrs))
        per["overhead"] = asyncio.run(overhead_probe(system, urls, probes))
        for w in workloads:
            _run_workload(name, system, w, urls, cfg, per, progress, note)
    except Exception as e:
        per["error"] = f"{type(e).__name__}: {e}"
        note(f"{name}: FAILED: {per['error']}")
    finally:
        system.stop()
    return per


def run_routing(
    workloads: list[Workload],
    systems: list[str],
    cfg: FleetConfig,
    progress: Callable[[str, int], Progress] | None = None,
    note: Callable[[str], None] = print,
    probes: int = 20,
) -> dict:
    """Run every system over every workload; returns the results dict."""
    results: dict = {
        "fleet": cfg.__dict__ | {"prefill_tokens_per_s": cfg.prefill_tokens_per_s},
        "workloads": {w.name: {"params": w.params, "requests": w.requests} for w in workloads},
        "systems": {},
        "skipped": {},
    }
    engines = start_engines(cfg)
    try:
        for name in systems:
            if name.startswith("sglang_") and (why := sglang_available()):
                results["skipped"][name] = why
                note(f"skip {name}: {why}")
                continue
            results["systems"][name] = _run_system(name, engines, workloads, cfg, progress, note, probes)
    finally:
        for p in engines:
            p.stop()
    return results
