"""NBDConnection, the asyncio adapter, driven in-process (its socket paths are tested
through real clients elsewhere)."""

import asyncio
import struct
import sys
from pathlib import Path

import pytest

from nbdswap.device import BlockDevice
from nbdswap.protocol.constants import IHAVEOPT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, ClientFlag, Command, CommandFlag, Option
from nbdswap.server import NBDConnection, NBDServer
from nbdswap.store import BLOCK_SIZE, Store
from nbdswap.tiers.ram import arena_path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
try:
    from write_instructions import CountingTransport  # the in-process transport the tool drives the server with
finally:
    sys.path.remove(str(BENCH))


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    yield path
    arena_path(path).unlink(missing_ok=True)


def _in_transmission(store: Store) -> tuple[NBDConnection, CountingTransport]:
    connection, transport = NBDConnection(NBDServer(BlockDevice(store, "swap", store.size))), CountingTransport()
    connection.connection_made(transport)
    connection.data_received(struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    go = struct.pack(">I", 4) + b"swap" + struct.pack(">H", 0)
    connection.data_received(struct.pack(">QII", IHAVEOPT, Option.GO, len(go)) + go)
    return connection, transport


async def test_wait_idle_returns_once_the_last_pending_request_is_answered(state_dir):
    """A shutdown waits for it before closing the connection."""
    store = Store.open(state_dir, size=1 << 20, ram_max=1 << 20, disk_max=0)
    try:
        connection, transport = _in_transmission(store)
        await asyncio.wait_for(connection.wait_idle(), 5)  # nothing pending
        write = struct.pack(">IHHQQI", REQUEST_MAGIC, CommandFlag.FUA, Command.WRITE, 7, 0, BLOCK_SIZE)
        connection.data_received(write + bytes(range(256)) * (BLOCK_SIZE // 256))
        idle = asyncio.ensure_future(connection.wait_idle())
        await asyncio.sleep(0)
        assert not idle.done()  # the FUA write waits for the map's sync
        await asyncio.wait_for(idle, 30)
        await asyncio.sleep(0)  # the reply's flush
        assert struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 7) in transport.sent
    finally:
        await store.close()
