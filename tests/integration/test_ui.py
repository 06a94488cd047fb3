"""The web UI in headless Chromium (Debian's, driven by Playwright) against a real
`drove serve`: log in, create, attach, write through NBD, snapshot, clone, watch a
rebuild; screenshots are saved under the test's tmp dir."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from managertools import ManagerProc
from nbdtools import nbdsh

CHROMIUM = "/usr/bin/chromium"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def ui_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProc]:
    """One `drove serve` for the module's tests (each uses its own volumes)."""
    root = tmp_path_factory.mktemp("ui")
    m = ManagerProc(root / "data", root / "manager.log", root=root)
    m.start()
    for disk in ("d1", "d2"):  # room for volumes of two and three replicas
        m.ok("POST", "/v1/disks", json={"path": str(root / disk)})
    yield m
    m.kill_everything()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (Debian's package: no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, ui_manager: ManagerProc, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser context (no cookie, no session storage) at 1280x800."""
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(20_000)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield p
    shot(p, tmp_path, "last")  # the page as the test left it: what a failure looked like
    context.close()
    # A script error or a blocked load (CSP) is a failure even when the clicks worked; an
    # API call's error status is not (the page shows what the API said).
    assert not [e for e in errors if not e.startswith("Failed to load resource")], errors


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    """Save a full-page screenshot under the test's tmp dir and print where."""
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def login(page: Any, manager: ManagerProc, token: str | None = None) -> None:
    """Log in with a token, by keyboard: the field has the focus, Enter submits."""
    page.goto(manager.url + "/")
    field = page.get_by_label("API token")
    field.wait_for()
    assert page.evaluate("document.activeElement.id") == "login-token"
    page.keyboard.type(token or manager.token)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Dashboard").wait_for()


def unlabelled(page: Any) -> list[str]:
    """Controls on the page with no accessible label."""
    return page.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter(e => !(e.labels?.length || e.getAttribute('aria-label') ||
                       e.textContent.trim()))
        .map(e => e.outerHTML)""")


def test_the_page_and_its_assets_are_served_without_shadowing_the_api(ui_manager):
    # drove serve says where the UI is.
    assert f"UI:    {ui_manager.url}/\n" in ui_manager.log.read_text()
    r = httpx.get(ui_manager.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    js = httpx.get(ui_manager.url + "/ui/js/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    # Every asset the page names is there, and nothing is loaded from elsewhere.
    for ref in re.findall(r'(?:src|href)="(/[^"]+)"', r.text):
        assert httpx.get(ui_manager.url + ref).status_code == 200, ref
    assert "http" not in re.sub(r"<noscript>.*</noscript>", "", r.text, flags=re.S)
    # The package's Python files are not assets.
    assert httpx.get(ui_manager.url + "/ui/__init__.py").status_code == 404
    assert httpx.get(ui_manager.url + "/ui/../api.py").status_code == 404
    # The API is as it was: JSON, its token still needed, the UI not in its schema.
    assert httpx.get(ui_manager.url + "/v1/health").json()["status"] == "ok"
    assert httpx.get(ui_manager.url + "/v1/volumes").status_code == 401
    schema = ui_manager.ok("GET", "/openapi.json")
    assert "/" not in schema["paths"] and not any(p.startswith("/ui") for p in schema["paths"])


def test_a_wrong_token_is_refused_and_the_login_says_so(page, ui_manager, tmp_path):
    page.goto(ui_manager.url + "/")
    page.get_by_label("API token").fill("not-the-token")
    page.get_by_role("button", name="Log in with token").click()
    page.get_by_role("alert").filter(has_text=re.compile("token", re.I)).wait_for()
    assert page.get_by_role("heading", name="Dashboard").count() == 0
    assert not unlabelled(page)
    shot(page, tmp_path, "login-refused")


def write(uri: str, mib: int) -> None:
    """Write ``mib`` MiB of random data at the start of the export, with nbdsh."""
    nbdsh(f"import os\nh.connect_uri({uri!r})\n"
          f"for i in range({mib}): h.pwrite(os.urandom({MiB}), i * {MiB})\n"
          "h.flush()\nh.shutdown()", timeout=60)


def dialog_submit(page: Any, fields: dict[str, str | bool], button: str) -> None:
    """Fill the open dialog's fields by their labels (True checks a box, a select takes the
    option of that value) and press its button."""
    dialog = page.locator("dialog[open]")
    dialog.wait_for()
    assert not unlabelled(page)
    for label, value in fields.items():
        field = dialog.get_by_label(label, exact=True)
        if isinstance(value, bool):
            field.set_checked(value)
        elif field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    dialog.get_by_role("button", name=button, exact=True).click()
    dialog.wait_for(state="detached")


def test_create_attach_write_snapshot_and_clone_from_the_ui(page, ui_manager, tmp_path):
    m = ui_manager
    login(page, m)
    # The dashboard: the cluster's health, and each node with its disks' use.
    page.get_by_role("heading", name="Cluster health: healthy").wait_for()
    nodes = page.locator("section[aria-label=Nodes]")
    for d in m.ok("GET", "/v1/disks"):
        nodes.get_by_role("meter", name=f"use of disk {d['name']}").wait_for()
    shot(page, tmp_path, "dashboard-empty")
    assert not unlabelled(page)

    # Create: the dialog, then the volume's page; the API has it as asked.
    page.get_by_role("button", name="Create volume").click()
    dialog_submit(page, {"Name": "web", "Size": "64M", "Replicas": "2"}, "Create")
    page.get_by_role("heading", name="Volume web").wait_for()
    made = m.volume("web")
    assert made["size"] == 64 * MiB and made["replica_count"] == 2
    # ... and listed on the dashboard with its replicas.
    page.get_by_role("link", name="← Dashboard").click()
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="web", exact=True))
    row.wait_for()
    for r in made["replicas"]:
        assert r["name"] in row.inner_text()

    # Attach from the volume's page, on a node picked from the manager's list (the
    # manager's own by default); the details show the node and the NBD export it gives.
    row.get_by_role("link", name="web", exact=True).click()
    (node,) = [n["name"] for n in m.ok("GET", "/v1/nodes")]
    page.get_by_role("button", name="Attach").click()
    pick = page.locator("dialog[open]").get_by_label("Node", exact=True)
    assert pick.input_value() == ""  # the default: the manager's own node
    assert pick.locator("option").all_inner_texts() == ["the manager's own node",
                                                        f"{node} (up)"]
    dialog_submit(page, {"Node": node}, "Attach")
    page.get_by_role("button", name="Detach").wait_for()
    attached = m.volume("web")
    uri = attached["nbd_uri"]
    assert uri and attached["node"] == node
    page.locator("dl.details").get_by_text(node, exact=True).wait_for()
    page.locator("dl.details").get_by_text(uri).wait_for()

    # Write through NBD from the test; the charts get figures from /metrics.
    write(uri, 8)
    iops = page.locator(".chart-summary").first
    iops.filter(has_text=re.compile(r"requests/s: (0\.[1-9]|[1-9])")).wait_for()
    latency = page.locator(".chart-summary").nth(2)  # of the same poll: mean and p99
    latency.filter(has_text=re.compile(r"mean: .* · p99: (0\.0[1-9]|0\.[1-9]|[1-9])")).wait_for()

    # Snapshot from the UI: it appears in the tree, and the API has it.
    page.get_by_role("button", name="Snapshot", exact=True).click()
    dialog_submit(page, {"Snapshot name (optional)": "s1"}, "Take snapshot")
    page.locator('li[data-snapshot="s1"]').wait_for()
    assert "s1" in {s["name"] for s in m.ok("GET", "/v1/volumes/web/snapshots")}
    shot(page, tmp_path, "volume-attached")

    # A recurring job for web, added and deleted (asked first) from its page.
    page.get_by_role("button", name="Add recurring job").click()
    dialog_submit(page, {"Schedule (cron, UTC)": "0 3 * * *", "Keep (newest)": "2",
                         "Job name (optional)": "nightly"}, "Add job")
    page.get_by_role("button", name="Delete job nightly").wait_for()
    job = m.ok("GET", "/v1/jobs/nightly")
    assert (job["kind"], job["cron"], job["retain"], job["volumes"]) == \
        ("snapshot", "0 3 * * *", 2, ["web"])
    page.get_by_role("button", name="Delete job nightly").click()
    page.locator("dialog[open]").get_by_role("button", name="Delete job nightly").click()
    page.get_by_role("button", name="Delete job nightly").wait_for(state="detached")
    assert m.api("GET", "/v1/jobs/nightly").status_code == 404

    # Clone s1: the clone's page, a linked clone of web at s1.
    page.get_by_role("button", name="Clone from s1").click()
    dialog_submit(page, {"New volume name": "web-copy"}, "Clone")
    page.get_by_role("heading", name="Volume web-copy").wait_for()
    assert m.volume("web-copy")["clone_of"] == {"volume": "web", "snapshot": "s1"}
    page.get_by_text("A linked clone of").wait_for()
    assert not unlabelled(page)

    # Delete asks first: cancelling changes nothing.
    page.get_by_role("button", name="Delete", exact=True).click()
    page.locator("dialog[open]").get_by_role("button", name="Cancel").click()
    assert m.api("GET", "/v1/volumes/web-copy").status_code == 200
    page.get_by_role("button", name="Delete", exact=True).click()
    page.locator("dialog[open]").get_by_role("button", name="Delete web-copy").click()
    page.get_by_role("heading", name="Dashboard").wait_for()
    assert m.api("GET", "/v1/volumes/web-copy").status_code == 404
    # The dashboard's row of web has its I/O of now, from the same metrics.
    page.locator('[data-io="web"]').filter(has_text=re.compile(r"IOPS, .*/s, .* ms")).wait_for()

    # Expand; revert to s1 (asked first) what was written after it; detach (asked too).
    page.goto(m.url + "/#/volumes/web")
    page.get_by_role("button", name="Expand").click()
    dialog_submit(page, {"New size": "96M"}, "Expand")
    page.locator("dl.details").get_by_text("96.0 MiB").wait_for()
    assert m.volume("web")["size"] == 96 * MiB
    before = digest(uri, 8)
    write(uri, 2)
    assert digest(uri, 8) != before
    page.get_by_role("button", name="Revert to s1").click()
    page.locator("dialog[open]").get_by_role("button", name="Revert to s1").click()
    page.get_by_text("Revert web to s1: done").wait_for()
    assert digest(m.volume("web")["nbd_uri"], 8) == before
    # A snapshot taken and deleted from the tree, asked first with what deleting frees.
    page.get_by_role("button", name="Snapshot", exact=True).click()
    dialog_submit(page, {"Snapshot name (optional)": "s2"}, "Take snapshot")
    page.get_by_role("button", name="Delete snapshot s2").click()
    page.locator("dialog[open]").get_by_text(re.compile(r"deleting it frees \d")).wait_for()
    page.locator("dialog[open]").get_by_role("button", name="Delete snapshot s2").click()
    page.locator('li[data-snapshot="s2"]').wait_for(state="detached")
    assert "s2" not in {s["name"] for s in m.ok("GET", "/v1/volumes/web/snapshots")}
    page.get_by_role("button", name="Detach").click()
    page.locator("dialog[open]").get_by_role("button", name="Detach web").click()
    page.get_by_role("button", name="Attach").wait_for()
    assert m.volume("web")["state"] == "detached"
    # Detached, a snapshot cannot be reverted to nor deleted (the manager needs the
    # engine): the page offers neither.
    page.locator('li[data-snapshot="s1"]').get_by_role("button", name="Clone from s1").wait_for()
    assert page.get_by_role("button", name="Revert to s1").count() == 0
    assert page.get_by_role("button", name="Delete snapshot s1").count() == 0
    # Data locality changed from the same dialog as the replicas (detached: at once).
    assert m.volume("web")["data_locality"] == "best-effort"
    page.get_by_role("button", name="Replicas & locality").click()
    dialog_submit(page, {"Data locality": "disabled"}, "Apply")
    page.locator("dl.details").get_by_text("disabled", exact=True).wait_for()
    assert m.volume("web")["data_locality"] == "disabled"

    # A narrow screen: the page reflows, nothing wider than the window.
    page.set_viewport_size(PHONE)
    page.goto(m.url + "/#/volumes/web")
    page.get_by_role("heading", name="Volume web").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shot(page, tmp_path, "volume-narrow")


@pytest.mark.slow
def test_a_killed_replica_shows_its_rebuild_until_healthy(page, ui_manager, tmp_path):
    m = ui_manager
    # Slow rebuilds down, so the page's two-second poll sees one under way.
    m.ok("PATCH", "/v1/settings", json={"rebuild_bandwidth_limit": 4 * MiB})
    try:
        watch_a_rebuild(page, m, tmp_path)
    finally:  # the module's other tests copy at full speed
        m.ok("PATCH", "/v1/settings", json={"rebuild_bandwidth_limit": 0})


def watch_a_rebuild(page: Any, m: ManagerProc, tmp_path: Path) -> None:
    """Kill a replica of a new volume; the page shows its rebuild moving, then healthy."""
    # No local replica (data locality disabled): writes go on while the other one is away.
    m.ok("POST", "/v1/volumes", json={"name": "db", "size": "64M", "replicas": 2,
                                      "data_locality": "disabled"})
    vol = m.ok("POST", "/v1/volumes/db/attach", json={})
    login(page, m)
    page.goto(m.url + "/#/volumes/db")
    page.get_by_role("heading", name="Volume db").wait_for()

    write(vol["nbd_uri"], 24)
    # A replica killed with its data lost: restarted on its disk, it must be rebuilt whole
    # (24 MiB at 4 MiB/s), whenever the healer gets to it.
    victim = next(r for r in vol["replicas"] if r["pid"])
    shutil.rmtree(victim["path"])
    os.kill(victim["pid"], signal.SIGKILL)
    page.locator("dl.details .badge-degraded").wait_for()
    bar = page.get_by_role("progressbar", name=f"rebuild of {victim['name']}").first
    bar.wait_for(timeout=60_000)
    # The bar moves: some of the copy done, not all of it, as the page polls.
    page.wait_for_function(
        "name => [...document.querySelectorAll('progress')].some(p => "
        "p.getAttribute('aria-label') === 'rebuild of ' + name && p.value > 0 "
        "&& p.value < p.max)", arg=victim["name"], timeout=60_000)
    shot(page, tmp_path, "rebuilding")
    # Until healthy: then the bar is gone and every replica is RW.
    page.locator("dl.details .badge-healthy").wait_for(timeout=60_000)
    assert page.get_by_role("progressbar", name=f"rebuild of {victim['name']}").count() == 0
    assert m.volume("db")["health"] == "healthy"
    shot(page, tmp_path, "rebuilt")


def test_a_viewer_sees_no_action_and_the_api_refuses_it(page, ui_manager, tmp_path):
    m = ui_manager
    m.ok("POST", "/v1/volumes", json={"name": "ro", "size": "16M", "replicas": 1})
    m.ok("POST", "/v1/volumes/ro/attach", json={})
    m.ok("POST", "/v1/volumes/ro/snapshots", json={"name": "keep"})
    viewer = m.ok("POST", "/v1/users", json={"name": "vic", "role": "viewer"})
    login(page, m, viewer["token"])
    page.get_by_text("(viewer)").wait_for()
    assert page.get_by_role("button", name="Create volume").count() == 0
    assert page.get_by_role("link", name="Settings").count() == 0
    page.get_by_role("link", name="ro", exact=True).click()
    page.locator('li[data-snapshot="keep"]').wait_for()
    page.locator("dl.details .badge-attached").wait_for()
    # Not one button but logging out: no attach, detach, snapshot, revert, delete...
    assert page.get_by_role("button").all_inner_texts() == ["Log out"]
    shot(page, tmp_path, "viewer-volume")
    # What the page hides the API refuses too: a delete sent with the viewer's own session
    # (its cookie and CSRF token) is 403, naming the role it needs; the volume stays.
    status, detail = page.evaluate("""async () => {
        const s = await (await fetch("/v1/session")).json();
        const r = await fetch("/v1/volumes/ro?force=true",
                              {method: "DELETE", headers: {"X-CSRF-Token": s.csrf}});
        return [r.status, (await r.json()).detail];
    }""")
    assert status == 403 and "operator" in detail, detail
    assert m.volume("ro")["state"] == "attached"


def test_a_password_login_keeps_a_strict_httponly_session_until_logout(page, ui_manager,
                                                                       tmp_path):
    m = ui_manager
    m.ok("POST", "/v1/users", json={"name": "olga", "role": "operator",
                                    "password": "correct horse"})
    m.ok("POST", "/v1/volumes", json={"name": "opv", "size": "16M", "replicas": 1})
    page.goto(m.url + "/")
    page.get_by_label("User", exact=True).fill("olga")
    page.get_by_label("Password", exact=True).fill("wrong horse")
    page.get_by_role("button", name="Log in", exact=True).click()
    page.get_by_role("alert").filter(has_text="wrong user or password").wait_for()
    page.get_by_label("Password", exact=True).fill("correct horse")
    page.get_by_role("button", name="Log in", exact=True).click()
    page.get_by_text("(operator)").wait_for()
    # An operator works with volumes but has no settings.
    assert page.get_by_role("button", name="Create volume").count() == 1
    assert page.get_by_role("link", name="Settings").count() == 0
    operator_sees_volume_actions_but_no_settings(page, m)
    shot(page, tmp_path, "operator-backups")
    cookie = next(c for c in page.context.cookies() if c["name"] == "drove_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # out of the scripts' reach
    # A reload keeps the session (the cookie; nothing kept by the page itself).
    page.reload()
    page.get_by_text("(operator)").wait_for()
    page.get_by_role("button", name="Log out").click()
    page.get_by_label("API token").wait_for()
    assert page.evaluate("fetch('/v1/session').then(r => r.status)") == 401


def operator_sees_volume_actions_but_no_settings(page: Any, m: ManagerProc) -> None:
    """Logged in as an operator: every action on a volume, none on the settings, the
    backup target or the users; the API refuses a settings change naming the admin role."""
    page.get_by_role("link", name="opv", exact=True).click()
    actions = page.get_by_role("group", name="Volume actions")
    actions.get_by_role("button", name="Attach").wait_for()
    assert actions.get_by_role("button").all_inner_texts() == [
        "Attach", "Snapshot", "Clone", "Expand", "Replicas & locality", "Delete"]
    page.get_by_role("button", name="Add recurring job").wait_for()
    # The settings page is not there for an operator: its address shows the dashboard.
    page.goto(m.url + "/#/settings")
    page.get_by_role("heading", name="Dashboard").wait_for()
    assert page.get_by_role("heading", name="Settings").count() == 0
    # The backups page shows the target, but no change of it; there is no user admin.
    page.get_by_role("link", name="Backups").click()
    page.get_by_role("heading", name="Target").wait_for()
    assert page.get_by_role("button", name="Change target").count() == 0
    assert page.get_by_role("navigation").get_by_role("link").all_inner_texts() == [
        "Dashboard", "Backups", "Events"]
    # What the page leaves out the API refuses: a settings change, the backup target, the
    # users, sent with the operator's own session (its cookie and CSRF token).
    before = m.ok("GET", "/v1/settings")
    answers = page.evaluate("""async () => {
        const s = await (await fetch("/v1/session")).json();
        const headers = {"X-CSRF-Token": s.csrf, "Content-Type": "application/json"};
        const calls = [["PATCH", "/v1/settings", {over_provisioning_percent: 500}],
                       ["PUT", "/v1/backup-target", {url: ""}],
                       ["GET", "/v1/users", null]];
        const out = [];
        for (const [method, path, body] of calls) {
            const r = await fetch(path, {method, headers,
                                         body: body ? JSON.stringify(body) : undefined});
            out.push([r.status, (await r.json()).detail]);
        }
        return out;
    }""")
    for status, detail in answers:
        assert status == 403 and "admin role" in detail and "operator" in detail, detail
    assert m.ok("GET", "/v1/settings") == before


def digest(uri: str, mib: int) -> str:
    """sha256 of the export's first ``mib`` MiB, read with nbdsh."""
    return nbdsh(f"import hashlib\nh.connect_uri({uri!r})\n"
                 f"print(hashlib.sha256(h.pread({mib * MiB}, 0)).hexdigest())\n"
                 "h.shutdown()", timeout=60).strip()


