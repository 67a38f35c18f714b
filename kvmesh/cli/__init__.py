"""The `kvmesh` command: one subcommand per process kind.

Each subcommand lives in the module that implements it, which provides
``configure_parser(parser)`` and ``run(args) -> int``; this file only wires
them together and imports them lazily so `kvmesh --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# gRPC's C core logs at info by default (a failed TLS handshake, before the
# command's own message and hint): its errors only, unless the operator sets
# GRPC_VERBOSITY. Set before any subcommand imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "router": ("kvmesh.cli.router", "run a router node (gRPC API, KV-event subscribers, proxy)"),
    "sim-engine": (
        "kvmesh.cli.sim_engine",
        "run a simulated vLLM-like engine (OpenAI /v1/completions + ZMQ KV events)",
    ),
    "generate": ("kvmesh.cli.generate", "stream a completion through any node to the terminal"),
    "route": ("kvmesh.cli.route", "show which engine the mesh would pick for a prompt, and why"),
    "status": (
        "kvmesh.cli.status",
        "one node's view of the mesh on one screen: members, engines, routing quality",
    ),
    "demo": (
        "kvmesh.demo",
        "start simulated engines and a mesh of router nodes on this machine and compare policies",
    ),
    "bench": (
        "kvmesh.bench",
        "benchmarks: routing vs peers, index, convergence, proxy, overload, reliability (docs/)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all when None), so a
    broken or slow module cannot take the other subcommands down with it."""
    parser = argparse.ArgumentParser(
        prog="kvmesh",
        description="KV-cache-aware request router for LLM serving.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            mod = importlib.import_module(module)
            mod.configure_parser(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:
        # The reader went away (`| head`): done. Point stdout at /dev/null so
        # the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
