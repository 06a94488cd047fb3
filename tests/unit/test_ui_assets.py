"""The web UI's assets: all shipped in the wheel, every import resolved, nothing loaded from
elsewhere, no markup built from strings."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from drove.manager import ui

REPO = Path(__file__).resolve().parents[2]
PACKAGE = ui.STATIC.parent
ASSETS = sorted(p for p in ui.STATIC.rglob("*") if p.is_file())
SCRIPTS = [p for p in ASSETS if p.suffix == ".js"]


def test_every_asset_is_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["drove.manager.ui"]
    assert {p.suffix for p in ASSETS} == {".html", ".css", ".js"}
    missing = [str(p.relative_to(PACKAGE)) for p in ASSETS
               if not any(fnmatch.fnmatch(str(p.relative_to(PACKAGE)), pat) for pat in patterns)]
    assert not missing, f"not in pyproject.toml's package-data (not in the wheel): {missing}"


def test_every_module_import_and_page_reference_resolves():
    for script in SCRIPTS:
        for name in re.findall(r'^import .* from "(\.[^"]+)";', script.read_text(), re.M):
            assert (script.parent / name).is_file(), f"{script.name} imports {name}"
    index = (ui.STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="/ui/([^"]+)"', index)
    assert len(refs) == 2
    for ref in refs:
        assert (ui.STATIC / ref).is_file(), ref


def test_nothing_is_loaded_from_elsewhere_and_no_markup_from_strings():
    for asset in ASSETS:
        text = asset.read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), asset.name
        assert "@import" not in text, asset.name
        if asset.suffix == ".js":
            # Names and messages from the API must never become markup.
            for risky in ("innerHTML", "outerHTML =", "insertAdjacentHTML", "document.write",
                          "eval(", "new Function"):
                assert risky not in text, f"{asset.name}: {risky}"