@pytest.mark.slow
def test_back_up_and_restore_from_the_ui_with_the_tasks_progress(page, ui_manager, tmp_path):
    m = ui_manager
    (tmp_path / "backups").mkdir()
    m.ok("POST", "/v1/volumes", json={"name": "bk", "size": "16M", "replicas": 1})
    uri = m.ok("POST", "/v1/volumes/bk/attach", json={})["nbd_uri"]
    write(uri, 4)
    login(page, m)
    # The target, set by the admin on the backups page; the manager opened it.
    target = f"file://{tmp_path / 'backups'}"
    page.get_by_role("link", name="Backups").click()
    page.get_by_role("button", name="Change target").click()
    dialog_submit(page, {"URL": target}, "Set target")
    page.locator("section[aria-label='Backup target']").get_by_text(target).wait_for()
    assert m.ok("GET", "/v1/backup-target")["url"] == target
    page.goto(m.url + "/#/volumes/bk")
    page.get_by_role("heading", name="Volume bk").wait_for()

    # Back up: a task, followed on the page until it succeeded; then listed.
    page.get_by_role("button", name="Back up", exact=True).click()
    dialog_submit(page, {}, "Back up")
    page.locator(".tasks li.task").filter(has_text="succeeded").wait_for(timeout=60_000)
    (backup,) = m.ok("GET", "/v1/backups", params={"volume": "bk"})
    restore = page.get_by_role("button", name=f"Restore {backup['name']}")
    restore.wait_for()
    shot(page, tmp_path, "backed-up")

    # Restore it into a new volume: the task's progress until done, then the same data.
    restore.click()
    dialog_submit(page, {"New volume name": "bk-back"}, "Restore")
    page.locator(".tasks li.task").filter(has_text=f"Restore {backup['name']}") \
        .filter(has_text="succeeded").wait_for(timeout=60_000)
    back = m.ok("POST", "/v1/volumes/bk-back/attach", json={})
    assert digest(back["nbd_uri"], 4) == digest(uri, 4)

    # Instant: the new volume is attached and serving at once, filled behind (a task).
    restore.click()
    dialog_submit(page, {"New volume name": "bk-now",
                         "Instant: usable at once, filled in the background": True}, "Restore")
    page.locator(".tasks li.task").filter(has_text="bk-now").wait_for()  # answered: it exists
    now = m.wait_volume("bk-now", lambda v: v["state"] == "attached" and v["nbd_uri"],
                        what="the instant restore attached")
    assert digest(now["nbd_uri"], 4) == digest(uri, 4)
    page.locator(".tasks li.task").filter(has_text="bk-now").filter(has_text="succeeded") \
        .wait_for(timeout=60_000)

    # One more replica, live: the dialog, then two RW replicas on the page.
    page.get_by_role("button", name="Replicas & locality").click()
    dialog_submit(page, {"Replicas": "2"}, "Apply")
    page.locator("section[aria-label=Replicas] tbody .badge-rw").nth(1).wait_for(timeout=60_000)
    assert m.volume("bk")["replica_count"] == 2

    # On the backups page: verified (a task, until it succeeded), then deleted (asked first).
    page.get_by_role("link", name="Backups").click()
    page.get_by_role("button", name=f"Verify {backup['name']}").click()
    page.locator(".tasks li.task").filter(has_text=f"Verify {backup['name']}") \
        .filter(has_text="succeeded").wait_for(timeout=60_000)
    page.get_by_role("button", name=f"Delete {backup['name']}").click()
    page.locator("dialog[open]").get_by_role("button", name="Delete backup").click()
    page.locator(".tasks li.task").filter(has_text=f"Delete {backup['name']}") \
        .filter(has_text="succeeded").wait_for(timeout=60_000)
    page.get_by_role("button", name=f"Delete {backup['name']}").wait_for(state="detached")
    assert m.api("GET", f"/v1/backups/{backup['name']}").status_code == 404
    shot(page, tmp_path, "backups-page")


