"""Blocks ↔ tiers: the storage engine behind the NBD device.

Every 4 KiB block has at most one entry in the block map (LMDB), which says whether it
is zero, same-filled (the word is in the entry) or stored in a tier, with the stored
length, flags and a checksum of the page.

Write: encode the page, put the payload into the first tier with room (RAM, then disk,
then remote; a remote put returns once Redis acknowledged it), stage the new map entry
and wait for the grouped commit.  Changes are staged in one
in-memory batch; the first change schedules a commit callback on the event loop, which
writes the whole batch in one LMDB transaction, then frees the tier slots the batch
replaced, then wakes the writers.  A slot is therefore never reused while a committed
entry can still point at it.  Reads consult the staged batch before LMDB.
:meth:`Store.read_now` and :meth:`Store.write_now` do the same without awaiting when no
tier needs it (the NBD fast path); such a write is acknowledged from its batch's commit
through :meth:`Store.when_committed`.

Staging is compare-and-swap where it matters: a partial-block write (read-modify-write)
and a move stage only if the block still has the entry they started from; a
read-modify-write retries, a move gives up.  Whole-block writes stage unconditionally,
and without looking up the entry they replace: the commit, which reads the block's map
group anyway, returns it, and only then is it counted out and its slot freed.

Durability, per part:

* map: a commit is in the page cache before a write is acknowledged, which survives a
  killed process; FLUSH and FUA also ``fsync`` it, which survives a host crash.
* disk tier: likewise; ``fdatasync`` on FLUSH and FUA.
* RAM tier: a shared-memory file survives a killed or restarted process, never a host
  crash or reboot.  After one, the map's RAM entries are marked lost and read as EIO
  (never as zeros or stale data) until the blocks are written again.
* remote tier: acknowledged by Redis before the map entry exists; what survives a Redis
  restart is Redis's persistence (AOF).  A missing or foreign value reads as EIO.

With a remote tier configured, the blocks of one request are put and fetched
concurrently, so that the remote tier can send them in one MSET / MGET.

Moves (the policy engine's only way to act): copy the payload to the target tier, stage
the new entry only if the block still has the entry (and clean copy) the move started
from, and let the commit free the old slot; a move that loses a race to a write frees
its copy and reports False.  A promotion may keep the slower copy as the block's clean
backing (:class:`~nbdswap.blockmap.BlockMap` ``backing``); demoting the block back to
that tier then only points the map at it again.  Every other change of a block drops
its backing in the same commit, so an acknowledged write never loses to a stale copy.

Recency: :attr:`Store.heat` has one byte per block, set to :data:`HOT` on every read
and write (one array store); the policy engine ages it (generalised CLOCK).

Grouped payloads (:meth:`Store.move_group`): blocks of one aligned map group demoted to
a cold tier (disk or remote) together share one payload compressed as a whole
(:func:`~nbdswap.codec.encode_group`); each of their entries, primary or clean copy,
points at it with the ``GROUPED`` flag.  The store counts the references of each such
payload in memory (rebuilt from the map at start-up) and frees its slot after the commit
that removes the last one, so, as for other slots, never while a committed entry still
points at it.  A payload keeps its whole slot until its last page goes; once at most
:data:`COMPACT_LIVE_SHARE` of its pages are referenced, :meth:`Store.compact` (run by the
policy engine) stores the live ones anew and frees it.  Reads decode the whole group and
keep the last :data:`GROUP_CACHE_LIMIT` decoded groups (swap readahead reads the
neighbours next).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import operator
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import lmdb

from .blockmap import (
    COMPRESSED,
    GROUP_BITS,
    GROUP_SIZE,
    GROUPED,
    TIER_NAMES,
    LOST,
    MAP_FILE,
    SAME_FILLED,
    TIER_DISK,
    TIER_NONE,
    TIER_RAM,
    TIER_REMOTE,
    ZERO_ENTRY,
    BlockMap,
    Entry,
)
from .codec import (
    PAGE_SIZE,
    ZERO_PAGE,
    DecodeError,
    Encoded,
    Group,
    PageKind,
    decode_group,
    decode_payload,
    encode,
    encode_group,
    same_filled_page,
    split_pages,
)
from .config import RemoteSettings
from .errors import CorruptBlockError, NoSpaceError, StateDirError, StoreError, TierUnavailableError
from .grouped_payloads import GroupedPayloads
from .tiers import Tier
from .tiers.disk import DISK_FILE, DiskTier
from .tiers.ram import RamTier
from .tiers.slab import SlabTier

if TYPE_CHECKING:  # imported when a remote tier is configured: redis costs about 6 MiB of memory
    from .tiers.remote import RemoteTier

log = logging.getLogger(__name__)

BLOCK_SIZE = PAGE_SIZE
_T = TypeVar("_T")

#: NBD ``base:allocation`` extent flags.
HOLE = 1
ZERO = 2

#: Files other components keep in a state directory; anything else (besides
#: subdirectories) makes a directory without a block map "not ours".
STATE_DIR_FILES = frozenset({"lock", "admin.sock", MAP_FILE + "-lock"})
#: Trim and zeroing commit after this many blocks (bounds memory on huge ranges).
WHOLE_BLOCK_CHUNK = 8192
#: Local tiers in placement order: a new block goes to the first with room.
LOCAL_TIERS = (RamTier, DiskTier)
#: What a read or write sets a block's :attr:`Store.heat` to; the policy's CLOCK hand
#: takes one off per pass, and demotes blocks it finds at zero.
HOT = 3
#: Counters of :meth:`Store.move_stats` besides the moves themselves.
MOVE_EVENTS = ("move_races_lost", "clean_copy_hits", "clean_copies_dropped")

#: Tiers that take grouped payloads (their slab allocators have spans for them, see
#: tiers/slab.py): the cold ones, and RAM for pages idle long enough that a read may
#: cost a group's decode (see nbdswap.policy).
GROUPED_TIERS = frozenset({TIER_RAM, TIER_DISK, TIER_REMOTE})
#: Decoded groups kept for reads of their other pages (at most 64 KiB each).
GROUP_CACHE_LIMIT = 32
#: Groups are compressed on this one thread (see Store._encode_group): off the event
#: loop, and not in the I/O pool, where disk reads and the map's syncs would queue
#: behind a policy batch's groups, each waiting for the codec's lock.
_GROUP_ENCODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbdswap-group")
#: A grouped payload whose referenced pages are at most this share of those it holds is
#: compacted: its dead pages cost at most about as much as its live ones.
COMPACT_LIVE_SHARE = 0.5
#: Pages grouped where they are (idle RAM pages) must shrink by at least this share:
#: pages written in random order share nothing with their map neighbours, and grouping
#: them saved 0.1 % of their bytes while the new payloads' slabs, filled before the old
#: ones emptied, took the RAM tier's memory to 1.78 times its stored bytes for a while.
REGROUP_MIN_SAVING = 0.03

#: As globals: looking a member up on the Enum class costs ~80 ns each time, and every
#: written page compares its kind with these.
_ZERO_KIND, _SAME_FILLED_KIND, _COMPRESSED_KIND = PageKind.ZERO, PageKind.SAME_FILLED, PageKind.COMPRESSED

#: Builds an :class:`Entry` from a tuple (see :func:`_stored_entry`).
_new_tuple = tuple.__new__

#: The flags that put an entry into a count of its own besides ``mapped`` (:meth:`Store._count`).
_COUNTED_FLAGS = SAME_FILLED | LOST

#: Called with ``(block, tier id)`` for every read served from a tier slower than RAM.
SlowReadObserver = Callable[[int, int], None]

class _Batch:
    """Map changes staged since the last commit, and who waits for them."""

    __slots__ = ("changes", "base", "unread", "backing", "backing_base", "replaced", "waiters",
                 "callbacks", "done", "error")

    def __init__(self) -> None:
        self.changes: dict[int, Entry | None] = {}
        #: The committed entry of each changed block (of an unread one, from its commit).
        self.base: dict[int, Entry | None] = {}
        #: Blocks staged without their committed entry (see Store._stage); the commit
        #: returns it.
        self.unread: set[int] = set()
        self.backing: dict[int, Entry | None] = {}  # clean-copy changes
        self.backing_base: dict[int, Entry | None] = {}
        self.replaced: list[Entry] = []  # stored entries to free after the commit
        self.waiters: list[asyncio.Future] = []
        self.callbacks: list[Callable[[str | None], None]] = []  # see Store.when_committed
        self.done = False
        self.error: str | None = None

    def finish(self, error: str | None) -> None:
        self.done, self.error = True, error
        for waiter in self.waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(StoreError(error))
        for callback in self.callbacks:
            callback(error)


class Store:
    """The block store of one state directory.  Use :meth:`open`.

    Keep its instance attributes at 29 or fewer: under CPython 3.11 every ``self.x`` of
    an object with 30 or more costs more (about 16 instructions; a 30th attribute made
    a RAM write 1k instructions dearer, callgrind).
    """

    def __init__(self, blockmap: BlockMap, tiers: Iterable[Tier], size: int) -> None:
        self.size = size
        self._map = blockmap
        self._tiers: dict[int, Tier] = {tier.tier_id: tier for tier in tiers}
        self._remote: RemoteTier | None = self._tiers.get(TIER_REMOTE)
        self._batch: _Batch | None = None
        self._sync_waiters: list[asyncio.Future] = []
        self._sync_task: asyncio.Task | None = None
        self._closed = False
        self._mapped = self._zero = self._same_filled = self._lost = 0
        self._corrupt_reads: Counter[int] = Counter()  # per tier id
        blocks = -(-size // BLOCK_SIZE)
        self.heat = bytearray(blocks)
        #: The tier id of each block's current entry (staged or committed; TIER_NONE
        #: for none): the policy's scans of one tier skip the others' blocks with a
        #: ``find`` instead of a map read each (see :meth:`entries_on`).
        self.block_tiers = bytearray(blocks)
        self._may_have_backing = bytearray(blocks)  # a superset of the blocks with a clean copy
        self._backings: Counter[int] = Counter()  # clean copies per tier id
        self._moves: Counter[tuple[str, str, str]] = Counter()  # (from, to, reason)
        self._move_events: Counter[str] = Counter()
        self._groups = GroupedPayloads()
        self._sparse: dict[tuple[int, int], None] = {}  # payloads that lost a reference
        self._grouped: Counter[tuple[int, str]] = Counter()  # (tier id, payloads|refs|bytes)
        self._group_cache: OrderedDict[tuple[int, int], Group] = OrderedDict()
        self._groups_freed = 0  # a generation: a read decoded before a free is not cached
        #: Tier ids that take no new blocks (drained); persisted in the map.
        self.draining: set[int] = {tier.tier_id for tier in self._tiers.values()
                                   if tier.name in blockmap.draining()}
        #: What :meth:`_placement_for` returns for a payload within, and above,
        #: :attr:`ram_payload_limit`.
        self._placements: tuple[list[Tier], list[Tier]] = self._placement_orders()
        #: Payloads longer than this skip the RAM tier (incompressible pages).
        self.ram_payload_limit = BLOCK_SIZE
        self.on_slow_read: SlowReadObserver | None = None

    # --- opening ----------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, *, size: int, ram_max: int, disk_max: int,
             remote: RemoteSettings | None = None) -> Store:
        """Open the store in ``state_dir``, creating it if the directory is new.

        Rebuilds the tier allocators and counters from the map; RAM entries whose arena
        is gone are marked lost.  Raises :class:`StateDirError` for a directory that is
        not an nbdswap state directory or cannot take ``size``.  With ``remote``, call it
        inside the running event loop: the remote tier's orphan sweep starts in it.
        """
        if size <= 0:
            raise ValueError("size must be positive")
        state_dir = Path(state_dir)
        blockmap = _open_map(state_dir, size)
        tiers: list[Tier] = []
        try:
            for tier_class, capacity in zip(LOCAL_TIERS, (ram_max, disk_max)):
                tier = tier_class.open(state_dir, capacity, blockmap.arena_id(tier_class.name))
                if tier is not None:
                    tiers.append(tier)
            if remote is not None:
                tiers.append(_open_remote(blockmap, remote, state_dir))
            store = cls(blockmap, tiers, size)
            store._rebuild()
            if store._remote is not None:
                store._remote.start()
        except lmdb.Error as error:
            _close_all(blockmap, tiers)
            raise StateDirError(f"the block map in {state_dir} is damaged: {error}") from error
        except BaseException:
            _close_all(blockmap, tiers)
            raise
        return store

    def _rebuild(self) -> None:
        """Replay the map into the tier allocators and counters (one pass)."""
        started = time.monotonic()
        lost: dict[int, Entry] = {}
        backings = self._rebuild_backings()
        restored: dict[int, Entry | None] = {}
        for block, entry in self._map.items():
            if entry.is_stored and not self._adopt(block, entry):
                backing = backings.get(block)
                if backing is not None:  # the clean copy has the same data: it becomes the entry
                    entry = lost[block] = backing
                    restored[block] = None
                    self._backings[backing.tier] -= 1
                else:
                    entry = lost[block] = entry._replace(flags=entry.flags | LOST)
            self._count(entry, 1)
            self.block_tiers[block] = entry.tier
        for tier in self._tiers.values():
            tier.finish_marking()
        if lost:
            self._map.commit(lost, restored)
            log.error("%d blocks lost their data (%d restored from clean copies); the others read as "
                      "I/O errors until rewritten", len(lost), len(restored))
        for tier in self._tiers.values():
            if tier.fresh and tier.arena_id is not None:
                self._map.set_arena_id(tier.name, tier.arena_id)
        self._map.sync()
        log.info("block map: %d blocks rebuilt in %.2f s", self._mapped, time.monotonic() - started)

    def _rebuild_backings(self) -> dict[int, Entry]:
        """Adopt the clean copies; those whose data is gone are deleted."""
        backings, gone = {}, {}
        for block, entry in self._map.backing_items():
            self._may_have_backing[block] = 1
            if entry.tier in self._tiers and self._adopt(block, entry):
                backings[block] = entry
                self._backings[entry.tier] += 1
            elif entry.tier in self._tiers:
                gone[block] = None
        if gone:
            self._map.commit({}, gone)
        return backings

    def _adopt(self, block: int, entry: Entry) -> bool:
        """Record a stored entry in its tier (a grouped payload once, with a reference per
        entry); False when its data is gone."""
        tier = self._tiers.get(entry.tier)
        if tier is not None and tier.fresh:
            return False
        grouped = entry.flags & GROUPED
        share = self._groups.get(_slot(entry)) if grouped else None
        if share is not None and share.length != entry.length:
            log.error("block %d: grouped payload at %d of tier %d has two lengths", block, entry.addr, entry.tier)
            return False
        if tier is not None and share is None:
            try:
                tier.mark_used(entry.addr, entry.length)
            except ValueError as error:
                log.error("block %d: %s", block, error)
                return False
        if grouped:
            self._hold(block, entry)  # not configured now: reads fail, the data stays for later
        return True

    # --- the block device API ---------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes of the range; unmapped blocks read as zeros.

        Raises :class:`CorruptBlockError` for a block whose data cannot be trusted.
        """
        pieces = list(_split(offset, length))
        pages = await self._each(self._read_block, [block for block, _, _ in pieces])
        return b"".join(
            page if end - start == BLOCK_SIZE else page[start:end]
            for (_, start, end), (_, page) in zip(pieces, pages))

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Store ``data`` at ``offset``; returns once the new entries are committed.

        A mutable buffer is copied first: the write may await between its blocks.
        Slicing bytes copies each block once; a one-block write is not copied at all.
        """
        data = data if isinstance(data, bytes) else bytes(data)
        whole, partial = [], []
        position = 0
        for block, start, end in _split(offset, len(data)):
            self.heat[block] = HOT
            chunk = data[position : position + end - start]
            position += end - start
            (whole if len(chunk) == BLOCK_SIZE else partial).append((block, start, chunk))
        entries = await self._store_pages([chunk for _, _, chunk in whole])
        batches = self._stage_written([block for block, _, _ in whole], entries)
        for block, start, chunk in partial:
            batches.append(await self._write_partial(block, start, chunk))
        await self._settle(batches, fua)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """:meth:`read` without awaiting: the bytes, or ``None`` when a block's tier
        would have to be awaited (then call :meth:`read`).  The NBD fast path: a
        RAM-tier read needs no task, future or coroutine."""
        if length == BLOCK_SIZE and not offset % BLOCK_SIZE:
            return self._read_block_now(offset // BLOCK_SIZE)
        pages, slow = [], []
        for block, start, end in _split(offset, length):
            self.heat[block] = HOT
            entry = self._current(block)
            page = self._page_now(block, entry)
            if page is None:
                return None
            if entry is not None and entry.tier > TIER_RAM:
                slow.append((block, entry.tier))
            pages.append(page if end - start == BLOCK_SIZE else page[start:end])
        if self.on_slow_read is not None:
            for block, tier in slow:
                self.on_slow_read(block, tier)
        return pages[0] if len(pages) == 1 else b"".join(pages)

    def _read_block_now(self, block: int) -> bytes | None:
        """:meth:`read_now` of one whole block, the read of a swapped page, without the
        loop over pieces and its lists (a few per cent of a RAM read, callgrind)."""
        self.heat[block] = HOT
        entry = self._current(block)
        page = self._page_now(block, entry)
        if page is not None and entry is not None and entry.tier > TIER_RAM and self.on_slow_read is not None:
            self.on_slow_read(block, entry.tier)
        return page

    def write_now(self, offset: int, data: bytes) -> _Batch | None:
        """Stage a write of whole blocks without awaiting; returns the batch whose commit
        acknowledges it (see :meth:`when_committed`), or ``None`` when the write needs
        :meth:`write` (partial blocks, or a page placed on a tier that must be awaited)."""
        if offset % BLOCK_SIZE or len(data) % BLOCK_SIZE:
            return None
        data = data if isinstance(data, bytes) else bytes(data)
        if len(data) == BLOCK_SIZE:
            return self._write_block_now(offset // BLOCK_SIZE, encode(data))
        return self.write_encoded_now(
            offset, [encode(page) for page in split_pages(data)])

    def write_encoded_now(self, offset: int, pages: list[Encoded]) -> _Batch | None:
        """:meth:`write_now` of whole blocks from ``offset`` whose pages were encoded
        already (by the encoder workers)."""
        first = offset // BLOCK_SIZE
        if len(pages) == 1:
            return self._write_block_now(first, pages[0])
        entries = []
        try:
            for encoded in pages:
                entry = self._place_now(encoded)
                if entry is None:
                    break
                entries.append(entry)
        except BaseException:
            self._discard_all(entries)
            raise
        if len(entries) < len(pages):
            self._discard_all(entries)
            return None
        blocks = range(first, first + len(entries))
        for block in blocks:
            self.heat[block] = HOT
        batches = self._stage_written(blocks, entries)
        return batches[-1] if batches else None

    def _write_block_now(self, block: int, encoded: Encoded) -> _Batch | None:
        """:meth:`write_encoded_now` of one block, the write of a swapped-out page,
        without the loops over pages and entries and their lists (1.7k instructions,
        callgrind)."""
        entry = self._place_now(encoded)
        if entry is None:
            return None
        self.heat[block] = HOT
        try:
            return self._stage(block, entry)
        except BaseException:
            self._discard(entry)  # never staged (see _stage_written)
            raise

    def _stage_written(self, blocks: Sequence[int], entries: list[Entry]) -> list[_Batch]:
        """Stage the entries of freshly stored pages of ``blocks``.  If staging one fails
        (a map read), the slots of it and of those after it, which no entry will ever
        point at, are freed before the error goes on; those staged stay staged, as the
        pieces of a failed NBD write may."""
        batches: list[_Batch] = []
        for block, entry in zip(blocks, entries):
            try:
                batches.append(self._stage(block, entry))
            except BaseException:
                self._discard_all(entries[len(batches):])
                raise
        return batches

    @staticmethod
    def when_committed(batch: _Batch, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(error)`` once ``batch`` is committed (``error`` is ``None``) or
        failed; at once if that already happened."""
        if batch.done:
            callback(batch.error)
        else:
            batch.callbacks.append(callback)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False
    ) -> None:
        """Zero the range: whole blocks are unmapped (``may_trim``) or become zero entries."""
        await self._set_whole_blocks(offset, length, None if may_trim else ZERO_ENTRY)
        batches = [
            await self._write_partial(block, start, bytes(end - start))
            for block, start, end in _partial_edges(offset, length)
        ]
        await self._settle(batches, fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Unmap the blocks wholly inside the range; partial edge blocks keep their data."""
        await self._set_whole_blocks(offset, length, None)
        await self._settle([], fua)

    async def flush(self) -> None:
        """Make everything acknowledged so far survive a host crash (RAM tier excepted)."""
        if self._batch is not None:
            await self._settle([self._batch], fua=False)
        await self._durable()

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents ``(length, flags)`` covering exactly the range."""
        end = offset + length
        extents: list[list[int]] = []
        position = offset
        for block, entry in self._entries_in(offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE):
            start = max(block * BLOCK_SIZE, offset)
            _add_extent(extents, start - position, HOLE | ZERO)
            position = min((block + 1) * BLOCK_SIZE, end)
            _add_extent(extents, position - start, ZERO if entry.is_zero else 0)
        _add_extent(extents, end - position, HOLE | ZERO)
        return [(run_length, flags) for run_length, flags in extents]

    async def move(self, block: int, to_tier: str, reason: str = "manual", *,
                   keep_source: bool = False) -> bool:
        """Move a stored block's data to ``to_tier``; False if there was nothing to move
        or the block changed meanwhile (the copy is then discarded).

        A clean copy on ``to_tier`` makes the move a map change only.  ``keep_source``
        (promotions) keeps the old copy as the block's clean backing when it is slower.
        """
        target = self._tier_named(to_tier)
        entry, backing = self._current(block), self._current_backing(block)
        if entry is None or not entry.is_stored or entry.tier == target.tier_id:
            return False
        source = self._tiers.get(entry.tier)
        if source is None:
            return False
        if backing is not None and backing.tier == target.tier_id and _same_data(entry, backing):
            return await self._commit_move(block, (entry, backing), (backing, None), reason, hit=True)
        try:
            payload, moved = await self._payload_of(block, entry, source)
        except StoreError:
            if (self._current(block), self._current_backing(block)) != (entry, backing):
                self._move_events["move_races_lost"] += 1
                return False  # rewritten meanwhile: its old slot may be gone already
            raise
        moved = moved._replace(tier=target.tier_id, addr=await target.put(payload))
        kept = entry if keep_source else backing
        if kept is not None and (kept.tier <= moved.tier or kept.tier in self.draining):
            kept = None
        if not await self._commit_move(block, (entry, backing), (moved, kept), reason):
            target.free(moved.addr, moved.length)
            return False
        return True

    async def repack(self, block: int) -> int:
        """Copy the block's payload into a fuller slab of its tier, so that a sparse
        slab empties and gives its memory back (``SlabAllocator.in_sparse_slab``); every
        entry pointing at the payload (all of a grouped one's) follows.  Returns how
        many entries moved (0: not in a sparse slab, or the block changed meanwhile)."""
        entry, backing = self._current(block), self._current_backing(block)
        if entry is None or not entry.is_stored:
            return 0
        tier = self._tiers.get(entry.tier)
        if not isinstance(tier, SlabTier) or not tier.in_sparse_slab(entry.addr, entry.length):
            return 0
        payload = await tier.get(entry.addr, entry.length)
        if (self._current(block), self._current_backing(block)) != (entry, backing):
            self._move_events["move_races_lost"] += 1
            return 0
        addr = tier.repack_now(entry.addr, payload)
        if addr is None:
            return 0
        slot, template = _slot(entry), entry._replace(addr=addr)
        if entry.flags & GROUPED:
            share = self._groups.get(slot)
            holders = self._holders(share.group, slot)
        else:
            holders = [(block, entry, backing)]
        batches = [batch for holder in holders
                   if (batch := self._repoint(holder, slot, template, "repack")) is not None]
        if not batches:
            tier.free(addr, entry.length)
        elif entry.flags & GROUPED:
            self._groups.set_pages(_slot(template), share.pages)
        await self._settle(batches, fua=False)
        return len(batches)

    async def _payload_of(self, block: int, entry: Entry, source: Tier) -> tuple[bytes, Entry]:
        """The payload a move copies and its entry (tier and address still to set): the
        stored payload, or a grouped block's page encoded on its own."""
        if not entry.flags & GROUPED:
            return await source.get(entry.addr, entry.length), entry
        encoded = encode(await self._load(block, entry))
        return encoded.payload, _stored_entry(source, encoded, 0)

    async def move_group(self, blocks: Iterable[int], to_tier: str, reason: str = "manual") -> int:
        """Move blocks of one aligned map group to ``to_tier`` in one grouped payload;
        returns how many moved.

        Blocks that cannot share the payload (unstored, already there, with a clean copy
        there) move one by one with :meth:`move`; so do all when fewer than two would
        share it, it would exceed the codec's limit, or the tier has no room for it.
        Each block's entry is compare-and-swapped as in :meth:`move`.  Pages stored one
        by one on ``to_tier`` itself join the payload too: that groups them in place, if
        it saves :data:`REGROUP_MIN_SAVING` of their bytes (else nothing moves).
        """
        target = self._tier_named(to_tier)
        blocks = list(blocks)
        if len({block >> GROUP_BITS for block in blocks}) != 1:
            raise ValueError("move_group takes blocks of one map group")
        pages = await self._pages_of(blocks, target) if target.tier_id in GROUPED_TIERS else {}
        payload = await self._encode_group({block & (GROUP_SIZE - 1): page for block, (_, _, page) in pages.items()}) \
            if len(pages) >= 2 else None
        if payload is None or not target.has_room(len(payload)) or not _worth_grouping(pages, payload, target):
            pages = {}
        moved = await self._stage_group(pages, target, payload, reason) if pages else 0
        for block in blocks:
            if block not in pages:
                moved += await self.move(block, to_tier, reason)
        return moved

    async def _encode_group(self, pages: dict[int, bytes]) -> bytes | None:
        """:func:`encode_group` on the grouping thread: zstd releases the GIL, and the
        0.3-0.8 ms a group takes at GROUP_LEVEL would otherwise stall every request on
        the loop.  The callers compare-and-swap their entries after it, as after their
        loads.  Every grouped move waits here, so one that resumes after :meth:`close`
        fails here with a plain error; a late write after any other await fails at the
        closed tier (:meth:`Arena.close <nbdswap.tiers.slab.Arena.close>`)."""
        payload = await asyncio.get_running_loop().run_in_executor(_GROUP_ENCODER, encode_group, pages)
        if self._closed:
            raise StoreError("the store was closed while a group was compressed")
        return payload

    def _may_join(self, block: int, target: Tier) -> bool:
        """Whether the block's data would go into a grouped payload on ``target``."""
        entry, backing = self._current(block), self._current_backing(block)
        if entry is None or not entry.is_stored or entry.tier not in self._tiers:
            return False
        if entry.tier == target.tier_id:
            return not entry.flags & GROUPED
        return backing is None or backing.tier != target.tier_id or not _same_data(entry, backing)

    async def _pages_of(self, blocks: list[int], target: Tier) -> dict[int, tuple[Entry, Entry | None, bytes]]:
        """Entry, clean copy and page of each block that may join a group on ``target``
        and whose page reads back unchanged; a block that fails to read is left out (a
        move of its own reports it).  Whether a block may join is asked just before its
        load: the loads before it may have let a write or a trim replace its stored page
        (a zero page joined with the zero entry's checksum, and then read as corrupt)."""
        pages = {}
        for block in blocks:
            if not self._may_join(block, target):
                continue
            entry, backing = self._current(block), self._current_backing(block)
            try:
                page = await self._load(block, entry)
            except StoreError:
                continue
            if (self._current(block), self._current_backing(block)) == (entry, backing):
                pages[block] = (entry, backing, page)
        return pages

    async def _stage_group(self, pages: dict[int, tuple[Entry, Entry | None, bytes]], target: Tier,
                           payload: bytes, reason: str) -> int:
        """Put the grouped payload and stage each block's entry pointing at it (only if
        the block still has the entry its page came from); the number staged."""
        addr = await target.put(payload)
        batches = []
        for block, (entry, backing, _) in pages.items():
            moved = Entry(target.tier_id, GROUPED | COMPRESSED, len(payload), entry.checksum, addr)
            kept = backing if backing is not None and backing.tier > moved.tier \
                and backing.tier not in self.draining else None
            batch = self._stage_if(block, entry, moved, expected_backing=backing, backing=kept)
            if batch is None:
                self._move_events["move_races_lost"] += 1
                continue
            self._moves[TIER_NAMES[entry.tier], TIER_NAMES[target.tier_id], reason] += 1
            batches.append(batch)
        if batches:
            self._groups.set_pages((target.tier_id, addr), len(pages))
        else:
            target.free(addr, len(payload))
        await self._settle(batches, fua=False)
        return len(batches)

    def sparse_payloads(self) -> Iterator[tuple[int, int]]:
        """Slots ``(tier id, address)`` of grouped payloads that lost references since
        they were last looked at (each is forgotten as it is yielded)."""
        while self._sparse:
            slot = next(iter(self._sparse))
            del self._sparse[slot]
            yield slot

    async def compact(self, tier_id: int, addr: int) -> int:
        """If at most :data:`COMPACT_LIVE_SHARE` of a grouped payload's pages are still
        referenced, store them anew on its tier (grouped if two or more) and let the
        commit free it; returns how many references moved (0: left as it is)."""
        share = self._groups.get((tier_id, addr))
        tier = self._tiers.get(tier_id)
        if share is None or tier is None or tier_id in self.draining:
            return 0
        holders = self._holders(share.group, (tier_id, addr))
        if share.pages and len(holders) > COMPACT_LIVE_SHARE * share.pages:
            return 0  # known to be mostly live: its pages need not be loaded to say so
        pages = {}
        for block, entry, backing in holders:
            try:
                pages[block] = await self._load(block, entry if _in_slot(entry, (tier_id, addr)) else backing)
            except StoreError:
                return 0  # a damaged payload stays: its blocks read as EIO until rewritten
        share = self._groups.get((tier_id, addr))  # the loads may have learnt how many pages it holds
        if share is None:
            return 0
        packed = share.pages or len(pages)
        if len(pages) > COMPACT_LIVE_SHARE * packed:
            return 0
        payload = await self._encode_group({block & (GROUP_SIZE - 1): page for block, page in pages.items()}) \
            if len(pages) >= 2 else None
        if payload is None:
            return sum([await self._restore_alone(holder, (tier_id, addr), pages[holder[0]], tier)
                        for holder in holders])
        if not tier.has_room(len(payload)):
            return 0
        new_addr = await tier.put(payload)
        template = Entry(tier_id, GROUPED | COMPRESSED, len(payload), 0, new_addr)
        batches = [batch for holder in holders
                   if (batch := self._repoint(holder, (tier_id, addr), template, "compact")) is not None]
        if batches:
            self._groups.set_pages((tier_id, new_addr), len(pages))
        else:
            tier.free(new_addr, len(payload))
        await self._settle(batches, fua=False)
        return len(batches)

    def _holders(self, group: int, slot: tuple[int, int]) -> list[tuple[int, Entry, Entry | None]]:
        """(block, entry, clean copy) of the blocks of ``group`` whose entry or clean copy
        is in the payload at ``slot``."""
        holders = []
        for block in range(group << GROUP_BITS, min((group + 1) << GROUP_BITS, len(self.heat))):
            entry, backing = self._current(block), self._current_backing(block)
            if _in_slot(entry, slot) or _in_slot(backing, slot):
                holders.append((block, entry, backing))
        return holders

    def _repoint(self, holder: tuple[int, Entry, Entry | None], slot: tuple[int, int],
                 template: Entry, reason: str) -> _Batch | None:
        """Stage the holder's entry or clean copy in ``slot`` as ``template`` (with its
        page checksum), if the block still has both; counts it as a move for ``reason``."""
        block, entry, backing = holder
        if _in_slot(entry, slot):
            new = (template._replace(checksum=entry.checksum), backing)
        else:
            new = (entry, template._replace(checksum=backing.checksum))
        batch = self._stage_if(block, entry, new[0], expected_backing=backing, backing=new[1])
        if batch is None:
            self._move_events["move_races_lost"] += 1
        else:
            self._moves[TIER_NAMES[slot[0]], TIER_NAMES[template.tier], reason] += 1
        return batch

    async def _restore_alone(self, holder: tuple[int, Entry, Entry | None], slot: tuple[int, int],
                             page: bytes, tier: Tier) -> int:
        """Compaction of a payload with one live page: that page stored on its own."""
        encoded = encode(page)
        if not tier.has_room(len(encoded.payload)):
            return 0
        template = _stored_entry(tier, encoded, await tier.put(encoded.payload))
        batch = self._repoint(holder, slot, template, "compact")
        if batch is None:
            tier.free(template.addr, template.length)
            return 0
        await self._settle([batch], fua=False)
        return 1

    async def drop_backing(self, block: int, tier: int | None = None) -> bool:
        """Free the block's clean copy (only one on ``tier``, if given); False if it has none."""
        entry, backing = self._current(block), self._current_backing(block)
        if backing is None or (tier is not None and backing.tier != tier):
            return False
        batch = self._stage_if(block, entry, entry, expected_backing=backing, backing=None)
        if batch is None:
            return False
        self._move_events["clean_copies_dropped"] += 1
        await self._settle([batch], fua=False)
        return True

    async def _commit_move(self, block: int, expected: tuple[Entry, Entry | None],
                           new: tuple[Entry, Entry | None], reason: str, hit: bool = False) -> bool:
        batch = self._stage_if(block, expected[0], new[0], expected_backing=expected[1], backing=new[1])
        if batch is None:
            self._move_events["move_races_lost"] += 1
            return False
        self._moves[TIER_NAMES[expected[0].tier], TIER_NAMES[new[0].tier], reason] += 1
        self._move_events["clean_copy_hits"] += hit
        await self._settle([batch], fua=False)
        return True

    def entry(self, block: int) -> Entry | None:
        """The block's current entry (staged or committed)."""
        return self._current(block)

    def tier_names(self) -> list[str]:
        """Configured tiers, fastest first."""
        return [self._tiers[tier_id].name for tier_id in sorted(self._tiers)]

    def tier(self, name: str) -> Tier:
        return self._tier_named(name)

    def accepting_tiers(self) -> list[Tier]:
        """Tiers that take new blocks (every one but a draining one), fastest first:
        where writes go (:meth:`_placement_for`) and moves may go (the policy engine)."""
        return [self._tiers[tier_id] for tier_id in sorted(self._tiers) if tier_id not in self.draining]

    def set_draining(self, name: str, draining: bool) -> None:
        """Let tier ``name`` take new blocks or not (persisted in the map)."""
        tier = self._tier_named(name)
        self._map.set_draining(name, draining)
        if draining:
            self.draining.add(tier.tier_id)
        else:
            self.draining.discard(tier.tier_id)
        self._placements = self._placement_orders()

    def entries_on(self, tier_id: int, first: int = 0) -> Iterator[tuple[int, Entry]]:
        """Current entries of the blocks stored on tier ``tier_id``, from block ``first``
        on.  The blocks of other tiers are skipped in C (a ``memchr`` over
        :attr:`block_tiers`), so a scan of a tier holding a few of the map's blocks
        costs per block found, not per block mapped."""
        tiers, marker = self.block_tiers, bytes((tier_id,))
        block = tiers.find(marker, first)
        while block >= 0:
            entry = self._current(block)
            if entry is not None and entry.tier == tier_id and entry.is_stored:
                yield block, entry
            block = tiers.find(marker, block + 1)

    def backings(self, first: int = 0) -> Iterator[tuple[int, Entry]]:
        """Committed clean copies from block ``first`` on (do not await while iterating)."""
        return self._map.backing_items(first)

    def move_stats(self) -> dict:
        """Counters of moves and clean copies (also part of :meth:`stats`)."""
        moves: dict[str, dict[str, dict[str, int]]] = {}
        for (source, target, reason), count in sorted(self._moves.items()):
            moves.setdefault(source, {}).setdefault(target, {})[reason] = count
        return {
            "moves": moves,
            **{name: self._move_events[name] for name in MOVE_EVENTS},
            "clean_copies": {TIER_NAMES[tier_id]: self._backings[tier_id] for tier_id in TIER_NAMES},
            "draining": sorted(TIER_NAMES[tier_id] for tier_id in list(self.draining)),
        }

    def stats(self) -> dict:
        empty = dict.fromkeys(("blocks", "stored_bytes", "used_bytes", "capacity_bytes"), 0)
        tiers = {tier_class.name: {**empty, "slab_bytes": 0} for tier_class in LOCAL_TIERS}
        tiers[TIER_NAMES[TIER_REMOTE]] = {**empty, "up": False, "configured": False}
        for tier in self._tiers.values():
            tiers[tier.name] = {**tier.stats(), **self._grouped_stats(tier)}
            if tier is self._remote:
                tiers[tier.name]["configured"] = True
            tiers[tier.name]["corrupt_reads_total"] = self._corrupt_reads[tier.tier_id]
        return {
            "tiers": tiers,
            "map": {"blocks": self._mapped, "bytes": self._map.bytes},
            "zero_blocks": self._zero,
            "same_filled_blocks": self._same_filled,
            "lost_blocks": self._lost,
            **self.move_stats(),
        }

    def tier_blocks(self, name: str) -> int:
        """Blocks (clean copies included) whose data the tier holds: a grouped payload
        counts once per block it holds, not once."""
        return self._grouped_stats(self._tier_named(name))["blocks"]

    def _grouped_stats(self, tier: Tier) -> dict[str, int]:
        """``blocks`` as map references (a grouped payload holds several blocks), and the
        grouped payloads' count, references and the bytes of pages no entry uses."""
        payloads, refs, nbytes = (self._grouped[tier.tier_id, name] for name in ("payloads", "refs", "bytes"))
        stats = {"blocks": tier.blocks - payloads + refs}
        if tier.tier_id in GROUPED_TIERS:
            stats.update(grouped_payloads=payloads, grouped_blocks=refs, grouped_stored_bytes=nbytes)
        return stats

    @property
    def instance_id(self) -> str:
        """A random id of this state directory, fixed when it was created."""
        return self._map.instance_id

    async def close(self) -> None:
        """Commit what is staged, make it durable, and close the map and tiers."""
        if self._closed:
            return
        self._closed = True  # a move that resumes from its group's compression stops
        try:
            await self.flush()
        finally:
            self._map.close()
            if self._remote is not None:
                await self._remote.aclose()
            for tier in self._tiers.values():
                tier.close()

    # --- reading ------------------------------------------------------------------

    def _current(self, block: int) -> Entry | None:
        """The block's entry, staged or committed."""
        batch = self._batch
        if batch is not None and block in batch.changes:
            return batch.changes[block]
        return self._map.get(block)

    def _current_backing(self, block: int) -> Entry | None:
        """The block's clean copy, staged or committed."""
        batch = self._batch
        if batch is not None and block in batch.backing:
            return batch.backing[block]
        return self._map.get_backing(block) if self._may_have_backing[block] else None

    async def _read_block(self, block: int) -> tuple[Entry | None, bytes]:
        """The block's current entry and page."""
        self.heat[block] = HOT
        while True:
            entry = self._current(block)
            try:
                page = await self._load(block, entry)
                if self.on_slow_read is not None and entry is not None and entry.tier > TIER_RAM:
                    self.on_slow_read(block, entry.tier)
                return entry, page
            except CorruptBlockError:
                # A concurrent write may have replaced the entry and reused its slot
                # while the tier read was in flight; then the new entry is the answer.
                if self._current(block) == entry:
                    if entry is not None and entry.is_stored:
                        self._corrupt_reads[entry.tier] += 1
                    raise

    async def _load(self, block: int, entry: Entry | None) -> bytes:
        if entry is None or not entry.is_stored:
            return _unstored_page(block, entry)
        tier = self._stored_tier(block, entry)
        if not entry.flags & GROUPED:
            return _decode(block, tier, entry, await tier.get(entry.addr, entry.length))
        group = self._cached_group(entry)
        if group is None:
            freed = self._groups_freed
            group = self._decoded_group(block, tier, entry, await tier.get(entry.addr, entry.length), freed)
        return _group_page(block, tier, entry, group)

    def _page_now(self, block: int, entry: Entry | None) -> bytes | None:
        """:meth:`_load` without awaiting, or ``None`` if the tier must be awaited.
        A corrupt block is counted here: nothing can replace its entry meanwhile."""
        # not Entry.is_stored, without the property's call (every RAM read passes here)
        if entry is None or entry.tier == TIER_NONE or entry.flags & LOST:
            return _unstored_page(block, entry)
        tier = self._stored_tier(block, entry)
        try:
            if not entry.flags & GROUPED:
                payload = tier.get_now(entry.addr, entry.length)
                return None if payload is None else _decode(block, tier, entry, payload)
            group = self._cached_group(entry)
            if group is None:
                payload = tier.get_now(entry.addr, entry.length)
                if payload is None:
                    return None
                group = self._decoded_group(block, tier, entry, payload, self._groups_freed)
            return _group_page(block, tier, entry, group)
        except CorruptBlockError:
            self._corrupt_reads[entry.tier] += 1
            raise

    def _cached_group(self, entry: Entry) -> Group | None:
        group = self._group_cache.get(_slot(entry))
        if group is not None:
            self._group_cache.move_to_end(_slot(entry))
        return group

    def _decoded_group(self, block: int, tier: Tier, entry: Entry, payload: bytes, freed: int) -> Group:
        """Decode a grouped payload and cache it, unless a grouped slot was freed (and
        so maybe reused) since ``freed`` was read, before the payload was."""
        try:
            group = decode_group(payload)
        except DecodeError as error:
            raise CorruptBlockError(f"block {block} on the {tier.name} tier: {error}") from None
        if freed == self._groups_freed and _slot(entry) in self._groups:
            self._groups.set_pages(_slot(entry), group.bitmap.bit_count())
            self._group_cache[_slot(entry)] = group
            if len(self._group_cache) > GROUP_CACHE_LIMIT:
                self._group_cache.popitem(last=False)
        return group

    def _stored_tier(self, block: int, entry: Entry) -> Tier:
        tier = self._tiers.get(entry.tier)
        if tier is None:
            raise TierUnavailableError(f"block {block} is on tier {entry.tier}, which is not configured")
        return tier

    def _entries_in(self, first: int, last: int) -> Iterator[tuple[int, Entry]]:
        """Current entries of blocks ``first..last`` in block order (staged ones win)."""
        staged = self._batch.changes if self._batch is not None else {}
        overlay = sorted(
            (block, entry) for block, entry in staged.items() if first <= block <= last and entry is not None
        )
        committed = ((block, entry) for block, entry in self._map.items(first, last) if block not in staged)
        return heapq.merge(committed, overlay, key=operator.itemgetter(0))

    # --- writing ------------------------------------------------------------------

    async def _store_page(self, page: bytes) -> Entry:
        """Encode a page and put its payload into a tier; the entry describing it."""
        encoded = encode(page)
        if encoded.kind <= _SAME_FILLED_KIND:  # or ZERO: no tier data
            return _unstored_entry(encoded)
        length = len(encoded.payload)
        for tier in self._placement_for(length):
            if not tier.has_room(length):
                continue
            try:
                return _stored_entry(tier, encoded, await tier.put(encoded.payload))
            except (NoSpaceError, TierUnavailableError):
                continue
        raise NoSpaceError("every reachable tier is full")

    def _place_now(self, encoded: Encoded) -> Entry | None:
        """:meth:`_store_page` of an encoded page without awaiting, or ``None`` (nothing
        stored) when the tier the page goes to must be awaited (the remote tier, whose
        :meth:`~nbdswap.tiers.Tier.put_now` refuses every page).  The tiers are tried in
        a plain loop: a generator of the tiers with room cost 4k instructions of a RAM
        write's 211k (callgrind).  ``has_room`` is asked only of a tier that must be
        awaited: a slab tier's ``put_now`` raises NoSpaceError when it has no room, and
        a full RAM tier does so before it allocates anything."""
        if encoded.kind <= _SAME_FILLED_KIND:  # or ZERO: no tier data
            return _unstored_entry(encoded)
        length = len(encoded.payload)
        for tier in self._placements[length > self.ram_payload_limit]:  # _placement_for(length)
            try:
                addr = tier.put_now(encoded.payload)
            except NoSpaceError:
                continue
            if addr is not None:
                return _stored_entry(tier, encoded, addr)
            if tier.has_room(length):  # a remote tier that is up and has room
                return None
        raise NoSpaceError("every reachable tier is full")

    def _discard_all(self, entries: list[Entry]) -> None:
        """Free the slots of entries that were never staged."""
        for entry in entries:
            self._discard(entry)

    def _placement_for(self, length: int) -> list[Tier]:
        """Tiers a new payload may go to, in order: draining tiers never; RAM last for
        a payload above :attr:`ram_payload_limit` (an incompressible page)."""
        return self._placements[length > self.ram_payload_limit]

    def _placement_orders(self) -> tuple[list[Tier], list[Tier]]:
        """The two orders :meth:`_placement_for` chooses from, computed once per change
        of :attr:`draining` instead of on every write."""
        tiers = self.accepting_tiers()
        if tiers and tiers[0].tier_id == TIER_RAM:
            return tiers, tiers[1:] + tiers[:1]
        return tiers, tiers

    async def _store_pages(self, pages: list[bytes]) -> list[Entry]:
        """:meth:`_store_page` of each page; on a failure or cancellation the slots of
        the pages already stored are freed."""
        if self._remote is None or len(pages) < 2:
            results = await self._each(self._store_page, pages, settle_all=True)
        else:
            tasks = [asyncio.ensure_future(self._store_page(page)) for page in pages]
            try:
                results = await asyncio.gather(*tasks, return_exceptions=True)
            except asyncio.CancelledError:
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception() is None:
                        self._discard(task.result())
                raise
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            for result in results:
                if not isinstance(result, BaseException):
                    self._discard(result)
            raise failures[0]
        return results

    async def _each(self, operation: Callable[[_T], Awaitable], items: list[_T], *,
                    settle_all: bool = False) -> list:
        """``operation`` of each item: one by one, or concurrently with a remote tier
        (whose batches then carry a whole request).  ``settle_all`` returns exceptions
        as results once every operation finished, instead of raising the first; it is
        meant for the one-by-one case (see :meth:`_store_pages`)."""
        if self._remote is None or len(items) < 2:
            results = []
            for item in items:
                try:
                    results.append(await operation(item))
                except Exception as error:
                    if not settle_all:
                        raise
                    results.append(error)
            return results
        return await asyncio.gather(*map(operation, items), return_exceptions=settle_all)

    async def _write_partial(self, block: int, start: int, chunk: bytes) -> _Batch:
        """Read-modify-write part of a block, retrying if the block changes meanwhile."""
        while True:
            entry, page = await self._read_block(block)
            updated = await self._store_page(page[:start] + chunk + page[start + len(chunk) :])
            batch = self._stage_if(block, entry, updated)
            if batch is not None:
                return batch
            self._discard(updated)

    async def _set_whole_blocks(self, offset: int, length: int, entry: Entry | None) -> None:
        """Give every block wholly inside the range ``entry`` (``None`` unmaps).

        Commits every :data:`WHOLE_BLOCK_CHUNK` blocks, so that a range of any size
        takes bounded memory and lets other requests in between.
        """
        blocks = _whole_blocks(offset, length)
        for first in range(blocks.start, blocks.stop, WHOLE_BLOCK_CHUNK):
            last = min(first + WHOLE_BLOCK_CHUNK, blocks.stop) - 1
            if entry is None:  # only mapped blocks need a change
                targets: Iterable[int] = [block for block, _ in self._entries_in(first, last)]
            else:
                targets = range(first, last + 1)
            await self._settle([self._stage(block, entry) for block in targets], fua=False)

    def _tier_named(self, name: str) -> Tier:
        for tier in self._tiers.values():
            if tier.name == name:
                return tier
        raise ValueError(f"no tier named {name!r} is configured")

    def _discard(self, entry: Entry | None) -> None:
        """Free the tier slot of an entry nobody can see any more (a grouped payload's
        once its last reference goes)."""
        if entry is not None and entry.is_stored:
            self._free_slot(entry)

    def _free_slot(self, entry: Entry) -> None:
        """:meth:`_discard` of a stored entry, such as those a commit replaced (which
        then skips a property call per write)."""
        if entry.flags & GROUPED and not self._release(entry, 1):
            return
        tier = self._tiers.get(entry.tier)
        if tier is not None:
            try:
                tier.free(entry.addr, entry.length)
            except ValueError:
                log.exception("tier slot of %r was already free", entry)

    def _hold(self, block: int, entry: Entry | None) -> None:
        """Count a new map reference (of ``block``) to a grouped payload."""
        if entry is None or not entry.flags & GROUPED or not entry.is_stored:
            return
        if self._groups.hold(_slot(entry), entry.length, block >> GROUP_BITS):
            self._grouped[entry.tier, "payloads"] += 1
            self._grouped[entry.tier, "bytes"] += entry.length
        self._grouped[entry.tier, "refs"] += 1

    def _release(self, entry: Entry, count: int) -> bool:
        """Drop ``count`` references to a grouped payload; True if that was the last."""
        left = self._groups.release(_slot(entry), count)
        if left is None:
            log.error("grouped payload at %d of tier %d: more references dropped than held", entry.addr, entry.tier)
            return False
        self._grouped[entry.tier, "refs"] -= count
        if left:
            self._sparse[_slot(entry)] = None
            return False
        self._sparse.pop(_slot(entry), None)
        self._grouped[entry.tier, "payloads"] -= 1
        self._grouped[entry.tier, "bytes"] -= entry.length
        self._group_cache.pop(_slot(entry), None)
        self._groups_freed += 1
        return True

    # --- staging and grouped commits ----------------------------------------------

    def _stage(self, block: int, entry: Entry | None) -> _Batch:
        """Stage ``entry`` as the block's new entry; returns the batch to wait for.

        A block this batch has not changed yet is staged without looking up its
        committed entry: the commit reads the block's group anyway and returns it.
        Writes need the old entry only to free its slot and to count it out, and
        :meth:`_count_out_unread` does both at the commit, where it also counts the
        block's last staged entry in; reads and moves see the staged one.

        ``entry`` is a written page's (stored, zero or same-filled) or ``None``, never
        a grouped one, which :meth:`_replace` stages with the reference it holds.
        """
        batch = self._batch
        if batch is not None and block in batch.changes:
            return self._replace(block, batch.changes[block], entry)
        # Read before anything is staged, so that a failed read stages nothing.  A
        # block not in the batch's changes is not in its clean copies either.
        old_backing = self._map.get_backing(block) if self._may_have_backing[block] else None
        if batch is None:
            batch = self._new_batch()
        batch.unread.add(block)
        batch.changes[block] = entry
        self.block_tiers[block] = TIER_NONE if entry is None else entry.tier
        if old_backing is not None:
            self._replace_backing(batch, block, old_backing, entry, None)
        return batch

    def _stage_if(self, block: int, expected: Entry | None, entry: Entry | None, *,
                  expected_backing: Entry | None = None, backing: Entry | None = None) -> _Batch | None:
        """Compare-and-swap: stage ``entry`` (and ``backing`` as its clean copy) only if
        the block's entry and clean copy are still the expected ones; returns the batch to
        wait for, or ``None`` if refused.  Without a clean copy expected, the block's
        current one is dropped (a write's new data makes it stale)."""
        old = self._current(block)
        if old != expected or (expected_backing is not None and self._current_backing(block) != expected_backing):
            return None
        return self._replace(block, old, entry, backing)

    def _replace(self, block: int, old: Entry | None, entry: Entry | None,
                 backing: Entry | None = None) -> _Batch:
        """Stage the block's new entry and clean copy; the slots neither of them still
        uses are freed after the commit."""
        batch = self._batch if self._batch is not None else self._new_batch()
        old_backing = self._current_backing(block)
        counted = block not in batch.unread  # else counted at the commit
        if counted:
            batch.base.setdefault(block, old)
        batch.changes[block] = entry
        self.block_tiers[block] = TIER_NONE if entry is None else entry.tier
        if _frees(old, entry, backing):
            batch.replaced.append(old)
        self._hold(block, entry)
        if old_backing is not None or backing is not None:
            self._replace_backing(batch, block, old_backing, entry, backing)
        if counted:
            self._recount(old, entry)
        return batch

    def _replace_backing(self, batch: _Batch, block: int, old_backing: Entry | None, entry: Entry | None,
                         backing: Entry | None) -> None:
        """The clean-copy part of :meth:`_replace` (most changes have no clean copy)."""
        batch.backing_base.setdefault(block, old_backing)
        batch.backing[block] = backing
        self._count_backing(old_backing, -1)
        self._count_backing(backing, 1)
        if _frees(old_backing, entry, backing):
            batch.replaced.append(old_backing)
        self._hold(block, backing)

    def _new_batch(self) -> _Batch:
        """Start staging: a batch whose commit runs once the loop has run what is ready."""
        batch = self._batch = _Batch()
        asyncio.get_running_loop().call_soon(self._commit)
        return batch

    def _commit(self) -> None:
        """Write the staged batch in one transaction, then free what it replaced."""
        batch, self._batch = self._batch, None
        try:
            committed = self._map.commit(batch.changes, batch.backing, batch.unread)
        except Exception as error:  # noqa: BLE001 - the writers get an error, never a hang
            self._count_out_unread(batch, self._committed_entries(batch.unread))
            self._roll_back(batch)
            log.error("block map commit failed: %s", error,
                      exc_info=not isinstance(error, (lmdb.Error, OSError)))
            batch.finish(f"block map commit failed: {error}")
            return
        self._count_out_unread(batch, committed)
        for block, backing in batch.backing.items():
            self._may_have_backing[block] = backing is not None
        for entry in batch.replaced:
            self._free_slot(entry)
        batch.finish(None)

    def _count_out_unread(self, batch: _Batch, committed: dict[int, Entry | None]) -> None:
        """What :meth:`_replace` does with a block's old entry, for the blocks
        :meth:`_stage` staged without it, once ``committed`` tells it: the entry becomes
        the block's base and is counted out, the block's last staged entry is counted
        in (until now the counts held the committed entry), and the old slot is queued
        to be freed.  Its slot is always freed (:func:`_frees`): nothing staged in the
        batch can point at it, as every later staging of the block read the staged
        entry, and the first one's payload took a slot of its own."""
        changes = batch.changes
        for block in batch.unread:
            old = committed.get(block)
            batch.base[block] = old
            self._recount(old, changes[block])
            # old.is_stored, without the property's call (0.8k instructions a write)
            if old is not None and old.tier != TIER_NONE and not old.flags & LOST:
                batch.replaced.append(old)

    def _committed_entries(self, blocks: Iterable[int]) -> dict[int, Entry | None]:
        """The committed entries of ``blocks``, after a commit that failed (and so left
        the map as it was).  A block whose entry cannot be read either is left out: its
        counts and slot stay as they are, which is right, as the map still points at
        it; only its :attr:`block_tiers` byte is wrong (``TIER_NONE``, which hides the
        block from the policy's tier scans, drains included) until the block is staged
        again or the server restarts."""
        committed, unreadable, first_error = {}, 0, None
        for block in blocks:
            try:
                committed[block] = self._map.get(block)
            except Exception as error:  # noqa: BLE001 - the rollback and the writers' errors must follow
                unreadable += 1
                first_error = first_error or error
        if unreadable:
            log.error("%d entries could not be read to undo the failed commit: %s", unreadable, first_error)
        return committed

    def _roll_back(self, batch: _Batch) -> None:
        """Undo a batch that could not be committed: the map keeps its entries, and every
        slot the batch filled is freed."""
        for block, entry in batch.changes.items():
            base = batch.base[block]
            self._recount(entry, base)
            self.block_tiers[block] = TIER_NONE if base is None else base.tier
        for block, backing in batch.backing.items():
            self._count_backing(backing, -1)
            self._count_backing(batch.backing_base[block], 1)
        bases = [entry for entry in (*batch.base.values(), *batch.backing_base.values())
                 if entry is not None and entry.is_stored]
        filled = [entry for entry in (*batch.changes.values(), *batch.backing.values(),
                                      *batch.replaced) if entry is not None and entry.is_stored]
        committed = {_slot(entry) for entry in bases}
        for entry in {_slot(entry): entry for entry in filled if not entry.flags & GROUPED}.values():
            if _slot(entry) not in committed:
                self._discard(entry)
        self._roll_back_groups(bases, filled)

    def _roll_back_groups(self, bases: list[Entry], filled: list[Entry]) -> None:
        """Undo the grouped references the batch added: every entry it staged (those it
        replaced again included) took one; its base entries keep theirs."""
        staged = Counter(_slot(entry) for entry in filled if entry.flags & GROUPED)
        staged.subtract(_slot(entry) for entry in bases if entry.flags & GROUPED)
        entries = {_slot(entry): entry for entry in filled if entry.flags & GROUPED}
        for slot, count in staged.items():
            if count and self._release(entries[slot], count) and entries[slot].tier in self._tiers:
                self._tiers[entries[slot].tier].free(entries[slot].addr, entries[slot].length)

    async def _settle(self, batches: list[_Batch], fua: bool) -> None:
        """Wait until the batches are committed (and durable, with ``fua``)."""
        for batch in dict.fromkeys(batches):
            if not batch.done:
                waiter = asyncio.get_running_loop().create_future()
                batch.waiters.append(waiter)
                await waiter
            elif batch.error is not None:
                raise StoreError(batch.error)
        if fua:
            await self._durable()

    async def _durable(self) -> None:
        """Sync the map and tiers; callers arriving during a sync share the next one."""
        waiter = asyncio.get_running_loop().create_future()
        self._sync_waiters.append(waiter)
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())
        await waiter

    async def _sync_loop(self) -> None:
        try:
            while self._sync_waiters:
                waiters, self._sync_waiters = self._sync_waiters, []
                try:
                    await self._sync_all()
                except StoreError as error:
                    outcome: StoreError | None = error
                else:
                    outcome = None
                for waiter in waiters:
                    if waiter.done():
                        continue
                    if outcome is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(StoreError(str(outcome)))
        finally:
            self._sync_task = None

    async def _sync_all(self) -> None:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            loop.run_in_executor(None, self._map.sync),
            *(tier.sync() for tier in self._tiers.values()),
            return_exceptions=True,
        )
        for error in results:
            if isinstance(error, Exception):
                raise StoreError(f"sync failed: {error}") from error

    # --- counters -----------------------------------------------------------------

    def _count_backing(self, entry: Entry | None, sign: int) -> None:
        if entry is not None:
            self._backings[entry.tier] += sign

    def _recount(self, old: Entry | None, new: Entry | None) -> None:
        """Count ``old`` out and ``new`` in, for a change of one block.  A stored page
        replacing another, the usual swap-out, leaves every count as it was, and is
        told apart without the two :meth:`_count` calls (2.2k instructions of a
        write's 150k, bench/write_instructions.py)."""
        if old is None or new is None or (old.flags | new.flags) & _COUNTED_FLAGS \
                or old.tier == TIER_NONE or new.tier == TIER_NONE:
            self._count(old, -1)
            self._count(new, 1)

    def _count(self, entry: Entry | None, sign: int) -> None:
        """Count ``entry`` in (``sign`` 1) or out (-1).  Every change calls it twice (at
        staging, or for a block staged unread at its commit), so it tests the fields
        instead of :attr:`Entry.is_zero` (a property call, 1.3k instructions a write,
        callgrind): not same-filled and on no tier is zero."""
        if entry is None:
            return
        self._mapped += sign
        if entry.flags & SAME_FILLED:
            self._same_filled += sign
        elif entry.tier == TIER_NONE:
            self._zero += sign
        elif entry.flags & LOST:
            self._lost += sign


