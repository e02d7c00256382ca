"""Golden-byte tests of the sans-IO protocol core: every handshake and request rule."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdswap.protocol import (
    Disconnect,
    Errno,
    Export,
    ExportCatalog,
    ProtocolViolation,
    Request,
    RequestRejected,
    ServerConnection,
    StartTLS,
    TlsMode,
    TransmissionStarted,
)
from nbdswap.protocol import OptionTooLarge
from nbdswap.protocol.connection import MAX_OPTION_LENGTH

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
EXPORT = Export(name="swap", size=1 << 20, description="test device")

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
ERR_UNSUP = 0x80000001
ERR_POLICY = 0x80000002
ERR_INVALID = 0x80000003
ERR_TLS_REQD = 0x80000005
ERR_UNKNOWN = 0x80000006
ERR_TOO_BIG = 0x80000009

FLAGS_WITHOUT_DF = 0b1101_0110_1101  # HAS_FLAGS FLUSH FUA TRIM WZ MULTI_CONN CACHE FAST_ZERO
FLAGS_WITH_DF = FLAGS_WITHOUT_DF | 0x80


def events(conn):
    return list(conn.events())


def sent(conn) -> bytes:
    return b"".join(conn.data_to_send())


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_data(name: str = "swap", infos=()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name: str, queries) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        body += struct.pack(">I", len(query)) + query.encode()
    return body


def parse_option_replies(data: bytes):
    replies = []
    while data:
        magic, opt, kind, length = struct.unpack_from(">QIII", data)
        assert magic == REPLY_MAGIC
        replies.append((opt, kind, data[20:20 + length]))
        data = data[20 + length:]
    return replies


def request(command, offset=0, length=0, flags=0, cookie=7, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length) + payload


def new_conn(client_flags=3, **options):
    conn = ServerConnection(ExportCatalog([EXPORT]), **options)
    greeting = sent(conn)
    conn.receive_data(struct.pack(">I", client_flags))
    return conn, greeting


def in_transmission(structured=False, meta=False):
    conn, _ = new_conn()
    if structured:
        conn.receive_data(option(8))
    if meta:
        conn.receive_data(option(10, meta_data("swap", ["base:allocation"])))
    conn.receive_data(option(7, go_data()))
    sent(conn)
    events(conn)
    return conn


# --- handshake ------------------------------------------------------------------


def test_greeting_is_nbdmagic_ihaveopt_and_both_handshake_flags():
    conn = ServerConnection(ExportCatalog([EXPORT]))
    assert sent(conn) == b"NBDMAGICIHAVEOPT\x00\x03"


def test_unknown_client_flags_close_the_connection():
    conn, _ = new_conn(client_flags=0x4)
    assert isinstance(events(conn)[0], ProtocolViolation)
    assert conn.closed


def test_client_flags_arrive_in_pieces():
    conn = ServerConnection(ExportCatalog([EXPORT]))
    sent(conn)
    for byte in b"\x00\x00\x00\x01":
        conn.receive_data(bytes([byte]))
    conn.receive_data(option(3))
    assert parse_option_replies(sent(conn))[-1][1] == NBD_REP_ACK


def test_bad_option_magic_closes():
    conn, _ = new_conn()
    conn.receive_data(struct.pack(">QII", 0x1234, 7, 0))
    assert isinstance(events(conn)[0], ProtocolViolation)


def test_export_name_with_no_zeroes():
    conn, _ = new_conn(client_flags=3)
    conn.receive_data(option(1, b"swap"))
    assert sent(conn) == struct.pack(">QH", EXPORT.size, FLAGS_WITHOUT_DF)
    started = events(conn)[0]
    assert isinstance(started, TransmissionStarted) and started.export is EXPORT


def test_export_name_without_no_zeroes_pads_124_bytes():
    conn, _ = new_conn(client_flags=1)
    conn.receive_data(option(1, b""))
    assert sent(conn) == struct.pack(">QH", EXPORT.size, FLAGS_WITHOUT_DF) + bytes(124)


def test_export_name_unknown_closes_without_reply():
    conn, _ = new_conn()
    conn.receive_data(option(1, b"nope"))
    assert sent(conn) == b""
    assert isinstance(events(conn)[0], ProtocolViolation)


def test_abort_is_acked_then_closed():
    conn, _ = new_conn()
    conn.receive_data(option(2))
    assert parse_option_replies(sent(conn)) == [(2, NBD_REP_ACK, b"")]
    assert isinstance(events(conn)[-1], Disconnect)


def test_list_names_every_export():
    conn, _ = new_conn()
    conn.receive_data(option(3))
    assert parse_option_replies(sent(conn)) == [
        (3, NBD_REP_SERVER, b"\x00\x00\x00\x04swap"), (3, NBD_REP_ACK, b"")]


def test_list_with_data_is_invalid():
    conn, _ = new_conn()
    conn.receive_data(option(3, b"x"))
    assert parse_option_replies(sent(conn))[0][1] == ERR_INVALID


@pytest.mark.parametrize("name", ["swap", ""])
def test_info_answers_export_name_description_and_block_size(name):
    conn, _ = new_conn()
    conn.receive_data(option(6, go_data(name, [1, 2, 3])))
    replies = parse_option_replies(sent(conn))
    infos = {struct.unpack(">H", data[:2])[0]: data[2:] for _, kind, data in replies if kind == NBD_REP_INFO}
    assert infos[0] == struct.pack(">QH", EXPORT.size, FLAGS_WITHOUT_DF)
    assert infos[1] == b"swap"
    assert infos[2] == b"test device"
    assert infos[3] == struct.pack(">III", 512, 4096, 32 << 20)
    assert replies[-1][1] == NBD_REP_ACK
    assert not conn.in_transmission


def test_go_enters_transmission_and_sends_block_size_unasked():
    conn, _ = new_conn()
    conn.receive_data(option(7, go_data("swap")))
    replies = parse_option_replies(sent(conn))
    kinds = [struct.unpack(">H", data[:2])[0] for _, kind, data in replies if kind == NBD_REP_INFO]
    assert kinds == [0, 3]
    assert replies[-1] == (7, NBD_REP_ACK, b"")
    assert conn.in_transmission


def test_go_unknown_export_is_err_unknown_and_haggling_goes_on():
    conn, _ = new_conn()
    conn.receive_data(option(7, go_data("other")))
    assert parse_option_replies(sent(conn))[0][1] == ERR_UNKNOWN
    conn.receive_data(option(7, go_data("swap")))
    assert conn.in_transmission


@pytest.mark.parametrize("data", [
    b"\x00\x00",                                     # shorter than the fixed part
    struct.pack(">I", 100) + b"swap\x00\x00",        # name length beyond the option
    go_data("swap", [1])[:-1],                       # info count does not match
    struct.pack(">I", 2) + b"\xff\xfe" + b"\x00\x00",  # not UTF-8
])
def test_malformed_go_is_invalid(data):
    conn, _ = new_conn()
    conn.receive_data(option(7, data))
    assert parse_option_replies(sent(conn))[0][1] == ERR_INVALID
    assert not conn.in_transmission


def test_unknown_option_is_unsupported():
    conn, _ = new_conn()
    conn.receive_data(option(99, b"abc"))
    assert parse_option_replies(sent(conn)) == [(99, ERR_UNSUP, b"unsupported option")]


def test_starttls_is_refused_by_policy():
    conn, _ = new_conn()
    conn.receive_data(option(5))
    assert parse_option_replies(sent(conn))[0][1] == ERR_POLICY


def test_huge_option_is_skipped_without_buffering():
    conn, _ = new_conn()
    length = 64 * 65536 + 1000
    conn.receive_data(struct.pack(">QII", IHAVEOPT, 3, length))
    for _ in range(64):
        conn.receive_data(bytes(65536))
    assert sent(conn) == b""
    assert len(conn._in) == 0
    conn.receive_data(bytes(length - 64 * 65536) + option(3))
    replies = parse_option_replies(sent(conn))
    assert replies[0][1] == ERR_TOO_BIG
    assert replies[-1][1] == NBD_REP_ACK


def test_option_just_under_the_limit_is_parsed():
    conn, _ = new_conn()
    conn.receive_data(option(99, bytes(MAX_OPTION_LENGTH)))
    assert parse_option_replies(sent(conn))[0][1] == ERR_UNSUP


def test_structured_reply_then_go_advertises_df():
    conn, _ = new_conn()
    conn.receive_data(option(8))
    assert parse_option_replies(sent(conn)) == [(8, NBD_REP_ACK, b"")]
    conn.receive_data(option(7, go_data()))
    info = [d for _, k, d in parse_option_replies(sent(conn)) if k == NBD_REP_INFO][0]
    assert info == struct.pack(">HQH", 0, EXPORT.size, FLAGS_WITH_DF)


def test_meta_context_needs_structured_replies():
    conn, _ = new_conn()
    conn.receive_data(option(10, meta_data("swap", ["base:allocation"])))
    assert parse_option_replies(sent(conn))[0][1] == ERR_INVALID


def test_set_meta_context_selects_base_allocation():
    conn, _ = new_conn()
    conn.receive_data(option(8))
    sent(conn)
    conn.receive_data(option(10, meta_data("swap", ["base:allocation", "qemu:dirty-bitmap:x"])))
    assert parse_option_replies(sent(conn)) == [
        (10, NBD_REP_META_CONTEXT, b"\x00\x00\x00\x01base:allocation"), (10, NBD_REP_ACK, b"")]
    conn.receive_data(option(7, go_data()))
    started = [e for e in events(conn) if isinstance(e, TransmissionStarted)][0]
    assert started.meta_contexts == (1,)


def test_list_meta_context_without_queries_lists_everything():
    conn, _ = new_conn()
    conn.receive_data(option(8))
    sent(conn)
    conn.receive_data(option(9, meta_data("swap", [])))
    assert parse_option_replies(sent(conn)) == [
        (9, NBD_REP_META_CONTEXT, b"\x00\x00\x00\x00base:allocation"), (9, NBD_REP_ACK, b"")]


def test_meta_context_query_without_namespace_is_invalid():
    conn, _ = new_conn()
    conn.receive_data(option(8))
    sent(conn)
    conn.receive_data(option(10, meta_data("swap", ["allocation"])))
    assert parse_option_replies(sent(conn))[0][1] == ERR_INVALID


def test_meta_context_for_another_export_name_is_not_kept():
    conn, _ = new_conn()
    conn.receive_data(option(8))
    conn.receive_data(option(10, meta_data("nope", ["base:allocation"])))
    assert parse_option_replies(sent(conn))[-1][1] == ERR_UNKNOWN


def test_option_limit_is_configurable_and_reported():
    conn, _ = new_conn(max_option_length=1024)
    conn.receive_data(option(6, bytes(1025)))
    assert events(conn)[0] == OptionTooLarge(6, 1025, 1024)
    assert parse_option_replies(sent(conn))[0][1] == ERR_TOO_BIG
    conn.receive_data(option(6, go_data()))
    assert parse_option_replies(sent(conn))[-1][1] == NBD_REP_ACK


def test_huge_export_name_option_closes_without_buffering():
    conn, _ = new_conn()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, 1, 0xFFFFFFFF) + bytes(1000))
    assert isinstance(events(conn)[0], ProtocolViolation)
    assert conn.closed and len(conn._in) == 0


# --- TLS ---------------------------------------------------------------------------


def start_tls(conn):
    conn.receive_data(option(5))
    assert parse_option_replies(sent(conn)) == [(5, NBD_REP_ACK, b"")]
    assert isinstance(events(conn)[-1], StartTLS)


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_starttls_is_acked_then_options_start_over_without_old_state(mode):
    conn, _ = new_conn(tls=mode)
    if mode is TlsMode.ON:
        conn.receive_data(option(8))
        assert parse_option_replies(sent(conn)) == [(8, NBD_REP_ACK, b"")]
    start_tls(conn)
    assert not conn.tls_active
    conn.receive_data(option(3))  # decrypted early: held until the handshake is done
    assert sent(conn) == b""
    conn.tls_established()
    assert conn.tls_active
    assert parse_option_replies(sent(conn))[-1] == (3, NBD_REP_ACK, b"")
    conn.receive_data(option(7, go_data()))
    info = [d for _, k, d in parse_option_replies(sent(conn)) if k == NBD_REP_INFO][0]
    assert info == struct.pack(">HQH", 0, EXPORT.size, FLAGS_WITHOUT_DF)  # structured replies forgotten
    assert conn.in_transmission


def test_second_starttls_is_invalid():
    conn, _ = new_conn(tls=TlsMode.ON)
    start_tls(conn)
    conn.tls_established()
    conn.receive_data(option(5))
    assert parse_option_replies(sent(conn))[0][1] == ERR_INVALID


def test_plain_text_behind_starttls_closes():
    conn, _ = new_conn(tls=TlsMode.ON)
    conn.receive_data(option(5) + option(3))
    assert sent(conn) == b""
    assert isinstance(events(conn)[-1], ProtocolViolation) and conn.closed


def test_too_much_data_before_the_tls_handshake_ends_closes():
    conn, _ = new_conn(tls=TlsMode.ON, max_option_length=1024)
    start_tls(conn)
    conn.receive_data(bytes(2000))
    assert isinstance(events(conn)[-1], ProtocolViolation) and len(conn._in) == 0


@pytest.mark.parametrize("code,data", [(3, b""), (6, go_data()), (7, go_data()), (8, b""), (99, b"x")])
def test_require_mode_refuses_options_before_tls(code, data):
    conn, _ = new_conn(tls=TlsMode.REQUIRE)
    conn.receive_data(option(code, data))
    assert parse_option_replies(sent(conn))[0][:2] == (code, ERR_TLS_REQD)
    assert not conn.in_transmission


def test_require_mode_refuses_huge_options_with_tls_reqd():
    conn, _ = new_conn(tls=TlsMode.REQUIRE)
    conn.receive_data(struct.pack(">QII", IHAVEOPT, 6, 1 << 20) + bytes(1 << 20))
    assert parse_option_replies(sent(conn))[0][:2] == (6, ERR_TLS_REQD)


def test_require_mode_export_name_before_tls_is_a_hard_close():
    conn, _ = new_conn(tls=TlsMode.REQUIRE)
    conn.receive_data(option(1, b"swap"))
    assert sent(conn) == b""
    assert isinstance(events(conn)[0], ProtocolViolation) and conn.closed


def test_require_mode_allows_abort_before_tls():
    conn, _ = new_conn(tls=TlsMode.REQUIRE)
    conn.receive_data(option(2))
    assert parse_option_replies(sent(conn)) == [(2, NBD_REP_ACK, b"")]


def test_tls_established_without_starttls_is_a_bug():
    conn, _ = new_conn(tls=TlsMode.ON)
    with pytest.raises(RuntimeError):
        conn.tls_established()


# --- transmission -----------------------------------------------------------------


def test_events_hands_over_every_pending_event_at_once_and_in_order():
    conn = in_transmission()
    conn.receive_data(request(0, offset=0, length=512, cookie=1) + request(0, offset=512, length=512, cookie=2))
    conn.receive_data(request(0, offset=7, length=512, cookie=3))  # misaligned: rejected
    taken = conn.events()
    assert [(type(event).__name__, event.cookie) for event in taken] == [
        ("Request", 1), ("Request", 2), ("RequestRejected", 3)]
    assert not conn.events()


def simple_reply(cookie, error=0):
    return struct.pack(">IIQ", 0x67446698, error, cookie)


def test_read_request_becomes_an_event_and_simple_reply():
    conn = in_transmission()
    conn.receive_data(request(0, offset=4096, length=8192))
    (event,) = events(conn)
    assert isinstance(event, Request) and (event.offset, event.length) == (4096, 8192)
    conn.reply_read(event, b"x" * 8192)
    assert sent(conn) == simple_reply(7) + b"x" * 8192


def test_structured_read_reply_is_one_done_data_chunk():
    conn = in_transmission(structured=True)
    conn.receive_data(request(0, offset=512, length=512, cookie=9))
    (event,) = events(conn)
    conn.reply_read(event, b"y" * 512)
    assert sent(conn) == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 9, 520, 512) + b"y" * 512


def test_write_waits_for_its_whole_payload():
    conn = in_transmission()
    frame = request(1, offset=0, length=4096, flags=1, payload=b"z" * 4096)
    conn.receive_data(frame[:100])
    assert events(conn) == []
    conn.receive_data(frame[100:])
    (event,) = events(conn)
    assert event.data == b"z" * 4096 and event.fua


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_chunks_cut_anywhere_give_the_same_requests_whatever_the_caller_does_after(kind):
    """A chunk is parsed where it is when nothing was left over, and what a chunk leaves
    over is kept apart from it: cutting the stream anywhere, and the caller reusing its
    buffer once receive_data returns (as a bytearray or a view of one allows), change
    nothing."""
    conn = in_transmission()
    pages = [bytes([cookie]) * 4096 for cookie in range(6)]
    stream = b"".join(request(1, offset=cookie * 4096, length=4096, cookie=cookie, payload=page)
                      for cookie, page in enumerate(pages))
    cuts = [0, 4124, 4124 + 28, 3 * 4124 - 5, 3 * 4124 + 1000, 6 * 4124]  # whole, header, inside
    received = []
    for start, end in zip(cuts, cuts[1:]):
        chunk = bytearray(stream[start:end])
        conn.receive_data(chunk if kind is bytearray else memoryview(chunk) if kind is memoryview else bytes(chunk))
        chunk[:] = bytes(len(chunk))  # the caller's buffer, reused
        received += events(conn)
    assert [(event.cookie, event.data) for event in received] == list(enumerate(pages))


def test_pipelined_requests_in_one_chunk():
    conn = in_transmission()
    conn.receive_data(b"".join(request(0, offset=i * 512, length=512, cookie=i) for i in range(128)))
    assert [e.cookie for e in events(conn)] == list(range(128))


@pytest.mark.parametrize("command,offset,length,flags,error", [
    (0, EXPORT.size - 512, 1024, 0, Errno.EINVAL),      # read past the end
    (1, EXPORT.size, 512, 0, Errno.ENOSPC),             # write past the end
    (6, EXPORT.size - 512, 1024, 0, Errno.ENOSPC),      # write zeroes past the end
    (4, EXPORT.size, 512, 0, Errno.EINVAL),             # trim past the end
    (0, 100, 512, 0, Errno.EINVAL),                     # misaligned offset
    (0, 0, 100, 0, Errno.EINVAL),                       # misaligned length
    (0, 0, 0, 0, Errno.EINVAL),                         # zero length
    (0, 0, (32 << 20) + 512, 0, Errno.EINVAL),          # above the maximum payload
    (0, 0, 512, 0x2, Errno.EINVAL),                     # NO_HOLE on a read
    (0, 0, 512, 0x4, Errno.EINVAL),                     # DF without structured replies
    (3, 4096, 0, 0, Errno.EINVAL),                      # flush with an offset
    (7, 0, 512, 0, Errno.EINVAL),                       # block status without a context
    (42, 0, 512, 0, Errno.EINVAL),                      # unknown command
    (4, 0, 512, 0x100, Errno.EINVAL),                   # unknown flag
])
def test_invalid_requests_get_the_spec_error_and_the_connection_lives(command, offset, length, flags, error):
    conn = in_transmission()
    payload = bytes(length) if command == 1 and length <= 32 << 20 else b""
    conn.receive_data(request(command, offset, length, flags, cookie=5, payload=payload))
    (event,) = events(conn)
    assert isinstance(event, RequestRejected) and event.error == error
    assert sent(conn) == simple_reply(5, error)
    conn.receive_data(request(0, 0, 512, cookie=6))
    assert isinstance(events(conn)[0], Request)


def test_oversized_write_payload_is_skipped_not_buffered():
    conn = in_transmission()
    length = 64 << 20
    conn.receive_data(request(1, 0, length, cookie=3))
    assert sent(conn) == simple_reply(3, Errno.EINVAL)
    for _ in range(16):
        conn.receive_data(bytes(1 << 20))
    assert len(conn._in) == 0
    conn.receive_data(bytes(length - (16 << 20)) + request(0, 0, 512, cookie=4))
    events_ = events(conn)
    assert isinstance(events_[-1], Request) and events_[-1].cookie == 4


def test_structured_errors_carry_a_message():
    conn = in_transmission(structured=True)
    conn.receive_data(request(0, EXPORT.size, 512, cookie=2))
    data = sent(conn)
    magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", data)
    assert (magic, flags, kind, cookie) == (0x668E33EF, 1, 0x8001, 2)
    error, message_length = struct.unpack_from(">IH", data, 20)
    assert error == Errno.EINVAL and b"beyond the end" in data[26:26 + message_length]


def test_block_status_reply():
    conn = in_transmission(structured=True, meta=True)
    conn.receive_data(request(7, 0, 8192, cookie=1))
    (event,) = events(conn)
    conn.reply_block_status(event, {1: [(4096, 3), (4096, 0)]})
    assert sent(conn) == (struct.pack(">IHHQI", 0x668E33EF, 1, 5, 1, 20)
                          + struct.pack(">IIIII", 1, 4096, 3, 4096, 0))


def test_block_status_req_one_sends_one_descriptor_within_the_request():
    conn = in_transmission(structured=True, meta=True)
    conn.receive_data(request(7, 0, 4096, flags=0x8, cookie=1))
    (event,) = events(conn)
    conn.reply_block_status(event, {1: [(8192, 3), (4096, 0)]})
    assert sent(conn)[20:] == struct.pack(">III", 1, 4096, 3)


def test_disc_ends_the_session():
    conn = in_transmission()
    conn.receive_data(request(2))
    assert isinstance(events(conn)[0], Disconnect)
    assert conn.closed


def test_bad_request_magic_closes():
    conn = in_transmission()
    conn.receive_data(b"\x00" * 28)
    assert isinstance(events(conn)[0], ProtocolViolation)


# --- property: arbitrary bytes never crash the state machine -------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8), st.booleans())
def test_garbage_never_raises(chunks, handshake_first):
    conn = ServerConnection(ExportCatalog([EXPORT]))
    if handshake_first:
        conn.receive_data(b"\x00\x00\x00\x03" + option(8) + option(7, go_data()))
    for chunk in chunks:
        conn.receive_data(chunk)
        events(conn)
        sent(conn)
