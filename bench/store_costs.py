#!/usr/bin/env python3
"""CPU costs of the store's background work, in-process (issue 7; bench/RESULTS.md).

``rebuild``
    Fills a block map with ``--blocks`` entries (half RAM, half disk, as written by
    ``BlockMap.commit``), then times ``Store.open``: the start-up replay of the map into
    the tiers' allocators and counters, which clients wait out after a restart.

``scan``
    Writes ``--blocks`` blocks, leaves ``--ram-blocks`` of them in RAM at random places
    and the rest on disk, cools every block, and walks RAM's CLOCK hand
    (``Policy._demotion_work``) until it has found every RAM block once: CPU per block
    found and map entries looked at (each costs the policy's budget 1/16 of a move).

``compact``
    Groups ``--payloads`` map groups of text-like pages on disk, trims one page of each
    and offers every payload to ``Store.compact``, as a lost reference does: CPU per
    offer refused because the payload is still 15/16 live.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbdswap.blockmap import COMPRESSED, MAP_FILE, TIER_DISK, TIER_RAM, BlockMap, Entry  # noqa: E402
from nbdswap.policy import Policy, PolicySettings  # noqa: E402
from nbdswap.store import BLOCK_SIZE, Store  # noqa: E402
from nbdswap.tiers.ram import arena_path  # noqa: E402

#: Entries per map commit while filling (bounds the fill's memory).
FILL_CHUNK = 100_000
#: Payload length of every filled entry: 4 per 4 KiB of slab.
FILLED_LENGTH = 1000


def rebuild(blocks: int, workdir: Path) -> dict:
    """Seconds to open a store whose map holds ``blocks`` entries."""
    capacity = (blocks // 2 + 1) * 1024 + (1 << 20)
    size = blocks * BLOCK_SIZE
    asyncio.run(Store.open(workdir, size=size, ram_max=capacity, disk_max=capacity).close())
    blockmap = BlockMap.open(workdir / MAP_FILE)
    try:
        for first in range(0, blocks, FILL_CHUNK):
            blockmap.commit({block: Entry(TIER_RAM if block % 2 else TIER_DISK, COMPRESSED, FILLED_LENGTH, 0,
                                          block // 2 * 1024)
                             for block in range(first, min(blocks, first + FILL_CHUNK))})
    finally:
        blockmap.close()
    started = time.perf_counter()
    store = Store.open(workdir, size=size, ram_max=capacity, disk_max=capacity)
    seconds = time.perf_counter() - started
    mapped = store.stats()["map"]["blocks"]
    asyncio.run(store.close())
    return {"blocks": mapped, "seconds": seconds, "us_per_block": seconds / mapped * 1e6}


async def _scan(blocks: int, ram_blocks: int, workdir: Path) -> dict:
    rng = random.Random(1)
    store = Store.open(workdir, size=blocks * BLOCK_SIZE, ram_max=1 << 30, disk_max=1 << 30)
    try:
        for block in range(blocks):
            await store.write(block * BLOCK_SIZE, rng.randbytes(1024) + bytes(BLOCK_SIZE - 1024))
        for block in set(range(blocks)) - set(rng.sample(range(blocks), ram_blocks)):
            await store.move(block, "disk")
        policy = Policy(store, PolicySettings(ram_high=0.0, ram_low=0.0))
        store.heat[:] = bytes(len(store.heat))
        policy._over_watermark("ram")
        found: set[int] = set()
        started = time.process_time()
        while len(found) < ram_blocks:
            found.update(block for block, *_ in policy._demotion_work("ram"))
        seconds = time.process_time() - started
        return {"blocks": blocks, "ram_blocks": ram_blocks, "cpu_seconds": seconds,
                "us_per_block_found": seconds / ram_blocks * 1e6, "entries_looked_at": policy._scanned}
    finally:
        await store.close()


async def _compact(payloads: int, workdir: Path) -> dict:
    rng = random.Random(1)
    words = [rng.randbytes(8).hex().encode() for _ in range(300)]
    store = Store.open(workdir, size=payloads * 16 * BLOCK_SIZE, ram_max=0, disk_max=1 << 30)
    try:
        await store.write(0, b"".join(b" ".join(rng.choices(words, k=400))[:BLOCK_SIZE]
                                      for _ in range(payloads * 16)))
        for group in range(payloads):
            await store.move_group(range(group * 16, group * 16 + 16), "disk", "regroup")
            await store.trim(group * 16 * BLOCK_SIZE, BLOCK_SIZE)
        offers = list(store.sparse_payloads())
        if len(offers) != payloads:
            raise RuntimeError(f"{len(offers)} of {payloads} groups were grouped and trimmed")
        started = time.process_time()
        compacted = sum([await store.compact(*slot) for slot in offers])
        seconds = time.process_time() - started
        return {"offers": len(offers), "compacted": compacted, "us_per_offer": seconds / len(offers) * 1e6}
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rebuild_parser = commands.add_parser("rebuild", help="time a start-up's replay of the map")
    rebuild_parser.add_argument("--blocks", type=int, default=2_000_000)
    scan_parser = commands.add_parser("scan", help="CPU of RAM's CLOCK hand when RAM holds few blocks")
    scan_parser.add_argument("--blocks", type=int, default=131_072)
    scan_parser.add_argument("--ram-blocks", type=int, default=7_680)
    compact_parser = commands.add_parser("compact", help="CPU of offering mostly live payloads to compaction")
    compact_parser.add_argument("--payloads", type=int, default=256)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="nbdswap-costs-"))
    try:
        if args.command == "rebuild":
            result = rebuild(args.blocks, workdir)
            print(f"start-up with {result['blocks']:,} mapped blocks: {result['seconds']:.2f} s, "
                  f"{result['us_per_block']:.2f} us per block")
        elif args.command == "compact":
            result = asyncio.run(_compact(args.payloads, workdir))
            print(f"{result['offers']:,} payloads 15/16 live offered to compaction: {result['compacted']} pages "
                  f"moved, {result['us_per_offer']:.1f} us of CPU per offer")
        else:
            if not 0 < args.ram_blocks <= args.blocks:
                parser.error("--ram-blocks must be in 1..--blocks")
            result = asyncio.run(_scan(args.blocks, args.ram_blocks, workdir))
            print(f"RAM holds {result['ram_blocks']:,} of {result['blocks']:,} blocks: found them all in "
                  f"{result['cpu_seconds']:.3f} s of CPU, {result['us_per_block_found']:.1f} us per block found, "
                  f"{result['entries_looked_at']:,} map entries looked at")
    finally:
        arena_path(workdir).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
