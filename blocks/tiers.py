"""Cache tiers: where an engine holds a block.

Engines keep KV blocks in more than one place and say which in every event
(``medium``): vLLM's GPU pool and its KV offloading to CPU memory or storage,
SGLang's hierarchical cache (device, host ``CPU_PINNED``, ``DISK``, and an
``EXTERNAL`` shared pool). A block can live on several tiers at once (a
host copy of a block still on the GPU), and each tier stores and drops it on
its own, so the router keeps one live set per tier and worker. The tiers are
ordered fastest first; a block held on several tiers is worth what its
fastest copy is worth. Which engine name maps to which tier is the event
reader's business (``engine_adapters.kv_events.tier_of``); these are the
router's names, as NVIDIA Dynamo names its storage tiers (device, host
pinned, disk, external).
"""

from __future__ import annotations

__all__ = [
    "LOWER_TIERS",
    "TIERS",
    "TIER_DISK",
    "TIER_EXTERNAL",
    "TIER_GPU",
    "TIER_HOST",
    "TIER_NAMES",
    "tier_name",
]

TIER_GPU = 0  # device memory: the engine reuses it as it is
TIER_HOST = 1  # host (CPU) memory: copied to the GPU over PCIe before use
TIER_DISK = 2  # local storage: read, then copied
TIER_EXTERNAL = 3  # a pool shared over the network (another node's memory, remote storage)

TIERS: tuple[int, ...] = (TIER_GPU, TIER_HOST, TIER_DISK, TIER_EXTERNAL)
LOWER_TIERS: tuple[int, ...] = TIERS[1:]
TIER_NAMES: tuple[str, ...] = ("gpu", "host", "disk", "external")


def tier_name(tier: int) -> str:
    """``"gpu"``, ``"host"``, ... (ValueError for a number that is no tier)."""
    if tier.__class__ is not int or not 0 <= tier < len(TIER_NAMES):
        raise ValueError(f"unknown cache tier {tier!r}")
    return TIER_NAMES[tier]
