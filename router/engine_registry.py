"""The engines a node routes to: their specs, health and per-engine counters.

An engine is one OpenAI-compatible server; with data parallelism it holds
several independent KV caches (workers ``engine#dp<r>``), each publishing its
own event stream on port base + rank. Policies choose among workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blocks.workers import worker_id
from router.circuit_breaker import BreakerConfig, CircuitBreaker

DEFAULT_BLOCK_SIZE = 16


class EngineSpecError(ValueError):
    """An engine description that cannot be used."""


@dataclass(slots=True)
class EngineSpec:
    engine_id: str
    endpoint: str  # http://host:port
    model: str = "sim-model"
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_events_endpoint: str = ""  # tcp://host:port (rank 0); empty: no events
    replay_endpoint: str = ""
    data_parallel_size: int = 1
    topic: str = ""
    capacity_blocks: int = 0

    def validate(self) -> EngineSpec:
        if not self.engine_id or "#" in self.engine_id or "," in self.engine_id:
            raise EngineSpecError(f"engine id {self.engine_id!r}: must be non-empty, no '#' or ','")
        if not self.endpoint.startswith(("http://", "https://")):
            raise EngineSpecError(f"engine {self.engine_id}: endpoint must be http(s)://host:port")
        self.endpoint = self.endpoint.rstrip("/")
        if self.block_size <= 0:
            raise EngineSpecError(f"engine {self.engine_id}: block_size must be > 0")
        if self.data_parallel_size <= 0:
            raise EngineSpecError(f"engine {self.engine_id}: data_parallel_size must be > 0")
        for ep in (self.kv_events_endpoint, self.replay_endpoint):
            if ep and not ep.startswith("tcp://"):
                raise EngineSpecError(f"engine {self.engine_id}: ZMQ endpoint {ep!r} must be tcp://")
        if self.replay_endpoint and not self.kv_events_endpoint:
            raise EngineSpecError(f"engine {self.engine_id}: replay endpoint without events endpoint")
        return self

    @property
    def workers(self) -> list[str]:
        return [worker_id(self.engine_id, r) for r in range(self.data_parallel_size)]

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        """``id=e1,url=http://h:8000,kv=tcp://h:5557,replay=tcp://h:5558,model=m,block_size=16,dp=1,topic=t``"""
        keys = {
            "id": "engine_id",
            "url": "endpoint",
            "endpoint": "endpoint",
            "model": "model",
            "block_size": "block_size",
            "kv": "kv_events_endpoint",
            "replay": "replay_endpoint",
            "dp": "data_parallel_size",
            "topic": "topic",
            "capacity_blocks": "capacity_blocks",
        }
        fields: dict[str, object] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            k, sep, v = part.partition("=")
            if not sep or k not in keys:
                raise EngineSpecError(f"bad engine field {part!r} in {text!r}; keys: {', '.join(keys)}")
            name = keys[k]
            if name in ("block_size", "data_parallel_size", "capacity_blocks"):
                try:
                    fields[name] = int(v)
                except ValueError:
                    raise EngineSpecError(f"{k}={v!r} is not an integer") from None
            else:
                fields[name] = v
        if "engine_id" not in fields or "endpoint" not in fields:
            raise EngineSpecError(f"engine {text!r} needs at least id= and url=")
        return cls(**fields).validate()  # type: ignore[arg-type]


@dataclass(slots=True)
class EngineRecord:
    spec: EngineSpec
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool = True  # last health probe
    requests: int = 0
    failures: int = 0

    @classmethod
    def new(cls, spec: EngineSpec, breaker: BreakerConfig | None = None) -> EngineRecord:
        return cls(spec=spec, breaker=CircuitBreaker(breaker))
