"""``kvmesh generate``: stream a completion through any node to the terminal.

The answer's text goes to stdout as it arrives; where the request went
(engine, predicted cached blocks) and how it finished (prompt tokens the
engine had cached, time to first token on the node, attempts) go to stderr,
so ``kvmesh generate ... > answer.txt`` keeps only the answer. ``--json``
prints every event as one JSON object a line instead. ``--route-only``
asks for the decision alone (``kvmesh route``'s output; nothing is
generated or recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from kvmesh.cli.client_flags import (
    add_connection_flags,
    add_prompt_flags,
    client_from_args,
    explain,
    prompt_from_args,
)
from kvmesh.cli.route import print_route
from kvmesh.client import Chunk, Client, KvmeshError, Prompt, Result, Routed

__all__ = ["configure_parser", "run"]

_PROG = "kvmesh generate"


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_prompt_flags(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (0: the node's default)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default %(default)s)")
    s.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling, in (0, 1] (0: 1, no cut)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument(
        "--route-only",
        action="store_true",
        help="only show where it would go: engine, cached blocks, candidates",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event (routed, chunk, result)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the answer: nothing on stderr")
    add_connection_flags(p)


def _route_only(client: Client, prompt: Prompt, args: argparse.Namespace) -> None:
    r = client.route(
        prompt,
        model=args.model,
        session_key=args.session_key,
        policy=args.policy,
        lora_name=args.lora,
        cache_salt=args.cache_salt,
        request_id=args.request_id,
        dry_run=True,
    )
    if args.json:
        print(json.dumps({"route": dataclasses.asdict(r)}))
    else:
        print_route(r, sys.stdout)


class _Screen:
    """Shows the events: the answer's text on stdout, the rest on stderr
    (``--json``: every event on stdout). The answer ends its line, so that
    the shell's prompt (or what comes next in a file) starts on its own."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._open = False  # answer text on stdout that does not end its line yet

    def show(self, event: Routed | Chunk | Result) -> None:
        if self.args.json:
            kind = {Routed: "routed", Chunk: "chunk", Result: "result"}[type(event)]
            print(json.dumps({kind: dataclasses.asdict(event)}), flush=True)
            return
        if isinstance(event, Chunk):
            text = event.text if event.text else " ".join(map(str, event.token_ids)) + " "
            sys.stdout.write(text)
            sys.stdout.flush()
            self._open = not text.endswith("\n")
            return
        if isinstance(event, Result):
            self.end_answer()
        if self.args.quiet:
            return
        if isinstance(event, Routed):
            again = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            print(
                f"[{event.request_id} -> {event.engine_id}{again}, "
                f"{event.predicted_cached_blocks} prompt blocks predicted cached]",
                file=sys.stderr,
                flush=True,
            )
            return
        why = f" ({event.error})" if event.error else ""
        print(
            f"[{event.finish_reason}{why}: {event.completion_tokens} tokens from {event.engine_id}; "
            f"prompt {event.prompt_tokens} tokens, {event.cached_prompt_tokens} cached; "
            f"first token after {event.ttft_ms:.1f} ms on the node; {event.attempts} attempt(s)]",
            file=sys.stderr,
        )

    def end_answer(self) -> None:
        """End the answer's line on stdout, if it left one open."""
        if self._open:
            print(flush=True)
            self._open = False


def run(args: argparse.Namespace) -> int:
    try:
        prompt = prompt_from_args(args)
        client = client_from_args(args)
    except ValueError as e:
        print(f"{_PROG}: {e}", file=sys.stderr)
        return 2
    screen = _Screen(args)
    try:
        with client:
            if args.route_only:
                _route_only(client, prompt, args)
                return 0
            for event in client.generate(
                prompt,
                model=args.model,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                stop=args.stop,
                ignore_eos=args.ignore_eos,
                seed=args.seed,
                session_key=args.session_key,
                policy=args.policy,
                lora_name=args.lora,
                cache_salt=args.cache_salt,
                request_id=args.request_id,
            ):
                screen.show(event)
    except KvmeshError as e:
        screen.end_answer()
        print(f"{_PROG}: {explain(e, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the call is cancelled on the node as the stream is closed
        print(file=sys.stderr)
        return 130
    return 0
