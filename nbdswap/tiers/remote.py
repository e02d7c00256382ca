"""The remote tier: payloads as values in Redis or Valkey (standalone, Sentinel or Cluster).

Addresses.  A payload's address is a 56-bit key id ``epoch << 40 | sequence``.  The store
gives each start of a state directory a new epoch (a counter in the block map's
metadata), so ids are never reused: a key this process did not write in its own epoch
was written by an earlier run.

Keys.  ``PREFIX{INSTANCE:SEGMENT}:ID`` in hex, fixed width: ``PREFIX`` is configurable
(``nbdswap:`` by default), ``INSTANCE`` the state directory's instance id, so several
servers share one Redis without collisions, and ``SEGMENT`` is the id without its low
:data:`SEGMENT_BITS` bits.  The braces are a Cluster hash tag: the keys of one segment
live in one slot, so a batch of consecutive ids is one MSET even in a Cluster.

Values.  A small header (format, payload length, key id) and the payload: one page
(at most 4 KiB) or a grouped payload of several (at most :data:`MAX_PAYLOAD`).  The header
catches a value that is not the one the map expects; the block's checksum, kept in the
map, catches damaged bytes (both read as EIO).

Batching.  Puts, gets and deletes issued during one turn of the event loop are sent
together, one MSET / MGET / DEL per segment in a Cluster and one in all otherwise, with
at most ``pool`` commands in flight.

Outages.  A failed command marks the tier down (counted in ``errors``); while it is down
:meth:`RemoteTier.has_room` is false, so new blocks land in the local tiers, and a
background probe (PING every ``retry_interval``) marks it up again.  A read of a remote
block retries until ``timeout`` and then fails with :class:`TierUnavailableError` (EIO
for that request only).  Deletes wait in memory until Redis is back.

Orphans.  A key whose put succeeded but whose map entry was never committed (a crash in
between) belongs to an earlier epoch and is absent from the map.  At start a background
task SCANs this instance's keys and deletes such keys; the addresses the map holds are
kept in a sorted array (8 bytes per remote block) until that sweep is done.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import struct
from array import array
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import unquote, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..blockmap import TIER_REMOTE
from ..codec import GROUP_PAYLOAD_LIMIT
from ..config import RemoteSettings
from ..errors import CorruptBlockError, NoSpaceError, TierUnavailableError
from . import Tier

log = logging.getLogger(__name__)

SEQUENCE_BITS = 40
#: Key ids must fit the block map's 56-bit addresses: 65,535 starts of one state dir.
EPOCH_LIMIT = 1 << (56 - SEQUENCE_BITS)
SEGMENT_BITS = 10
#: Keys per MSET / MGET / DEL command.
MAX_BATCH = 256
#: Keys asked for per SCAN call during the orphan sweep.
SCAN_COUNT = 1000
#: The largest value payload: a grouped payload (the store groups cold pages here too).
MAX_PAYLOAD = GROUP_PAYLOAD_LIMIT

_HEADER = struct.Struct("<BHQ")  # format, payload length, key id
_FORMAT = 1
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel")


def connect(settings: RemoteSettings) -> tuple[aioredis.Redis | RedisCluster, bool]:
    """A client for ``settings.url`` (no I/O yet) and whether it is a Cluster client.

    ``redis://`` / ``rediss://`` / ``unix://``: standalone; ``redis+cluster://HOST:PORT``
    (or ``rediss+cluster``): a Cluster reached through any of its nodes;
    ``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``: the master Sentinel names.
    Retries are ours (:class:`RemoteTier`), so the client's own are switched off.
    """
    scheme = check_url(settings.url)
    options = dict(socket_timeout=settings.command_timeout,
                   socket_connect_timeout=settings.command_timeout,
                   retry=Retry(NoBackoff(), 0))
    if scheme.endswith("+cluster"):
        url = settings.url.replace("+cluster", "", 1)
        return RedisCluster.from_url(url, max_connections=settings.pool, **options), True
    if scheme == "redis+sentinel":
        return _sentinel_master(settings.url, options), False
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.pool, timeout=settings.command_timeout, **options)
    return aioredis.Redis(connection_pool=pool), False


def check_url(url: str) -> str:
    """The scheme of a remote URL; :class:`ValueError` for one :func:`connect` refuses."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"{url!r}: the remote URL must start with one of "
                         + ", ".join(f"{name}://" for name in SCHEMES))
    if scheme == "redis+sentinel":
        _sentinel_address(url)
    return scheme


