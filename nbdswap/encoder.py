"""Encoding written pages on worker processes: the server's other cores.

The server is one event-loop thread, and on real memory zstd is a large part of a
write's CPU (in one process, 5.0-7.8 µs a page at :data:`codec.WRITE_LEVEL` against
8.4-10.9 at level 1, which the server used before; profiled in the server at level 1,
15-17 µs of about 36 µs). Threads cannot take that work off the loop (the GIL: tried and
dropped, bench/RESULTS.md); processes can. The loop copies each page into memory it
shares with a worker, the worker runs :func:`codec.encode` and writes the result next to
the page, answering every :data:`ANSWER_PAGES` pages so that the loop places those while
it goes on, and the loop places the encoded pages in the order the writes arrived, so
two in-flight writes of one block land as they were sent.

Offloading costs the loop CPU too: 3 µs a page in a bare prototype (the copy, the
bookkeeping, the wake-ups), about 12 µs in the server (smaller commit batches, more loop
turns; bench/RESULTS.md), and the client some latency, so it is only done while it pays:
:class:`EncoderPool` keeps an estimate of what encoding a page takes and offloads while
that is above a threshold (12 µs by default; at level 1 fio's 75 %-compressible buffers
took 6.5 µs on average in the loop, with a tenth of them above 11.5 µs, and real memory
15-18 µs; at level -1 fio's stay below it and about half of one real-memory corpus
went above it, and offloading all real memory no longer paid on this 2-core machine,
bench/RESULTS.md). A loop turn with fewer than :data:`MIN_OFFLOAD`
pages and a full ring mean inline encoding; a worker that dies, or holds pages without
answering for :data:`HUNG_AFTER_S`, is given up and the server encodes its pages itself,
and a new one takes its place after :data:`RESTART_AFTER_S`. A worker gets pages only
once it said it is ready (:data:`_READY`), with a checksum of its code that must be the
server's.

The worker (a Python process running :func:`main` with the ring's memfd, its socket and
the ring's size) stays resident like the server (locked memory, I/O flusher, no OOM
kill): it is on the swap-out path. It ignores SIGINT and SIGTERM, which a terminal or
systemd sends the whole group: it exits when the server closes its socket, after the
server's last write is encoded.
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
import zlib
from collections import deque
from pathlib import Path
from time import perf_counter_ns
from typing import Callable

from . import __version__, codec
from .codec import PAGE_SIZE, Encoded, PageKind, encode, split_pages

log = logging.getLogger(__name__)

#: Pages of a loop turn below which they are encoded inline (one page at queue depth 1
#: would wait for two wake-ups to save nothing).
MIN_OFFLOAD = 4
#: Default of ``--encoder-offload-above``: offload while a page takes longer than this to
#: encode; back inline below :data:`INLINE_BELOW_SHARE` of it.
OFFLOAD_ABOVE_US = 12.0
INLINE_BELOW_SHARE = 2 / 3
#: Pages over which the estimate of a page's encoding time averages, and the most one
#: page may add to it: a sampled write that was preempted, or a few cold ones, must not
#: flip the choice (with 256 pages, fio's 5.7 µs pages went back and forth across 10 µs).
_ESTIMATE_PAGES = 4096
_SAMPLE_LIMIT_NS = 40_000
#: One write in this many encoded by the server is timed (see :meth:`EncoderPool.observe`).
_SAMPLE_EVERY = 64
#: A worker holding pages that has not answered for this long is given up (killed; the
#: server encodes its pages): it encodes 256 pages in about 5 ms.
HUNG_AFTER_S = 2.0
#: A worker that has not said it is ready this long after its start is given up.
READY_WITHIN_S = 60.0
#: A given-up worker is replaced after this long; after twice as long each time the
#: worker in its place fails within :data:`RESTART_AFTER_MAX_S` of its start, and so on up
#: to that.  Each place backs off on its own.
RESTART_AFTER_S = 5.0
RESTART_AFTER_MAX_S = 300.0
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
#: A worker's first message is ``_RANGE.pack(_READY, its _CODE_ID)``: no page goes to it
#: before that (its start-up must not count against :data:`HUNG_AFTER_S`).
_READY = 0xFFFF_FFFF
_KINDS = tuple(PageKind)
#: As globals: looking a member up on the Enum class costs ~80 ns each time.
_COMPRESSED, _RAW = PageKind.COMPRESSED, PageKind.RAW
_new_tuple = tuple.__new__
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Gets a write's encoded pages, or the exception that encoding them raised.
Done = Callable[[list[Encoded] | Exception], None]
#: The directory the nbdswap package is in, appended to the worker's import path: with
#: ``-P`` the working directory (which may be anyone's) is not on it, and a server run
#: from a checkout still finds its own package.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def _code_id() -> int:
    """A checksum of the code the server and its workers must share (this module's ring
    layout, the codec).  A worker started after nbdswap was upgraded on disk runs the
    new files; the server must not read its ring with the old layout.  Read through the
    modules' loaders (a zip install has no files); without them, of the version."""
    try:
        return zlib.crc32(__loader__.get_data(__file__) + codec.__loader__.get_data(codec.__file__))
    except (OSError, AttributeError, TypeError) as error:
        logging.getLogger(__name__).warning(
            "cannot read the encoder's code (%s): workers are checked by version only", error)
        return zlib.crc32(__version__.encode())


