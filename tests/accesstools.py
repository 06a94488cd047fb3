"""The NBD access key of a volume a real manager runs, for tests that talk to its replicas."""

from __future__ import annotations

from pathlib import Path

from drove.replica.access import KEY_ENV, bearer


def engine_key(pid: int) -> str:
    """The volume's access key, as its agent handed it to the engine ``pid`` (environment)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    prefix = KEY_ENV.encode() + b"="
    (key,) = [e[len(prefix):].decode() for e in env if e.startswith(prefix)]
    return key


def replica_headers(pid: int) -> dict[str, str]:
    """What a call to a replica's control API of the volume whose engine is ``pid`` sends."""
    return bearer(engine_key(pid))


def engine_headers(pid: int) -> dict[str, str]:
    """What a call to the control API of engine ``pid`` sends: the same key, which its API
    demands as its replicas' do."""
    return bearer(engine_key(pid))
