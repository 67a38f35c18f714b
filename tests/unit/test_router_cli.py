"""`kvmesh router` flags -> RouterConfig (kvmesh/cli/router.py), and the
address helpers it uses (router/addresses.py)."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from kvmesh.cli.router import config_from_args, configure_parser
from mesh.membership import MembershipConfig
from router.addresses import AddressError, advertised_address, resolve_listen, resolve_seeds
from router.config import RouterConfig


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(list(argv))


def test_no_flags_give_the_config_defaults():
    cfg, d, m = config_from_args(_args()), RouterConfig(), MembershipConfig()
    assert cfg == d
    assert cfg.mesh.membership.probe_interval == m.probe_interval
    assert cfg.mesh.membership.gossip_interval == m.gossip_interval
    assert cfg.mesh.membership.probe_timeout == min(m.probe_timeout, m.probe_interval / 2)


def test_flags_set_their_fields():
    cfg = config_from_args(
        _args(
            "--listen=0.0.0.0:7000",
            "--node-id=n1",
            "--join=seed:7000",
            "--gossip-interval=0.05",
            "--probe-interval=0.4",
            "--policy=least_load",
            "--policy-opt=precise.delay_weight=0.5",
            "--engine=id=e1,url=http://h:1,block_size=32",
            "--tokenizer=m=builtin",
            "--max-attempts=5",
            "--health-interval=0.5",
            "--seed=7",
            "--max-index-blocks=5000",
        )
    )
    assert (cfg.listen, cfg.node_id, cfg.join, cfg.policy) == (
        "0.0.0.0:7000",
        "n1",
        ["seed:7000"],
        "least_load",
    )
    # One gossip interval for membership and state gossip.
    assert cfg.mesh.membership.gossip_interval == 0.05
    assert (cfg.mesh.membership.probe_interval, cfg.mesh.membership.probe_timeout) == (0.4, 0.2)
    assert cfg.policy_opts == {"precise": {"delay_weight": 0.5}}
    assert [(e.engine_id, e.block_size) for e in cfg.engines] == [("e1", 32)]
    assert cfg.tokenizers == {"m": "builtin"}
    assert (cfg.retry.max_attempts, cfg.health_interval, cfg.seed) == (5, 0.5, 7)
    assert cfg.max_index_blocks == 5000


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--engine=id=e1", "needs at least id= and url="),
        ("--tokenizer=nope", "want MODEL=PATH"),
        ("--policy-opt=precise.bogus=1", "bogus"),
        ("--gossip-interval=0", "gossip_interval must be > 0"),
        ("--max-index-blocks=-1", "max-index-blocks must be >= 0"),
    ],
)
def test_bad_flags_are_value_errors_naming_the_fault(flag, words):
    # run() prints these as "kvmesh router: <error>" and exits 2.
    with pytest.raises(ValueError, match=words):
        config_from_args(_args(flag))


def test_public_tls_without_a_mesh_port_is_refused():
    # The mesh client dials plaintext: on a shared TLS port nodes would never join.
    tls = ["--tls-cert=node.pem", "--tls-key=node.key"]
    with pytest.raises(ValueError, match="needs the mesh on a port of its own"):
        config_from_args(_args(*tls, "--join=seed:7946"))
    assert config_from_args(_args(*tls, "--join=seed:7946", "--mesh-listen=127.0.0.1:0")).api_auth.tls
    # A lone node may serve TLS on one port (the CLI warns that no node can join it).
    assert config_from_args(_args(*tls)).mesh_shares_tls_port


def test_listen_and_advertised_addresses():
    host, _, port = resolve_listen("127.0.0.1:0").rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert resolve_listen("127.0.0.1:7000") == "127.0.0.1:7000"
    assert advertised_address("10.1.2.3:7000") == "10.1.2.3:7000"
    assert advertised_address("0.0.0.0:7000").endswith(":7000")
    assert not advertised_address("0.0.0.0:7000").startswith("0.0.0.0")
    with pytest.raises(AddressError, match="--listen 'nope': want HOST:PORT"):
        resolve_listen("nope")


async def test_seeds_expand_and_leave_this_node_out():
    assert await resolve_seeds(["127.0.0.1:7000", "127.0.0.1:7001"], "127.0.0.1:7001", 1.0, 0.1) == [
        "127.0.0.1:7000"
    ]
    with pytest.raises(AddressError, match="want HOST:PORT"):
        await resolve_seeds(["seed"], "me:1", 1.0, 0.1)
    with pytest.raises(AddressError, match="cannot resolve seed"):
        await asyncio.wait_for(resolve_seeds(["no-such-host.invalid:1"], "me:1", 0.0, 0.01), 10)
