"""Crash safety: SIGKILL at random moments of pipelined writes never loses an acknowledged write."""

import random
import signal
import subprocess
import time

from nbdutil import SYSTEM_PATH, nbdsh

TRIALS = 20
BLOCKS = 2048
QUEUE_DEPTH = 64

#: Each block holds (block, generation) spread over compressible and random bytes,
#: so both the RAM arena and (with a small --ram-max) the disk tier are exercised.
PAGE_SCRIPT = """
import hashlib, random
def page(block, generation):
    seed = hashlib.sha256(b"%d/%d" % (block, generation)).digest()
    if block % 3 == 0:
        return random.Random(seed).randbytes(4096)
    return (seed * 128)[:2048] + bytes(2048)
"""

#: Writes generation g+1 of blocks round robin, never two writes to one block at
#: once, and prints "block generation" for each acknowledged write until killed.
WRITER_SCRIPT = PAGE_SCRIPT + f"""
import sys
generation = {{}}
def done(block, gen, error):
    if error.value == 0:
        sys.stdout.write("%d %d\\n" % (block, gen))
        sys.stdout.flush()
    return 0
block = 0
while True:
    while h.aio_in_flight() < {QUEUE_DEPTH}:
        gen = generation.get(block, 0) + 1
        generation[block] = gen
        h.aio_pwrite(page(block, gen), block * 4096,
                     completion=lambda error, b=block, g=gen: done(b, g, error))
        block = (block + 1) % {BLOCKS}
    h.poll(-1)
"""


def acknowledged_generations(output: bytes) -> dict[int, int]:
    latest: dict[int, int] = {}
    for line in output.decode().splitlines():
        parts = line.split()
        if len(parts) == 2:
            block, generation = map(int, parts)
            latest[block] = max(latest.get(block, 0), generation)
    return latest


def test_sigkill_during_pipelined_writes_loses_no_acknowledged_write(server_factory):
    server = server_factory("crash", size="64M", ram_max="2M", disk_max="64M")
    rng = random.Random(2026)
    for trial in range(TRIALS):
        writer = subprocess.Popen(["nbdsh", "-u", server.uri, "-c", WRITER_SCRIPT],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env={"PATH": SYSTEM_PATH})
        time.sleep(rng.uniform(0.3, 1.5))
        server.stop(signal.SIGKILL)
        output, _ = writer.communicate(timeout=60)
        acknowledged = acknowledged_generations(output)
        assert acknowledged, f"trial {trial}: the writer got no acknowledgement"
        server.start()
        # Every acknowledged write reads back; a write in flight at the kill may have
        # landed too (the next generation), nothing else is allowed.
        nbdsh(server.uri, PAGE_SCRIPT + f"""
acked = {acknowledged!r}
for block, gen in acked.items():
    data = h.pread(4096, block * 4096)
    assert data in (page(block, gen), page(block, gen + 1)), (block, gen)
""")
        nbdsh(server.uri, f"h.trim({BLOCKS * 4096}, 0)")  # the next trial starts from zeros
