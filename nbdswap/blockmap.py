"""The block map: block number → packed location, in LMDB.

It is the single source of truth of the store: every tier allocator and every counter
is rebuilt from it at start-up.

Entries are stored in *groups* of :data:`GROUP_SIZE` consecutive blocks: one LMDB record
per group, keyed by the group number as an 8-byte big-endian integer (so LMDB's default
byte order is block order, and portable).  A group's value is a 16-bit bitmap of the
blocks that have an entry followed by their 14-byte :class:`Entry` records in block
order.  One record per block cost 34 bytes of key, node header and value per block
(35.5 B measured on a full map); a group spreads the key and node header over up to 16
blocks and packs an entry in 14 bytes: 18.2 B per block measured (``bench/corpus.py
report``), 26.1 B when the blocks are filled in random order (LMDB then splits pages
half full).  A group is rewritten whole when any of its blocks changes: at most 226 bytes.

A second database, ``meta``, holds the format version, the instance id, the export
size, the id of each tier's arena file, the remote tier's key prefix and epoch, and
which tiers are being drained.

A third database holds *clean copies* in the same grouped form: block → an entry in a
slower tier whose payload equals the block's current data (kept when a read promoted
the block into RAM).  The store changes a block's entry and its backing in the same
transaction, and any write or trim of the block deletes the backing, so a backing is
never stale.

Commits use ``sync=False``/``metasync=False``: a committed transaction is in the page
cache, which survives a killed process; :meth:`BlockMap.sync` makes it survive a host
crash (NBD FLUSH/FUA).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Container, Iterator, Mapping
from itertools import groupby
from pathlib import Path
from typing import NamedTuple

import lmdb

from .errors import StateDirError

#: Format 2 added the ``backing`` database, format 3 grouped the entries; maps of
#: formats 1 and 2 (one record per block) are converted when opened.
FORMAT_VERSION = 3
_UPGRADABLE_FORMATS = (b"1", b"2")
MAP_FILE = "map.lmdb"
#: Virtual size of the map; the file is sparse and grows with use (18–26 B per block).
MAP_SIZE = 64 << 30

GROUP_BITS = 4
#: Blocks per LMDB record (the bitmap of a group is 16 bits wide).
GROUP_SIZE = 1 << GROUP_BITS
_SLOT_MASK = GROUP_SIZE - 1
#: A block's group number, as a C-level callable for ``itertools.groupby``.
_group_of = GROUP_BITS.__rrshift__

TIER_NONE = 0
TIER_RAM = 1
TIER_DISK = 2
TIER_REMOTE = 3
#: Tier names by id; a higher id is a slower tier.
TIER_NAMES = {TIER_RAM: "ram", TIER_DISK: "disk", TIER_REMOTE: "remote"}

COMPRESSED = 0x01
SAME_FILLED = 0x02
#: The tier lost the data (e.g. the RAM arena vanished in a reboot): reads fail.
LOST = 0x04
#: The payload holds several pages of the block's group (codec.encode_group); the block's
#: page is the one of slot ``block % GROUP_SIZE``, ``length`` the whole payload's.
GROUPED = 0x08

#: An entry as a 14-byte record: ``addr << 8 | flags << 2 | tier``, length, checksum.
#: A same-filled entry has no length or checksum: its 64-bit word is spread over the
#: address, length and checksum fields (see :meth:`Entry.pack`).
_RECORD = struct.Struct("<QHI")
#: Tier slot addresses fit in 56 bits (remote key ids: a 16-bit epoch, 40-bit sequence).
ADDR_LIMIT = 1 << 56
_TIER_MASK = 0x03
_FLAGS_MASK = 0x3F
#: Formats 1 and 2 stored one 16-byte entry per block: tier, flags, length, checksum, addr.
_OLD_ENTRY = struct.Struct("<BBHIQ")
_BITMAP = struct.Struct("<H")
_unpack_record = _RECORD.unpack_from
#: The sizes as constants: every lookup and every committed change reads them (as the
#: Structs' attributes: 1.0k instructions more a RAM write, 0.4k a read, callgrind).
_RECORD_SIZE, _BITMAP_SIZE = _RECORD.size, _BITMAP.size
#: Builds an :class:`Entry` from a tuple (see :func:`_unpack_entry`).
_new_tuple = tuple.__new__
_KEY_BYTES = 8
#: Database names: grouped entries and clean copies (format 3), per-block ones (1, 2).
_GROUPS = b"groups"
_BACKING_GROUPS = b"backing-groups"
_OLD_BLOCKS = b"blocks"
_OLD_BACKING = b"backing"
_META_FORMAT = b"format"
_META_INSTANCE = b"instance"
_META_SIZE = b"size"
_META_ARENA = b"arena:"
_META_REMOTE_EPOCH = b"remote:epoch"
_META_REMOTE_PREFIX = b"remote:prefix"
_META_DRAIN = b"drain:"


class Entry(NamedTuple):
    """Where one block lives.

    ``addr`` is the tier's slot address; for a same-filled page it is the repeated
    8-byte word (little-endian).  ``tier == TIER_NONE`` without ``SAME_FILLED`` is a
    zero page.
    """

    tier: int
    flags: int
    length: int
    checksum: int
    addr: int

    def pack(self) -> bytes:
        """The 14-byte record of this entry (ValueError for an address beyond 56 bits).
        Every committed change packs one: the fields are unpacked at once (reading
        them by name, a descriptor call each, cost 0.5k instructions a write, callgrind)."""
        tier, flags, length, checksum, addr = self
        head = flags << 2 | tier
        if flags & SAME_FILLED:
            word = addr
            return _RECORD.pack(word >> 48 << 8 | head, word & 0xFFFF, word >> 16 & 0xFFFF_FFFF)
        if not 0 <= addr < ADDR_LIMIT:
            raise ValueError(f"slot address {addr:#x} does not fit the map's 56 bits")
        return _RECORD.pack(addr << 8 | head, length, checksum)

    @staticmethod
    def unpack(value: bytes, offset: int = 0) -> Entry:
        return _unpack_entry(value, offset)

    @property
    def is_stored(self) -> bool:
        """True when a tier holds this block's data (and must free it on replacement)."""
        return self.tier != TIER_NONE and not self.flags & LOST

    @property
    def is_zero(self) -> bool:
        return self.tier == TIER_NONE and not self.flags & SAME_FILLED


