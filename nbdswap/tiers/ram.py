"""The compressed-RAM tier: slabs in one shared-memory file, mapped into the process.

The file lives in ``/dev/shm`` under a name derived from the state directory, so a
restarted server (same state dir) maps the same pages and finds its data.  It survives
a killed process but not a reboot; the block map then marks the tier's blocks lost.

Each 64 KiB slab's memory is reserved with ``posix_fallocate`` when a payload is first
written into it, so a full tmpfs shows up as :class:`NoSpaceError` instead of SIGBUS on a
store into the mapping; an emptied slab is punched out and its memory returned to the
system.

The tier takes grouped payloads (idle pages compressed together, see
:mod:`nbdswap.policy`) in 1 MiB spans.  Only the slabs of a span that hold payloads are
reserved, and the arena has address space for one extra span per large size class, so
the capacity bounds the tier's *memory* (reserved slabs), not its addresses: a partly
used span costs what it holds, not 1 MiB.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

from ..blockmap import TIER_RAM
from ..errors import NoSpaceError
from .slab import HEADER_SIZE, LARGE_CLASS_COUNT, MAX_PAYLOAD, SLAB_SIZE, SPAN_SIZE, Arena, SlabTier, slot_size

SHM_DIR = Path("/dev/shm")
#: Address space beyond the capacity: one partly used span per large size class.
SPAN_HEADROOM = LARGE_CLASS_COUNT * SPAN_SIZE


def arena_path(state_dir: Path) -> Path:
    """The shared-memory file of the RAM tier that belongs to ``state_dir``."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]
    return SHM_DIR / f"nbdswap-{digest}"


class RamTier(SlabTier):
    name = "ram"
    tier_id = TIER_RAM
    large_payloads = True  # grouped payloads of idle pages

    def __init__(self, arena: Arena, capacity: int) -> None:
        self._memory_slabs = capacity // SLAB_SIZE  # the most slabs reserved at once
        super().__init__(arena, _address_space(capacity))
        self._mm = mmap.mmap(arena.fd, HEADER_SIZE + arena.size)
        self._reserved = bytearray(-(-arena.size // SLAB_SIZE))  # 1: the slab has memory
        self._reserved_slabs = 0
        self._map_present_pages()

    @classmethod
    def open(cls, state_dir: Path, capacity: int, arena_id: str | None) -> RamTier | None:
        """Map the arena of ``state_dir``; ``None`` if the tier is disabled and has none."""
        arena = Arena.open(arena_path(state_dir), cls.name, arena_id, _address_space(capacity),
                           create=capacity > 0)
        return None if arena is None else cls(arena, capacity)

    @property
    def capacity_bytes(self) -> int:
        return self._memory_slabs * SLAB_SIZE

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "slab_bytes": self._reserved_slabs * SLAB_SIZE}

    def has_room(self, nbytes: int) -> bool:
        """Room in the addresses, and memory for the slabs a new slot may need (none
        for a single page when its class has a partly used slab, which is reserved)."""
        if not self.allocator.has_room(nbytes):
            return False
        needed = 1 if nbytes <= MAX_PAYLOAD else 2  # a span's slot may straddle two slabs
        if self._reserved_slabs + needed <= self._memory_slabs:
            return True
        return nbytes <= MAX_PAYLOAD and self.allocator.has_partial(nbytes)

    def _write(self, addr: int, data: bytes) -> None:
        if len(data) > MAX_PAYLOAD or not self._reserved[addr // SLAB_SIZE]:
            self._reserve_slot(addr, slot_size(len(data), large=True))
        start = HEADER_SIZE + addr
        self._mm[start : start + len(data)] = data

    async def get(self, addr: int, length: int) -> bytes:
        return self.get_now(addr, length)

    def get_now(self, addr: int, length: int) -> bytes:
        start = HEADER_SIZE + addr
        return self._mm[start : start + length]

    async def sync(self) -> None:
        """Nothing to do: shared memory is as durable as it gets (not across a reboot)."""

    def _reserve_slot(self, addr: int, length: int) -> None:
        """Reserve the memory of the slabs a slot lies in that have none yet."""
        for slab in range(addr // SLAB_SIZE, (addr + length - 1) // SLAB_SIZE + 1):
            if not self._reserved[slab]:
                self._reserve(slab)

    def _reserve(self, slab: int) -> None:
        if self._reserved_slabs >= self._memory_slabs:
            raise NoSpaceError("the RAM tier's memory is all in use")
        start = HEADER_SIZE + slab * SLAB_SIZE
        try:
            os.posix_fallocate(self.arena.fd, start, SLAB_SIZE)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.ENOMEM):
                raise NoSpaceError(f"shared memory is full: {error.strerror}") from None
            raise
        self._map_pages(start, start + SLAB_SIZE)
        self._reserved[slab] = 1
        self._reserved_slabs += 1

    def _release_slab(self, slab: int) -> None:
        if self._reserved[slab]:
            super()._release_slab(slab)
            self._reserved[slab] = 0
            self._reserved_slabs -= 1

    def _map_pages(self, start: int, stop: int) -> None:
        """Fault the pages in through the mapping: under mlockall (the server) that
        locks them.  A page of the file no mapping has touched is not locked; on a host
        that swaps to this server it can be swapped out to the server itself, whose next
        write into it would then wait for itself (seen in tests/test_vm_local.py)."""
        _ = self._mm[start:stop:mmap.PAGESIZE]

    def _map_present_pages(self) -> None:
        """:meth:`_map_pages` for the pages the file already has (the header, and the
        slabs of a restarted server, which count as reserved); holes stay holes."""
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
            first = max(start - HEADER_SIZE, 0) // SLAB_SIZE
            for slab in range(first, -(-(offset - HEADER_SIZE) // SLAB_SIZE)):
                if not self._reserved[slab]:
                    self._reserved[slab] = 1
                    self._reserved_slabs += 1

    def close(self) -> None:
        self._mm.close()
        self.arena.close()


def _address_space(capacity: int) -> int:
    """Bytes of arena addresses for a tier of ``capacity`` bytes of memory (a disabled
    tier gets none: its leftover data only drains)."""
    return capacity + SPAN_HEADROOM if capacity > 0 else 0
