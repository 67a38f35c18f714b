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
import xxhash

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

    def __init__(self, client_id: int, node_id: str = "") -> None:
        self._log = log.bind(node=node_id) if node_id else log
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
        self._map: pycrdt.Map[str] = self.doc.get("engines", type=pycrdt.Map)
        self._updates: list[bytes] = []
        self.doc.observe(self._on_txn)
        self.version = 0  # bumped on every visible change (for pollers)
        # The map as last read (JSON strings) and its readable specs decoded.
        # Reading the pycrdt Map key by key costs a transaction per key, and a
        # fleet registering a thousand engines one by one would make every
        # node read the whole map per registration: the map is read in one
        # call (as JSON) and only the values that changed are decoded.
        self._raw: dict[str, str] = {}
        self._specs: dict[str, dict[str, Any]] = {}
        self._digest: bytes | None = None  # of _raw; None: to compute again

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
        raw = msgspec.json.encode(clean).decode()
        self._map[engine_id] = raw
        self._raw[engine_id], self._specs[engine_id] = raw, clean
        self._digest = None
        self.version += 1
        self._log.info("mesh.engine_registered", engine=engine_id)
        return self._take_update()

    def deregister(self, engine_id: str) -> bytes | None:
        """Remove ``engine_id``; returns the update, or None if it was unknown."""
        if engine_id not in self._map:
            return None
        self._updates.clear()
        del self._map[engine_id]
        self._raw.pop(engine_id, None)
        self._specs.pop(engine_id, None)
        self._digest = None
        self.version += 1
        self._log.info("mesh.engine_deregistered", engine=engine_id)
        return self._take_update()

    def apply(self, update: bytes) -> tuple[set[str], set[str]]:
        """Apply a remote update; returns (added or changed, removed) engine ids."""
        try:
            self.doc.apply_update(update)
        except ValueError as e:
            raise RegistryError(f"bad registry update: {e}") from None
        finally:
            self._updates.clear()
        # Reread even when the state vector did not move: a deregistration
        # is a delete, which state vectors do not count.
        changed, removed = self._reread()
        if changed or removed:
            self.version += 1
        return changed, removed

    def _reread(self) -> tuple[set[str], set[str]]:
        """Bring the decoded specs up to the map: (added or changed, removed)."""
        raw_now: dict[str, Any] = msgspec.json.decode(str(self._map))  # the map as JSON, in one call
        if raw_now != self._raw:
            self._digest = None
        changed: set[str] = set()
        removed = {e for e in self._raw if e not in raw_now}
        for e in removed:
            del self._raw[e]
            self._specs.pop(e, None)
        for e, raw in raw_now.items():
            if self._raw.get(e) == raw:
                continue
            self._raw[e] = raw
            # As JSON, a nested CRDT text would read as a string: a spec is a
            # plain string value only (what register writes), asked of the map.
            value = self._map.get(e)
            spec = self._decode(e, value if isinstance(value, str) else None)
            if spec is None:  # unreadable: not an engine (any more)
                if self._specs.pop(e, None) is not None:
                    removed.add(e)
            elif self._specs.get(e) != spec:
                self._specs[e] = spec
                changed.add(e)
        return changed, removed

    def digest(self) -> bytes:
        """A digest of the map's content. Two registries with the same state
        vector differ only when one missed a deregistration (a delete, which
        the state vector does not count): anti-entropy compares this too."""
        if self._digest is None:
            self._digest = xxhash.xxh3_64_digest(msgspec.json.encode(sorted(self._raw.items())))
        return self._digest

    def get(self, engine_id: str) -> dict[str, Any] | None:
        """A copy of one readable spec, or None."""
        spec = self._specs.get(engine_id)
        return None if spec is None else msgspec.json.decode(msgspec.json.encode(spec))

    def engines(self) -> dict[str, dict[str, Any]]:
        """Every readable spec by engine id. A new dict; the specs in it are
        shared with the registry: read them, never change them."""
        return dict(self._specs)

    def _decode(self, engine_id: str, raw: Any) -> dict[str, Any] | None:
        try:
            spec = msgspec.json.decode(raw)
        except (TypeError, msgspec.DecodeError):
            self._log.error("mesh.registry_value_unreadable", engine=engine_id)
            return None
        return spec if isinstance(spec, dict) else None

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def update_since(self, state_vector: bytes | None = None) -> bytes:
        return self.doc.get_update(state_vector)
