"""A size-class slab allocator and the file-backed tier built on it (RAM and disk).

The space is cut into 64 KiB slabs.  A slab in use holds slots of one size class (48
classes, multiples of 64 bytes up to 4096), so a payload wastes on average about 32
bytes of rounding (more for the largest payloads, where only 16..20 fit a slab) plus
the slab's unusable tail (at most 2.5 %).  Per slab the allocator keeps one byte
per slot (free slots are found with ``bytearray.find`` at C speed), a 16-bit use count
and a class byte; per class the slabs with free slots, grouped by fullness.  There is no
Python object per payload.  A slab whose last slot is freed goes back to the pool (so the classes
rebalance) and the tier releases its memory.

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
from array import array
from collections.abc import Callable
from pathlib import Path

from ..errors import NoSpaceError, StoreError
from . import Tier

log = logging.getLogger(__name__)

SLAB_SIZE = 64 * 1024
GRANULE = 64
MAX_PAYLOAD = 4096
CLASS_COUNT = MAX_PAYLOAD // GRANULE
SPAN_SLABS = 16
SPAN_SIZE = SPAN_SLABS * SLAB_SIZE
LARGE_GRANULE = 256
MAX_LARGE_PAYLOAD = 32 * 1024
#: Partially used slabs are grouped by fullness in this many groups per class.
FULLNESS_GROUPS = 4


def _merged_classes() -> tuple[int, ...]:
    """Class index (slot size in granules) for each payload length 0..MAX_PAYLOAD (0 for
    0, which no class takes).  Looked up by length, not computed from it: every
    allocation and free of a written page needs its class.

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
    ``large``, a large class above CLASS_COUNT for 4097..MAX_LARGE_PAYLOAD bytes.

    :meth:`SlabAllocator.alloc` and ``free``, which every written page passes, look its
    first case up in :data:`_CLASS_BY_LENGTH` themselves and call it for the rest (the
    calls were 1.2k instructions of a write's 150k, bench/write_instructions.py)."""
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


#: :func:`slot_bytes`, :func:`slab_slabs` and :func:`slots_per_slab` of every class (0
#: unused), indexed on the paths of every allocation and free instead of called: the
#: calls were 5.6k instructions of a RAM write (callgrind).
_SLOT_BYTES = tuple(slot_bytes(cls) for cls in range(LAST_CLASS + 1))
_SLAB_SLABS = tuple(slab_slabs(cls) for cls in range(LAST_CLASS + 1))
_SLOTS_PER_SLAB = (0, *(slots_per_slab(cls) for cls in range(1, LAST_CLASS + 1)))


def _slot_of(addr: int, cls: int) -> tuple[int, int]:
    """(First) slab and slot of ``addr`` if it is a slot boundary of class ``cls``
    (:meth:`SlabAllocator.free` repeats it for the one-slab classes)."""
    slabs = _SLAB_SLABS[cls]
    slab, offset = divmod(addr, slabs * SLAB_SIZE)
    slot, misalignment = divmod(offset, _SLOT_BYTES[cls])
    if misalignment or slot >= _SLOTS_PER_SLAB[cls]:
        raise ValueError(f"address {addr} is not a slot of class {cls}")
    return slab * slabs, slot


def _ignore_slab(slab: int, cls: int = 0) -> None:
    """Default slab hook."""


class SlabAllocator:
    """Allocates slots in ``capacity // SLAB_SIZE`` slabs.

    Partially used slabs of a class are kept in :data:`FULLNESS_GROUPS` sets by how
    full they are, and a new payload goes into the fullest one (as zsmalloc does), so
    sparse slabs drain and are released instead of staying a little used forever.

    ``on_new_slab(slab, cls)`` runs before a slab (each slab of a span) is first used for
    class ``cls`` and may raise :class:`NoSpaceError` to refuse it, before anything is
    allocated; ``on_empty_slab(slab)`` runs after a slab's
    last slot was freed.  Slabs beyond the capacity (left over from a larger earlier
    capacity and recorded with :meth:`mark_used`) are used until they drain but never
    receive new payloads.
    """

    def __init__(
        self,
        capacity: int,
        on_new_slab: Callable[[int, int], None] = _ignore_slab,
        on_empty_slab: Callable[[int], None] = _ignore_slab,
        *,
        large: bool = False,
    ) -> None:
        self.slab_limit = capacity // SLAB_SIZE
        self.large = large
        self._on_new_slab = on_new_slab
        self._on_empty_slab = on_empty_slab
        self._classes = bytearray(self.slab_limit)  # class index per slab, 0 = free
        self._used = array("H", bytes(2 * self.slab_limit))  # used slots per slab
        self._slots: dict[int, bytearray] = {}  # slab -> one byte per slot, 1 = used
        # per class, per fullness group (emptiest first): slabs with free slots
        self._partial = [[set() for _ in range(FULLNESS_GROUPS)] for _ in range(LAST_CLASS + 1)]
        self._free_hint = 0  # every slab below this index is in use
        self._slabs_in_use = 0
        self.blocks = 0
        self.stored_bytes = 0
        self.used_bytes = 0

    @property
    def capacity_bytes(self) -> int:
        return self.slab_limit * SLAB_SIZE

    @property
    def slab_bytes(self) -> int:
        """Bytes of the slabs in use (the memory or disk space the tier occupies)."""
        return self._slabs_in_use * SLAB_SIZE

    def has_room(self, length: int) -> bool:
        cls = size_class(length, self.large)
        return any(self._partial[cls]) or self._find_free_slab(slab_slabs(cls)) >= 0

    def has_partial(self, length: int) -> bool:
        """Whether a slab already in use has a free slot for a payload of ``length``."""
        return any(self._partial[size_class(length, self.large)])

    def alloc(self, length: int) -> int:
        """Reserve a slot for a payload of ``length`` bytes and return its address: in the
        fullest partly used slab of its class, else in a new one."""
        cls = (_CLASS_BY_LENGTH[length] if 0 < length <= MAX_PAYLOAD
               else size_class(length, self.large))
        for group in reversed(self._partial[cls]):
            if group:
                slab = group.pop()
                break
        else:
            slab = self._new_slab(cls)
        return self._alloc_in(slab, cls, length)

    def _alloc_in(self, slab: int, cls: int, length: int) -> int:
        """A free slot of ``slab``, a slab of class ``cls`` with one that is in no
        fullness group (:meth:`alloc` popped it, or it is new); the slab joins the
        group of its new fullness unless it is full."""
        slots = self._slots[slab]
        slot = slots.find(0)
        slots[slot] = 1
        self.blocks += 1
        self.stored_bytes += length
        self.used_bytes += _SLOT_BYTES[cls]
        used = self._used[slab] + 1
        self._used[slab] = used
        self._file(slab, cls, used)
        return slab * SLAB_SIZE + slot * _SLOT_BYTES[cls]

    def free(self, addr: int, length: int) -> None:
        cls = (_CLASS_BY_LENGTH[length] if 0 < length <= MAX_PAYLOAD
               else size_class(length, self.large))
        if cls <= CLASS_COUNT:
            # _slot_of(addr, cls) for a one-slab class, without the call (0.5-0.9 % of a
            # write's instructions); keep the two alike.
            slab, offset = divmod(addr, SLAB_SIZE)
            slot, misalignment = divmod(offset, _SLOT_BYTES[cls])
            if misalignment or slot >= _SLOTS_PER_SLAB[cls]:
                raise ValueError(f"address {addr} is not a slot of class {cls}")
        else:
            slab, slot = _slot_of(addr, cls)
        slots = self._slots.get(slab)
        if slots is None or self._classes[slab] != cls:
            raise ValueError(f"address {addr} is not in a slab of class {cls}")
        if not slots[slot]:
            raise ValueError(f"double free of address {addr}")
        slots[slot] = 0
        self.blocks -= 1
        self.stored_bytes -= length
        self.used_bytes -= _SLOT_BYTES[cls]
        before = self._used[slab]
        self._used[slab] = before - 1
        if before < _SLOTS_PER_SLAB[cls]:  # it was partly used: in the group of its fullness
            self._partial[cls][before * FULLNESS_GROUPS // _SLOTS_PER_SLAB[cls]].discard(slab)
        if before == 1:
            self._release(slab)
        else:
            self._file(slab, cls, before - 1)

    def mark_used(self, addr: int, length: int) -> None:
        """Record an existing payload (start-up rebuild from the block map).  The slabs
        join their fullness groups in :meth:`finish_marking`, once after the last
        payload: keeping the groups payload by payload took about a third of the
        start-up rebuild."""
        cls = size_class(length, self.large)
        slab, slot = _slot_of(addr, cls)
        slots = self._slots.get(slab)
        if slots is None or self._classes[slab] != cls:
            slots = self._mark_first(slab, cls, addr)
        if slots[slot]:
            raise ValueError(f"address {addr} is recorded twice")
        slots[slot] = 1
        self._used[slab] += 1  # counted as _alloc_in does, without its groups
        self.blocks += 1
        self.stored_bytes += length
        self.used_bytes += _SLOT_BYTES[cls]

    def _mark_first(self, slab: int, cls: int, addr: int) -> bytearray:
        """Assign the free ``slab`` (and the rest of its span) to class ``cls``."""
        span = _SLAB_SLABS[cls]
        self._grow_to(slab + span)
        if self._classes[slab : slab + span] != bytes(span):
            raise ValueError(f"address {addr} lies in a slab of another class than {cls}")
        self._assign(slab, cls)
        return self._slots[slab]

    def finish_marking(self) -> None:
        """Sort every slab with free slots into its class's fullness group (after the
        :meth:`mark_used` calls of a start-up)."""
        for groups in self._partial:
            for group in groups:
                group.clear()
        for slab in self._slots:
            self._file(slab, self._classes[slab], self._used[slab])

    def in_sparse_slab(self, addr: int, length: int) -> bool:
        """Whether the payload at ``addr`` lies in a slab worth emptying, as zsmalloc
        compacts: a single slab at most half used, among the emptiest of its class, which
        has other partly used slabs to take its payloads (see :meth:`alloc_fuller`)."""
        cls = size_class(length, self.large)
        if cls > CLASS_COUNT:
            return False
        slab, groups = addr // SLAB_SIZE, self._partial[cls]
        group = self._used[slab] * FULLNESS_GROUPS // slots_per_slab(cls)
        return group <= 1 and slab in groups[group] and not any(groups[:group]) \
            and sum(map(len, groups[group:])) > 1

    def alloc_fuller(self, length: int, addr: int) -> int | None:
        """Like :meth:`alloc`, for the payload at ``addr`` if it lies in a sparse slab,
        and only in the fullest slab of its class (ties: the lowest), if that one ranks
        above its own (payloads only move up a total order: no ping-pong); else ``None``."""
        if not self.in_sparse_slab(addr, length):
            return None
        cls = size_class(length, self.large)
        fullest = next(group for group in reversed(self._partial[cls]) if group)
        rank = self._rank
        target = max(fullest, key=rank)
        if rank(target) <= rank(addr // SLAB_SIZE):
            return None
        fullest.discard(target)
        return self._alloc_in(target, cls, length)

    def _rank(self, slab: int) -> tuple[int, int]:
        return self._used[slab], -slab

    def _file(self, slab: int, cls: int, used: int) -> None:
        """Put ``slab``, of class ``cls`` with ``used`` slots in use, into the fullness
        group it belongs to, unless it is full or beyond the limit (such a slab only
        drains).  :meth:`_alloc_in` and :meth:`free` count the slot in or out
        themselves: one call with a sign for both cost 1.6k instructions a write more
        (bench/write_instructions.py)."""
        per_slab = _SLOTS_PER_SLAB[cls]
        if used < per_slab and slab + _SLAB_SLABS[cls] <= self.slab_limit:
            self._partial[cls][used * FULLNESS_GROUPS // per_slab].add(slab)

    def _find_free_slab(self, span: int = 1) -> int:
        """A free slab (or the first of ``span`` free, aligned ones) below the limit, or -1."""
        if span == 1:
            slab = self._classes.find(0, self._free_hint, self.slab_limit)
            self._free_hint = self.slab_limit if slab < 0 else slab
            return slab
        empty, start = bytes(span), self._free_hint
        while (found := self._classes.find(empty, start, self.slab_limit)) >= 0:
            aligned = -(-found // span) * span
            if self._classes[aligned : aligned + span] == empty and aligned + span <= self.slab_limit:
                return aligned
            start = aligned
        return -1

    def _new_slab(self, cls: int) -> int:
        span = slab_slabs(cls)
        slab = self._find_free_slab(span)
        if slab < 0:
            raise NoSpaceError("no free slab")
        for part in range(slab, slab + span):
            self._on_new_slab(part, cls)
        self._assign(slab, cls)
        return slab

    def _assign(self, slab: int, cls: int) -> None:
        span = slab_slabs(cls)
        self._classes[slab : slab + span] = bytes((cls,)) * span
        self._slots[slab] = bytearray(slots_per_slab(cls))
        self._slabs_in_use += span

    def _release(self, slab: int) -> None:
        del self._slots[slab]
        span = slab_slabs(self._classes[slab])
        self._classes[slab : slab + span] = bytes(span)
        self._slabs_in_use -= span
        if slab < self.slab_limit:
            self._free_hint = min(self._free_hint, slab)
        for part in range(slab, slab + span):
            self._on_empty_slab(part)

    def _grow_to(self, slabs: int) -> None:
        missing = slabs - len(self._classes)
        if missing > 0:
            self._classes.extend(bytes(missing))
            self._used.frombytes(bytes(2 * missing))


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