ZERO_ENTRY = Entry(TIER_NONE, 0, 0, 0, 0)


def key(number: int) -> bytes:
    """The LMDB key of a group number (or, in formats 1 and 2, of a block number)."""
    return number.to_bytes(_KEY_BYTES, "big")


class BlockMap:
    """The LMDB environment with the grouped entries, clean copies and ``meta``."""

    def __init__(self, env: lmdb.Environment, meta) -> None:
        self._env = env
        self._meta = meta
        self._blocks = env.open_db(_GROUPS, create=True)
        self._backing = env.open_db(_BACKING_GROUPS, create=True)
        self._reader: lmdb.Transaction | None = None

    @classmethod
    def create(cls, path: Path, size: int) -> BlockMap:
        """Create a new map file at ``path`` for an export of ``size`` bytes."""
        env = _open_env(path)
        meta = env.open_db(b"meta", create=True)
        with env.begin(write=True, db=meta) as txn:
            txn.put(_META_FORMAT, str(FORMAT_VERSION).encode())
            txn.put(_META_INSTANCE, str(uuid.uuid4()).encode())
            txn.put(_META_SIZE, str(size).encode())
        env.sync(True)
        return cls(env, meta)

    @classmethod
    def open(cls, path: Path) -> BlockMap:
        """Open an existing map; :class:`StateDirError` if it is not one of ours.

        A map of an older format is converted in one transaction, so a crash during the
        conversion leaves the old map as it was.
        """
        try:
            env = _open_env(path)
        except lmdb.Error as error:
            raise StateDirError(f"{path} is not a usable block map: {error}") from None
        try:
            meta = env.open_db(b"meta", create=False)
            with env.begin(db=meta) as txn:
                version = txn.get(_META_FORMAT)
            if version in _UPGRADABLE_FORMATS:
                _convert_to_groups(env, meta)
            elif version == str(FORMAT_VERSION).encode():
                env.open_db(_GROUPS, create=False)
        except lmdb.Error as error:
            env.close()
            raise StateDirError(f"{path} is not a usable block map: {error}") from None
        if version not in (*_UPGRADABLE_FORMATS, str(FORMAT_VERSION).encode()):
            env.close()
            found = "no format version" if version is None else f"format {version.decode(errors='replace')}"
            raise StateDirError(f"{path} has {found}; this nbdswap reads format {FORMAT_VERSION}")
        return cls(env, meta)

    # --- metadata ---------------------------------------------------------------

    def _get_meta(self, name: bytes) -> bytes | None:
        with self._env.begin(db=self._meta) as txn:
            return txn.get(name)

    def _set_meta(self, name: bytes, value: bytes) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(name, value)

    @property
    def instance_id(self) -> str:
        """A random id fixed at creation (also the remote tier's key prefix)."""
        return self._get_meta(_META_INSTANCE).decode()

    @property
    def size(self) -> int:
        return int(self._get_meta(_META_SIZE))

    @size.setter
    def size(self, size: int) -> None:
        self._set_meta(_META_SIZE, str(size).encode())

    def arena_id(self, tier: str) -> str | None:
        """The id of the arena file ``tier`` wrote its data to, if any."""
        value = self._get_meta(_META_ARENA + tier.encode())
        return None if value is None else value.decode()

    def set_arena_id(self, tier: str, arena_id: str) -> None:
        self._set_meta(_META_ARENA + tier.encode(), arena_id.encode())

    def next_remote_epoch(self) -> int:
        """Start a new epoch of remote key ids (1, 2, ...) and return it.

        Every run with a remote tier allocates its key ids in an epoch of its own, so a
        key of an earlier epoch that the map does not reference is an orphan.
        """
        with self._env.begin(write=True, db=self._meta) as txn:
            epoch = int(txn.get(_META_REMOTE_EPOCH, b"0")) + 1
            txn.put(_META_REMOTE_EPOCH, str(epoch).encode())
        return epoch

    def remote_prefix(self, configured: str) -> str:
        """The key prefix of this map's remote keys: ``configured`` unless the map already
        has remote keys under another one, which it then returns."""
        with self._env.begin(write=True, db=self._meta) as txn:
            stored = txn.get(_META_REMOTE_PREFIX)
            if stored is None:
                txn.put(_META_REMOTE_PREFIX, configured.encode())
                return configured
        return stored.decode()

    def draining(self) -> set[str]:
        """Names of the tiers marked as being drained."""
        with self._env.begin(db=self._meta) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(_META_DRAIN):
                return set()
            return {name[len(_META_DRAIN):].decode() for name in cursor.iternext(values=False)
                    if name.startswith(_META_DRAIN)}

    def set_draining(self, tier: str, draining: bool) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            if draining:
                txn.put(_META_DRAIN + tier.encode(), b"1")
            else:
                txn.delete(_META_DRAIN + tier.encode())

    # --- entries ----------------------------------------------------------------

    def get(self, block: int) -> Entry | None:
        # Every RAM read starts here, so :meth:`_reading` and :func:`key` are written
        # out and the database is passed positionally (py-lmdb parses keyword arguments
        # slowly: 470 ns against 200 ns a lookup, measured).
        reader = self._reader if self._reader is not None else self._reading()
        group = reader.get((block >> GROUP_BITS).to_bytes(_KEY_BYTES, "big"), None, self._blocks)
        return _entry_in(group, block & _SLOT_MASK)

    def get_backing(self, block: int) -> Entry | None:
        """The block's clean copy in a slower tier, if it has one."""
        group = self._reading().get(key(block >> GROUP_BITS), None, self._backing)
        return _entry_in(group, block & _SLOT_MASK)

    def _reading(self) -> lmdb.Transaction:
        """A read transaction shared by lookups until the next commit ends it.

        Beginning one per lookup was a tenth of a RAM read's CPU (py-spy).  The map has
        one writer, :meth:`commit`, so the shared snapshot is current until then.
        """
        if self._reader is None:
            self._reader = self._env.begin()
        return self._reader

    def _end_reading(self) -> None:
        if self._reader is not None:
            self._reader.abort()
            self._reader = None

    def commit(self, changes: Mapping[int, Entry | None],
               backing: Mapping[int, Entry | None] | None = None,
               unread: Container[int] = ()) -> dict[int, Entry | None]:
        """Write all ``changes`` and ``backing`` changes (``None`` deletes) in one
        transaction; returns the entries it replaced of the blocks in ``unread`` (a set:
        it is asked once per change).

        The commit reads each changed group anyway, so a writer that did not look up
        a block's old entry before staging its new one learns it here, without a
        lookup of its own (one per written block was 5–6 % of a RAM write, py-spy).
        """
        try:
            with self._env.begin(write=True) as txn:
                replaced = _apply(txn, self._blocks, changes, unread)
                if backing:
                    _apply(txn, self._backing, backing)
        finally:
            self._end_reading()
        return replaced

    def items(self, first: int = 0, last: int | None = None) -> Iterator[tuple[int, Entry]]:
        """Entries of blocks ``first..last`` (inclusive) in block order.

        The read transaction stays open until the iterator is exhausted or closed, so
        do not hold it across awaits.
        """
        return self._iterate(self._blocks, first, last)

    def backing_items(self, first: int = 0) -> Iterator[tuple[int, Entry]]:
        """Clean copies of blocks ``first..`` in block order (same rules as :meth:`items`)."""
        return self._iterate(self._backing, first)

    def _iterate(self, db, first: int, last: int | None = None) -> Iterator[tuple[int, Entry]]:
        with self._env.begin(db=db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(key(first >> GROUP_BITS)):
                return
            for raw_key, value in cursor:
                base = int.from_bytes(raw_key, "big") << GROUP_BITS
                if last is not None and base > last:
                    return
                for slot, entry in _group_entries(value):
                    if first <= base + slot and (last is None or base + slot <= last):
                        yield base + slot, entry

    def last_block(self) -> int | None:
        """The highest mapped block number, or ``None`` for an empty map."""
        with self._env.begin(db=self._blocks) as txn:
            cursor = txn.cursor()
            if not cursor.last():
                return None
            bitmap = _BITMAP.unpack_from(cursor.value())[0]
            return int.from_bytes(cursor.key(), "big") << GROUP_BITS | bitmap.bit_length() - 1

    def __len__(self) -> int:
        """Mapped blocks (a scan of all groups: for tests and tools, not the I/O path)."""
        with self._env.begin(db=self._blocks) as txn:
            return sum(_BITMAP.unpack_from(value)[0].bit_count() for value in txn.cursor().iternext(keys=False))

    @property
    def bytes(self) -> int:
        """Bytes the map occupies in its file (pages in use × page size)."""
        info = self._env.info()
        return (info["last_pgno"] + 1) * self._env.stat()["psize"]

    def sync(self) -> None:
        """Flush committed transactions to stable storage (blocking; run in a thread)."""
        self._env.sync(True)

    def close(self) -> None:
        self._end_reading()
        self._env.close()


def _open_env(path: Path) -> lmdb.Environment:
    return lmdb.open(
        str(path),
        subdir=False,
        map_size=MAP_SIZE,
        max_dbs=5,
        sync=False,
        metasync=False,
        readahead=False,
        meminit=False,
    )


def _unpack_entry(value: bytes, offset: int) -> Entry:
    """The entry of the 14-byte record at ``offset`` (the one decoder of records).

    Every RAM read decodes one, so the Entry is built with ``tuple.__new__``, skipping
    the Python-level ``__new__`` NamedTuple generates (measured cheaper).
    """
    head, length, checksum = _unpack_record(value, offset)
    tier, flags, high = head & _TIER_MASK, head >> 2 & _FLAGS_MASK, head >> 8
    if flags & SAME_FILLED:
        return _new_tuple(Entry, (tier, flags, 0, 0, high << 48 | checksum << 16 | length))
    return _new_tuple(Entry, (tier, flags, length, checksum, high))


def _entry_in(group: bytes | None, slot: int) -> Entry | None:
    """The entry of ``slot`` in a packed group value, if it has one (the bitmap is read
    as two bytes: cheaper than a struct call on every RAM read, measured)."""
    if group is None:
        return None
    bitmap = group[0] | group[1] << 8  # _BITMAP, little-endian
    if not bitmap >> slot & 1:
        return None
    return _unpack_entry(group, _BITMAP_SIZE + (bitmap & ((1 << slot) - 1)).bit_count() * _RECORD_SIZE)


def _group_entries(group: bytes) -> Iterator[tuple[int, Entry]]:
    """(slot, entry) of a packed group value, in slot order (one generator and one
    decoder call per entry: the start-up rebuild walks every entry)."""
    bitmap = group[0] | group[1] << 8  # _BITMAP, little-endian
    offset = _BITMAP_SIZE
    while bitmap:
        lowest = bitmap & -bitmap
        yield lowest.bit_length() - 1, _unpack_entry(group, offset)
        offset += _RECORD_SIZE
        bitmap ^= lowest


def _pack_group(records: Mapping[int, bytes]) -> bytes:
    """A group value from packed entries by slot."""
    bitmap = 0
    for slot in records:
        bitmap |= 1 << slot
    return _BITMAP.pack(bitmap) + b"".join(records[slot] for slot in sorted(records))


def _apply(txn: lmdb.Transaction, db, changes: Mapping[int, Entry | None],
           unread: Container[int] = ()) -> dict[int, Entry | None]:
    """Apply block changes to the groups they fall in, one read and one write per group,
    in block order (through a cursor of ``db``, whose get and put take positional
    arguments: py-lmdb parses keyword arguments slowly; 2.9k instructions of a RAM
    write, callgrind).  Returns the entries replaced of the blocks in ``unread``.

    A group's changes are the run of sorted blocks in it, so that no dict of lists is
    built per commit; an unread block's old record is read where it is replaced, without
    locating it again (a block is changed once, so edits of the group's other slots
    before it only move its record)."""
    cursor = txn.cursor(db)
    replaced: dict[int, Entry | None] = {}
    for group, blocks in groupby(sorted(changes), _group_of):
        group_key = group.to_bytes(_KEY_BYTES, "big")  # key(group), without the call
        value = cursor.get(group_key)
        edited = value or _EMPTY_GROUP
        for block in blocks:
            entry = changes[block]
            record = None if entry is None else entry.pack()
            old_at, new_group = _edit_record(edited, block & _SLOT_MASK, record)
            if block in unread:
                replaced[block] = None if old_at < 0 else _unpack_entry(edited, old_at)
            edited = new_group
        if edited != _EMPTY_GROUP:
            cursor.put(group_key, edited)
        elif value is not None:
            cursor.delete()
    return replaced


_EMPTY_GROUP = _BITMAP.pack(0)


def _edit_record(group: bytes, slot: int, record: bytes | None) -> tuple[int, bytes]:
    """Where ``slot``'s record starts in ``group`` (-1: it has none), and ``group`` with
    it replaced, added or (``None``) removed, edited as bytes: decoding the group's
    entries for every change doubled a commit's cost.  The caller decodes the old record
    only when it needs the old entry (:func:`_apply`, for an unread block)."""
    bitmap = group[0] | group[1] << 8  # _BITMAP, little-endian
    bit = 1 << slot
    start = _BITMAP_SIZE + (bitmap & (bit - 1)).bit_count() * _RECORD_SIZE
    if bitmap & bit:
        end = start + _RECORD_SIZE
        if record is None:
            return start, _BITMAP.pack(bitmap & ~bit) + group[_BITMAP_SIZE:start] + group[end:]
        return start, group[:start] + record + group[end:]
    if record is None:
        return -1, group
    return -1, _BITMAP.pack(bitmap | bit) + group[_BITMAP_SIZE:start] + record + group[start:]


def _convert_to_groups(env: lmdb.Environment, meta) -> None:
    """Rewrite a format 1 or 2 map (one record per block) in the grouped format 3."""
    with env.begin(write=True) as txn:
        for old_name, new_name in ((_OLD_BLOCKS, _GROUPS), (_OLD_BACKING, _BACKING_GROUPS)):
            old = env.open_db(old_name, txn=txn, create=True)
            new = env.open_db(new_name, txn=txn, create=True)
            _copy_grouped(txn, old, new)
            txn.drop(old, delete=True)
        txn.put(_META_FORMAT, str(FORMAT_VERSION).encode(), db=meta)
    env.sync(True)


def _copy_grouped(txn: lmdb.Transaction, old, new) -> None:
    """Copy per-block records of ``old`` (in block order) into groups of ``new``."""
    group, records = None, {}
    for raw_key, value in txn.cursor(db=old):
        block = int.from_bytes(raw_key, "big")
        if block >> GROUP_BITS != group:
            if records:
                txn.put(key(group), _pack_group(records), db=new)
            group, records = block >> GROUP_BITS, {}
        records[block & _SLOT_MASK] = Entry._make(_OLD_ENTRY.unpack(value)).pack()
    if records:
        txn.put(key(group), _pack_group(records), db=new)
