"""Certificates' validity dates (router/cert_validity.py): what a node
refuses to start with (check_files), what it warns of, and the expiry it
exports (router.node.cert_expiry)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from kvmesh.cli.router import check_files, config_from_args, configure_parser
from router.cert_validity import (
    EXPIRY_WARNING_S,
    CertDates,
    expired_in_chain,
    expiring_soon,
    file_problem,
    read_dates,
)
from router.node import cert_expiry

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    start: dt.datetime,
    end: dt.datetime,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer[0].subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    return b.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _write(d: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return str(d / f"{stem}.pem")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA valid for a year around NOW; leaves that expired, are valid, or are not valid yet."""
    ca = _cert("test CA", NOW - 200 * DAY, NOW + 200 * DAY, None)
    _write(tmp_path, "ca", ca[0])
    old_ca = _cert("old CA", NOW - 400 * DAY, NOW - 10 * DAY, None)
    _write(tmp_path, "old-ca", old_ca[0])
    (tmp_path / "both-cas.pem").write_bytes(
        (tmp_path / "old-ca.pem").read_bytes() + (tmp_path / "ca.pem").read_bytes()
    )
    for stem, start, end in (
        ("expired", NOW - 100 * DAY, NOW - 2 * DAY),
        ("good", NOW - 10 * DAY, NOW + 90 * DAY),
        ("future", NOW + 3 * DAY, NOW + 90 * DAY),
        ("ending", NOW - 80 * DAY, NOW + 3 * DAY),
    ):
        cert, key = _cert(stem, start, end, ca)
        _write(tmp_path, stem, cert, key)
    return tmp_path


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(list(argv))


def _tls(pki: Path, leaf: str, *more: str) -> argparse.Namespace:
    return _args(f"--tls-cert={pki}/{leaf}.pem", f"--tls-key={pki}/{leaf}.key", *more)


def test_dates_are_read_in_file_order(pki: Path) -> None:
    [leaf] = read_dates(str(pki / "good.pem"))
    assert leaf.subject == "CN=good"
    assert leaf.not_after == (NOW + 90 * DAY).timestamp()
    assert [c.subject for c in read_dates(str(pki / "both-cas.pem"))] == ["CN=old CA", "CN=test CA"]
    with pytest.raises(ValueError, match="no PEM certificate"):
        read_dates(str(pki / "good.key"))


def test_a_served_certificate_must_be_valid_now() -> None:
    now = NOW.timestamp()
    c = CertDates("CN=x", now - 10, now + 10)
    assert file_problem([c], now, ca=False) is None
    assert "expired on" in (file_problem([c], now + 10, ca=False) or "")  # its last second is past
    assert "not valid before" in (file_problem([c], now - 11, ca=False) or "")
    # Only the leaf (the chain's first) is the node's: an intermediate ending first is the client's to judge.
    assert file_problem([c, CertDates("CN=i", 0, now - 1)], now, ca=False) is None
    assert file_problem([], now, ca=False) == "no certificate in the file"


def test_a_ca_file_is_refused_only_when_none_of_its_authorities_is_valid() -> None:
    now = NOW.timestamp()
    old, good = CertDates("CN=old", 0, now - 1), CertDates("CN=good", 0, now + 1)
    assert file_problem([old, good], now, ca=True) is None
    assert "expired on" in (file_problem([old], now, ca=True) or "")
    assert "none of its 2 certificates is valid" in (file_problem([old, old], now, ca=True) or "")


def test_expiring_soon_is_a_valid_certificate_near_its_end() -> None:
    now = NOW.timestamp()
    soon = CertDates("CN=s", now - 1, now + EXPIRY_WARNING_S)
    later = CertDates("CN=l", now - 1, now + EXPIRY_WARNING_S + 1)
    gone = CertDates("CN=g", 0, now)
    assert expiring_soon([later, soon], now) == soon
    assert expiring_soon([later], now) is None
    assert expiring_soon([gone], now) is None  # refused, not warned of
    # A CA bundle: only when its last valid authority ends soon.
    assert expiring_soon([soon, later], now, ca=True) is None
    assert expiring_soon([soon, gone], now, ca=True) == soon


def test_an_expired_certificate_after_the_leaf_is_named() -> None:
    now = NOW.timestamp()
    leaf, good, old = (
        CertDates("CN=l", 0, now + 9),
        CertDates("CN=i", 0, now + 9),
        CertDates("CN=x", 0, now - 1),
    )
    assert expired_in_chain([leaf, good, old], now) == [old]
    assert expired_in_chain([old], now) == []  # the leaf is file_problem's


