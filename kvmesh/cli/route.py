"""``kvmesh route``: which engine the mesh would send a prompt to, and why.

Asks any node (``Router.Route``) and prints its decision: the engine, the
prompt blocks it is predicted to hold, and every candidate with its overlap
(on its GPUs, then past them on its other cache tiers), load and score. A
dry run by default (the node records nothing); with
``--record`` the pick counts as load on the engine for a few seconds, as for
a caller that then sends the request to the engine itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TextIO

from kvmesh.cli.client_flags import (
    add_connection_flags,
    add_prompt_flags,
    client_from_args,
    explain,
    prompt_from_args,
)
from kvmesh.client import Candidate, ClientConfigError, KvmeshError, RouteResult

__all__ = ["configure_parser", "print_route", "run"]

_PROG = "kvmesh route"


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_prompt_flags(p)
    p.add_argument("--record", action="store_true", help="a real pick: it counts as load on the engine")
    p.add_argument("--json", action="store_true", help="print the decision as one JSON object")
    add_connection_flags(p)


def print_route(r: RouteResult, out: TextIO) -> None:
    """The decision, for a terminal."""
    d = r.decision
    print(f"request     {r.request_id}", file=out)
    print(f"engine      {r.engine_id}  {r.endpoint}", file=out)
    print(f"cached      {r.predicted_cached_blocks} of {r.prompt_blocks} prompt blocks (predicted)", file=out)
    print(f"policy      {d.policy}: {d.reason}", file=out)
    width = max([len("engine"), *(len(c.engine_id) for c in d.candidates)])
    print(f"candidates  {len(d.candidates)}", file=out)
    print(f"    {'engine':<{width}}  {'overlap':>7}  {'load':>8}  {'score':>10}  other tiers", file=out)
    for c in sorted(d.candidates, key=lambda c: (not c.chosen, c.score)):
        mark = "*" if c.chosen else " "
        print(
            f"  {mark} {c.engine_id:<{width}}  {c.overlap_blocks:>7}  {c.load:>8.2f}  {c.score:>10.3f}"
            f"  {_other_tiers(c)}".rstrip(),
            file=out,
        )


def _other_tiers(c: Candidate) -> str:
    """``+12 host, +3 disk``: prompt blocks past the GPU ones, per tier holding them."""
    tiers = (("host", c.host_blocks), ("disk", c.disk_blocks), ("external", c.external_blocks))
    return ", ".join(f"+{n} {name}" for name, n in tiers if n) or "-"


def run(args: argparse.Namespace) -> int:
    try:
        prompt = prompt_from_args(args)
        client = client_from_args(args)
    except (ValueError, ClientConfigError) as e:
        print(f"{_PROG}: {e}", file=sys.stderr)
        return 2
    try:
        with client:
            r = client.route(
                prompt,
                model=args.model,
                session_key=args.session_key,
                policy=args.policy,
                lora_name=args.lora,
                cache_salt=args.cache_salt,
                request_id=args.request_id,
                dry_run=not args.record,
            )
    except KvmeshError as e:
        print(f"{_PROG}: {explain(e, args)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
    else:
        print_route(r, sys.stdout)
    return 0
