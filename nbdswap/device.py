"""The block device that every connection talks to.

It owns the export's description (size, block sizes, capabilities), executes valid
requests against the store, maps storage exceptions to NBD errors in one place and
counts what it did.  Range and alignment rules are checked by the protocol layer
before a request gets here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from time import perf_counter_ns
from typing import TYPE_CHECKING, Callable, Coroutine

from .codec import split_pages
from .errors import CorruptBlockError, NoSpaceError, StoreError
from .metrics import RequestStats
from .protocol import BASE_ALLOCATION_CONTEXT_ID, Command, CommandFlag, Errno, Export, Request

if TYPE_CHECKING:
    from .codec import Encoded
    from .encoder import EncoderPool
    from .protocol import ServerConnection
    from .store import Store, _Batch

    #: A write waiting for its batch's commit: the request, its connection, the
    #: server's callback for a queued reply, and when the write started.
    _PendingReply = tuple[Request, ServerConnection, Callable[[Request], None], int]

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
MINIMUM_BLOCK_SIZE = 512
MAXIMUM_PAYLOAD = 32 * 1024 * 1024
#: BLOCK_STATUS answers at most this much of a larger request (the spec allows a
#: shorter reply; clients ask again from where it ended).
MAXIMUM_STATUS_SPAN = 1024 * 1024 * 1024

#: Short lower-case names for counters, logs and status output.
OPERATION_NAMES = {
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.CACHE: "cache",
    Command.WRITE_ZEROES: "write_zeroes",
    Command.BLOCK_STATUS: "block_status",
}


#: As globals: looking a member up on the Enum class costs ~80 ns each time.
_READ, _WRITE = Command.READ, Command.WRITE
#: Tested on every write instead of the ``Request.fua`` property (whose call cost 0.7k
#: instructions a write, callgrind).
_FUA = int(CommandFlag.FUA)


class BlockDevice:
    """One export backed by a :class:`~nbdswap.store.Store`."""

    def __init__(self, store: Store, name: str, size: int, description: str = "") -> None:
        if size <= 0 or size % BLOCK_SIZE:
            raise ValueError(f"device size must be a positive multiple of {BLOCK_SIZE}")
        self.store = store
        self.export = Export(
            name=name,
            size=size,
            description=description,
            minimum_block_size=MINIMUM_BLOCK_SIZE,
            preferred_block_size=BLOCK_SIZE,
            maximum_payload=MAXIMUM_PAYLOAD,
        )
        self.stats = {name: RequestStats() for name in OPERATION_NAMES.values()}
        self.errors: Counter[tuple[str, str]] = Counter()
        self.corrupt_block_errors = 0
        #: Encodes whole-block writes on worker processes when set (see :mod:`.encoder`).
        self.encoder: EncoderPool | None = None
        self._slow_writes: set[asyncio.Task] = set()  # encoded writes sent to execute()
        #: The batch the last whole-block write was staged in, and the writes waiting
        #: for its commit (see :meth:`_reply_when_committed`).
        self._replies_batch: _Batch | None = None
        self._replies: list[_PendingReply] = []

    def submit(self, request: Request, connection: ServerConnection,
               done: Callable[[Request], None]) -> Coroutine[None, None, None] | None:
        """Start ``request``.  A read the store serves without waiting is answered at
        once, and a whole-block write is staged at once and answered from its batch's
        commit; both return ``None`` and call ``done(request)`` once the reply is queued
        (a read before returning).  Anything else returns the :meth:`execute` coroutine
        for the caller to run.  This spares the common swap I/O a task and its futures.
        """
        command = request.command
        if command == _READ:
            return self._submit_read(request, connection, done)
        if command == _WRITE and not request.flags & _FUA:
            return self._submit_write(request, connection, done)
        return self._execute_in_order(request, connection)

    def _execute_in_order(self, request: Request, connection: ServerConnection) -> Coroutine[None, None, None]:
        """:meth:`execute`, after the writes :attr:`encoder` holds (a TRIM or a FUA write
        of a block must not land before the write of it sent earlier)."""
        if self.encoder is not None and self.encoder.busy:
            return self._execute_after(self.encoder.queued(), request, connection)
        return self.execute(request, connection)

    async def _execute_after(self, queued: asyncio.Future, request: Request, connection: ServerConnection) -> None:
        """:meth:`execute` once the writes queued before ``request`` are placed; writes
        queued after it wait until it is done (see :meth:`EncoderPool.queued`)."""
        try:
            await queued
            await self.execute(request, connection)
        finally:
            if queued.done() and not queued.cancelled():
                self.encoder.resume()

    def _submit_read(self, request: Request, connection: ServerConnection,
                     done: Callable[[Request], None]) -> Coroutine[None, None, None] | None:
        started = perf_counter_ns()
        try:
            data = self.store.read_now(request.offset, request.length)
        except Exception as error:  # noqa: BLE001 - every failure becomes an NBD error
            self._fail(request, connection, "read", error)
        else:
            if data is None:
                return self.execute(request, connection)
            connection.reply_read(request, data)
        self.stats["read"].record(request.length, perf_counter_ns() - started)
        done(request)
        return None

    def _submit_write(self, request: Request, connection: ServerConnection,
                      done: Callable[[Request], None]) -> Coroutine[None, None, None] | None:
        started = perf_counter_ns()
        encoder, encoded = self.encoder, None
        if encoder is not None and not (request.offset | request.length) % BLOCK_SIZE:
            if encoder.offloading:
                encoder.encode(split_pages(request.data),
                               lambda encoded: self._place_offloaded(request, connection, done, started, encoded))
                return None
            encoded = encoder.observe(request.data)
        try:
            if encoded is None:
                batch = self.store.write_now(request.offset, request.data)
            else:
                batch = self.store.write_encoded_now(request.offset, encoded)
        except Exception as error:  # noqa: BLE001 - every failure becomes an NBD error
            self._fail(request, connection, "write", error)
            self.stats["write"].record(request.length, perf_counter_ns() - started)
            done(request)
            return None
        if batch is None:
            return self._execute_in_order(request, connection)
        self._reply_when_committed(batch, request, connection, done, started)
        return None

    def _place_offloaded(self, request: Request, connection: ServerConnection, done: Callable[[Request], None],
                         started: int, encoded: list[Encoded] | Exception) -> None:
        """The rest of :meth:`_submit_write` for pages the encoder workers encoded.  A
        page for a tier that must be awaited (the remote tier, rarely) is written by an
        :meth:`execute` task instead, which encodes it again; the encoder hands over no
        later write meanwhile."""
        try:
            if isinstance(encoded, Exception):
                raise encoded
            batch = self.store.write_encoded_now(request.offset, encoded)
        except Exception as error:  # noqa: BLE001 - every failure becomes an NBD error
            self._fail(request, connection, "write", error)
            self.stats["write"].record(request.length, perf_counter_ns() - started)
            done(request)
            return
        if batch is None:
            task = asyncio.get_running_loop().create_task(self.execute(request, connection))
            self._slow_writes.add(task)
            self.encoder.pause()
            task.add_done_callback(lambda _: self._slow_write_done(task, request, done))
            return
        self._reply_when_committed(batch, request, connection, done, started)

    def _slow_write_done(self, task: asyncio.Task, request: Request, done: Callable[[Request], None]) -> None:
        self._slow_writes.discard(task)
        try:
            done(request)
        finally:
            self.encoder.resume()

    def _reply_when_committed(self, batch: _Batch, request: Request, connection: ServerConnection,
                              done: Callable[[Request], None], started: int) -> None:
        """Answer the write once ``batch`` is committed.  The writes staged in one batch
        share one callback and one list: a closure per write, its call and a clock read
        per write cost 3.1k instructions of a write's 150k together
        (bench/write_instructions.py)."""
        reply = (request, connection, done, started)
        if batch is self._replies_batch:
            self._replies.append(reply)
            return
        self._replies_batch, replies = batch, [reply]
        self._replies = replies
        self.store.when_committed(batch, lambda error: self._answer_writes(replies, error))

    def _answer_writes(self, replies: list[_PendingReply], error: str | None) -> None:
        """Reply to the writes of a committed (or failed) batch, in the order staged."""
        if replies is self._replies:
            self._replies_batch, self._replies = None, []  # the batch is no longer kept alive
        record, finished = self.stats["write"].record, perf_counter_ns()
        for request, connection, done, started in replies:
            try:
                if error is None:
                    connection.reply_ok(request)
                else:
                    self._fail(request, connection, "write", StoreError(error))
                record(request.length, finished - started)
                done(request)
            except Exception:  # noqa: BLE001 - a bug answering one must not strand the others
                log.exception("answering %r failed", request)

    async def execute(self, request: Request, connection: ServerConnection) -> None:
        """Run ``request`` and queue its reply on ``connection``."""
        started = perf_counter_ns()
        operation = OPERATION_NAMES[request.command]
        try:
            await self._EXECUTORS[request.command](self, request, connection)
        except Exception as error:  # noqa: BLE001 - every failure becomes an NBD error
            self._fail(request, connection, operation, error)
        self.stats[operation].record(request.length, perf_counter_ns() - started)

    def _fail(self, request: Request, connection: ServerConnection, operation: str,
              error: Exception) -> None:
        """Reply with the NBD error for ``error`` and count it."""
        errno = self._errno_for(error, request)
        self.errors[(operation, errno.name)] += 1
        connection.reply_error(request, errno, str(error) or type(error).__name__)

    def requests_served(self) -> int:
        """Requests of every operation executed so far (the policy engine's load gauge)."""
        return sum(stats.requests for stats in self.stats.values())

    def count_rejected(self, command: int, error: Errno) -> None:
        """Count a request the protocol layer refused."""
        try:
            operation = OPERATION_NAMES[Command(command)]
        except (KeyError, ValueError):
            operation = "unknown"
        self.errors[(operation, error.name)] += 1

    def _errno_for(self, error: Exception, request: Request) -> Errno:
        if isinstance(error, NoSpaceError):
            return Errno.ENOSPC
        if isinstance(error, CorruptBlockError):
            self.corrupt_block_errors += 1
            log.error("%r: %s", request, error)
            return Errno.EIO
        if isinstance(error, (StoreError, OSError)):
            log.error("%r failed: %s", request, error)
            return Errno.EIO
        log.exception("%r failed unexpectedly", request)
        return Errno.EIO

    async def _read(self, request: Request, connection: ServerConnection) -> None:
        data = await self.store.read(request.offset, request.length)
        connection.reply_read(request, data)

    async def _write(self, request: Request, connection: ServerConnection) -> None:
        await self.store.write(request.offset, request.data, fua=request.fua)
        connection.reply_ok(request)

    async def _flush(self, request: Request, connection: ServerConnection) -> None:
        await self.store.flush()
        connection.reply_ok(request)

    async def _trim(self, request: Request, connection: ServerConnection) -> None:
        await self.store.trim(request.offset, request.length, fua=request.fua)
        connection.reply_ok(request)

    async def _cache(self, request: Request, connection: ServerConnection) -> None:
        """Every tier is readable directly, so there is nothing to prefetch yet."""
        connection.reply_ok(request)

    async def _write_zeroes(self, request: Request, connection: ServerConnection) -> None:
        # Zeroing only rewrites map entries, so it is always faster than a write
        # and FAST_ZERO never needs to fail with ENOTSUP.
        may_trim = not request.flags & CommandFlag.NO_HOLE
        await self.store.write_zeroes(request.offset, request.length, may_trim=may_trim, fua=request.fua)
        connection.reply_ok(request)

    async def _block_status(self, request: Request, connection: ServerConnection) -> None:
        length = min(request.length, MAXIMUM_STATUS_SPAN)
        extents = self.store.extents(request.offset, length)
        connection.reply_block_status(request, {BASE_ALLOCATION_CONTEXT_ID: extents})

    _EXECUTORS = {
        Command.READ: _read,
        Command.WRITE: _write,
        Command.FLUSH: _flush,
        Command.TRIM: _trim,
        Command.CACHE: _cache,
        Command.WRITE_ZEROES: _write_zeroes,
        Command.BLOCK_STATUS: _block_status,
    }

    def status(self) -> dict:
        """The device part of ``nbdswap status``."""
        errors: dict[str, dict[str, int]] = {}
        for (operation, errno), count in self.errors.items():
            errors.setdefault(operation, {})[errno] = count
        encoder = {} if self.encoder is None else {"encoder": self.encoder.stats()}
        return {
            **encoder,
            "export": {"name": self.export.name, "size": self.export.size},
            "requests": {name: stats.requests for name, stats in self.stats.items()},
            "request_bytes": {name: stats.bytes for name, stats in self.stats.items()},
            "errors": errors,
            "request_seconds": {name: stats.sum_ns / 1e9 for name, stats in self.stats.items()},
            "corrupt_block_errors": self.corrupt_block_errors,
        }
