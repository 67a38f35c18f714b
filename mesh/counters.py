"""Event and traffic counters of one node's mesh core (read by ``stats()``)."""

from __future__ import annotations

__all__ = ["Counters"]


class Counters:
    """Named integer counters; message counts and bytes by direction and kind."""

    def __init__(self) -> None:
        self._c: dict[str, int] = {}

    def bump(self, key: str, n: int = 1) -> None:
        self._c[key] = self._c.get(key, 0) + n

    def message(self, direction: str, kind: str, nbytes: int) -> None:
        """One message ``sent`` or ``recv`` of ``kind``; bytes when known (> 0)."""
        k = f"{direction}.{kind}"
        self.bump(k + ".msgs")
        if nbytes:
            self.bump(k + ".bytes", nbytes)

    def get(self, key: str) -> int:
        return self._c.get(key, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._c.items()))
