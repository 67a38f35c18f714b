"""Dialing: the target URI, credentials, channel arguments and call metadata.

One :class:`Dialer` per client holds what every dial of its target needs
(files are read once, when the client is made, so a wrong path fails
there), and opens sync or ``grpc.aio`` channels with it. TLS is on unless
the caller turns it off (``tls=False``) for a node that serves plaintext:
one run ``--insecure``, or with bearer tokens (``--auth-token-file``) and no
certificate. A bearer token travels as the ``authorization`` metadata of
each call, over TLS or not (a node accepts either; over plaintext anyone on
the path can read it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from kvmesh.client.config import ClientConfig, ClientConfigError, TlsConfig
from kvmesh.client.service_config import channel_options
from kvmesh.client.targets import channel_target

__all__ = ["Dialer", "Metadata", "aio_channel", "channel"]

Metadata = tuple[tuple[str, str], ...]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ClientConfigError(f"cannot read the {what} {path!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class Dialer:
    uri: str
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    options: tuple[tuple[str, int | str], ...]
    metadata: Metadata  # sent with every call

    @classmethod
    def make(cls, target: str, tls: bool | TlsConfig, token: str, config: ClientConfig) -> Dialer:
        config.check()
        t = (TlsConfig() if tls else None) if isinstance(tls, bool) else tls
        options = channel_options(config)
        credentials = None
        if t is not None:
            t.check()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(t.ca_file, "CA file") if t.ca_file else None,
                private_key=_read(t.key_file, "client key") if t.key_file else None,
                certificate_chain=_read(t.cert_file, "client certificate") if t.cert_file else None,
            )
            if t.server_name:
                options = [("grpc.ssl_target_name_override", t.server_name), *options]
        token = token.strip()
        if any(c.isspace() for c in token):
            raise ClientConfigError("a token has no whitespace")
        metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return cls(channel_target(target), credentials, tuple(options), metadata)

    def sync_channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.uri, options=self.options)
        return grpc.secure_channel(self.uri, self.credentials, options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.uri, options=self.options)
        return grpc.aio.secure_channel(self.uri, self.credentials, options=self.options)


def channel(target: str, *, tls: bool | TlsConfig = True, config: ClientConfig | None = None) -> grpc.Channel:
    """A gRPC channel dialed as a :class:`kvmesh.client.Client` dials (target,
    credentials, service config, channel arguments), for code that calls the
    generated stubs itself. A token is then the caller's to send, as
    ``authorization: Bearer TOKEN`` metadata on each call; ``config.timeout``
    and ``config.reresolve_interval`` are the caller's to apply too."""
    return Dialer.make(target, tls, "", config or ClientConfig()).sync_channel()


def aio_channel(
    target: str, *, tls: bool | TlsConfig = True, config: ClientConfig | None = None
) -> grpc.aio.Channel:
    """As :func:`channel`, for ``grpc.aio``."""
    return Dialer.make(target, tls, "", config or ClientConfig()).aio_channel()
