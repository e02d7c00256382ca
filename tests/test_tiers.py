"""The slab allocator and the RAM and disk tiers."""

import errno
import os
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from nbdswap.errors import NoSpaceError, StoreError
from nbdswap.tiers.disk import DISK_FILE, DiskTier
from nbdswap.tiers.ram import RamTier, arena_path
from nbdswap.tiers.slab import (
    FULLNESS_GROUPS,
    GRANULE,
    HEADER_SIZE,
    SLAB_SIZE,
    SlabAllocator,
    punch_hole,
    SPAN_SIZE,
    size_class,
    slab_slabs,
    slot_bytes,
    slot_size,
    slots_per_slab,
)


@pytest.mark.parametrize(
    ("length", "cls"), [(1, 1), (64, 1), (65, 2), (2368, 37), (2369, 39), (3600, 60), (4033, 64), (4096, 64)]
)
def test_size_class(length, cls):
    assert size_class(length) == cls


@pytest.mark.parametrize("length", [0, -1, 4097])
def test_size_class_rejects_impossible_lengths(length):
    with pytest.raises(ValueError):
        size_class(length)


def test_classes_are_merged_and_waste_little():
    classes = {size_class(length) for length in range(1, 4097)}
    assert len(classes) == 48
    for cls in classes:
        assert SLAB_SIZE - slots_per_slab(cls) * cls * GRANULE <= SLAB_SIZE * 0.025
        # a slot one granule larger would not fit as many times into a slab
        assert cls == 64 or slots_per_slab(cls + 1) < slots_per_slab(cls)


def _slot(addr, length):
    return addr, addr + slot_bytes(size_class(length, large=True))


def _slab_of(addr, length):
    """The slab a payload's slot is in, or the span's first slab, and its size in bytes."""
    unit = slab_slabs(size_class(length, large=True)) * SLAB_SIZE
    return addr // unit * unit // SLAB_SIZE, unit


