"""Tokens (router/auth.py) and the mesh's shared secret (mesh/auth.py): pure parts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.auth import MAC_KEY, TIME_KEY, MeshAuthError, MeshSecret, readable_by_others
from mesh.transport import _name_matches
from router.auth import AuthError, TokenTable

TABLE = TokenTable.parse("# clients\nclient-token-0123456789\nadmin-token-0123456789 admin\n")


def test_token_roles_and_what_each_may_call() -> None:
    c, a = "Bearer client-token-0123456789", "Bearer admin-token-0123456789"
    assert TABLE.verdict("/kvmesh.v1.Router/Generate", c) is None
    assert TABLE.verdict("/kvmesh.v1.Admin/DeregisterEngine", c) == ("PERMISSION_DENIED", "not_admin")
    assert TABLE.verdict("/kvmesh.v1.Admin/DeregisterEngine", a) is None
    assert TABLE.verdict("/kvmesh.v1.Router/Generate", None) == ("UNAUTHENTICATED", "no_token")
    assert TABLE.verdict("/kvmesh.v1.Router/Generate", "Bearer nope") == ("UNAUTHENTICATED", "bad_token")
    assert TABLE.verdict("/kvmesh.v1.Router/Generate", "client-token-0123456789") == (
        "UNAUTHENTICATED",
        "bad_token",
    )  # not a bearer header
    assert TABLE.verdict("/grpc.health.v1.Health/Check", None) is None
    assert TABLE.verdict("/kvmesh.mesh.v1.Mesh/Deliver", None) is None  # the mesh proves itself


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "  Bearer"])
def test_the_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    assert TABLE.role_of(f"{scheme} admin-token-0123456789") == "admin"
    assert TABLE.role_of(f"{scheme}  client-token-0123456789 ") == "client"


@pytest.mark.parametrize(
    "header", ["Basic admin-token-0123456789", "Beareradmin-token-0123456789", "Bearer", ""]
)
def test_other_schemes_and_no_token_name_no_role(header: str) -> None:
    assert TABLE.role_of(header) is None


@pytest.mark.parametrize(
    "text",
    ["", "# nothing\n", "short admin\n", "long-enough-token-xyz root\n", "a-long-enough-token b c\n"],
)
def test_bad_token_files_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(AuthError):
        TokenTable.parse(text)


SECRET = MeshSecret(b"a-shared-mesh-secret-of-32-bytes")


@given(st.binary(max_size=512))
def test_a_signed_batch_passes_and_any_change_fails(body: bytes) -> None:
    meta = dict(SECRET.sign(body, 1000.0))
    assert SECRET.check(body, meta, 1000.5) is None
    assert SECRET.check(body + b"x", meta, 1000.5) is not None
    other = MeshSecret(b"another-mesh-secret-of-32-bytes!")
    assert other.check(body, meta, 1000.5) == "wrong mesh proof (a different secret)"
    assert "off this node's clock" in (SECRET.check(body, meta, 1100.0) or "")
    forged_time = {**meta, TIME_KEY: "1050.000"}  # the time is signed too
    assert SECRET.check(body, forged_time, 1050.0) is not None
    assert SECRET.check(body, {MAC_KEY: meta[MAC_KEY]}, 1000.5) == "no mesh proof (send with the mesh secret)"


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(MeshAuthError):
        MeshSecret(b"short")


def test_a_token_that_is_not_ascii_is_a_bad_token_not_a_crash() -> None:
    assert TABLE.role_of("Bearer \u00e9") is None
    assert TABLE.role_of("Bearer admin-token-0123456789\udce9") is None  # undecodable header bytes


@pytest.mark.parametrize(
    "pattern,ok",
    [("kvmesh-mesh", True), ("KVMESH-MESH", True), ("kvmesh-client", False), ("*.mesh.example", False)],
)
def test_a_mesh_callers_certificate_must_carry_the_mesh_name(pattern: str, ok: bool) -> None:
    assert _name_matches(pattern, "kvmesh-mesh") is ok
    assert _name_matches("*.example", "mesh.example") and not _name_matches("*.example", "a.b.example")
    assert not _name_matches("*.example", "example")


def test_a_secret_file_others_may_read_is_named_with_its_mode(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("x" * 32)
    f.chmod(0o640)  # its group may read it (a secret volume's defaultMode 0440)
    assert readable_by_others(str(f)) is None
    f.chmod(0o644)
    assert readable_by_others(str(f)) == "-rw-r--r--"
    assert readable_by_others(str(tmp_path / "missing")) is None  # its reader says why
