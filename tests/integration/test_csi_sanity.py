"""The Kubernetes CSI sanity suite (kubernetes-csi/csi-test's csi-sanity) against `drove csi`
and a real `drove serve`, with mount and with block access.

csi-sanity is not part of drove nor installed by ./dev (build it outside the project, e.g.
csi-test v5.3.1 with Debian's Go); this test runs only where DROVE_CSI_SANITY names the
binary, and is reported as skipped, never passed, elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csitools import CsiDriver
from managertools import ManagerProc

SANITY = os.environ.get("DROVE_CSI_SANITY", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SANITY, reason="DROVE_CSI_SANITY does not name a csi-sanity binary"),
]


@pytest.fixture
def manager() -> Iterator[ManagerProc]:
    """A `drove serve` in a short directory: sanity's volume names are ~50 characters and an
    engine's unix socket path (data dir + run/ + name + .nbd.sock) must stay under 108."""
    root = Path(tempfile.mkdtemp(prefix="dcs-"))
    m = ManagerProc(root / "data", root / "manager.log", root=root)
    try:
        yield m.start()
    finally:
        m.kill_everything()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("access", ["mount", "block"])
def test_csi_sanity(manager: ManagerProc, tmp_path: Path, access: str) -> None:
    node = manager.ok("GET", "/v1/nodes")[0]["name"]
    driver = CsiDriver(manager.data_dir, tmp_path, node).start()
    try:
        (tmp_path / "sanity").mkdir()  # csi-sanity makes its directories, not their parent
        params = tmp_path / "params.yaml"
        params.write_text('replicas: "1"\n')  # one machine: one replica per volume
        # A VolumeAttributesClass's: ControllerModifyVolume's specs set them on live volumes.
        mutable = tmp_path / "mutable.yaml"
        mutable.write_text('iopsLimit: "100000"\nwriteBandwidthLimit: "1G"\n')
        r = subprocess.run(
            [SANITY, f"--csi.endpoint=unix://{driver.socket}",
             f"--csi.mountdir={tmp_path / 'sanity' / 'target'}",
             f"--csi.stagingdir={tmp_path / 'sanity' / 'staging'}",
             f"--csi.testvolumesize={64 << 20}", f"--csi.testvolumeexpandsize={128 << 20}",
             f"--csi.testvolumeaccesstype={access}", f"--csi.testvolumeparameters={params}",
             f"--csi.testvolumemutableparameters={mutable}",
             "--ginkgo.no-color"],
            capture_output=True, text=True, timeout=300)
    finally:
        driver.stop()
    out = r.stdout + r.stderr
    summary = re.search(r"(\d+) Passed \| (\d+) Failed.*", out)
    assert summary, out[-5000:]
    print(f"csi-sanity, {access}: {summary.group(0)}")  # the counts docs/csi.md gives
    assert r.returncode == 0 and summary.group(2) == "0", out[-8000:]
    assert int(summary.group(1)) >= 70, summary.group(0)  # the suite ran, not a handful
