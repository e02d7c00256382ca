"""A size-class slab allocator and the file-backed tier built on it (RAM and disk).

The space is cut into 64 KiB slabs.  A slab in use holds slots of one size class (48
classes, multiples of 64 bytes up to 4096), so a payload wastes on average about 32
bytes of rounding (more for the largest payloads, where only 16..20 fit a slab) plus
the slab's unusable tail (at most 2.5 %).  Per slab the allocator keeps one byte
per slot, a 16-bit use count and a class byte; per class the slabs with free slots,
grouped by fullness.  A slab whose last slot is freed goes back to the pool (so the
classes rebalance) and the tier releases its memory.

:class:`SlabAllocator` is C (``_slab.c``): every written page allocates a slot and frees
the one it replaces, and moving that bookkeeping from Python to C took 11-11.5 % off a
write's instructions (bench/RESULTS.md).  The size classes are defined here and handed
to it once.

An address is the byte offset of the slot in the tier's data area, so a slab and slot
can be derived from it and from the payload's length (which determines its class).

*Large* payloads (4097..32768 bytes: the disk tier's grouped payloads, see
:func:`nbdswap.codec.encode_group`) take *spans* of 16 aligned slabs (1 MiB) in classes of 256-byte
granules, merged the same way.  In a 64 KiB slab a 10 KiB payload would waste about
10 % (only 5 fit); a span fits 100 and wastes about 1 % (measured on three memory
corpora: slot bytes 1.13 × payload bytes in 64 KiB slabs, 1.01 × in spans).  Only an
allocator created with ``large=True`` accepts them.
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import uuid
from pathlib import Path

from ..errors import NoSpaceError, StoreError
from . import Tier
from ._slab import FULLNESS_GROUPS, SLAB_SIZE, SlabAllocator
from ._slab import configure as _configure_allocator

log = logging.getLogger(__name__)

GRANULE = 64
MAX_PAYLOAD = 4096
CLASS_COUNT = MAX_PAYLOAD // GRANULE
SPAN_SLABS = 16
SPAN_SIZE = SPAN_SLABS * SLAB_SIZE
LARGE_GRANULE = 256
MAX_LARGE_PAYLOAD = 32 * 1024


def _merged_classes() -> tuple[int, ...]:
    """Class index (slot size in granules) for each payload length 0..MAX_PAYLOAD (0 for
    0, which no class takes).

    A size is served by the largest multiple of GRANULE that still fits as many slots
    into a slab (as zsmalloc merges its classes): it costs no memory, and fewer
    classes leave fewer partially filled slabs.
    """
    merged = [0]
    for granules in range(1, CLASS_COUNT + 1):
        slots = SLAB_SIZE // (granules * GRANULE)
        merged.append(SLAB_SIZE // slots // GRANULE)
    return (0, *(merged[(length + GRANULE - 1) // GRANULE] for length in range(1, MAX_PAYLOAD + 1)))


def _large_classes() -> tuple[list[int], list[int]]:
    """Slot sizes of the large classes (ids CLASS_COUNT+1...) and the class id of each
    large payload size in LARGE_GRANULEs, merged over a span like the small ones."""
    sizes: list[int] = []
    class_of = [0] * (MAX_LARGE_PAYLOAD // LARGE_GRANULE + 1)
    for granules in range(MAX_PAYLOAD // LARGE_GRANULE + 1, len(class_of)):
        slots = SPAN_SIZE // (granules * LARGE_GRANULE)
        size = SPAN_SIZE // slots // LARGE_GRANULE * LARGE_GRANULE
        if not sizes or sizes[-1] != size:
            sizes.append(size)
        class_of[granules] = CLASS_COUNT + len(sizes)
    return sizes, class_of


_CLASS_BY_LENGTH = _merged_classes()
_LARGE_SIZES, _LARGE_CLASS_OF = _large_classes()
LARGE_CLASS_COUNT = len(_LARGE_SIZES)
LAST_CLASS = CLASS_COUNT + LARGE_CLASS_COUNT


def size_class(length: int, large: bool = False) -> int:
    """The class index of a payload: 1..CLASS_COUNT (slots of ``index*GRANULE``) or, with
    ``large``, a large class above CLASS_COUNT for 4097..MAX_LARGE_PAYLOAD bytes."""
    if 0 < length <= MAX_PAYLOAD:
        return _CLASS_BY_LENGTH[length]
    if large and MAX_PAYLOAD < length <= MAX_LARGE_PAYLOAD:
        return _LARGE_CLASS_OF[(length + LARGE_GRANULE - 1) // LARGE_GRANULE]
    raise ValueError(f"payload length {length} outside 1..{MAX_LARGE_PAYLOAD if large else MAX_PAYLOAD}")


def slot_bytes(cls: int) -> int:
    """The slot size of a class."""
    return cls * GRANULE if cls <= CLASS_COUNT else _LARGE_SIZES[cls - CLASS_COUNT - 1]


def slot_size(length: int, large: bool = False) -> int:
    """The slot size a payload of ``length`` bytes takes."""
    return slot_bytes(size_class(length, large))


def slab_slabs(cls: int) -> int:
    """How many 64 KiB slabs one slab of the class spans (1, or SPAN_SLABS)."""
    return 1 if cls <= CLASS_COUNT else SPAN_SLABS


def slots_per_slab(cls: int) -> int:
    return slab_slabs(cls) * SLAB_SIZE // slot_bytes(cls)


#: The allocator's tables: the class of every payload length 0..MAX_LARGE_PAYLOAD, and
#: the slot size, slabs per slab and slots per slab of every class (0 unused).
_configure_allocator(
    bytes(size_class(length, large=True) if length else 0 for length in range(MAX_LARGE_PAYLOAD + 1)),
    [slot_bytes(cls) for cls in range(LAST_CLASS + 1)],
    [slab_slabs(cls) for cls in range(LAST_CLASS + 1)],
    [0, *(slots_per_slab(cls) for cls in range(1, LAST_CLASS + 1))],
    MAX_PAYLOAD, NoSpaceError)


# --- arena files --------------------------------------------------------------------

#: The data area starts after one page of header.
HEADER_SIZE = 4096
_MAGIC = b"NBDSWAPA"
_HEADER_VERSION = 1
_HEADER = struct.Struct("<8sI16s36s")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the storage of a file range back to the filesystem (tmpfs or disk).

    Freeing space is an optimisation: failures are logged, not raised.
    """
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        error = ctypes.get_errno()
        log.warning("cannot punch a hole in fd %d: %s", fd, os.strerror(error))


