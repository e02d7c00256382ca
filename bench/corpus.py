#!/usr/bin/env python3
"""A corpus of real memory pages, and what nbdswap stores for it against zram (issue 7).

``capture PID... --out FILE``
    Copies the anonymous memory of running processes into FILE, a plain concatenation of
    4 KiB pages (no header; any file whose length is a multiple of 4096 is a corpus).
    Reads /proc/PID/maps for private anonymous mappings (no file, ``[heap]``, ``[stack]``,
    ``[anon:...]``), keeps by default only the pages that are resident or swapped out
    (/proc/PID/pagemap; ``--all`` takes untouched pages too, which read as zeros), and
    reads them through /proc/PID/mem, skipping ranges that cannot be read.  Needs
    ptrace access to the processes (root, or your own processes with ptrace_scope 0).

``report FILE``
    Stored bytes per page of nbdswap's codec (nbdswap.codec.encode: what the RAM tier
    stores; plus the slab size-class rounding of nbdswap.tiers.slab) against a zram-like
    reference: per-page zstd level 1 (standard frame), zero and same-filled pages free,
    incompressible pages capped at 4096.  Also the share of zero/same-filled pages, and,
    after writing the corpus through a real Store in a temporary state directory, the
    map metadata bytes per mapped block and the RAM tier's memory over its stored bytes;
    then every page is made idle and the policy groups them in RAM (grouped payloads of
    neighbouring blocks, in place), and finally drains RAM into the disk tier (grouped
    the same way).  After each, the tier's payload and slot bytes (and for RAM its
    memory) are compared with zram-like, with the cost of reading the pages back in block
    order and in random order.
    ``--json`` prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

PAGE = 4096
MAPS_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$")
#: Pseudo-files of the kernel's own pages (not swappable process memory).
SKIP_NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]")
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62

# --------------------------------------------------------------------------- capture


def anonymous_regions(pid: int) -> list[tuple[int, int]]:
    """Readable private anonymous ranges of ``pid`` (start, end)."""
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = MAPS_RE.match(line)
        if not m:
            continue
        start, end, perms, inode, name = int(m[1], 16), int(m[2], 16), m[3], int(m[4]), m[5].strip()
        if perms[0] != "r" or perms[3] != "p" or inode != 0 or name in SKIP_NAMES:
            continue
        if name and not (name in ("[heap]", "[stack]") or name.startswith("[anon:")
                         or name.startswith("[stack:")):
            continue  # e.g. a deleted file or a memfd: not anonymous memory
        regions.append((start, end))
    return regions


def populated_runs(pagemap, start: int, end: int) -> list[tuple[int, int]]:
    """Sub-ranges of [start, end) whose pages are resident or swapped out."""
    runs: list[tuple[int, int]] = []
    step = 1 << 18  # pages per pagemap read (2 MiB of entries)
    first = start // PAGE
    last = end // PAGE
    for chunk in range(first, last, step):
        count = min(step, last - chunk)
        try:
            raw = os.pread(pagemap, 8 * count, 8 * chunk)
        except OSError:
            return [(start, end)]  # no pagemap access: take everything
        entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
        for i, entry in enumerate(entries):
            if entry & (PM_PRESENT | PM_SWAPPED):
                addr = (chunk + i) * PAGE
                if runs and runs[-1][1] == addr:
                    runs[-1] = (runs[-1][0], addr + PAGE)
                else:
                    runs.append((addr, addr + PAGE))
    return runs


def read_range(mem: int, start: int, end: int, limit: int) -> list[bytes]:
    """The pages of [start, end) that can be read, at most ``limit``."""
    pages: list[bytes] = []
    addr = start
    while addr < end and len(pages) < limit:
        length = min(end - addr, 1 << 20, (limit - len(pages)) * PAGE)
        try:
            data = os.pread(mem, length, addr)
        except OSError:
            data = b""
        if len(data) < PAGE:
            addr += PAGE  # an unreadable page: skip it
            continue
        whole = len(data) - len(data) % PAGE
        pages.extend(data[i:i + PAGE] for i in range(0, whole, PAGE))
        addr += whole
    return pages


def capture(pids: list[int], out: Path, *, max_pages: int, all_pages: bool) -> dict[int, int]:
    counts: dict[int, int] = {}
    total = 0
    with open(out, "wb") as sink:
        for pid in pids:
            counts[pid] = 0
            try:
                regions = anonymous_regions(pid)
                mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
            except OSError as error:
                print(f"pid {pid}: skipped ({error})", file=sys.stderr)
                continue
            pagemap = -1
            if not all_pages:
                try:
                    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
                except OSError:
                    pass
            try:
                for start, end in regions:
                    runs = [(start, end)] if pagemap < 0 else populated_runs(pagemap, start, end)
                    for run_start, run_end in runs:
                        if total >= max_pages:
                            break
                        pages = read_range(mem, run_start, run_end, max_pages - total)
                        sink.write(b"".join(pages))
                        counts[pid] += len(pages)
                        total += len(pages)
            finally:
                os.close(mem)
                if pagemap >= 0:
                    os.close(pagemap)
    return counts


# --------------------------------------------------------------------------- report


def load_pages(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if len(data) % PAGE:
        raise SystemExit(f"{path}: {len(data)} bytes is not a whole number of {PAGE}-byte pages")
    return [data[i:i + PAGE] for i in range(0, len(data), PAGE)]


def is_same_filled(page: bytes) -> bool:
    return page[:8] * (PAGE // 8) == page


def analyse(pages: list[bytes], group: int = 16) -> dict:
    """Codec-level numbers: no Store, no I/O."""
    import zstandard

    from nbdswap import codec
    try:
        from nbdswap.tiers.slab import GRANULE, size_class
    except ImportError:  # pragma: no cover - slab layout changed
        size_class = None

    zram = zstandard.ZstdCompressor(level=1)
    n = len(pages)
    zero = same = 0
    zram_bytes = nbd_payload = nbd_slot = raw_pages = 0
    seen: set[bytes] = set()
    duplicates = 0
    for page in pages:
        if page == codec.ZERO_PAGE:
            zero += 1
        elif is_same_filled(page):
            same += 1
        else:
            zram_bytes += min(len(zram.compress(page)), PAGE)
            if page in seen:
                duplicates += 1
            else:
                seen.add(page)
        encoded = codec.encode(page)
        length = len(encoded.payload)
        nbd_payload += length
        if encoded.kind == codec.PageKind.RAW:
            raw_pages += 1
        if length and size_class is not None:
            nbd_slot += size_class(length) * GRANULE
    # Grouped compression (a cold-tier lever): zstd-1 over runs of `group` data pages.
    grouped = 0
    data_pages = [p for p in pages if p != codec.ZERO_PAGE and not is_same_filled(p)]
    for i in range(0, len(data_pages), group):
        chunk = b"".join(data_pages[i:i + group])
        grouped += min(len(zram.compress(chunk)), len(chunk))
    per = (lambda b: b / n) if n else (lambda b: 0.0)
    return {
        "pages": n,
        "zero_pages": zero,
        "same_filled_pages": same,
        "zero_or_same_share": (zero + same) / n if n else 0.0,
        "raw_pages": raw_pages,
        "duplicate_data_pages": duplicates,
        "zram_bytes": zram_bytes,
        "nbdswap_payload_bytes": nbd_payload,
        "nbdswap_slot_bytes": nbd_slot,
        "grouped_bytes": grouped,
        "group": group,
        "zram_bytes_per_page": per(zram_bytes),
        "nbdswap_payload_bytes_per_page": per(nbd_payload),
        "nbdswap_slot_bytes_per_page": per(nbd_slot),
        "grouped_bytes_per_page": per(grouped),
        "payload_vs_zram": nbd_payload / zram_bytes if zram_bytes else 0.0,
        "slot_vs_zram": nbd_slot / zram_bytes if zram_bytes else 0.0,
        "grouped_vs_zram": grouped / zram_bytes if zram_bytes else 0.0,
        "zram_ratio": n * PAGE / zram_bytes if zram_bytes else 0.0,
        "nbdswap_ratio": n * PAGE / nbd_payload if nbd_payload else 0.0,
    }


async def _through_store(pages: list[bytes], state_dir: Path, batch: int) -> tuple[dict, dict, dict]:
    """Write the corpus in order, group the idle pages in RAM, then drain RAM into the
    disk tier; the stats after each, and the read cost of the grouped pages."""
    from nbdswap.policy import SCAN_LIMIT, Policy, PolicySettings
    from nbdswap.store import Store

    size = max(len(pages), 1) * PAGE
    store = Store.open(state_dir, size=size, ram_max=size + (64 << 20), disk_max=size + (64 << 20))
    try:
        for i in range(0, len(pages), batch):
            await store.write(i * PAGE, b"".join(pages[i:i + batch]))
        await store.flush()
        written = store.stats()
        policy = Policy(store, PolicySettings(moves_per_second=10 ** 9, batch=SCAN_LIMIT))
        grouped = await _after(store, pages, _group_idle_ram(store, policy, len(pages)))
        drained = await _after(store, pages, _drain_ram(store, policy))
        return written, grouped, drained
    finally:
        await store.close()


async def _after(store, pages: list[bytes], move) -> dict:
    """The store's stats after ``move`` (a coroutine moving every page), its cost per
    page, and the cost of reading the pages back."""
    started = time.perf_counter()
    await move
    seconds = time.perf_counter() - started
    return {**store.stats(), "move_us_per_page": seconds / max(len(pages), 1) * 1e6,
            **await _read_cost(store, pages)}


async def _group_idle_ram(store, policy, count: int) -> None:
    """Make every page idle: one pass of the policy's hand groups them in RAM, the next
    repack what the grouping left in sparse slabs, until a pass moves nothing."""
    from nbdswap.policy import SCAN_LIMIT

    store.heat[:] = bytes(len(store.heat))
    for _ in range(4):
        moves = store.move_stats()["moves"]
        for _ in range(-(-count // SCAN_LIMIT) + 1):
            await policy.step()
        if store.move_stats()["moves"] == moves:
            return


async def _drain_ram(store, policy) -> None:
    policy.drain("ram")
    while store.tier("ram").blocks:
        await policy.step()
    policy.undrain("ram")


async def _read_cost(store, pages: list[bytes]) -> dict:
    """Microseconds per page to read every page back, in block order (a group is decoded
    once for its pages) and in a random order (mostly once per page); checks the bytes."""
    import random

    costs = {}
    for order in ("block", "random"):
        blocks = list(range(len(pages)))
        if order == "random":
            random.Random(1).shuffle(blocks)
        store._group_cache.clear()
        started = time.perf_counter()
        for block in blocks:
            if await store.read(block * PAGE, PAGE) != pages[block]:
                raise AssertionError(f"block {block} reads back wrong after it was moved")
        costs[f"read_{order}_order_us"] = (time.perf_counter() - started) / max(len(pages), 1) * 1e6
    return costs


def store_numbers(pages: list[bytes], batch: int = 32) -> dict:
    """Write the corpus through a real Store; map metadata, RAM-tier overhead, the RAM
    tier's grouped payloads once every page is idle, and the disk tier's after a drain
    of RAM."""
    from nbdswap.tiers.ram import arena_path

    tmp = Path(tempfile.mkdtemp(prefix="nbdswap-corpus-"))
    state = tmp / "state"
    try:
        stats, grouped, drained = asyncio.run(_through_store(pages, state, batch))
    finally:
        arena_path(state).unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    disk, idle = drained["tiers"]["disk"], grouped["tiers"]["ram"]
    ram = stats["tiers"]["ram"]
    mapped = stats["map"]["blocks"]
    stored = ram["stored_bytes"]
    return {
        "map_blocks": mapped,
        "map_bytes": stats["map"]["bytes"],
        "map_bytes_per_block": stats["map"]["bytes"] / mapped if mapped else 0.0,
        "ram_blocks": ram["blocks"],
        "ram_stored_bytes": stored,
        "ram_used_bytes": ram.get("used_bytes", 0),
        "ram_slab_bytes": ram.get("slab_bytes", 0),
        "ram_used_over_stored": ram.get("used_bytes", 0) / stored if stored else 0.0,
        "ram_slab_over_stored": ram.get("slab_bytes", 0) / stored if stored else 0.0,
        "disk_blocks": stats["tiers"]["disk"]["blocks"],
        "store_zero_blocks": stats.get("zero_blocks", 0),
        "store_same_filled_blocks": stats.get("same_filled_blocks", 0),
        "idle_ram_blocks": idle["blocks"],
        "idle_ram_grouped_blocks": idle.get("grouped_blocks", 0),
        "idle_ram_grouped_payloads": idle.get("grouped_payloads", 0),
        "idle_ram_stored_bytes": idle["stored_bytes"],
        "idle_ram_used_bytes": idle["used_bytes"],
        "idle_ram_slab_bytes": idle["slab_bytes"],
        **{f"idle_ram_{key}": grouped[key] for key in ("read_block_order_us", "read_random_order_us",
                                                      "move_us_per_page")},
        "drained_disk_blocks": disk["blocks"],
        "drained_disk_grouped_blocks": disk.get("grouped_blocks", 0),
        "drained_disk_grouped_payloads": disk.get("grouped_payloads", 0),
        "drained_disk_stored_bytes": disk["stored_bytes"],
        "drained_disk_used_bytes": disk["used_bytes"],
        **{f"drained_disk_{key}": drained[key] for key in ("read_block_order_us", "read_random_order_us",
                                                          "move_us_per_page")},
    }


def format_report(path: Path, a: dict, s: dict | None) -> str:
    n = a["pages"] or 1
    lines = [
        f"corpus {path}: {a['pages']} pages ({a['pages'] * PAGE / 2**20:.1f} MiB)",
        f"  zero pages              {a['zero_pages']:>9}  ({a['zero_pages'] / n:.1%})",
        f"  same-filled (non-zero)  {a['same_filled_pages']:>9}  ({a['same_filled_pages'] / n:.1%})",
        f"  zero or same-filled     {a['zero_pages'] + a['same_filled_pages']:>9}  ({a['zero_or_same_share']:.1%})",
        f"  stored raw by nbdswap   {a['raw_pages']:>9}  ({a['raw_pages'] / n:.1%})",
        f"  duplicate data pages    {a['duplicate_data_pages']:>9}  ({a['duplicate_data_pages'] / n:.1%})"
        "  (what identical-page dedup would save)",
        "",
        f"  {'stored bytes':<44} {'bytes/page':>10} {'ratio':>6} {'vs zram':>8}",
        f"  {'zram-like (zstd-1/page, same-filled free)':<44} {a['zram_bytes_per_page']:>10.1f} "
        f"{a['zram_ratio']:>6.2f} {1:>8.3f}",
        f"  {'nbdswap codec payload (status stored_bytes)':<44} {a['nbdswap_payload_bytes_per_page']:>10.1f} "
        f"{a['nbdswap_ratio']:>6.2f} {a['payload_vs_zram']:>8.3f}",
        f"  {'nbdswap + slab size-class rounding':<44} {a['nbdswap_slot_bytes_per_page']:>10.1f} "
        f"{PAGE / a['nbdswap_slot_bytes_per_page'] if a['nbdswap_slot_bytes_per_page'] else 0:>6.2f} "
        f"{a['slot_vs_zram']:>8.3f}",
        f"  {'zstd-1 over groups of %d data pages' % a['group']:<44} {a['grouped_bytes_per_page']:>10.1f} "
        f"{PAGE / a['grouped_bytes_per_page'] if a['grouped_bytes_per_page'] else 0:>6.2f} "
        f"{a['grouped_vs_zram']:>8.3f}",
        "  target: nbdswap stored bytes <= 0.87 x zram-like",
    ]
    if s is not None:
        lines += [
            "",
            f"  through a Store: {s['map_blocks']} mapped blocks, {s['ram_blocks']} in RAM, "
            f"{s['disk_blocks']} on disk",
            f"  map metadata            {s['map_bytes']:>12} B  = {s['map_bytes_per_block']:.1f} B per mapped block"
            "  (target <= 24)",
            f"  RAM tier stored_bytes   {s['ram_stored_bytes']:>12} B",
            f"  RAM tier used_bytes     {s['ram_used_bytes']:>12} B  = {s['ram_used_over_stored']:.3f} x stored"
            "  (slot rounding)",
            f"  RAM tier slab_bytes     {s['ram_slab_bytes']:>12} B  = {s['ram_slab_over_stored']:.3f} x stored"
            "  (arena memory; target <= 1.10)",
            "",
            f"  every page idle, grouped in RAM in place: {s['idle_ram_blocks']} blocks in RAM, "
            f"{s['idle_ram_grouped_blocks']} in {s['idle_ram_grouped_payloads']} grouped payloads",
            *_moved_lines(s, "idle_ram", "RAM", a["zram_bytes"]),
            f"  RAM tier slab_bytes     {s['idle_ram_slab_bytes']:>12} B  = "
            f"{s['idle_ram_slab_bytes'] / (s['idle_ram_stored_bytes'] or 1):.3f} x stored, "
            f"{s['idle_ram_slab_bytes'] / (a['zram_bytes'] or 1):.3f} x zram-like  (arena memory; target <= 1.10 x stored)",
            "",
            f"  after draining RAM into the disk tier: {s['drained_disk_blocks']} blocks on disk, "
            f"{s['drained_disk_grouped_blocks']} in {s['drained_disk_grouped_payloads']} grouped payloads",
            *_moved_lines(s, "drained_disk", "disk", a["zram_bytes"]),
        ]
    return "\n".join(lines)


def _moved_lines(s: dict, prefix: str, tier: str, zram_bytes: int) -> list[str]:
    """Stored and slot bytes of a tier after a move against zram-like, and its costs."""
    stored, used = s[f"{prefix}_stored_bytes"], s[f"{prefix}_used_bytes"]
    return [
        f"  {tier + ' stored_bytes':<23} {stored:>12} B  = {stored / (zram_bytes or 1):.3f} x zram-like  (target <= 0.87)",
        f"  {tier + ' used_bytes':<23} {used:>12} B  = {used / (zram_bytes or 1):.3f} x zram-like  (slots)",
        f"  moved in {s[f'{prefix}_move_us_per_page']:.1f} us/page; read back {s[f'{prefix}_read_block_order_us']:.1f} "
        f"us/page in block order, {s[f'{prefix}_read_random_order_us']:.1f} us/page in random order",
    ]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="copy anonymous pages of running processes into FILE")
    cap.add_argument("pids", type=int, nargs="+", metavar="PID")
    cap.add_argument("--out", type=Path, required=True, metavar="FILE")
    cap.add_argument("--max-pages", type=int, default=1 << 18, help="stop after this many pages (default 262144 = 1 GiB)")
    cap.add_argument("--all", action="store_true", help="also untouched pages (they read as zeros)")
    rep = sub.add_parser("report", help="stored bytes per page: nbdswap against zram-like")
    rep.add_argument("file", type=Path, metavar="FILE")
    rep.add_argument("--no-store", action="store_true", help="skip writing the corpus through a Store")
    rep.add_argument("--group", type=int, default=16, help="pages per group for grouped compression (default 16)")
    rep.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)

    if args.command == "capture":
        counts = capture(args.pids, args.out, max_pages=args.max_pages, all_pages=args.all)
        for pid, count in counts.items():
            print(f"pid {pid}: {count} pages")
        print(f"{sum(counts.values())} pages ({sum(counts.values()) * PAGE / 2**20:.1f} MiB) -> {args.out}")
        return 0

    pages = load_pages(args.file)
    a = analyse(pages, args.group)
    s = None if args.no_store else store_numbers(pages)
    if args.json:
        print(json.dumps({"file": str(args.file), **a, **({"store": s} if s is not None else {})}, indent=1))
    else:
        print(format_report(args.file, a, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
