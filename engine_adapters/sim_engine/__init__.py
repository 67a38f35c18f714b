"""The simulated vLLM-like engine (``kvmesh sim-engine``).

Pure parts (no I/O, no clock):

- ``config.py``: :class:`SimEngineConfig`, every setting and its default.
- ``cache.py``: paged prefix cache, LRU eviction, KV events.
- ``timing.py``: step-time model and continuous-batching scheduler
  (:class:`RunningRequest` is one scheduled request).
- ``core.py``: the two combined with deterministic sampling.
- ``requests.py``: OpenAI and SGLang bodies -> one ``CompletionRequest``.
- ``output_vocab.py``: the words the engine writes.

Shell (asyncio, aiohttp, ZMQ):

- ``publisher.py``: vLLM-compatible KV-event publisher (PUB + replay), with
  the simulator's loss injection.
- ``metrics.py``: Prometheus metrics under vLLM's names.
- ``token_stream.py``: per-request token queue, tokens -> text, stop strings.
- ``step_loop.py``: the step loop that drives the core and publishes events.
- ``engine.py``: :class:`SimEngine`, the parts together and the one admission
  path of both APIs.
- ``responses.py``, ``openai_api.py``, ``sglang_api.py``, ``admin_api.py``:
  the HTTP endpoints.
- ``server.py``: ``serve(config)``, the process.

The command line is kvmesh/cli/sim_engine.py. Only the pure parts are
imported here, so ``import engine_adapters.sim_engine.cache`` stays light.
"""

from engine_adapters.sim_engine.cache import NotEnoughBlocks, PrefixCache, engine_block_hash
from engine_adapters.sim_engine.config import SimEngineConfig
from engine_adapters.sim_engine.core import EngineCore, SimRequest, TokenOut
from engine_adapters.sim_engine.timing import RunningRequest, StepPlan, StepScheduler, TimingConfig

__all__ = [
    "EngineCore",
    "NotEnoughBlocks",
    "PrefixCache",
    "RunningRequest",
    "SimEngineConfig",
    "SimRequest",
    "StepPlan",
    "StepScheduler",
    "TimingConfig",
    "TokenOut",
    "engine_block_hash",
]
