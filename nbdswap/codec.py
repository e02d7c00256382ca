"""Page classification, compression and checksums for 4096-byte blocks.

A page is one of:

* ``ZERO``: all zero bytes; only a map entry, no tier space.
* ``SAME_FILLED``: one 8-byte word repeated 512 times (as zram does); the word lives
  in the map entry, no tier space.
* ``COMPRESSED``: zstandard level :data:`WRITE_LEVEL` in the magicless frame format
  without content size, checksum or dictionary id, so the frame header is two bytes.
* ``RAW``: the compressed form would not save a size class, so the page is stored as is
  and reads skip decompression.

The checksum covers the original page (xxh3-64 truncated to 32 bits), so it also
catches corruption of compressed data that still decompresses.

*Grouped* payloads (the cold blocks of the disk and remote tiers): pages of one aligned
group of :data:`GROUP_PAGES` consecutive blocks compressed together, which stores
0.73-0.83x the bytes of per-page zstd on real memory at :data:`GROUP_LEVEL` (neighbouring
pages share strings; random pages do not).  Such a payload is a header (format byte,
16-bit bitmap of the group slots it holds) and one magicless zstd frame of those pages
concatenated in slot order.  Each block's map entry keeps its own page checksum.

Only :func:`encode_group` may be called from several threads; everything else here
belongs to the event loop's thread.
"""

from __future__ import annotations

import enum
import struct
import threading
from typing import NamedTuple

import xxhash
import zstandard

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
WORD_SIZE = 8
WORDS_PER_PAGE = PAGE_SIZE // WORD_SIZE
#: A compressed page longer than this lands in the same size class as a raw page
#: (the slab allocator rounds to 64 bytes), so storing it raw costs nothing.
RAW_THRESHOLD = PAGE_SIZE - 64
CHECKSUM_MASK = 0xFFFF_FFFF

#: zstd level of written pages.  -1 takes 28-50 % less CPU than level 1 (one process,
#: real memory 5.0-7.8 against 8.4-10.9 µs a page, fio's buffers 2.7 against 5.3) for
#: about 6 % more bytes (1.055 against 0.992x the zram-like reference on a real-memory
#: corpus, 4-16 % on parts of it), which grouping idle and cold pages at
#: :data:`GROUP_LEVEL` takes back: the write is on the swap-out path, the grouping is
#: background work (zram's recompression of idle pages, the same idea).
WRITE_LEVEL = -1
_COMPRESSOR = zstandard.ZstdCompressor(
    compression_params=zstandard.ZstdCompressionParameters.from_level(
        WRITE_LEVEL,
        # Tunes window and tables for 4 KiB inputs: about 1.5 % smaller pages than
        # zstd's defaults for inputs of unknown size (bench/corpus.py report).
        source_size=PAGE_SIZE,
        format=zstandard.FORMAT_ZSTD1_MAGICLESS,
        write_content_size=0,
        write_checksum=0,
        write_dict_id=0,
    )
)
_DECOMPRESSOR = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)

GROUP_PAGES = 16
#: zstd level of grouped payloads.  On four heaps never tuned on (V8, Redis, Perl,
#: CPython; bench/RESULTS.md) level 3 stored 0.79-0.86x the zram-like reference, just
#: under the issue's 0.87x target (the V8 heap's slots above it, 0.877x); level 6
#: stores 0.73-0.83x for 2.0-3.5x the compression time (22-49 us a page) and
#: decompresses no slower.  Grouping is background work, on a thread of its own.
GROUP_LEVEL = 6
#: Larger grouped payloads are not made (the pages are stored one by one instead).
GROUP_PAYLOAD_LIMIT = 32 * 1024
#: The store compresses groups on a worker thread; one zstd compressor used by two
#: threads at once crashes the process.
_GROUP_LOCK = threading.Lock()
_GROUP_HEADER = struct.Struct("<BH")  # format, bitmap of the slots held
_GROUP_FORMAT = 1
_GROUP_COMPRESSOR = zstandard.ZstdCompressor(
    compression_params=zstandard.ZstdCompressionParameters.from_level(
        GROUP_LEVEL,
        source_size=GROUP_PAGES * PAGE_SIZE,
        format=zstandard.FORMAT_ZSTD1_MAGICLESS,
        write_content_size=0,
        write_checksum=0,
        write_dict_id=0,
    )
)
_xxh3 = xxhash.xxh3_64_intdigest


class PageKind(enum.IntEnum):
    ZERO = 0
    SAME_FILLED = 1
    COMPRESSED = 2
    RAW = 3


class Encoded(NamedTuple):
    """How one page is stored: ``payload`` goes to a tier, ``word`` into the map entry."""

    kind: PageKind
    payload: bytes
    word: int
    checksum: int


_ZERO = Encoded(PageKind.ZERO, b"", 0, 0)
#: As globals: looking a member up on the Enum class costs ~80 ns each time.
_SAME_FILLED, _COMPRESSED, _RAW = PageKind.SAME_FILLED, PageKind.COMPRESSED, PageKind.RAW
#: Builds an :class:`Encoded` from a tuple: every written page makes one, and the
#: Python-level ``__new__`` NamedTuple generates cost 1.2k instructions more (callgrind).
_new_tuple = tuple.__new__


