"""The gRPC service config a kvmesh client dials with, and its channel arguments.

The service config (gRPC's JSON document, the same in every language) says:

* ``loadBalancingConfig``: spread calls over every address behind the
  target (``round_robin``), instead of gRPC's default of one connection to
  the first address that answers (``pick_first``);
* ``methodConfig`` / ``retryPolicy``: retry UNAVAILABLE on Router calls and
  on Admin's reads. gRPC retries only a call that has received nothing yet,
  on another address; writes (RegisterEngine, DeregisterEngine,
  SetLogLevel) and Drain are never retried: a write whose answer was lost
  may have been applied;
* ``retryThrottling``: the retry budget (see
  :class:`kvmesh.client.config.RetryConfig`);
* ``healthCheckConfig``: watch each node's ``grpc.health.v1`` status for the
  Router service, so that joining and draining nodes get no new call.

:data:`SERVICE_CONFIG_JSON` is the default document: README.md shows it
for clients in other languages (a test keeps the two equal). Pure.
"""

from __future__ import annotations

import json
import math
from typing import Any

from kvmesh import __version__
from kvmesh.client.config import ClientConfig

__all__ = ["ADMIN_SERVICE", "ROUTER_SERVICE", "SERVICE_CONFIG_JSON", "channel_options", "service_config"]

ROUTER_SERVICE = "kvmesh.v1.Router"
ADMIN_SERVICE = "kvmesh.v1.Admin"
# Admin calls that change nothing: safe to send again.
_ADMIN_READS = ("ListEngines", "GetStats", "ListMembers", "GetIndexDigest")


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON ("0.1s"), exact to the nanosecond."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(cfg: ClientConfig) -> dict[str, Any]:
    """The service config for ``cfg`` as a JSON-ready dict."""
    doc: dict[str, Any] = {"loadBalancingConfig": [{cfg.load_balancing: {}}]}
    r = cfg.retry
    if r.max_attempts > 1:
        names: list[dict[str, str]] = [{"service": ROUTER_SERVICE}]
        names += [{"service": ADMIN_SERVICE, "method": m} for m in _ADMIN_READS]
        doc["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": r.max_attempts,
                    "initialBackoff": _duration(r.initial_backoff),
                    "maxBackoff": _duration(r.max_backoff),
                    "backoffMultiplier": r.backoff_multiplier,
                    "retryableStatusCodes": list(r.retryable_codes),
                },
            }
        ]
        doc["retryThrottling"] = {"maxTokens": r.throttle_max_tokens, "tokenRatio": r.throttle_token_ratio}
    if cfg.health_check_service:
        doc["healthCheckConfig"] = {"serviceName": cfg.health_check_service}
    return doc


def to_json(value: Any, indent: str = "", width: int = 88) -> str:
    """JSON that puts what fits in ``width`` on one line (readable in README.md)."""
    flat = json.dumps(value, separators=(", ", ": "))
    if len(indent) + len(flat) <= width or not isinstance(value, dict | list) or not value:
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    items = [inner + to_json(v, inner, width) for v in value]
    return "[\n" + ",\n".join(items) + f"\n{indent}]"


SERVICE_CONFIG_JSON = to_json(service_config(ClientConfig()))


def channel_options(cfg: ClientConfig) -> list[tuple[str, int | str]]:
    """gRPC channel arguments: the service config and what gRPC needs beside it."""
    opts: list[tuple[str, int | str]] = [
        ("grpc.service_config", json.dumps(service_config(cfg))),
        # Ours, not one a DNS TXT record could substitute.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1 if cfg.retry.max_attempts > 1 else 0),
        ("grpc.per_rpc_retry_buffer_size", cfg.retry_buffer_bytes),
        ("grpc.dns_min_time_between_resolutions_ms", math.ceil(cfg.dns_min_resolution_interval * 1000)),
        ("grpc.max_receive_message_length", cfg.max_receive_bytes),
        ("grpc.primary_user_agent", f"kvmesh-client/{__version__}"),
    ]
    return opts + list(cfg.channel_options)