class Arena:
    """An open arena file: a header naming the tier and a random arena id, then data.

    The block map records the arena id; a file whose id differs (or a missing file)
    means the data the map points at is gone.
    """

    def __init__(self, fd: int, arena_id: str, fresh: bool) -> None:
        self.fd = fd
        self.arena_id = arena_id
        #: True when the file was (re)created, so the map's entries for it are lost.
        self.fresh = fresh
        #: Bytes of the data area (the file is sparse).
        self.size = os.fstat(fd).st_size - HEADER_SIZE

    @classmethod
    def open(cls, path: Path, tier: str, arena_id: str | None, size: int, *, create: bool) -> Arena | None:
        """Open the arena at ``path`` if its id is ``arena_id``, else create a new one.

        Returns ``None`` instead of creating when ``create`` is false.  The data area
        is grown (never shrunk) to ``size`` bytes.
        """
        fd = _open_matching(path, tier, arena_id) if arena_id else None
        fresh = fd is None
        if fresh:
            if not create:
                return None
            fd, arena_id = _create(path, tier)
        if os.fstat(fd).st_size < HEADER_SIZE + size:
            os.ftruncate(fd, HEADER_SIZE + size)
        return cls(fd, arena_id, fresh)

    def close(self) -> None:
        """Close the file.  The descriptor becomes -1, not a number the next file opened
        may be given: a write or hole punch that comes late (a move that resumes after
        the store closed) fails with EBADF instead of landing in that file."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _open_matching(path: Path, tier: str, arena_id: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        log.warning("%s is missing; the %s tier's data is lost", path, tier)
        return None
    if _read_header(fd, tier) == arena_id:
        return fd
    os.close(fd)
    log.warning("%s belongs to another arena; the %s tier's data is lost", path, tier)
    return None


def _read_header(fd: int, tier: str) -> str | None:
    raw = os.pread(fd, _HEADER.size, 0)
    if len(raw) != _HEADER.size:
        return None
    magic, version, name, arena_id = _HEADER.unpack(raw)
    if magic != _MAGIC or version != _HEADER_VERSION or name.rstrip(b"\0") != tier.encode():
        return None
    return arena_id.decode("ascii", errors="replace")


def _create(path: Path, tier: str) -> tuple[int, str]:
    """Replace ``path`` with a new, empty arena file and return it and its id.

    A new inode, so that a stale mapping of the old file can never see new data.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    arena_id = str(uuid.uuid4())
    header = _HEADER.pack(_MAGIC, _HEADER_VERSION, tier.encode(), arena_id.encode())
    os.pwrite(fd, header.ljust(HEADER_SIZE, b"\0"), 0)
    return fd, arena_id