def assert_filed_by_fullness(allocator: SlabAllocator) -> None:
    """Each partly used slab below the limit is in the fullness group of its use count,
    and only there; a full slab, or one beyond the limit (it only drains), is in none."""
    filed = []
    usage = allocator.slab_usage()
    for cls, groups in enumerate(allocator.partial_groups):
        for index, group in enumerate(groups):
            for slab in group:
                slab_class, used = usage[slab]
                assert slab_class == cls
                assert used * FULLNESS_GROUPS // slots_per_slab(cls) == index
            filed.extend(group)
    partly_used = [slab for slab, (cls, used) in usage.items()
                   if used < slots_per_slab(cls) and slab + slab_slabs(cls) <= allocator.slab_limit]
    assert sorted(filed) == sorted(partly_used)


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocs, frees and rebuilds (some with a smaller capacity) never hand out
    overlapping slots, and a payload goes into the fullest partly used slab of its class."""

    CAPACITY = 6 * SLAB_SIZE
    LARGE = False
    payloads = Bundle("payloads")

    def __init__(self):
        super().__init__()
        self.released = []
        self.capacity = self.CAPACITY
        self.allocator = self._new_allocator()
        self.live = {}  # addr -> length

    def _new_allocator(self):
        return SlabAllocator(self.capacity, on_empty_slab=self.released.append, large=self.LARGE)

    @rule(target=payloads, length=st.one_of(st.integers(1, 4096), st.sampled_from([64, 1000, 4096])))
    def alloc(self, length):
        return self._alloc(length)

    def _alloc(self, length):
        fullest = next((group for group in reversed(self.allocator.partial_groups[size_class(length, True)])
                        if group), None)
        in_use = self.allocator.slab_usage()
        try:
            addr = self.allocator.alloc(length)
        except NoSpaceError:
            assert not self.allocator.has_room(length)
            return None
        assert addr not in self.live
        slab, _ = _slab_of(addr, length)
        assert slab in fullest if fullest else slab not in in_use
        assert _slot(addr, length)[1] <= self.allocator.capacity_bytes  # never beyond the limit
        self.live[addr] = length
        return addr

    @rule(addr=consumes(payloads))
    def free(self, addr):
        if addr is None or addr not in self.live:  # moved by compact(), or freed since
            return
        self.allocator.free(addr, self.live.pop(addr))

    @rule(target=payloads, first=st.integers(1, 15), second=st.integers(1, 15))
    def fill_two_slabs_then_free_some(self, first, second):
        """Slabs of one class at different fill levels, sparse ones among them, which
        the random sizes above hardly ever leave (and compact() has nothing to move)."""
        per_slab = SLAB_SIZE // 4096
        addrs = []
        for _ in range(2 * per_slab):
            try:
                addrs.append(self.allocator.alloc(4096))
            except NoSpaceError:
                break
        kept = addrs[:first] + addrs[per_slab : per_slab + second]
        for addr in addrs:
            if addr in kept:
                self.live[addr] = 4096
            else:
                self.allocator.free(addr, 4096)
        return multiple(*kept)

    @rule(target=payloads)
    def compact(self):
        """Move every payload out of its sparse slab, as the store's compaction does."""
        moved = []
        for addr, length in sorted(self.live.items()):
            new = self.allocator.alloc_fuller(length, addr)
            if new is not None:
                self.allocator.free(addr, self.live.pop(addr))
                self.live[new] = length
                moved.append(new)
        return multiple(*moved)

    @rule(smaller=st.booleans())
    def rebuild(self, smaller):
        """A restart, perhaps with a smaller capacity: slabs beyond it only drain."""
        old_capacity, self.capacity = self.capacity, self.CAPACITY // 2 if smaller else self.CAPACITY
        rebuilt = self._new_allocator()
        for addr, length in random.Random(len(self.live)).sample(sorted(self.live.items()), len(self.live)):
            rebuilt.mark_used(addr, length)
        rebuilt.finish_marking()
        assert (rebuilt.blocks, rebuilt.stored_bytes, rebuilt.used_bytes, rebuilt.slab_bytes) == (
            self.allocator.blocks,
            self.allocator.stored_bytes,
            self.allocator.used_bytes,
            self.allocator.slab_bytes,
        )
        if self.capacity == old_capacity:
            assert rebuilt.partial_groups == self.allocator.partial_groups  # the same slabs are filled next
        self.allocator = rebuilt

    @invariant()
    def slots_do_not_overlap_and_fit(self):
        slots = sorted(_slot(addr, length) for addr, length in self.live.items())
        for (_, end), (start, _) in zip(slots, slots[1:]):
            assert end <= start
        for addr, length in self.live.items():
            start, end = _slot(addr, length)
            _, unit = _slab_of(addr, length)
            assert start // unit == (end - 1) // unit  # never straddles a slab (or span)
            assert end <= self.CAPACITY

    @invariant()
    def partly_used_slabs_are_in_the_group_of_their_fullness(self):
        assert_filed_by_fullness(self.allocator)

    @invariant()
    def counters_match(self):
        allocator = self.allocator
        assert allocator.blocks == len(self.live)
        assert allocator.stored_bytes == sum(self.live.values())
        assert allocator.used_bytes == sum(slot_bytes(size_class(n, True)) for n in self.live.values())
        slabs = dict(_slab_of(addr, length) for addr, length in self.live.items())
        assert allocator.slab_bytes == sum(slabs.values())


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=60, stateful_step_count=80, deadline=None)


class LargeAllocatorMachine(AllocatorMachine):
    """The same with spans of slabs for payloads above 4096 bytes among the pages."""

    CAPACITY = 40 * SLAB_SIZE  # two spans and some slabs; one span when halved
    LARGE = True

    @rule(target=AllocatorMachine.payloads, length=st.integers(4097, 32 * 1024))
    def alloc_large(self, length):
        return self._alloc(length)


TestLargeAllocator = LargeAllocatorMachine.TestCase
TestLargeAllocator.settings = settings(max_examples=40, stateful_step_count=80, deadline=None)


def test_full_allocator_raises_and_recovers():
    allocator = SlabAllocator(2 * SLAB_SIZE)
    addrs = [allocator.alloc(4096) for _ in range(32)]
    assert not allocator.has_room(4096)
    assert not allocator.has_room(64)
    with pytest.raises(NoSpaceError):
        allocator.alloc(64)
    allocator.free(addrs[5], 4096)
    assert allocator.has_room(4050)
    assert not allocator.has_room(100)  # the other slabs are all of the 4096 class
    assert allocator.alloc(4050) == addrs[5]


