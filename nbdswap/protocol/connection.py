"""The server side of one NBD connection, without any I/O (in the style of h11).

Feed received bytes to :meth:`ServerConnection.receive_data`, take the events they
made with :meth:`ServerConnection.events`, and send what
:meth:`ServerConnection.data_to_send` returns.  The handshake is answered here in
full (it only needs the export catalogue); the transmission phase hands every
*valid* request to the caller as a :class:`Request` and answers invalid ones itself
with the error the spec asks for (reported as :class:`RequestRejected`).

TLS: with :class:`TlsMode` ``ON`` or ``REQUIRE``, NBD_OPT_STARTTLS is acknowledged
and reported as :class:`StartTLS`; the caller then runs the TLS handshake on its
transport, feeds only decrypted bytes from then on and calls
:meth:`ServerConnection.tls_established`, after which option haggling starts over.

Memory is bounded whatever the peer sends: option payloads above the option limit
and write payloads above the export's maximum are skipped, never buffered.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from .constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_STRING_LENGTH,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyType,
    TransmissionFlag,
)

_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST_HEADER = struct.Struct(">IHHQQI")
#: Its size, read three times per request (as the attribute: 0.4k instructions more).
_REQUEST_HEADER_SIZE = _REQUEST_HEADER.size
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_HEADER = struct.Struct(">IHHQI")
#: The header of an OFFSET_DATA chunk followed by its offset, packed in one call.
_OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

SERVER_HANDSHAKE_FLAGS = int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)

#: Default limit of an option's payload: longer ones are skipped without buffering
#: and answered with an error.  The longest valid option (a name and a few
#: meta-context queries) is far smaller.
MAX_OPTION_LENGTH = 64 * 1024


class TlsMode(enum.Enum):
    """How the server treats NBD_OPT_STARTTLS (the spec's NOTLS and FORCEDTLS modes,
    and TLS offered but optional)."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


BASE_ALLOCATION_CONTEXT_ID = 1

#: Command flags each command accepts (FUA only when advertised, DF only with
#: structured replies; both are added in :meth:`ServerConnection._allowed_command_flags`).
#: Plain ints: IntFlag arithmetic runs Python code, too slow for every request.
_COMMAND_FLAGS = {
    Command.READ: 0,
    Command.WRITE: 0,
    Command.FLUSH: 0,
    Command.TRIM: 0,
    Command.CACHE: 0,
    Command.WRITE_ZEROES: int(CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
    Command.BLOCK_STATUS: int(CommandFlag.REQ_ONE),
}
_FUA = int(CommandFlag.FUA)
_DF = int(CommandFlag.DF)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
#: The Command member of each known command number (a dict lookup; ``Command(n)`` is slow).
_COMMANDS = {int(command): command for command in Command}

#: Options a server that requires TLS answers before TLS is active.
_BEFORE_TLS = frozenset({Option.STARTTLS, Option.ABORT})

#: Commands whose out-of-range error is ENOSPC rather than EINVAL.
_WRITING_COMMANDS = frozenset({Command.WRITE, Command.WRITE_ZEROES})
_MODIFYING_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_DATA_COMMANDS = frozenset({Command.READ, Command.WRITE})
#: The members every request is compared with, as globals: looking a member up on
#: the Enum class costs ~80 ns each time, and a request takes a dozen comparisons.
_READ, _WRITE, _DISC, _FLUSH, _BLOCK_STATUS = (
    Command.READ, Command.WRITE, Command.DISC, Command.FLUSH, Command.BLOCK_STATUS)


@dataclass(frozen=True)
class Export:
    """What the protocol needs to know about one export."""

    name: str
    size: int
    description: str = ""
    minimum_block_size: int = 512
    preferred_block_size: int = 4096
    maximum_payload: int = 32 * 1024 * 1024
    read_only: bool = False

    def transmission_flags(self, structured_replies: bool) -> int:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_CACHE
            | TransmissionFlag.CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
        if structured_replies:
            flags |= TransmissionFlag.SEND_DF
        return int(flags)


# --- events -----------------------------------------------------------------


@dataclass(frozen=True)
class TransmissionStarted:
    """The handshake chose ``export``; requests follow."""

    export: Export
    structured_replies: bool
    meta_contexts: tuple[int, ...]


class Request:
    """A valid transmission-phase request (``data`` only for WRITE).

    ``payload_size`` is the bytes the request holds while in flight: its write data
    or the data it reads (set once here, as the server reads it twice per request).
    """

    __slots__ = ("cookie", "command", "flags", "offset", "length", "data", "payload_size")

    def __init__(self, cookie: int, command: Command, flags: int, offset: int,
                 length: int, data: bytes | None = None) -> None:
        self.cookie = cookie
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length
        self.data = data
        self.payload_size = length if command in _DATA_COMMANDS else 0

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)

    def __repr__(self) -> str:
        return (f"Request({self.command.name}, cookie={self.cookie:#x}, flags={self.flags:#x}, "
                f"offset={self.offset}, length={self.length})")


