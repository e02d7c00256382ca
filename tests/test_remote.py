"""The remote tier against real Redis servers: standalone, a 3-master Cluster, outages."""

import asyncio
import random
import re
import signal
import subprocess
import time

import pytest
from redis.crc import key_slot

from nbdswap.blockmap import GROUPED, TIER_DISK, TIER_RAM, TIER_REMOTE
from nbdswap.codec import encode
from nbdswap.config import ConfigError, ServeConfig
from nbdswap.errors import CorruptBlockError, NoSpaceError, StateDirError, TierUnavailableError
from nbdswap.store import BLOCK_SIZE, Store
from nbdswap.tiers.remote import SEGMENT_BITS, RemoteSettings, RemoteTier
from nbdswap.tiers.slab import SLAB_SIZE
from nbdutil import ServerProcess, nbdsh, run_client
from redisutil import RedisClusterNodes, RedisSentinelNode, RedisServer

MiB = 1 << 20
#: Raw (incompressible) pages fill a 64 KiB slab after this many.
PAGES_PER_SLAB = SLAB_SIZE // BLOCK_SIZE


def pages(count: int, seed: int) -> list[bytes]:
    """Incompressible pages: each takes a whole 4 KiB payload."""
    rng = random.Random(seed)
    return [rng.randbytes(BLOCK_SIZE) for _ in range(count)]


