"""NBDConnection, the asyncio adapter, driven in-process (its socket paths are tested
through real clients elsewhere)."""

import asyncio
import struct
import sys
from pathlib import Path

from nbdswap.device import BlockDevice
from nbdswap.protocol.constants import (
    IHAVEOPT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, ClientFlag, Command, CommandFlag, Option)
from nbdswap.server import NBDConnection, NBDServer, ServerPolicy
from nbdswap.store import BLOCK_SIZE, Store

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
try:
    from write_instructions import CountingTransport  # the tool drives the server through it too
finally:
    sys.path.remove(str(BENCH))


class ClosingTransport(CountingTransport):
    """A transport a shutdown may half-close and abort: it records both among what
    it is given to send, and sends nothing once aborted."""

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.sent.append(b"<eof>")

    def is_closing(self) -> bool:
        return b"<abort>" in self.sent

    def abort(self) -> None:
        self.sent.append(b"<abort>")

    def close(self) -> None:
        self.abort()


def _in_transmission(device: BlockDevice, server: NBDServer | None = None,
                     transport: CountingTransport | None = None) -> tuple[NBDConnection, CountingTransport]:
    connection = NBDConnection(server or NBDServer(device))
    transport = transport or CountingTransport()
    connection.connection_made(transport)
    connection.data_received(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    go = struct.pack(">I", 4) + b"swap" + struct.pack(">H", 0)
    connection.data_received(struct.pack(">QII", IHAVEOPT, Option.GO, len(go)) + go)
    return connection, transport


def _fua_write(cookie: int) -> bytes:
    header = struct.pack(">IHHQQI", REQUEST_MAGIC, CommandFlag.FUA, Command.WRITE, cookie, 0, BLOCK_SIZE)
    return header + bytes([cookie]) * BLOCK_SIZE


def _answered(transport: CountingTransport, cookie: int) -> bool:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie) in transport.sent


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_wait_idle_returns_once_the_last_pending_request_is_answered(state_dir):
    """A shutdown closes each connection, then waits for this before the linger's
    deadline starts."""
    store = Store.open(state_dir, size=1 << 20, ram_max=1 << 20, disk_max=0)
    try:
        device = BlockDevice(store, "swap", store.size)
        connection, transport = _in_transmission(device)
        await asyncio.wait_for(connection.wait_idle(), 5)  # nothing pending
        release, execute = asyncio.Event(), device.execute

        async def holding_back_8(request, replies_to):
            if request.cookie == 8:
                await release.wait()
            await execute(request, replies_to)

        device.execute = holding_back_8  # FUA writes run through execute()
        connection.data_received(_fua_write(7) + _fua_write(8))
        idle = asyncio.ensure_future(connection.wait_idle())
        await asyncio.wait_for(_until(lambda: _answered(transport, 7)), 5)
        assert not idle.done()  # 8 is still pending
        release.set()
        await asyncio.wait_for(idle, 5)
        await asyncio.wait_for(_until(lambda: _answered(transport, 8)), 5)
    finally:
        await store.close()


async def test_shutdown_answers_a_request_slower_than_its_linger_before_aborting(state_dir):
    """The linger's deadline starts once the connection is idle: a request still
    running when the shutdown begins is answered, however long it takes, before
    the connection is half-closed and, at the deadline, aborted."""
    store = Store.open(state_dir, size=1 << 20, ram_max=1 << 20, disk_max=0)
    try:
        device = BlockDevice(store, "swap", store.size)
        server = NBDServer(device, ServerPolicy(shutdown_linger=0.2))
        connection, transport = _in_transmission(device, server, ClosingTransport())
        release, execute = asyncio.Event(), device.execute

        async def held_back(request, replies_to):
            await release.wait()
            await execute(request, replies_to)

        device.execute = held_back
        connection.data_received(_fua_write(9))
        shutdown = asyncio.ensure_future(server.shutdown())
        await asyncio.sleep(0.5)  # longer than the linger
        assert not shutdown.done() and not transport.is_closing()
        release.set()
        await asyncio.wait_for(shutdown, 10)
        reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 9)
        assert transport.sent[-3:] == [reply, b"<eof>", b"<abort>"]
    finally:
        await store.close()
