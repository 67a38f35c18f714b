"""The simulated vLLM-like engine (``kvmesh sim-engine``).

Pure parts: ``cache.py`` (paged prefix cache, LRU eviction, KV events),
``timing.py`` (step-time model and continuous-batching scheduler),
``core.py`` (the two combined with deterministic sampling).
Shell: ``server.py`` (aiohttp OpenAI-compatible HTTP, ZMQ KV-event publisher,
CLI ``configure_parser``/``run``).
"""

from engine_adapters.sim_engine.cache import NotEnoughBlocks, PrefixCache, engine_block_hash
from engine_adapters.sim_engine.core import EngineCore, SimRequest, TokenOut
from engine_adapters.sim_engine.timing import Seq, StepPlan, StepScheduler, TimingConfig

__all__ = [
    "EngineCore",
    "NotEnoughBlocks",
    "PrefixCache",
    "Seq",
    "SimRequest",
    "StepPlan",
    "StepScheduler",
    "TimingConfig",
    "TokenOut",
    "engine_block_hash",
]
