"""The LMDB block map: entries, metadata and persistence."""

import struct
import subprocess
import sys
import textwrap

import lmdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdswap.blockmap import (
    COMPRESSED,
    GROUP_SIZE,
    LOST,
    SAME_FILLED,
    TIER_DISK,
    TIER_NONE,
    TIER_RAM,
    ZERO_ENTRY,
    BlockMap,
    Entry,
    key,
)
from nbdswap.errors import StateDirError

stored_entries = st.builds(
    Entry,
    tier=st.integers(1, 3),
    flags=st.sampled_from([0, COMPRESSED, LOST, COMPRESSED | LOST]),
    length=st.integers(1, 4096),
    checksum=st.integers(0, 2**32 - 1),
    addr=st.integers(0, 2**56 - 1),
)
same_filled_entries = st.builds(Entry, tier=st.just(TIER_NONE), flags=st.just(SAME_FILLED),
                                length=st.just(0), checksum=st.just(0), addr=st.integers(0, 2**64 - 1))
entries = stored_entries | same_filled_entries | st.just(ZERO_ENTRY)


@given(entries)
def test_entry_pack_round_trip(entry):
    packed = entry.pack()
    assert len(packed) == 14
    assert Entry.unpack(packed) == entry


def test_an_address_beyond_56_bits_is_refused():
    with pytest.raises(ValueError, match="56 bits"):
        Entry(TIER_RAM, 0, 64, 0, 2**56).pack()


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


def test_commit_returns_the_entries_it_replaced_of_the_unread_blocks(map_path):
    blockmap = BlockMap.create(map_path, 1 << 30)
    first, second = Entry(TIER_RAM, 0, 4096, 1, 0), Entry(TIER_DISK, COMPRESSED, 700, 2, 8192)
    assert blockmap.commit({1: first, 17: ZERO_ENTRY}, unread={1, 17}) == {1: None, 17: None}
    replaced = blockmap.commit({1: second, 2: first, 17: None, 18: None}, unread={1, 17, 18})
    assert replaced == {1: first, 17: ZERO_ENTRY, 18: None}
    assert blockmap.commit({1: None}) == {}
    assert blockmap.get(2) == first and blockmap.get(1) is None
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


changes = st.dictionaries(st.integers(0, 3 * GROUP_SIZE + 2), st.none() | entries, max_size=20)


@given(st.lists(st.tuples(changes, changes), max_size=8))
def test_grouped_entries_behave_like_a_dict_per_block(tmp_path_factory, commits):
    """Commits that touch blocks inside, across and at the edges of groups read back
    exactly as a plain dict of blocks would, through every accessor, and return the
    entries they replaced of the unread blocks (some of a group's blocks unread, some
    not, so that both ways of editing a group meet in one)."""
    blockmap = BlockMap.create(tmp_path_factory.mktemp("map") / "map.lmdb", 1 << 30)
    model, backing_model = {}, {}
    for block_changes, backing_changes in commits:
        unread = {block for block in block_changes if block % 3}
        replaced = blockmap.commit(block_changes, backing_changes, unread)
        assert replaced == {block: model.get(block) for block in unread}
        for target, applied in ((model, block_changes), (backing_model, backing_changes)):
            for block, entry in applied.items():
                if entry is None:
                    target.pop(block, None)
                else:
                    target[block] = entry
    for block in range(3 * GROUP_SIZE + 3):
        assert blockmap.get(block) == model.get(block)
        assert blockmap.get_backing(block) == backing_model.get(block)
    assert list(blockmap.items()) == sorted(model.items())
    assert list(blockmap.items(5, 2 * GROUP_SIZE)) == sorted(
        (block, entry) for block, entry in model.items() if 5 <= block <= 2 * GROUP_SIZE)
    assert list(blockmap.backing_items(GROUP_SIZE + 1)) == sorted(
        (block, entry) for block, entry in backing_model.items() if block >= GROUP_SIZE + 1)
    assert blockmap.last_block() == max(model, default=None)
    assert len(blockmap) == len(model)
    blockmap.close()


