"""The kernel's generic-netlink NBD interface (``linux/nbd-netlink.h``), from Python.

Only what ``nbdswap attach`` needs: CONNECT a device to sockets, RECONFIGURE it with
a new socket after its link died, DISCONNECT it, ask its STATUS, and listen for the
LINK_DEAD multicast.  Standard library only (the guest that runs it has nothing else).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2

NBD_FAMILY = "nbd"
NBD_VERSION = 1
NBD_MCAST_GROUP = "nbd_mc_group"
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_LINK_DEAD = 4
NBD_CMD_STATUS = 5
NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_BLOCK_SIZE_BYTES = 3
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SERVER_FLAGS = 5
NBD_ATTR_CLIENT_FLAGS = 6
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_ATTR_DEVICE_LIST = 9
NBD_ATTR_BACKEND_IDENTIFIER = 10
NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1
NBD_DEVICE_ITEM = 1
NBD_DEVICE_INDEX = 1
NBD_DEVICE_CONNECTED = 2

_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")


# --- attribute encoding --------------------------------------------------------


def attribute(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + bytes(-length % 4)


def u32(kind: int, value: int) -> bytes:
    return attribute(kind, struct.pack("=I", value))


def u64(kind: int, value: int) -> bytes:
    return attribute(kind, struct.pack("=Q", value))


def string(kind: int, value: str) -> bytes:
    return attribute(kind, value.encode() + b"\0")


def nested(kind: int, *attributes: bytes) -> bytes:
    return attribute(kind | NLA_F_NESTED, b"".join(attributes))


def parse_attributes(data: bytes) -> dict[int, bytes]:
    """Attributes by type (the last one wins); see :func:`iter_attributes`."""
    return dict(iter_attributes(data))


def iter_attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + _NLATTR.size:offset + length]
        offset += (length + 3) & ~3


# --- messages --------------------------------------------------------------------


@dataclass(frozen=True)
class GenlMessage:
    kind: int
    cmd: int
    attributes: bytes


class GenericNetlink:
    """One generic-netlink socket: requests with acknowledgement, or multicast."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._socket.bind((0, 0))
        self._sequence = 0

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> GenericNetlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, family: int, cmd: int, attributes: bytes = b"",
                version: int = NBD_VERSION) -> list[GenlMessage]:
        """Send a request, return its replies; raises OSError with the kernel's errno."""
        self._sequence += 1
        body = _GENLMSGHDR.pack(cmd, version, 0) + attributes
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK,
                                self._sequence, 0)
        self._socket.send(header + body)
        replies = []
        while True:
            for message in self._receive():
                if message.kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", message.attributes, 0)
                    if code:
                        raise OSError(-code, f"netlink command {cmd}: {os.strerror(-code)}")
                    return replies
                if message.kind != NLMSG_DONE:
                    replies.append(message)

    def subscribe(self, group: int) -> None:
        self._socket.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def receive(self, timeout: float | None = None) -> list[GenlMessage]:
        """Wait for messages (multicast notifications); empty after ``timeout``."""
        self._socket.settimeout(timeout)
        try:
            return list(self._receive())
        except TimeoutError:
            return []
        finally:
            self._socket.settimeout(None)

    def _receive(self) -> Iterator[GenlMessage]:
        data = self._socket.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            payload = data[offset + _NLMSGHDR.size:offset + length]
            if kind == NLMSG_ERROR:
                yield GenlMessage(kind, 0, payload)
            elif len(payload) >= _GENLMSGHDR.size:
                cmd = payload[0]
                yield GenlMessage(kind, cmd, payload[_GENLMSGHDR.size:])
            offset += (length + 3) & ~3


# --- the NBD family -------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSettings:
    """What the kernel needs to run ``/dev/nbdINDEX`` against an export."""

    size: int
    block_size: int
    server_flags: int
    timeout: int
    dead_connection_timeout: int
    backend: str


