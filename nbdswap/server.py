"""asyncio adapter between sockets and the sans-IO protocol.

An ``asyncio.Protocol`` per connection (about half the CPU per request of a
StreamReader loop): every complete request in a ``data_received`` chunk is parsed at
once and run concurrently (RAM reads and whole-block writes without a task, see
:meth:`BlockDevice.submit`); replies are gathered and written once per loop turn;
reading pauses while too many bytes are in flight or the socket is not draining.

Hostile peers are bounded by :class:`ServerPolicy`: a TCP allowlist, connection
limits (total and per peer), a handshake deadline, the option length limit and the
in-flight budget; each logs one line when it triggers.  NBD_OPT_STARTTLS upgrades the
transport in place with ``loop.start_tls``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import stat
import struct
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from .addresses import ListenAddress
from .device import BlockDevice
from .protocol import (
    Disconnect,
    Errno,
    ExportCatalog,
    OptionHandled,
    OptionTooLarge,
    ProtocolViolation,
    Request,
    RequestRejected,
    ServerConnection,
    StartTLS,
    TlsMode,
    TransmissionStarted,
)
from .protocol.connection import MAX_OPTION_LENGTH

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class ServerPolicy:
    """Limits, access control and TLS of the NBD listeners."""

    #: Seconds from accept to transmission (TLS handshake included).
    handshake_timeout: float = 10.0
    #: On shutdown, seconds a connection may stay half-closed (TLS: after close_notify)
    #: after its last reply while the client reads the replies and closes (see
    #: ``NBDConnection._linger``).
    shutdown_linger: float = 5.0
    #: Longer option payloads are skipped unbuffered and refused.
    max_option_length: int = MAX_OPTION_LENGTH
    max_connections: int = 256
    #: Per TCP peer address, or per local user id on Unix sockets.
    max_connections_per_peer: int = 64
    #: Pause reading from a connection while its requests hold more than this many
    #: payload bytes (write data received plus read data being produced).
    max_in_flight: int = 64 * 1024 * 1024
    #: TCP peers must be in one of these networks (empty: any peer).
    allow: tuple[IPNetwork, ...] = ()
    socket_mode: int = 0o660
    socket_gid: int | None = None
    tls: TlsMode = TlsMode.OFF
    tls_context: ssl.SSLContext | None = None

    def allows(self, host: str) -> bool:
        """Whether the TCP peer ``host`` may connect."""
        if not self.allow:
            return True
        address = ipaddress.ip_address(host.partition("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)


def tls_server_context(cert: Path, key: Path, ca: Path | None, verify_peer: bool) -> ssl.SSLContext:
    """An X.509 server context (TLS 1.2 or later); with ``verify_peer`` clients must
    present a certificate signed by ``ca``.  Raises ``OSError``/``ssl.SSLError``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if verify_peer:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class NBDConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: NBDServer) -> None:
        policy = server.policy
        self._server = server
        self._device = server.device
        self._protocol = ServerConnection(server.catalog, tls=policy.tls,
                                          max_option_length=policy.max_option_length)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # cached: each lookup costs a getpid()
        self._tasks: dict[asyncio.Task, Request] = {}
        self._pending = 0  # requests started and not yet answered (tasks included)
        self._deferred: deque[Request] = deque()
        self._in_flight_bytes = 0
        self._answered_bytes = 0  # in flight until their replies are flushed
        self._max_in_flight = policy.max_in_flight
        self._budget_logged = False
        self._flush_scheduled = False
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._lingering = False
        self._peer = "?"
        self.peer_key = ""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task | None = None
        self._idle: asyncio.Event | None = None  # only while wait_idle() waits
        self.closed = asyncio.Event()

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer, self.peer_key = f"{peer[0]}:{peer[1]}", peer[0]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self._peer = self.peer_key = _unix_peer(sock)
        if not self._server.admit(self):
            transport.abort()
            return
        timeout = self._server.policy.handshake_timeout
        self._handshake_timer = self._loop.call_later(timeout, self._handshake_expired)
        self._flush()
        if self._server.shutting_down:
            self.close()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # sent after the last reply of a shutdown: dropped unread, never run
        self._protocol.receive_data(data)
        self._process()

    def _process(self) -> None:
        for event in self._protocol.events():
            if type(event) is Request:  # the common event, spared a call (measured)
                self._start(event)
            else:
                self._handle_event(event)
        self._flush()

    def eof_received(self) -> bool:
        if self._lingering:
            return False  # the client has read every reply: close
        self._closing = True
        self._close_when_idle()
        return not self._protocol.tls_active  # TLS has no half-close: let it close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._deferred.clear()  # their replies could not be delivered
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._server.release(self):
            log.debug("connection from %s closed", self._peer)
        self.closed.set()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._start_deferred()
        self._update_reading()

    # --- events ------------------------------------------------------------------

    def _handle_event(self, event) -> None:
        """Every event but a :class:`Request`, which :meth:`_process` starts itself."""
        if isinstance(event, RequestRejected):
            self._device.count_rejected(event.command, event.error)
            log.info("%s: rejected %s request: %s", self._peer, event.command, event.reason)
        elif isinstance(event, TransmissionStarted):
            self._handshake_timer.cancel()
            log.info("%s: transmission on export %r (structured replies: %s, TLS: %s)",
                     self._peer, event.export.name, event.structured_replies,
                     self._protocol.tls_active)
        elif isinstance(event, OptionHandled):
            log.debug("%s: option %d answered %s", self._peer, event.option, event.reply.name)
        elif isinstance(event, OptionTooLarge):
            log.warning("%s: option %d declares %d bytes, above --max-option-length %d: "
                        "skipping it unread", self._peer, event.option, event.length, event.limit)
        elif isinstance(event, StartTLS):
            self._start_tls()
        elif isinstance(event, ProtocolViolation):
            log.warning("%s: closing: %s", self._peer, event.reason)
            self._closing = True
            self._close_when_idle()
        elif isinstance(event, Disconnect):
            self._closing = True
            self._close_when_idle()

    def _start(self, request: Request) -> None:
        if self._server.shutting_down:
            self._protocol.reply_error(request, Errno.ESHUTDOWN, "server is shutting down")
            return
        if self._in_flight_bytes > self._max_in_flight or self._writing_paused:
            # One chunk may hold thousands of 28-byte requests for 32 MiB each: they
            # wait here (a few bytes each) instead of producing their data at once.
            self._deferred.append(request)
            self._update_reading()
            return
        self._launch(request)

    def _start_deferred(self) -> None:
        while (self._deferred and not self._writing_paused
               and self._in_flight_bytes <= self._max_in_flight):
            self._launch(self._deferred.popleft())

    def _launch(self, request: Request) -> None:
        """Start ``request``.  It only adds bytes in flight, so reading can only have
        to pause, and only when over budget: :meth:`_update_reading` is called just
        then, sparing every other request a call."""
        self._in_flight_bytes += request.payload_size
        self._pending += 1
        coroutine = self._device.submit(request, self._protocol, self._finished)
        if coroutine is not None:
            task = self._loop.create_task(coroutine)
            self._tasks[task] = request
            task.add_done_callback(self._task_done)
        if self._in_flight_bytes > self._max_in_flight:
            self._update_reading()

    # --- handshake: deadline and TLS ------------------------------------------------

    def _handshake_expired(self) -> None:
        log.warning("%s: handshake not finished within %g s (--handshake-timeout): closing",
                    self._peer, self._server.policy.handshake_timeout)
        if self._tls_task is not None:
            self._tls_task.cancel()
        self._transport.abort()

    def _start_tls(self) -> None:
        """The ACK goes out in plain text, then nothing more is read unencrypted."""
        self._flush()
        self._transport.pause_reading()
        self._tls_task = self._loop.create_task(self._upgrade(self._transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport = await loop.start_tls(
                transport, self, self._server.policy.tls_context, server_side=True,
                ssl_handshake_timeout=self._server.policy.handshake_timeout)
        except (OSError, asyncio.CancelledError, asyncio.TimeoutError) as error:
            log.warning("%s: TLS handshake failed: %s", self._peer, str(error) or type(error).__name__)
            transport.abort()
            self.connection_lost(None)
            return
        ssl_object = self._transport.get_extra_info("ssl_object")
        log.info("%s: TLS established (%s, %s, client certificate: %s)", self._peer,
                 ssl_object.version(), ssl_object.cipher()[0], _subject(ssl_object))
        self._protocol.tls_established()
        self._process()

    def _task_done(self, task: asyncio.Task) -> None:
        self._finished(self._tasks.pop(task))

    def _finished(self, request: Request) -> None:
        """A request's reply is queued.  Its bytes stay counted in flight until
        :meth:`_flush` hands the reply to the transport (whose own limit takes over
        then): reads answered at once would otherwise escape the budget."""
        self._pending -= 1
        self._answered_bytes += request.payload_size
        if not self._pending and self._idle is not None:
            self._idle.set()
            self._idle = None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._closing:
            self._close_when_idle()

    async def wait_idle(self) -> None:
        """Return once no request of this connection is pending.  Only a shutdown waits
        for that, so the event exists only while it waits: one kept set and cleared
        around every RAM read answered at once cost 17 of a read's 758 bytecodes."""
        if self._pending:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    # --- output and flow control ------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._protocol.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(data)
        if self._answered_bytes:
            self._in_flight_bytes -= self._answered_bytes
            self._answered_bytes = 0
            if self._deferred:
                self._start_deferred()
            self._update_reading()

    def _update_reading(self) -> None:
        if self._transport is None or self._transport.is_closing() or self._lingering:
            return
        over_budget = self._in_flight_bytes > self._max_in_flight
        want_pause = self._writing_paused or self._closing or over_budget
        if want_pause and not self._reading_paused:
            if over_budget and not self._budget_logged:
                self._log_budget()
            self._transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False

    def _log_budget(self) -> None:
        self._budget_logged = True
        log.info("%s: %d bytes in flight, above --max-in-flight %d: reading paused until "
                 "requests finish (logged once per connection)",
                 self._peer, self._in_flight_bytes, self._max_in_flight)

    def _close_when_idle(self) -> None:
        """Finish every request read (those waiting for the in-flight budget too: their
        data is in memory), send the replies, then close (or, on a shutdown, linger)."""
        while self._deferred:
            self._launch(self._deferred.popleft())
        self._update_reading()
        if self._pending or self._transport is None:
            return
        self._flush()
        if self._transport.is_closing() or self._lingering:
            return
        if self._server.shutting_down and self._transport.can_write_eof():
            self._linger()
        else:
            self._transport.close()

    def _linger(self) -> None:
        """Half-close after the last reply, then read and drop what the client still
        sends until it closes too.  Closing with its requests unread would reset the
        connection, and the client would lose the replies it had not read yet: it
        could not tell a write that was done from one never read.  Bounded by
        :attr:`ServerPolicy.shutdown_linger` in :meth:`NBDServer.shutdown`.

        A TLS transport cannot half-close and needs no linger: its ``close()`` sends
        close_notify, then reads and drops until the client's close_notify or EOF
        (uvloop's SSL shutdown), within the same bound."""
        self._lingering = True
        self._transport.write_eof()
        if self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False

    def close(self) -> None:
        """Graceful close: stop reading, finish and answer every request read."""
        self._closing = True
        self._close_when_idle()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class NBDServer:
    """Listens on every address and serves the one device to all connections."""

    def __init__(self, device: BlockDevice, policy: ServerPolicy | None = None) -> None:
        self.device = device
        self.policy = policy or ServerPolicy()
        if self.policy.tls is not TlsMode.OFF and self.policy.tls_context is None:
            raise ValueError("TLS needs a certificate (tls_context)")
        self.catalog = ExportCatalog([device.export])
        self.connections: set[NBDConnection] = set()
        self._per_peer: Counter[str] = Counter()
        self.shutting_down = False
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[Path] = []

    async def listen(self, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: NBDConnection(self)  # noqa: E731
        if address.kind == "unix":
            path = Path(address.path)
            _remove_stale_socket(path)
            sock = _bind_unix(path, self.policy.socket_mode, self.policy.socket_gid)
            self._unix_paths.append(path)
            server = await loop.create_unix_server(factory, sock=sock)
        else:
            server = await loop.create_server(factory, address.host, address.port,
                                              reuse_address=True)
            self._warn_if_exposed(address)
        self._servers.append(server)
        log.info("listening on %s", address)

    def _warn_if_exposed(self, address: ListenAddress) -> None:
        try:
            loopback = ipaddress.ip_address(address.host).is_loopback
        except ValueError:  # a host name
            loopback = address.host == "localhost"
        if not loopback and not self.policy.allow and self.policy.tls is not TlsMode.REQUIRE:
            log.warning("%s is not loopback and neither --allow nor --tls=require is set: "
                        "any host that reaches it can read and write the device", address)

    def admit(self, connection: NBDConnection) -> bool:
        """Register a new connection, or log why it is refused."""
        peer = connection.peer_key
        reason = None
        if not peer.startswith("uid ") and not self.policy.allows(peer):
            reason = "not in the --allow list"
        elif len(self.connections) >= self.policy.max_connections:
            reason = f"{len(self.connections)} connections open (--max-connections)"
        elif self._per_peer[peer] >= self.policy.max_connections_per_peer:
            reason = f"{self._per_peer[peer]} connections open from it (--max-connections-per-peer)"
        if reason is not None:
            log.warning("refused connection from %s: %s", peer, reason)
            return False
        self.connections.add(connection)
        self._per_peer[peer] += 1
        return True

    def release(self, connection: NBDConnection) -> bool:
        """Forget a connection; False if it was not (or no longer) registered."""
        if connection not in self.connections:
            return False
        self.connections.discard(connection)
        self._per_peer[connection.peer_key] -= 1
        if not self._per_peer[connection.peer_key]:
            del self._per_peer[connection.peer_key]
        return True

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests, close every connection."""
        self.shutting_down = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.close()
        for connection in list(self.connections):
            await connection.wait_idle()
        closed = [asyncio.create_task(connection.closed.wait()) for connection in self.connections]
        if closed:
            await asyncio.wait(closed, timeout=self.policy.shutdown_linger)
            for connection in list(self.connections):
                connection.abort()
            await asyncio.wait(closed, timeout=1.0)  # an abort's connection_lost comes next turn
            for waiter in closed:
                waiter.cancel()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            path.unlink(missing_ok=True)


def _unix_peer(sock) -> str:
    """A Unix socket peer is its user: ``uid N`` (from SO_PEERCRED)."""
    try:
        _pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, AttributeError):
        return "uid ?"
    return f"uid {uid}"


def _subject(ssl_object: ssl.SSLObject) -> str:
    certificate = ssl_object.getpeercert()
    if not certificate:
        return "none"
    return ",".join(f"{key}={value}" for rdn in certificate.get("subject", ()) for key, value in rdn)


def _bind_unix(path: Path, mode: int, gid: int | None) -> socket.socket:
    """A bound, not yet listening Unix socket with its final mode and group (nobody
    can connect before ``listen``, so there is no window with looser permissions)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except BaseException:
        sock.close()
        path.unlink()
        raise
    return sock


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a previous run; refuse to remove anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise OSError(f"{path} is in use by another server")
    finally:
        probe.close()
