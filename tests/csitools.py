"""Start a real `drove csi` beside a real `drove serve` and call it as a CO would: a gRPC
client over its unix socket (stubs from drove.csi.proto)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from drove.csi.proto import pb, rpc

Mode = pb.VolumeCapability.AccessMode


class CsiDriver:
    """A running `drove csi --mode all` for the manager of ``data_dir``, with stubs."""

    def __init__(self, data_dir: Path, root: Path, node: str) -> None:
        self.data_dir = data_dir
        self.socket = root / "csi" / "csi.sock"
        self.state_dir = root / "csi" / "state"
        self.log = root / "csi.log"
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self, timeout: float = 60) -> CsiDriver:
        """Start the driver and wait until Probe answers over the socket."""
        env = {**os.environ, "DROVE_DATA_DIR": str(self.data_dir)}
        env.pop("DROVE_URL", None)
        env.pop("DROVE_TOKEN", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "drove", "csi", "--endpoint", f"unix://{self.socket}",
                 "--node-id", self.node, "--state-dir", str(self.state_dir)],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise AssertionError(f"drove csi did not serve: {self.log.read_text()[-3000:]}"
                                 ) from None
        self.identity = rpc.IdentityStub(self.channel)
        self.controller = rpc.ControllerStub(self.channel)
        self.node_service = rpc.NodeStub(self.channel)
        return self

    def take_down_all(self) -> None:
        """Unpublish and unstage whatever the driver still has staged (a failed test's
        leftovers: loop devices over a lazily unmounted FUSE file would outlive it)."""
        volumes = self.state_dir / "volumes"
        for record in sorted(volumes.glob("*.json")) if volumes.exists() else []:
            rec = json.loads(record.read_text())
            with contextlib.suppress(grpc.RpcError):
                for target in rec["targets"]:
                    self.node_service.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
                        volume_id=rec["volume"], target_path=target))
                self.node_service.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                    volume_id=rec["volume"], staging_target_path=rec["staging"]))

    def stop(self) -> None:
        """SIGTERM the driver and wait for it."""
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def mount_cap(fs: str = "", mode: int = Mode.SINGLE_NODE_WRITER,
              flags: tuple[str, ...] = ()) -> Any:
    """A mount-access VolumeCapability."""
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs,
                                                                     mount_flags=flags),
                               access_mode=pb.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> Any:
    """A block-access VolumeCapability."""
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=pb.VolumeCapability.AccessMode(mode=mode))


def code_of(call: Any, request: Any) -> grpc.StatusCode:
    """The status code a call that must fail fails with (AssertionError when it succeeds)."""
    try:
        call(request)
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError(f"{request!r} succeeded; it should have failed")


def wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    """Poll ``predicate`` until true (AssertionError naming ``what`` after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
