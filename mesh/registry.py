"""Engine registry replicated to every node: engine_id -> spec.

Choice: a pycrdt ``Map`` in one document shared by all nodes (every node may
register or deregister, each with its own random client id). Engines are few
and change rarely, so the Map's costs (a small tombstone per overwrite or
delete) stay negligible, and we get causal, state-vector based anti-entropy
for free -- the same machinery as the engine logs. Concurrent writes of one
key resolve deterministically (yrs orders them by client id); a register
concurrent with a deregister of the same engine keeps the registration (the
delete only removes the value it saw).

Values are the spec serialised as a JSON string: pycrdt turns JSON numbers
into floats, and a spec must round-trip exactly (``block_size`` is an int).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pycrdt
import structlog

log = structlog.get_logger(__name__)

# Fields with a known meaning; others are carried through untouched.
_INT_FIELDS = ("block_size", "data_parallel_size")


class RegistryError(ValueError):
    """A spec or registry update that cannot be applied; nothing was applied."""


def validate_spec(engine_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(engine_id, str) or not engine_id or "#dp" in engine_id:
        raise RegistryError(f"bad engine id {engine_id!r}")
    if not isinstance(spec, dict):
        raise RegistryError(f"spec of {engine_id!r} must be a dict, got {type(spec).__name__}")
    if not isinstance(spec.get("endpoint"), str) or not spec["endpoint"]:
        raise RegistryError(f"spec of {engine_id!r} needs a string 'endpoint'")
    for f in _INT_FIELDS:
        v = spec.get(f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise RegistryError(f"spec of {engine_id!r}: {f} must be a positive int, got {v!r}")
    try:
        clean: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(spec), type=dict[str, Any])
        return clean
    except (TypeError, msgspec.EncodeError) as e:
        raise RegistryError(f"spec of {engine_id!r} is not JSON-serialisable: {e}") from None


class Registry:
    """The replicated engine registry of one node."""

    def __init__(self, client_id: int) -> None:
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
        self._map: pycrdt.Map[str] = self.doc.get("engines", type=pycrdt.Map)
        self._updates: list[bytes] = []
        self.doc.observe(self._on_txn)
        self.version = 0  # bumped on every visible change (for pollers)

    def _on_txn(self, event: pycrdt.TransactionEvent) -> None:
        self._updates.append(event.update)

    def _take_update(self) -> bytes:
        ups, self._updates = self._updates, []
        if not ups:
            return b"\x00\x00"
        return ups[0] if len(ups) == 1 else pycrdt.merge_updates(*ups)

    def register(self, engine_id: str, spec: dict[str, Any]) -> bytes:
        """Add or replace ``engine_id``; returns the update to gossip."""
        clean = validate_spec(engine_id, spec)
        self._updates.clear()
        self._map[engine_id] = msgspec.json.encode(clean).decode()
        self.version += 1
        log.info("mesh.engine_registered", engine=engine_id)
        return self._take_update()

    def deregister(self, engine_id: str) -> bytes | None:
        """Remove ``engine_id``; returns the update, or None if it was unknown."""
        if engine_id not in self._map:
            return None
        self._updates.clear()
        del self._map[engine_id]
        self.version += 1
        log.info("mesh.engine_deregistered", engine=engine_id)
        return self._take_update()

    def apply(self, update: bytes) -> tuple[set[str], set[str]]:
        """Apply a remote update; returns (added or changed, removed) engine ids."""
        before = self.engines()
        try:
            self.doc.apply_update(update)
        except ValueError as e:
            raise RegistryError(f"bad registry update: {e}") from None
        finally:
            self._updates.clear()
        after = self.engines()
        changed = {e for e, s in after.items() if before.get(e) != s}
        removed = set(before) - set(after)
        if changed or removed:
            self.version += 1
        return changed, removed

    def get(self, engine_id: str) -> dict[str, Any] | None:
        raw = self._map.get(engine_id)
        return None if raw is None else self._decode(engine_id, raw)

    def engines(self) -> dict[str, dict[str, Any]]:
        out = {}
        for k, raw in self._map.items():
            spec = self._decode(k, raw)
            if spec is not None:
                out[k] = spec
        return out

    @staticmethod
    def _decode(engine_id: str, raw: Any) -> dict[str, Any] | None:
        try:
            spec = msgspec.json.decode(raw)
        except (TypeError, msgspec.DecodeError):
            log.error("mesh.registry_value_unreadable", engine=engine_id)
            return None
        return spec if isinstance(spec, dict) else None

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def update_since(self, state_vector: bytes | None = None) -> bytes:
        return self.doc.get_update(state_vector)
