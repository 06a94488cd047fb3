"""The volume as host attach opens it: advertised at a fixed, large size, so it can grow.

NBD has no way to tell a connected client that the export grew, and nbdfuse (the
host attach's client, see :mod:`drove.agent.hostattach`) keeps the size it read
at connect time: its file, and a loop device over it, would never grow while
mounted. So host attach opens this view instead of the volume itself. The view
advertises :data:`VIEW_SIZE` (or the volume's size, if larger), and the loop device
over nbdfuse's file is limited to the volume's real size (``losetup --sizelimit``);
growing the volume online is then: expand the engine, raise the loop device's
limit, grow the filesystem.

Past the volume's real end the view holds nothing: reads there return zeros (a
readahead may touch them), zero and trim do nothing, writes fail with ENOSPC (a
loop device limited to the real size never sends one).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from drove.engine.layers import Layer
from drove.nbd import eager
from drove.nbd.export import NBD_STATE_HOLE, NBD_STATE_ZERO, Extent

VIEW_SIZE = 1 << 50
"""The size the view advertises: 1 PiB, the most a volume can grow to while mounted."""

SUFFIX = ":host"
"""Appended to the volume's name to name the view (":" is never in a volume name)."""


def view_name(volume: str) -> str:
    """The NBD export name of ``volume``'s growable view."""
    return volume + SUFFIX


class GrowableView(Layer):
    """``inner`` advertised at :data:`VIEW_SIZE`; nothing but zeros past its real end.

    A layer (drove.engine.layers): the capabilities are the volume's, as they are now.
    """

    @property
    def name(self) -> str:
        """The view's export name."""
        return view_name(self.inner.name)

    @property
    def description(self) -> str:
        """The volume's description, saying it is the growable view."""
        return f"{self.inner.description} (growable view for host attach)"

    @property
    def size(self) -> int:
        """The advertised size: :data:`VIEW_SIZE`, or the volume's if it is larger."""
        return max(VIEW_SIZE, self.inner.size)

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ, WRITE or FLUSH in callback style (:mod:`drove.nbd.eager`), bounded."""
        if cmd == eager.FLUSH or offset + length <= self.inner.size:
            self.below(cmd, offset, length, data, fua, done)
        elif cmd == eager.READ:
            eager.run(self.read(offset, length), done)
        else:
            done(None, _beyond(offset, length, self.inner.size))

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """The volume's bytes, zeros past its end."""
        end = self.inner.size
        if offset + length <= end:
            return await self.inner.read(offset, length)
        if offset >= end:
            return bytes(length)
        head = await self.inner.read(offset, end - offset)
        return bytes(head) + bytes(offset + length - end)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write within the volume; ENOSPC past its end."""
        if offset + len(data) > self.inner.size:
            raise _beyond(offset, len(data), self.inner.size)
        await self.inner.write(offset, data, fua)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
                   fast: bool = False) -> None:
        """Zero the part within the volume (past its end reads as zeros already)."""
        if (n := self._within(offset, length)) > 0:
            await self.inner.zero(offset, n, fua, may_trim, fast)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Trim the part within the volume."""
        if (n := self._within(offset, length)) > 0:
            await self.inner.trim(offset, n, fua)

    async def flush(self) -> None:
        """Flush the volume."""
        await self.inner.flush()

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch the part within the volume."""
        if (n := self._within(offset, length)) > 0:
            await self.inner.cache(offset, n)

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        """The volume's block status; one hole reading as zeros past its end."""
        if (n := self._within(offset, length)) > 0:
            return await self.inner.block_status(offset, n)
        return [Extent(length, NBD_STATE_HOLE | NBD_STATE_ZERO)]

    def _within(self, offset: int, length: int) -> int:
        """How much of the range lies within the volume (<= 0: none)."""
        return min(offset + length, self.inner.size) - offset


def _beyond(offset: int, length: int, size: int) -> OSError:
    return OSError(errno.ENOSPC, f"write at {offset}+{length} past the volume's end ({size} "
                                 "bytes): expand the volume first")
