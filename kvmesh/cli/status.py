"""``kvmesh status``: one node's view of the mesh, on one screen.

Three Admin calls to the node at ``--target`` (ListMembers, ListEngines,
GetStats) become one snapshot (:func:`snapshot`, plain data, what ``--json``
prints) and one fixed-width screen (:func:`render`): the members (state,
incarnation, address, owned engines, how far behind this node's logs each
one was), the engines (owner, health, this node's breaker, KV-event
sequence, indexed blocks, in-flight requests of the whole mesh, hit rate of
this node's requests, event lag on the owner while the engine is up), how
late this node's event loop ran (stalls, largest lag) and this node's
routing quality (requests, hit rate, predicted against engine-reported
cached tokens, mispredicted routes). ``--watch``
redraws it every few seconds (with ``--json``: one JSON document a line).

GetStats counts requests two ways, and the screen keeps them apart:
``requests_total`` (``failed``, ``retries``) counts the generate requests
this node admitted for engines (Generate calls and the HTTP API's, past the
request's checks and admission), while ``outcomes`` counts every call that
ended (Generate and Route, the HTTP API's, and calls refused for their
token) by status and reason: a Route call is in the second only.

Authentication as the node's API wants it: TLS unless ``--insecure``
(``--tls-ca`` to trust a private CA, ``--tls-cert``/``--tls-key`` when the
node asks for client certificates), and an admin bearer token from
``--token-file`` (the Admin calls need one when the node has tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from kvmesh.cli.client_flags import TARGET_ENV, TOKEN_ENV, connection_hint, token_from_file
from kvmesh.client.config import DEFAULT_TARGET
from kvmesh.client.errors import from_rpc_error
from kvmesh_pb.v1 import router_pb2 as pb
from kvmesh_pb.v1 import router_pb2_grpc as pb_grpc
from router.auth import ADMIN

__all__ = ["configure_parser", "open_channel", "render", "run", "snapshot"]

# A member's states as ListMembers sends them (mesh/swim_messages.py's ALIVE
# and SUSPECT; not imported: `kvmesh status` loads no mesh module).
_ALIVE, _SUSPECT = "alive", "suspect"

_PROG = "kvmesh status"
_CLEAR = "\033[H\033[2J"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"the node to ask (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON (for scripts)")
    p.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="redraw every SECONDS until interrupted (with --json: one document a line); "
        "0, the default: once",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default %(default)s)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, for a node that serves without TLS (run with --insecure, "
        "or with --auth-token-file and no --tls-cert)",
    )
    p.add_argument("--tls-ca", default="", help="PEM CA to verify the node's certificate (default: system)")
    p.add_argument("--tls-cert", default="", help="PEM client certificate, for a node with --tls-client-ca")
    p.add_argument("--tls-key", default="", help="its PEM private key")
    p.add_argument(
        "--tls-server-name", default="", help="the name to expect in the node's certificate (default: HOST)"
    )
    p.add_argument(
        "--token-file",
        default="",
        help="file holding an admin bearer token: its first word, or a node's --auth-token-file (the "
        f"first admin token) (default: ${TOKEN_ENV}, if set)",
    )


# --- talking to the node ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    insecure: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    token: str = ""


def credentials_from_args(args: argparse.Namespace) -> Credentials:
    """ValueError (a message for the operator) when the flags do not fit together."""
    if not args.watch >= 0:
        raise ValueError(f"--watch must be >= 0 seconds (0: once), got {args.watch}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.insecure and (args.tls_ca or args.tls_cert or args.tls_key):
        raise ValueError("--insecure and --tls-* exclude each other")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    return Credentials(
        insecure=args.insecure,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=token_from_file(args.token_file, ADMIN) if args.token_file else os.environ.get(TOKEN_ENV, ""),
    )


def open_channel(target: str, creds: Credentials) -> grpc.Channel:
    """The one place a channel is made: TLS unless ``creds.insecure``."""
    if creds.insecure:
        return grpc.insecure_channel(target)
    channel_creds = grpc.ssl_channel_credentials(
        root_certificates=Path(creds.tls_ca).read_bytes() if creds.tls_ca else None,
        private_key=Path(creds.tls_key).read_bytes() if creds.tls_key else None,
        certificate_chain=Path(creds.tls_cert).read_bytes() if creds.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", creds.tls_server_name)] if creds.tls_server_name else []
    return grpc.secure_channel(target, channel_creds, options=options)


def fetch(
    channel: grpc.Channel, token: str, timeout: float
) -> tuple[pb.ListMembersResponse, pb.ListEnginesResponse, pb.GetStatsResponse]:
    admin = pb_grpc.AdminStub(channel)
    meta = (("authorization", f"Bearer {token}"),) if token else None
    members = admin.ListMembers(pb.ListMembersRequest(), timeout=timeout, metadata=meta)
    engines = admin.ListEngines(pb.ListEnginesRequest(), timeout=timeout, metadata=meta)
    stats = admin.GetStats(pb.GetStatsRequest(), timeout=timeout, metadata=meta)
    return members, engines, stats


# --- the snapshot (plain data) ---------------------------------------------------------------------


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def snapshot(
    target: str,
    members: pb.ListMembersResponse,
    engines: pb.ListEnginesResponse,
    stats: pb.GetStatsResponse,
    now: float,
) -> dict[str, Any]:
    """What ``--json`` prints; ratios are None when nothing was counted yet."""
    lag = dict(stats.convergence_lag_seconds)
    outcomes = dict(stats.outcomes)
    return {
        "target": target,
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "node": {
            "node_id": stats.node_id,
            "ready": stats.ready,
            "draining": stats.draining,
            "default_policy": stats.default_policy,
            "live_members": stats.live_members,
            "in_flight": stats.in_flight,
            "index_entries": stats.index_entries,
            "mesh_bytes_sent": stats.mesh_bytes_sent,
            "mesh_bytes_received": stats.mesh_bytes_received,
            "mesh_messages_sent": stats.mesh_messages_sent,
            "mesh_messages_received": stats.mesh_messages_received,
            "event_loop_stalls": stats.event_loop_stalls_total,
            "event_loop_lag_max_seconds": stats.event_loop_lag_max_seconds,
        },
        "routing": {
            "requests": stats.requests_total,  # generate requests admitted (module docstring)
            "requests_failed": stats.requests_failed,
            "retries": stats.retries_total,
            "calls_ended": sum(outcomes.values()),  # every call, Route too (module docstring)
            "calls_ok": outcomes.get("OK", 0),
            "outcomes": outcomes,
            "prompt_tokens": stats.prompt_tokens_total,
            "cached_prompt_tokens": stats.cached_prompt_tokens_total,
            "hit_rate": _ratio(stats.cached_prompt_tokens_total, stats.prompt_tokens_total),
            "predicted_cached_prompt_tokens": stats.predicted_cached_prompt_tokens_total,
            "route_predictions": stats.route_predictions_total,
            "route_mispredictions": stats.route_mispredictions_total,
            "misprediction_rate": _ratio(stats.route_mispredictions_total, stats.route_predictions_total),
        },
        "members": [
            {
                "node_id": m.node_id,
                "address": m.addr,
                "state": m.state,
                "incarnation": m.incarnation,
                "is_self": m.is_self,
                "owned_engines": list(m.owned_engines),
                "convergence_lag_seconds": lag.get(m.node_id),
            }
            for m in members.members
        ],
        "engines": [_engine(e) for e in engines.engines],
    }


def _engine(e: pb.EngineStatus) -> dict[str, Any]:
    return {
        "engine_id": e.spec.engine_id,
        "model": e.spec.model,
        "endpoint": e.spec.endpoint,
        "owner": e.owner_node,
        "healthy": e.healthy,
        "breaker": e.circuit,
        "worker_seqs": dict(sorted(e.worker_seqs.items())),
        "cached_blocks": e.cached_blocks,
        "in_flight": e.in_flight,
        "prompt_tokens": e.prompt_tokens,
        "cached_prompt_tokens": e.cached_prompt_tokens,
        "hit_rate": _ratio(e.cached_prompt_tokens, e.prompt_tokens),
        "event_lag_seconds": e.event_lag_seconds if e.event_lag_seconds >= 0 else None,
        "cached_blocks_by_tier": dict(e.cached_blocks_by_tier),
        "events_refused": e.events_refused,  # why its KV events are not indexed ("" while they are)
    }


# --- the screen ------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def _bytes(n: int) -> str:
    size, unit = float(n), "B"
    for bigger in ("KB", "MB", "GB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _seq(seqs: dict[str, int]) -> str:
    if not seqs:
        return "-"
    return "/".join(str(s) for s in seqs.values())


def _live(members: list[dict[str, Any]]) -> str:
    """The live members (alive and suspect: a suspect is a member until it
    is declared dead), the suspects said apart as
    ``kvmesh_mesh_members{state}`` counts them; both from the one list."""
    suspect = sum(m["state"] == _SUSPECT for m in members)
    live = suspect + sum(m["state"] == _ALIVE for m in members)
    return f"{live} live, {suspect} of them suspect" if suspect else f"{live} live"


def render(snap: dict[str, Any]) -> str:
    """The screen: a header, members, engines, routing quality."""
    node, routing = snap["node"], snap["routing"]
    state = "draining" if node["draining"] else ("ready" if node["ready"] else "joining")
    lines = [
        f"kvmesh status  {node['node_id']} at {snap['target']}  {state}  policy {node['default_policy']}"
        f"  {snap['time']}",
        f"  in flight here {node['in_flight']}  index {node['index_entries']} blocks  mesh out "
        f"{_bytes(node['mesh_bytes_sent'])} / {node['mesh_messages_sent']} msgs, in "
        f"{_bytes(node['mesh_bytes_received'])} / {node['mesh_messages_received']} msgs",
        f"  event loop: {node['event_loop_stalls']} stalls, "
        f"largest lag since start {_secs(node['event_loop_lag_max_seconds'])}",
        "",
        f"MEMBERS ({_live(snap['members'])})",
    ]
    members = [
        (
            ("*" if m["is_self"] else " ") + m["node_id"],
            m["state"],
            str(m["incarnation"]),
            m["address"],
            ",".join(m["owned_engines"]) or "-",
            _secs(m["convergence_lag_seconds"]),
        )
        for m in snap["members"]
    ]
    lines += _table(("NODE", "STATE", "INC", "ADDRESS", "OWNS", "LAG"), members, {2, 5})
    lines += ["", f"ENGINES ({len(snap['engines'])})"]
    engines = [
        (
            e["engine_id"],
            e["owner"] or "-",
            "up" if e["healthy"] else "DOWN",
            e["breaker"],
            _seq(e["worker_seqs"]),
            str(e["cached_blocks"]),
            f"{e['in_flight']:g}",
            _pct(e["hit_rate"]),
            # A down engine sends no events: the lag of its last batch says nothing of now.
            _secs(e["event_lag_seconds"] if e["healthy"] else None),
        )
        for e in snap["engines"]
    ]
    header = (
        "ENGINE",
        "OWNER",
        "HEALTH",
        "BREAKER",
        "SEQ",
        "BLOCKS",
        "MESH IN-FLIGHT",
        "HIT RATE",
        "EVENT LAG",
    )
    lines += _table(header, engines, {4, 5, 6, 7, 8})
    refused = [e for e in snap["engines"] if e.get("events_refused")]
    lines += [f"  ! {e['engine_id']}: {e['events_refused']}" for e in refused]
    ended = ", ".join(f"{k} {v}" for k, v in sorted(routing["outcomes"].items())) or "-"
    lines += [
        "",
        "ROUTING (requests through this node)",
        f"  generate requests admitted {routing['requests']}  failed {routing['requests_failed']}"
        f"  retries {routing['retries']}",
        f"  calls ended {routing['calls_ended']} (Generate, Route, HTTP API, refused tokens): {ended}",
        f"  prompt tokens {routing['prompt_tokens']}, cached {routing['cached_prompt_tokens']} "
        f"(hit rate {_pct(routing['hit_rate'])}); predicted cached "
        f"{routing['predicted_cached_prompt_tokens']}",
        f"  mispredicted routes {routing['route_mispredictions']} of {routing['route_predictions']} "
        f"({_pct(routing['misprediction_rate'])}): the engine held less than the route predicted",
    ]
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------------------


def _explain(e: grpc.RpcError, target: str, insecure: bool) -> str:
    code = e.code()
    hint = ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = " (give --token-file with an admin token)"
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        hint = " (the token is not an admin token)"
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        said = connection_hint(e.details() or "", insecure)
        said = said or "is it running? plaintext nodes need --insecure, TLS ones --tls-ca"
        hint = f" ({said})"
    err = from_rpc_error(e)
    said = err.without_hint() if hint else str(err)  # the hint in the CLI's flags, not the library's
    return f"{_PROG}: {target}: {said}{hint}"  # as kvmesh generate says it


def _once(channel: grpc.Channel, args: argparse.Namespace, token: str) -> str:
    members, engines, stats = fetch(channel, token, args.timeout)
    snap = snapshot(args.target, members, engines, stats, time.time())
    return json.dumps(snap, sort_keys=True) if args.json else render(snap)


def run(args: argparse.Namespace) -> int:
    try:
        creds = credentials_from_args(args)
        channel = open_channel(args.target, creds)
    except (ValueError, OSError) as e:
        print(f"{_PROG}: {e}", file=sys.stderr)
        return 2
    with channel:  # a reader that goes away (`| head`): kvmesh.cli.main ends quietly
        return _print(channel, args, creds.token)


def _print(channel: grpc.Channel, args: argparse.Namespace, token: str) -> int:
    if args.watch <= 0:
        try:
            print(_once(channel, args, token), flush=True)
        except grpc.RpcError as e:
            print(_explain(e, args.target, args.insecure), file=sys.stderr)
            return 1
        return 0
    try:
        while True:
            try:
                out = _once(channel, args, token)
            except grpc.RpcError as e:
                out = _explain(e, args.target, args.insecure)
            print(out if args.json else _CLEAR + out, flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
