from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "stop", "ignore_eos", "seed")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    seed: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "sampling", "session_key", "policy", "lora_name", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: Prompt
    sampling: SamplingParams
    session_key: str
    policy: str
    lora_name: str
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., session_key: _Optional[str] = ..., policy: _Optional[str] = ..., lora_name: _Optional[str] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("routed", "chunk", "finished")
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    routed: RoutedTo
    chunk: TokenChunk
    finished: Finished
    def __init__(self, routed: _Optional[_Union[RoutedTo, _Mapping]] = ..., chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class RoutedTo(_message.Message):
    __slots__ = ("request_id", "engine_id", "endpoint", "predicted_cached_blocks", "attempt", "decision")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_id: str
    endpoint: str
    predicted_cached_blocks: int
    attempt: int
    decision: Decision
    def __init__(self, request_id: _Optional[str] = ..., engine_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., predicted_cached_blocks: _Optional[int] = ..., attempt: _Optional[int] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "engine_id", "ttft_ms", "attempts", "error")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    engine_id: str
    ttft_ms: float
    attempts: int
    error: str
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., engine_id: _Optional[str] = ..., ttft_ms: _Optional[float] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "session_key", "policy", "lora_name", "cache_salt", "dry_run")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: Prompt
    session_key: str
    policy: str
    lora_name: str
    cache_salt: str
    dry_run: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., session_key: _Optional[str] = ..., policy: _Optional[str] = ..., lora_name: _Optional[str] = ..., cache_salt: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("request_id", "engine_id", "endpoint", "predicted_cached_blocks", "prompt_blocks", "decision")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    engine_id: str
    endpoint: str
    predicted_cached_blocks: int
    prompt_blocks: int
    decision: Decision
    def __init__(self, request_id: _Optional[str] = ..., engine_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., predicted_cached_blocks: _Optional[int] = ..., prompt_blocks: _Optional[int] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("policy", "reason", "candidates")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    policy: str
    reason: str
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    def __init__(self, policy: _Optional[str] = ..., reason: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("engine_id", "overlap_blocks", "load", "score", "chosen", "host_blocks", "disk_blocks", "external_blocks")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    overlap_blocks: int
    load: float
    score: float
    chosen: bool
    host_blocks: int
    disk_blocks: int
    external_blocks: int
    def __init__(self, engine_id: _Optional[str] = ..., overlap_blocks: _Optional[int] = ..., load: _Optional[float] = ..., score: _Optional[float] = ..., chosen: _Optional[bool] = ..., host_blocks: _Optional[int] = ..., disk_blocks: _Optional[int] = ..., external_blocks: _Optional[int] = ...) -> None: ...

class EngineSpec(_message.Message):
    __slots__ = ("engine_id", "endpoint", "model", "block_size", "kv_events_endpoint", "replay_endpoint", "data_parallel_size", "topic", "capacity_blocks", "kind", "source")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DATA_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    endpoint: str
    model: str
    block_size: int
    kv_events_endpoint: str
    replay_endpoint: str
    data_parallel_size: int
    topic: str
    capacity_blocks: int
    kind: str
    source: str
    def __init__(self, engine_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., model: _Optional[str] = ..., block_size: _Optional[int] = ..., kv_events_endpoint: _Optional[str] = ..., replay_endpoint: _Optional[str] = ..., data_parallel_size: _Optional[int] = ..., topic: _Optional[str] = ..., capacity_blocks: _Optional[int] = ..., kind: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class EngineStatus(_message.Message):
    __slots__ = ("spec", "healthy", "circuit", "in_flight", "cached_blocks", "last_seq", "events_applied", "gaps_replayed", "resets", "owner_node", "worker_seqs", "probes", "probe_batches", "skipped_events", "prompt_tokens", "cached_prompt_tokens", "event_lag_seconds", "event_block_size_mismatch", "events_refused", "cached_blocks_by_tier")
    class WorkerSeqsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class CachedBlocksByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    GAPS_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    RESETS_FIELD_NUMBER: _ClassVar[int]
    OWNER_NODE_FIELD_NUMBER: _ClassVar[int]
    WORKER_SEQS_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    PROBE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVENT_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_BLOCK_SIZE_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    EVENTS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    spec: EngineSpec
    healthy: bool
    circuit: str
    in_flight: float
    cached_blocks: int
    last_seq: int
    events_applied: int
    gaps_replayed: int
    resets: int
    owner_node: str
    worker_seqs: _containers.ScalarMap[str, int]
    probes: int
    probe_batches: int
    skipped_events: int
    prompt_tokens: int
    cached_prompt_tokens: int
    event_lag_seconds: float
    event_block_size_mismatch: int
    events_refused: str
    cached_blocks_by_tier: _containers.ScalarMap[str, int]
    def __init__(self, spec: _Optional[_Union[EngineSpec, _Mapping]] = ..., healthy: _Optional[bool] = ..., circuit: _Optional[str] = ..., in_flight: _Optional[float] = ..., cached_blocks: _Optional[int] = ..., last_seq: _Optional[int] = ..., events_applied: _Optional[int] = ..., gaps_replayed: _Optional[int] = ..., resets: _Optional[int] = ..., owner_node: _Optional[str] = ..., worker_seqs: _Optional[_Mapping[str, int]] = ..., probes: _Optional[int] = ..., probe_batches: _Optional[int] = ..., skipped_events: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., event_lag_seconds: _Optional[float] = ..., event_block_size_mismatch: _Optional[int] = ..., events_refused: _Optional[str] = ..., cached_blocks_by_tier: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RegisterEngineRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: EngineSpec
    def __init__(self, spec: _Optional[_Union[EngineSpec, _Mapping]] = ...) -> None: ...

class RegisterEngineResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: EngineStatus
    def __init__(self, status: _Optional[_Union[EngineStatus, _Mapping]] = ...) -> None: ...

class DeregisterEngineRequest(_message.Message):
    __slots__ = ("engine_id",)
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    def __init__(self, engine_id: _Optional[str] = ...) -> None: ...

class DeregisterEngineResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class ListEnginesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnginesResponse(_message.Message):
    __slots__ = ("engines",)
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    engines: _containers.RepeatedCompositeFieldContainer[EngineStatus]
    def __init__(self, engines: _Optional[_Iterable[_Union[EngineStatus, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("node_id", "default_policy", "requests_total", "requests_failed", "retries_total", "prompt_tokens_total", "cached_prompt_tokens_total", "index_blocks", "index_entries", "requests_by_engine", "requests_by_policy", "ready", "live_members", "mesh_bytes_sent", "mesh_messages_sent", "outcomes", "in_flight", "draining", "member_events", "predicted_cached_prompt_tokens_total", "route_predictions_total", "route_mispredictions_total", "mesh_bytes_received", "mesh_messages_received", "convergence_lag_seconds", "event_loop_stalls_total", "event_loop_lag_max_seconds")
    class RequestsByEngineEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RequestsByPolicyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class OutcomesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MemberEventsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ConvergenceLagSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    RETRIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    INDEX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_ENGINE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_POLICY_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LIVE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MESH_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    MESH_MESSAGES_SENT_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MEMBER_EVENTS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CACHED_PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_PREDICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_MISPREDICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESH_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESH_MESSAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOOP_STALLS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOOP_LAG_MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    default_policy: str
    requests_total: int
    requests_failed: int
    retries_total: int
    prompt_tokens_total: int
    cached_prompt_tokens_total: int
    index_blocks: int
    index_entries: int
    requests_by_engine: _containers.ScalarMap[str, int]
    requests_by_policy: _containers.ScalarMap[str, int]
    ready: bool
    live_members: int
    mesh_bytes_sent: int
    mesh_messages_sent: int
    outcomes: _containers.ScalarMap[str, int]
    in_flight: int
    draining: bool
    member_events: _containers.ScalarMap[str, int]
    predicted_cached_prompt_tokens_total: int
    route_predictions_total: int
    route_mispredictions_total: int
    mesh_bytes_received: int
    mesh_messages_received: int
    convergence_lag_seconds: _containers.ScalarMap[str, float]
    event_loop_stalls_total: int
    event_loop_lag_max_seconds: float
    def __init__(self, node_id: _Optional[str] = ..., default_policy: _Optional[str] = ..., requests_total: _Optional[int] = ..., requests_failed: _Optional[int] = ..., retries_total: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., cached_prompt_tokens_total: _Optional[int] = ..., index_blocks: _Optional[int] = ..., index_entries: _Optional[int] = ..., requests_by_engine: _Optional[_Mapping[str, int]] = ..., requests_by_policy: _Optional[_Mapping[str, int]] = ..., ready: _Optional[bool] = ..., live_members: _Optional[int] = ..., mesh_bytes_sent: _Optional[int] = ..., mesh_messages_sent: _Optional[int] = ..., outcomes: _Optional[_Mapping[str, int]] = ..., in_flight: _Optional[int] = ..., draining: _Optional[bool] = ..., member_events: _Optional[_Mapping[str, int]] = ..., predicted_cached_prompt_tokens_total: _Optional[int] = ..., route_predictions_total: _Optional[int] = ..., route_mispredictions_total: _Optional[int] = ..., mesh_bytes_received: _Optional[int] = ..., mesh_messages_received: _Optional[int] = ..., convergence_lag_seconds: _Optional[_Mapping[str, float]] = ..., event_loop_stalls_total: _Optional[int] = ..., event_loop_lag_max_seconds: _Optional[float] = ...) -> None: ...

class ListMembersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Member(_message.Message):
    __slots__ = ("node_id", "addr", "state", "incarnation", "is_self", "owned_engines")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    IS_SELF_FIELD_NUMBER: _ClassVar[int]
    OWNED_ENGINES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    addr: str
    state: str
    incarnation: int
    is_self: bool
    owned_engines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., addr: _Optional[str] = ..., state: _Optional[str] = ..., incarnation: _Optional[int] = ..., is_self: _Optional[bool] = ..., owned_engines: _Optional[_Iterable[str]] = ...) -> None: ...

class ListMembersResponse(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("draining", "in_flight")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    in_flight: int
    def __init__(self, draining: _Optional[bool] = ..., in_flight: _Optional[int] = ...) -> None: ...

class SetLogLevelRequest(_message.Message):
    __slots__ = ("level",)
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    level: str
    def __init__(self, level: _Optional[str] = ...) -> None: ...

class SetLogLevelResponse(_message.Message):
    __slots__ = ("previous",)
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    previous: str
    def __init__(self, previous: _Optional[str] = ...) -> None: ...

class GetIndexDigestRequest(_message.Message):
    __slots__ = ("engine_id",)
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    def __init__(self, engine_id: _Optional[str] = ...) -> None: ...

class WorkerDigest(_message.Message):
    __slots__ = ("worker", "blocks", "xor_hashes")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    XOR_HASHES_FIELD_NUMBER: _ClassVar[int]
    worker: str
    blocks: int
    xor_hashes: int
    def __init__(self, worker: _Optional[str] = ..., blocks: _Optional[int] = ..., xor_hashes: _Optional[int] = ...) -> None: ...

class GetIndexDigestResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerDigest]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerDigest, _Mapping]]] = ...) -> None: ...
