"""Per-engine replicated KV log: one single-writer pycrdt document per epoch.

The unit of KV state is :class:`blocks.delta.KvDelta` (one engine event
batch, in router block hashes). Each engine's deltas are written by one node,
the engine's current *owner*, and read by every node; every node's prefix
index is the same function of the same log.

The pieces, one concept each:

* :mod:`.epoch` -- ``Epoch`` (which document is authoritative, and why it is
  ordered the way it is) and ``EpochDoc`` (one epoch's pycrdt document: the
  ``meta`` map and the append-only ``log`` array).
* :mod:`.entry` -- the codec of one log entry (the msgpack bytes of a list of
  ``KvDelta``) and its validation.
* :mod:`.snapshot` -- the state a log describes (per worker, engine hash ->
  router hash) and the snapshot entry that starts every epoch.
* :mod:`.live` -- ``LiveState``: that state as the owner keeps it (the
  reference over ``BlockMap``, or natively in packed mode).
* :mod:`.packed` -- entries decoded (or made by the native mapper) in Rust:
  ``PackedEntry``, what a native index and owner take without a Python
  object per block.
* :mod:`.replica` -- ``EngineLogReplica``: any node's view of the log; applies
  remote updates with epoch fencing and emits every newly visible delta, in
  log order.
* :mod:`.owner` -- ``EngineLogOwner``: the single writer on the owner node;
  appends, and compacts by starting a new epoch from a snapshot.

Why batch entries and not one CRDT key per block: a Map key per block costs
far more memory than its payload and leaves a tombstone per delete forever,
so under cache churn the document would grow without bound. An append-only
Array of batches costs a few bytes of CRDT overhead per batch, yrs squashes
consecutive entries of one client into one item, and history is bounded by
replacing the whole document (compaction). The figures are in
docs/benchmarks.md (evidence: the mesh state layout).
"""
