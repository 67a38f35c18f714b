"""The engines a node routes to: their specs, health and per-engine counters.

An engine is one OpenAI-compatible server; with data parallelism it holds
several independent KV caches (workers ``engine#dp<r>``, see
``blocks.workers``), each publishing its own event stream on port base +
rank. Policies choose among workers.

:class:`EngineSpec` is what is registered (in the mesh's replicated registry,
so every node learns every engine); :class:`EngineRecord` is one node's
state of one engine (last health probe, circuit breaker, counters);
:class:`EngineTable` is all of a node's records, with the lookups the request
path needs (models served, block size of a model, engines of a model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blocks.hashing import DEFAULT_BLOCK_SIZE
from blocks.workers import worker_id
from engine_adapters.completion_request import ENGINE_KINDS
from engine_adapters.kv_endpoints import endpoint_problem
from engine_adapters.sim_engine.config import DEFAULTS as SIM_DEFAULTS
from router.circuit_breaker import CLOSED, BreakerConfig, CircuitBreaker

# Bounds on what a registration may ask of every node: each data-parallel
# rank is a worker every node tracks, and a block size is a hashing unit.
MAX_DATA_PARALLEL = 256
MAX_BLOCK_SIZE = 4096
MAX_SOURCE_LEN = 300  # "dns:" and a DNS name (at most 253 characters)


# The keys of an ``--engine`` SPEC (:meth:`EngineSpec.parse`): the field each
# sets and what its value looks like. The flag's help is written from this
# table, so it lists exactly the keys the parser takes.
SPEC_KEYS: dict[str, tuple[str, str]] = {
    "id": ("engine_id", "ID"),
    "url": ("endpoint", "http://HOST:PORT"),
    "endpoint": ("endpoint", "http://HOST:PORT"),  # the field's own name, as Admin.RegisterEngine has it
    "kv": ("kv_events_endpoint", "tcp://HOST:PORT"),
    "replay": ("replay_endpoint", "tcp://HOST:PORT"),
    "model": ("model", "NAME"),
    "block_size": ("block_size", "N"),
    "dp": ("data_parallel_size", "N"),
    "topic": ("topic", "TOPIC"),
    "capacity_blocks": ("capacity_blocks", "N"),
    "kind": ("kind", "|".join(ENGINE_KINDS)),
}
_INT_FIELDS = ("block_size", "data_parallel_size", "capacity_blocks")


class EngineSpecError(ValueError):
    """An engine description that cannot be used."""


@dataclass(slots=True)
class EngineSpec:
    engine_id: str
    endpoint: str  # http://host:port
    model: str = SIM_DEFAULTS.model  # the simulated engine's, when an engine does not say
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_events_endpoint: str = ""  # tcp://host:port (rank 0); empty: no events
    replay_endpoint: str = ""
    data_parallel_size: int = 1
    topic: str = ""
    capacity_blocks: int = 0
    kind: str = "vllm"  # which engine's request fields to send (completion_request.ENGINE_KINDS)
    # Who registered it: "" by hand (--engine, Admin.RegisterEngine), "dns:NAME"
    # by engine discovery (router/discovery.py), which removes only its own.
    source: str = ""

    def validate(self) -> EngineSpec:
        if not self.engine_id or "#" in self.engine_id or "," in self.engine_id:
            raise EngineSpecError(f"engine id {self.engine_id!r}: must be non-empty, no '#' or ','")
        if not self.endpoint.startswith(("http://", "https://")):
            raise EngineSpecError(f"engine {self.engine_id}: endpoint must be http(s)://host:port")
        self.endpoint = self.endpoint.rstrip("/")
        if not 0 < self.block_size <= MAX_BLOCK_SIZE:
            raise EngineSpecError(f"engine {self.engine_id}: block_size must be in 1..{MAX_BLOCK_SIZE}")
        if not 0 < self.data_parallel_size <= MAX_DATA_PARALLEL:
            raise EngineSpecError(
                f"engine {self.engine_id}: data_parallel_size must be in 1..{MAX_DATA_PARALLEL}"
            )
        if self.kind not in ENGINE_KINDS:
            raise EngineSpecError(f"engine {self.engine_id}: kind {self.kind!r} is not one of {ENGINE_KINDS}")
        if not self.engine_id.isprintable() or len(self.engine_id) > 128:
            raise EngineSpecError(f"engine id {self.engine_id!r}: at most 128 printable characters")
        for ep in (self.kv_events_endpoint, self.replay_endpoint):
            problem = endpoint_problem(ep, self.data_parallel_size) if ep else None
            if problem:
                raise EngineSpecError(f"engine {self.engine_id}: ZMQ endpoint {ep!r}: {problem}")
        if self.replay_endpoint and not self.kv_events_endpoint:
            raise EngineSpecError(f"engine {self.engine_id}: replay endpoint without events endpoint")
        if not self.source.isprintable() or len(self.source) > MAX_SOURCE_LEN:
            raise EngineSpecError(
                f"engine {self.engine_id}: source must be at most {MAX_SOURCE_LEN} printable characters"
            )
        return self

    @property
    def workers(self) -> list[str]:
        return [worker_id(self.engine_id, r) for r in range(self.data_parallel_size)]

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        """``id=e1,url=http://h:8000,kv=tcp://h:5557,model=m,...``: the keys of :data:`SPEC_KEYS`."""
        fields: dict[str, Any] = {}  # str or int by key, checked by the constructor and validate()
        for part in filter(None, (p.strip() for p in text.split(","))):
            k, sep, v = part.partition("=")
            if not sep or k not in SPEC_KEYS:
                raise EngineSpecError(f"bad engine field {part!r} in {text!r}; keys: {', '.join(SPEC_KEYS)}")
            name = SPEC_KEYS[k][0]
            if name in _INT_FIELDS:
                try:
                    fields[name] = int(v)
                except ValueError:
                    raise EngineSpecError(f"{k}={v!r} is not an integer") from None
            else:
                fields[name] = v
        if "engine_id" not in fields or "endpoint" not in fields:
            raise EngineSpecError(f"engine {text!r} needs at least id= and url=")
        return cls(**fields).validate()


