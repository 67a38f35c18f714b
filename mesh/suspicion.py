"""Suspicion timer: how long a member stays *suspect* before it is declared dead.

SWIM with suspicion (and Lifeguard's refinement, as used by hashicorp/memberlist)
does not declare a member dead the moment one probe fails: the prober marks it
*suspect* and gossips that, and every node that hears it starts its own timer.
The suspected node has until the timer fires to refute (gossip ``Alive`` with a
higher incarnation). The timer is adaptive:

* It starts at ``max_timeout``: a lone accusation might come from a node with a
  bad network link, so give the suspect plenty of time.
* Each *independent* confirmation (a ``Suspect`` for the same member from a
  different accuser) is evidence that the member really is gone, so the
  timeout decays logarithmically towards ``min_timeout``, reached after ``k``
  confirmations::

      timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

* With ``k < 1`` (too few members to ever get confirmations) the timer simply
  uses ``min_timeout``.

The timeouts scale with the log of the cluster size because gossip needs
O(log n) rounds to reach everybody, refutations included::

    min = suspicion_mult * max(1, log10(max(1, n))) * probe_interval
    max = suspicion_max_timeout_mult * min

The ``max(1, ...)`` floor (memberlist does the same) keeps small clusters from
getting a minimum below ``suspicion_mult`` probe intervals; without it a
2-node cluster would declare death in 1.2 s, before a refutation could travel.

This module is pure: callers pass ``now`` and read :attr:`Suspicion.deadline`.
"""

from __future__ import annotations

import math

__all__ = ["Suspicion", "confirmations_wanted", "suspicion_timeouts"]


def suspicion_timeouts(
    suspicion_mult: float, max_timeout_mult: float, n_members: int, probe_interval: float
) -> tuple[float, float]:
    """``(min_timeout, max_timeout)`` in seconds for a cluster of ``n_members``."""
    if n_members < 0 or probe_interval <= 0 or suspicion_mult <= 0 or max_timeout_mult < 1:
        raise ValueError(
            f"bad suspicion parameters: mult={suspicion_mult} max_mult={max_timeout_mult} "
            f"n={n_members} probe_interval={probe_interval}"
        )
    scale = max(1.0, math.log10(max(1, n_members)))
    lo = suspicion_mult * scale * probe_interval
    return lo, max_timeout_mult * lo


def confirmations_wanted(suspicion_mult: int, n_members: int) -> int:
    """How many independent confirmations drive the timer to its minimum.

    ``suspicion_mult - 2`` so that, with confirmations arriving about once per
    probe interval, the timer ends near its nominal value. Members other than
    the suspect and ourselves are the only possible confirmers, so if there
    are fewer of them than that, expect none (``0``).
    """
    k = suspicion_mult - 2
    return 0 if n_members - 2 < k else max(0, k)


class Suspicion:
    """One member's suspicion timer, as seen by one node."""

    __slots__ = ("_confirmed_by", "deadline", "k", "max_timeout", "min_timeout", "start")

    def __init__(self, accuser: str, k: int, min_timeout: float, max_timeout: float, start: float) -> None:
        if not 0 < min_timeout <= max_timeout:
            raise ValueError(f"need 0 < min_timeout <= max_timeout, got {min_timeout}, {max_timeout}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.start = start
        # The first accuser is not a confirmation; remembering it stops our own
        # suspicion, gossiped back to us, from counting as independent evidence.
        self._confirmed_by: set[str] = {accuser}
        self.deadline = start + (max_timeout if k >= 1 else min_timeout)

    @property
    def confirmations(self) -> int:
        """Independent confirmations counted so far (the accuser excluded)."""
        return len(self._confirmed_by) - 1

    def timeout(self) -> float:
        """Current total timeout (from :attr:`start`) given the confirmations."""
        if self.k < 1:
            return self.min_timeout
        frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
        return max(self.min_timeout, self.max_timeout - frac * (self.max_timeout - self.min_timeout))

    def confirm(self, from_node: str) -> bool:
        """Count ``from_node``'s accusation; ``True`` if it was new evidence.

        Duplicates and confirmations beyond ``k`` return ``False`` (the caller
        uses this to decide whether to re-gossip the accusation).
        """
        if self.confirmations >= self.k or from_node in self._confirmed_by:
            return False
        self._confirmed_by.add(from_node)
        self.deadline = self.start + self.timeout()
        return True

    def expired(self, now: float) -> bool:
        return now >= self.deadline