def test_empty_slab_is_released_and_reused_for_another_class():
    released, reserved = [], []
    allocator = SlabAllocator(SLAB_SIZE, on_new_slab=lambda slab, cls: reserved.append((slab, cls)),
                              on_empty_slab=released.append)
    first = allocator.alloc(4096)
    assert reserved == [(0, size_class(4096))]
    allocator.free(first, 4096)
    assert released == [0]
    assert allocator.slab_bytes == 0
    small = [allocator.alloc(64) for _ in range(1024)]
    assert len(set(small)) == 1024
    assert reserved == [(0, size_class(4096)), (0, size_class(64))]


def test_refused_new_slab_leaves_no_trace():
    def refuse(slab, cls):
        raise NoSpaceError("no memory")

    allocator = SlabAllocator(SLAB_SIZE, on_new_slab=refuse)
    with pytest.raises(NoSpaceError):
        allocator.alloc(100)
    assert (allocator.blocks, allocator.slab_bytes) == (0, 0)


def test_free_and_mark_used_detect_inconsistencies():
    allocator = SlabAllocator(4 * SLAB_SIZE)
    addr = allocator.alloc(1000)
    with pytest.raises(ValueError):
        allocator.free(addr, 64)  # another class
    with pytest.raises(ValueError):
        allocator.free(addr + 1, 1000)  # not a slot boundary
    with pytest.raises(ValueError):
        allocator.free(3 * SLAB_SIZE, 1000)  # unused slab
    in_tailed = allocator.alloc(3000)  # its class's slots leave a tail in the slab
    tail = in_tailed - in_tailed % SLAB_SIZE + slots_per_slab(size_class(3000)) * slot_size(3000)
    assert tail + slot_size(3000) > (in_tailed // SLAB_SIZE + 1) * SLAB_SIZE
    with pytest.raises(ValueError, match="not a slot"):
        allocator.free(tail, 3000)  # aligned to the class, but past the slab's last slot
    with pytest.raises(ValueError):
        allocator.mark_used(addr, 1000)  # recorded twice
    with pytest.raises(ValueError):
        allocator.mark_used(addr + 1024, 64)  # class conflict within the slab
    allocator.free(addr, 1000)
    with pytest.raises(ValueError):
        allocator.free(addr, 1000)  # double free


def test_slabs_beyond_a_reduced_capacity_drain():
    allocator = SlabAllocator(SLAB_SIZE)
    far = 5 * SLAB_SIZE + 2 * 4096
    allocator.mark_used(far, 4096)
    assert allocator.blocks == 1
    allocator.mark_used(far - 4096, 4096)
    addrs = [allocator.alloc(4096) for _ in range(16)]
    assert all(addr < SLAB_SIZE for addr in addrs)
    with pytest.raises(NoSpaceError):
        allocator.alloc(4096)
    allocator.free(far, 4096)
    allocator.free(far - 4096, 4096)
    assert allocator.slab_bytes == SLAB_SIZE
    with pytest.raises(NoSpaceError):
        allocator.alloc(4096)


def test_a_double_free_in_a_slab_still_in_use_is_refused():
    allocator = SlabAllocator(SLAB_SIZE)
    kept, freed = allocator.alloc(1000), allocator.alloc(1000)
    allocator.free(freed, 1000)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(freed, 1000)
    assert (allocator.blocks, allocator.slab_bytes) == (1, SLAB_SIZE)
    allocator.free(kept, 1000)


def test_a_released_slab_below_slabs_in_use_is_taken_again():
    allocator = SlabAllocator(2 * SLAB_SIZE)
    first = [allocator.alloc(4096) for _ in range(16)]
    for _ in range(16):
        allocator.alloc(4096)  # slab 1, full
    for addr in first:
        allocator.free(addr, 4096)
    assert allocator.alloc(64) < SLAB_SIZE  # the released slab, for another class


def test_a_span_fits_below_the_capacity_and_gives_back_all_its_slabs():
    allocator = SlabAllocator(24 * SLAB_SIZE, large=True)
    span = allocator.alloc(10_000)
    with pytest.raises(NoSpaceError):
        allocator.alloc(20_000)  # another class: its span, slabs 16..31, passes the capacity
    assert allocator.slab_bytes == SPAN_SIZE
    allocator.free(span, 10_000)
    pages = [allocator.alloc(4096) for _ in range(24 * 16)]
    assert len({addr // SLAB_SIZE for addr in pages}) == 24


def test_mark_used_refuses_a_span_over_a_slab_of_another_class():
    allocator = SlabAllocator(32 * SLAB_SIZE, large=True)
    allocator.mark_used(3 * SLAB_SIZE, 4096)
    with pytest.raises(ValueError, match="another class"):
        allocator.mark_used(0, 10_000)  # its span, slabs 0..15, holds slab 3


def _slabs_of_pages(counts):
    """An allocator whose slabs 0, 1, ... hold ``counts`` 4096-byte pages (16 fit a slab),
    emptied from the last slab to the first; the addresses per slab."""
    allocator = SlabAllocator(8 * SLAB_SIZE)
    slabs = [[allocator.alloc(4096) for _ in range(16)] for _ in counts]
    for slab, count in reversed(list(zip(slabs, counts))):
        for addr in slab[count:]:
            allocator.free(addr, 4096)
        del slab[count:]
    return allocator, slabs


@pytest.mark.parametrize(("counts", "sparse"), [
    ((2, 9, 12), [True, False, False]),  # at most half used (groups 0 and 1), and the emptiest
    ((5, 2, 12), [False, True, False]),  # an emptier slab goes first
    ((2, 16), [False, False]),  # nowhere to go: the other slab is full
    ((9, 12), [False, False]),  # more than half used
])
def test_sparse_slabs_are_the_emptiest_at_most_half_used_with_somewhere_to_go(counts, sparse):
    allocator, slabs = _slabs_of_pages(counts)
    assert [allocator.in_sparse_slab(slab[0], 4096) for slab in slabs] == sparse


@pytest.mark.parametrize(("counts", "target"), [((2, 12, 12), 1), ((2, 12, 13), 2)])
def test_a_sparse_slab_empties_into_the_fullest_slab_the_lowest_of_equals(counts, target):
    allocator, slabs = _slabs_of_pages(counts)
    assert allocator.alloc_fuller(4096, slabs[0][0]) // SLAB_SIZE == target


def test_payloads_move_only_up_the_order_of_slabs():
    allocator, slabs = _slabs_of_pages((2, 3))
    assert allocator.in_sparse_slab(slabs[1][0], 4096)
    assert allocator.alloc_fuller(4096, slabs[1][0]) is None  # the fullest slab is its own
    allocator, slabs = _slabs_of_pages((2, 2))  # equally full: the lower slab ranks above
    assert allocator.alloc_fuller(4096, slabs[0][0]) is None
    assert allocator.alloc_fuller(4096, slabs[1][0]) // SLAB_SIZE == 0


def test_has_partial_sees_slabs_of_every_fullness():
    allocator, _ = _slabs_of_pages((15,))
    assert allocator.has_partial(4096) and not allocator.has_partial(64)


# --- tiers -----------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path):
    yield tmp_path
    arena_path(tmp_path).unlink(missing_ok=True)


TIER_CLASSES = [RamTier, DiskTier]


def _payloads(count, seed=0):
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([1, 63, 64, 65, 700, 2048, 4095, 4096])) for _ in range(count)]


def _tier_file(tier_class, state_dir):
    return arena_path(state_dir) if tier_class is RamTier else state_dir / DISK_FILE


@pytest.mark.parametrize("tier_class", TIER_CLASSES)
async def test_round_trip_and_reopen(tier_class, state_dir):
    tier = tier_class.open(state_dir, 1 << 20, None)
    assert tier.fresh
    payloads = _payloads(100)
    addrs = [await tier.put(payload) for payload in payloads]
    assert tier.blocks == 100
    assert tier.stored_bytes == sum(map(len, payloads))
    for addr, payload in zip(addrs, payloads):
        assert await tier.get(addr, len(payload)) == payload
    await tier.sync()
    arena_id = tier.arena_id
    tier.close()

    tier = tier_class.open(state_dir, 1 << 20, arena_id)
    assert not tier.fresh and tier.arena_id == arena_id
    for addr, payload in zip(addrs, payloads):
        tier.mark_used(addr, len(payload))
        assert await tier.get(addr, len(payload)) == payload
    tier.finish_marking()
    new = await tier.put(b"x" * 100)
    assert new not in addrs
    tier.close()


@pytest.mark.parametrize("tier_class", TIER_CLASSES)
async def test_foreign_or_missing_arena_is_fresh(tier_class, state_dir):
    tier = tier_class.open(state_dir, 1 << 20, None)
    await tier.put(b"data")
    tier.close()
    other = tier_class.open(state_dir, 1 << 20, "some-other-arena")
    assert other.fresh and other.arena_id != "some-other-arena"
    assert other.blocks == 0
    other.close()
    _tier_file(tier_class, state_dir).unlink()
    again = tier_class.open(state_dir, 1 << 20, other.arena_id)
    assert again.fresh
    again.close()


@pytest.mark.parametrize("tier_class", TIER_CLASSES)
def test_disabled_tier_opens_only_an_existing_arena(tier_class, state_dir):
    assert tier_class.open(state_dir, 0, None) is None
    assert not _tier_file(tier_class, state_dir).exists()
    tier = tier_class.open(state_dir, 1 << 20, None)
    tier.close()
    disabled = tier_class.open(state_dir, 0, tier.arena_id)
    assert disabled.capacity_bytes == 0 and not disabled.has_room(1)
    disabled.mark_used(SLAB_SIZE, 4096)  # data of the earlier capacity stays readable
    disabled.close()


def test_a_closed_disk_tier_writes_into_no_file_that_took_its_descriptor(state_dir, tmp_path):
    tier = DiskTier.open(state_dir, 1 << 20, None)
    tier.put_now(b"x" * 4096)
    number = tier.arena.fd
    tier.close()
    tier.close()  # a second close is harmless
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    try:
        assert other == number  # the lowest free descriptor: the tier's old one
        with pytest.raises(StoreError):
            tier.put_now(b"y" * 4096)
        assert os.fstat(other).st_size == 0
    finally:
        os.close(other)


@pytest.mark.parametrize("tier_class", TIER_CLASSES)
async def test_full_tier_raises_no_space(tier_class, state_dir):
    tier = tier_class.open(state_dir, SLAB_SIZE, None)
    for _ in range(16):
        await tier.put(bytes(4096))
    assert not tier.has_room(4096)
    with pytest.raises(NoSpaceError):
        await tier.put(bytes(4096))
    tier.close()


def test_ram_refuses_a_page_its_memory_has_no_new_slab_for_before_allocating(state_dir, monkeypatch):
    """The store puts written pages without asking has_room first."""
    released = []
    release_slab = RamTier._release_slab
    monkeypatch.setattr(RamTier, "_release_slab", lambda tier, slab: (released.append(slab),
                                                                     release_slab(tier, slab)))
    tier = RamTier.open(state_dir, SLAB_SIZE, None)  # memory for one slab, addresses for more
    for _ in range(15):
        tier.put_now(bytes(4096))
    with pytest.raises(NoSpaceError):
        tier.put_now(bytes(100))  # another class: it would need a new slab
    assert not released and tier.allocator.slab_bytes == SLAB_SIZE  # none taken and given back
    tier.put_now(bytes(4096))  # the partly used slab still takes its class
    tier.close()


@pytest.mark.parametrize("tier_class", TIER_CLASSES)
async def test_mark_used_beyond_the_arena_is_refused(tier_class, state_dir):
    tier = tier_class.open(state_dir, SLAB_SIZE, None)
    with pytest.raises(ValueError):
        tier.mark_used(tier.arena.size, 64)
    tier.close()


@pytest.mark.parametrize("tier_class", TIER_CLASSES)
async def test_emptied_slabs_give_their_storage_back(tier_class, state_dir):
    tier = tier_class.open(state_dir, 64 * SLAB_SIZE, None)
    path = _tier_file(tier_class, state_dir)
    rng = random.Random(3)
    addrs = [await tier.put(rng.randbytes(4096)) for _ in range(16 * 32)]
    await tier.sync()
    full = os.stat(path).st_blocks * 512
    assert full >= 32 * SLAB_SIZE
    for addr in addrs:
        tier.free(addr, 4096)
    assert tier.stats()["slab_bytes"] == 0
    assert os.stat(path).st_blocks * 512 <= HEADER_SIZE + SLAB_SIZE
    tier.close()


async def test_disk_reads_fall_back_to_a_thread(state_dir):
    tier = DiskTier.open(state_dir, 1 << 20, None)
    payloads = _payloads(20, seed=4)
    addrs = [await tier.put(payload) for payload in payloads]
    tier._nowait = False
    for addr, payload in zip(addrs, payloads):
        assert await tier.get(addr, len(payload)) == payload
    tier.close()


def test_ram_arena_name_depends_on_the_state_dir(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert arena_path(first) != arena_path(second)
    assert arena_path(first) == arena_path(tmp_path / "x" / ".." / "a")
    assert arena_path(first).name.startswith("nbdswap-")


# --- failures --------------------------------------------------------------------


def _os_error(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, NoSpaceError), (errno.EIO, StoreError)])
async def test_disk_write_errors_free_the_slot(state_dir, monkeypatch, code, error):
    tier = DiskTier.open(state_dir, 1 << 20, None)
    monkeypatch.setattr(os, "pwrite", _os_error(code))
    with pytest.raises(error):
        await tier.put(b"data")
    assert tier.blocks == 0 and tier.stats()["slab_bytes"] == 0
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: len(data) - 1)
    with pytest.raises(StoreError, match="short write"):
        await tier.put(b"data")
    assert tier.blocks == 0
    tier.close()


