"""The store's bookkeeping of grouped payloads: one packed int per payload.

A grouped payload holds the pages of several blocks of one map group (see
:func:`nbdswap.codec.encode_group`); the store keeps, for each, how many map entries
(block entries and clean copies) point at it, its length, its map group and how many
pages it holds.  A list of four ints per payload in a dict keyed by ``(tier, address)``
cost 224 bytes of heap per payload (300 in a running server, tracemalloc): 8 % of the
stored bytes of pages grouped four to a payload, as pages written in random order are.
Packed into one int keyed by one int, a payload costs 112-120 bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .blockmap import ADDR_LIMIT

_PAGES_BITS = 5  # a payload holds at most GROUP_SIZE (16) pages
_LENGTH_BITS = 16  # grouped payloads are at most 32 KiB
#: Map groups of 16 blocks: 2**40 of them make a device of 64 PiB, whose per-block
#: arrays (Store.heat) could not be allocated anyway.
_GROUP_BITS = 40
_LENGTH_SHIFT = _PAGES_BITS
_GROUP_SHIFT = _LENGTH_SHIFT + _LENGTH_BITS
_REFS_SHIFT = _GROUP_SHIFT + _GROUP_BITS
_ONE_REFERENCE = 1 << _REFS_SHIFT
_PAGES_MASK = (1 << _PAGES_BITS) - 1
_TIER_SHIFT = ADDR_LIMIT.bit_length() - 1


class Share(NamedTuple):
    """What the store knows of one grouped payload."""

    references: int
    length: int
    group: int
    #: Pages the payload holds, 0 until known (learnt when it is decoded or written).
    pages: int


def _key(slot: tuple[int, int]) -> int:
    tier, addr = slot
    return tier << _TIER_SHIFT | addr


def _slot(key: int) -> tuple[int, int]:
    return key >> _TIER_SHIFT, key & (ADDR_LIMIT - 1)


def _unpack(value: int) -> Share:
    return Share(value >> _REFS_SHIFT, value >> _LENGTH_SHIFT & ((1 << _LENGTH_BITS) - 1),
                 value >> _GROUP_SHIFT & ((1 << _GROUP_BITS) - 1), value & _PAGES_MASK)


class GroupedPayloads:
    """Grouped payloads by slot ``(tier id, address)``."""

    def __init__(self) -> None:
        self._packed: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._packed)

    def __contains__(self, slot: tuple[int, int]) -> bool:
        return _key(slot) in self._packed

    def get(self, slot: tuple[int, int]) -> Share | None:
        value = self._packed.get(_key(slot))
        return None if value is None else _unpack(value)

    def hold(self, slot: tuple[int, int], length: int, group: int) -> bool:
        """Count one more reference to the payload at ``slot`` (of ``length`` bytes,
        holding pages of map group ``group``); True if it was not known before."""
        key = _key(slot)
        value = self._packed.get(key)
        if value is None:
            self._packed[key] = _ONE_REFERENCE | group << _GROUP_SHIFT | length << _LENGTH_SHIFT
            return True
        self._packed[key] = value + _ONE_REFERENCE
        return False

    def release(self, slot: tuple[int, int], count: int) -> int | None:
        """Drop ``count`` references; the references left (the payload is forgotten at
        0), or ``None`` with nothing changed if it had fewer."""
        key = _key(slot)
        value = self._packed.get(key)
        if value is None or value >> _REFS_SHIFT < count:
            return None
        value -= count * _ONE_REFERENCE
        if value < _ONE_REFERENCE:
            del self._packed[key]
            return 0
        self._packed[key] = value
        return value >> _REFS_SHIFT

    def set_pages(self, slot: tuple[int, int], pages: int) -> None:
        """Record how many pages the payload at ``slot`` holds, if it is known."""
        key = _key(slot)
        value = self._packed.get(key)
        if value is not None:
            self._packed[key] = value & ~_PAGES_MASK | pages

    def items(self) -> Iterator[tuple[tuple[int, int], Share]]:
        return ((_slot(key), _unpack(value)) for key, value in self._packed.items())
