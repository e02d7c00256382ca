"""Fuzzing of the sans-IO protocol core: no input crashes it or makes it buffer without bound.

Three generators drive :class:`ServerConnection` directly, as the asyncio adapter does
(feed chunks, drain events, answer requests, finish STARTTLS):

- a fast seeded loop of mutated handshakes, options and requests (over a million
  frames per run; the count is asserted);
- hypothesis strategies, with exact oracles: every well-framed option gets exactly one
  final reply, every well-framed request exactly one event, in order;
- atheris (coverage-guided libFuzzer) over raw byte streams, in a subprocess because
  libFuzzer ends its process; this file is also its harness (``python test_fuzz.py
  -runs=N``).

After every chunk the harness asserts the bounds: the input buffer never holds more
than one incomplete frame of the allowed size, and the output is at most a constant
times the input (handshake replies cannot be amplified without limit).
"""

from __future__ import annotations

import random
import re
import struct
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # the atheris harness: instrument the core before importing it
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with atheris.instrument_imports(include=["nbdswap.protocol"]):
        import nbdswap.protocol.connection  # noqa: F401

import pytest  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nbdswap.protocol import (  # noqa: E402
    Command,
    Disconnect,
    Errno,
    Export,
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

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPTION_REPLY_MAGIC = 0x3E889045565A9
MAX_PAYLOAD = 64 * 1024
MAX_OPTION = 4096
EXPORT = Export(name="swap", size=64 << 20, description="fuzzed", maximum_payload=MAX_PAYLOAD)
CATALOG = ExportCatalog([EXPORT, Export(name="other", size=1 << 20, maximum_payload=MAX_PAYLOAD)])
#: The most the input buffer may hold after a chunk: one incomplete frame.
BUFFER_BOUND = max(16 + MAX_OPTION, 28 + MAX_PAYLOAD)
#: Output per input byte (plus a constant): a 16-byte option earns a few replies.
AMPLIFICATION = 32
ZEROS = bytes(MAX_PAYLOAD)
TLS_MODES = (TlsMode.OFF, TlsMode.ON, TlsMode.REQUIRE)


# --- the harness: drive one connection like the asyncio adapter ---------------------


class Harness:
    """Feeds chunks, answers events and checks the bounds after each chunk."""

    def __init__(self, tls: TlsMode, rng: random.Random, conn: ServerConnection | None = None) -> None:
        self.conn = conn or ServerConnection(CATALOG, tls=tls, max_option_length=MAX_OPTION)
        self.rng = rng
        self.events: list = []
        self.out = sum(map(len, self.conn.data_to_send()))
        self.fed = 0
        self.transmitting = self.conn.in_transmission  # a connection handed over may be past GO

    def feed(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        self.fed += len(data)
        while events := conn.events():  # answering STARTTLS may make more
            for event in events:
                self.events.append(event)
                self._answer(event)
        assert len(conn._in) <= BUFFER_BOUND, len(conn._in)
        assert conn._discard < 1 << 32
        if conn.closed:
            assert not conn._in
        out = sum(map(len, conn.data_to_send()))
        if not self.transmitting:  # handshake replies; read replies carry what was asked
            self.out += out
            assert self.out <= AMPLIFICATION * self.fed + 4096, (self.out, self.fed)

    def _answer(self, event) -> None:
        conn = self.conn
        if isinstance(event, StartTLS):
            conn.tls_established()
        elif isinstance(event, TransmissionStarted):
            self.transmitting = True
        elif isinstance(event, Request):
            _reply(conn, event, self.rng.random())
        elif isinstance(event, (ProtocolViolation, Disconnect)):
            assert conn.closed
        else:
            assert isinstance(event, (RequestRejected, OptionHandled, OptionTooLarge))

    def feed_in_chunks(self, stream: bytes) -> None:
        """Split ``stream`` at random points, as TCP may."""
        rng, position = self.rng, 0
        while position < len(stream):
            step = rng.choice((1, 7, 16, 100, 4096, 1 << 16, len(stream)))
            self.feed(stream[position:position + step])
            position += step


def _reply(conn: ServerConnection, request: Request, luck: float) -> None:
    if luck < 0.1:
        conn.reply_error(request, Errno.EIO, "fuzzed failure")
    elif request.command == Command.READ:
        conn.reply_read(request, ZEROS[:request.length])
    elif request.command == Command.BLOCK_STATUS:
        conn.reply_block_status(request, {1: [(min(request.length, 4096), 3), (4096, 0)]})
    else:
        conn.reply_ok(request)


# --- the fast generator ------------------------------------------------------------------


def _frame(code: int, body: bytes) -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(body)) + body


def _name(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name


def _go(name: bytes, infos=(0, 1, 2, 3)) -> bytes:
    return _name(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def _meta(name: bytes, queries) -> bytes:
    return (_name(name) + struct.pack(">I", len(queries))
            + b"".join(_name(query) for query in queries))


#: Option payloads worth mutating: valid ones of every kind and near misses.
OPTION_BODIES = [
    b"", b"swap", b"other", b"nope", b"\xff\xfe", b"a\x00b",
    _go(b"swap"), _go(b""), _go(b"other", ()), _go(b"nope"), _go(b"swap", (9,) * 40),
    _meta(b"swap", [b"base:allocation"]), _meta(b"swap", []), _meta(b"swap", [b"base:"]),
    _meta(b"swap", [b"noprefix"]), _meta(b"other", [b"base:allocation", b"qemu:x"]),
    struct.pack(">I", 0xFFFFFFFF) + b"swap", struct.pack(">II", 4, 0) + b"swap",
]
OPTION_CODES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF]
COMMON_OPTIONS = [3, 5, 6, 8, 9, 10] * 4  # weighted towards the ones that keep haggling
HUGE_LENGTHS = [MAX_OPTION + 1, 1 << 20, (1 << 31) - 1, 0xFFFFFFFF]
COMMANDS = [0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 42, 0xFFFF]
FLAGS = [0, 0, 0, 1, 2, 4, 8, 16, 3, 0x1F, 0x20, 0x8000, 0xFFFF]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    kind = rng.randrange(4)
    position = rng.randrange(len(data))
    if kind == 0:
        return data[:position]
    if kind == 1:
        return data[:position] + bytes([data[position] ^ (1 << rng.randrange(8))]) + data[position + 1:]
    if kind == 2:
        return data + rng.randbytes(rng.randrange(1, 9))
    return data[:position] + rng.randbytes(4) + data[position + 4:]


def gen_option(rng: random.Random, code: int | None = None) -> bytes:
    code = rng.choice(OPTION_CODES if rng.random() < 0.3 else COMMON_OPTIONS) if code is None else code
    body = rng.choice(OPTION_BODIES)
    if rng.random() < 0.3:
        body = _mutate(rng, body)
    length = len(body)
    luck = rng.random()
    if luck < 0.02:
        length = rng.choice(HUGE_LENGTHS)  # declared, never sent in full
    elif luck < 0.04:
        body = body[:-1] if body else b""  # truncated frame
    magic = IHAVEOPT if rng.random() > 0.005 else rng.getrandbits(64)
    return struct.pack(">QII", magic, code, length) + body


def gen_request(rng: random.Random) -> bytes:
    command = rng.choice(COMMANDS)
    size = EXPORT.size
    offset = rng.choice((0, 512, 4096, size - 4096, size - 512, size, 1 << 63, (1 << 64) - 1,
                         rng.randrange(0, size, 512), rng.randrange(size)))
    length = rng.choice((0, 512, 4096, 4096, 8192, 100, MAX_PAYLOAD, MAX_PAYLOAD + 512,
                         (1 << 31), (1 << 31) - 512, 0xFFFFFFFF, rng.randrange(0, MAX_PAYLOAD, 512)))
    flags = rng.choice(FLAGS)
    magic = REQUEST_MAGIC if rng.random() > 0.003 else rng.getrandbits(32)
    header = struct.pack(">IHHQQI", magic, flags, command, rng.getrandbits(64), offset, length)
    if command != Command.WRITE:
        return header
    if length <= MAX_PAYLOAD:
        return header + ZEROS[:length - (rng.random() < 0.02)]
    return header + ZEROS[:rng.randrange(64)]  # a huge declared write, truncated


def gen_connection(rng: random.Random) -> tuple[TlsMode, list[bytes]]:
    """One connection's frames: client flags, options, maybe STARTTLS, GO, requests."""
    frames = [struct.pack(">I", 3 if rng.random() > 0.02 else rng.getrandbits(32))]
    tls = rng.choice(TLS_MODES)
    frames += [gen_option(rng) for _ in range(rng.randrange(4))]
    if tls is not TlsMode.OFF and rng.random() < 0.7:
        frames.append(gen_option(rng, 5) if rng.random() < 0.2 else _frame(5, b""))
    frames += [gen_option(rng) for _ in range(rng.randrange(3))]
    if rng.random() < 0.9:
        name = rng.choice((b"swap", b"", b"other"))
        frames.append(_frame(8, b""))
        frames.append(gen_option(rng, 10) if rng.random() < 0.2 else _frame(10, _meta(name, [b"base:allocation"])))
        if rng.random() < 0.1:
            frames.append(gen_option(rng, 7))
        else:
            frames.append(_frame(1, name) if rng.random() < 0.2 else _frame(7, _go(name)))
    frames += [gen_request(rng) for _ in range(rng.randrange(24))]
    return tls, frames


def run_generated(seed: int, connections: int) -> int:
    """Drive ``connections`` generated connections; return the number of frames."""
    rng = random.Random(seed)
    frames_total = 0
    for _ in range(connections):
        tls, frames = gen_connection(rng)
        harness = Harness(tls, rng)
        if rng.random() < 0.5:
            for frame in frames:
                harness.feed(frame)
        else:
            harness.feed_in_chunks(b"".join(frames))
        frames_total += len(frames)
    return frames_total


@pytest.mark.parametrize("seed", range(4))
def test_a_million_generated_frames_never_crash_or_grow_buffers(seed):
    """4 × 16,000 connections of ~18 frames (client flags, options, requests) each:
    over a million frames in all."""
    frames = run_generated(seed, 16_000)
    assert frames >= 250_000, frames


# --- hypothesis: structure-aware, with exact oracles -------------------------------------

option_payloads = st.one_of(
    st.sampled_from(OPTION_BODIES), st.binary(max_size=64),
    st.builds(_go, st.sampled_from([b"swap", b"", b"other", b"x" * 300]),
              st.lists(st.integers(0, 0xFFFF), max_size=6)),
    st.builds(_meta, st.sampled_from([b"swap", b"", b"nope"]),
              st.lists(st.sampled_from([b"base:allocation", b"base:", b"x", b"qemu:a"]), max_size=4)),
)
option_codes = st.one_of(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), st.integers(0, 0xFFFFFFFF))


def _final_replies(data: bytes) -> list[int]:
    """The option codes of every final (not INFO/SERVER/META_CONTEXT) option reply."""
    finals, position = [], 0
    while position < len(data):
        magic, code, kind, length = struct.unpack_from(">QIII", data, position)
        assert magic == OPTION_REPLY_MAGIC
        if kind not in (2, 3, 4):
            finals.append(code)
        position += 20 + length
    assert position == len(data)
    return finals


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TLS_MODES), st.lists(st.tuples(option_codes, option_payloads), max_size=12))
def test_every_well_framed_option_gets_exactly_one_final_reply(tls, options):
    conn = ServerConnection(CATALOG, tls=tls)
    greeting = b"".join(conn.data_to_send())
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    conn.receive_data(struct.pack(">I", 3))
    for code, payload in options:
        if code == 1:
            continue  # EXPORT_NAME has no option reply
        conn.receive_data(struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload)
        while events := conn.events():  # tls_established() may make more
            for event in events:
                if isinstance(event, StartTLS):
                    conn.tls_established()
        if conn.closed:
            return
        out = b"".join(conn.data_to_send())
        assert _final_replies(out) == [code]
        if conn.in_transmission:
            return


