"""Size and address parsing."""

import pytest

from drove.units import format_size, parse_address, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("512M", 512 << 20), ("10G", 10 << 30), ("1TiB", 1 << 40), ("2k", 2048),
    (123, 123),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "1.5G", "-1", "5X"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_size():
    assert format_size(10 << 30) == "10 GiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(12) == "12 B"


def test_parse_address():
    assert parse_address("127.0.0.1:10809") == ("127.0.0.1", 10809)
    assert parse_address(":0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="port out of range"):
        parse_address("h:70000")
    with pytest.raises(ValueError, match="not an address"):
        parse_address("h:x")
