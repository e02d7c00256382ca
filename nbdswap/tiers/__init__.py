"""Storage tiers: one async interface, implemented by the RAM, disk and remote tiers.

A tier stores opaque payloads of 1..4096 bytes (the disk tier also grouped payloads of
up to 32 KiB, see :mod:`nbdswap.tiers.slab`) and hands out integer addresses.  It
knows nothing about blocks: the block map records which address holds which block, and
at start-up the store replays the map into each tier with :meth:`Tier.mark_used`
(then :meth:`Tier.finish_marking`).
"""

from __future__ import annotations

import abc


class Tier(abc.ABC):
    """The interface :class:`~nbdswap.store.Store` uses for every tier."""

    #: Name used in configuration, status output and the block-map metadata.
    name: str
    #: The ``TIER_*`` id recorded in block-map entries.
    tier_id: int
    #: Id of the storage this tier opened, recorded in the block-map metadata; a
    #: mismatch at the next start means the tier's data is gone.
    arena_id: str | None = None
    #: True when the tier's storage was created anew at open, so every map entry that
    #: points into this tier has lost its data.
    fresh: bool = False

    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes of payload slots this tier may allocate."""

    @property
    @abc.abstractmethod
    def blocks(self) -> int:
        """Payloads currently stored."""

    @property
    @abc.abstractmethod
    def stored_bytes(self) -> int:
        """Sum of the stored payloads' lengths."""

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int:
        """Bytes of the slots holding payloads, including rounding waste."""

    @abc.abstractmethod
    def has_room(self, nbytes: int) -> bool:
        """Whether :meth:`put` of ``nbytes`` would find space right now."""

    @abc.abstractmethod
    async def put(self, data: bytes) -> int:
        """Allocate a slot, write ``data`` into it and return its address.

        Raises :class:`~nbdswap.errors.NoSpaceError` when the tier is full.
        """

    @abc.abstractmethod
    async def get(self, addr: int, length: int) -> bytes:
        """The ``length`` bytes stored at ``addr``."""

    def get_now(self, addr: int, length: int) -> bytes | None:
        """The payload if it can be had without waiting, else ``None`` (use :meth:`get`)."""
        return None

    def put_now(self, data: bytes) -> int | None:
        """:meth:`put` if it needs no waiting, else ``None`` and nothing stored (use :meth:`put`).

        Like :meth:`put` it raises :class:`~nbdswap.errors.NoSpaceError` when the tier is
        full: the store's fast path asks no :meth:`has_room` first.
        """
        return None

    @abc.abstractmethod
    def free(self, addr: int, length: int) -> None:
        """Release the slot of a payload of ``length`` bytes at ``addr``."""

    @abc.abstractmethod
    def mark_used(self, addr: int, length: int) -> None:
        """Record that a payload of ``length`` bytes lives at ``addr`` (start-up rebuild).

        Raises :class:`ValueError` when that contradicts what is already recorded.
        """

    def finish_marking(self) -> None:
        """Called once after the last :meth:`mark_used` of a start-up."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Make every completed :meth:`put` as durable as this tier can."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the tier's resources; stored data stays where it is."""

    def stats(self) -> dict[str, int]:
        return {
            "blocks": self.blocks,
            "stored_bytes": self.stored_bytes,
            "used_bytes": self.used_bytes,
            "capacity_bytes": self.capacity_bytes,
        }
