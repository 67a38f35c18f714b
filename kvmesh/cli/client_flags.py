"""The flags every client command shares (`kvmesh generate`, `kvmesh route`):
where to connect and how to authenticate, and what the prompt is.

Defaults come from :class:`kvmesh.client.ClientConfig`; the target and the
token may also come from the environment (``KVMESH_TARGET``,
``KVMESH_TOKEN``), so that neither has to be typed on every command line,
and a token never shows in the process list.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kvmesh.client import (
    DEFAULT_TARGET,
    Client,
    ClientConfig,
    ClientConfigError,
    KvmeshError,
    Prompt,
    TlsConfig,
)
from kvmesh.client.errors import tls_failure
from router.auth import CLIENT

__all__ = [
    "TARGET_ENV",
    "TOKEN_ENV",
    "add_connection_flags",
    "add_prompt_flags",
    "client_from_args",
    "explain",
    "prompt_from_args",
    "token_from_file",
]

TARGET_ENV = "KVMESH_TARGET"
TOKEN_ENV = "KVMESH_TOKEN"


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    d = ClientConfig()
    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
        help="HOST:PORT of any node, or of a DNS name in front of all of them (dialed as dns:///HOST:PORT, "
        "calls spread over every address), or a gRPC target URI "
        f"(default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no TLS: for nodes that serve without it (run with --insecure, "
        "or with --auth-token-file and no --tls-cert)",
    )
    g.add_argument(
        "--tls-ca", default="", help="CA file (PEM) of the nodes' certificates (default: system CAs)"
    )
    g.add_argument("--tls-cert", default="", help="client certificate (PEM), for nodes that require one")
    g.add_argument("--tls-key", default="", help="the client certificate's key (PEM)")
    g.add_argument(
        "--tls-server-name",
        default="",
        help="name to check the node's certificate against (default: the host)",
    )
    g.add_argument(
        "--token-file",
        default="",
        help="file holding a bearer token: its first word, or a node's --auth-token-file (the first "
        f"client token) (default: ${TOKEN_ENV}, if set)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=d.timeout,
        help="deadline of the call, in seconds (default %(default)s)",
    )


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the prompt as text (tokenized by the node); - reads stdin")
    p.add_argument(
        "--tokens", nargs="+", type=int, metavar="ID", help="the prompt as token ids, used as they are"
    )
    p.add_argument("--model", default="", help="model name (default: the only model the fleet serves)")
    p.add_argument("--session-key", default="", help="session key (consistent_hash; a tie-breaker hint)")
    p.add_argument("--policy", default="", help="routing policy for this request (default: the node's)")
    p.add_argument("--lora", default="", help="LoRA adapter name")
    p.add_argument("--cache-salt", default="", help="cache salt (a tenant's own cache)")
    p.add_argument("--request-id", default="", help="request id (default: the node makes one)")


def prompt_from_args(args: argparse.Namespace) -> Prompt:
    """The prompt; raises ValueError (a usage error) unless exactly one was given."""
    if (args.text is None) == (args.tokens is None):
        raise ValueError("give the prompt as TEXT or as --tokens ID ..., one of the two")
    if args.tokens is not None:
        return list(args.tokens)
    text: str = sys.stdin.read() if args.text == "-" else args.text
    return text


def token_from_file(path: str, role: str) -> str:
    """The token in ``path`` for ``role`` (``CLIENT`` or ``ADMIN``). The file is
    one token, or a node's --auth-token-file (``TOKEN [ROLE]`` a line, ``#``
    comments, no role meaning client): the first token of that role, else
    the first token. ValueError if it cannot be read or holds none."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read the token file {path!r}: {e}") from None
    tokens = [w for line in text.splitlines() if (w := line.split("#", 1)[0].split())]
    if not tokens:
        raise ValueError(f"the token file {path!r} holds no token")
    for words in tokens:
        if (words[1] if len(words) > 1 else CLIENT) == role:
            return words[0]
    return tokens[0][0]


def _token(args: argparse.Namespace) -> str:
    """The token: from the token file (a client token), else ``$KVMESH_TOKEN``."""
    if not args.token_file:
        return os.environ.get(TOKEN_ENV, "")
    try:
        return token_from_file(args.token_file, CLIENT)
    except ValueError as e:
        raise ClientConfigError(str(e)) from None


def connection_hint(message: str, insecure: bool) -> str | None:
    """What the flags likely got wrong, from gRPC's words on a connection
    that failed (None when they say nothing of TLS)."""
    m = message.lower()
    if insecure:
        if "socket closed" in m or "connection reset" in m:
            return (
                "the node closed the connection: if it serves TLS (it closes plaintext ones), "
                "drop --insecure (and give --tls-ca)"
            )
        return None
    return _FLAG_HINTS.get(tls_failure(message))


# connection_hint's words for each kind of TLS failure (kvmesh.client.errors.tls_failure).
_PLAINTEXT = (
    "TLS failed: a node that serves without TLS, run with --insecure or with "
    "--auth-token-file and no --tls-cert, speaks plaintext: add --insecure for it; "
    "a node with a private CA needs --tls-ca"
)
_FLAG_HINTS = {
    "name": "the node's certificate does not carry the name dialled: dial a name it carries, "
    "or give that name with --tls-server-name",
    "expired": "a certificate has expired or is not yet valid: the node's (it needs a new one), "
    "or this client's --tls-cert",
    "ca": "the node's certificate is not signed by a CA this client trusts: give its CA with --tls-ca",
    "plaintext": _PLAINTEXT,
    "handshake": _PLAINTEXT,
}


def explain(e: KvmeshError, args: argparse.Namespace) -> str:
    """The error for the terminal (with the request's id when the node gave
    one), and a hint where the flags are the likely cause."""
    if e.status == "UNAVAILABLE" and (hint := connection_hint(e.message, args.insecure)) is not None:
        said = e.without_hint()  # the hint in the CLI's flags instead of the library's arguments
        said = f"{said} (request {e.request_id})" if e.request_id else said
        return f"{said}\n({hint})"
    said = f"{e} (request {e.request_id})" if e.request_id else str(e)
    if e.status == "UNAVAILABLE" and "unhealthy" in e.message.lower():
        return (
            f"{said}\n(the node answers its health check NOT_SERVING: it is joining the mesh or "
            "draining, and the client sends calls only to serving nodes; `kvmesh status` says which)"
        )
    return said


def client_from_args(args: argparse.Namespace) -> Client:
    """The client the connection flags describe (ClientConfigError/ValueError if they cannot work)."""
    tls: bool | TlsConfig = False
    if not args.insecure:
        tls = TlsConfig(
            ca_file=args.tls_ca,
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            server_name=args.tls_server_name,
        )
    elif args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        raise ClientConfigError("--insecure turns TLS off: drop it, or the --tls-* flags")
    # One call: nothing to re-resolve.
    config = ClientConfig(timeout=args.timeout, reresolve_interval=0)
    return Client(args.target, tls=tls, token=_token(args), config=config)
