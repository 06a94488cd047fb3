"""`drove backup`, `drove task`, `drove job` against a fake of the manager's API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from drove.cli import backup, job, task
from drove.cli.client import Manager, Target
from drove.cli.main import app

MiB = 1 << 20
GiB = 1 << 30
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzEXAMPLEKEY"

BACKUP = {"name": "backup-1a2b", "volume": "db", "snapshot": "snap-1", "snapshot_id": "s-1",
          "size": 10 * GiB, "created": "2026-11-21T10:00:00Z", "labels": {"why": "test"},
          "compression": "zstd", "parent": None, "bytes_read": 8 * MiB, "bytes_new": 3 * MiB,
          "bytes_stored": 1 * MiB, "bytes_reused": 5 * MiB, "blocks_new": 3,
          "blocks_reused": 5, "data_size": 8 * MiB}
JOB = {"name": "hourly", "kind": "snapshot", "cron": "0 * * * *", "retain": 24,
       "volumes": ["db"], "selector": {"tier": "gold"}, "labels": {"team": "a"},
       "enabled": True, "created": "2026-11-21T10:00:00Z", "last_run": None,
       "next_run": "2026-11-21T11:00:00Z", "last_result": None}


def a_task(state: str = "running", kind: str = "backup-create", done: int = 0, total: int = 0,
           **kw: Any) -> dict[str, Any]:
    """A Task object as the API returns it."""
    base = {"id": "task-1", "kind": kind, "state": state, "volume": "db",
            "backup": "backup-1a2b", "progress": {"done": done, "total": total},
            "message": None, "error": None, "result": None,
            "created": "2026-11-21T10:00:00Z", "finished": None}
    return {**base, **kw}


class FakeApi:
    """Canned answers per (method, path), given in turn (the last one repeats); records calls."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []

    def on(self, method: str, path: str, *bodies: Any, status: int = 200) -> None:
        """Answer ``method path`` with ``bodies`` in turn (a KeyboardInterrupt is raised)."""
        self.answers[(method, path)] = [(status, b) for b in bodies]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        key = (request.method, request.url.path)
        self.calls.append((*key, dict(request.url.params), body))
        queue = self.answers.get(key)
        if not queue:
            return httpx.Response(404, json={"detail": f"no fake for {key}"})
        status, answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, BaseException):
            raise answer
        return httpx.Response(status, json=answer)

    def bodies(self, method: str, path: str) -> list[Any]:
        """The JSON bodies sent to ``method path``."""
        return [b for m, p, _, b in self.calls if (m, p) == (method, path)]

    def count(self, method: str, path: str) -> int:
        """How many calls ``method path`` had."""
        return len(self.bodies(method, path))


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    """Every command talks to a fresh FakeApi; tasks are polled without sleeping."""
    fake = FakeApi()
    target = Target(url="http://manager", token="tok", data_dir=Path("/d"),
                    url_source="--url", token_source="--token")

    def connect(cls: type[Manager], *args: Any, **kwargs: Any) -> Manager:
        return cls(target, transport=httpx.MockTransport(fake))

    monkeypatch.setattr(Manager, "connect", classmethod(connect))
    monkeypatch.setattr(task, "POLL_INTERVAL", 0)
    monkeypatch.delenv(backup.SECRET_ENV, raising=False)
    return fake


runner = CliRunner()


def drove(*args: str, **kwargs: Any) -> Any:
    """Run `drove ARGS` (the real app, so the registration in main is covered too)."""
    return runner.invoke(app, list(args), **kwargs)


def one_line(text: str) -> str:
    """Rich wraps at the terminal width; compare as one line."""
    return " ".join(text.split())


def shows_secret(res: Any) -> bool:
    """Whether the secret is anywhere in the output, even folded over lines."""
    return SECRET in "".join(res.output.split())


# ----------------------------------------------------------------- backup create


