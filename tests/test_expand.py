"""Expansion strategies: the node sets of comb and full, grown round by round through `frontier`."""

from __future__ import annotations

import pytest

from tracegen.expand import Comb, Full, Request, frontier, make_strategy, missing
from tracestore.errors import TraceError


def grow(strategy, max_steps, final_at, n_trees=1):
    """Run the round loop with a fake generator; a step is final when ``final_at(path)`` says so."""
    trees = {(f"p{i}", 0): {} for i in range(n_trees)}
    rounds = 0
    while True:
        requests = frontier(trees, strategy, max_steps)
        if not requests:
            return trees, rounds
        rounds += 1
        for request in requests:
            assert request.path not in trees[(request.problem_id, request.world)]
            trees[(request.problem_id, request.world)][request.path] = final_at(request.path)


def test_comb_with_chains_ending_by_max_steps():
    trees, rounds = grow(Comb(), max_steps=3, final_at=lambda path: False)
    assert set(trees[("p0", 0)]) == {"s", "ss", "sss", "L", "LL", "LLL", "sL", "sLL", "ssL"}
    assert rounds == 3


def test_comb_stops_each_chain_at_its_final_step():
    # small solutions end after 3 steps, large ones after 2 steps of their own
    def final_at(path):
        return path.count("s") == 3 if "L" not in path else path.count("L") == 2

    trees, _ = grow(Comb(), max_steps=10, final_at=final_at)
    assert set(trees[("p0", 0)]) == {"s", "ss", "sss", "L", "LL", "sL", "sLL", "ssL", "ssLL"}
    # nothing continues a final node
    assert not any(
        path + "s" in trees[("p0", 0)] or path + "L" in trees[("p0", 0)]
        for path, final in trees[("p0", 0)].items()
        if final
    )


def test_full_depth_one():
    trees, _ = grow(Full(1), max_steps=3, final_at=lambda path: False)
    expected = {
        "s",
        "L",  # depth-1 choices
        "ss",
        "sss",
        "sL",
        "sLL",  # leaf "s" completed by each model alone
        "Ls",
        "Lss",
        "LL",
        "LLL",  # leaf "L" completed by each model alone
    }
    assert set(trees[("p0", 0)]) == expected


def test_full_depth_two_counts_and_zero_is_both_chains():
    trees, _ = grow(Full(2), max_steps=4, final_at=lambda path: False)
    paths = set(trees[("p0", 0)])
    assert {p for p in paths if len(p) == 2} == {"ss", "sL", "Ls", "LL"}
    assert len({p for p in paths if len(p) == 3}) == 8
    assert len({p for p in paths if len(p) == 4}) == 8  # each of the 8 depth-3 nodes continued by its own model
    assert "sLsL" not in paths and "sLss" in paths
    chains, _ = grow(Full(0), max_steps=3, final_at=lambda path: False)
    assert set(chains[("p0", 0)]) == {"s", "ss", "sss", "L", "LL", "LLL"}


def test_frontier_is_sorted_over_trees_and_skips_foreign_nodes():
    trees = {("b", 0): {}, ("a", 1): {"s": False, "L": True, "sLs": False}, ("a", 0): {}}
    # "sLs" (e.g. added by a closure run) is not a comb node, so comb does not grow it;
    # "sL" is missing although its child exists: comb asks for it
    requests = frontier(trees, Comb(), max_steps=5)
    assert requests == [
        Request("a", 0, "", "large"),
        Request("a", 0, "", "small"),
        Request("a", 1, "s", "large"),
        Request("a", 1, "s", "small"),
        Request("b", 0, "", "large"),
        Request("b", 0, "", "small"),
    ]
    assert requests[2].step_id == "a/1/sL"


def test_missing_for_explicit_requests():
    trees = {("a", 0): {"s": False, "ss": True}}
    wanted = [
        Request("a", 0, "s", "large"),
        Request("a", 0, "", "small"),
        Request("a", 0, "ss", "large"),
        Request("a", 0, "s", "large"),
    ]
    # already there, and continuing a final node, are dropped; duplicates collapse
    assert missing(trees, wanted, max_steps=5) == [Request("a", 0, "s", "large")]
    with pytest.raises(TraceError, match="node 'sL' is not in the trace"):
        missing(trees, [Request("a", 0, "sL", "small")], max_steps=5)


def test_make_strategy_errors():
    assert make_strategy("full", 2) == Full(2)
    with pytest.raises(TraceError, match="--depth"):
        make_strategy("full")
    with pytest.raises(TraceError, match="--depth applies"):
        make_strategy("comb", 2)
    with pytest.raises(TraceError, match="unknown --expand"):
        make_strategy("beam")
