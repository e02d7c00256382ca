"""``nbdswap attach``: connect ``/dev/nbdX`` to an export and keep it connected.

nbd-client 3.24 configures the device over netlink and leaves it: when the server
restarts, the kernel fails the swap I/O in flight and processes die.  This client
sets ``NBD_ATTR_DEAD_CONN_TIMEOUT``, so the kernel *waits* while the link is dead,
stays resident, and on every LINK_DEAD notification dials the server again and hands
the kernel the new socket with ``NBD_CMD_RECONFIGURE``.  Requests that were in flight
are re-sent by the kernel when their timeout (``--timeout``, 30 s) expires.  That
timeout is also what rescues a link whose end the guest never saw (its memory was
too short to even receive the server's FIN): the kernel then declares it dead itself.

It is itself on the swap path, so it locks its memory, marks itself an I/O flusher
(the kernel then never makes it wait for memory reclaim that needs I/O), and asks the
OOM killer to spare it.  Standard library only.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass

from .netlink import DeviceSettings, NbdNetlink
from .nbdclient import HandshakeError, HandshakeInterrupted, NegotiatedExport, negotiate, open_connection
from .resident import stay_resident

log = logging.getLogger("nbdswap.attach")

#: Heap kept allocated, faulted in and locked for the allocations of a reconnection.
HEAP_RESERVE = 4 << 20
#: Objects come from glibc's heap (not pymalloc's mmap'd arenas), which grows in
#: HEAP_RESERVE steps, never shrinks, and serves allocations below 32 MiB itself.
ALLOCATOR_ENVIRONMENT = {
    "PYTHONMALLOC": "malloc",
    "GLIBC_TUNABLES": (f"glibc.malloc.top_pad={HEAP_RESERVE}:glibc.malloc.trim_threshold={1 << 40}"
                       f":glibc.malloc.mmap_threshold={32 << 20}"),
}
#: Seconds a dial (connect and handshake) may take before it is retried.
CONNECT_TIMEOUT = 10.0
RECONNECT_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: What the kernel's nbd driver takes on every architecture (a power of two from 512
#: to PAGE_SIZE) and swap can use; the server's minimum block size is 512.
BLOCK_SIZES = (512, 1024, 2048, 4096)
#: The kernel keeps the request timeout in 32 bits of jiffies (timeout * HZ, HZ up to
#: 1000): a larger one would silently wrap around.
MAX_TIMEOUT = 0xFFFFFFFF // 1000


@dataclass(frozen=True)
class AttachOptions:
    server: str
    index: int
    export: str = "swap"
    block_size: int = 4096
    connections: int = 1
    timeout: int = 30
    dead_connection_timeout: int = 3600

    @property
    def backend(self) -> str:
        """Identifies the export to the kernel: a RECONFIGURE must name the same one."""
        return f"nbdswap {self.server} {self.export}"


def device_index(device: str) -> int:
    """``/dev/nbd3``, ``nbd3`` or ``3`` → 3."""
    match = re.fullmatch(r"(?:/dev/)?(?:nbd)?(\d+)", device)
    if not match:
        raise ValueError(f"{device!r} is not an NBD device (expected /dev/nbdN)")
    return int(match.group(1))


def block_size(text: str) -> int:
    """``-b`` (argparse type): one of BLOCK_SIZES."""
    value = _integer(text)
    if value not in BLOCK_SIZES:
        sizes = ", ".join(map(str, BLOCK_SIZES[:-1]))
        raise argparse.ArgumentTypeError(f"must be {sizes} or {BLOCK_SIZES[-1]} (got {value})")
    return value


def connection_count(text: str) -> int:
    """``-C`` (argparse type): sockets per device; the kernel sets no upper limit."""
    return _at_least(_integer(text), 1)


def request_timeout(text: str) -> int:
    """``-t`` (argparse type).  With 0 the kernel only warns about a request left
    unanswered and keeps its connection: a link whose end the guest never saw would
    never be replaced."""
    value = _integer(text)
    if not 1 <= value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_TIMEOUT} seconds (got {value})")
    return value


def dead_connection_timeout(text: str) -> int:
    """``--dead-conn-timeout`` (argparse type); 0: swap I/O fails once every link is dead."""
    return _at_least(_integer(text), 0, " seconds")


def _at_least(value: int, low: int, unit: str = "") -> int:
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}{unit} (got {value})")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def use_reserved_heap() -> None:
    """Re-execute with the allocator settings of ALLOCATOR_ENVIRONMENT (they only take
    effect at interpreter start).  When a link dies the guest is typically out of
    memory and its swap is the dead link: a reconnection that needs fresh pages
    would wait for them forever."""
    if all(os.environ.get(key) == value for key, value in ALLOCATOR_ENVIRONMENT.items()):
        return
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **ALLOCATOR_ENVIRONMENT})


def dial(options: AttachOptions) -> tuple[socket.socket, NegotiatedExport]:
    """A socket negotiated into the transmission phase of the export."""
    sock = open_connection(options.server, CONNECT_TIMEOUT)
    try:
        export = negotiate(sock, options.export)
        if options.block_size % max(export.minimum_block_size, 1) or \
                options.block_size > export.maximum_payload:
            raise HandshakeError(f"block size {options.block_size} does not fit the server's "
                                 f"constraints (minimum {export.minimum_block_size}, "
                                 f"maximum payload {export.maximum_payload})")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock, export


def dial_until_connected(options: AttachOptions) -> tuple[socket.socket, NegotiatedExport]:
    """Dial for a device not attached yet: retried while the server is unreachable (it
    may be starting), but a refusal is raised at once, since asking again gets the
    same answer and nothing waits on this device yet."""
    return _dial_retrying(options, retry_on=(OSError, HandshakeInterrupted))


def redial_until_connected(options: AttachOptions) -> tuple[socket.socket, NegotiatedExport]:
    """Dial for an attached device until the server takes the connection, whatever
    it answers meanwhile.

    Unlike :func:`dial_until_connected`, a refusal is retried too.  The guest's
    swapped-out pages are on that server, and its swap I/O waits for this process (up
    to ``--dead-conn-timeout``).  Giving up would release nothing: that I/O would fail
    and the processes whose pages are out there would die, even if the refusal only
    lasted while the server restarted with a changed configuration or an operator
    fixed one.  So the retries go on, logged with the server's answer.
    """
    return _dial_retrying(options, retry_on=(OSError, HandshakeError))


def _dial_retrying(options: AttachOptions, retry_on: tuple[type[Exception], ...]
                   ) -> tuple[socket.socket, NegotiatedExport]:
    attempt = 0
    while True:
        try:
            return dial(options)
        except retry_on as error:
            delay = RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)]
            if attempt % 20 == 0:
                log.warning("server %s: %s; retrying", options.server, error)
            attempt += 1
            time.sleep(delay)


def attach(options: AttachOptions) -> None:
    """Connect (or re-attach to) the device, then repair dead links until SIGTERM.

    SIGTERM leaves the device connected: a restarted attach re-adopts it.
    """
    # Not on fault: every page is faulted in and locked now, so that repairing a
    # dead link later needs as little new memory as possible (it may be the very
    # memory that is waiting for this link to swap out).
    stay_resident(on_fault=False, heap_reserve=HEAP_RESERVE)
    netlink = NbdNetlink()
    netlink.listen()
    if netlink.is_connected(options.index):
        log.info("/dev/nbd%d is already connected: re-adopting it", options.index)
        _replace_dead_links(netlink, options, options.connections)
    else:
        _connect(netlink, options)
    _rehearse_reconnection(options)
    print(f"nbdswap attach: /dev/nbd{options.index} connected to {options.export!r} "
          f"on {options.server}", flush=True)
    while True:
        dead = netlink.dead_links(options.index, timeout=None)
        if dead:
            log.warning("/dev/nbd%d: %d connection(s) died; reconnecting", options.index, dead)
            _replace_dead_links(netlink, options, dead)


def _connect(netlink: NbdNetlink, options: AttachOptions) -> None:
    connections = [dial_until_connected(options) for _ in range(options.connections)]
    sockets = [sock for sock, _ in connections]
    export = connections[0][1]
    settings = DeviceSettings(
        size=export.size, block_size=options.block_size, server_flags=export.transmission_flags,
        timeout=options.timeout, dead_connection_timeout=options.dead_connection_timeout,
        backend=options.backend)
    try:
        netlink.connect(options.index, settings, [sock.fileno() for sock in sockets])
    finally:
        for sock in sockets:  # the kernel holds its own references now
            sock.close()


def _rehearse_reconnection(options: AttachOptions) -> None:
    """Dial and negotiate once more now, while memory is plentiful, so that the code
    and buffers of a real reconnection are already paged in and locked."""
    sock, _ = redial_until_connected(options)
    sock.close()
    gc.collect()
    gc.freeze()


def _replace_dead_links(netlink: NbdNetlink, options: AttachOptions, count: int) -> None:
    for _ in range(count):
        sock, _ = redial_until_connected(options)
        try:
            netlink.reconfigure(options.index, options.backend, [sock.fileno()])
        finally:
            sock.close()
        log.info("/dev/nbd%d: reconnected", options.index)


def detach(index: int) -> None:
    netlink = NbdNetlink()
    try:
        netlink.disconnect(index)
    finally:
        netlink.close()


#: Exit status when the server refused the first handshake (unknown export, block
#: size, TLS): a configuration error that a restart does not cure, so the unit stops
#: restarting on it (``RestartPreventExitStatus=`` in nbdswap-attach@.service).
EXIT_REFUSED = 3


def run_attach(options: AttachOptions) -> int:
    """Entry point of ``nbdswap attach``: exits 0 on SIGTERM/SIGINT."""
    use_reserved_heap()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        attach(options)
    except KeyboardInterrupt:
        pass
    except HandshakeError as error:
        print(f"nbdswap attach: server {options.server}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as error:
        print(f"nbdswap attach: {error}", file=sys.stderr)
        return 1
    return 0
