"""`kvmesh router --policy-opt POLICY.KEY=VALUE`: parsed, checked at start, used."""

from __future__ import annotations

import pytest

from kvmesh.cli.router import parse_policy_opts
from router.config import RouterConfig
from router.index import PrefixIndex
from router.node import RouterNode
from router.policies import RouteRequest, make_policy


def test_parse_policy_opts_types_and_groups() -> None:
    got = parse_policy_opts(
        [
            "precise.overlap_weight=2",
            "precise.delay_weight=0.5",
            "consistent_hash.prefix_blocks=8",
            "cache_aware_approx.cache_threshold=0.4",
        ]
    )
    assert got == {
        "precise": {"overlap_weight": 2, "delay_weight": 0.5},
        "consistent_hash": {"prefix_blocks": 8},
        "cache_aware_approx": {"cache_threshold": 0.4},
    }
    assert isinstance(got["consistent_hash"]["prefix_blocks"], int)


@pytest.mark.parametrize(
    "bad, words",
    [
        ("precise.overlap_weight", "POLICY.KEY=VALUE"),
        ("overlap_weight=2", "POLICY.KEY=VALUE"),
        ("nope.overlap_weight=2", "unknown policy 'nope'"),
        ("precise.overlap_weight=lots", "must be a number"),
        ("precise.bogus=1", "bogus"),
        ("precise.delay_weight=-1", "delay_weight must be >= 0"),
    ],
)
def test_bad_policy_opts_fail_with_a_clear_error(bad: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_policy_opts([bad])


def test_node_builds_its_policies_with_the_options() -> None:
    node = RouterNode(RouterConfig(policy_opts={"precise": {"overlap_weight": 1.5, "delay_weight": 0.0}}))
    p = node._policy("precise")
    assert (p.overlap_weight, p.delay_weight) == (1.5, 0.0)
    assert p.hint_overlap == node.core.hint_overlap  # the mesh's route hints
    assert node._policy("round_robin") is not None
    with pytest.raises(ValueError, match="bogus"):
        RouterConfig(policy_opts={"precise": {"bogus": 1}})
    with pytest.raises(ValueError, match="unknown policy"):
        RouterConfig(policy="nope")


def test_max_blocks_per_worker_bounds_the_tree_the_node_shares() -> None:
    node = RouterNode(RouterConfig(policy_opts={"cache_aware_approx": {"max_blocks_per_worker": 10}}))
    policy = node._policy("cache_aware_approx")
    policy.on_routed(RouteRequest("r", list(range(25)), 400), "w", 0.0)
    assert node.approx_tree.blocks_of("w") == 10


def test_an_unknown_option_is_refused_with_the_options_the_policy_takes() -> None:
    with pytest.raises(ValueError, match=r"^policy 'precise' has no option nope; it takes: overlap_weight, "):
        make_policy("precise", PrefixIndex(), nope=1)
    with pytest.raises(ValueError, match=r"^policy 'round_robin' has no option x; it takes none$"):
        make_policy("round_robin", x=1)
