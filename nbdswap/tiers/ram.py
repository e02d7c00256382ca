"""The compressed-RAM tier: slabs in one shared-memory file, mapped into the process.

The file lives in ``/dev/shm`` under a name derived from the state directory, so a
restarted server (same state dir) maps the same pages and finds its data.  It survives
a killed process but not a reboot; the block map then marks the tier's blocks lost.

Each slab's memory is reserved with ``posix_fallocate`` when the slab is first used, so
a full tmpfs shows up as :class:`NoSpaceError` instead of SIGBUS on a store into the
mapping; an emptied slab is punched out and its memory returned to the system.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

from ..blockmap import TIER_RAM
from ..errors import NoSpaceError
from .slab import HEADER_SIZE, SLAB_SIZE, Arena, SlabTier

SHM_DIR = Path("/dev/shm")


def arena_path(state_dir: Path) -> Path:
    """The shared-memory file of the RAM tier that belongs to ``state_dir``."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]
    return SHM_DIR / f"nbdswap-{digest}"


class RamTier(SlabTier):
    name = "ram"
    tier_id = TIER_RAM

    def __init__(self, arena: Arena, capacity: int) -> None:
        super().__init__(arena, capacity)
        self._mm = mmap.mmap(arena.fd, HEADER_SIZE + arena.size)
        self._map_present_pages()

    @classmethod
    def open(cls, state_dir: Path, capacity: int, arena_id: str | None) -> RamTier | None:
        """Map the arena of ``state_dir``; ``None`` if the tier is disabled and has none."""
        arena = Arena.open(arena_path(state_dir), cls.name, arena_id, capacity, create=capacity > 0)
        return None if arena is None else cls(arena, capacity)

    def _write(self, addr: int, data: bytes) -> None:
        start = HEADER_SIZE + addr
        self._mm[start : start + len(data)] = data

    async def get(self, addr: int, length: int) -> bytes:
        return self.get_now(addr, length)

    def get_now(self, addr: int, length: int) -> bytes:
        start = HEADER_SIZE + addr
        return self._mm[start : start + length]

    async def sync(self) -> None:
        """Nothing to do: shared memory is as durable as it gets (not across a reboot)."""

    def _reserve_slab(self, slab: int) -> None:
        start = HEADER_SIZE + slab * SLAB_SIZE
        try:
            os.posix_fallocate(self.arena.fd, start, SLAB_SIZE)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.ENOMEM):
                raise NoSpaceError(f"shared memory is full: {error.strerror}") from None
            raise
        self._map_pages(start, start + SLAB_SIZE)

    def _map_pages(self, start: int, stop: int) -> None:
        """Fault the pages in through the mapping: under mlockall (the server) that
        locks them.  A page of the file no mapping has touched is not locked; on a host
        that swaps to this server it can be swapped out to the server itself, whose next
        write into it would then wait for itself (seen in tests/test_vm_local.py)."""
        _ = self._mm[start:stop:mmap.PAGESIZE]

    def _map_present_pages(self) -> None:
        """:meth:`_map_pages` for the pages the file already has (the header, and the
        slabs of a restarted server); holes stay holes."""
        fd, offset, end = self.arena.fd, 0, len(self._mm)
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # no data after offset
                    return
                raise
            offset = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            self._map_pages(start, offset)

    def close(self) -> None:
        self._mm.close()
        self.arena.close()
