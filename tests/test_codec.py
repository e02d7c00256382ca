"""Page classification, compression and checksums."""

import random
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdswap.codec import (
    PAGE_SIZE,
    RAW_THRESHOLD,
    ZERO_PAGE,
    GROUP_PAYLOAD_LIMIT,
    DecodeError,
    PageKind,
    checksum,
    decode_group,
    decode_payload,
    encode,
    encode_group,
    same_filled_page,
)

GOLDEN_PAGE = (b"nbdswap golden page " * 205)[:PAGE_SIZE]
#: GOLDEN_PAGE as the codec stores it (magicless zstd frame): stored pages must stay
#: readable by every later version.
GOLDEN_PAYLOAD = bytes.fromhex(
    "0010e50000a06e62647377617020676f6c64656e2070616765200100d27ffe6402"
)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def test_checksum_is_xxh3_64_truncated_to_32_bits():
    assert checksum(ZERO_PAGE) == 0x48C689BA
    assert checksum(bytes(range(256)) * 16) == 0x07879151


def test_golden_payload_decodes():
    assert decode_payload(GOLDEN_PAYLOAD, True, 0x7C040C88) == GOLDEN_PAGE


def test_zero_page():
    encoded = encode(ZERO_PAGE)
    assert encoded.kind == PageKind.ZERO
    assert encoded.payload == b""