def _slot(entry: Entry) -> tuple[int, int]:
    return entry.tier, entry.addr


def _in_slot(entry: Entry | None, slot: tuple[int, int]) -> bool:
    return entry is not None and _slot(entry) == slot and entry.is_stored


def _frees(gone: Entry | None, entry: Entry | None, backing: Entry | None) -> bool:
    """Whether replacing ``gone`` by ``entry`` and ``backing`` leaves its tier slot to
    free (a grouped payload's reference goes in any case)."""
    if gone is None or not gone.is_stored:
        return False
    if gone.flags & GROUPED:
        return True
    slot = _slot(gone)
    return not (_in_slot(entry, slot) or _in_slot(backing, slot))


def _worth_grouping(pages: dict[int, tuple[Entry, Entry | None, bytes]], payload: bytes, target: Tier) -> bool:
    """Whether a grouped payload is worth storing: always when its pages move to
    ``target`` anyway, and only if it saves :data:`REGROUP_MIN_SAVING` of their bytes
    when they are all on it already."""
    if any(entry.tier != target.tier_id for entry, _, _ in pages.values()):
        return True
    return len(payload) <= (1 - REGROUP_MIN_SAVING) * sum(entry.length for entry, _, _ in pages.values())


def _same_data(entry: Entry, copy: Entry) -> bool:
    """Whether ``copy`` holds the payload ``entry`` describes (in another tier); a page
    in a grouped payload has another payload, the same page checksum."""
    if (entry.flags | copy.flags) & GROUPED:
        return entry.checksum == copy.checksum
    return (entry.flags, entry.length, entry.checksum) == (copy.flags, copy.length, copy.checksum)


