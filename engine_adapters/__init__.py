"""Everything engine-specific: KV-event wire formats and subscribers, the
request proxy to OpenAI-compatible engines, and the simulated engine."""
