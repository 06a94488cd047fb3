"""The delta between two backups' block maps, and a standby's view (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drove.backup.delta import Delta, plan
from drove.manager.errors import ApiError
from drove.manager.standbystate import check_not_standby, standby_view

BLOCK = 2 << 20
maps = st.dictionaries(st.integers(0, 63).map(lambda i: i * BLOCK),
                       st.sampled_from(["a" * 64, "b" * 64, "c" * 64]), max_size=64)


@given(maps, maps)
def test_applying_the_delta_to_the_old_map_gives_the_new(old, new):
    d = plan(old, new)
    volume = dict(old)
    for o in d.zero:
        volume.pop(o)
    for o in d.write:
        volume[o] = new[o]
    assert volume == new and not d.zero_all
    # Nothing written or zeroed that was already right.
    assert all(old.get(o) != new[o] for o in d.write)
    assert all(o not in new for o in d.zero)
    assert Delta.from_json(d.to_json()) == d


def test_unknown_contents_rewrite_everything():
    d = plan(None, {0: "a" * 64, 4 * BLOCK: "b" * 64})
    assert d == Delta([0, 4 * BLOCK], [], zero_all=True)
    assert plan({}, {BLOCK: "a" * 64}) == Delta([BLOCK], [])


def test_a_standby_is_refused_and_shown():
    doc = {"name": "dr", "standby": {"of": "db", "backup": "backup-1",
                                     "backup_created": "2026-01-01T00:00:00.000Z",
                                     "newest": {"name": "backup-2"}}}
    with pytest.raises(ApiError) as e:
        check_not_standby(doc, "attached")
    assert e.value.status == 409 and "drove volume activate dr" in str(e.value)
    check_not_standby({"name": "plain"}, "attached")
    view = standby_view(doc, now=datetime(2026, 1, 1, 0, 1, tzinfo=UTC))
    assert view is not None
    assert (view["of"], view["lag_seconds"], view["behind"]) == ("db", 60.0, True)
    assert standby_view({"name": "plain"}) is None