def _unstored_page(block: int, entry: Entry | None) -> bytes:
    """The page of an entry without tier data (none, zero, same-filled or lost)."""
    if entry is None or entry.is_zero:
        return ZERO_PAGE
    if entry.flags & SAME_FILLED:
        return same_filled_page(entry.addr)
    raise CorruptBlockError(f"block {block} was lost with its tier's data (e.g. RAM after a reboot)")


def _decode(block: int, tier: Tier, entry: Entry, payload: bytes) -> bytes:
    try:
        return decode_payload(payload, bool(entry.flags & COMPRESSED), entry.checksum)
    except DecodeError as error:
        raise CorruptBlockError(f"block {block} on the {tier.name} tier: {error}") from None


def _group_page(block: int, tier: Tier, entry: Entry, group: Group) -> bytes:
    try:
        return group.page(block & (GROUP_SIZE - 1), entry.checksum)
    except DecodeError as error:
        raise CorruptBlockError(f"block {block} on the {tier.name} tier: {error}") from None


def _unstored_entry(encoded: Encoded) -> Entry:
    """The entry of a zero or same-filled page (no tier data)."""
    if encoded.kind == _ZERO_KIND:
        return ZERO_ENTRY
    return Entry(TIER_NONE, SAME_FILLED, 0, 0, encoded.word)