class DecodeError(ValueError):
    """Stored bytes do not decode to the page they were written from."""


def checksum(page: bytes) -> int:
    return _xxh3(page) & CHECKSUM_MASK


def encode(page: bytes) -> Encoded:
    """Classify and encode one ``PAGE_SIZE`` page."""
    if len(page) != PAGE_SIZE:
        raise ValueError(f"a page is {PAGE_SIZE} bytes, not {len(page)}")
    if page == ZERO_PAGE:
        return _ZERO
    word = page[:WORD_SIZE]
    # The cheap two-word test rejects almost every data page before the full compare.
    if page[WORD_SIZE : 2 * WORD_SIZE] == word and word * WORDS_PER_PAGE == page:
        return _new_tuple(Encoded, (_SAME_FILLED, b"", int.from_bytes(word, "little"), 0))
    compressed = _COMPRESSOR.compress(page)
    if len(compressed) > RAW_THRESHOLD:
        return _new_tuple(Encoded, (_RAW, bytes(page), 0, checksum(page)))
    return _new_tuple(Encoded, (_COMPRESSED, compressed, 0, _xxh3(page) & CHECKSUM_MASK))  # checksum()


def split_pages(data: bytes) -> list[bytes]:
    """The ``PAGE_SIZE`` pages of ``data`` (a whole number of them); a single page is
    not copied."""
    if len(data) == PAGE_SIZE:
        return [data]
    return [data[start : start + PAGE_SIZE] for start in range(0, len(data), PAGE_SIZE)]


def same_filled_page(word: int) -> bytes:
    return word.to_bytes(WORD_SIZE, "little") * WORDS_PER_PAGE


def decode_payload(payload: bytes, compressed: bool, expected_checksum: int) -> bytes:
    """Turn a tier payload back into its page, verifying the checksum.

    Raises :class:`DecodeError` when the payload is damaged in any way.
    """
    if compressed:
        try:
            # max_output_size, passed positionally: zstandard parses keywords in
            # 0.2 µs of the 0.8 µs this call takes (measured).
            page = _DECOMPRESSOR.decompress(payload, PAGE_SIZE)
        except zstandard.ZstdError as error:
            raise DecodeError(f"undecompressable payload: {error}") from None
    else:
        page = payload
    if len(page) != PAGE_SIZE:
        raise DecodeError(f"payload decodes to {len(page)} bytes")
    if checksum(page) != expected_checksum:
        raise DecodeError("checksum mismatch")
    return page


def encode_group(pages: dict[int, bytes]) -> bytes | None:
    """A grouped payload of ``{slot: page}`` (slots 0..15), or ``None`` if it would be
    longer than :data:`GROUP_PAYLOAD_LIMIT`.  Any thread may call it."""
    bitmap = 0
    for slot in pages:
        bitmap |= 1 << slot
    data = b"".join(pages[slot] for slot in sorted(pages))
    with _GROUP_LOCK:
        frame = _GROUP_COMPRESSOR.compress(data)
    if _GROUP_HEADER.size + len(frame) > GROUP_PAYLOAD_LIMIT:
        return None
    return _GROUP_HEADER.pack(_GROUP_FORMAT, bitmap) + frame


class Group(NamedTuple):
    """A decoded grouped payload: the bitmap of its slots and their pages, concatenated."""

    bitmap: int
    data: bytes

    def page(self, slot: int, expected_checksum: int) -> bytes:
        """The page of ``slot``, verified; :class:`DecodeError` if absent or damaged."""
        if not self.bitmap >> slot & 1:
            raise DecodeError(f"the grouped payload holds no page for slot {slot}")
        start = (self.bitmap & ((1 << slot) - 1)).bit_count() * PAGE_SIZE
        page = self.data[start : start + PAGE_SIZE]
        if checksum(page) != expected_checksum:
            raise DecodeError("checksum mismatch")
        return page


def decode_group(payload: bytes) -> Group:
    """Decompress a grouped payload; :class:`DecodeError` when it is damaged."""
    if len(payload) < _GROUP_HEADER.size:
        raise DecodeError("grouped payload shorter than its header")
    form, bitmap = _GROUP_HEADER.unpack_from(payload)
    if form != _GROUP_FORMAT:
        raise DecodeError(f"unknown grouped payload format {form}")
    try:
        data = _DECOMPRESSOR.decompress(memoryview(payload)[_GROUP_HEADER.size :],
                                        max_output_size=GROUP_PAGES * PAGE_SIZE)
    except zstandard.ZstdError as error:
        raise DecodeError(f"undecompressable grouped payload: {error}") from None
    if len(data) != bitmap.bit_count() * PAGE_SIZE:
        raise DecodeError(f"grouped payload decodes to {len(data)} bytes for {bitmap.bit_count()} pages")
    return Group(bitmap, data)