def test_events_backups_and_settings_pages_by_keyboard(page, ui_manager, tmp_path):
    m = ui_manager
    m.ok("POST", "/v1/volumes", json={"name": "ev", "size": "16M", "replicas": 1})
    login(page, m)
    # Events, filtered by kind: only that kind is left.
    page.get_by_role("link", name="Events").click()
    page.get_by_role("heading", name="Events").wait_for()
    page.get_by_role("cell", name="volume-created").first.wait_for()
    page.get_by_label("Kind").fill("volume-created")
    kinds = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert kinds and set(kinds) == {"volume-created"}, kinds
    # ... and by volume (asked of the API at the next poll): ev's creation alone.
    page.get_by_label("Volume", exact=True).fill("ev")
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.locator("td:nth-child(4)")).to_have_text("ev")
    # ... and by level: ev has no warning, its creation was news.
    page.get_by_label("Level", exact=True).select_option("warning")
    expect(rows).to_have_text("no events")
    page.get_by_label("Level", exact=True).select_option("info")
    expect(rows.locator("td:nth-child(3)")).to_have_text("volume-created")
    assert not unlabelled(page)
    shot(page, tmp_path, "events")
    page.get_by_role("link", name="Backups").click()
    page.get_by_role("heading", name="Target").wait_for()

    # Settings by keyboard: Enter opens the dialog, Escape closes it and gives the focus
    # back, changes nothing; then a change saved.
    page.get_by_role("link", name="Settings").click()
    change = page.get_by_role("button", name="Change settings")
    change.focus()
    page.keyboard.press("Enter")
    page.locator("dialog[open]").wait_for()
    page.keyboard.press("Escape")
    page.locator("dialog[open]").wait_for(state="detached")
    assert page.evaluate("document.activeElement.textContent") == "Change settings"
    before = m.ok("GET", "/v1/settings")
    page.keyboard.press("Enter")
    field = page.locator("dialog[open]").get_by_label("over_provisioning_percent")
    field.fill(str(before["over_provisioning_percent"] + 50))
    page.keyboard.press("Enter")  # submits the form
    page.locator("dialog[open]").wait_for(state="detached")
    page.get_by_text("Change settings: done").wait_for()
    after = m.ok("GET", "/v1/settings")
    assert after == {**before, "over_provisioning_percent":
                     before["over_provisioning_percent"] + 50}
    m.ok("PATCH", "/v1/settings",
         json={"over_provisioning_percent": before["over_provisioning_percent"]})


