"""Encoding written pages on worker processes: the server's other cores.

The server is one event-loop thread, and on real memory zstd is close to half of a
write's CPU (15-17 µs of about 36 µs per page here).  Threads cannot take that work off
the loop (the GIL: tried and dropped, bench/RESULTS.md); processes can.  The loop copies
each page into memory it shares with a worker, the worker runs :func:`codec.encode` and
writes the result next to the page, answering every :data:`ANSWER_PAGES` pages so that
the loop places those while it goes on, and the loop places the encoded pages in the
order the writes arrived, so two in-flight writes of one block land as they were sent.

Offloading costs the loop about 3 µs a page (the copy, the bookkeeping, the wake-ups)
and the client some latency, so it is only done while it pays: :class:`EncoderPool`
keeps an estimate of what encoding a page takes and offloads while that is above a
threshold (10 µs by default; fio's 75 %-compressible buffers take 5 µs, real memory
15-17 µs).  A loop turn with fewer than :data:`MIN_OFFLOAD` pages, a full ring and a
worker that died all mean inline encoding; nothing waits for a worker that is gone.

The worker (``python -m nbdswap.encoder MEMFD SOCKET SLOTS``) stays resident like the
server (locked memory, I/O flusher, no OOM kill): it is on the swap-out path.  It
ignores SIGINT and SIGTERM, which a terminal or systemd sends the whole group: it
exits when the server closes its socket, after the server's last write is encoded.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from time import perf_counter_ns
from typing import Callable

from .codec import PAGE_SIZE, Encoded, PageKind, encode

log = logging.getLogger(__name__)

#: Pages of a loop turn below which they are encoded inline (one page at queue depth 1
#: would wait for two wake-ups to save nothing).
MIN_OFFLOAD = 4
#: Default of ``--encoder-offload-above``: offload while a page takes longer than this to
#: encode; back inline below :data:`INLINE_BELOW_SHARE` of it.
OFFLOAD_ABOVE_US = 10.0
INLINE_BELOW_SHARE = 0.7
#: Pages over which the estimate of a page's encoding time averages, and the most one
#: page may add to it (a batch whose encoding was preempted must not flip the choice).
_ESTIMATE_PAGES = 256
_SAMPLE_LIMIT_NS = 40_000
#: One write in this many encoded by the server is timed (see :meth:`EncoderPool.observe`).
_SAMPLE_EVERY = 64
#: The worker answers after this many pages (measured: 4 and 2 alike, 8 and 1 slower).
ANSWER_PAGES = 4
#: Pages a worker holds at once (its shared memory: SLOTS x 8 KiB).
SLOTS = 256
#: What the worker writes for each page: kind, payload length, checksum, nanoseconds the
#: encoding took (the pool's estimate), same-filled word.
_RESULT = struct.Struct("<BxxxIIIQ")
_SLOT_SIZE = _RESULT.size + 2 * PAGE_SIZE  # the result, the page, the compressed payload
_PAGE_AT = _RESULT.size
_PAYLOAD_AT = _RESULT.size + PAGE_SIZE
#: A request to a worker, and each answer: the first slot and how many follow (modulo SLOTS).
_RANGE = struct.Struct("<II")
_KINDS = tuple(PageKind)
#: As globals: looking a member up on the Enum class costs ~80 ns each time.
_COMPRESSED, _RAW = PageKind.COMPRESSED, PageKind.RAW
_new_tuple = tuple.__new__
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Done = Callable[[list[Encoded]], None]


def default_workers() -> int:
    """One worker per core beyond the loop's own, at most four."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class _Job:
    """The pages of one write, and their encodings as they arrive."""

    __slots__ = ("pages", "done", "results", "missing")

    def __init__(self, pages: list[bytes], done: Done) -> None:
        self.pages = pages
        self.done = done
        self.results: list[Encoded | None] = [None] * len(pages)
        self.missing = len(pages)

    def set(self, index: int, encoded: Encoded) -> None:
        self.results[index] = encoded
        self.missing -= 1


