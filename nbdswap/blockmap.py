"""The block map: block number → packed location, in LMDB.

It is the single source of truth of the store: every tier allocator and every counter
is rebuilt from it at start-up.

Keys are block numbers as 8-byte big-endian integers, so LMDB's default byte order is
block order (measured as fast as ``integerkey``, and portable).  Values are 16-byte
:class:`Entry` records.  A second database, ``meta``, holds the format version, the
instance id, the export size, the id of each tier's arena file, the remote tier's key
prefix and epoch, and which tiers are being drained.

A third database, ``backing``, holds *clean copies*: block → an entry in a slower tier
whose payload equals the block's current data (kept when a read promoted the block into
RAM).  The store changes a block's entry and its backing in the same transaction, and
any write or trim of the block deletes the backing, so a backing is never stale.

Commits use ``sync=False``/``metasync=False``: a committed transaction is in the page
cache, which survives a killed process; :meth:`BlockMap.sync` makes it survive a host
crash (NBD FLUSH/FUA).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import lmdb

from .errors import StateDirError

#: Format 2 added the ``backing`` database; format 1 maps are upgraded when opened.
FORMAT_VERSION = 2
_READABLE_FORMATS = (b"1", b"2")
MAP_FILE = "map.lmdb"
#: Virtual size of the map; the file is sparse and grows with use (~60 B per entry).
MAP_SIZE = 64 << 30

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

_ENTRY = struct.Struct("<BBHIQ")
_KEY_BYTES = 8
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
        return _ENTRY.pack(self.tier, self.flags, self.length, self.checksum, self.addr)

    @classmethod
    def unpack(cls, value: bytes) -> Entry:
        return cls._make(_ENTRY.unpack(value))

    @property
    def is_stored(self) -> bool:
        """True when a tier holds this block's data (and must free it on replacement)."""
        return self.tier != TIER_NONE and not self.flags & LOST

    @property
    def is_zero(self) -> bool:
        return self.tier == TIER_NONE and not self.flags & SAME_FILLED


ZERO_ENTRY = Entry(TIER_NONE, 0, 0, 0, 0)


def key(block: int) -> bytes:
    return block.to_bytes(_KEY_BYTES, "big")


class BlockMap:
    """The LMDB environment with the ``blocks``, ``backing`` and ``meta`` databases."""

    def __init__(self, env: lmdb.Environment, blocks, meta) -> None:
        self._env = env
        self._blocks = blocks
        self._meta = meta
        self._backing = env.open_db(b"backing", create=True)

    @classmethod
    def create(cls, path: Path, size: int) -> BlockMap:
        """Create a new map file at ``path`` for an export of ``size`` bytes."""
        env = _open_env(path)
        blocks, meta = _open_dbs(env, create=True)
        with env.begin(write=True, db=meta) as txn:
            txn.put(_META_FORMAT, str(FORMAT_VERSION).encode())
            txn.put(_META_INSTANCE, str(uuid.uuid4()).encode())
            txn.put(_META_SIZE, str(size).encode())
        env.sync(True)
        return cls(env, blocks, meta)

    @classmethod
    def open(cls, path: Path) -> BlockMap:
        """Open an existing map; :class:`StateDirError` if it is not one of ours."""
        try:
            env = _open_env(path)
        except lmdb.Error as error:
            raise StateDirError(f"{path} is not a usable block map: {error}") from None
        try:
            blocks, meta = _open_dbs(env, create=False)
            with env.begin(db=meta) as txn:
                version = txn.get(_META_FORMAT)
        except lmdb.Error as error:
            env.close()
            raise StateDirError(f"{path} is not a usable block map: {error}") from None
        if version not in _READABLE_FORMATS:
            env.close()
            found = "no format version" if version is None else f"format {version.decode(errors='replace')}"
            raise StateDirError(f"{path} has {found}; this nbdswap reads format {FORMAT_VERSION}")
        blockmap = cls(env, blocks, meta)
        blockmap._set_meta(_META_FORMAT, str(FORMAT_VERSION).encode())  # older servers must not open it
        return blockmap

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
        with self._env.begin(db=self._blocks) as txn:
            value = txn.get(key(block))
        return None if value is None else Entry.unpack(value)

    def get_backing(self, block: int) -> Entry | None:
        """The block's clean copy in a slower tier, if it has one."""
        with self._env.begin(db=self._backing) as txn:
            value = txn.get(key(block))
        return None if value is None else Entry.unpack(value)

    def commit(self, changes: Mapping[int, Entry | None],
               backing: Mapping[int, Entry | None] | None = None) -> None:
        """Write all ``changes`` and ``backing`` changes (``None`` deletes) in one transaction."""
        with self._env.begin(write=True) as txn:
            _apply(txn, self._blocks, changes)
            if backing:
                _apply(txn, self._backing, backing)

    def items(self, first: int = 0, last: int | None = None) -> Iterator[tuple[int, Entry]]:
        """Entries of blocks ``first..last`` (inclusive) in block order.

        The read transaction stays open until the iterator is exhausted or closed, so
        do not hold it across awaits.
        """
        with self._env.begin(db=self._blocks) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(key(first)):
                return
            for raw_key, value in cursor:
                block = int.from_bytes(raw_key, "big")
                if last is not None and block > last:
                    return
                yield block, Entry.unpack(value)

    def backing_items(self, first: int = 0) -> Iterator[tuple[int, Entry]]:
        """Clean copies of blocks ``first..`` in block order (same rules as :meth:`items`)."""
        with self._env.begin(db=self._backing) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(key(first)):
                return
            for raw_key, value in cursor:
                yield int.from_bytes(raw_key, "big"), Entry.unpack(value)

    def last_block(self) -> int | None:
        """The highest mapped block number, or ``None`` for an empty map."""
        with self._env.begin(db=self._blocks) as txn:
            cursor = txn.cursor()
            return int.from_bytes(cursor.key(), "big") if cursor.last() else None

    def __len__(self) -> int:
        with self._env.begin(db=self._blocks) as txn:
            return txn.stat(self._blocks)["entries"]

    @property
    def bytes(self) -> int:
        """Bytes the map occupies in its file (pages in use × page size)."""
        info = self._env.info()
        return (info["last_pgno"] + 1) * self._env.stat()["psize"]

    def sync(self) -> None:
        """Flush committed transactions to stable storage (blocking; run in a thread)."""
        self._env.sync(True)

    def close(self) -> None:
        self._env.close()


def _open_env(path: Path) -> lmdb.Environment:
    return lmdb.open(
        str(path),
        subdir=False,
        map_size=MAP_SIZE,
        max_dbs=3,
        sync=False,
        metasync=False,
        readahead=False,
        meminit=False,
    )


def _apply(txn: lmdb.Transaction, db, changes: Mapping[int, Entry | None]) -> None:
    for block, entry in changes.items():
        if entry is None:
            txn.delete(key(block), db=db)
        else:
            txn.put(key(block), entry.pack(), db=db)


def _open_dbs(env: lmdb.Environment, *, create: bool):
    return env.open_db(b"blocks", create=create), env.open_db(b"meta", create=create)