requests = st.tuples(
    st.sampled_from([0, 1, 3, 4, 5, 6, 7, 9, 0xFFFF]),  # every command but DISC, plus unknown
    st.integers(0, 0xFFFF),
    st.one_of(st.integers(0, EXPORT.size + 4096), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.sampled_from([0, 512, 4096, MAX_PAYLOAD, MAX_PAYLOAD + 512, 1 << 31]),
              st.integers(0, 0xFFFFFFFF)),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(requests, max_size=20), st.integers(1, 64))
@example(False, [(0, 0, 0, 65536)], 1)  # a read reply larger than the amplification bound
def test_every_well_framed_request_gets_exactly_one_event_in_order(structured, batch, pieces):
    conn = ServerConnection(CATALOG)
    setup = struct.pack(">I", 3)
    if structured:
        setup += _frame(8, b"") + _frame(10, _meta(b"swap", [b"base:allocation"]))
    conn.receive_data(setup + _frame(7, _go(b"swap")))
    conn.events()
    stream, expected = b"", []
    for cookie, (command, flags, offset, length) in enumerate(batch):
        stream += struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)
        expected.append(cookie)
        if command != Command.WRITE:
            continue
        if length >= 1 << 20:
            break  # refused at once; its payload would swallow the rest of the batch
        stream += bytes(length)
    harness = Harness(TlsMode.OFF, random.Random(pieces), conn)
    chunk = max(1, -(-len(stream) // pieces))
    for position in range(0, len(stream), chunk):
        harness.feed(stream[position:position + chunk])
    assert all(isinstance(event, (Request, RequestRejected)) for event in harness.events)
    assert [event.cookie for event in harness.events] == expected


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(TLS_MODES), st.lists(st.binary(max_size=300), max_size=10), st.booleans())
def test_garbage_after_any_prefix_keeps_the_bounds(tls, chunks, handshake_first):
    harness = Harness(tls, random.Random(0))
    if handshake_first:
        harness.feed(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 8, 0)
                     + struct.pack(">QII", IHAVEOPT, 5, 0))
    for chunk in chunks:
        harness.feed(chunk)