class _Worker:
    """One worker process, its shared ring of :data:`SLOTS` slots and its socket."""

    def __init__(self, number: int) -> None:
        self.number = number
        memfd = os.memfd_create(f"nbdswap-encoder-{number}", os.MFD_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.ftruncate(memfd, SLOTS * _SLOT_SIZE)
            self.memory = mmap.mmap(memfd, SLOTS * _SLOT_SIZE)
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nbdswap.encoder", str(memfd), str(theirs.fileno()), str(SLOTS)],
                pass_fds=(memfd, theirs.fileno()))
        except BaseException:
            ours.close()
            raise
        finally:
            os.close(memfd)
            theirs.close()
        ours.setblocking(False)
        self.socket = ours
        self.next_slot = 0
        self.partial = b""  # the start of an answer the socket cut
        self.owners: deque[tuple[_Job, int]] = deque()  # of the slots in flight, oldest first
        self.alive = True

    @property
    def free(self) -> int:
        return SLOTS - len(self.owners) if self.alive else 0

    def send(self, jobs: list[_Job]) -> None:
        """Copy the pages of ``jobs`` into the ring and ask the worker to encode them."""
        first = slot = self.next_slot
        memory, owners = self.memory, self.owners
        for job in jobs:
            for index, page in enumerate(job.pages):
                start = slot * _SLOT_SIZE + _PAGE_AT
                memory[start : start + PAGE_SIZE] = page
                owners.append((job, index))
                slot = (slot + 1) % SLOTS
        self.next_slot = slot
        self.socket.send(_RANGE.pack(first, (slot - first) % SLOTS or SLOTS))

    def receive(self) -> int | None:
        """Take the results of every range the worker answered so far (one ``recv``:
        the reader callback comes again for later ones); the nanoseconds they took to
        encode, or ``None`` once the worker is gone (its pages stay in :attr:`owners`)."""
        try:
            answers = self.socket.recv(_RANGE.size * SLOTS)
        except BlockingIOError:
            return 0
        except OSError:
            return None
        if not answers:
            return None
        answers = self.partial + answers
        usable = len(answers) - len(answers) % _RANGE.size
        self.partial = answers[usable:]
        took = 0
        for first, count in _RANGE.iter_unpack(answers[:usable]):
            for slot in range(first, first + count):
                job, index = self.owners.popleft()
                encoded, nanoseconds = self._result(slot % SLOTS, job.pages[index])
                job.set(index, encoded)
                took += nanoseconds
        return took

    def _result(self, slot: int, page: bytes) -> tuple[Encoded, int]:
        memory = self.memory
        at = slot * _SLOT_SIZE
        kind, length, checksum, nanoseconds, word = _RESULT.unpack_from(memory, at)
        kind = _KINDS[kind]
        if kind is _COMPRESSED:
            payload = memory[at + _PAYLOAD_AT : at + _PAYLOAD_AT + length]
        elif kind is _RAW:
            payload = page
        else:
            payload = b""
        return _new_tuple(Encoded, (kind, payload, word, checksum)), nanoseconds

    def cpu_seconds(self) -> float:
        """CPU time the worker process used so far (0 once it is gone)."""
        try:
            with open(f"/proc/{self.process.pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def stop(self) -> None:
        """Close the socket (the worker exits on it) and wait for the process."""
        self.alive = False
        self.socket.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.memory.close()


class EncoderPool:
    """Encodes written pages inline, or on ``workers`` processes while that pays.

    The server encodes a write's pages itself and tells :meth:`observe`, which learns
    what a page costs.  While :attr:`offloading`, :meth:`encode` queues them instead;
    ``done`` gets their :class:`Encoded` forms later, always from the loop, in the order
    of the queue.
    """

    def __init__(self, workers: int, offload_above_us: float = OFFLOAD_ABOVE_US) -> None:
        self._loop = asyncio.get_running_loop()
        self._offload_above_ns = offload_above_us * 1000
        self._workers: list[_Worker] = []
        try:
            for number in range(workers):
                self._workers.append(_Worker(number))
        except BaseException:
            for worker in self._workers:
                worker.stop()
            raise
        for worker in self._workers:
            self._loop.add_reader(worker.socket.fileno(), self._received, worker)
        self._jobs: deque[_Job] = deque()  # every queued job, oldest first
        self._turn: list[_Job] = []  # queued during this loop turn, not yet sent
        self._turn_pages = 0
        self._next_worker = 0
        self._estimate_ns = 0.0  # of encoding one page, here or on a worker
        self._until_sample = 1
        #: Whether writes should go through :meth:`encode`: pages are dear to encode and
        #: a worker runs, or queued jobs must keep their place ahead of later writes.
        self.offloading = False
        self.pages_offloaded = self.pages_inline = self.worker_failures = 0
        self._cpu_of_stopped = 0.0  # seconds of the workers already stopped

    @property
    def workers(self) -> int:
        """Workers still running."""
        return sum(worker.alive for worker in self._workers)

    def stats(self) -> dict:
        """For ``status`` and the metrics (read from the scrape thread too)."""
        cpu = self._cpu_of_stopped + sum(worker.cpu_seconds() for worker in self._workers if worker.alive)
        return {"workers": self.workers, "offloading": self.offloading,
                "page_encode_us": round(self._estimate_ns / 1000, 2),
                "pages_offloaded": self.pages_offloaded, "pages_inline": self.pages_inline,
                "worker_failures": self.worker_failures, "cpu_seconds": round(cpu, 2)}

    def _stop(self, worker: _Worker) -> None:
        self._cpu_of_stopped += worker.cpu_seconds()
        worker.stop()

    def observe(self, data: bytes) -> None:
        """Count a write the server encodes itself, and time the encoding of its first
        page again one write in :data:`_SAMPLE_EVERY` for the choice of :attr:`offloading`
        (this costs a cheap write 0.4 %; timing each write's own encoding cost it 5 %)."""
        self.pages_inline += len(data) // PAGE_SIZE
        self._until_sample -= 1
        if not self._until_sample:
            self._until_sample = _SAMPLE_EVERY
            started = perf_counter_ns()
            encode(data[:PAGE_SIZE])
            self._learn(perf_counter_ns() - started, 1, _SAMPLE_EVERY)

    def encode(self, pages: list[bytes], done: Done) -> None:
        """Queue a write's pages; they go to a worker at the end of this loop turn."""
        job = _Job(pages, done)
        self._jobs.append(job)
        if not self._turn:
            self._loop.call_soon(self._dispatch)
        self._turn.append(job)
        self._turn_pages += len(pages)

    def _learn(self, nanoseconds: int, pages: int, stands_for: int = 1) -> None:
        """Fold ``pages`` encoded in ``nanoseconds`` (a sample of ``stands_for`` times as
        many) into the estimate; start offloading when it rises above the threshold
        (:meth:`_deliver` stops it)."""
        sample = min(nanoseconds / pages, _SAMPLE_LIMIT_NS)
        self._estimate_ns += min(1.0, pages * stands_for / _ESTIMATE_PAGES) * (sample - self._estimate_ns)
        if self._estimate_ns > self._offload_above_ns and not self.offloading and self.workers:
            self.offloading = True
            log.info("pages take %.1f µs to encode: encoding them on %d worker processes",
                     self._estimate_ns / 1000, self.workers)

    def _dispatch(self) -> None:
        """Send this turn's pages to a worker, or encode them here (see the module)."""
        jobs, pages = self._turn, self._turn_pages
        self._turn, self._turn_pages = [], 0
        worker = self._worker_for(pages) if pages >= MIN_OFFLOAD else None
        if worker is None:
            for job in jobs:
                self._encode_inline(job)
            self._deliver()
            return
        try:
            worker.send(jobs)
        except OSError:
            self._lost(worker)  # its pages, these included, are encoded here
            return
        self.pages_offloaded += pages

    def _worker_for(self, pages: int) -> _Worker | None:
        """The next worker in turn with room for ``pages``."""
        count = len(self._workers)
        for step in range(count):
            worker = self._workers[(self._next_worker + step) % count]
            if worker.free >= pages:
                self._next_worker = (self._next_worker + step + 1) % count
                return worker
        return None

    def _encode_inline(self, job: _Job) -> None:
        for index, page in enumerate(job.pages):
            if job.results[index] is None:
                job.set(index, encode(page))
        self.pages_inline += len(job.pages)

    def _received(self, worker: _Worker) -> None:
        before = len(worker.owners)
        took = worker.receive()
        if took is None:
            self._lost(worker)
            return
        if before > len(worker.owners):
            self._learn(took, before - len(worker.owners))
        self._deliver()

    def _lost(self, worker: _Worker) -> None:
        """A worker died or its socket failed: its pages are encoded here instead."""
        if not worker.alive:
            return
        self.worker_failures += 1
        self._loop.remove_reader(worker.socket.fileno())
        pending = {id(job): job for job, _ in worker.owners}
        worker.owners.clear()
        self._stop(worker)
        log.error("encoder worker %d (pid %d) is gone (exit status %s): %d workers left",
                  worker.number, worker.process.pid, worker.process.returncode, self.workers)
        for job in pending.values():
            self._encode_inline(job)
        self._deliver()

    def _deliver(self) -> None:
        """Hand finished jobs to their callbacks, oldest first, up to the first one still
        being encoded; once none is queued, go back inline if offloading stopped paying."""
        jobs = self._jobs
        while jobs and not jobs[0].missing:
            job = jobs.popleft()
            job.done(job.results)
        if (not jobs and self.offloading
                and (self._estimate_ns < INLINE_BELOW_SHARE * self._offload_above_ns or not self.workers)):
            self.offloading = False
            log.info("pages take %.1f µs to encode: encoding them in the server",
                     self._estimate_ns / 1000)

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` seconds) for the pages the workers hold, then stop them."""
        deadline = self._loop.time() + timeout
        while any(worker.owners for worker in self._workers if worker.alive) and self._loop.time() < deadline:
            await asyncio.sleep(0.001)
        for worker in self._workers:
            if worker.alive:
                self._loop.remove_reader(worker.socket.fileno())
                await asyncio.to_thread(self._stop, worker)


def _serve_encodings(memory: mmap.mmap, channel: socket.socket, slots: int) -> None:
    """The worker's loop: encode each range of slots the server sends, answering every
    :data:`ANSWER_PAGES` pages and at the end of the range."""
    view = memoryview(memory)
    pack_into = _RESULT.pack_into
    while True:
        request = channel.recv(_RANGE.size)
        if len(request) != _RANGE.size:
            return  # the server closed the socket, or died
        first, count = _RANGE.unpack(request)
        answered = first
        for slot in range(first, first + count):
            at = (slot % slots) * _SLOT_SIZE
            started = perf_counter_ns()
            encoded = encode(bytes(view[at + _PAGE_AT : at + _PAGE_AT + PAGE_SIZE]))
            took = min(perf_counter_ns() - started, 0xFFFF_FFFF)
            length = 0
            if encoded.kind is _COMPRESSED:
                length = len(encoded.payload)
                memory[at + _PAYLOAD_AT : at + _PAYLOAD_AT + length] = encoded.payload
            pack_into(memory, at, encoded.kind, length, encoded.checksum, took, encoded.word)
            if slot + 1 - answered == ANSWER_PAGES or slot + 1 == first + count:
                channel.sendall(_RANGE.pack(answered % slots, slot + 1 - answered))
                answered = slot + 1


def main(argv: list[str]) -> int:
    from .resident import stay_resident

    memfd, channel_fd, slots = (int(arg) for arg in argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s nbdswap encoder: %(message)s")
    stay_resident(on_fault=False)
    memory = mmap.mmap(memfd, slots * _SLOT_SIZE)
    os.close(memfd)
    with socket.socket(fileno=channel_fd) as channel:
        try:
            _serve_encodings(memory, channel, slots)
        except ConnectionError:
            pass  # the server died
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
