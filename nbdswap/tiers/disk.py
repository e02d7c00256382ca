"""The disk tier: slabs in ``disk.dat`` in the state directory (a sparse file).

Writes go to the page cache with ``pwrite`` on the event loop thread (that survives a
killed process); :meth:`DiskTier.sync` (``fdatasync`` in a worker thread) makes them
survive a host crash.  Reads first try ``preadv(RWF_NOWAIT)``, which succeeds without
blocking when the data is cached, and fall back to a worker thread otherwise, so a cold
read never stalls the event loop.  Emptied slabs are punched out of the file.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from ..blockmap import TIER_DISK
from ..errors import StoreError
from .slab import HEADER_SIZE, Arena, SlabTier, raise_for_os_error

DISK_FILE = "disk.dat"


class DiskTier(SlabTier):
    name = "disk"
    tier_id = TIER_DISK
    large_payloads = True  # grouped payloads (nbdswap.codec.encode_group)

    def __init__(self, arena: Arena, capacity: int) -> None:
        super().__init__(arena, capacity)
        self._nowait = True  # cleared if the kernel or filesystem lacks RWF_NOWAIT

    @classmethod
    def open(cls, state_dir: Path, capacity: int, arena_id: str | None) -> DiskTier | None:
        """Open ``disk.dat``; ``None`` if the tier is disabled and has none."""
        arena = Arena.open(Path(state_dir) / DISK_FILE, cls.name, arena_id, capacity, create=capacity > 0)
        return None if arena is None else cls(arena, capacity)

    def _write(self, addr: int, data: bytes) -> None:
        try:
            written = os.pwrite(self.arena.fd, data, HEADER_SIZE + addr)
        except OSError as error:
            raise_for_os_error(error, "disk tier write")
        if written != len(data):
            raise StoreError(f"disk tier write: short write of {written} of {len(data)} bytes")

    async def get(self, addr: int, length: int) -> bytes:
        offset = HEADER_SIZE + addr
        cached = self._read_cached(offset, length)
        if cached is not None:
            return bytes(cached)  # callers may hand it on to the remote tier, which wants bytes
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, os.pread, self.arena.fd, length, offset)
        except OSError as error:
            raise_for_os_error(error, "disk tier read")
        if len(data) != length:
            raise StoreError(f"disk tier read: short read of {len(data)} of {length} bytes")
        return data

    def get_now(self, addr: int, length: int) -> bytearray | None:
        """The payload if the page cache has all of it (never blocks); not copied into
        ``bytes``, since the read path only decodes or sends it."""
        return self._read_cached(HEADER_SIZE + addr, length)

    def _read_cached(self, offset: int, length: int) -> bytearray | None:
        """The data if the page cache has all of it, else ``None`` (never blocks)."""
        if not self._nowait:
            return None
        buffer = bytearray(length)
        try:
            if os.preadv(self.arena.fd, [buffer], offset, os.RWF_NOWAIT) == length:
                return buffer
        except BlockingIOError:
            pass
        except OSError as error:
            if error.errno != errno.EOPNOTSUPP:
                raise_for_os_error(error, "disk tier read")
            self._nowait = False
        return None

    async def sync(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.arena.fd)
        except OSError as error:
            raise_for_os_error(error, "disk tier sync")

    def close(self) -> None:
        self.arena.close()
