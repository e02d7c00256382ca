"""Staying usable on the swap path: locked memory, I/O-flusher threads, no OOM kill.

A process that serves (or connects) the very device the kernel swaps to must not
be paged out, must not wait for memory reclaim that needs its own I/O (the kernel
skips such reclaim for threads marked PR_SET_IO_FLUSHER) and must not be chosen by
the OOM killer.  Each step degrades to a logged warning where the process lacks
the privilege (CAP_IPC_LOCK, CAP_SYS_RESOURCE).  Standard library only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource

log = logging.getLogger(__name__)

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_IO_FLUSHER = 57

_libc = ctypes.CDLL(None, use_errno=True)
_io_flusher_warned = False


def lock_memory(on_fault: bool) -> bool:
    """mlockall(CURRENT|FUTURE), with ONFAULT when mappings are large and sparse
    (the server's LMDB map and RAM arena: lock what is touched, not what is mapped).

    Skipped with a warning when locked memory is limited: with MCL_FUTURE, every
    later mmap beyond the limit would fail.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
        log.warning("not locking memory: RLIMIT_MEMLOCK is %d bytes (LimitMEMLOCK=infinity "
                    "in the unit lifts it)", soft)
        return False
    flags = MCL_CURRENT | MCL_FUTURE | (MCL_ONFAULT if on_fault else 0)
    if _libc.mlockall(flags) != 0:
        log.warning("mlockall failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def mark_io_flusher() -> bool:
    """PR_SET_IO_FLUSHER for the calling thread (call it in every thread doing I/O).  A
    failure is logged once per process: every I/O thread would fail the same way."""
    global _io_flusher_warned
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        if not _io_flusher_warned:
            _io_flusher_warned = True
            log.warning("PR_SET_IO_FLUSHER failed: %s (logged once; every I/O thread tries)",
                        os.strerror(ctypes.get_errno()))
        return False
    return True


def protect_from_oom() -> bool:
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("-1000")
    except OSError as error:
        log.warning("cannot set oom_score_adj: %s", error)
        return False
    return True


def stay_resident(on_fault: bool, heap_reserve: int = 0) -> None:
    """All of the above for the calling process and thread.  ``heap_reserve`` bytes
    are allocated and freed once more after locking, so that the (locked) heap keeps
    that much room for later allocations."""
    lock_memory(on_fault)
    if heap_reserve:
        reserve = bytearray(heap_reserve)
        del reserve
    mark_io_flusher()
    protect_from_oom()