_CODE_ID = _code_id()
_BOOTSTRAP = ("import sys; sys.path.append(sys.argv.pop(1)); "
              "from nbdswap.encoder import main; sys.exit(main(sys.argv[1:]))")


def default_workers() -> int:
    """One worker per core beyond the loop's own, at most four."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class _Job:
    """The pages of one write, and their encodings as they arrive."""

    __slots__ = ("pages", "done", "results", "missing", "error")

    def __init__(self, pages: list[bytes], done: Done) -> None:
        self.pages = pages
        self.done = done
        self.results: list[Encoded | None] = [None] * len(pages)
        self.missing = len(pages)
        self.error: Exception | None = None

    def set(self, index: int, encoded: Encoded) -> None:
        self.results[index] = encoded
        self.missing -= 1


class _Worker:
    """One worker process, its shared ring of :data:`SLOTS` slots and its socket."""

    def __init__(self, number: int) -> None:
        self.number = number
        memfd = os.memfd_create(f"nbdswap-encoder-{number}", os.MFD_CLOEXEC)
        ours = theirs = memory = None
        try:
            os.ftruncate(memfd, SLOTS * _SLOT_SIZE)
            memory = mmap.mmap(memfd, SLOTS * _SLOT_SIZE)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-c", _BOOTSTRAP, _PACKAGE_PARENT, str(memfd), str(theirs.fileno()),
                 str(SLOTS)], pass_fds=(memfd, theirs.fileno()))
        except BaseException:
            for resource in (ours, memory):
                if resource is not None:
                    resource.close()
            raise
        finally:
            os.close(memfd)
            if theirs is not None:
                theirs.close()
        ours.setblocking(False)
        self.memory, self.socket = memory, ours
        self.next_slot = 0
        self.partial = b""  # the start of an answer the socket cut
        self.owners: deque[tuple[_Job, int]] = deque()  # of the slots in flight, oldest first
        self.last_progress = 0.0  # loop time of its last answer, or of work for an idle worker
        self.started = 0.0  # loop time
        self.ready = False  # it sent its ready message with the server's code (see _READY)
        self.alive = True

    @property
    def free(self) -> int:
        return SLOTS - len(self.owners) if self.ready and self.alive else 0

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
        self.socket.sendall(_RANGE.pack(first, (slot - first) % SLOTS or SLOTS))

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
            if first == _READY:
                if count != _CODE_ID:
                    raise ValueError("it runs other code than the server (nbdswap upgraded on disk, "
                                     "or another nbdswap first on its path?)")
                self.ready = True
                continue
            if not self.ready or count > len(self.owners):
                raise ValueError(f"it answered for slots {first}+{count} it was not sent: other code?")
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

    def detach(self) -> None:
        """Stop using the worker: it exits on the closed socket (see :meth:`wait`)."""
        self.alive = False
        self.socket.close()
        self.memory.close()

    def wait(self) -> None:
        """Reap the detached worker, killing it after 5 s (blocks: not on the loop)."""
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class EncoderPool:
    """Encodes written pages inline, or on ``workers`` processes while that pays.

    The server encodes a write's pages itself and tells :meth:`observe`, which learns
    what a page costs.  While :attr:`offloading`, :meth:`encode` queues them instead;
    ``done`` gets their :class:`Encoded` forms later, always from the loop, in the order
    of the queue.  Requests that must not overtake the queued writes (a TRIM of a block
    being written, a FUA write) wait for :meth:`queued`.
    """

    def __init__(self, workers: int, offload_above_us: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._offload_above_ns = offload_above_us * 1000
        self._workers: list[_Worker] = []
        self._watchdog: asyncio.TimerHandle | None = None
        for number in range(workers):
            worker = self._start(number)
            if worker is not None:
                self._workers.append(worker)
        self._restart_after = [RESTART_AFTER_S] * len(self._workers)  # by index in _workers
        self._restarts: dict[int, asyncio.TimerHandle] = {}  # by index in _workers
        self._closing = False
        self._jobs: deque[_Job] = deque()  # every queued job, oldest first
        self._turn: list[_Job] = []  # queued during this loop turn, not yet sent
        self._turn_pages = 0
        self._next_worker = 0
        self._estimate_ns = 0.0  # of encoding one page, here or on a worker
        self._until_sample = 1
        self._paused = 0  # holds of the deliveries (see pause())
        #: Whether writes should go through :meth:`encode`: pages are dear to encode and
        #: a worker runs, or queued jobs must keep their place ahead of later writes.
        self.offloading = False
        self.pages_offloaded = self.pages_inline = self.worker_failures = 0
        self._cpu_of_stopped = 0.0  # seconds of the workers already stopped

    @property
    def workers(self) -> int:
        """Workers still running."""
        return sum(worker.alive for worker in self._workers)

    @property
    def ready_workers(self) -> int:
        """Workers running that said they are ready for pages (see :data:`_READY`)."""
        return sum(worker.alive and worker.ready for worker in self._workers)

    @property
    def busy(self) -> bool:
        """Whether writes are queued or held back (see :meth:`queued`, :meth:`pause`)."""
        return bool(self._jobs) or bool(self._paused)

    def stats(self) -> dict:
        """For ``status`` and the metrics (read from the scrape thread too)."""
        cpu = self._cpu_of_stopped + sum(worker.cpu_seconds() for worker in self._workers if worker.alive)
        return {"workers": self.ready_workers, "offloading": self.offloading,
                "page_encode_us": round(self._estimate_ns / 1000, 2),
                "pages_offloaded": self.pages_offloaded, "pages_inline": self.pages_inline,
                "worker_failures": self.worker_failures, "cpu_seconds": round(cpu, 2)}

    def observe(self, data: bytes) -> list[Encoded] | None:
        """Count a write (whole pages) the server encodes itself; one write in
        :data:`_SAMPLE_EVERY`, encode its pages here, timed for the choice of
        :attr:`offloading`, and return them (otherwise ``None``: the store encodes them,
        untimed; timing every write cost fio's writes 5 %)."""
        self.pages_inline += len(data) // PAGE_SIZE
        self._until_sample -= 1
        if self._until_sample:
            return None
        self._until_sample = _SAMPLE_EVERY
        pages = split_pages(data)
        started = perf_counter_ns()
        encoded = [encode(page) for page in pages]
        self._learn(perf_counter_ns() - started, len(pages), _SAMPLE_EVERY)
        return encoded

    def encode(self, pages: list[bytes], done: Done) -> None:
        """Queue a write's pages; they go to a worker at the end of this loop turn."""
        job = _Job(pages, done)
        self._jobs.append(job)
        if not self._turn:
            self._loop.call_soon(self._dispatch)
        self._turn.append(job)
        self._turn_pages += len(pages)

    def queued(self) -> asyncio.Future:
        """A future done once every write queued so far was handed to its callback.  The
        deliveries are then paused: the caller calls :meth:`resume` when its request is
        done, so that no later write overtakes it either."""
        future = self._loop.create_future()

        def reached(_: object) -> None:
            if not future.done():  # not cancelled
                future.set_result(None)
                self.pause()

        self._jobs.append(_Job([], reached))
        self._deliver()
        return future

    def pause(self) -> None:
        """Hand no result over until :meth:`resume`: a write sent to a slower path, or a
        request that waited for :meth:`queued`, keeps its place ahead of later writes."""
        self._paused += 1

    def resume(self) -> None:
        self._paused -= 1
        self._deliver()

    def _learn(self, nanoseconds: int, pages: int, stands_for: int = 1) -> None:
        """Fold ``pages`` encoded in ``nanoseconds`` (a sample of ``stands_for`` times as
        many) into the estimate; start offloading when it rises above the threshold
        (:meth:`_deliver` stops it)."""
        sample = min(nanoseconds / pages, _SAMPLE_LIMIT_NS)
        self._estimate_ns += min(1.0, pages * stands_for / _ESTIMATE_PAGES) * (sample - self._estimate_ns)
        if self._estimate_ns > self._offload_above_ns and not self.offloading and self.ready_workers:
            self.offloading = True
            log.info("pages take %.1f µs to encode: encoding them on %d worker processes",
                     self._estimate_ns / 1000, self.ready_workers)

    def _start(self, number: int) -> _Worker | None:
        try:
            worker = _Worker(number)
        except (OSError, subprocess.SubprocessError) as error:
            log.error("cannot start encoder worker %d: %s", number, error)
            return None
        worker.started = self._loop.time()
        self._loop.add_reader(worker.socket.fileno(), self._received, worker)
        self._arm_watchdog()
        return worker

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(HUNG_AFTER_S, self._check_workers)

    def _restart_later(self, index: int) -> None:
        if not self._closing:
            delay = self._restart_after[index]
            self._restarts[index] = self._loop.call_later(delay, self._restart, index)
            self._restart_after[index] = min(2 * delay, RESTART_AFTER_MAX_S)

    def _restart(self, index: int) -> None:
        """Replace the given-up worker at ``index`` (see :data:`RESTART_AFTER_S`)."""
        del self._restarts[index]
        worker = self._start(self._workers[index].number)
        if worker is None:
            self._restart_later(index)
            return
        self._workers[index] = worker
        log.warning("encoder worker %d restarted (pid %d); %d workers running",
                    worker.number, worker.process.pid, self.workers)

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
        if not worker.owners:
            worker.last_progress = self._loop.time()
        self.pages_offloaded += pages
        try:
            worker.send(jobs)
        except OSError as error:
            self._give_up(worker, f"cannot be sent pages: {error}")  # these included
            return
        self._arm_watchdog()

    def _worker_for(self, pages: int) -> _Worker | None:
        """The next worker in turn with room for ``pages``."""
        count = len(self._workers)
        for step in range(count):
            worker = self._workers[(self._next_worker + step) % count]
            if worker.free >= pages:
                self._next_worker = (self._next_worker + step + 1) % count
                return worker
        return None

    def _encode_inline(self, job: _Job) -> int:
        """Encode the pages of ``job`` that have no result yet; how many it encoded.  An
        exception becomes the job's result: it fails that write alone."""
        encoded = 0
        for index, page in enumerate(job.pages):
            if job.results[index] is None and job.error is None:
                try:
                    job.set(index, encode(page))
                except Exception as error:  # noqa: BLE001 - the write gets an error reply
                    job.error, job.missing = error, 0
                encoded += 1
        self.pages_inline += encoded
        return encoded

    def _received(self, worker: _Worker) -> None:
        before = len(worker.owners)
        try:
            took = worker.receive()
        except ValueError as error:
            self._give_up(worker, f"broke the protocol: {error}", replace=False)
            return
        if took is None:
            self._give_up(worker, "is gone")
            return
        if before > len(worker.owners):
            worker.last_progress = self._loop.time()
            self._learn(took, before - len(worker.owners))
        self._deliver()

    def _check_workers(self) -> None:
        """Give up a worker that holds pages without answering (stopped, or stuck), or
        that did not get ready (:data:`READY_WITHIN_S`)."""
        self._watchdog = None
        now = self._loop.time()
        for worker in self._workers:
            if worker.alive and worker.owners and now - worker.last_progress > HUNG_AFTER_S:
                self._give_up(worker, f"has not answered for {now - worker.last_progress:.1f} s")
            elif worker.alive and not worker.ready and now - worker.started > READY_WITHIN_S:
                self._give_up(worker, f"did not get ready in {READY_WITHIN_S:g} s")
        if any(worker.alive and (worker.owners or not worker.ready) for worker in self._workers):
            self._watchdog = self._loop.call_later(HUNG_AFTER_S / 2, self._check_workers)

    def _give_up(self, worker: _Worker, reason: str, replace: bool = True) -> None:
        """Kill ``worker``, which failed for ``reason``, and encode the pages it held here;
        ``replace`` it later (see :data:`RESTART_AFTER_S`).  It is reaped off the loop: a
        worker stuck in reclaim may take time to die."""
        if not worker.alive:
            return
        self._loop.remove_reader(worker.socket.fileno())
        pending = {id(job): job for job, _ in worker.owners}
        worker.owners.clear()
        self._cpu_of_stopped += worker.cpu_seconds()
        worker.detach()
        worker.process.kill()
        self._loop.run_in_executor(None, worker.wait)
        self.worker_failures += 1
        index = self._workers.index(worker)
        if self._loop.time() - worker.started >= RESTART_AFTER_MAX_S:
            self._restart_after[index] = RESTART_AFTER_S  # it ran long: not a row of failures
        if not replace:
            then = "not replaced until the server restarts"
        elif self._closing:
            then = "not replaced: the encoder is closing"
        else:
            then = f"replaced in {self._restart_after[index]:g} s"
            self._restart_later(index)
        log.error("encoder worker %d (pid %d) %s: killed, the server encodes its pages; %s; %d workers left",
                  worker.number, worker.process.pid, reason, then, self.workers)
        for job in pending.values():
            self.pages_offloaded -= self._encode_inline(job)
        self._deliver()

    def _deliver(self) -> None:
        """Hand finished jobs to their callbacks, oldest first, up to the first one still
        being encoded; once none is queued, go back inline if offloading stopped paying."""
        jobs = self._jobs
        while jobs and not jobs[0].missing and not self._paused:
            job = jobs.popleft()
            try:
                job.done(job.error or job.results)
            except Exception:  # noqa: BLE001 - one write's failure must not stall the rest
                log.exception("handing an encoded write over failed")
        if (not jobs and self.offloading and not self._paused
                and (self._estimate_ns < INLINE_BELOW_SHARE * self._offload_above_ns or not self.ready_workers)):
            self.offloading = False
            log.info("pages take %.1f µs to encode: encoding them in the server",
                     self._estimate_ns / 1000)

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` seconds) for the pages the workers hold, then stop
        them; pages still held then are encoded here."""
        self._closing = True
        for restart in self._restarts.values():
            restart.cancel()
        self._restarts.clear()
        deadline = self._loop.time() + timeout
        while any(worker.owners for worker in self._workers if worker.alive) and self._loop.time() < deadline:
            await asyncio.sleep(0.001)
        if self._watchdog is not None:
            self._watchdog.cancel()
        for worker in self._workers:
            if worker.alive and worker.owners:
                self._give_up(worker, f"still holds pages after {timeout:g} s")
            elif worker.alive:
                self._loop.remove_reader(worker.socket.fileno())
                self._cpu_of_stopped += worker.cpu_seconds()
                worker.detach()
                if not worker.ready:  # still starting: it would finish that first
                    worker.process.kill()
                await asyncio.to_thread(worker.wait)


def _serve_encodings(memory: mmap.mmap, channel: socket.socket, slots: int) -> None:
    """The worker's loop: encode each range of slots the server sends, answering every
    :data:`ANSWER_PAGES` pages and at the end of the range."""
    view = memoryview(memory)
    pack_into = _RESULT.pack_into
    while True:
        request = channel.recv(_RANGE.size, socket.MSG_WAITALL)
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
            channel.sendall(_RANGE.pack(_READY, _CODE_ID))
            _serve_encodings(memory, channel, slots)
        except ConnectionError:
            pass  # the server died
    return 0

