"""asyncio adapter between sockets and the sans-IO protocol.

An ``asyncio.Protocol`` per connection (about half the CPU per request of a
StreamReader loop): every complete request in a ``data_received`` chunk is parsed at
once and run concurrently; replies are gathered and written once per loop turn;
reading pauses while too many bytes are in flight or the socket is not draining.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from .device import BlockDevice
from .protocol import (
    Command,
    Disconnect,
    Errno,
    ExportCatalog,
    OptionHandled,
    ProtocolViolation,
    Request,
    RequestRejected,
    ServerConnection,
    TransmissionStarted,
)

log = logging.getLogger(__name__)

#: Pause reading from a connection while its requests hold more than this many
#: payload bytes (write data received plus read data being produced).
IN_FLIGHT_BUDGET = 64 * 1024 * 1024


@dataclass(frozen=True)
class ListenAddress:
    """``tcp://HOST:PORT`` or ``unix:///PATH``."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, url: str) -> ListenAddress:
        if url.startswith("unix://"):
            path = url[len("unix://"):]
            if not path:
                raise ValueError(f"{url!r}: a unix address needs a path (unix:///run/x.sock)")
            return cls("unix", path=path)
        if url.startswith("tcp://"):
            rest = url[len("tcp://"):]
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"{url!r}: expected tcp://HOST:PORT")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if not 0 < int(port) < 65536:
                raise ValueError(f"{url!r}: port out of range")
            return cls("tcp", host=host, port=int(port))
        raise ValueError(f"{url!r}: expected tcp://HOST:PORT or unix:///PATH")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


class NBDConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: NBDServer) -> None:
        self._server = server
        self._device = server.device
        self._protocol = ServerConnection(server.catalog)
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task] = set()
        self._in_flight_bytes = 0
        self._flush_scheduled = False
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._peer = "?"
        self.idle = asyncio.Event()
        self.idle.set()

    # --- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)
        self._flush()
        if self._server.shutting_down:
            self.close()

    def data_received(self, data: bytes) -> None:
        self._protocol.receive_data(data)
        while (event := self._protocol.next_event()) is not None:
            self._handle_event(event)
        self._flush()

    def eof_received(self) -> bool:
        self._closing = True
        self._close_when_idle()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)
        log.debug("connection from %s closed", self._peer)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # --- events ------------------------------------------------------------------

    def _handle_event(self, event) -> None:
        if isinstance(event, Request):
            self._start(event)
        elif isinstance(event, RequestRejected):
            self._device.count_rejected(event.command, event.error)
            log.info("%s: rejected %s request: %s", self._peer, event.command, event.reason)
        elif isinstance(event, TransmissionStarted):
            log.info("%s: transmission on export %r (structured replies: %s)",
                     self._peer, event.export.name, event.structured_replies)
        elif isinstance(event, OptionHandled):
            log.debug("%s: option %d answered %s", self._peer, event.option, event.reply.name)
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
        size = request.length if request.command in (Command.READ, Command.WRITE) else 0
        self._in_flight_bytes += size
        self.idle.clear()
        task = asyncio.get_running_loop().create_task(self._device.execute(request, self._protocol))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, size))
        self._update_reading()

    def _finished(self, task: asyncio.Task, size: int) -> None:
        self._tasks.discard(task)
        self._in_flight_bytes -= size
        if not self._tasks:
            self.idle.set()
        self._schedule_flush()
        self._update_reading()
        if self._closing:
            self._close_when_idle()

    # --- output and flow control ------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._protocol.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(data)

    def _update_reading(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        want_pause = (self._writing_paused or self._closing
                      or self._in_flight_bytes > IN_FLIGHT_BUDGET)
        if want_pause and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False

    def _close_when_idle(self) -> None:
        """Finish in-flight requests and send their replies, then close."""
        self._update_reading()
        if self._tasks or self._transport is None:
            return
        self._flush()
        if not self._transport.is_closing():
            self._transport.close()

    def close(self) -> None:
        """Graceful close: stop reading, let in-flight requests finish."""
        self._closing = True
        self._close_when_idle()


class NBDServer:
    """Listens on every address and serves the one device to all connections."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.catalog = ExportCatalog([device.export])
        self.connections: set[NBDConnection] = set()
        self.shutting_down = False
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[Path] = []

    async def listen(self, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: NBDConnection(self)  # noqa: E731
        if address.kind == "unix":
            path = Path(address.path)
            _remove_stale_socket(path)
            server = await loop.create_unix_server(factory, str(path))
            self._unix_paths.append(path)
        else:
            server = await loop.create_server(factory, address.host, address.port,
                                              reuse_address=True)
        self._servers.append(server)
        log.info("listening on %s", address)

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests, close every connection."""
        self.shutting_down = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.close()
        for connection in list(self.connections):
            await connection.idle.wait()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            path.unlink(missing_ok=True)


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