def _stored_entry(tier: Tier, encoded: Encoded, addr: int) -> Entry:
    """The entry of a payload stored at ``addr``, built with ``tuple.__new__`` as
    blockmap's decoder does (NamedTuple's Python-level ``__new__``: 1.2k instructions
    more per stored page, callgrind)."""
    kind, payload, _, checksum = encoded
    flags = COMPRESSED if kind == _COMPRESSED_KIND else 0
    return _new_tuple(Entry, (tier.tier_id, flags, len(payload), checksum, addr))


def _split(offset: int, length: int) -> Iterator[tuple[int, int, int]]:
    """``(block, start, end)`` for each block the byte range touches."""
    end = offset + length
    while offset < end:
        block, start = divmod(offset, BLOCK_SIZE)
        stop = min(BLOCK_SIZE, start + end - offset)
        yield block, start, stop
        offset += stop - start


def _partial_edges(offset: int, length: int) -> list[tuple[int, int, int]]:
    """``(block, start, end)`` of the (at most two) blocks the range covers only in part."""
    end = offset + length
    edges = []
    block, start = divmod(offset, BLOCK_SIZE)
    if start:
        edges.append((block, start, min(BLOCK_SIZE, start + length)))
    last, stop = divmod(end, BLOCK_SIZE)
    if stop and (not edges or last != block):
        edges.append((last, 0, stop))
    return edges


