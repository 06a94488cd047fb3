"""The volume access key of replica exports (drove.replica.access): names, checks, masking."""

from __future__ import annotations

import pytest

from drove.nbd import proto
from drove.nbd.errors import ExportRefused
from drove.replica.access import (
    KEY_ENV,
    AccessDenied,
    Gate,
    bearer,
    keyed_export,
    new_key,
    process_key,
    redact,
    split_key,
)

KEY = new_key()


def test_names_carry_the_key_in_front_and_split_back() -> None:
    for export in ("head", "", "head@epoch=7", "snapshot/s1", "layer/volume-snap-s1.img"):
        assert split_key(keyed_export(KEY, export)) == (KEY, export)
        assert split_key(export) == (None, export)
        assert keyed_export(None, export) == export
    assert split_key("key=") == (None, "key=")  # no slash: an ordinary name


def test_a_protected_gate_admits_only_the_key() -> None:
    gate = Gate(KEY)
    assert gate.protected
    assert gate.admit(keyed_export(KEY, "snapshot/s")) == "snapshot/s"
    for name in ("head", keyed_export(new_key(), "head"), f"key={KEY[:-1]}/head",
                 f"key={KEY.upper()}/head", "key=/head"):
        with pytest.raises(AccessDenied) as err:
            gate.admit(name)
        assert err.value.reply == proto.NBD_REP_ERR_UNKNOWN and err.value.disconnect
        assert KEY not in str(err.value)
    with pytest.raises(ExportRefused):
        gate.check_listing()
    assert gate.admits_header(f"Bearer {KEY}")
    assert not gate.admits_header(None) and not gate.admits_header(f"Bearer {new_key()}")
    assert not gate.admits_header(KEY)


def test_an_open_gate_serves_everyone_and_strips_a_key() -> None:
    gate = Gate(None)
    assert not gate.protected
    assert gate.admit("head") == "head"
    assert gate.admit(keyed_export(KEY, "head")) == "head"
    gate.check_listing()
    assert gate.admits_header(None)
    assert bearer(None) == {} and bearer(KEY) == {"authorization": f"Bearer {KEY}"}


def test_a_malformed_key_is_refused_not_served_unprotected(monkeypatch) -> None:
    with pytest.raises(ValueError):
        Gate("secret")
    monkeypatch.setenv(KEY_ENV, "not-a-key")
    with pytest.raises(ValueError, match=KEY_ENV):
        process_key()
    monkeypatch.setenv(KEY_ENV, KEY)
    assert process_key() == KEY
    monkeypatch.delenv(KEY_ENV)
    assert process_key() is None


def test_redact_masks_keys_written_or_percent_encoded() -> None:
    assert redact(f"nbd://h:1/key={KEY}/layer/f") == "nbd://h:1/key=***/layer/f"
    assert redact(f"lost nbd://h:1/key%3D{KEY}%2Fhead%40epoch%3D3") == \
        "lost nbd://h:1/key=***/head%40epoch%3D3"
    assert redact("nbd://h:1/head") == "nbd://h:1/head"