# --- atheris: coverage-guided, over raw byte streams -------------------------------------

ATHERIS_RUNS = 20_000


def _atheris_one_input(data: bytes) -> None:
    """First byte: TLS mode and whether a valid handshake leads; the rest, in chunks."""
    if not data:
        return
    control, stream = data[0], data[1:]
    harness = Harness(TLS_MODES[control % 3], random.Random(control))
    if control & 4:
        harness.feed(struct.pack(">I", 3))
        if control & 8:
            harness.feed(_frame(8, b"") + _frame(7, _go(b"swap")))
    step = (1, 3, 16, 28, 100, 512, 2048, 4096)[control >> 5]
    for position in range(0, len(stream), step):
        harness.feed(stream[position:position + step])


def test_atheris_coverage_guided(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(_atheris_seeds()):
        (corpus / f"seed{index}").write_bytes(seed)
    result = subprocess.run(
        [sys.executable, __file__, f"-runs={ATHERIS_RUNS}", "-max_len=1024", "-seed=1",
         "-rss_limit_mb=1024", "-timeout=10", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, timeout=600)
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, log[-4000:]
    done = re.search(r"Done (\d+) runs", log)
    assert done and int(done.group(1)) >= ATHERIS_RUNS, log[-2000:]


def _atheris_seeds() -> list[bytes]:
    rng = random.Random(5)
    seeds = []
    for control in (0x00, 0x04, 0x0D, 0x1E, 0x4C, 0xFC):
        _, frames = gen_connection(rng)
        seeds.append(bytes([control]) + b"".join(frames[1:])[:2000])
    return seeds


if __name__ == "__main__":
    atheris.Setup(sys.argv, _atheris_one_input)
    atheris.Fuzz()
