"""The client side of the NBD handshake, blocking: enough to hand a socket to the kernel.

``nbdswap attach`` negotiates the export here (fixed newstyle, NBD_OPT_GO with a
block-size request) and then passes the connected socket to the kernel, which speaks
the transmission phase itself.  Standard library only.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from .protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
)

MAX_REPLY_LENGTH = 64 * 1024


class HandshakeError(Exception):
    """The server answered and cannot serve this export to this client: it refused the
    export or its options, or it does not speak fixed-newstyle NBD.  Asking again
    gets the same answer."""


class HandshakeInterrupted(HandshakeError):
    """The handshake ended without a verdict: the server closed the connection, or
    said it is shutting down (NBD_REP_ERR_SHUTDOWN).  It may answer once it is back."""


@dataclass(frozen=True)
class NegotiatedExport:
    size: int
    transmission_flags: int
    minimum_block_size: int = 1
    preferred_block_size: int = 4096
    maximum_payload: int = 32 * 1024 * 1024


def open_connection(address: str, timeout: float) -> socket.socket:
    """``unix:///PATH`` or ``tcp://HOST:PORT`` (``HOST:PORT``, ``HOST`` → port 10809)."""
    if address.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address[len("unix://"):])
        return sock
    host, port = _host_port(address.removeprefix("tcp://"))
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or 10809)
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, 10809
    return host, int(port)


def negotiate(sock: socket.socket, export: str) -> NegotiatedExport:
    """Fixed-newstyle handshake ending in NBD_OPT_GO; the socket is then in transmission."""
    magic, option_magic, flags = struct.unpack(">QQH", _receive(sock, 18))
    if magic != NBDMAGIC or option_magic != IHAVEOPT:
        raise HandshakeError("not a newstyle NBD server")
    if not flags & HandshakeFlag.FIXED_NEWSTYLE:
        raise HandshakeError("the server does not speak fixed newstyle")
    client_flags = ClientFlag.FIXED_NEWSTYLE
    if flags & HandshakeFlag.NO_ZEROES:
        client_flags |= ClientFlag.NO_ZEROES
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
    sock.sendall(struct.pack(">I", client_flags) + struct.pack(">QII", IHAVEOPT, Option.GO, len(data)) + data)
    return _read_go_replies(sock, export)


def _read_go_replies(sock: socket.socket, export: str) -> NegotiatedExport:
    size = flags = None
    block_sizes: tuple[int, ...] = ()
    while True:
        magic, _option, reply, length = struct.unpack(">QIII", _receive(sock, 20))
        if magic != OPTION_REPLY_MAGIC or length > MAX_REPLY_LENGTH:
            raise HandshakeError("malformed option reply")
        payload = _receive(sock, length)
        if reply == OptionReply.ACK:
            break
        if reply & (1 << 31):
            raise _refusal(export, reply, payload.decode(errors="replace"))
        if reply == OptionReply.INFO and len(payload) >= 2:
            (info,) = struct.unpack_from(">H", payload)
            if info == Info.EXPORT and len(payload) == 12:
                size, flags = struct.unpack_from(">QH", payload, 2)
            elif info == Info.BLOCK_SIZE and len(payload) == 14:
                block_sizes = struct.unpack_from(">III", payload, 2)
    if size is None:
        raise HandshakeError("the server sent no export information")
    return NegotiatedExport(size, flags, *block_sizes)


def _refusal(export: str, reply: int, message: str) -> HandshakeError:
    if reply == OptionReply.ERR_SHUTDOWN:
        return HandshakeInterrupted(f"the server is shutting down: {message}")
    name = OptionReply(reply).name if reply in OptionReply._value2member_map_ else f"error {reply:#x}"
    return HandshakeError(f"export {export!r} refused ({name}): {message}")


def _receive(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise HandshakeInterrupted("the server closed the connection during the handshake")
        data += chunk
    return bytes(data)
