#!/usr/bin/env python3
"""Instructions a 4 KiB write (or, with ``--reads``, a 4 KiB read) executes on the server's
request path, counted by callgrind (issue 7; bench/RESULTS.md).

fio's IOPS on this 2-core machine move by 10-25 % from one hour to the next, so a change
worth a few per cent needs many alternating fio pairs to show, and a smaller one never
does.  callgrind counts the instructions the code executes, which do not move with the
machine's load: a tree is counted in under a minute, run after run alike.

The path runs in one process, without sockets: an ``NBDConnection`` (negotiated with
``NBD_OPT_GO``) is fed NBD WRITE requests, ``--per-chunk`` (32) to a ``data_received``,
through a transport that keeps the replies, over the real device, store, RAM tier and
block map; each chunk is followed by two loop turns, for its commit and its replies.
The pages are alike (1 KiB of random bytes then zeros, shifted), the blocks random
among ``--blocks`` (8,192) prefilled ones, so every write replaces a stored page, as
swap-outs do.  ``--reads`` sends READs of those blocks instead, each a RAM page to
decompress, as swap-ins are (outside valgrind the tool checks their data).  Not
counted: the kernel (receiving the data, LMDB's ``pwrite`` calls, sending replies) and
uvloop's socket I/O.

fio's randwrite at QD32 over one connection does not hand the server 32 writes at a
time: its commits held 18.5 writes on average with its prefill (counted in the server),
about 16 without it (derived), likely as two halves of the queue take turns.
``--per-chunk 16 --blocks 65536`` is closer to ``bench/fio_compare.py``'s job (256 MiB
of random blocks, whose groups spread over eight times as many map pages), and a change
to the map's commit can count differently there (bench/RESULTS.md); the defaults stay,
for counts comparable with earlier ones.

It runs itself twice under ``valgrind --tool=callgrind``: once building and feeding the
requests, once building them and turning the loop as often without feeding them; the
difference divided by ``--requests`` is a request's instructions (a few dozen of them
the check that every reply arrived).  ``--tree`` measures another checkout (a ``git
worktree`` of the commit to compare against).

Usage: bench/write_instructions.py [--requests N] [--reads] [--per-chunk N] [--blocks N] [--tree PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from nbdswap.protocol.constants import IHAVEOPT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, ClientFlag, Command, Option

REPO = Path(__file__).resolve().parents[1]
BLOCK = 4096
PREFILLED_BLOCKS = 8192
REQUESTS_PER_CHUNK = 32
#: valgrind cannot reserve the block map's usual 64 GiB of address space.
MAP_SIZE_UNDER_VALGRIND = 1 << 30
_OK_REPLY = struct.Struct(">IIQ")
_REQUEST = struct.Struct(">IHHQQI")
PR_SET_PDEATHSIG = 1


class CountingTransport:
    """What ``NBDConnection`` needs of a transport; keeps what it is given to send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def get_extra_info(self, name: str) -> None:
        return None

    def writelines(self, data: list[bytes]) -> None:
        self.sent.extend(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        raise AssertionError("the server aborted the connection")

    def close(self) -> None:
        raise AssertionError("the server closed the connection")


def _option(option: int, data: bytes) -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def _request(cookie: int, block: int, page: bytes, reads: bool) -> bytes:
    """A WRITE of ``page`` to ``block``, or a READ of it."""
    if reads:
        return _REQUEST.pack(REQUEST_MAGIC, 0, Command.READ, cookie, block * BLOCK, BLOCK)
    return _REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, cookie, block * BLOCK, len(page)) + page


def _pages() -> list[bytes]:
    random_part = random.Random(3).randbytes(1024)
    return [(random_part + bytes(3072))[shift:] + bytes(shift) for shift in range(64)]


def _blocks(requests: int, prefilled: int) -> list[int]:
    """The block of each request, at random among the prefilled ones."""
    rng = random.Random(7)
    return [rng.randrange(prefilled) for _ in range(requests)]


def _page_of(block: int, pages: list[bytes]) -> bytes:
    """The page the prefill wrote to ``block``, and what a write writes there again."""
    return pages[block % len(pages)]


def _chunks(requests: int, per_chunk: int, prefilled: int, reads: bool) -> list[bytes]:
    """The requests, ``per_chunk`` to a chunk; cookie i for the i-th request."""
    pages, blocks = _pages(), _blocks(requests, prefilled)
    return [b"".join(_request(first + i, block, _page_of(block, pages), reads)
                     for i, block in enumerate(blocks[first:first + per_chunk]))
            for first in range(0, requests, per_chunk)]