def test_a_full_map_costs_under_24_bytes_per_block(map_path):
    blockmap = BlockMap.create(map_path, 1 << 40)
    empty = blockmap.bytes
    blocks = 100_000
    for first in range(0, blocks, 1000):
        blockmap.commit({block: Entry(TIER_RAM, COMPRESSED, 1000, block, block * 1024)
                         for block in range(first, first + 1000)})
    assert (blockmap.bytes - empty) / blocks <= 24
    blockmap.close()


def _write_format_2_map(path, blocks, backing):
    """A map as format 2 servers wrote it: one 8-byte key and 16-byte entry per block."""
    env = lmdb.open(str(path), subdir=False, max_dbs=3)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"format", b"2", db=meta)
        txn.put(b"instance", b"0" * 36, db=meta)
        txn.put(b"size", str(1 << 30).encode(), db=meta)
        for name, entries_by_block in ((b"blocks", blocks), (b"backing", backing)):
            db = env.open_db(name, txn=txn)
            for block, entry in entries_by_block.items():
                txn.put(key(block), struct.pack("<BBHIQ", *entry), db=db)
    env.close()


def test_a_format_2_map_is_converted_when_opened(map_path):
    blocks = {block: Entry(TIER_RAM, COMPRESSED, 100 + block % 1000, block & 0xFFFF, block * 64)
              for block in [0, 1, 15, 16, 17, 1000, 2**33]}
    backing = {17: Entry(TIER_DISK, COMPRESSED, 117, 17, 4096)}
    _write_format_2_map(map_path, blocks, backing)
    blockmap = BlockMap.open(map_path)
    assert list(blockmap.items()) == sorted(blocks.items())
    assert list(blockmap.backing_items()) == list(backing.items())
    assert blockmap.instance_id == "0" * 36
    blockmap.close()
    env = lmdb.open(str(map_path), subdir=False, max_dbs=5)
    with env.begin() as txn:
        assert txn.get(b"blocks") is None and txn.get(b"backing") is None
        assert txn.get(b"format", db=env.open_db(b"meta", txn=txn)) == b"3"
    env.close()
    blockmap = BlockMap.open(map_path)
    assert blockmap.get(2**33) == blocks[2**33]
    blockmap.close()


FILL_UNTIL_FULL = textwrap.dedent("""
    import sys
    from pathlib import Path
    import lmdb
    from nbdswap.blockmap import GROUP_SIZE, TIER_RAM, BlockMap, Entry

    def entry(block):
        return Entry(TIER_RAM, 0, 100, block & 0xFFFF, block * 128)

    path = Path(sys.argv[1])
    blockmap = BlockMap.create(path, 1 << 40)
    committed = 0
    try:
        while True:  # a new group per change: the map grows by about 34 bytes a change
            blocks = range(committed, committed + 4096 * GROUP_SIZE, GROUP_SIZE)
            blockmap.commit({block: entry(block) for block in blocks})
            committed = blocks.stop
    except lmdb.Error as error:
        print("commit failed:", error)
    blockmap.close()
    blockmap = BlockMap.open(path)
    assert [block for block, _ in blockmap.items()] == list(range(0, committed, GROUP_SIZE))
    blockmap.close()
    print(f"full after {committed // GROUP_SIZE} groups")
""")


def test_a_full_filesystem_fails_the_commit_and_keeps_the_map(small_tmpfs):
    """In a child process: a map whose pages were written through a shared mapping
    (LMDB's ``writemap``) would die of SIGBUS here instead of failing the commit."""
    result = subprocess.run([sys.executable, "-c", FILL_UNTIL_FULL, str(small_tmpfs / "map.lmdb")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "commit failed" in result.stdout
    assert int(result.stdout.split()[-2]) >= 4096 * 4, result.stdout  # 3 MiB held 86k groups
