"""The policy engine: watermarks, promotion, clean copies, drains, through the store and real clients."""

import asyncio
import json
import random
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nbdswap.blockmap import GROUPED, TIER_DISK, TIER_RAM
from nbdswap.config import ConfigError, ServeConfig
from nbdswap.errors import NoSpaceError
from nbdswap.policy import SCAN_LIMIT, Policy, PolicyError, PolicySettings, free_on_read_threshold
from nbdswap.store import BLOCK_SIZE, Store
from nbdswap.tiers.ram import arena_path
from nbdswap.tiers.slab import SLAB_SIZE
from nbdutil import ServerProcess, nbdswap_command, run_client
from test_store import grouped_references, held_references
from redisutil import RedisServer

MiB = 1 << 20


def page(seed: int, kind: str = "text") -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(BLOCK_SIZE)
    words = [b"swap", b"page", b"cold", b"hot", b"tier", rng.randbytes(3)]
    return b" ".join(rng.choice(words) for _ in range(BLOCK_SIZE // 3))[:BLOCK_SIZE]


def open_store(state_dir, ram_max=4 * SLAB_SIZE, disk_max=64 * SLAB_SIZE, size=4 * MiB) -> Store:
    return Store.open(state_dir, size=size, ram_max=ram_max, disk_max=disk_max)


def tier_of(store: Store, block: int) -> int:
    return store.entry(block).tier


async def run_until(policy: Policy, done, steps: int = 500) -> None:
    for _ in range(steps):
        if done():
            return
        await policy.step()
    assert done()


# --- settings -------------------------------------------------------------------------


def test_settings_validate_and_parse():
    settings_ = PolicySettings()
    settings_.set("ram-high", "0.8")
    assert settings_.ram_high == 0.8
    for key, value in [("ram_low", "0.85"), ("promote", "sometimes"), ("free_on_read_disk", "above:101"),
                       ("batch", "0"), ("nonsense", "1"), ("disk_high", "x")]:
        with pytest.raises(PolicyError):
            settings_.set(key, value)
    assert settings_.ram_low == 0.75  # refused changes change nothing
    settings_.set("group_idle_ram", "off")
    assert settings_.group_idle_ram is False
    with pytest.raises(PolicyError, match="on or off"):
        settings_.set("group_idle_ram", "sometimes")
    assert free_on_read_threshold("never") > 1 and free_on_read_threshold("always") == 0
    assert free_on_read_threshold("above:40") == 0.4


def test_policy_from_toml_and_flags(tmp_path):
    config_file = tmp_path / "nbdswap.toml"
    config_file.write_text('size = "1G"\n[policy]\nram_high = 0.7\nram_low = 0.5\npromote = "always"\n')
    config = ServeConfig.load(config_file, {"policy_set": ["ram_low=0.6", "free-on-read-disk=never"]})
    policy = config.policy_settings()
    assert (policy.ram_high, policy.ram_low, policy.promote, policy.free_on_read_disk) == (0.7, 0.6, "always", "never")
    with pytest.raises(ConfigError, match="policy"):
        ServeConfig.load(config_file, {"policy_set": ["ram_low"]})


# --- the store's moves and clean copies ---------------------------------------------------


async def test_promotion_keeps_a_clean_copy_and_demotion_reuses_it(state_dir):
    store = open_store(state_dir)
    await store.write(0, page(1))
    assert await store.move(0, "disk", "demote")
    disk_writes = store.tier("disk").blocks
    assert await store.move(0, "ram", "promote", keep_source=True)
    stats = store.stats()
    assert stats["clean_copies"]["disk"] == 1 and stats["tiers"]["disk"]["blocks"] == 1
    assert await store.move(0, "disk", "demote")
    assert store.stats()["clean_copy_hits"] == 1 and store.tier("disk").blocks == disk_writes
    assert await store.read(0, BLOCK_SIZE) == page(1)
    await store.close()


async def test_a_write_drops_the_clean_copy_so_it_is_never_served(state_dir):
    store = open_store(state_dir)
    await store.write(0, page(1))
    await store.move(0, "disk")
    await store.move(0, "ram", keep_source=True)
    await store.write(0, page(2))
    assert store.stats()["clean_copies"]["disk"] == 0 and store.tier("disk").blocks == 0
    assert await store.move(0, "disk")  # a real copy, not the stale one
    assert store.stats()["clean_copy_hits"] == 0
    assert await store.read(0, BLOCK_SIZE) == page(2)
    await store.write(BLOCK_SIZE, page(3))
    await store.move(1, "disk")
    await store.move(1, "ram", keep_source=True)
    await store.trim(BLOCK_SIZE, BLOCK_SIZE)
    assert store.tier("disk").blocks == 1 and store._map.get_backing(1) is None
    await store.close()


async def test_clean_copies_survive_a_restart_and_replace_a_lost_ram_arena(state_dir):
    store = open_store(state_dir)
    await store.write(0, page(1))
    await store.move(0, "disk")
    await store.move(0, "ram", keep_source=True)
    await store.close()
    store = open_store(state_dir)
    assert store.stats()["clean_copies"]["disk"] == 1
    await store.close()
    arena_path(state_dir).unlink()  # a reboot
    store = open_store(state_dir)
    assert tier_of(store, 0) == TIER_DISK and store.stats()["lost_blocks"] == 0
    assert await store.read(0, BLOCK_SIZE) == page(1)
    await store.close()


def yielding_reads(store: Store) -> None:
    """Tier reads that let other tasks run meanwhile, as a cold disk read or Redis does."""
    for name in ("ram", "disk"):
        tier = store.tier(name)
        get = tier.get

        async def slow_get(addr, length, get=get):
            await asyncio.sleep(0)
            return await get(addr, length)

        tier.get = slow_get


async def test_moves_racing_writes_lose_and_clean_up(state_dir):
    store = open_store(state_dir, ram_max=32 * SLAB_SIZE)
    yielding_reads(store)
    blocks = 64
    expected = {}
    for block in range(blocks):
        expected[block] = page(block)
        await store.write(block * BLOCK_SIZE, expected[block])
    rng = random.Random(5)

    async def writer():
        for round_ in range(400):
            block = rng.randrange(blocks)
            expected[block] = page(1000 + round_, rng.choice(["text", "random"]))
            await store.write(block * BLOCK_SIZE, expected[block])
            await asyncio.sleep(0)

    async def mover():
        for _ in range(800):
            block = rng.randrange(blocks)
            target = rng.choice(["ram", "disk"])
            await store.move(block, target, keep_source=rng.random() < 0.5)

    await asyncio.gather(writer(), mover(), mover())
    for block, data in expected.items():
        assert await store.read(block * BLOCK_SIZE, BLOCK_SIZE) == data
    stats = store.stats()
    assert stats["move_races_lost"] > 0
    stored = sum(1 for _, entry in store._map.items() if entry.is_stored)
    backings = sum(1 for _ in store._map.backing_items())
    assert stats["tiers"]["ram"]["blocks"] + stats["tiers"]["disk"]["blocks"] == stored + backings
    await store.close()


# --- the engine -----------------------------------------------------------------------------


async def test_watermarks_demote_cold_blocks_and_keep_hot_ones(state_dir):
    store = open_store(state_dir, ram_max=8 * SLAB_SIZE)
    policy = Policy(store, PolicySettings(ram_high=0.6, ram_low=0.4, batch=16, moves_per_second=100000,
                                          incompressible_bytes=BLOCK_SIZE))
    hot = range(0, 40)
    for block in range(200):
        await store.write(block * BLOCK_SIZE, page(block, "random"))  # 128 fill RAM
    for _ in range(30):
        for block in hot:
            await store.read(block * BLOCK_SIZE, BLOCK_SIZE)
        await policy.step()
    assert policy._usage("ram") < 0.6
    assert all(tier_of(store, block) == TIER_RAM for block in hot)
    cold_in_ram = sum(tier_of(store, block) == TIER_RAM for block in range(40, 200))
    assert cold_in_ram < 40
    assert store.stats()["moves"]["ram"]["disk"]["demote"] > 0
    await store.close()


async def test_a_demotion_scan_goes_on_at_once_until_it_finds_cold_blocks(state_dir):
    """Over its high watermark a tier's CLOCK hand must sweep the map at once: batches
    that only scanned used to wait ``interval`` each, and demotion began minutes late."""
    store = open_store(state_dir, ram_max=32 * SLAB_SIZE)
    policy = Policy(store, PolicySettings(ram_high=0.5, ram_low=0.4, moves_per_second=10 ** 6))
    for block in range(400):
        await store.write(block * BLOCK_SIZE, page(block, "random"))  # all hot, RAM 78 % full
    assert 400 > SCAN_LIMIT  # the 400 blocks take more than one scan batch
    scan_only = 0
    while not store.move_stats()["moves"]:
        assert await policy.step(), "the engine went idle with RAM above its high watermark"
        scan_only += 1
    assert scan_only >= 3  # three CLOCK passes cool a just-written block
    await run_until(policy, lambda: policy._usage("ram") < 0.4)
    await store.close()


async def test_a_scan_looks_only_at_its_tiers_blocks(state_dir):
    """RAM's CLOCK hand walks RAM's blocks only: it used to read every map entry and
    skip the other tiers', which cost 22-23 us of CPU (and 1/16 of a move's budget each)
    per RAM block found when RAM held 6 % of the map's blocks."""
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    in_ram = set(range(0, 1000, 10))
    for block in range(1000):
        await store.write(block * BLOCK_SIZE, page(block))
        if block not in in_ram:
            await store.move(block, "disk")
    store.heat[:] = bytes(len(store.heat))
    policy = Policy(store, PolicySettings(ram_high=0.0, ram_low=0.0, batch=SCAN_LIMIT))
    assert policy._over_watermark("ram", starting=True)
    found = [block for block, *_ in policy._demotion_work("ram")]
    assert found == sorted(in_ram)
    assert policy._scanned == len(in_ram)
    await store.close()


async def test_cold_neighbours_are_demoted_in_one_grouped_payload(state_dir):
    store = open_store(state_dir)
    policy = Policy(store, PolicySettings(ram_high=0.02, ram_low=0.01, batch=2, moves_per_second=10 ** 6))
    data = b"".join(page(seed) for seed in range(32))
    await store.write(0, data)
    store.heat[:] = bytes(len(store.heat))
    store.heat[20] = store.heat[21] = 3  # hot: they stay in RAM while the hand passes them
    await policy.step()  # blocks 0 and 1, and the rest of their group as companions
    await policy.step()  # 16 and 17, with the cold ones of their group
    assert [tier_of(store, block) for block in range(32)] == [TIER_DISK] * 20 + [TIER_RAM] * 2 + [TIER_DISK] * 10
    disk = store.stats()["tiers"]["disk"]
    assert (disk["grouped_payloads"], disk["grouped_blocks"], disk["blocks"]) == (2, 30, 30)
    assert {store.entry(block).addr for block in range(16)} != {store.entry(block).addr for block in range(16, 32)}
    assert store.move_stats()["moves"] == {"ram": {"disk": {"demote": 30}}}
    assert await store.read(0, len(data)) == data
    await store.close()


async def test_idle_ram_pages_are_grouped_in_place(state_dir):
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    policy = Policy(store, PolicySettings(batch=32, moves_per_second=10 ** 6, group_idle_ram=False))
    data = b"".join(page(seed) for seed in range(48))
    await store.write(0, data)
    single = store.stats()["tiers"]["ram"]
    store.heat[:] = bytes(len(store.heat))
    store.heat[20] = store.heat[21] = 3  # read lately: they stay pages of their own
    await policy.step()
    assert store.move_stats()["moves"] == {}  # switched off
    policy.set("group_idle_ram", "on")
    await run_until(policy, lambda: store.stats()["tiers"]["ram"].get("grouped_blocks") == 46)
    ram = store.stats()["tiers"]["ram"]
    assert (ram["grouped_payloads"], ram["blocks"]) == (3, 48)
    assert ram["stored_bytes"] < 0.9 * single["stored_bytes"]
    assert store.move_stats()["moves"] == {"ram": {"ram": {"regroup": 46}}}
    assert all(tier_of(store, block) == TIER_RAM for block in range(48))
    assert not store.entry(20).flags & GROUPED and store.entry(19).flags & GROUPED
    assert await store.read(0, len(data)) == data
    await store.close()

    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)  # the shared-memory arena kept them
    assert store.stats()["tiers"]["ram"]["grouped_blocks"] == 46
    assert await store.read(0, len(data)) == data
    await store.write(0, page(99))  # a rewrite leaves its group; the group stays for the others
    assert await store.read(0, BLOCK_SIZE) == page(99)
    assert await store.read(BLOCK_SIZE, len(data) - BLOCK_SIZE) == data[BLOCK_SIZE:]
    assert store.stats()["tiers"]["ram"]["grouped_blocks"] == 45
    await store.close()


async def test_idle_work_waits_while_the_device_is_busy(state_dir):
    """Grouping idle pages only gives memory back: it waits while requests come faster
    than IDLE_WORK_MAX_REQUEST_RATE, and starts once they slow down."""
    from nbdswap.policy import IDLE_WORK_MAX_REQUEST_RATE, LOAD_WINDOW

    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    served = [0]
    policy = Policy(store, PolicySettings(batch=32, moves_per_second=10 ** 6), lambda: served[0])
    await store.write(0, b"".join(page(seed) for seed in range(48)))
    store.heat[:] = bytes(len(store.heat))
    for _ in range(5):
        await asyncio.sleep(LOAD_WINDOW)
        served[0] += IDLE_WORK_MAX_REQUEST_RATE * 100  # busy unless a step took 100 s
        await policy.step()
    assert store.move_stats()["moves"] == {}
    await asyncio.sleep(LOAD_WINDOW)  # no request meanwhile
    await run_until(policy, lambda: store.stats()["tiers"]["ram"].get("grouped_blocks") == 48)
    await store.close()


async def test_sparse_ram_slabs_are_repacked_and_give_their_memory_back(state_dir):
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    policy = Policy(store, PolicySettings(batch=64, moves_per_second=10 ** 6))
    pages = {block: page(block, "random") for block in range(160)}  # incompressible: never grouped
    await store.write(0, b"".join(pages.values()))
    assert store.stats()["tiers"]["ram"]["slab_bytes"] == 10 * SLAB_SIZE  # 16 pages per slab
    for block in range(160):
        if block % 4:
            await store.trim(block * BLOCK_SIZE, BLOCK_SIZE)
            del pages[block]
    assert store.stats()["tiers"]["ram"]["slab_bytes"] == 10 * SLAB_SIZE  # each a quarter used
    await run_until(policy, lambda: store.stats()["tiers"]["ram"]["slab_bytes"] == 3 * SLAB_SIZE)
    assert store.move_stats()["moves"]["ram"]["ram"]["repack"] >= 24
    for _ in range(20):
        await policy.step()  # settled: nothing moves back and forth
    assert store.stats()["tiers"]["ram"]["slab_bytes"] == 3 * SLAB_SIZE
    moves = store.move_stats()["moves"]["ram"]["ram"]["repack"]
    await policy.step()
    assert store.move_stats()["moves"]["ram"]["ram"]["repack"] == moves
    for block, data in pages.items():
        assert await store.read(block * BLOCK_SIZE, BLOCK_SIZE) == data
    await store.close()
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    for block, data in pages.items():
        assert await store.read(block * BLOCK_SIZE, BLOCK_SIZE) == data
    await store.close()


async def test_a_grouped_payload_is_repacked_with_every_entry_pointing_at_it(state_dir):
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    rng = random.Random(4)
    shared = rng.randbytes(150)  # neighbours with something in common: worth grouping
    data = b"".join(shared + rng.randbytes(100) + bytes(BLOCK_SIZE - 250) for _ in range(16))
    await store.write(0, data)
    assert await store.move_group(range(16), "ram", "regroup") == 16
    grouped, ram = store.entry(0), store.tier("ram")
    assert grouped.flags & GROUPED and grouped.length <= 4096  # a small class: 64 KiB slabs
    others = [ram.put_now(bytes(grouped.length)) for _ in range(40)]  # fill its slab, start another
    same_slab = [addr for addr in others if addr // SLAB_SIZE == grouped.addr // SLAB_SIZE]
    for addr in same_slab[3:]:
        ram.free(addr, grouped.length)  # its slab is left a few slots used: sparse
    assert ram.in_sparse_slab(grouped.addr, grouped.length)
    assert await store.repack(5) == 16
    moved = store.entry(0)
    assert moved.addr // SLAB_SIZE != grouped.addr // SLAB_SIZE
    assert all(store.entry(block) == moved._replace(checksum=store.entry(block).checksum) for block in range(16))
    assert held_references(store) == grouped_references(store) \
        == {(TIER_RAM, moved.addr): 16}
    assert store.move_stats()["moves"]["ram"]["ram"]["repack"] == 16
    assert await store.repack(5) == 0  # its new slab is not sparse
    assert await store.read(0, len(data)) == data
    await store.close()


async def test_pages_that_group_no_smaller_stay_where_they_are_unless_they_move(state_dir):
    """Map neighbours with nothing in common (pages written in random order) are not
    grouped in place: it saved 0.1 % while the new payloads' slabs inflated the RAM
    tier's memory.  A demotion still groups them: they move anyway."""
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    rng = random.Random(4)
    unrelated = b"".join(rng.randbytes(1000) + bytes(BLOCK_SIZE - 1000) for _ in range(16))
    await store.write(0, unrelated)
    before = [store.entry(block) for block in range(16)]
    slabs = store.stats()["tiers"]["ram"]["slab_bytes"]
    assert await store.move_group(range(16), "ram", "regroup") == 0
    assert [store.entry(block) for block in range(16)] == before
    assert store.stats()["tiers"]["ram"]["slab_bytes"] == slabs
    related = b"".join(unrelated[:1000] + bytes([block]) * 8 + bytes(BLOCK_SIZE - 1008) for block in range(16))
    await store.write(16 * BLOCK_SIZE, related)
    assert await store.move_group(range(16, 32), "ram", "regroup") == 16
    assert await store.move_group(range(16), "disk", "demote") == 16
    assert len({(store.entry(block).tier, store.entry(block).addr) for block in range(16)}) == 1
    assert await store.read(0, 32 * BLOCK_SIZE) == unrelated + related
    await store.close()


async def test_groups_that_stayed_apart_are_not_offered_again_until_touched(state_dir, monkeypatch):
    """Refused groups used to be compressed and refused again on every pass, and the
    engine, busy whenever it had jobs, never went idle (9 % of a core on 4,096 pages)."""
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    rng = random.Random(5)
    await store.write(0, b"".join(rng.randbytes(1000) + bytes(BLOCK_SIZE - 1000) for _ in range(64)))
    store.heat[:] = bytes(len(store.heat))
    policy = Policy(store, PolicySettings(moves_per_second=10 ** 6))
    offered = []
    move_group = store.move_group

    async def counting(blocks, *args):
        offered.append(min(blocks) >> 4)
        return await move_group(blocks, *args)

    monkeypatch.setattr(store, "move_group", counting)
    for _ in range(20):
        if not await policy.step():
            break
    else:
        pytest.fail("the engine never went idle")
    for _ in range(10):  # further passes of the hand
        assert not await policy.step()
    assert sorted(offered) == [0, 1, 2, 3] and store.stats()["tiers"]["ram"]["grouped_payloads"] == 0
    await store.write(16 * BLOCK_SIZE, rng.randbytes(1000) + bytes(BLOCK_SIZE - 1000))  # group 1 changes
    for _ in range(40):
        await policy.step()
    assert sorted(offered) == [0, 1, 1, 2, 3]  # once it cooled down again
    await store.close()


async def test_ram_is_not_grouped_while_it_is_demoted(state_dir):
    store = open_store(state_dir, ram_max=8 * SLAB_SIZE)
    policy = Policy(store, PolicySettings(ram_high=0.3, ram_low=0.2, batch=8, moves_per_second=10 ** 6))
    await store.write(0, b"".join(page(seed, "random") for seed in range(64)))
    store.heat[:] = bytes(len(store.heat))
    await run_until(policy, lambda: policy._usage("ram") < 0.2)
    moves = store.move_stats()["moves"]
    assert moves["ram"]["disk"]["demote"] > 0 and "ram" not in moves["ram"]
    await store.close()


async def test_promotion_rules(state_dir):
    store = open_store(state_dir)
    policy = Policy(store, PolicySettings(promote="second", moves_per_second=100000))
    for block in range(3):
        await store.write(block * BLOCK_SIZE, page(block))
        await store.move(block, "disk")
    await store.read(0, BLOCK_SIZE)
    await policy.step()
    assert tier_of(store, 0) == TIER_DISK  # one read is not enough
    await store.read(0, BLOCK_SIZE)
    await policy.step()
    assert tier_of(store, 0) == TIER_RAM
    assert store.stats()["clean_copies"]["disk"] == 1  # disk far below 75 %: kept
    policy.set("promote", "always")
    policy.set("free_on_read_disk", "always")
    await store.read(BLOCK_SIZE, BLOCK_SIZE)
    await policy.step()
    assert tier_of(store, 1) == TIER_RAM and store.stats()["clean_copies"]["disk"] == 1
    policy.set("promote", "never")
    for _ in range(3):
        await store.read(2 * BLOCK_SIZE, BLOCK_SIZE)
    await policy.step()
    assert tier_of(store, 2) == TIER_DISK
    await policy.stop()
    await store.close()


async def test_incompressible_pages_skip_ram(state_dir):
    store = open_store(state_dir)
    Policy(store, PolicySettings(incompressible_bytes=3584))
    await store.write(0, page(1, "random"))
    await store.write(BLOCK_SIZE, page(2))
    assert (tier_of(store, 0), tier_of(store, 1)) == (TIER_DISK, TIER_RAM)
    store.set_draining("disk", True)
    await store.write(2 * BLOCK_SIZE, page(3, "random"))  # RAM is still better than ENOSPC
    assert tier_of(store, 2) == TIER_RAM
    await store.close()


async def test_drain_moves_everything_resumes_after_restart_and_undrain(state_dir):
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    policy = Policy(store, PolicySettings(batch=8, moves_per_second=100000))
    for block in range(100):
        await store.write(block * BLOCK_SIZE, page(block))
    await store.move(5, "disk")
    await store.move(5, "ram", keep_source=True)  # a clean copy on disk
    for block in range(50):
        await store.move(block, "disk")
    await store.move(60, "disk")
    await store.move(60, "ram", keep_source=True)
    assert policy.drain("ram")["state"] == "draining"
    await policy.step()
    await store.close()  # interrupted
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE)
    policy = Policy(store, PolicySettings(batch=8, moves_per_second=100000))
    await run_until(policy, lambda: policy.stats()["drains"]["ram"]["state"] == "drained")
    assert store.tier("ram").blocks == 0
    await store.write(0, page(7))
    assert tier_of(store, 0) == TIER_DISK  # a drained tier takes nothing new
    policy.undrain("ram")
    await store.write(0, page(8))
    assert tier_of(store, 0) == TIER_RAM
    for block in range(1, 100):
        assert await store.read(block * BLOCK_SIZE, BLOCK_SIZE) == page(block)
    await store.close()


async def test_drain_without_room_changes_nothing(state_dir):
    store = open_store(state_dir, ram_max=64 * SLAB_SIZE, disk_max=2 * SLAB_SIZE)
    for block in range(100):
        await store.write(block * BLOCK_SIZE, page(block, "random"))
    policy = Policy(store)
    with pytest.raises(PolicyError, match="cannot drain ram"):
        policy.drain("ram")
    assert not store.draining and store.tier("ram").blocks > 0
    with pytest.raises(PolicyError, match="no tier named"):
        policy.drain("remote")
    await store.close()


async def test_a_drain_whose_first_target_fills_goes_on_to_the_next(state_dir, redis):
    """Each batch checks its targets' room before its moves compete for it; a move that
    finds the disk full must send the rest of the drain to Redis, not stop it.  Progress
    counts blocks, a grouped payload as the blocks it holds."""
    from test_remote import settings

    store = Store.open(state_dir, size=16 * MiB, ram_max=64 * SLAB_SIZE, disk_max=8 * SLAB_SIZE,
                       remote=settings(redis.url))
    policy = Policy(store, PolicySettings(batch=32, moves_per_second=10 ** 6))
    pages = {block: page(block, "random" if block % 2 else "text") for block in range(600)}
    for block, data in pages.items():
        await store.write(block * BLOCK_SIZE, data)
    assert await store.move_group(range(0, 16, 2), "ram", "regroup") == 8  # one payload, 8 blocks
    assert policy.drain("ram")["total_blocks"] == 600  # blocks, not payloads
    await run_until(policy, lambda: policy.stats()["drains"]["ram"]["state"] != "draining", steps=2000)
    drain = policy.stats()["drains"]["ram"]
    assert (drain["state"], drain["error"], drain["moved_blocks"]) == ("drained", None, 600)
    tiers = store.stats()["tiers"]
    assert tiers["ram"]["blocks"] == 0 and tiers["disk"]["blocks"] > 0 and tiers["remote"]["blocks"] > 0
    for block, data in pages.items():
        assert await store.read(block * BLOCK_SIZE, BLOCK_SIZE) == data
    await store.close()


# --- a model of everything ----------------------------------------------------------------


class PolicyModel(RuleBasedStateMachine):
    """Writes, reads, trims, moves, policy steps, drains, watermark changes and restarts
    against a dict: the store always reads as the dict says."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        self.state_dir = f"{self.tmp.name}/state"
        self.loop = asyncio.new_event_loop()
        self.model: dict[int, bytes] = {}
        self.grouped = 0  # the most grouped payloads seen at once
        self.settings = PolicySettings(ram_high=0.5, ram_low=0.3, batch=8, moves_per_second=10 ** 6,
                                       promote="always", incompressible_bytes=4000)
        self._open()

    def _open(self):
        self.store = Store.open(self.state_dir, size=64 * BLOCK_SIZE, ram_max=4 * SLAB_SIZE,
                                disk_max=32 * SLAB_SIZE)
        self.policy = Policy(self.store, self.settings)

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    blocks = st.integers(0, 63)

    @rule(block=blocks, seed=st.integers(0, 50), kind=st.sampled_from(["text", "random", "zero"]))
    def write(self, block, seed, kind):
        data = bytes(BLOCK_SIZE) if kind == "zero" else page(seed, kind)
        try:
            self.run(self.store.write(block * BLOCK_SIZE, data))
        except NoSpaceError:
            return  # every tier that takes blocks is full: the block keeps its old data
        self.model[block] = data

    @rule(block=blocks, count=st.integers(2, 16), seed=st.integers(0, 50))
    def write_run(self, block, count, seed):
        """Neighbouring blocks written together (a swap-out cluster): candidates for a group."""
        pages = [page(seed + index) for index in range(min(count, 64 - block))]
        try:
            self.run(self.store.write(block * BLOCK_SIZE, b"".join(pages)))
        except NoSpaceError:
            return  # a failed write stores none of its blocks
        self.model.update(zip(range(block, block + len(pages)), pages))

    @rule(block=blocks)
    def read(self, block):
        assert self.run(self.store.read(block * BLOCK_SIZE, BLOCK_SIZE)) == self.model.get(block, bytes(BLOCK_SIZE))

    @rule(block=blocks, count=st.integers(1, 4))
    def trim(self, block, count):
        self.run(self.store.trim(block * BLOCK_SIZE, count * BLOCK_SIZE))
        for trimmed in range(block, min(block + count, 64)):
            self.model.pop(trimmed, None)

    @rule(block=blocks, tier=st.sampled_from(["ram", "disk"]), keep=st.booleans())
    def move(self, block, tier, keep):
        try:
            self.run(self.store.move(block, tier, keep_source=keep))
        except NoSpaceError:
            pass  # the target is full (a small disk tier has room for two spans of grouped payloads)

    @rule(steps=st.integers(1, 5))
    def step(self, steps):
        for _ in range(steps):
            self.run(self.policy.step())

    @rule(steps=st.integers(1, 10))
    def cold_demotion(self, steps):
        """Every block cold and RAM above its watermark: the CLOCK demotes groups to disk."""
        self.store.heat[:] = bytes(len(self.store.heat))
        self.policy.set("ram_low", 0.01)
        self.policy.set("ram_high", 0.02)
        for _ in range(steps):
            self.run(self.policy.step())

    @rule(steps=st.integers(1, 10))
    def idle_grouping(self, steps):
        """Every block cold and RAM below its watermarks: the CLOCK groups idle RAM pages in place."""
        self.store.heat[:] = bytes(len(self.store.heat))
        self.policy.set("ram_high", 1.0)
        self.policy.set("ram_low", 0.99)
        for _ in range(steps):
            self.run(self.policy.step())

    @rule(tier=st.sampled_from(["ram", "disk"]))
    def drain(self, tier):
        try:
            self.policy.drain(tier)
        except PolicyError:
            pass

    @rule(tier=st.sampled_from(["ram", "disk"]))
    def undrain(self, tier):
        self.policy.undrain(tier)

    @rule(high=st.floats(0.2, 1.0), gap=st.floats(0.05, 0.15))
    def watermarks(self, high, gap):
        self.policy.set("ram_low", 0.01)
        self.policy.set("ram_high", high)
        self.policy.set("ram_low", max(high - gap, 0.01))

    @rule()
    def restart(self):
        self.run(self.store.close())
        self._open()

    @invariant()
    def counters_match_the_map(self):
        stored = sum(1 for _, entry in self.store._map.items() if entry.is_stored)
        backings = sum(1 for _ in self.store._map.backing_items())
        if self.store._batch is None:
            tiers = self.store.stats()["tiers"]
            assert tiers["ram"]["blocks"] + tiers["disk"]["blocks"] == stored + backings
            assert held_references(self.store) == grouped_references(self.store)
            self.grouped = max(self.grouped, tiers["disk"]["grouped_payloads"] + tiers["ram"]["grouped_payloads"])

    def teardown(self):
        for block in range(64):
            assert self.run(self.store.read(block * BLOCK_SIZE, BLOCK_SIZE)) == self.model.get(block, bytes(BLOCK_SIZE))
        self.run(self.store.close())
        self.loop.close()
        arena_path(self.state_dir).unlink(missing_ok=True)
        self.tmp.cleanup()


TestPolicyModel = PolicyModel.TestCase
TestPolicyModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


# --- real clients, real Redis -----------------------------------------------------------------


def nbdswap(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(nbdswap_command() + list(args), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"nbdswap {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_drain_disk_to_redis_empties_it_and_every_byte_reads_back(tmp_path, redis):
    """The issue's check: data through a real client, `nbdswap drain disk` with a Redis tier."""
    workdir = tmp_path / "srv"
    workdir.mkdir()
    server = ServerProcess(workdir, size="64M", ram_max="1M", disk_max="256M",
                           extra=("--remote", redis.url)).start()
    try:
        source = tmp_path / "source.img"
        rng = random.Random(3)
        source.write_bytes(b"".join(page(index, "random") if index % 3 else rng.randbytes(512) * 8
                                    for index in range(32 * MiB // BLOCK_SIZE)))
        run_client(["nbdcopy", str(source), server.uri])
        assert server.status()["tiers"]["disk"]["blocks"] > 4000
        state = str(server.state_dir)
        result = nbdswap("drain", "disk", "--state-dir", state)
        assert "drained" in result.stdout
        status = server.status()
        assert status["tiers"]["disk"]["blocks"] == 0
        assert status["policy"]["drains"]["disk"]["state"] == "drained"
        assert status["draining"] == ["disk"]
        back = tmp_path / "back.img"
        run_client(["nbdcopy", server.uri, str(back)])
        assert back.read_bytes() == source.read_bytes() + bytes(32 * MiB)
        assert server.status()["tiers"]["disk"]["blocks"] == 0  # reads promote to RAM, never to disk
        nbdswap("undrain", "disk", "--state-dir", state)
        assert server.status()["draining"] == []
    finally:
        server.cleanup()


def test_drain_refuses_without_room_and_policy_show_set(server_factory):
    server = server_factory(size="64M", ram_max="1M", disk_max="64M")
    source = server.workdir / "data.img"
    source.write_bytes(b"".join(page(index, "random") for index in range(8 * MiB // BLOCK_SIZE)))
    run_client(["nbdcopy", str(source), server.uri])
    state = str(server.state_dir)
    result = nbdswap("drain", "disk", "--state-dir", state, check=False)
    assert result.returncode == 2 and "cannot drain disk" in result.stderr and "nothing was changed" in result.stderr
    assert server.status()["draining"] == []
    shown = json.loads(nbdswap("policy", "show", "--state-dir", state).stdout)
    assert shown["ram_high"] == 0.9 and shown["promote"] == "second"
    nbdswap("policy", "set", "ram_low", "0.4", "--state-dir", state)
    changed = json.loads(nbdswap("policy", "set", "ram_high", "0.5", "--state-dir", state).stdout)
    assert changed["ram_high"] == 0.5
    refused = nbdswap("policy", "set", "ram_high", "2", "--state-dir", state, check=False)
    assert refused.returncode == 2 and "watermarks" in refused.stderr
    policy = server.status()["policy"]
    assert policy["watermarks"]["ram"]["high"] == 0.5 and "move_rates" in policy


def test_drain_under_live_fio_verify_load(server_factory):
    server = server_factory(size="128M", ram_max="8M", disk_max="256M")
    fio = threading.Thread(target=lambda: results.append(run_client([
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite",
        "--bs=4k", "--iodepth=16", "--size=48M", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--buffer_compress_percentage=60",
        "--buffer_compress_chunk=4096", "--refill_buffers", "--output-format=json"], check=False)))
    results: list[subprocess.CompletedProcess] = []
    fio.start()
    time.sleep(1.5)
    drained = nbdswap("drain", "ram", "--state-dir", str(server.state_dir), check=False)
    fio.join(300)
    (result,) = results
    assert result.returncode == 0, result.stderr.decode()
    job = json.loads(result.stdout[result.stdout.index(b"{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 48 * MiB
    assert drained.returncode == 0, drained.stderr
    assert server.status()["tiers"]["ram"]["blocks"] == 0