async def test_disk_read_and_sync_errors(state_dir, monkeypatch):
    tier = DiskTier.open(state_dir, 1 << 20, None)
    addr = await tier.put(b"payload")
    monkeypatch.setattr(os, "preadv", _os_error(errno.EOPNOTSUPP))
    assert await tier.get(addr, 7) == b"payload"  # through a worker thread
    assert not tier._nowait
    monkeypatch.setattr(os, "pread", _os_error(errno.EIO))
    with pytest.raises(StoreError, match="disk tier read"):
        await tier.get(addr, 7)
    monkeypatch.setattr(os, "pread", lambda fd, length, offset: b"short")
    with pytest.raises(StoreError, match="short read"):
        await tier.get(addr, 7)
    monkeypatch.setattr(os, "fdatasync", _os_error(errno.EIO))
    with pytest.raises(StoreError, match="disk tier sync"):
        await tier.sync()
    tier._nowait = True
    monkeypatch.setattr(os, "preadv", _os_error(errno.EBADF))
    with pytest.raises(StoreError):
        await tier.get(addr, 7)
    tier.close()


@pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, NoSpaceError), (errno.EBADF, OSError)])
async def test_full_shared_memory_is_no_space(state_dir, monkeypatch, code, error):
    tier = RamTier.open(state_dir, 1 << 20, None)
    monkeypatch.setattr(os, "posix_fallocate", _os_error(code))
    with pytest.raises(error):
        await tier.put(b"data")
    assert tier.blocks == 0 and tier.stats()["slab_bytes"] == 0
    tier.close()


