"""The systems the routing benchmark puts in front of the engines, started
fresh for every run: kvmesh router nodes with a policy, SGLang's router
(``sglang-router``, Rust), and round-robin, each as one instance or as N
replicas behind a per-request spread.

Replicas are what an operator runs for availability and throughput:

- kvmesh: N nodes of ONE mesh (the first given the engines, the others
  joining it), so ``precise`` routes on one converged index of every
  engine's cache; ``cache_aware_approx`` keeps its routed-prefix tree per
  node (SGLang's rule, learnt from the node's own decisions), and
  ``round_robin`` a counter per node;
- sglang-router: N independent instances, each with every engine (it has no
  way to share its tree).

A system is named by its family and replica count: ``precise``,
``precise@3``, ``sglang_cache_aware@5`` (``precise_mesh3`` is read as
``precise@3``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import aiohttp

from blocks.hashing import DEFAULT_BLOCK_SIZE
from engine_adapters.sim_engine.timing import TimingConfig
from kvmesh import procs
from kvmesh.benchmarks.driver import GrpcTarget, SglangTarget
from kvmesh.probes import wait_mesh
from router.policies import POLICY_NAMES

__all__ = [
    "FAMILIES",
    "KVMESH_POLICIES",
    "SGLANG_FAMILIES",
    "FleetConfig",
    "System",
    "SystemSpec",
    "sglang_available",
    "sglang_cache_aware_defaults",
    "start_engines",
    "start_system",
]

KVMESH_POLICIES = list(POLICY_NAMES)
SGLANG_FAMILIES = ["sglang_cache_aware", "sglang_round_robin"]
FAMILIES = KVMESH_POLICIES + SGLANG_FAMILIES

# sglang-router's cache_aware defaults as its documentation gives them
# (``python -m sglang_router.launch_router --help``); read from the installed
# package when there is one (:func:`sglang_cache_aware_defaults`).
_SGLANG_DOCUMENTED = {"cache_threshold": 0.3, "balance_abs_threshold": 64, "balance_rel_threshold": 1.5}


def sglang_cache_aware_defaults() -> dict[str, float]:
    """sglang-router's cache_aware thresholds: the installed package's own
    defaults, or its documented ones without it."""
    try:
        from sglang_router.router_args import RouterArgs
    except ImportError:
        return dict(_SGLANG_DOCUMENTED)
    return {k: float(getattr(RouterArgs, k, v)) for k, v in _SGLANG_DOCUMENTED.items()}


def approx_as_sglang_args() -> list[str]:
    """``kvmesh router`` flags that give ``cache_aware_approx`` SGLang's
    thresholds: when it is called SGLang's rule, it runs SGLang's defaults."""
    d = sglang_cache_aware_defaults()
    p = "--policy-opt=cache_aware_approx."
    return [
        f"{p}cache_threshold={d['cache_threshold']:g}",
        f"{p}abs_threshold={d['balance_abs_threshold']:g}",
        f"{p}rel_threshold={d['balance_rel_threshold']:g}",
    ]


@dataclass(frozen=True, slots=True)
class SystemSpec:
    family: str  # a kvmesh policy, or sglang_cache_aware / sglang_round_robin
    replicas: int = 1

    @property
    def key(self) -> str:
        return self.family if self.replicas == 1 else f"{self.family}@{self.replicas}"

    @property
    def is_sglang(self) -> bool:
        return self.family in SGLANG_FAMILIES

    @staticmethod
    def parse(text: str) -> SystemSpec:
        """``family`` or ``family@N``; ValueError naming the known families."""
        if text == "precise_mesh3":
            return SystemSpec("precise", 3)
        family, _, n = text.partition("@")
        if family not in FAMILIES:
            raise ValueError(f"unknown system {text!r}; known: {', '.join(FAMILIES)} (add @N for N replicas)")
        try:
            replicas = int(n) if n else 1
        except ValueError:
            raise ValueError(f"bad replica count in {text!r}: use family@N") from None
        if replicas < 1:
            raise ValueError(f"replica count must be >= 1 in {text!r}")
        return SystemSpec(family, replicas)


@dataclass
class FleetConfig:
    """The engines every system is measured in front of (``kvmesh bench``'s flags start here)."""

    engines: int = 8
    # KV cache of each engine, in blocks, when it is not sized to the workload (pressure 0).
    num_gpu_blocks: int = 4000
    # The fleet's caches hold this share of each workload's working set
    # (ideals.lru_working_set_blocks of the requests planned); 0: every
    # engine gets num_gpu_blocks.
    pressure: float = 0.5
    # Whatever the pressure, an engine holds this many of the workload's
    # longest request (prompt and answer) at once: one, or that request
    # could never run there.
    min_longest_requests: int = 1
    # A chat turn's time to answer, for planning the order of requests
    # before a run (Workload.planned_requests).
    planned_latency_s: float = 0.5
    time_scale: float = 1.0
    seed: int = 7
    block_size: int = DEFAULT_BLOCK_SIZE
    # Extra `kvmesh router` flags, e.g. ("--policy-opt", "precise.overlap_weight=2").
    router_args: tuple[str, ...] = ()

    @property
    def prefill_tokens_per_s(self) -> float:
        """The fleet's prefill capacity (the engines' timing model's prefill cost per token)."""
        return self.engines * 1000.0 / (TimingConfig().prefill_ms_per_token * self.time_scale)


@dataclass
class System:
    spec: SystemSpec
    procs: list[procs.Proc] = field(default_factory=list)
    grpc_addrs: list[str] = field(default_factory=list)
    http_urls: list[str] = field(default_factory=list)
    sgl_popens: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.key

    def target(self, quickack: bool = False) -> GrpcTarget | SglangTarget:
        if self.http_urls:
            return SglangTarget(self.http_urls, quickack=quickack)
        return GrpcTarget(self.grpc_addrs)

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.procs] + [p.pid for p in self.sgl_popens]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        for popen in self.sgl_popens:
            if popen.poll() is None:
                popen.terminate()
        for popen in self.sgl_popens:
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)


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


