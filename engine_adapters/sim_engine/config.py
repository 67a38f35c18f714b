"""Every setting of the simulated engine, and its default (one home).

``kvmesh sim-engine`` (kvmesh/cli/sim_engine.py) builds a
:class:`SimEngineConfig` from its flags and reads each flag's default from
here; :class:`~engine_adapters.sim_engine.timing.TimingConfig` stays the home
of the step-time knobs and is held whole in ``timing``. The engine's parts
(core, cache, publisher) take their keyword defaults from :data:`DEFAULTS`
too, so a default is never typed twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine_adapters.sim_engine.timing import TimingConfig

EventFormat = Literal["map", "array"]
EVENT_FORMATS: tuple[EventFormat, ...] = ("map", "array")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")


@dataclass(frozen=True, slots=True)
class SimEngineConfig:
    # --- HTTP ---
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port (reported on the READY line)
    model: str = "sim-model"
    # A local directory with a tokenizer.json, reported to SGLang's router so it
    # loads a tokenizer from disk instead of asking the Hugging Face hub.
    model_path: str | None = None
    # LoRA adapters served beside the model, by name (vLLM's --lora-modules):
    # a request names one as its model (or SGLang's lora_path) and gets its own
    # cached blocks.
    lora_modules: tuple[str, ...] = ()

    # --- KV cache and request limits ---
    block_size: int = 16
    # Llama-3-8B on an A100-80GB at 90% memory: ~52 GB of KV at 2 MiB per
    # 16-token block.
    num_gpu_blocks: int = 26_000
    # Host tier (vLLM's KV offloading to CPU memory): blocks evicted from the
    # GPU pool are kept here and loaded back instead of recomputed; 0: none.
    num_host_blocks: int = 0
    max_model_len: int = 131_072  # Llama-3.1's context window (prompt + output)
    timing: TimingConfig = field(default_factory=TimingConfig)
    eos_prob: float = 0.0  # chance that a sampled token is EOS (unless ignore_eos)
    # Requests allowed to wait for admission; past it a request gets HTTP 429
    # ("queue full"). 0: unbounded, as vLLM.
    max_waiting: int = 0

    # --- KV events (vLLM's ZMQ publisher); an empty endpoint disables it ---
    kv_events_endpoint: str = "tcp://127.0.0.1:5557"
    kv_replay_endpoint: str = "tcp://127.0.0.1:5558"
    kv_topic: str = ""  # vLLM's default topic frame
    kv_event_format: EventFormat = "map"  # map = vLLM >= 0.24, array = vLLM <= 0.23
    kv_buffer_steps: int = 10_000  # replay buffer, in batches (vLLM's default)
    data_parallel_rank: int = 0  # stamped on batches; the ZMQ ports are offset by it

    # --- determinism and faults ---
    seed: int = 0  # outputs of requests without a seed, and the injected failures
    hash_seed: int | None = None  # None: random per process, as vLLM's block hashes are
    fail_rate: float = 0.0  # chance that a request gets HTTP 503 before its first token

    # --- process ---
    log_level: str = "info"  # read by the CLI, which configures logging for the process
    log_format: str = "console"  # console (key=value text) or json (one object a line)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_gpu_blocks < 1:
            raise ValueError("block_size and num_gpu_blocks must be >= 1")
        if self.num_host_blocks < 0:
            raise ValueError("num_host_blocks must be >= 0 (0: no host tier)")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be in [0, 1]")
        if not 0.0 <= self.eos_prob <= 1.0:
            raise ValueError("eos_prob must be in [0, 1]")
        if self.data_parallel_rank < 0:
            raise ValueError("data_parallel_rank must be >= 0")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0 (0: unbounded)")
        if any(not name or name == self.model for name in self.lora_modules):
            raise ValueError("lora_modules must be non-empty names other than the model's")
        if len(set(self.lora_modules)) != len(self.lora_modules):
            raise ValueError("lora_modules must not repeat a name")
        if self.kv_event_format not in EVENT_FORMATS:
            raise ValueError(f"kv_event_format must be one of {EVENT_FORMATS}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}")


DEFAULTS = SimEngineConfig()
