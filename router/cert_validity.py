"""The validity dates of the certificates a node serves and trusts.

gRPC loads an expired certificate without a word: the node starts, reports
READY, and every TLS handshake then fails on the client's side, where the
node's operator does not look. So a node reads its certificates' dates
before it starts (:func:`file_problem`: an expired or not-yet-valid
certificate stops it with the flag and the date), warns of one that expires
soon (:func:`expiring_soon`), and exports when each expires
(``kvmesh_tls_cert_expiry_timestamp_seconds``) for an alert well before.

The judgement is pure (dates and ``now`` in, words out); only
:func:`read_dates` touches a file.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = ["EXPIRY_WARNING_S", "CertDates", "expired_in_chain", "expiring_soon", "file_problem", "read_dates"]

# A certificate this close to its end is logged at start (router.tls_cert_expiring):
# long enough for a renewal through a change process, short enough not to cry wolf.
EXPIRY_WARNING_S = 14 * 86400.0


@dataclass(frozen=True, slots=True)
class CertDates:
    subject: str
    not_before: float  # Unix seconds
    not_after: float


def read_dates(path: str) -> list[CertDates]:
    """Every certificate of a PEM file, in file order (a chain's leaf first).
    ValueError when the file holds none that parses."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError as e:
        raise ValueError(f"no PEM certificate that parses ({e})") from None
    return [
        CertDates(
            c.subject.rfc4514_string(),
            c.not_valid_before_utc.timestamp(),
            c.not_valid_after_utc.timestamp(),
        )
        for c in certs
    ]


def _day(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _problem(c: CertDates, now: float) -> str | None:
    if now >= c.not_after:
        return f"the certificate {c.subject!r} expired on {_day(c.not_after)} (now {_day(now)}); renew it"
    if now < c.not_before:
        return (
            f"the certificate {c.subject!r} is not valid before {_day(c.not_before)} (now {_day(now)}); "
            "check this host's clock"
        )
    return None


def file_problem(certs: list[CertDates], now: float, ca: bool) -> str | None:
    """Why the certificates of one file cannot serve at ``now``, or None.

    A node's own certificate (``ca=False``) is its chain's first; a CA file
    (``ca=True``) may hold several authorities, and is refused only when
    none of them is valid (an expired one beside a good one still trusts
    the good one's certificates)."""
    if not certs:
        return "no certificate in the file"
    if not ca:
        return _problem(certs[0], now)
    problems = [_problem(c, now) for c in certs]
    if all(problems):
        return (
            problems[0]
            if len(problems) == 1
            else f"none of its {len(certs)} certificates is valid: {problems[0]}"
        )
    return None


def expiring_soon(
    certs: list[CertDates], now: float, within: float = EXPIRY_WARNING_S, ca: bool = False
) -> CertDates | None:
    """The certificate to warn of, valid now but ending within ``within``
    seconds, or None: a served chain's first such; in a CA file, the last of
    its valid authorities to end (a bundle with one ending soon beside others
    that stay valid still trusts what they signed)."""
    valid = [c for c in certs if c.not_before <= now < c.not_after]
    if ca:
        last = max(valid, key=lambda c: c.not_after, default=None)
        return last if last is not None and last.not_after <= now + within else None
    return next((c for c in valid if c.not_after <= now + within), None)


def expired_in_chain(certs: list[CertDates], now: float) -> list[CertDates]:
    """The certificates after a served chain's leaf that are outside their
    validity: clients that build the chain through them fail, though the
    node serves (a chain may carry an expired cross-signature on purpose, so
    this is a warning, not a refusal)."""
    return [c for c in certs[1:] if _problem(c, now)]
