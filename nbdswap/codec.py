"""Page classification, compression and checksums for 4096-byte blocks.

A page is one of:

* ``ZERO``: all zero bytes; only a map entry, no tier space.
* ``SAME_FILLED``: one 8-byte word repeated 512 times (as zram does); the word lives
  in the map entry, no tier space.
* ``COMPRESSED``: zstandard level 1 in the magicless frame format without content size,
  checksum or dictionary id, so the frame header is two bytes.
* ``RAW``: the compressed form would not save a size class, so the page is stored as is
  and reads skip decompression.

The checksum covers the original page (xxh3-64 truncated to 32 bits), so it also
catches corruption of compressed data that still decompresses.
"""

from __future__ import annotations

import enum
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

_COMPRESSOR = zstandard.ZstdCompressor(
    compression_params=zstandard.ZstdCompressionParameters.from_level(
        1,
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
        return Encoded(PageKind.SAME_FILLED, b"", int.from_bytes(word, "little"), 0)
    compressed = _COMPRESSOR.compress(page)
    if len(compressed) > RAW_THRESHOLD:
        return Encoded(PageKind.RAW, bytes(page), 0, checksum(page))
    return Encoded(PageKind.COMPRESSED, compressed, 0, checksum(page))


def same_filled_page(word: int) -> bytes:
    return word.to_bytes(WORD_SIZE, "little") * WORDS_PER_PAGE


def decode_payload(payload: bytes, compressed: bool, expected_checksum: int) -> bytes:
    """Turn a tier payload back into its page, verifying the checksum.

    Raises :class:`DecodeError` when the payload is damaged in any way.
    """
    if compressed:
        try:
            page = _DECOMPRESSOR.decompress(payload, max_output_size=PAGE_SIZE)
        except zstandard.ZstdError as error:
            raise DecodeError(f"undecompressable payload: {error}") from None
    else:
        page = payload
    if len(page) != PAGE_SIZE:
        raise DecodeError(f"payload decodes to {len(page)} bytes")
    if checksum(page) != expected_checksum:
        raise DecodeError("checksum mismatch")
    return page