def start_engines(cfg: FleetConfig, num_gpu_blocks: int | None = None) -> list[procs.Proc]:
    """``cfg.engines`` simulated engines of ``num_gpu_blocks`` blocks each (started at once)."""
    model_path = local_tokenizer_dir()
    blocks = cfg.num_gpu_blocks if num_gpu_blocks is None else num_gpu_blocks
    args = [
        "--num-gpu-blocks",
        str(blocks),
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
    ]
    return procs.start_all([partial(procs.start_sim_engine, f"engine-{i}", args) for i in range(cfg.engines)])


def _engine_flags(engines: list[procs.Proc], block_size: int) -> list[str]:
    return [procs.engine_flag(f"e{i}", p, block_size=block_size) for i, p in enumerate(engines)]


def _start_kvmesh(spec: SystemSpec, engines: list[procs.Proc], cfg: FleetConfig) -> System:
    common = ["--log-level", "warning", "--seed", str(cfg.seed), "--policy", spec.family]
    if spec.family == "cache_aware_approx":
        common += approx_as_sglang_args()
    common += list(cfg.router_args)
    tag = spec.key.replace("@", "-")
    first = procs.start_router(f"{tag}-0", _engine_flags(engines, cfg.block_size), common)
    sysm = System(spec, [first], [first.info["grpc"]])
    if spec.replicas == 1:
        return sysm
    try:
        join = ["--join", first.info["grpc"]]
        others = procs.start_all(
            [partial(procs.start_router, f"{tag}-{i}", [], [*common, *join]) for i in range(1, spec.replicas)]
        )
        sysm.procs += others
        sysm.grpc_addrs += [p.info["grpc"] for p in others]
        asyncio.run(wait_mesh(sysm.grpc_addrs, len(engines)))
    except Exception:
        sysm.stop()
        raise
    return sysm


def start_system(spec: SystemSpec, engines: list[procs.Proc], cfg: FleetConfig) -> System:
    """Start a fresh ``spec`` in front of ``engines``; raises if it does not come up."""
    if spec.is_sglang:
        return _start_sglang(spec, engines)
    if spec.family in KVMESH_POLICIES:
        return _start_kvmesh(spec, engines, cfg)
    raise ValueError(f"unknown system {spec.key!r}; known: {', '.join(FAMILIES)}")


def sglang_available() -> str | None:
    """None if sglang-router is importable, else why not."""
    try:
        import sglang_router  # noqa: F401  # imported only to see whether it is installed
    except ImportError as e:
        return f"sglang-router not installed ({e}); pip install -e '.[peers]'"
    return None


def _launch_sglang(policy: str, engines: list[procs.Proc]) -> tuple[str, subprocess.Popen[bytes]]:
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
    return f"http://127.0.0.1:{port}", popen


def _start_sglang(spec: SystemSpec, engines: list[procs.Proc], timeout: float = 60.0) -> System:
    why = sglang_available()
    if why:
        raise RuntimeError(why)
    sysm = System(spec)
    try:
        for _ in range(spec.replicas):
            url, popen = _launch_sglang(spec.family.removeprefix("sglang_"), engines)
            sysm.http_urls.append(url)
            sysm.sgl_popens.append(popen)

        async def ready() -> None:
            await asyncio.gather(
                *(_wait_sglang(u, len(engines), p, timeout) for u, p in zip(sysm.http_urls, sysm.sgl_popens))
            )

        asyncio.run(ready())
    except Exception:
        sysm.stop()
        raise
    return sysm


async def _wait_sglang(url: str, n: int, popen: subprocess.Popen[bytes], timeout: float) -> None:
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