def test_create_waits_through_running_and_prints_the_backup(api):
    api.on("POST", "/v1/volumes/db/backups", a_task(), status=202)
    api.on("GET", "/v1/tasks/task-1",
           a_task(done=1 * MiB, total=8 * MiB, message="waiting for the delete of backup-x"),
           a_task(done=8 * MiB, total=8 * MiB),
           a_task("succeeded", done=8 * MiB, total=8 * MiB, result=BACKUP))
    res = drove("backup", "create", "db", "--snapshot", "snap-1", "--label", "why=test",
                "--compression", "lz4", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out == BACKUP and out["name"] == "backup-1a2b"
    assert api.bodies("POST", "/v1/volumes/db/backups") == [
        {"snapshot": "snap-1", "labels": {"why": "test"}, "compression": "lz4"}]
    assert api.count("GET", "/v1/tasks/task-1") == 3


def test_create_prints_a_one_line_summary(api):
    api.on("POST", "/v1/volumes/db/backups", a_task(), status=202)
    api.on("GET", "/v1/tasks/task-1", a_task("succeeded", result=BACKUP))
    res = drove("backup", "create", "db")
    assert res.exit_code == 0, res.output
    assert api.bodies("POST", "/v1/volumes/db/backups") == [
        {"snapshot": None, "labels": {}, "compression": None}]
    assert one_line(res.stdout) == ("backup backup-1a2b of db (snapshot snap-1): 3 MiB new, "
                                    "5 MiB reused, 1 MiB stored")


def test_create_no_wait_json_prints_task_and_name(api):
    api.on("POST", "/v1/volumes/db/backups", a_task(), status=202)
    res = drove("backup", "create", "db", "--no-wait", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"task": "task-1", "name": "backup-1a2b"}
    assert api.count("GET", "/v1/tasks/task-1") == 0


def test_failed_task_exits_1_with_its_error(api):
    api.on("POST", "/v1/volumes/db/backups", a_task(), status=202)
    api.on("GET", "/v1/tasks/task-1", a_task(done=MiB, total=8 * MiB),
           a_task("failed", error="s3://b/p: access denied"))
    res = drove("backup", "create", "db", "--json")
    assert res.exit_code == 1
    assert res.stdout == ""
    assert "backup backup-1a2b of db failed: s3://b/p: access denied" in one_line(res.stderr)


def test_cancelled_task_exits_1(api):
    api.on("POST", "/v1/volumes/db/backups", a_task(), status=202)
    api.on("GET", "/v1/tasks/task-1", a_task("cancelled"))
    res = drove("backup", "create", "db")
    assert res.exit_code == 1
    assert "cancelled" in res.stderr


def test_ctrl_c_while_waiting_cancels_the_task(api):
    api.on("POST", "/v1/volumes/db/backups", a_task(), status=202)
    api.on("GET", "/v1/tasks/task-1", KeyboardInterrupt())
    api.on("POST", "/v1/tasks/task-1/cancel", a_task("cancelled"))
    res = drove("backup", "create", "db")
    assert res.exit_code == 130
    assert api.count("POST", "/v1/tasks/task-1/cancel") == 1
    assert "cancelled task task-1" in one_line(res.stderr)


def test_api_errors_are_shown_by_the_client(api):
    api.on("POST", "/v1/volumes/db/backups",
           {"detail": "volume db is not attached: `drove volume attach db`"}, status=409)
    res = drove("backup", "create", "db")
    assert res.exit_code == 1
    assert "volume db is not attached" in one_line(res.stderr)
    assert "(HTTP 409)" in res.stderr


# ------------------------------------------------------------ list, get, restore


def test_list_json_is_the_list_of_backups(api):
    other = {**BACKUP, "name": "backup-3c4d", "volume": "web"}
    api.on("GET", "/v1/backups", [BACKUP, other])
    res = drove("backup", "list", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out == [BACKUP, other]
    for b in out:
        assert {"name", "volume", "snapshot", "size", "bytes_new", "bytes_reused",
                "created"} <= set(b)
    assert api.calls[-1][2] == {}
    res = drove("backup", "list", "db")
    assert res.exit_code == 0, res.output
    assert api.calls[-1][2] == {"volume": "db"}
    assert "backup-1a2b" in res.stdout and "10 GiB" in res.stdout


def test_get_shows_the_backup(api):
    api.on("GET", "/v1/backups/backup-1a2b", BACKUP)
    res = drove("backup", "get", "backup-1a2b")
    assert res.exit_code == 0, res.output
    assert "backup-1a2b" in res.stdout and "why=test" in res.stdout
    assert json.loads(drove("backup", "get", "backup-1a2b", "--json").stdout) == BACKUP


def test_restore_waits_and_prints_the_result(api):
    result = {"volume": "db2", "bytes_written": 8 * MiB}
    api.on("POST", "/v1/backups/backup-1a2b/restore",
           a_task(kind="backup-restore", volume="db2"), status=202)
    api.on("GET", "/v1/tasks/task-1",
           a_task("succeeded", kind="backup-restore", volume="db2", result=result))
    res = drove("backup", "restore", "backup-1a2b", "--to", "db2", "--replicas", "2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == result
    assert api.bodies("POST", "/v1/backups/backup-1a2b/restore") == [
        {"volume": "db2", "replicas": 2, "pool": None}]


# --------------------------------------------------------------------- verify


def test_verify_all_good(api):
    api.on("POST", "/v1/backups/backup-1a2b/verify", a_task(kind="backup-verify"), status=202)
    api.on("GET", "/v1/tasks/task-1", a_task(
        "succeeded", kind="backup-verify",
        result={"blocks": 8, "bytes": 8 * MiB, "errors": []}))
    res = drove("backup", "verify", "backup-1a2b")
    assert res.exit_code == 0, res.output
    assert one_line(res.stdout) == "backup backup-1a2b: 8 blocks, 8 MiB, all good"


def test_verify_with_errors_exits_1_naming_offset_and_hash(api):
    bad_hash = "blake3:" + "ab12" * 16
    result = {"blocks": 8, "bytes": 8 * MiB, "errors": [
        {"offset": GiB + 4 * MiB, "hash": bad_hash, "error": "hash mismatch"},
        {"offset": 0, "hash": "blake3:" + "cd34" * 16, "error": "missing"}]}
    api.on("POST", "/v1/backups/backup-1a2b/verify", a_task(kind="backup-verify"), status=202)
    api.on("GET", "/v1/tasks/task-1", a_task("failed", kind="backup-verify", result=result,
                                             error="2 bad blocks"))
    res = drove("backup", "verify", "backup-1a2b")
    assert res.exit_code == 1
    assert f"{GiB + 4 * MiB}" in res.stdout and "1 GiB" in res.stdout
    assert bad_hash in res.stdout and "hash mismatch" in res.stdout and "missing" in res.stdout
    assert "2 bad block(s)" in one_line(res.stderr)
    res = drove("backup", "verify", "backup-1a2b", "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout) == result


def test_verify_that_could_not_run_shows_the_error(api):
    api.on("POST", "/v1/backups/backup-1a2b/verify", a_task(kind="backup-verify"), status=202)
    api.on("GET", "/v1/tasks/task-1", a_task("failed", kind="backup-verify",
                                             error="target unreachable"))
    res = drove("backup", "verify", "backup-1a2b")
    assert res.exit_code == 1
    assert "target unreachable" in res.stderr


# --------------------------------------------------------------------- delete


def test_delete_needs_yes_without_a_terminal(api):
    res = drove("backup", "delete", "backup-1a2b")
    assert res.exit_code == 1
    assert "--yes" in res.stderr
    assert api.calls == []


def test_delete_waits_and_prints_what_was_removed(api):
    api.on("DELETE", "/v1/backups/backup-1a2b", a_task(kind="backup-delete"), status=202)
    api.on("GET", "/v1/tasks/task-1", a_task(
        "succeeded", kind="backup-delete", result={"blocks_removed": 3, "bytes_removed": MiB}))
    res = drove("backup", "delete", "backup-1a2b", "--yes")
    assert res.exit_code == 0, res.output
    assert one_line(res.stdout) == ("backup backup-1a2b deleted: 3 block(s), 1 MiB removed "
                                    "from the target")


# ------------------------------------------------------------------- target


def test_target_set_reads_the_secret_file_and_never_prints_it(api, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    answer = {"url": "s3://b/p", "endpoint": "http://minio:9000", "region": "us-east-1",
              "access_key": "AKIAEXAMPLE", "secret_key_set": True, "compression": "zstd",
              "available": True, "error": None}
    api.on("PUT", "/v1/backup-target", answer)
    for extra in ([], ["--json"]):
        res = drove("backup", "target", "set", "s3://b/p", "--endpoint", "http://minio:9000",
                    "--region", "us-east-1", "--access-key", "AKIAEXAMPLE",
                    "--secret-key-file", str(secret_file), *extra)
        assert res.exit_code == 0, res.output
        assert not shows_secret(res)
    assert api.bodies("PUT", "/v1/backup-target")[0] == {
        "url": "s3://b/p", "endpoint": "http://minio:9000", "region": "us-east-1",
        "access_key": "AKIAEXAMPLE", "secret_key": SECRET}
    assert json.loads(res.stdout) == answer


def test_target_set_takes_the_secret_from_the_env(api, monkeypatch):
    api.on("PUT", "/v1/backup-target", {"url": "s3://b/p", "secret_key_set": True,
                                        "compression": "lz4", "available": True})
    monkeypatch.setenv(backup.SECRET_ENV, SECRET)
    res = drove("backup", "target", "set", "s3://b/p", "--compression", "lz4")
    assert res.exit_code == 0, res.output
    assert not shows_secret(res)
    assert api.bodies("PUT", "/v1/backup-target") == [
        {"url": "s3://b/p", "secret_key": SECRET, "compression": "lz4"}]


def test_target_set_hides_the_secret_in_errors(api):
    detail = [{"loc": ["body"], "msg": "bad", "input": {"secret_key": SECRET}}]
    api.on("PUT", "/v1/backup-target", {"detail": detail}, status=422)
    res = drove("backup", "target", "set", "s3://b/p", "--secret-key", SECRET)
    assert res.exit_code == 1
    assert not shows_secret(res)
    assert "<secret key>" in one_line(res.stderr)


def test_target_set_refuses_two_secrets(api, tmp_path):
    (tmp_path / "s").write_text(SECRET)
    res = drove("backup", "target", "set", "s3://b/p", "--secret-key", SECRET,
                "--secret-key-file", str(tmp_path / "s"))
    assert res.exit_code == 1
    assert api.calls == []
    assert not shows_secret(res)


def test_target_get_and_clear(api):
    api.on("GET", "/v1/backup-target", {"url": "file:///srv/b", "compression": "zstd",
                                        "available": False, "error": "no such directory"})
    for command in ("get", "show"):
        res = drove("backup", "target", command)
        assert res.exit_code == 0, res.output
        assert "file:///srv/b" in res.stdout and "no such directory" in res.stdout
    api.on("PUT", "/v1/backup-target", {"url": "", "available": False})
    res = drove("backup", "target", "clear")
    assert res.exit_code == 0, res.output
    assert api.bodies("PUT", "/v1/backup-target") == [{"url": ""}]


# ---------------------------------------------------------------------- tasks


def test_task_wait_exits_1_on_failure(api):
    api.on("GET", "/v1/tasks/task-1", a_task(), a_task("failed", error="disk full"))
    res = drove("task", "wait", "task-1")
    assert res.exit_code == 1
    assert "disk full" in res.stderr
    api.on("GET", "/v1/tasks/task-1", a_task("succeeded", result=BACKUP))
    res = drove("task", "wait", "task-1")
    assert res.exit_code == 0, res.output
    assert "succeeded" in res.stdout


def test_task_list_passes_the_state(api):
    api.on("GET", "/v1/tasks", [a_task(done=MiB, total=4 * MiB, message="uploading")])
    res = drove("task", "list", "--state", "running")
    assert res.exit_code == 0, res.output
    assert api.calls[-1][2] == {"state": "running"}
    assert "task-1" in res.stdout and "25%" in res.stdout


# ----------------------------------------------------------------------- jobs


def test_job_create_sends_volumes_selector_and_labels(api):
    api.on("POST", "/v1/jobs", JOB, status=201)
    res = drove("job", "create", "--name", "hourly", "--kind", "snapshot", "--cron", "0 * * * *",
                "--retain", "24", "--volume", "db", "--label", "tier=gold",
                "--snapshot-label", "team=a", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == JOB
    assert api.bodies("POST", "/v1/jobs") == [
        {"name": "hourly", "kind": "snapshot", "cron": "0 * * * *", "retain": 24,
         "volumes": ["db"], "selector": {"tier": "gold"}, "labels": {"team": "a"},
         "enabled": True}]
    res = drove("job", "create", "--kind", "backup", "--cron", "5 4 * * *", "--retain", "7",
                "--label", "tier=gold", "--label", "env=prod", "--disabled")
    assert res.exit_code == 0, res.output
    assert api.bodies("POST", "/v1/jobs")[1] == {
        "name": None, "kind": "backup", "cron": "5 4 * * *", "retain": 7, "volumes": [],
        "selector": {"tier": "gold", "env": "prod"}, "labels": {}, "enabled": False}


def test_job_create_needs_a_volume_or_a_label(api):
    res = drove("job", "create", "--kind", "snapshot", "--cron", "0 * * * *", "--retain", "3",
                "--snapshot-label", "team=a")
    assert res.exit_code == 1
    assert "--volume" in res.stderr and "--label" in res.stderr
    assert api.calls == []


def test_job_list_and_failed_run(api):
    failed = {**JOB, "last_run": "2026-11-21T10:00:00Z",
              "last_result": {"time": "2026-11-21T10:00:00Z", "ok": False,
                              "message": "volume db is not attached"}}
    api.on("GET", "/v1/jobs", [JOB, {**failed, "name": "nightly", "enabled": False}])
    res = drove("job", "list")
    assert res.exit_code == 0, res.output
    assert "db + tier=gold" in res.stdout and "disabled" in res.stdout
    assert "volume db is not attached" in one_line(res.stdout)
    api.on("POST", "/v1/jobs/hourly/run", failed)
    res = drove("job", "run", "hourly")
    assert res.exit_code == 1
    assert "volume db is not attached" in one_line(res.stderr)


# -------------------------------------------------------------- every command


def test_every_command_takes_the_connection_options_and_json():
    root = typer.Typer()
    for module in (backup, task, job):
        root.add_typer(module.app, name=module.__name__.rsplit(".", 1)[1])
    seen = 0
    stack = list(typer.main.get_command(root).commands.values())
    while stack:
        group = stack.pop()
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                stack.append(command)
                continue
            seen += 1
            opts = {o for p in command.params for o in p.opts}
            assert {"--url", "--token", "--data-dir", "--json"} <= opts, (group.name, name)
            assert command.help, (group.name, name)
    assert seen == 4 + 6 + 4 + 5