@pytest.mark.parametrize("word", [b"\xff" * 8, b"\x01" + b"\0" * 7, b"ABCDEFGH", b"\0" * 7 + b"\x80"])
def test_same_filled_page_keeps_only_its_word(word):
    page = word * (PAGE_SIZE // 8)
    encoded = encode(page)
    assert encoded.kind == PageKind.SAME_FILLED
    assert encoded.payload == b""
    assert same_filled_page(encoded.word) == page


def test_same_first_words_but_different_tail_is_not_same_filled():
    page = b"ABCDEFGH" * 511 + b"ABCDEFGX"
    encoded = encode(page)
    assert encoded.kind == PageKind.COMPRESSED
    assert decode_payload(encoded.payload, True, encoded.checksum) == page


def test_compressible_page_has_a_small_magicless_frame():
    encoded = encode(GOLDEN_PAGE)
    assert encoded.kind == PageKind.COMPRESSED
    assert len(encoded.payload) < 64
    assert not encoded.payload.startswith(ZSTD_MAGIC)
    assert encoded.checksum == checksum(GOLDEN_PAGE)


def test_incompressible_page_is_stored_raw():
    page = random.Random(1).randbytes(PAGE_SIZE)
    encoded = encode(page)
    assert encoded.kind == PageKind.RAW
    assert encoded.payload == page
    assert decode_payload(encoded.payload, False, encoded.checksum) == page


def test_nearly_incompressible_page_is_stored_raw():
    """Compressed output above the threshold would not save a size class."""
    rng = random.Random(2)
    page = rng.randbytes(PAGE_SIZE - 40) + bytes(40)
    assert encode(page).kind == PageKind.RAW


@pytest.mark.parametrize("length", [0, 512, PAGE_SIZE - 1, PAGE_SIZE + 1])
def test_encode_rejects_other_lengths(length):
    with pytest.raises(ValueError):
        encode(bytes(length))


def test_decode_detects_checksum_mismatch():
    encoded = encode(GOLDEN_PAGE)
    with pytest.raises(DecodeError, match="checksum"):
        decode_payload(encoded.payload, True, encoded.checksum ^ 1)


@pytest.mark.parametrize("bit", range(8))
def test_flipped_payload_bit_never_decodes_to_wrong_data(bit):
    """Either the damage is detected or it hit a bit zstd ignores (the frame
    header's unused bit) and the page is intact."""
    encoded = encode(GOLDEN_PAGE)
    for position in range(len(encoded.payload)):
        damaged = bytearray(encoded.payload)
        damaged[position] ^= 1 << bit
        try:
            page = decode_payload(bytes(damaged), True, encoded.checksum)
        except DecodeError:
            continue
        assert page == GOLDEN_PAGE


@pytest.mark.parametrize("payload", [b"", b"\x00", b"garbage that is not zstd", bytes(100)])
def test_decode_rejects_garbage(payload):
    with pytest.raises(DecodeError):
        decode_payload(payload, True, 0)


def test_decode_rejects_raw_payload_of_wrong_length():
    with pytest.raises(DecodeError):
        decode_payload(bytes(100), False, checksum(bytes(100)))


def _pages():
    """Pages of mixed content: runs of bytes, words, text and noise."""
    run = st.tuples(st.integers(1, 600), st.binary(min_size=1, max_size=9)).map(lambda r: (r[1] * r[0]))
    noise = st.binary(min_size=1, max_size=300)
    return st.lists(st.one_of(run, noise), min_size=1, max_size=40).map(
        lambda parts: (b"".join(parts) * PAGE_SIZE)[:PAGE_SIZE]
    )


@given(_pages())
def test_round_trip(page):
    encoded = encode(page)
    if encoded.kind == PageKind.ZERO:
        assert page == ZERO_PAGE
    elif encoded.kind == PageKind.SAME_FILLED:
        assert same_filled_page(encoded.word) == page
    else:
        assert 0 < len(encoded.payload) <= PAGE_SIZE
        assert encoded.kind == PageKind.RAW or len(encoded.payload) <= RAW_THRESHOLD
        compressed = encoded.kind == PageKind.COMPRESSED
        assert decode_payload(encoded.payload, compressed, encoded.checksum) == page


@given(st.dictionaries(st.integers(0, 15), st.integers(0, 2**16), min_size=1))
def test_grouped_payloads_round_trip_each_slot(seeds):
    pages = {slot: (random.Random(seed).choice([b"swap ", b"page ", b"\x00\x01"]) * PAGE_SIZE)[:PAGE_SIZE]
             for slot, seed in seeds.items()}
    group = decode_group(encode_group(pages))
    for slot in range(16):
        if slot in pages:
            assert group.page(slot, checksum(pages[slot])) == pages[slot]
        else:
            with pytest.raises(DecodeError, match="no page"):
                group.page(slot, 0)


def test_grouped_payloads_refuse_what_does_not_decode_to_their_pages():
    pages = {0: GOLDEN_PAGE, 5: GOLDEN_PAGE[::-1]}
    payload = encode_group(pages)
    assert encode_group({slot: random.Random(slot).randbytes(PAGE_SIZE) for slot in range(16)}) is None
    assert len(payload) < GROUP_PAYLOAD_LIMIT
    for damaged in (b"\x02" + payload[1:], payload[:1] + b"\x23\x00" + payload[3:], payload[:-3], payload[:2]):
        with pytest.raises(DecodeError):
            decode_group(damaged)
    moved = decode_group(payload[:1] + b"\x41\x00" + payload[3:])  # slot 5's page claimed by slot 6
    with pytest.raises(DecodeError, match="no page"):
        moved.page(5, checksum(pages[5]))


def test_grouped_payloads_are_encoded_safely_from_several_threads_at_once():
    """The store compresses groups on a worker thread, and encode_group may be called
    from any thread.  Without the codec's lock, two threads in its one zstd compressor
    crash the process or produce wrong payloads: hence a child process, which compares
    what the threads encode with what one thread encoded first (decoding is left to
    one thread: the decompressor is not shared across threads)."""
    script = textwrap.dedent("""
        import random
        from concurrent.futures import ThreadPoolExecutor
        from nbdswap.codec import encode_group
        groups = [{slot: random.Random(seed * 16 + slot).randbytes(1500) + bytes(2596) for slot in range(16)}
                  for seed in range(4)]
        expected = [encode_group(pages) for pages in groups]
        def encode_all(_):
            return all(encode_group(pages) == payload for _ in range(50)
                       for pages, payload in zip(groups, expected))
        with ThreadPoolExecutor(4) as pool:
            print(all(pool.map(encode_all, range(8))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "True"), result.stderr[-2000:]