def _export_size(prefilled: int) -> int:
    """At least 64 MiB, and room for the prefill's writes of 64 blocks."""
    return max(64 << 20, -(-prefilled // 64) * 64 * BLOCK)


def _reply_size(reads: bool) -> int:
    """Bytes of one request's simple reply: a read's carries its block."""
    return _OK_REPLY.size + (BLOCK if reads else 0)


def _replied_ok(sent: list[bytes], requests: int, prefilled: int, reads: bool) -> int:
    """How many of the requests got a simple reply without error (and, for a read,
    the page the prefill wrote)."""
    replies, size = b"".join(sent), _reply_size(reads)
    pages, blocks = _pages(), _blocks(requests, prefilled)
    cookies = set()
    for offset in range(0, len(replies) - len(replies) % size, size):
        magic, error, cookie = _OK_REPLY.unpack_from(replies, offset)
        if magic != SIMPLE_REPLY_MAGIC or error != 0 or cookie >= requests:
            continue
        data = replies[offset + _OK_REPLY.size : offset + size]
        if not reads or data == _page_of(blocks[cookie], pages):
            cookies.add(cookie)
    return len(cookies)


async def run_path(requests: int, feed: bool, check_replies: bool, per_chunk: int, prefilled: int,
                   reads: bool = False) -> None:
    """Build ``requests`` requests (writes, or ``reads``) and, with ``feed``, serve
    them; the run without ``feed`` makes the same loop turns.  Each reply is checked
    with ``check_replies`` (outside valgrind: decoding them costs a write 2k
    instructions), else only their total length."""
    import nbdswap.blockmap
    from nbdswap.store import Store
    from nbdswap.tiers.ram import arena_path

    nbdswap.blockmap.MAP_SIZE = MAP_SIZE_UNDER_VALGRIND
    temporary = Path(tempfile.mkdtemp(prefix="nbdswap-instructions-"))
    state_dir = temporary / "state"
    try:
        size = _export_size(prefilled)
        store = Store.open(state_dir, size=size, ram_max=size, disk_max=0)
        try:
            transport = await _serve(store, requests, feed, per_chunk, prefilled, reads)
        finally:
            await store.close()
    finally:
        arena_path(state_dir).unlink(missing_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    if not feed:
        if transport.sent:
            raise SystemExit("replies to requests never sent")
    elif check_replies:
        if (answered := _replied_ok(transport.sent, requests, prefilled, reads)) != requests:
            raise SystemExit(f"{answered} of {requests} {_kind(reads)}s answered OK")
    elif sum(map(len, transport.sent)) != _reply_size(reads) * requests:
        raise SystemExit(f"{sum(map(len, transport.sent))} bytes of replies to {requests} {_kind(reads)}s")


def _kind(reads: bool) -> str:
    return "read" if reads else "write"


async def _serve(store, requests: int, feed: bool, per_chunk: int, prefilled: int,
                 reads: bool) -> CountingTransport:
    from nbdswap.device import BlockDevice
    from nbdswap.server import NBDConnection, NBDServer

    device = BlockDevice(store, "swap", store.size)
    connection, transport = NBDConnection(NBDServer(device)), CountingTransport()
    connection.connection_made(transport)
    connection.data_received(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    connection.data_received(_option(Option.GO, struct.pack(">I", 4) + b"swap" + struct.pack(">H", 0)))
    pages = _pages()
    for first in range(0, prefilled, 64):
        store.write_now(first * BLOCK, b"".join(_page_of(first + i, pages) for i in range(64)))
        await asyncio.sleep(0)
    transport.sent.clear()
    for chunk in _chunks(requests, per_chunk, prefilled, reads):
        if feed:
            connection.data_received(chunk)
        await asyncio.sleep(0)  # a write's commit
        await asyncio.sleep(0)  # the replies' flush
    return transport


def _child(requests: int, feed: bool, check_replies: bool, per_chunk: int, prefilled: int,
           reads: bool) -> None:
    import uvloop

    uvloop.run(run_path(requests, feed, check_replies, per_chunk, prefilled, reads))


def _die_with_parent() -> None:
    """In the valgrind child: a killed driver (a test's timeout) takes it along."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _instructions(tree: Path, requests: int, feed: bool, per_chunk: int, prefilled: int, reads: bool) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out",
             sys.executable, __file__, "--child", str(requests), "--feed" if feed else "--no-feed",
             "--per-chunk", str(per_chunk), "--blocks", str(prefilled), *(["--reads"] if reads else [])],
            capture_output=True, text=True, env=env, preexec_fn=_die_with_parent)
    if result.returncode != 0:
        raise SystemExit(f"valgrind run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    match = re.search(r"Collected : (\d+)", result.stderr) or re.search(r"refs:\s+([\d,]+)", result.stderr)
    if match is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{result.stderr[-3000:]}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", "--writes", type=int, default=8000,
                        help="requests counted (default 8000)")
    parser.add_argument("--reads", action="store_true", help="count 4 KiB READs instead of WRITEs")
    parser.add_argument("--per-chunk", type=int, default=REQUESTS_PER_CHUNK,
                        help=f"requests per data_received (default {REQUESTS_PER_CHUNK})")
    parser.add_argument("--blocks", type=int, default=PREFILLED_BLOCKS,
                        help=f"prefilled blocks the requests go to at random (default {PREFILLED_BLOCKS})")
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout to measure (default: this one)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--feed", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
    parser.add_argument("--check-replies", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.feed, args.check_replies, args.per_chunk, args.blocks, args.reads)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (make bench installs it)")
    if args.per_chunk < 1 or args.blocks < 1:
        parser.error("--per-chunk and --blocks must be positive")
    counted = (args.tree, args.requests)
    fed = _instructions(*counted, True, args.per_chunk, args.blocks, args.reads)
    built = _instructions(*counted, False, args.per_chunk, args.blocks, args.reads)
    kind = _kind(args.reads)
    print(f"{args.tree}: {(fed - built) / args.requests:,.0f} instructions per 4 KiB {kind} "
          f"({args.requests} {kind}s, {args.per_chunk} per chunk, over {args.blocks} blocks; "
          f"whole request path in user space)")


if __name__ == "__main__":
    main()