def test_failed_hole_punch_is_only_logged(caplog):
    punch_hole(-1, 0, SLAB_SIZE)
    assert "cannot punch a hole" in caplog.text


async def test_disk_read_of_uncached_data_goes_through_a_thread(state_dir, monkeypatch):
    tier = DiskTier.open(state_dir, 1 << 20, None)
    payloads = _payloads(10, seed=5)
    addrs = [await tier.put(payload) for payload in payloads]
    await tier.sync()
    os.posix_fadvise(tier.arena.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the clean pages
    threaded = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda *args: (threaded.append(args), real_pread(*args))[1])
    for addr, payload in zip(addrs, payloads):
        assert await tier.get(addr, len(payload)) == payload
    assert threaded and tier._nowait
    tier.close()


@pytest.mark.parametrize("tier_class", TIER_CLASSES)
def test_truncated_arena_file_is_fresh(tier_class, state_dir):
    tier = tier_class.open(state_dir, 1 << 20, None)
    tier.close()
    os.truncate(_tier_file(tier_class, state_dir), 10)
    again = tier_class.open(state_dir, 1 << 20, tier.arena_id)
    assert again.fresh
    again.close()


def test_misaligned_mark_used_assigns_no_slab():
    allocator = SlabAllocator(4 * SLAB_SIZE)
    with pytest.raises(ValueError):
        allocator.mark_used(SLAB_SIZE + 100, 1000)
    assert allocator.slab_bytes == 0


