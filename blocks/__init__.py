"""Block identity, shared by every layer above it.

``hashing``: the router's chained xxh3 block hashes; ``delta``: what an engine
event batch changed, in those hashes (``KvDelta``); ``block_map``: a worker's
engine hash -> router hash map the deltas describe; ``workers``: the ids of
the caches blocks live in; ``tiers``: the memory tiers of one cache (GPU,
host, disk, external). Pure code; imports nothing else of kvmesh.
"""