@dataclass(frozen=True)
class RequestRejected:
    """A request that broke a rule; its error reply is already queued."""

    cookie: int
    command: int
    error: Errno
    reason: str


@dataclass(frozen=True)
class OptionHandled:
    """An option was answered during the handshake (for logs and metrics)."""

    option: int
    reply: OptionReply


@dataclass(frozen=True)
class OptionTooLarge:
    """An option's declared length is above the limit: its payload is being skipped."""

    option: int
    length: int
    limit: int


@dataclass(frozen=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: run the TLS handshake on the transport, then
    call :meth:`ServerConnection.tls_established`."""


@dataclass(frozen=True)
class Disconnect:
    """The client ended the session (NBD_CMD_DISC or NBD_OPT_ABORT)."""


@dataclass(frozen=True)
class ProtocolViolation:
    """The peer broke a MUST of the spec: send what is queued, then close."""

    reason: str


Event = (TransmissionStarted | Request | RequestRejected | OptionHandled | OptionTooLarge
         | StartTLS | Disconnect | ProtocolViolation)


class _State(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    STARTING_TLS = "starting TLS"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


#: As globals, like the commands: receive_data and _parse test the state once per chunk
#: and once per request, and each lookup on the Enum class cost 1k instructions.
_CLIENT_FLAGS, _OPTIONS, _STARTING_TLS, _TRANSMISSION, _CLOSED = (
    _State.CLIENT_FLAGS, _State.OPTIONS, _State.STARTING_TLS, _State.TRANSMISSION, _State.CLOSED)


class _InvalidOption(Exception):
    """An option's payload is malformed: answered with NBD_REP_ERR_INVALID."""


class ExportCatalog:
    """The exports a server offers; the empty name selects the default (first) one."""

    def __init__(self, exports: Sequence[Export]) -> None:
        if not exports:
            raise ValueError("at least one export is needed")
        self._exports = {export.name: export for export in exports}
        self._default = exports[0]

    def __iter__(self):
        return iter(self._exports.values())

    def lookup(self, name: str) -> Export | None:
        if name == "":
            return self._default
        return self._exports.get(name)


class ServerConnection:
    """State machine of one connection: greeting → client flags → options → transmission."""

    def __init__(self, catalog: ExportCatalog, *, tls: TlsMode = TlsMode.OFF,
                 max_option_length: int = MAX_OPTION_LENGTH) -> None:
        self._catalog = catalog
        self._tls_mode = tls
        self._tls_active = False
        self._max_option_length = max_option_length
        self._state = _State.CLIENT_FLAGS
        #: The received bytes not parsed yet.  ``bytes``: a received chunk (parsed where
        #: it is when nothing was left over from the one before), or what is left of
        #: one; ``bytearray``: once more data joins a leftover, or when the caller's
        #: data was not ``bytes`` (it may reuse its buffer).
        self._in: bytes | bytearray = b""
        self._pos = 0
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._discard = 0
        self._after_discard: Callable[[], None] | None = None
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None
        self._meta_contexts: tuple[int, ...] = ()
        self._command_flags: dict[int, int] = {}
        self.export: Export | None = None
        self._out.append(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS))

    # --- public interface ---------------------------------------------------

    @property
    def structured_replies(self) -> bool:
        return self._structured

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def in_transmission(self) -> bool:
        return self._state is _State.TRANSMISSION

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the peer; the events they make are taken with events()."""
        if self._state is _CLOSED:
            return
        if self._discard:
            data = self._skip(data)
        if data:
            if not self._in and type(data) is bytes:
                self._in = data  # parsed where it is, not copied (see _parse_request)
            else:
                if type(self._in) is bytes:
                    self._in = bytearray(self._in)
                self._in += data
        if self._state is _STARTING_TLS:
            self._hold_until_tls()
        else:
            self._parse()

    def tls_established(self) -> None:
        """The TLS handshake after :class:`StartTLS` succeeded: haggling starts over
        (the spec: no negotiation state from before STARTTLS is kept)."""
        if self._state is not _State.STARTING_TLS:
            raise RuntimeError("tls_established() without a pending STARTTLS")
        self._tls_active = True
        self._structured = False
        self._meta_export, self._meta_contexts = None, ()
        self._state = _State.OPTIONS
        self._parse()

    def events(self) -> deque[Event]:
        """Every pending event, oldest first: one call for a chunk's requests (a call
        per event cost 0.6k instructions of a write, bench/write_instructions.py)."""
        events, self._events = self._events, deque()
        return events

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    # --- transmission replies ---------------------------------------------------

    def reply_ok(self, request: Request) -> None:
        self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie))

    def reply_read(self, request: Request, data: bytes) -> None:
        if self._structured:
            self._out.append(_OFFSET_DATA_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, _OFFSET_DATA,
                request.cookie, 8 + len(data), request.offset))
        else:
            self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie))
        self._out.append(data)

    def reply_error(self, request: Request | RequestRejected, error: Errno,
                    message: str = "") -> None:
        self._queue_error(request.cookie, error, message)

    def reply_block_status(self, request: Request,
                           extents: dict[int, Sequence[tuple[int, int]]]) -> None:
        """One BLOCK_STATUS chunk per context id: (length, flags) descriptors."""
        contexts = list(extents.items())
        for index, (context_id, descriptors) in enumerate(contexts):
            if request.flags & CommandFlag.REQ_ONE:
                length, flags = descriptors[0]
                descriptors = [(min(length, request.length), flags)]
            payload = bytearray(_U32.pack(context_id))
            for length, flags in descriptors:
                payload += struct.pack(">II", length, flags)
            done = REPLY_FLAG_DONE if index == len(contexts) - 1 else 0
            self._out.append(_STRUCTURED_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, done, ReplyType.BLOCK_STATUS,
                request.cookie, len(payload)) + bytes(payload))

    # --- input plumbing -----------------------------------------------------------

    def _skip(self, data: bytes) -> bytes:
        """Drop bytes of a payload being discarded; return what follows it."""
        taken = min(self._discard, len(data))
        self._discard -= taken
        if self._discard == 0 and self._after_discard is not None:
            callback, self._after_discard = self._after_discard, None
            callback()
        return data[taken:]

    def _discard_then(self, length: int, callback: Callable[[], None] | None = None) -> None:
        """Skip ``length`` payload bytes (buffered ones first), then run ``callback``."""
        buffered = min(length, len(self._in) - self._pos)
        self._pos += buffered
        self._discard = length - buffered
        if self._discard:
            self._after_discard = callback
        elif callback is not None:
            callback()

    def _available(self) -> int:
        return len(self._in) - self._pos

    def _take(self, n: int) -> bytes:
        """The next ``n`` buffered bytes, copied once: a slice of a received chunk, or
        of a bytearray through a view (slicing the bytearray would copy them twice).
        The view is a temporary, released as soon as the copy is made, so the buffer
        can grow again; a ``with`` block around it cost 140 ns more a request (446
        against 306 ns for 4 KiB, timeit)."""
        buffered, start = self._in, self._pos
        data = buffered[start:start + n] if type(buffered) is bytes else bytes(memoryview(buffered)[start:start + n])
        self._pos = start + n
        return data

    def _parse(self) -> None:
        while not self._discard:
            state = self._state
            if state is _TRANSMISSION:
                progressed = self._parse_request()
            elif state is _OPTIONS:
                progressed = self._parse_option()
            elif state is _CLIENT_FLAGS:
                progressed = self._parse_client_flags()
            else:  # closed, or waiting for the TLS handshake
                break
            if not progressed:
                break
        if self._pos:
            self._in = self._in[self._pos:]  # empty, the next chunk is parsed where it is
            self._pos = 0

    def _close(self, violation: str | None = None) -> None:
        self._state = _State.CLOSED
        self._in = b""
        self._pos = 0
        self._events.append(ProtocolViolation(violation) if violation else Disconnect())

    # --- handshake ----------------------------------------------------------------

    def _parse_client_flags(self) -> bool:
        if self._available() < 4:
            return False
        (flags,) = _U32.unpack(self._take(4))
        if flags & ~KNOWN_CLIENT_FLAGS:
            self._close(f"unknown client flags {flags:#x}")
            return False
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._state = _State.OPTIONS
        return True

    def _parse_option(self) -> bool:
        if self._available() < _OPTION_HEADER.size:
            return False
        magic, option, length = _OPTION_HEADER.unpack_from(self._in, self._pos)
        if magic != IHAVEOPT:
            self._close(f"bad option magic {magic:#x}")
            return False
        if length > self._max_option_length:
            return self._skip_option(option, length)
        if self._available() < _OPTION_HEADER.size + length:
            return False
        self._pos += _OPTION_HEADER.size
        self._handle_option(option, self._take(length))
        return True

    def _skip_option(self, option: int, length: int) -> bool:
        """Refuse an option above the length limit without buffering its payload."""
        if option == Option.EXPORT_NAME:
            # It cannot be answered with an error, and no export name is that long.
            self._close(f"NBD_OPT_EXPORT_NAME of {length} bytes")
            return False
        self._pos += _OPTION_HEADER.size
        self._events.append(OptionTooLarge(option, length, self._max_option_length))
        if self._tls_required_for(option):
            reply = OptionReply.ERR_TLS_REQD
        elif option in Option._value2member_map_:
            reply = OptionReply.ERR_TOO_BIG
        else:
            reply = OptionReply.ERR_UNSUP
        self._discard_then(length, lambda: self._option_reply(option, reply, b"option too long"))
        return True

    def _tls_required_for(self, option: int) -> bool:
        return (self._tls_mode is TlsMode.REQUIRE and not self._tls_active
                and option not in _BEFORE_TLS)

    def _hold_until_tls(self) -> None:
        """Bytes decrypted before tls_established() wait for it, up to one option."""
        if self._available() > _OPTION_HEADER.size + self._max_option_length:
            self._close("too much data before the TLS handshake completed")

    def _option_reply(self, option: int, reply: OptionReply, data: bytes = b"") -> None:
        self._out.append(_OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data)
        if reply is not OptionReply.INFO and reply is not OptionReply.SERVER \
                and reply is not OptionReply.META_CONTEXT:
            self._events.append(OptionHandled(option, reply))

    def _handle_option(self, option: int, data: bytes) -> None:
        if self._tls_required_for(option):
            self._refuse_before_tls(option)
            return
        handler = self._OPTION_HANDLERS.get(option)
        if handler is None:
            self._option_reply(option, OptionReply.ERR_UNSUP, b"unsupported option")
            return
        try:
            handler(self, option, data)
        except _InvalidOption as error:
            self._option_reply(option, OptionReply.ERR_INVALID, str(error).encode())

    def _opt_export_name(self, option: int, data: bytes) -> None:
        export = self._lookup(_decode_string(data))
        if export is None:
            self._close("NBD_OPT_EXPORT_NAME asked for an unknown export")
            return
        reply = struct.pack(">QH", export.size, export.transmission_flags(self._structured))
        if not self._no_zeroes:
            reply += bytes(124)
        self._out.append(reply)
        self._start_transmission(export)

    def _opt_abort(self, option: int, data: bytes) -> None:
        self._option_reply(option, OptionReply.ACK)
        self._close()

    def _opt_list(self, option: int, data: bytes) -> None:
        if data:
            raise _InvalidOption("NBD_OPT_LIST takes no data")
        for export in self._catalog:
            name = export.name.encode()
            self._option_reply(option, OptionReply.SERVER, _U32.pack(len(name)) + name)
        self._option_reply(option, OptionReply.ACK)

    def _refuse_before_tls(self, option: int) -> None:
        """FORCEDTLS: every option but STARTTLS and ABORT needs TLS first."""
        if option == Option.EXPORT_NAME:
            self._close("NBD_OPT_EXPORT_NAME before TLS, which this server requires")
        else:
            self._option_reply(option, OptionReply.ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")

    def _opt_starttls(self, option: int, data: bytes) -> None:
        if data:
            raise _InvalidOption("NBD_OPT_STARTTLS takes no data")
        if self._tls_mode is TlsMode.OFF:
            self._option_reply(option, OptionReply.ERR_POLICY, b"TLS is not offered by this server")
        elif self._tls_active:
            raise _InvalidOption("TLS is already active")
        elif self._available():
            # Plain text behind STARTTLS would be taken as sent over TLS.
            self._close("the client sent data after NBD_OPT_STARTTLS without waiting for the reply")
        else:
            self._option_reply(option, OptionReply.ACK)
            self._state = _State.STARTING_TLS
            self._events.append(StartTLS())

    def _opt_info_go(self, option: int, data: bytes) -> None:
        name, requests = _parse_info_request(data)
        export = self._lookup(name)
        if export is None:
            self._option_reply(option, OptionReply.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        self._send_export_info(option, export, requests)
        self._option_reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._start_transmission(export)

    def _send_export_info(self, option: int, export: Export, requests: set[int]) -> None:
        flags = export.transmission_flags(self._structured)
        self._option_reply(option, OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, export.size, flags))
        if Info.NAME in requests:
            self._option_reply(option, OptionReply.INFO, _U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            self._option_reply(option, OptionReply.INFO,
                               _U16.pack(Info.DESCRIPTION) + export.description.encode())
        # Sent unasked too: we enforce a minimum block size above the default of 1.
        self._option_reply(option, OptionReply.INFO, struct.pack(
            ">HIII", Info.BLOCK_SIZE, export.minimum_block_size,
            export.preferred_block_size, export.maximum_payload))

    def _opt_structured_reply(self, option: int, data: bytes) -> None:
        if data:
            raise _InvalidOption("NBD_OPT_STRUCTURED_REPLY takes no data")
        self._structured = True
        self._option_reply(option, OptionReply.ACK)

    def _opt_meta_context(self, option: int, data: bytes) -> None:
        if not self._structured:
            raise _InvalidOption("negotiate structured replies first")
        name, queries = _parse_meta_context_request(data)
        export = self._lookup(name)
        if export is None:
            self._option_reply(option, OptionReply.ERR_UNKNOWN, f"no export named {name!r}".encode())
            if option == Option.SET_META_CONTEXT:
                self._meta_export, self._meta_contexts = None, ()
            return
        listing = option == Option.LIST_META_CONTEXT
        selected = _select_contexts(queries, listing)
        if not listing:
            self._meta_export = export.name
            self._meta_contexts = (BASE_ALLOCATION_CONTEXT_ID,) if selected else ()
        for context in selected:
            context_id = 0 if listing else BASE_ALLOCATION_CONTEXT_ID
            self._option_reply(option, OptionReply.META_CONTEXT, _U32.pack(context_id) + context.encode())
        self._option_reply(option, OptionReply.ACK)

    _OPTION_HANDLERS = {
        Option.EXPORT_NAME: _opt_export_name,
        Option.ABORT: _opt_abort,
        Option.LIST: _opt_list,
        Option.STARTTLS: _opt_starttls,
        Option.INFO: _opt_info_go,
        Option.GO: _opt_info_go,
        Option.STRUCTURED_REPLY: _opt_structured_reply,
        Option.LIST_META_CONTEXT: _opt_meta_context,
        Option.SET_META_CONTEXT: _opt_meta_context,
    }

    def _lookup(self, name: str) -> Export | None:
        return self._catalog.lookup(name)

    def _start_transmission(self, export: Export) -> None:
        self.export = export
        self._state = _State.TRANSMISSION
        contexts = self._meta_contexts if self._meta_export == export.name else ()
        self._meta_contexts = contexts
        self._command_flags = self._allowed_command_flags()
        self._events.append(TransmissionStarted(export, self._structured, contexts))

    def _allowed_command_flags(self) -> dict[int, int]:
        """The flags each command accepts in this transmission phase (structured
        replies cannot change during it)."""
        allowed = {command: flags | _FUA for command, flags in _COMMAND_FLAGS.items()}
        if self._structured:
            allowed[_READ] |= _DF
        return allowed

    # --- transmission -----------------------------------------------------------

    def _parse_request(self) -> bool:
        available = len(self._in) - self._pos  # _available(), spared a call per request
        if available < _REQUEST_HEADER_SIZE:
            return False
        magic, flags, command, cookie, offset, length = _REQUEST_HEADER.unpack_from(self._in, self._pos)
        if magic != REQUEST_MAGIC:
            self._close(f"bad request magic {magic:#x}")
            return False
        carries_payload = command == _WRITE and length <= self.export.maximum_payload
        if carries_payload and available < _REQUEST_HEADER_SIZE + length:
            return False
        start = self._pos + _REQUEST_HEADER_SIZE
        # _take(length), without the call (0.6k instructions).  Appending each chunk to
        # a bytearray and copying payloads out through a view cost 6.5k instructions of
        # a write (bench/write_instructions.py, whose count includes the copies').
        if carries_payload:
            buffered = self._in
            data = buffered[start:start + length] if type(buffered) is bytes \
                else bytes(memoryview(buffered)[start:start + length])
            self._pos = start + length
        else:
            data, self._pos = None, start
        if command == _DISC:
            self._close()
            return False
        error = self._validate(command, flags, offset, length)
        if error is not None:
            self._reject(cookie, command, *error)
            if command == _WRITE and data is None:
                self._discard_then(length)
            return True
        self._events.append(Request(cookie, _COMMANDS[command], flags, offset, length, data))
        return True

    def _validate(self, command: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """Every rule a request must follow, one check and one error each."""
        export = self.export
        allowed_flags = self._command_flags.get(command)
        if allowed_flags is None:
            return Errno.EINVAL, f"unknown command {command}"
        if flags & ~allowed_flags:
            return Errno.EINVAL, f"flags {flags:#x} not valid for {Command(command).name}"
        if export.read_only and command in _MODIFYING_COMMANDS:
            return Errno.EPERM, "the export is read-only"
        if command == _FLUSH:
            if offset or length:
                return Errno.EINVAL, "FLUSH must have zero offset and length"
            return None
        if command == _BLOCK_STATUS and not self._meta_contexts:
            return Errno.EINVAL, "BLOCK_STATUS needs a metadata context negotiated"
        if command in _DATA_COMMANDS and length > export.maximum_payload:
            return Errno.EINVAL, f"length {length} exceeds the maximum payload {export.maximum_payload}"
        if length == 0:
            return Errno.EINVAL, "zero-length request"
        if offset + length > export.size:
            error = Errno.ENOSPC if command in _WRITING_COMMANDS else Errno.EINVAL
            return error, f"range {offset}+{length} is beyond the end of the export ({export.size})"
        alignment = export.minimum_block_size
        if offset % alignment or length % alignment:
            return Errno.EINVAL, f"range {offset}+{length} is not aligned to {alignment} bytes"
        return None

    def _reject(self, cookie: int, command: int, error: Errno, reason: str) -> None:
        self._queue_error(cookie, error, reason)
        self._events.append(RequestRejected(cookie, command, error, reason))

    def _queue_error(self, cookie: int, error: Errno, message: str) -> None:
        if self._structured:
            text = message.encode()[:MAX_STRING_LENGTH]
            payload = struct.pack(">IH", error, len(text)) + text
            self._out.append(_STRUCTURED_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, cookie, len(payload)) + payload)
        else:
            self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie))


# --- option payload parsing ---------------------------------------------------


def _decode_string(data: bytes) -> str:
    if len(data) > MAX_STRING_LENGTH:
        raise _InvalidOption("string longer than 4096 bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _InvalidOption("string is not valid UTF-8") from None
    if "\0" in text:
        raise _InvalidOption("string contains NUL")
    return text


def _parse_export_name(data: bytes, fixed_after: int) -> tuple[str, int]:
    """A 32-bit length and that many bytes of name, followed by ``fixed_after`` bytes
    at least; returns the name and the position after it."""
    if len(data) < 4 + fixed_after:
        raise _InvalidOption("option data too short")
    (name_length,) = _U32.unpack_from(data, 0)
    if name_length > len(data) - 4 - fixed_after:
        raise _InvalidOption("export name length exceeds the option")
    return _decode_string(data[4:4 + name_length]), 4 + name_length


def _parse_info_request(data: bytes) -> tuple[str, set[int]]:
    """NBD_OPT_INFO/GO: name length, name, count of info requests, the requests."""
    name, position = _parse_export_name(data, 2)
    (count,) = _U16.unpack_from(data, position)
    rest = data[position + 2:]
    if len(rest) != 2 * count:
        raise _InvalidOption("information request count does not match the option length")
    return name, {value for (value,) in struct.iter_unpack(">H", rest)}


def _parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """LIST/SET_META_CONTEXT: name length, name, query count, (length, query)…"""
    name, position = _parse_export_name(data, 4)
    (count,) = _U32.unpack_from(data, position)
    position += 4
    queries = []
    for _ in range(count):
        if position + 4 > len(data):
            raise _InvalidOption("query count exceeds the option")
        (length,) = _U32.unpack_from(data, position)
        position += 4
        if position + length > len(data):
            raise _InvalidOption("query length exceeds the option")
        queries.append(_decode_string(data[position:position + length]))
        position += length
    if position != len(data):
        raise _InvalidOption("trailing bytes after the queries")
    return name, queries


def _select_contexts(queries: list[str], listing: bool) -> list[str]:
    """The contexts (only base:allocation exists) that the queries match.

    Listing with no query lists everything; listing also accepts the empty leaf
    name ``base:`` as a wildcard for the namespace.
    """
    for query in queries:
        if ":" not in query:
            raise _InvalidOption(f"query {query!r} has no namespace")
    if listing and not queries:
        return [BASE_ALLOCATION]
    accepted = {BASE_ALLOCATION, "base:"} if listing else {BASE_ALLOCATION}
    return [BASE_ALLOCATION] if any(query in accepted for query in queries) else []