class SlabTier(Tier):
    """A tier storing payloads in the slabs of one arena file.

    Subclasses provide the I/O (:meth:`_write`, :meth:`get`, :meth:`sync`) and may
    reserve storage when a slab is first used (:meth:`_reserve_slab`).
    """

    #: Whether the tier takes payloads above MAX_PAYLOAD (in spans of slabs).
    large_payloads = False

    def __init__(self, arena: Arena, capacity: int) -> None:
        self.arena = arena
        self.allocator = SlabAllocator(capacity, self._reserve_slab, self._release_slab,
                                       large=self.large_payloads)

    @property
    def fresh(self) -> bool:
        return self.arena.fresh

    @property
    def arena_id(self) -> str:
        return self.arena.arena_id

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity_bytes

    @property
    def blocks(self) -> int:
        return self.allocator.blocks

    @property
    def stored_bytes(self) -> int:
        return self.allocator.stored_bytes

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "slab_bytes": self.allocator.slab_bytes}

    def has_room(self, nbytes: int) -> bool:
        return self.allocator.has_room(nbytes)

    async def put(self, data: bytes) -> int:
        return self.put_now(data)

    def put_now(self, data: bytes) -> int:
        """:meth:`put` without the coroutine: slab tiers never wait to write."""
        return self._fill(self.allocator.alloc(len(data)), data)

    def free(self, addr: int, length: int) -> None:
        self.allocator.free(addr, length)

    def in_sparse_slab(self, addr: int, length: int) -> bool:
        """See :meth:`SlabAllocator.in_sparse_slab`."""
        return self.allocator.in_sparse_slab(addr, length)

    def repack_now(self, addr: int, data: bytes) -> int | None:
        """Copy the payload at ``addr`` (``data``) out of its sparse slab into one of the
        fullest of its class; the new address, or ``None`` if its slab is not sparse
        (the old slot stays allocated either way: the caller frees it once the map
        points at the copy)."""
        new = self.allocator.alloc_fuller(len(data), addr)
        return None if new is None else self._fill(new, data)

    def _fill(self, addr: int, data: bytes) -> int:
        """Write a payload into the slot just allocated for it, which is freed again if
        that fails; the slot's address."""
        try:
            self._write(addr, data)
        except BaseException:
            self.allocator.free(addr, len(data))
            raise
        return addr

    def mark_used(self, addr: int, length: int) -> None:
        if addr + length > self.arena.size:
            raise ValueError(f"address {addr} lies beyond the end of {self.name}'s arena")
        self.allocator.mark_used(addr, length)

    def finish_marking(self) -> None:
        self.allocator.finish_marking()

    @abc.abstractmethod
    def _write(self, addr: int, data: bytes) -> None:
        """Write a payload into its slot; OSErrors go through :func:`raise_for_os_error`."""

    def _reserve_slab(self, slab: int, cls: int) -> None:
        """Called before a slab is first used for class ``cls``; may raise NoSpaceError."""

    def _release_slab(self, slab: int) -> None:
        punch_hole(self.arena.fd, HEADER_SIZE + slab * SLAB_SIZE, SLAB_SIZE)


def raise_for_os_error(error: OSError, what: str) -> None:
    """Re-raise an I/O error as the store error the device maps to an NBD errno."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(f"{what}: {error.strerror}") from error
    raise StoreError(f"{what}: {error.strerror}") from error
