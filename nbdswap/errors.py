"""Exceptions raised by the storage core; device.py maps them to NBD errors."""


class StoreError(Exception):
    """Base class of storage errors; the device reports it as EIO."""


class NoSpaceError(StoreError):
    """Every tier that may take a block is full (NBD ENOSPC)."""


class CorruptBlockError(StoreError):
    """A block's data cannot be trusted: checksum mismatch or lost RAM arena (EIO)."""


class TierUnavailableError(StoreError):
    """A tier cannot be reached right now, e.g. the remote tier is down (EIO)."""


class StateDirError(StoreError):
    """The state directory is foreign, damaged, in use or incompatible with the options."""
