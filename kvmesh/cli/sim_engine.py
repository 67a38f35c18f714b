"""``kvmesh sim-engine``: run a simulated vLLM-like engine.

Flags map one to one onto :class:`SimEngineConfig` (timing flags onto its
:class:`TimingConfig`); every default and the defaults quoted in the help
come from those dataclasses. The engine itself is
``engine_adapters.sim_engine`` (HTTP API in its module docstrings).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import re
import sys

import structlog

from engine_adapters.sim_engine.config import EVENT_FORMATS, LOG_FORMATS, LOG_LEVELS, SimEngineConfig
from engine_adapters.sim_engine.timing import TimingConfig
from router.logs import line_processors


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = SimEngineConfig()
    t = d.timing
    a = parser.add_argument
    a("--host", default=d.host, help=f"HTTP bind address (default {d.host})")
    a("--port", type=int, default=d.port, help=f"HTTP port; 0 picks a free one (default {d.port})")
    a("--model", default=d.model, help=f"served model name (default {d.model})")
    a(
        "--model-path",
        default=d.model_path,
        help="local directory with a tokenizer.json, reported to SGLang's router as the model path",
    )
    a(
        "--lora-modules",
        "--lora",
        nargs="+",
        action="extend",
        metavar="NAME[=PATH]",
        help="LoRA adapters served beside the model, as vLLM's --lora-modules (the path is ignored): "
        "a request names one as its model (or SGLang's lora_path) and gets its own cached blocks "
        f"(default: {', '.join(d.lora_modules) or 'none'})",
    )
    a("--block-size", type=int, default=d.block_size, help=f"tokens per KV block (default {d.block_size})")
    a(
        "--num-gpu-blocks",
        type=int,
        default=d.num_gpu_blocks,
        help=f"KV blocks in the pool (default {d.num_gpu_blocks})",
    )
    a(
        "--num-host-blocks",
        type=int,
        default=d.num_host_blocks,
        help="host tier (KV offloading to CPU memory), in blocks: evicted GPU blocks move there and are "
        f"loaded back instead of recomputed, published with medium CPU (default {d.num_host_blocks}: none)",
    )
    a(
        "--host-load-ms-per-token",
        type=float,
        default=t.host_load_ms_per_token,
        help="added step cost per prompt token loaded from the host tier "
        f"(default {t.host_load_ms_per_token:g})",
    )
    a(
        "--max-num-seqs",
        type=int,
        default=t.max_num_seqs,
        help=f"max running sequences (default {t.max_num_seqs})",
    )
    a(
        "--max-num-batched-tokens",
        type=int,
        default=t.max_num_batched_tokens,
        help=f"token budget of one step (chunked prefill; default {t.max_num_batched_tokens})",
    )
    a(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help=f"max prompt + output tokens (default {d.max_model_len})",
    )
    a(
        "--decode-base-ms",
        type=float,
        default=t.decode_base_ms,
        help=f"fixed cost of a step (default {t.decode_base_ms:g})",
    )
    a(
        "--decode-per-seq-ms",
        type=float,
        default=t.decode_per_seq_ms,
        help=f"added step cost per scheduled sequence (default {t.decode_per_seq_ms:g})",
    )
    a(
        "--prefill-ms-per-token",
        type=float,
        default=t.prefill_ms_per_token,
        help=f"added step cost per uncached prompt token (default {t.prefill_ms_per_token:g})",
    )
    a(
        "--time-scale",
        type=float,
        default=t.time_scale,
        help="multiply every simulated duration (0.1 = ten times faster than real; "
        f"default {t.time_scale:g})",
    )
    a(
        "--max-waiting",
        type=int,
        default=d.max_waiting,
        help="requests allowed to wait for admission; past it a request gets HTTP 429 'queue full' "
        f"(default {d.max_waiting}: unbounded)",
    )
    a(
        "--eos-prob",
        type=float,
        default=d.eos_prob,
        help=f"probability that a sampled token is EOS (unless ignore_eos); default {d.eos_prob:g}",
    )
    a(
        "--kv-events-endpoint",
        default=d.kv_events_endpoint,
        help=f"ZMQ PUB endpoint for KV events (bound); '' disables events (default {d.kv_events_endpoint})",
    )
    a(
        "--kv-replay-endpoint",
        default=d.kv_replay_endpoint,
        help=f"ZMQ ROUTER replay endpoint; '' disables replay (default {d.kv_replay_endpoint})",
    )
    a("--kv-topic", default=d.kv_topic, help=f"ZMQ topic frame (default {d.kv_topic!r}, like vLLM)")
    a(
        "--kv-event-format",
        choices=EVENT_FORMATS,
        default=d.kv_event_format,
        help=f"map = vLLM >= 0.24 tagged maps, array = vLLM <= 0.23 positional (default {d.kv_event_format})",
    )
    a(
        "--kv-buffer-steps",
        type=int,
        default=d.kv_buffer_steps,
        help=f"replay buffer, in batches (default {d.kv_buffer_steps})",
    )
    a(
        "--data-parallel-rank",
        type=int,
        default=d.data_parallel_rank,
        help=f"DP rank stamped on batches; the ZMQ ports are offset by it (default {d.data_parallel_rank})",
    )
    a(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed for outputs without a request seed and faults (default {d.seed})",
    )
    a(
        "--hash-seed",
        type=int,
        default=d.hash_seed,
        help="seed of the engine's block hashes (default: random per process, like vLLM)",
    )
    a(
        "--fail-rate",
        type=float,
        default=d.fail_rate,
        help=f"probability that a request gets HTTP 503 before its first token (default {d.fail_rate:g})",
    )
    a("--log-level", default=d.log_level, choices=LOG_LEVELS, help=f"(default {d.log_level})")
    a(
        "--log-format",
        # The image sets KVMESH_LOG_FORMAT=json: a container's logs go to a pipeline.
        default=os.environ.get("KVMESH_LOG_FORMAT", d.log_format),
        choices=LOG_FORMATS,
        help=f"one event per line, key=value text or JSON (default $KVMESH_LOG_FORMAT, else {d.log_format})",
    )


def _lora_names(values: list[str] | None) -> tuple[str, ...]:
    """``--lora-modules`` values (``name`` or vLLM's ``name=path``) -> names."""
    if values is None:
        return SimEngineConfig().lora_modules
    return tuple(v.partition("=")[0] for v in values)


def config_from_args(args: argparse.Namespace) -> SimEngineConfig:
    """The engine's configuration; raises ValueError if a value is invalid."""
    timing = TimingConfig(
        decode_base_ms=args.decode_base_ms,
        decode_per_seq_ms=args.decode_per_seq_ms,
        prefill_ms_per_token=args.prefill_ms_per_token,
        host_load_ms_per_token=args.host_load_ms_per_token,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        time_scale=args.time_scale,
    )
    return SimEngineConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        model_path=args.model_path,
        lora_modules=_lora_names(args.lora_modules),
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        num_host_blocks=args.num_host_blocks,
        max_model_len=args.max_model_len,
        timing=timing,
        eos_prob=args.eos_prob,
        max_waiting=args.max_waiting,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_replay_endpoint=args.kv_replay_endpoint,
        kv_topic=args.kv_topic,
        kv_event_format=args.kv_event_format,
        kv_buffer_steps=args.kv_buffer_steps,
        data_parallel_rank=args.data_parallel_rank,
        seed=args.seed,
        hash_seed=args.hash_seed,
        fail_rate=args.fail_rate,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _configure_logging(level: str, fmt: str) -> None:
    if not structlog.is_configured():
        structlog.configure(
            processors=line_processors(fmt),  # the router's lines, without its run-time level
            wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),  # stdout is for READY
        )


def _as_flags(message: str) -> str:
    """The config's words for a value (``block_size``) as the user typed it (``--block-size``)."""
    return re.sub(r"\b([a-z]+(?:_[a-z]+)+)\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


# What binding a port can fail with: taken, not an address of this host, not allowed.
_CANNOT_LISTEN = frozenset((errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES))


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"kvmesh sim-engine: {_as_flags(str(e))}", file=sys.stderr)
        return 2
    _configure_logging(config.log_level, config.log_format)
    # Imported here so that building the parser (and --help) loads neither aiohttp nor ZMQ.
    import zmq

    from engine_adapters.sim_engine.server import serve

    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(serve(config))
        return uvloop.run(serve(config))
    except (OSError, zmq.ZMQError) as e:
        if e.errno not in _CANNOT_LISTEN:
            raise
        print(f"kvmesh sim-engine: cannot listen: {e} (see --port and the --kv-* endpoints)", file=sys.stderr)
        return 1