def _whole_blocks(offset: int, length: int) -> range:
    """The blocks that lie wholly inside the byte range."""
    return range(-(-offset // BLOCK_SIZE), (offset + length) // BLOCK_SIZE)


def _add_extent(extents: list[list[int]], length: int, flags: int) -> None:
    if length <= 0:
        return
    if extents and extents[-1][1] == flags:
        extents[-1][0] += length
    else:
        extents.append([length, flags])


def _close_all(blockmap: BlockMap, tiers: Iterable[Tier]) -> None:
    for tier in tiers:
        tier.close()
    blockmap.close()


def _open_remote(blockmap: BlockMap, settings: RemoteSettings, state_dir: Path) -> RemoteTier:
    """The remote tier for this map: its key prefix must not change while keys exist."""
    prefix = blockmap.remote_prefix(settings.prefix)
    if prefix != settings.prefix:
        raise StateDirError(f"{state_dir} keeps its remote blocks under the key prefix {prefix!r}, "
                            f"not {settings.prefix!r}; use --remote-prefix {prefix!r}")
    from .tiers.remote import RemoteTier

    return RemoteTier.open(settings, blockmap.instance_id, blockmap.next_remote_epoch())


def _open_map(state_dir: Path, size: int) -> BlockMap:
    path = state_dir / MAP_FILE
    if not path.exists():
        _check_new_state_dir(state_dir)
        return BlockMap.create(path, size)
    blockmap = BlockMap.open(path)
    try:
        _resize(blockmap, size, state_dir)
    except BaseException:
        blockmap.close()
        raise
    return blockmap


def _check_new_state_dir(state_dir: Path) -> None:
    """Refuse to create a store among files that are not ours (or left from a lost map)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    strangers = sorted(
        entry.name
        for entry in state_dir.iterdir()
        if entry.name not in STATE_DIR_FILES and not entry.is_dir()
    )
    if DISK_FILE in strangers:
        raise StateDirError(f"{state_dir} has a disk tier but no block map ({MAP_FILE}): it is damaged")
    if strangers:
        shown = ", ".join(strangers[:5]) + (", …" if len(strangers) > 5 else "")
        raise StateDirError(f"{state_dir} is not an nbdswap state directory (it contains {shown})")


def _resize(blockmap: BlockMap, size: int, state_dir: Path) -> None:
    old_size = blockmap.size
    if size == old_size:
        return
    last = blockmap.last_block()
    if size < old_size and last is not None and last * BLOCK_SIZE >= size:
        raise StateDirError(
            f"{state_dir} holds data up to byte {(last + 1) * BLOCK_SIZE}, beyond the new size {size}; "
            f"use at least that size (it was {old_size}) or a new state directory"
        )
    blockmap.size = size
