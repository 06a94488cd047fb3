"""Start-up choice of current replicas by generation (drove.engine.generation)."""

from __future__ import annotations

import pytest

from drove.engine.generation import NoCurrentReplicaError, ReplicaState, choose, parse_state


def st(name, gen, clean=True, rebuilding=False, volume="v", size=100):
    return ReplicaState(name, gen, clean, rebuilding, volume, size)


def test_fresh_replicas_all_serve():
    sel = choose([st("a", 0, volume=None), st("b", 0, volume=None)], "v")
    assert sel.rw == ["a", "b"] and sel.rebuild == []


def test_stale_replica_is_rebuilt_not_served():
    sel = choose([st("a", 5), st("b", 7), st("c", 7)], "v")
    assert sel.generation == 7
    assert sel.rw == ["b", "c"]
    assert sel.rebuild == ["a"] and "stale" in sel.reason["a"]


def test_unclean_stop_serves_one_and_reconciles_the_others():
    sel = choose([st("a", 7, clean=False), st("b", 7, clean=False), st("c", 3)], "v")
    assert sel.rw == ["a"]
    assert sorted(sel.rebuild) == ["b", "c"]


def test_rebuilding_replica_never_serves_even_at_the_top_generation():
    sel = choose([st("a", 9, rebuilding=True), st("b", 8)], "v")
    assert sel.rw == ["b"] and sel.rebuild == ["a"]


def test_only_incomplete_or_foreign_replicas_refuse_to_start():
    with pytest.raises(NoCurrentReplicaError):
        choose([st("a", 9, rebuilding=True), st("b", 9, volume="other")], "v")


def test_generation_below_the_recorded_one_refuses_to_start():
    with pytest.raises(NoCurrentReplicaError, match="generation 4"):
        choose([st("a", 3)], "v", min_generation=4)


def test_replica_that_missed_an_expand_is_rebuilt():
    sel = choose([st("a", 4, size=200), st("b", 4, size=100)], "v")
    assert sel.rw == ["a"] and sel.rebuild == ["b"]


def test_parse_state_defaults_for_a_fresh_replica():
    s = parse_state("a", {"size": 4096})
    assert (s.generation, s.clean, s.rebuilding, s.volume) == (0, True, False, None)


def test_the_newest_engine_wins_over_a_higher_generation_of_an_older_one():
    """A replica an old engine kept writing after a takeover loses to the newer writer's."""
    old = ReplicaState("local", 12, False, False, "v", 100, epoch=3)
    new = ReplicaState("remote", 8, False, False, "v", 100, epoch=4)
    sel = choose([old, new], "v")
    assert sel.rw == ["remote"] and sel.generation == 8
    assert sel.rebuild == ["local"]
    assert "epoch 3" in sel.reason["local"] and "epoch 4" in sel.reason["local"]


def test_a_tie_of_generations_is_broken_by_the_epoch_not_the_order():
    a = ReplicaState("a", 2, True, False, "v", 100, epoch=5)
    b = ReplicaState("b", 2, True, False, "v", 100, epoch=6)
    assert choose([a, b], "v").rw == ["b"]
    assert choose([b, a], "v").rw == ["b"]


def test_parse_state_reads_the_writer_epoch():
    info = {"engine_state": {"volume": "v", "generation": 4, "clean": True, "epoch": 9},
            "size": 100}
    assert parse_state("a", info).order == (9, 4)
    assert parse_state("a", {"engine_state": {"generation": 4}}).order == (0, 4)
