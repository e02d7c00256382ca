"""The compressed-RAM tier: slabs in one shared-memory file, mapped into the process.

The file lives in ``/dev/shm`` under a name derived from the state directory, so a
restarted server (same state dir) maps the same pages and finds its data.  It survives
a killed process but not a reboot; the block map then marks the tier's blocks lost.

Memory is reserved with ``posix_fallocate`` when the allocator takes a 64 KiB slab of
single pages (all of it at once), and for a span's payload when it is written, so a
full tmpfs or a used-up memory budget shows up as :class:`NoSpaceError` instead of
SIGBUS on a store into the mapping; an emptied slab is punched out and its
memory returned to the system.

The tier takes grouped payloads (idle pages compressed together, see
:mod:`nbdswap.policy`) in 1 MiB spans.  Only the pages of a span that hold payloads are
reserved, and the arena has address space for one extra span per large size class, so
the capacity bounds the tier's *memory* (reserved pages), not its addresses: a partly
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
from .slab import (
    CLASS_COUNT, HEADER_SIZE, LARGE_CLASS_COUNT, MAX_PAYLOAD, SLAB_SIZE, SPAN_SIZE, Arena, SlabTier, slot_size)

SHM_DIR = Path("/dev/shm")
PAGE = mmap.PAGESIZE
PAGES_PER_SLAB = SLAB_SIZE // PAGE
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
        self._memory_pages = capacity // SLAB_SIZE * PAGES_PER_SLAB  # the most pages reserved
        super().__init__(arena, _address_space(capacity))
        self._mm = mmap.mmap(arena.fd, HEADER_SIZE + arena.size)
        self._reserved = bytearray(-(-arena.size // PAGE))  # 1: the page has memory
        self._reserved_pages = 0
        self._map_present_pages()

    @classmethod
    def open(cls, state_dir: Path, capacity: int, arena_id: str | None) -> RamTier | None:
        """Map the arena of ``state_dir``; ``None`` if the tier is disabled and has none."""
        arena = Arena.open(arena_path(state_dir), cls.name, arena_id, _address_space(capacity),
                           create=capacity > 0)
        return None if arena is None else cls(arena, capacity)

    @property
    def capacity_bytes(self) -> int:
        return self._memory_pages * PAGE

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "slab_bytes": self._reserved_pages * PAGE}

    def has_room(self, nbytes: int) -> bool:
        """Room in the addresses, and memory for the pages a new slot may need: a whole
        slab for a single page (none when its class has a partly used slab, which is
        reserved), the slot's pages for a grouped payload."""
        if not self.allocator.has_room(nbytes):
            return False
        if nbytes <= MAX_PAYLOAD:
            return self._reserved_pages + PAGES_PER_SLAB <= self._memory_pages \
                or self.allocator.has_partial(nbytes)
        spanned = slot_size(nbytes, large=True) // PAGE + 2  # a slot need not start on a page
        return self._reserved_pages + spanned <= self._memory_pages

    def _reserve_slab(self, slab: int, cls: int) -> None:
        """A slab of single pages gets its memory when the allocator takes it, so a
        tier whose memory is used up refuses a page before anything is allocated (the
        store puts written pages without asking :meth:`has_room` first).  A span's
        slabs get memory payload by payload (:meth:`_write`)."""
        if cls <= CLASS_COUNT:
            self._reserve(slab * SLAB_SIZE, SLAB_SIZE)

    def _write(self, addr: int, data: bytes) -> None:
        if len(data) > MAX_PAYLOAD:
            self._reserve(addr, slot_size(len(data), large=True))
        start = HEADER_SIZE + addr
        self._mm[start : start + len(data)] = data

    async def get(self, addr: int, length: int) -> bytes:
        return self.get_now(addr, length)

    def get_now(self, addr: int, length: int) -> bytes:
        start = HEADER_SIZE + addr
        return self._mm[start : start + length]

    async def sync(self) -> None:
        """Nothing to do: shared memory is as durable as it gets (not across a reboot)."""

    def _reserve(self, addr: int, length: int) -> None:
        """Give memory to the pages of ``addr..addr+length`` that have none (one call)."""
        first, stop = addr // PAGE, -(-(addr + length) // PAGE)
        missing = stop - first - sum(self._reserved[first:stop])
        if not missing:
            return
        if self._reserved_pages + missing > self._memory_pages:
            raise NoSpaceError("the RAM tier's memory is all in use")
        start, end = HEADER_SIZE + first * PAGE, HEADER_SIZE + stop * PAGE
        try:
            os.posix_fallocate(self.arena.fd, start, end - start)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.ENOMEM):
                raise NoSpaceError(f"shared memory is full: {error.strerror}") from None
            raise
        self._map_pages(start, end)
        self._reserved[first:stop] = b"\1" * (stop - first)
        self._reserved_pages += missing

    def _release_slab(self, slab: int) -> None:
        first = slab * PAGES_PER_SLAB
        held = sum(self._reserved[first : first + PAGES_PER_SLAB])
        if held:
            super()._release_slab(slab)
            self._reserved[first : first + PAGES_PER_SLAB] = bytes(PAGES_PER_SLAB)
            self._reserved_pages -= held

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
            first, stop = max(start - HEADER_SIZE, 0) // PAGE, (offset - HEADER_SIZE) // PAGE
            self._reserved_pages += stop - first - sum(self._reserved[first:stop])
            self._reserved[first:stop] = b"\1" * (stop - first)

    def close(self) -> None:
        self._mm.close()
        self.arena.close()


def _address_space(capacity: int) -> int:
    """Bytes of arena addresses for a tier of ``capacity`` bytes of memory (a disabled
    tier gets none: its leftover data only drains)."""
    return capacity + SPAN_HEADROOM if capacity > 0 else 0
