#!/usr/bin/env python3
"""Writes of real memory pages: nbdswap with and without its encoder workers, against
nbdkit, side by side in one run.

fio's buffers take 4-5 µs each to compress, real memory 13-17 µs (bench/corpus.py
corpora): how fast a server takes swapped-out pages depends on which it gets.  This
writes the pages of a corpus file (``bench/corpus.py capture``) through one NBD
connection, 32 requests in flight, 4 KiB each, to random blocks of the first
``--span`` bytes, for ``--seconds``, with libnbd's Python binding (Debian's
python3-libnbd, run by the system Python).  Servers, each started fresh in every
round, in an order that alternates:

* ``nbdswap``        -- ``nbdswap serve`` as configured by default (encoder workers),
* ``nbdswap-inline`` -- the same with ``--encoder-workers 0``,
* ``nbdkit-zstd``, ``nbdkit-malloc`` -- ``nbdkit memory`` with and without ``allocator=zstd``.

It prints pages per second and server CPU µs per page (the encoder workers' included)
with the median of the rounds, and the ratios.  Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fio_compare import Server, machine, nbdswap_cmd, remove_arena, run_env  # noqa: E402

SERVERS = ("nbdswap", "nbdswap-inline", "nbdkit-zstd", "nbdkit-malloc")

#: Run by the system Python (python3-libnbd): argv corpus, socket, span, seconds.
CLIENT = """
import random, sys, time
import nbd
corpus, sock, span, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with open(corpus, "rb") as f:
    data = f.read(4096 * 65536)
buffers = [nbd.Buffer.from_bytearray(bytearray(data[i:i + 4096])) for i in range(0, len(data) - 4095, 4096)]
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///?socket={sock}")
blocks, rng, sent = span // 4096, random.Random(1), 0
start = time.monotonic()
end = start + seconds
while time.monotonic() < end:
    while h.aio_in_flight() < 32:
        h.aio_pwrite(buffers[sent % len(buffers)], rng.randrange(blocks) * 4096)
        sent += 1
    h.poll(-1)
while h.aio_in_flight():
    h.poll(-1)
print(sent, time.monotonic() - start)
"""


def make_server(name: str, workdir: Path, size: str, ram_max: str) -> Server:
    sock = workdir / f"{name}.sock"
    if name.startswith("nbdkit"):
        extra = ["allocator=zstd"] if name == "nbdkit-zstd" else []
        return Server(name, ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                             "memory", size, *extra], sock, workdir / f"{name}.log")
    state = workdir / f"{name}-state"
    workers = ["--encoder-workers", "0"] if name == "nbdswap-inline" else []
    return Server(name, [*nbdswap_cmd(), "serve", "--listen", f"unix://{sock}", "--size", size,
                         "--state-dir", str(state), "--ram-max", ram_max, "--disk-max", "256M",
                         "--log-level", "warning", *workers],
                  sock, workdir / f"{name}.log", state_dir=state)


def measure(server: Server, corpus: Path, span: int, seconds: float) -> tuple[float, float]:
    """Pages per second and server CPU µs per page of one fresh server."""
    server.sock.unlink(missing_ok=True)  # the last round's (nbdkit leaves it)
    server.start()
    try:
        before = server.cpu_seconds()
        out = subprocess.run(["python3", "-c", CLIENT, str(corpus), str(server.sock), str(span), str(seconds)],
                             capture_output=True, text=True, timeout=seconds * 3 + 60, env=run_env())
        cpu = server.cpu_seconds() - before
    finally:
        server.stop()
        remove_arena(server.state_dir)
        if server.state_dir is not None:
            shutil.rmtree(server.state_dir, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"the client against {server.name} failed:\n{out.stderr}")
    pages, elapsed = out.stdout.split()
    return int(pages) / float(elapsed), cpu * 1e6 / int(pages)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path, help="a page corpus (bench/corpus.py capture); its first 256 MiB are used")
    p.add_argument("--seconds", type=float, default=8, help="per server and round (default 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--span", default=256 << 20, type=int, help="bytes of the device written (default 256 MiB)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    args = p.parse_args(argv)
    names = [name for name in args.servers.split(",") if name]
    if shutil.which("nbdkit", path=run_env()["PATH"]) is None:
        print("nbdkit is not installed (make deps)", file=sys.stderr)
        return 2
    print(f"# {machine()}\n# corpus {args.corpus}, {args.seconds:g} s per server, {args.rounds} rounds", flush=True)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    workdir = Path(tempfile.mkdtemp(prefix="nbdswap-corpus-writes-"))
    try:
        for round_number in range(args.rounds):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                rate, cpu = measure(make_server(name, workdir, "1G", "1G"), args.corpus, args.span, args.seconds)
                results[name].append((rate, cpu))
                print(f"round {round_number + 1} {name:<15} {rate:9.0f} pages/s  {cpu:6.1f} µs CPU/page", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
               for name, runs in results.items()}
    print(f"\n{'server':<15} {'pages/s':>9} {'CPU µs/page':>12}   (medians)")
    for name, (rate, cpu) in medians.items():
        print(f"{name:<15} {rate:9.0f} {cpu:12.1f}")
    if "nbdswap" in medians:
        for name in names:
            if name != "nbdswap":
                print(f"nbdswap / {name:<15} pages/s {medians['nbdswap'][0] / medians[name][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