def swap_like(size: int, seed: int) -> bytes:
    """Zero, compressible and random pages in turn (quick to make in bulk)."""
    rng = random.Random(seed)
    kinds = [lambda: bytes(BLOCK_SIZE), lambda: rng.randbytes(256) * 16, lambda: rng.randbytes(BLOCK_SIZE)]
    return b"".join(kinds[index % 3]() for index in range(size // BLOCK_SIZE))


def settings(url: str, **options) -> RemoteSettings:
    """Short timeouts, so that outages are decided in a fraction of a second."""
    defaults = dict(timeout=0.5, command_timeout=0.5, retry_interval=0.05)
    return RemoteSettings(url, **{**defaults, **options})


def open_store(state_dir, url, *, ram_max=0, disk_max=0, size=16 * MiB, **options) -> Store:
    return Store.open(state_dir, size=size, ram_max=ram_max, disk_max=disk_max,
                      remote=settings(url, **options))


def commandstats(redis: RedisServer) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT``."""
    info = redis.cli("INFO", "commandstats")
    return {name: int(calls) for name, calls in re.findall(r"cmdstat_(\w+):calls=(\d+)", info)}


async def settled() -> None:
    """Let queued remote deletes go out and be answered."""
    for _ in range(20):
        await asyncio.sleep(0.01)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path):
    nodes = RedisClusterNodes(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()


# --- the tier itself -----------------------------------------------------------------


async def test_concurrent_operations_are_sent_as_one_command_each(redis):
    tier = RemoteTier.open(settings(redis.url), "instance", 1)
    payloads = pages(200, 1)
    redis.cli("CONFIG", "RESETSTAT")
    addrs = await asyncio.gather(*(tier.put(payload) for payload in payloads))
    assert await asyncio.gather(*(tier.get(addr, BLOCK_SIZE) for addr in addrs)) == payloads
    for addr in addrs:
        tier.free(addr, BLOCK_SIZE)
    await settled()
    calls = commandstats(redis)
    assert {name: calls.get(name) for name in ("mset", "mget", "del")} == {"mset": 1, "mget": 1, "del": 1}
    assert redis.cli("DBSIZE") == "0"
    assert (tier.blocks, tier.stored_bytes, tier.used_bytes) == (0, 0, 0)
    await tier.aclose()


async def test_keys_carry_prefix_instance_and_a_hash_tag_per_segment(redis):
    tier = RemoteTier.open(settings(redis.url, prefix="swap:"), "vm7", 3)
    addr = await tier.put(b"payload")
    assert addr >> 40 == 3
    assert redis.keys() == [f"swap:{{vm7:{addr >> SEGMENT_BITS:014x}}}:{addr:016x}"]
    await tier.aclose()


async def test_values_that_are_not_the_expected_ones_read_as_corrupt(redis):
    tier = RemoteTier.open(settings(redis.url), "instance", 1)
    first, second = [await tier.put(payload) for payload in (b"first", b"second")]
    with pytest.raises(CorruptBlockError, match="another value"):
        await tier.get(first, len(b"second"))  # the length does not match
    redis.cli("RENAME", tier.key(second).decode(), tier.key(first).decode())  # a value under a foreign key
    with pytest.raises(CorruptBlockError, match="another value"):
        await tier.get(first, len(b"second"))
    with pytest.raises(CorruptBlockError, match="missing"):
        await tier.get(second, len(b"second"))
    await tier.aclose()


async def test_the_byte_budget_is_enforced(redis):
    tier = RemoteTier.open(settings(redis.url, max_bytes=3 * (BLOCK_SIZE + 100)), "instance", 1)
    addrs = [await tier.put(page) for page in pages(3, 2)]
    assert not tier.has_room(BLOCK_SIZE)
    with pytest.raises(NoSpaceError):
        await tier.put(bytes(BLOCK_SIZE))
    tier.free(addrs[0], BLOCK_SIZE)
    assert tier.has_room(BLOCK_SIZE)
    await tier.aclose()


async def test_cluster_batches_span_segments_and_slots(cluster):
    tier = RemoteTier.open(settings(cluster.url), "instance", 1)
    payloads = pages(3 << SEGMENT_BITS >> 2, 3)  # 768 puts: three batches, segment 0 only
    addrs = await asyncio.gather(*(tier.put(payload) for payload in payloads))
    more = await asyncio.gather(*(tier.put(payload) for payload in payloads))  # into segment 1
    slots = {key_slot(tier.key(addr)) for addr in addrs}
    assert len(slots) == 1
    assert cluster.nodes[0].cli("CLUSTER", "KEYSLOT", tier.key(addrs[0]).decode()) == str(slots.pop())
    assert await asyncio.gather(*(tier.get(addr, BLOCK_SIZE) for addr in addrs + more)) == payloads * 2
    assert len(cluster.keys()) == 2 * len(payloads)
    await tier.aclose()


async def test_sentinel_names_the_master(tmp_path, redis):
    sentinel = RedisSentinelNode(tmp_path / "sentinel", redis).start()
    try:
        tier = RemoteTier.open(settings(sentinel.url), "instance", 1)
        addr = await tier.put(b"through sentinel")
        assert await tier.get(addr, len(b"through sentinel")) == b"through sentinel"
        assert len(redis.keys()) == 1
        await tier.aclose()
    finally:
        sentinel.stop()


# --- the store with a remote tier ---------------------------------------------------------


async def test_placement_is_ram_then_disk_then_remote(state_dir, redis):
    store = open_store(state_dir, redis.url, ram_max=SLAB_SIZE, disk_max=SLAB_SIZE)
    data = pages(3 * PAGES_PER_SLAB, 4)
    await store.write(0, b"".join(data))
    tiers = store.stats()["tiers"]
    assert [tiers[name]["blocks"] for name in ("ram", "disk", "remote")] == [PAGES_PER_SLAB] * 3
    assert tiers["remote"]["up"] and tiers["remote"]["stored_bytes"] == PAGES_PER_SLAB * BLOCK_SIZE
    assert len(redis.keys()) == PAGES_PER_SLAB
    assert await store.read(0, len(b"".join(data))) == b"".join(data)
    await store.close()


def compressible_pages(count: int, seed: int) -> list[bytes]:
    """Pages that compress to about 270 bytes each and share 128 bytes with each other."""
    rng = random.Random(seed)
    common = rng.randbytes(128)
    return [(common + rng.randbytes(128)) * 16 for _ in range(count)]


def remote_group_stats(store: Store) -> tuple[int, int, int]:
    remote = store.stats()["tiers"]["remote"]
    return remote["grouped_payloads"], remote["grouped_blocks"], remote["blocks"]


async def test_a_map_group_moved_to_remote_is_one_value_until_its_last_page_goes(state_dir, redis):
    store = open_store(state_dir, redis.url, ram_max=MiB)
    data = compressible_pages(16, 21)
    await store.write(0, b"".join(data))
    assert await store.move_group(range(16), "remote") == 16
    entries = [store.entry(block) for block in range(16)]
    assert {(entry.tier, entry.flags & GROUPED, entry.addr) for entry in entries} == {
        (TIER_REMOTE, GROUPED, entries[0].addr)}
    assert len(redis.keys()) == 1 and remote_group_stats(store) == (1, 16, 16)
    assert store.tier("remote").stored_bytes < 0.6 * sum(len(encode(page).payload) for page in data)
    store._group_cache.clear()
    assert await store.read(0, 16 * BLOCK_SIZE) == b"".join(data)
    await store.close()

    store = open_store(state_dir, redis.url, ram_max=MiB)
    await store._remote.wait_for_sweep()
    assert len(redis.keys()) == 1 and remote_group_stats(store) == (1, 16, 16)
    assert await store.read(0, 16 * BLOCK_SIZE) == b"".join(data)
    new = compressible_pages(16, 22)
    await store.write(0, b"".join(new[:15]))
    await settled()
    assert len(redis.keys()) == 1 and remote_group_stats(store) == (1, 1, 1)
    await store.write(15 * BLOCK_SIZE, new[15])
    await settled()
    assert redis.keys() == [] and remote_group_stats(store) == (0, 0, 0)
    assert await store.read(0, 16 * BLOCK_SIZE) == b"".join(new)
    await store.close()


async def test_a_grouped_disk_payload_moves_to_remote_as_one_value(state_dir, redis):
    store = open_store(state_dir, redis.url, ram_max=MiB, disk_max=MiB)
    data = compressible_pages(16, 23)
    await store.write(0, b"".join(data))
    await store.move_group(range(16), "disk")
    assert store.stats()["tiers"]["disk"]["grouped_payloads"] == 1
    assert await store.move_group(range(16), "remote") == 16
    assert len(redis.keys()) == 1 and remote_group_stats(store) == (1, 16, 16)
    assert store.stats()["tiers"]["disk"]["blocks"] == store.tier("disk").used_bytes == 0
    assert await store.read(0, 16 * BLOCK_SIZE) == b"".join(data)
    await store.close()


async def test_trim_and_overwrite_delete_the_remote_keys(state_dir, redis):
    store = open_store(state_dir, redis.url)
    data = pages(8, 5)
    await store.write(0, b"".join(data))
    old_keys = set(redis.keys())
    await store.trim(0, 2 * BLOCK_SIZE)
    await store.write(2 * BLOCK_SIZE, pages(1, 6)[0])  # a new key replaces the old one
    await store.write(3 * BLOCK_SIZE, bytes(BLOCK_SIZE))  # a zero page needs no key
    await store.write_zeroes(4 * BLOCK_SIZE, BLOCK_SIZE, may_trim=False)
    await settled()
    keys = set(redis.keys())
    assert len(keys) == 4 and len(keys - old_keys) == 1
    assert store.stats()["tiers"]["remote"]["blocks"] == 4
    assert await store.read(5 * BLOCK_SIZE, 3 * BLOCK_SIZE) == b"".join(data[5:])
    await store.close()


async def test_remote_blocks_survive_a_restart_and_keys_are_never_reused(state_dir, redis):
    store = open_store(state_dir, redis.url)
    data = swap_like(MiB, 7)
    await store.write(0, data)
    first_keys = set(redis.keys())
    before = store.stats()["tiers"]["remote"]
    await store.close()
    store = open_store(state_dir, redis.url)
    await store._remote.wait_for_sweep()
    assert await store.read(0, len(data)) == data
    assert store.stats()["tiers"]["remote"] == before
    await store.write(0, data[:BLOCK_SIZE * 3])
    await settled()
    new_keys = set(redis.keys()) - first_keys
    assert new_keys and all(int(key.rsplit(":", 1)[1], 16) >> 40 == 2 for key in new_keys)
    await store.close()


async def test_checksum_mismatch_reads_as_eio_and_is_counted(state_dir, redis):
    store = open_store(state_dir, redis.url)
    await store.write(0, b"".join(pages(2, 8)))
    key = store._remote.key(store._map.get(1).addr).decode()
    assert redis.cli("SETRANGE", key, "100", "X") == str(11 + BLOCK_SIZE)  # header + payload
    assert await store.read(0, BLOCK_SIZE) == pages(2, 8)[0]
    with pytest.raises(CorruptBlockError, match="block 1 on the remote tier"):
        await store.read(BLOCK_SIZE, BLOCK_SIZE)
    assert store.stats()["tiers"]["remote"]["corrupt_reads_total"] == 1
    await store.close()


async def test_two_instances_on_one_redis_never_see_each_other(tmp_path, redis):
    stores = [open_store(tmp_path / name, redis.url) for name in ("vm1", "vm2")]
    data = [swap_like(MiB, seed) for seed in (9, 10)]
    for store, content in zip(stores, data):
        await store.write(0, content)
    for store, content in zip(stores, data):
        assert await store.read(0, MiB) == content
    remote_blocks = [store.stats()["tiers"]["remote"]["blocks"] for store in stores]
    assert len(redis.keys()) == sum(remote_blocks)
    await stores[0].trim(0, MiB)
    await settled()
    assert await stores[1].read(0, MiB) == data[1]
    assert len(redis.keys()) == remote_blocks[1]
    for store in stores:
        await store.close()
    stores = [open_store(tmp_path / name, redis.url) for name in ("vm1", "vm2")]
    await asyncio.gather(*(store._remote.wait_for_sweep() for store in stores))
    assert await stores[1].read(0, MiB) == data[1]  # vm1's sweep kept vm2's keys
    for store in stores:
        await store.close()


async def test_orphans_of_a_crash_between_remote_write_and_commit_are_removed(state_dir, redis):
    store = open_store(state_dir, redis.url)
    data = b"".join(pages(6, 11))
    await store.write(0, data)
    for payload in pages(5, 12):  # acknowledged by Redis, never committed to the map ...
        await store._remote.put(payload)
    store._map.close()  # ... because the process dies here: no commit, no close
    store._remote.close()
    await store._remote._client.aclose()
    assert len(redis.keys()) == 11

    store = open_store(state_dir, redis.url)
    await store._remote.wait_for_sweep()
    assert store.stats()["tiers"]["remote"]["orphans_removed_total"] == 5
    assert len(redis.keys()) == 6
    assert await store.read(0, len(data)) == data
    await store.close()


def test_the_key_prefix_cannot_change_under_existing_keys(state_dir, redis):
    async def cycle(prefix):
        store = open_store(state_dir, redis.url, prefix=prefix)
        await store.close()

    asyncio.run(cycle("a:"))
    with pytest.raises(StateDirError, match="--remote-prefix 'a:'"):
        asyncio.run(cycle("b:"))


# --- outages ---------------------------------------------------------------------------


async def test_outage_keeps_local_tiers_serving_and_recovers(state_dir, redis):
    store = open_store(state_dir, redis.url, disk_max=SLAB_SIZE)
    data = pages(2 * PAGES_PER_SLAB, 13)
    await store.write(0, b"".join(data))
    remote_block = PAGES_PER_SLAB
    assert store._map.get(remote_block).tier == TIER_REMOTE and store._map.get(0).tier == TIER_DISK
    redis.stop(signal.SIGKILL)

    assert await store.read(0, BLOCK_SIZE) == data[0]  # local blocks are served
    with pytest.raises(TierUnavailableError):
        await store.read(remote_block * BLOCK_SIZE, BLOCK_SIZE)
    health = store.stats()["tiers"]["remote"]
    assert not health["up"] and health["errors_total"] > 0 and health["last_error"]
    with pytest.raises(NoSpaceError):  # disk full, remote unreachable
        await store.write(40 * BLOCK_SIZE, pages(1, 14)[0])
    await store.trim(0, BLOCK_SIZE)  # frees a disk slot
    await store.trim(remote_block * BLOCK_SIZE, BLOCK_SIZE)  # its delete waits for Redis
    await store.write(40 * BLOCK_SIZE, pages(1, 14)[0])  # lands on disk
    assert store._map.get(40).tier == TIER_DISK

    redis.start()  # AOF brings the keys back
    assert await store.read(BLOCK_SIZE, 2 * PAGES_PER_SLAB * BLOCK_SIZE - BLOCK_SIZE) == \
        b"".join(data[1:remote_block]) + bytes(BLOCK_SIZE) + b"".join(data[remote_block + 1 :])
    while redis.cli("DBSIZE") != str(PAGES_PER_SLAB - 1):  # the waiting delete went out
        await asyncio.sleep(0.02)
    assert store.stats()["tiers"]["remote"]["up"]
    await store.write(41 * BLOCK_SIZE, pages(1, 15)[0])
    assert store._map.get(41).tier == TIER_REMOTE
    await store.close()


async def test_the_nbd_fast_path_passes_over_a_remote_tier_that_is_down(state_dir, redis):
    """write_now (whole-block NBD writes) places a page on the next tier with room
    while the remote tier is down, and refuses at once when no tier has room."""
    store = open_store(state_dir, redis.url, ram_max=SLAB_SIZE, disk_max=SLAB_SIZE)
    store.ram_payload_limit = 1024  # incompressible pages go to disk, remote, then RAM
    data = pages(2 * PAGES_PER_SLAB + 1, 17)
    await store.write(0, b"".join(data[:PAGES_PER_SLAB]))  # the disk tier is full
    redis.stop(signal.SIGKILL)
    await store.write(PAGES_PER_SLAB * BLOCK_SIZE, data[PAGES_PER_SLAB])  # the remote put fails: RAM
    assert not store.stats()["tiers"]["remote"]["up"]
    for block in range(PAGES_PER_SLAB + 1, 2 * PAGES_PER_SLAB):
        acknowledged = []
        Store.when_committed(store.write_now(block * BLOCK_SIZE, data[block]), acknowledged.append)
        await asyncio.sleep(0)
        assert acknowledged == [None] and store._map.get(block).tier == TIER_RAM
    with pytest.raises(NoSpaceError):  # every tier is full or down
        store.write_now(2 * PAGES_PER_SLAB * BLOCK_SIZE, data[-1])
    assert await store.read(0, 2 * PAGES_PER_SLAB * BLOCK_SIZE) == b"".join(data[:-1])
    await store.close()


async def test_a_read_waiting_out_a_short_outage_succeeds(state_dir, redis):
    store = open_store(state_dir, redis.url, timeout=30)
    data = b"".join(pages(4, 16))
    await store.write(0, data)
    redis.stop(signal.SIGKILL)
    reader = asyncio.ensure_future(store.read(0, len(data)))
    while store.stats()["tiers"]["remote"]["errors_total"] == 0:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(redis.start)
    assert await reader == data
    await store.close()


# --- a real server and real clients ------------------------------------------------------


@pytest.fixture(params=["standalone", "cluster"])
def any_redis(request, tmp_path):
    if request.param == "standalone":
        redis = RedisServer(tmp_path / "redis").start()
    else:
        redis = RedisClusterNodes(tmp_path / "cluster").start()
    yield redis
    redis.stop()


def remote_server(workdir, url, *, ram_max="0", disk_max="0", size="64M", **options) -> ServerProcess:
    extra = ["--remote", url, "--remote-retry-interval", "0.05"]
    for name, value in options.items():
        if name == "policy":  # KEY=VALUE,KEY=VALUE
            extra += [argument for setting in value.split(",") for argument in ("--policy", setting)]
        else:
            extra += [f"--{name.replace('_', '-')}", str(value)]
    workdir.mkdir(exist_ok=True)
    return ServerProcess(workdir, size=size, ram_max=ram_max, disk_max=disk_max, extra=tuple(extra))


def test_nbdcopy_round_trip_of_64_mib_through_redis(tmp_path, any_redis):
    server = remote_server(tmp_path / "srv", any_redis.url).start()
    try:
        source = tmp_path / "source.img"
        source.write_bytes(swap_like(64 * MiB, 17))
        run_client(["nbdcopy", str(source), server.uri])
        back = tmp_path / "back.img"
        run_client(["nbdcopy", server.uri, str(back)])
        assert back.read_bytes() == source.read_bytes()
        tiers = server.status()["tiers"]
        assert tiers["ram"]["blocks"] == tiers["disk"]["blocks"] == 0
        assert tiers["remote"]["blocks"] == len(any_redis.keys()) > 64 * MiB // BLOCK_SIZE // 2
        assert tiers["remote"]["up"] and tiers["remote"]["errors_total"] == 0
    finally:
        server.cleanup()


def test_redis_killed_and_restarted_mid_run_loses_nothing(tmp_path, redis):
    server = remote_server(tmp_path / "srv", redis.url, size="16M", remote_timeout=60).start()
    try:
        source = tmp_path / "source.img"
        source.write_bytes(swap_like(16 * MiB, 18))
        run_client(["nbdcopy", str(source), server.uri])
        redis.stop(signal.SIGKILL)
        back = tmp_path / "back.img"
        reader = subprocess.Popen(["nbdcopy", server.uri, str(back)], stderr=subprocess.PIPE)
        while server.status()["tiers"]["remote"]["up"]:  # the reader met the outage
            time.sleep(0.02)
        redis.start()
        assert reader.wait(120) == 0, reader.stderr.read()
        assert back.read_bytes() == source.read_bytes()
        server.restart()  # and the map still agrees with Redis after a restart
        run_client(["nbdcopy", server.uri, str(back)])
        assert back.read_bytes() == source.read_bytes()
    finally:
        server.cleanup()


def test_redis_gone_for_good_fails_only_remote_blocks(tmp_path, redis):
    # The disk's watermarks at 100 %: the policy engine must not move its 16 blocks to
    # Redis before the outage (it would, at once: the full disk is above disk_high).
    server = remote_server(tmp_path / "srv", redis.url, disk_max="64K", size="1M",
                           remote_timeout=0.05, policy="disk_high=1.0,disk_low=0.99").start()
    try:
        nbdsh(server.uri, """
            import random
            rng = random.Random(19)
            for block in range(32):
                h.pwrite(rng.randbytes(4096), block * 4096)
            h.pwrite(b"\\x05" * 4096, 32 * 4096)
        """)
        assert server.status()["tiers"]["remote"]["blocks"] == 16
        redis.stop()
        out = nbdsh(server.uri, """
            import errno, random
            for block in range(34):
                try:
                    h.pread(4096, block * 4096)
                    print("ok", block)
                except nbd.Error as error:
                    print("error", block, error.errnum == errno.EIO)
            page = random.Random(20).randbytes(4096)  # raw, like the pages on disk
            try:
                h.pwrite(page, 40 * 4096)
            except nbd.Error as error:
                print("write", error.errnum == errno.ENOSPC)
            h.trim(4096, 0)
            h.pwrite(page, 40 * 4096)
            print("written")
        """)
        lines = out.split("\n")
        assert [f"ok {block}" for block in range(16)] == lines[:16]
        assert [f"error {block} True" for block in range(16, 32)] == lines[16:32]
        assert lines[32:] == ["ok 32", "ok 33", "write True", "written", ""]
        remote = server.status()["tiers"]["remote"]
        assert not remote["up"] and remote["errors_total"] > 0
    finally:
        server.cleanup()


# --- configuration -----------------------------------------------------------------------


def test_remote_settings_from_flags_and_validation(tmp_path):
    overrides = dict(size="1G", ram_max="0", disk_max="0", remote="redis+cluster://127.0.0.1:7000",
                     remote_max="1G", remote_timeout=2)
    config = ServeConfig.load(None, overrides)
    remote = config.remote_settings()
    assert (remote.url, remote.max_bytes, remote.timeout) == ("redis+cluster://127.0.0.1:7000", 1 << 30, 2.0)
    assert ServeConfig.load(None, dict(size="1G")).remote_settings() is None
    with pytest.raises(ConfigError, match="at least one tier"):
        ServeConfig.load(None, {**overrides, "remote": None})
    for bad in ({"remote": "http://x"}, {"remote": "redis+sentinel://h:1"}, {"remote_pool": 0},
                {"remote_timeout": 0}, {"remote_max": "0"}):
        with pytest.raises(ConfigError):
            ServeConfig.load(None, {**overrides, **bad})


def test_status_has_a_remote_entry_without_a_remote_tier(tmp_path):
    async def stats():
        store = Store.open(tmp_path / "state", size=MiB, ram_max=0, disk_max=MiB)
        try:
            return store.stats()["tiers"]["remote"]
        finally:
            await store.close()

    remote = asyncio.run(stats())
    assert remote["blocks"] == remote["stored_bytes"] == remote["capacity_bytes"] == 0
    assert remote["configured"] is False