def test_an_admin_manages_users_on_the_users_page(page, ui_manager, tmp_path):
    m = ui_manager
    login(page, m)
    page.get_by_role("link", name="Users").click()
    page.get_by_role("heading", name="Users").wait_for()
    page.get_by_role("cell", name="admin", exact=True).first.wait_for()

    # Created with a role and a password: its token shown once, and it works.
    page.get_by_role("button", name="Create user").click()
    dialog_submit(page, {"User name": "uma", "Role": "viewer",
                         "Password (optional, for the web UI)": " a pass phrase "},
                  "Create user")
    token = page.get_by_label("Token of uma").input_value()
    assert page.evaluate("document.activeElement.id") == "new-token"
    assert whoami(m, token) == (200, "viewer")
    user = m.ok("GET", "/v1/users/uma")
    assert user["role"] == "viewer" and user["password"]
    # The password as typed, spaces included.
    assert httpx.post(m.url + "/v1/session", json={"user": "uma", "password": " a pass phrase "}
                      ).status_code == 200
    page.get_by_role("button", name="Hide the token").click()
    assert page.get_by_label("Token of uma").count() == 0
    assert not unlabelled(page)
    shot(page, tmp_path, "users")

    # Another role, at its next call.
    page.get_by_role("button", name="Change role of uma").click()
    dialog_submit(page, {"Role": "operator"}, "Change role")
    page.get_by_text("Role of uma: done").wait_for()
    assert whoami(m, token) == (200, "operator")

    # One more token; then every token revoked (asked first): neither works.
    page.get_by_role("button", name="New token for uma").click()
    second = page.get_by_label("Token of uma")
    second.wait_for()
    second = second.input_value()
    assert second != token and whoami(m, second) == (200, "operator")
    page.get_by_role("button", name="Revoke tokens of uma").click()
    page.locator("dialog[open]").get_by_role("button", name="Revoke tokens of uma").click()
    page.get_by_text("Revoke tokens of uma: done").wait_for()
    assert whoami(m, token)[0] == 401 and whoami(m, second)[0] == 401

    # Deleted, asked first: gone from the page and the API.
    page.get_by_role("button", name="Delete user uma").click()
    page.locator("dialog[open]").get_by_role("button", name="Delete user uma").click()
    page.get_by_role("button", name="Delete user uma").wait_for(state="detached")
    assert m.api("GET", "/v1/users/uma").status_code == 404


def whoami(m: ManagerProc, token: str) -> tuple[int, str | None]:
    """The status of GET /v1/session with ``token`` and the role it names."""
    r = httpx.get(m.url + "/v1/session", headers={"Authorization": f"Bearer {token}"})
    return r.status_code, r.json().get("role") if r.status_code == 200 else None