@dataclass(slots=True)
class EngineRecord:
    spec: EngineSpec
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool = True  # from the last health probes (see router/health.py)
    failed_probes: int = 0  # health probes failed in a row
    max_model_len: int | None = None  # the engine's context window, from its /v1/models
    model_missing: bool = False  # its /v1/models did not list spec.model (warned once)

    @classmethod
    def new(
        cls,
        spec: EngineSpec,
        breaker: BreakerConfig | None = None,
        on_breaker_change: Callable[[str, str, str, int], None] | None = None,
    ) -> EngineRecord:
        """``on_breaker_change(engine_id, old, new, failures)``: see CircuitBreaker."""
        hook = None
        if on_breaker_change is not None:
            eid = spec.engine_id

            def hook(old: str, new: str, failures: int) -> None:
                on_breaker_change(eid, old, new, failures)

        return cls(spec=spec, breaker=CircuitBreaker(breaker, hook))


class EngineTable:
    """This node's records of the registered engines, by engine id, in
    registration order (the order candidates are listed in)."""

    __slots__ = ("_breaker", "_on_breaker_change", "_records")

    def __init__(
        self,
        breaker: BreakerConfig | None = None,
        on_breaker_change: Callable[[str, str, str, int], None] | None = None,
    ) -> None:
        self._breaker = breaker
        self._on_breaker_change = on_breaker_change  # (engine_id, old, new, failures)
        self._records: dict[str, EngineRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, engine_id: object) -> bool:
        return engine_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __getitem__(self, engine_id: str) -> EngineRecord:
        return self._records[engine_id]

    def get(self, engine_id: str) -> EngineRecord | None:
        return self._records.get(engine_id)

    def values(self) -> list[EngineRecord]:
        return list(self._records.values())

    def put(self, spec: EngineSpec) -> bool:
        """Add an engine, or replace its record if its spec changed (health
        and breaker start afresh). Returns whether anything changed."""
        old = self._records.get(spec.engine_id)
        if old is not None and old.spec == spec:
            return False
        if old is not None:
            old.breaker.detach()
            if old.breaker.state != CLOSED and self._on_breaker_change is not None:
                # Its breaker starts afresh, closed: said, as an opened one was.
                self._on_breaker_change(spec.engine_id, old.breaker.state, CLOSED, 0)
        self._records[spec.engine_id] = EngineRecord.new(spec, self._breaker, self._on_breaker_change)
        return True

    def pop(self, engine_id: str) -> EngineRecord | None:
        return self._records.pop(engine_id, None)

    def check_compatible(self, spec: EngineSpec) -> None:
        """Engines of one model must share a block size: a prompt is hashed
        once, in blocks of that size, before any engine is chosen."""
        for other in self._records.values():
            if (
                other.spec.model == spec.model
                and other.spec.block_size != spec.block_size
                and other.spec.engine_id != spec.engine_id
            ):
                raise EngineSpecError(
                    f"engine {spec.engine_id}: block_size {spec.block_size} differs from "
                    f"{other.spec.engine_id}'s {other.spec.block_size} for model {spec.model}; "
                    "engines of one model must share a block size"
                )

    def models(self) -> set[str]:
        return {r.spec.model for r in self._records.values()}

    def of_model(self, model: str) -> list[EngineRecord]:
        return [r for r in self._records.values() if r.spec.model == model]

    def max_model_len(self, model: str) -> int | None:
        """The smallest context window ``model``'s engines reported (None: none did)."""
        known = [r.max_model_len for r in self._records.values() if r.spec.model == model and r.max_model_len]
        return min(known) if known else None

    def block_size(self, model: str) -> int:
        """The block size of ``model``'s engines (KeyError if none serves it)."""
        for r in self._records.values():
            if r.spec.model == model:
                return r.spec.block_size
        raise KeyError(model)