def _sentinel_address(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """Sentinels, service name and database of a ``redis+sentinel://`` URL."""
    parts = urlsplit(url)
    path = [piece for piece in parts.path.split("/") if piece]
    try:
        hosts = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        if not 1 <= len(path) <= 2:
            raise ValueError
        return hosts, path[0], int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"{url!r}: expected redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]") from None


def _sentinel_master(url: str, options: dict) -> aioredis.Redis:
    hosts, service, db = _sentinel_address(url)
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    sentinel = Sentinel(hosts, sentinel_kwargs=options, **options)
    return sentinel.master_for(service, db=db, password=password)


class _Batches:
    """Requests queued during one loop turn, sent by one callback at the end of it."""

    def __init__(self, send: Callable[[list], Awaitable[None]]) -> None:
        self._send = send
        self._queued: list = []
        self.tasks: set[asyncio.Task] = set()

    def add(self, item) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(item)

    def extend(self, items: Iterable) -> None:
        for item in items:
            self.add(item)

    async def drain(self, timeout: float) -> None:
        """Send what is queued now and wait (up to ``timeout``) for every batch in flight."""
        self._flush()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), MAX_BATCH):
            task = asyncio.get_running_loop().create_task(self._send(queued[start : start + MAX_BATCH]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


class RemoteTier(Tier):
    """Payloads in Redis/Valkey under this instance's keys.  Use :meth:`open`."""

    name = "remote"
    tier_id = TIER_REMOTE

    def __init__(self, client, cluster: bool, settings: RemoteSettings, instance: str, epoch: int) -> None:
        if not 0 < epoch < EPOCH_LIMIT:
            raise ValueError(f"remote epoch {epoch} outside 1..{EPOCH_LIMIT - 1}")
        self._client = client
        self._cluster = cluster
        self.settings = settings
        self._head = f"{settings.prefix}{{{instance}:"  # the key up to the segment
        self._first_addr = self._next_addr = epoch << SEQUENCE_BITS
        self._value_overhead = _HEADER.size + len(self.key(0))
        self._puts = _Batches(self._send_puts)
        self._gets = _Batches(self._send_gets)
        self._deletes = _Batches(self._send_deletes)
        self._slots = asyncio.Semaphore(settings.pool)
        self._referenced: array | None = array("Q")  # map addresses, until the sweep
        self._undelivered: list[int] = []  # deletes waiting for Redis to come back
        self._background: set[asyncio.Task] = set()
        self._probe: asyncio.Task | None = None
        self._blocks = self._stored_bytes = self._reserved = 0
        self.up = True
        self.errors = 0
        self.orphans_removed = 0
        self.last_error: str | None = None

    @classmethod
    def open(cls, settings: RemoteSettings, instance: str, epoch: int) -> RemoteTier:
        """A tier for ``instance``'s keys, handing out ids of ``epoch``; connects lazily."""
        client, cluster = connect(settings)
        return cls(client, cluster, settings, instance, epoch)

    # --- keys and values --------------------------------------------------------------

    def key(self, addr: int) -> bytes:
        return f"{self._head}{addr >> SEGMENT_BITS:014x}}}:{addr:016x}".encode()

    def _addr_of(self, key: bytes) -> int | None:
        """The key id of one of this instance's keys, ``None`` for anything else."""
        head, _, tail = key.rpartition(b":")
        if len(tail) != 16 or not head.startswith(self._head.encode()):
            return None
        try:
            return int(tail, 16)
        except ValueError:
            return None

    def _group(self, addrs: Iterable[int]) -> list[list[int]]:
        """Addresses per command: one group per segment in a Cluster (one slot each)."""
        if not self._cluster:
            return [list(addrs)]
        groups: dict[int, list[int]] = {}
        for addr in addrs:
            groups.setdefault(addr >> SEGMENT_BITS, []).append(addr)
        return list(groups.values())

    def _verify(self, addr: int, length: int, value: bytes | None) -> bytes:
        if value is None:
            raise CorruptBlockError(
                f"remote key {self.key(addr).decode()} is missing (evicted, flushed, or Redis "
                "restarted without persistence)")
        if len(value) == _HEADER.size + length and _HEADER.unpack_from(value) == (_FORMAT, length, addr):
            return value[_HEADER.size :]
        raise CorruptBlockError(f"remote key {self.key(addr).decode()} holds another value than expected")

    # --- the tier interface -------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.settings.max_bytes

    @property
    def blocks(self) -> int:
        return self._blocks

    @property
    def stored_bytes(self) -> int:
        return self._stored_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of keys and values this tier keeps in Redis (not Redis's own overhead)."""
        return self.stored_bytes + self.blocks * self._value_overhead

    def has_room(self, nbytes: int) -> bool:
        return self.up and self.used_bytes + self._reserved + nbytes + self._value_overhead <= self.capacity_bytes

    async def put(self, data: bytes) -> int:
        """Store ``data`` under a new key; returns once Redis acknowledged the write."""
        if not self.up:
            raise TierUnavailableError(f"the remote tier is down: {self.last_error}")
        cost = len(data) + self._value_overhead
        if self.used_bytes + self._reserved + cost > self.capacity_bytes:
            raise NoSpaceError("the remote tier is full")
        addr = self._next_addr
        self._next_addr += 1
        future = asyncio.get_running_loop().create_future()
        self._reserved += cost
        try:
            self._puts.add((addr, data, future))
            await future
        finally:
            self._reserved -= cost
        self._blocks += 1
        self._stored_bytes += len(data)
        return addr

    async def get(self, addr: int, length: int) -> bytes:
        """The payload at ``addr``, retrying while Redis is unreachable until the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout
        while True:
            future = loop.create_future()
            self._gets.add((addr, future))
            try:
                return self._verify(addr, length, await future)
            except TierUnavailableError:
                if loop.time() + self.settings.retry_interval > deadline:
                    raise
            await asyncio.sleep(self.settings.retry_interval)

    def free(self, addr: int, length: int) -> None:
        self._blocks -= 1
        self._stored_bytes -= length
        self._deletes.add(addr)

    def mark_used(self, addr: int, length: int) -> None:
        if not 0 < length <= MAX_PAYLOAD:
            raise ValueError(f"remote payload length {length} outside 1..{MAX_PAYLOAD}")
        if addr >= self._first_addr:
            raise ValueError(f"remote key id {addr:#x} is newer than this run's first id")
        self._blocks += 1
        self._stored_bytes += length
        if self._referenced is not None:
            self._referenced.append(addr)

    def start(self) -> None:
        """Begin the background orphan sweep (needs the running event loop)."""
        task = asyncio.get_running_loop().create_task(self._sweep_orphans())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_for_sweep(self) -> None:
        """Return once the orphan sweep started by :meth:`start` is done."""
        await asyncio.gather(*self._background)

    async def sync(self) -> None:
        """Nothing to do: a put returns once Redis acknowledged it; what survives a Redis
        crash is Redis's persistence setting (``appendfsync``)."""

    def close(self) -> None:
        """Stop the background work; :meth:`aclose` also closes the connections."""
        for task in (*self._background, self._probe):
            if task is not None:
                task.cancel()

    async def aclose(self) -> None:
        """Send the deletes already queued (best effort; the next start's sweep removes
        what is left), stop, close the connections."""
        await self._deletes.drain(self.settings.command_timeout)
        self.close()
        await self._client.aclose()

    def stats(self) -> dict:
        return {**super().stats(), "up": self.up, "errors_total": self.errors,
                "orphans_removed_total": self.orphans_removed, "last_error": self.last_error}

    # --- sending batches ----------------------------------------------------------------

    async def _command(self, name: str, *args):
        """Run one command; a Redis or connection error marks the tier down."""
        try:
            async with self._slots:
                result = await getattr(self._client, name)(*args)
        except (RedisError, OSError) as error:
            self._mark_down(error)
            raise TierUnavailableError(f"remote {name.upper()} failed: {error}") from error
        self.up = True
        return result

    async def _per_command(self, addrs: Iterable[int],
                           command: Callable[[list[int]], Awaitable]) -> list[tuple[list[int], object]]:
        """Run ``command`` on the addresses of each :meth:`_group` concurrently; its
        addresses and its result or exception, per command."""
        groups = self._group(addrs)
        outcomes = await asyncio.gather(*(command(group) for group in groups), return_exceptions=True)
        return list(zip(groups, outcomes))

    async def _send_puts(self, batch: list[tuple[int, bytes, asyncio.Future]]) -> None:
        values = {addr: (data, future) for addr, data, future in batch}
        outcomes = await self._per_command(values, lambda group: self._command(
            "mset", {self.key(addr): self._value(addr, values[addr][0]) for addr in group}))
        for group, outcome in outcomes:
            for addr in group:
                future = values[addr][1]
                if isinstance(outcome, BaseException):
                    self._deletes.add(addr)  # the write may have landed after all
                    if not future.done():
                        future.set_exception(outcome)
                elif future.done():  # the writer went away: nobody will map this key
                    self._deletes.add(addr)
                else:
                    future.set_result(None)

    @staticmethod
    def _value(addr: int, data: bytes) -> bytes:
        return _HEADER.pack(_FORMAT, len(data), addr) + data

    async def _send_gets(self, batch: list[tuple[int, asyncio.Future]]) -> None:
        addrs = dict.fromkeys(addr for addr, _ in batch)
        outcomes = await self._per_command(addrs, lambda group: self._command(
            "mget", [self.key(addr) for addr in group]))
        values: dict[int, bytes | None | BaseException] = {}
        for group, outcome in outcomes:
            for index, addr in enumerate(group):
                values[addr] = outcome if isinstance(outcome, BaseException) else outcome[index]
        for addr, future in batch:
            if future.done():
                continue
            value = values[addr]
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)

    async def _send_deletes(self, addrs: list[int]) -> None:
        outcomes = await self._per_command(dict.fromkeys(addrs), lambda group: self._command(
            "delete", *(self.key(addr) for addr in group)))
        for group, outcome in outcomes:
            if isinstance(outcome, BaseException):
                self._undelivered.extend(group)  # the probe sends them once Redis is back

    # --- health -------------------------------------------------------------------------

    def _mark_down(self, error: BaseException) -> None:
        self.errors += 1
        self.last_error = str(error) or type(error).__name__
        if self.up:
            log.error("remote tier is down: %s", self.last_error)
        self.up = False
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        """PING until Redis answers, then send the deletes that waited for it."""
        try:
            while True:
                await asyncio.sleep(self.settings.retry_interval)
                try:
                    await self._command("ping")
                    break
                except TierUnavailableError:
                    continue
        finally:
            self._probe = None
        log.warning("remote tier is up again")
        undelivered, self._undelivered = self._undelivered, []
        self._deletes.extend(undelivered)

    # --- orphans ------------------------------------------------------------------------

    async def _sweep_orphans(self) -> None:
        """Delete this instance's keys of earlier runs that the map does not reference."""
        referenced = array("Q", sorted(self._referenced))
        self._referenced = None
        while True:
            try:
                await self._sweep(referenced)
                break
            except TierUnavailableError:
                await asyncio.sleep(self.settings.retry_interval)
        if self.orphans_removed:
            log.warning("removed %d orphaned remote keys (writes a crash kept from the map)",
                        self.orphans_removed)

    async def _sweep(self, referenced: array) -> None:
        orphans: list[int] = []
        async for key in self._scan(_glob_escape(self._head) + "*"):
            addr = self._addr_of(key)
            if addr is not None and addr < self._first_addr and not _contains(referenced, addr):
                orphans.append(addr)
            if len(orphans) >= MAX_BATCH:
                await self._delete_orphans(orphans)
                orphans = []
        await self._delete_orphans(orphans)

    async def _scan(self, pattern: str):
        """SCAN this instance's keys (every master in a Cluster)."""
        try:
            async for key in self._client.scan_iter(match=pattern, count=SCAN_COUNT):
                yield key
        except (RedisError, OSError) as error:
            self._mark_down(error)
            raise TierUnavailableError(f"remote SCAN failed: {error}") from error

    async def _delete_orphans(self, addrs: list[int]) -> None:
        for group in self._group(addrs):
            if group:
                self.orphans_removed += await self._command("delete", *(self.key(addr) for addr in group))


def _contains(sorted_values: array, value: int) -> bool:
    index = bisect.bisect_left(sorted_values, value)
    return index < len(sorted_values) and sorted_values[index] == value


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
