"""Random I/O through a real engine against a bytearray oracle, while replicas die and rebuild.

The client is drove's own NBD client (tested against nbdkit and libnbd in
test_nbd_client.py); the engine and every replica are real processes.  Each
round issues many concurrent requests on disjoint ranges (overlapping
concurrent writes have no defined order), checks reads against the oracle,
and now and then snapshots the volume, SIGKILLs a replica, or rebuilds one
onto a fresh process while the I/O goes on.  At the end every replica's head
and every snapshot must equal the oracle's copy of it, and all replicas each other.  A
trim leaves its whole 4 KiB blocks undefined until they are written again (NBD's rule:
drove punches the head's copy, and what an older layer holds, a user snapshot or a
rebuild's, shows through), so the oracle does not check those.  The ``local`` rounds
run with the first replica served by the engine itself (never killed: it has
no process of its own), so reads come from it and rebuilds copy from it.  The
``stacked`` rounds run the engine with every layer on (stats, QoS with limits the load
never reaches, AES-XTS encryption): the replicas then hold ciphertext, which the final
check decrypts with the volume's key.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import random

import pytest

from drove.engine.crypt import KEY_BYTES, Sectors, write_key_file
from drove.nbd.client import connect_uri
from replicatools import run

SIZE = 8 << 20
pytestmark = pytest.mark.timeout(300)


BS = 4096


class Oracle:
    """The volume's bytes, and the blocks a trim left undefined (not checked)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.undefined: set[int] = set()

    def set(self, off: int, data: bytes) -> None:
        """A write or zero: whole blocks it covers are defined again."""
        self.data[off:off + len(data)] = data
        self.undefined -= set(range(-(-off // BS), (off + len(data)) // BS))

    def trim(self, off: int, n: int) -> None:
        """Partly covered blocks read as zeros; whole ones are undefined."""
        self.data[off:off + n] = bytes(n)
        self.undefined |= set(range(-(-off // BS), (off + n) // BS))

    def seen(self, got: bytes, off: int) -> bytes:
        """``got`` (read at ``off``) with the undefined blocks' bytes taken from the oracle:
        compared with the oracle, only the defined bytes count."""
        out = bytearray(got)
        for b in self.undefined:
            s, e = max(b * BS, off), min((b + 1) * BS, off + len(got))
            if s < e:
                out[s - off:e - off] = self.data[s:e]
        return bytes(out)


async def one_round(client, oracle: Oracle, rnd: random.Random) -> None:
    """Up to 24 concurrent operations on disjoint ranges, then a full read check of them."""
    cuts = sorted(rnd.sample(range(1, SIZE // 8), 24))
    base = rnd.randrange(0, SIZE - SIZE // 8)
    spans = [(base + a, b - a) for a, b in itertools.pairwise(cuts)]

    async def op(off: int, n: int) -> None:
        kind = rnd.choice(["write", "write", "write", "zero", "trim", "read"])
        if kind == "write":
            data = rnd.randbytes(n)
            await client.write(off, data, fua=rnd.random() < 0.1)
            oracle.set(off, data)
        elif kind == "zero":
            await client.zero(off, n, may_trim=rnd.random() < 0.5)
            oracle.set(off, bytes(n))
        elif kind == "trim":
            await client.trim(off, n)
            oracle.trim(off, n)
        else:
            got = oracle.seen(await client.read(off, n), off)
            assert got == oracle.data[off:off + n], f"read {off}+{n}"

    await asyncio.gather(*(op(o, n) for o, n in spans))
    if rnd.random() < 0.3:
        await client.flush()
    lo, hi = spans[0][0], spans[-1][0] + spans[-1][1]
    assert oracle.seen(await client.read(lo, hi - lo), lo) == oracle.data[lo:hi]


@pytest.mark.parametrize("local, stacked", [(False, False), (True, False), (False, True)],
                         ids=["remote", "local", "stacked"])
@pytest.mark.parametrize("round_", range(2))
@pytest.mark.slow
def test_random_io_with_replica_failures_and_rebuilds(cluster, tmp_path, round_, local,
                                                      stacked):
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rnd = random.Random(seed)
    extra: list[str] = []
    plain = bytes  # what a replica's image holds, as the client sees it
    if stacked:
        key = os.urandom(KEY_BYTES)
        write_key_file(tmp_path / "data.key", key)
        extra = ["--key-file", str(tmp_path / "data.key")]
        sectors = Sectors(key)

        def plain(image: bytes) -> bytes:
            return bytes(sectors.decrypt(0, image))

    eng = cluster.start(3, str(SIZE), *extra, local=local)
    if stacked:
        limits = {"read_iops": 200_000, "write_iops": 200_000, "bandwidth": 4 << 30}
        assert eng.ok("PUT", "/v1/qos", json={"limits": limits})["limits"]["read_iops"]
    killable = {r.dir.name for r in cluster.remote}
    snapshots: dict[str, Oracle] = {}
    spares = iter(f"s{i}" for i in range(10))

    async def main() -> None:
        oracle = Oracle(SIZE)
        client = await connect_uri(eng.uri(), request_timeout=30)
        try:
            for rnd_no in range(60):
                await one_round(client, oracle, rnd)
                event = rnd.random()
                if event < 0.12:
                    name = f"snap{rnd_no}"
                    await asyncio.to_thread(eng.ok, "POST", "/v1/snapshots", json={"name": name})
                    snapshots[name] = copy.deepcopy(oracle)
                elif event < 0.20:
                    info = await asyncio.to_thread(eng.info)
                    rw = [r["name"] for r in info["replicas"] if r["mode"] == "RW"]
                    # A local replica alone acknowledges no write (write quorum): with one,
                    # keep a member outside the engine process.
                    outside = [r for r in info["replicas"]
                               if r["mode"] in ("RW", "WO") and not r.get("local")]
                    if (len(rw) > 1 and set(rw) & killable and (not local or len(outside) > 1)
                            and not (info["rebuild"] and
                                     info["rebuild"]["state"] not in ("done", "failed"))):
                        pick = rnd.choice(sorted(set(rw) & killable))
                        next(r for r in cluster.replicas if r.dir.name == pick).kill()
                elif event < 0.30:
                    info = await asyncio.to_thread(eng.info)
                    rebuilding = info["rebuild"] and info["rebuild"]["state"] not in (
                        "done", "failed", "cancelled")
                    dead = [r["name"] for r in info["replicas"] if r["mode"] == "ERR"]
                    if dead and not rebuilding:
                        await asyncio.to_thread(eng.ok, "DELETE", f"/v1/replicas/{dead[0]}")
                        fresh = cluster.replica(next(spares), SIZE)
                        cluster.replicas.append(fresh)
                        killable.add(fresh.dir.name)
                        await asyncio.to_thread(eng.ok, "POST", "/v1/replicas", json={
                            "name": fresh.dir.name, "url": fresh.control})
            assert oracle.seen(await client.read(0, SIZE), 0) == oracle.data
            await client.flush()
        finally:
            await client.close()
        # Let a running rebuild end, then compare every live replica with the oracle.
        await asyncio.to_thread(eng.wait_for, lambda i: not i["rebuild"] or i["rebuild"][
            "state"] in ("done", "failed", "cancelled"), 120, "rebuild end")
        info = await asyncio.to_thread(eng.info)
        live = {r["name"] for r in info["replicas"] if r["mode"] == "RW"}
        assert live, info
        head = tmp_path / "head.img"
        first: dict[str, bytes] = {}  # the first live replica's images: the others equal them
        for r in cluster.replicas:
            if r.dir.name not in live:
                continue
            run(["nbdcopy", r.uri("head"), str(head)])
            raw = head.read_bytes()
            got = plain(raw)
            assert not stacked or raw != got, f"replica {r.dir.name} holds plaintext"
            assert oracle.seen(got, 0) == oracle.data, f"replica {r.dir.name} head differs"
            assert first.setdefault("head", got) == got, f"replica {r.dir.name} head differs"
            for name, image in snapshots.items():
                run(["nbdcopy", r.uri(f"snapshot/{name}"), str(head)])
                got = plain(head.read_bytes())
                assert image.seen(got, 0) == image.data, f"{r.dir.name}: snapshot {name} differs"
                assert first.setdefault(name, got) == got, \
                    f"{r.dir.name}: snapshot {name} differs from another replica's"

    asyncio.run(main())
    print("snapshots", len(snapshots), "replicas started", len(cluster.replicas))