def test_large_payloads_take_spans_of_slabs_and_waste_little():
    released = []
    allocator = SlabAllocator(64 * SLAB_SIZE, on_empty_slab=released.append, large=True)
    with pytest.raises(ValueError):
        SlabAllocator(SLAB_SIZE).alloc(4097)  # only a large allocator takes them
    lengths = [4097, 10_000, 10_000, 32 * 1024, 700]
    addrs = [allocator.alloc(length) for length in lengths]
    slots = sorted((addr, addr + slot_bytes(size_class(length, large=True))) for addr, length in zip(addrs, lengths))
    assert all(end <= start for (_, end), (start, _) in zip(slots, slots[1:]))  # no overlaps
    assert all(addr // SPAN_SIZE == (addr + length - 1) // SPAN_SIZE for addr, length in zip(addrs, lengths))
    assert addrs[1] // SPAN_SIZE == addrs[2] // SPAN_SIZE  # one span per class
    for length in range(4097, 32 * 1024 + 1, 97):
        cls = size_class(length, large=True)
        assert slot_bytes(cls) - length < 0.03 * length + 256
    rebuilt = SlabAllocator(64 * SLAB_SIZE, large=True)
    for addr, length in zip(addrs, lengths):
        rebuilt.mark_used(addr, length)
    with pytest.raises(ValueError):
        rebuilt.mark_used(addrs[1] + SLAB_SIZE, 500)  # inside a span of another class
    assert (rebuilt.used_bytes, rebuilt.slab_bytes) == (allocator.used_bytes, allocator.slab_bytes)
    allocator.free(addrs[1], 10_000)
    allocator.free(addrs[2], 10_000)
    assert sorted(released) == list(range(addrs[1] // SLAB_SIZE, addrs[1] // SLAB_SIZE + 16))


async def test_ram_spans_cost_the_memory_of_what_they_hold(state_dir):
    """Grouped payloads in RAM take 1 MiB spans of addresses, but memory only for the
    pages written; the capacity bounds that memory, and a restart counts it."""
    tier = RamTier.open(state_dir, 8 * SLAB_SIZE, None)
    rng = random.Random(7)
    small = await tier.put(b"a single page")
    assert tier.stats()["slab_bytes"] == SLAB_SIZE  # its slab, at once
    payloads = [rng.randbytes(10_000) for _ in range(3)]
    addrs = [await tier.put(payload) for payload in payloads]
    assert tier.capacity_bytes == 8 * SLAB_SIZE
    assert SLAB_SIZE + 30_000 <= tier.stats()["slab_bytes"] <= SLAB_SIZE + 32 * 1024  # three slots of a fresh span
    assert os.stat(arena_path(state_dir)).st_blocks * 512 <= HEADER_SIZE + SLAB_SIZE + 32 * 1024
    while tier.has_room(10_000):
        payloads.append(rng.randbytes(10_000))
        addrs.append(await tier.put(payloads[-1]))
    assert tier.used_bytes <= tier.stats()["slab_bytes"] <= tier.capacity_bytes
    assert tier.stats()["slab_bytes"] >= tier.capacity_bytes - 2 * 10_240 - 2 * 4096
    arena_id, reserved = tier.arena_id, tier.stats()["slab_bytes"]
    tier.close()

    tier = RamTier.open(state_dir, 8 * SLAB_SIZE, arena_id)
    for addr, payload in zip(addrs, payloads):
        tier.mark_used(addr, len(payload))
        assert await tier.get(addr, len(payload)) == payload
    tier.mark_used(small, 13)
    tier.finish_marking()
    assert tier.stats()["slab_bytes"] == reserved
    assert not tier.has_room(10_000)
    with pytest.raises(NoSpaceError):
        await tier.put(bytes(4096))  # a new slab of single pages: no memory left
    for addr, payload in zip(addrs, payloads):
        tier.free(addr, len(payload))
    tier.free(small, 13)
    assert tier.stats()["slab_bytes"] == 0
    assert os.stat(arena_path(state_dir)).st_blocks * 512 <= HEADER_SIZE
    tier.close()


def test_sparse_slabs_empty_into_the_fullest_one_and_nothing_moves_back():
    allocator = SlabAllocator(8 * SLAB_SIZE)
    slabs = [[allocator.alloc(4096) for _ in range(16)] for _ in range(3)]
    for slab, keep in zip(slabs, (3, 5, 3)):
        for addr in slab[keep:]:
            allocator.free(addr, 4096)
        del slab[keep:]
    assert [allocator.in_sparse_slab(slab[0], 4096) for slab in slabs] == [True, False, True]
    assert allocator.alloc_fuller(4096, slabs[1][0]) is None
    for addr in slabs[0] + slabs[2]:
        new = allocator.alloc_fuller(4096, addr)
        assert new // SLAB_SIZE == slabs[1][0] // SLAB_SIZE
        allocator.free(addr, 4096)
        assert_filed_by_fullness(allocator)
    assert allocator.slab_bytes == SLAB_SIZE and allocator.blocks == 11
    assert not allocator.in_sparse_slab(slabs[1][0], 4096)  # alone in its class
