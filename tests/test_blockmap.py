"""The LMDB block map: entries, metadata and persistence."""

import lmdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdswap.blockmap import (
    COMPRESSED,
    LOST,
    SAME_FILLED,
    TIER_DISK,
    TIER_NONE,
    TIER_RAM,
    ZERO_ENTRY,
    BlockMap,
    Entry,
)
from nbdswap.errors import StateDirError

entries = st.builds(
    Entry,
    tier=st.integers(0, 3),
    flags=st.integers(0, 7),
    length=st.integers(0, 4096),
    checksum=st.integers(0, 2**32 - 1),
    addr=st.integers(0, 2**64 - 1),
)


@given(entries)
def test_entry_pack_round_trip(entry):
    packed = entry.pack()
    assert len(packed) == 16
    assert Entry.unpack(packed) == entry


def test_entry_kinds():
    assert ZERO_ENTRY.is_zero and not ZERO_ENTRY.is_stored
    same = Entry(TIER_NONE, SAME_FILLED, 0, 0, 0x0101010101010101)
    assert not same.is_zero and not same.is_stored
    stored = Entry(TIER_RAM, COMPRESSED, 100, 7, 4096)
    assert stored.is_stored and not stored.is_zero
    assert not stored._replace(flags=COMPRESSED | LOST).is_stored


@pytest.fixture
def map_path(tmp_path):
    return tmp_path / "map.lmdb"


def test_new_map_has_metadata(map_path):
    blockmap = BlockMap.create(map_path, 1 << 30)
    assert blockmap.size == 1 << 30
    assert len(blockmap.instance_id) == 36
    assert blockmap.arena_id("ram") is None
    assert len(blockmap) == 0
    assert blockmap.last_block() is None
    blockmap.close()


def test_entries_and_metadata_persist(map_path):
    blockmap = BlockMap.create(map_path, 1 << 30)
    instance = blockmap.instance_id
    entry = Entry(TIER_DISK, COMPRESSED, 1234, 0xDEADBEEF, 65536 + 1280)
    blockmap.commit({7: entry, 8: ZERO_ENTRY})
    blockmap.set_arena_id("ram", "arena-1")
    blockmap.size = 2 << 30
    blockmap.close()

    blockmap = BlockMap.open(map_path)
    assert blockmap.get(7) == entry
    assert blockmap.get(8) == ZERO_ENTRY
    assert blockmap.get(9) is None
    assert blockmap.instance_id == instance
    assert blockmap.arena_id("ram") == "arena-1"
    assert blockmap.size == 2 << 30
    blockmap.close()


def test_commit_deletes_and_overwrites(map_path):
    blockmap = BlockMap.create(map_path, 1 << 30)
    blockmap.commit({1: ZERO_ENTRY, 2: ZERO_ENTRY})
    replacement = Entry(TIER_RAM, 0, 4096, 1, 0)
    blockmap.commit({1: None, 2: replacement, 3: None})
    assert blockmap.get(1) is None
    assert blockmap.get(2) == replacement
    assert len(blockmap) == 1
    blockmap.close()


def test_items_are_in_numeric_block_order(map_path):
    blockmap = BlockMap.create(map_path, 1 << 50)
    blocks = [2**40, 0, 255, 256, 65535, 2**32, 1, 2**32 - 1]
    blockmap.commit({block: Entry(TIER_RAM, 0, 64, block & 0xFFFF, block) for block in blocks})
    assert [block for block, _ in blockmap.items()] == sorted(blocks)
    assert [block for block, _ in blockmap.items(256, 2**32)] == [256, 65535, 2**32 - 1, 2**32]
    assert [entry.addr for _, entry in blockmap.items(3, 300)] == [255, 256]
    assert list(blockmap.items(2**41)) == []
    assert blockmap.last_block() == 2**40
    blockmap.close()


def test_bytes_grows_with_entries(map_path):
    blockmap = BlockMap.create(map_path, 1 << 40)
    empty = blockmap.bytes
    blockmap.commit({block: Entry(TIER_RAM, 0, 64, 0, block * 64) for block in range(10_000)})
    assert blockmap.bytes > empty + 10_000 * 16
    assert blockmap.bytes <= map_path.stat().st_size
    blockmap.close()


def test_sync(map_path):
    blockmap = BlockMap.create(map_path, 1 << 30)
    blockmap.commit({1: ZERO_ENTRY})
    blockmap.sync()
    blockmap.close()


def test_open_rejects_a_file_that_is_not_lmdb(map_path):
    map_path.write_bytes(b"this is not a database" * 1000)
    with pytest.raises(StateDirError, match="not a usable block map"):
        BlockMap.open(map_path)


def test_open_rejects_an_lmdb_file_of_someone_else(map_path):
    env = lmdb.open(str(map_path), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(StateDirError, match="not a usable block map"):
        BlockMap.open(map_path)


def test_open_rejects_another_format_version(map_path):
    BlockMap.create(map_path, 1 << 30).close()
    env = lmdb.open(str(map_path), subdir=False, max_dbs=2)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        txn.put(b"format", b"99")
    env.close()
    with pytest.raises(StateDirError, match="format 99"):
        BlockMap.open(map_path)