def test_a_chain_with_an_expired_intermediate_starts_with_a_warning(pki: Path) -> None:
    (pki / "chain.pem").write_bytes((pki / "good.pem").read_bytes() + (pki / "old-ca.pem").read_bytes())
    (pki / "chain.key").write_bytes((pki / "good.key").read_bytes())
    with capture_logs() as logs:
        check_files(config_from_args(_tls(pki, "chain", "--node-id=n1")), now=NOW.timestamp())
    [line] = [e for e in logs if e["event"] == "router.tls_chain_cert_expired"]
    assert line["subject"] == "CN=old CA" and line["node"] == "n1" and line["log_level"] == "warning"


def test_the_node_refuses_an_expired_or_future_certificate_by_flag(pki: Path) -> None:
    now = NOW.timestamp()
    check_files(config_from_args(_tls(pki, "good", f"--tls-client-ca={pki}/ca.pem")), now=now)
    with pytest.raises(
        ValueError,
        match=r"--tls-cert '.*/expired.pem': the certificate 'CN=expired' expired on "
        r"2026-05-30 12:00:00 UTC \(now 2026-06-01 12:00:00 UTC\); renew it",
    ):
        check_files(config_from_args(_tls(pki, "expired")), now=now)
    with pytest.raises(
        ValueError, match=r"--tls-cert .*not valid before 2026-06-04.*check this host's clock"
    ):
        check_files(config_from_args(_tls(pki, "future")), now=now)
    with pytest.raises(
        ValueError, match=r"--tls-client-ca '.*/old-ca.pem': the certificate 'CN=old CA' expired"
    ):
        check_files(config_from_args(_tls(pki, "good", f"--tls-client-ca={pki}/old-ca.pem")), now=now)
    # A bundle with one good authority still trusts its clients.
    check_files(config_from_args(_tls(pki, "good", f"--tls-client-ca={pki}/both-cas.pem")), now=now)


def test_the_mesh_certificates_are_checked_as_the_public_ones(pki: Path) -> None:
    now = NOW.timestamp()
    mesh = (f"--mesh-tls-key={pki}/good.key", f"--mesh-tls-ca={pki}/ca.pem", "--mesh-listen=127.0.0.1:0")
    check_files(config_from_args(_args(f"--mesh-tls-cert={pki}/good.pem", *mesh)), now=now)
    with pytest.raises(ValueError, match=r"--mesh-tls-cert '.*/good.pem': the certificate 'CN=good' expired"):
        check_files(config_from_args(_args(f"--mesh-tls-cert={pki}/good.pem", *mesh)), now=now + 91 * 86400)
    with pytest.raises(ValueError, match=r"--mesh-tls-ca '.*/old-ca.pem': .*expired"):
        check_files(
            config_from_args(
                _args(
                    f"--mesh-tls-cert={pki}/good.pem",
                    f"--mesh-tls-key={pki}/good.key",
                    f"--mesh-tls-ca={pki}/old-ca.pem",
                    "--mesh-listen=127.0.0.1:0",
                )
            ),
            now=now,
        )


def test_a_certificate_near_its_end_is_logged_and_the_node_starts(pki: Path) -> None:
    with capture_logs() as logs:
        check_files(config_from_args(_tls(pki, "ending", "--node-id=n1")), now=NOW.timestamp())
        check_files(config_from_args(_tls(pki, "good", "--node-id=n1")), now=NOW.timestamp())
    [line] = [e for e in logs if e["event"] == "router.tls_cert_expiring"]
    assert line["log_level"] == "warning"
    assert line["flag"] == "--tls-cert" and line["subject"] == "CN=ending" and line["days_left"] == 3.0
    assert line["node"] == "n1"


def test_the_exported_expiry_is_the_leaf_and_the_cas_last(pki: Path) -> None:
    cfg = config_from_args(
        _args(
            f"--tls-cert={pki}/good.pem",
            f"--tls-key={pki}/good.key",
            f"--tls-client-ca={pki}/both-cas.pem",
            f"--mesh-tls-cert={pki}/ending.pem",
            f"--mesh-tls-key={pki}/ending.key",
            f"--mesh-tls-ca={pki}/ca.pem",
            "--mesh-listen=127.0.0.1:0",
        )
    )
    assert cert_expiry(cfg) == {
        "api": (NOW + 90 * DAY).timestamp(),
        "api_client_ca": (NOW + 200 * DAY).timestamp(),
        "mesh": (NOW + 3 * DAY).timestamp(),
        "mesh_ca": (NOW + 200 * DAY).timestamp(),
    }
    assert cert_expiry(config_from_args(_args())) == {}