class NbdNetlink:
    """The ``nbd`` generic-netlink family."""

    def __init__(self) -> None:
        self._netlink = GenericNetlink()
        self._listener: GenericNetlink | None = None
        self.family, self.multicast_group = self._resolve_family()

    def close(self) -> None:
        self._netlink.close()
        if self._listener is not None:
            self._listener.close()

    def _resolve_family(self) -> tuple[int, int]:
        try:
            (reply,) = self._netlink.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                                             string(CTRL_ATTR_FAMILY_NAME, NBD_FAMILY), version=1)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, "the kernel has no nbd netlink family (modprobe nbd)") from None
        attributes = parse_attributes(reply.attributes)
        (family,) = struct.unpack("=H", attributes[CTRL_ATTR_FAMILY_ID][:2])
        group = 0
        for _, item in iter_attributes(attributes.get(CTRL_ATTR_MCAST_GROUPS, b"")):
            fields = parse_attributes(item)
            if fields.get(CTRL_ATTR_MCAST_GRP_NAME, b"").rstrip(b"\0") == NBD_MCAST_GROUP.encode():
                (group,) = struct.unpack("=I", fields[CTRL_ATTR_MCAST_GRP_ID][:4])
        return family, group

    def connect(self, index: int, settings: DeviceSettings, sockets: list[int]) -> int:
        """Attach ``/dev/nbdINDEX`` to connected, negotiated sockets; returns the index."""
        attributes = (
            u32(NBD_ATTR_INDEX, index)
            + u64(NBD_ATTR_SIZE_BYTES, settings.size)
            + u64(NBD_ATTR_BLOCK_SIZE_BYTES, settings.block_size)
            + u64(NBD_ATTR_SERVER_FLAGS, settings.server_flags)
            + u64(NBD_ATTR_TIMEOUT, settings.timeout)
            + u64(NBD_ATTR_DEAD_CONN_TIMEOUT, settings.dead_connection_timeout)
            + string(NBD_ATTR_BACKEND_IDENTIFIER, settings.backend)
            + _sockets(sockets)
        )
        for reply in self._netlink.request(self.family, NBD_CMD_CONNECT, attributes):
            value = parse_attributes(reply.attributes).get(NBD_ATTR_INDEX)
            if value is not None:
                return struct.unpack("=I", value[:4])[0]
        return index

    def reconfigure(self, index: int, backend: str, sockets: list[int]) -> None:
        """Give the device new sockets in place of dead ones (I/O waiting resumes)."""
        self._netlink.request(self.family, NBD_CMD_RECONFIGURE,
                              u32(NBD_ATTR_INDEX, index) + string(NBD_ATTR_BACKEND_IDENTIFIER, backend)
                              + _sockets(sockets))

    def disconnect(self, index: int) -> None:
        self._netlink.request(self.family, NBD_CMD_DISCONNECT, u32(NBD_ATTR_INDEX, index))

    def is_connected(self, index: int) -> bool:
        for reply in self._netlink.request(self.family, NBD_CMD_STATUS, u32(NBD_ATTR_INDEX, index)):
            devices = parse_attributes(reply.attributes).get(NBD_ATTR_DEVICE_LIST, b"")
            for _, item in iter_attributes(devices):
                fields = parse_attributes(item)
                if struct.unpack("=I", fields[NBD_DEVICE_INDEX][:4])[0] == index:
                    return fields.get(NBD_DEVICE_CONNECTED, b"\0")[0] == 1
        return False

    def dead_links(self, index: int, timeout: float | None) -> int:
        """Wait up to ``timeout`` for LINK_DEAD notifications of device ``index``;
        returns how many arrived.  Needs :meth:`listen` first."""
        assert self._listener is not None, "listen() first"
        dead = 0
        for message in self._listener.receive(timeout):
            if message.kind == self.family and message.cmd == NBD_CMD_LINK_DEAD:
                value = parse_attributes(message.attributes).get(NBD_ATTR_INDEX)
                if value is not None and struct.unpack("=I", value[:4])[0] == index:
                    dead += 1
        return dead

    def listen(self) -> None:
        """Subscribe to LINK_DEAD notifications (before connecting, to miss none)."""
        self._listener = GenericNetlink()
        self._listener.subscribe(self.multicast_group)


def _sockets(fds: list[int]) -> bytes:
    return nested(NBD_ATTR_SOCKETS, *(nested(NBD_SOCK_ITEM, u32(NBD_SOCK_FD, fd)) for fd in fds))
