"""Everything engine-specific: KV events in, requests out.

- ``kv_events``: the KV-event wire format (payload structs, live and replay framing).
- ``kv_endpoints``: where each data-parallel rank publishes (ZMQ endpoint rules).
- ``sequencer``: apply / duplicate / gap / restart for one rank's stream (pure).
- ``block_mapper``: engine block hashes -> router block hashes for one worker (pure).
- ``event_adapter``: the subscription to one engine's events (ZMQ I/O around the two above).
- ``proxy``: the client for an engine's OpenAI-compatible completions stream.
- ``tokenizer``: text <-> token ids (builtin hash tokenizer or a local tokenizer.json).
- ``sim_engine``: the simulated vLLM-like engine (``kvmesh sim-engine``).
"""
