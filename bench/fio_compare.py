#!/usr/bin/env python3
"""nbdswap against nbdkit's memory plugin, side by side in one run (issue 7).

Starts three servers on Unix sockets in a temporary directory:

* ``nbdswap``       -- ``nbdswap serve`` with a RAM tier that holds the working set,
* ``nbdkit-malloc`` -- ``nbdkit memory 1G``,
* ``nbdkit-zstd``   -- ``nbdkit memory 1G allocator=zstd`` (the same job as our RAM tier, in C),

prefills each (compressible data unless ``--prefill random``), then runs ``fio --ioengine=nbd`` 4 KiB jobs
(randwrite/randread x QD1/QD32 x one/two connections), alternating between the servers
for every job so that background load hits all of them alike.  The QD32 jobs then run
once more, each right after a fresh prefill of random data: the condition of the
issue's nbdkit zstd reference (``--random-prefill-iodepth`` chooses which, or none).
For each run it records IOPS, p50/p99 completion latency and the server's CPU time per operation (utime+stime
of /proc/PID/stat, its encoder workers' included, before and after the fio run), then prints the table and the ratios
nbdswap/nbdkit-zstd and nbdswap/nbdkit-malloc.  Numbers are only comparable inside one
run.  With ``--vm`` (root, QEMU, the VM image of ``make vm-image``) it also boots the
swap VM of tests/vmutil.py against nbdkit memory and nbdswap and prints the wall-time ratio.

Every process it starts is stopped on exit; nbdswap's /dev/shm arena is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: fio's compressible buffers, refilled for every I/O (as in the issue).
DATA_OPTS = ["--buffer_compress_percentage=75", "--buffer_compress_chunk=4096", "--refill_buffers"]
#: The Debian tools are run with the system directories first on PATH.
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
SERVERS = ("nbdswap", "nbdkit-zstd", "nbdkit-malloc")


# --------------------------------------------------------------------------- servers


def nbdswap_cmd() -> list[str]:
    """The `nbdswap` entry point next to the running interpreter (the venv's)."""
    script = Path(sys.executable).with_name("nbdswap")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nbdswap.cli"]


@dataclass
class Server:
    name: str
    argv: list[str]
    sock: Path
    log_path: Path
    state_dir: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self, timeout: float = 60) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')}")
            if self.sock.exists():
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(str(self.sock))
                        return
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not listen on {self.sock}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """CPU time of the server process (all its threads) and of its children
        (nbdswap's encoder workers), live or reaped."""
        assert self.proc is not None
        pid = self.proc.pid
        return process_cpu_seconds(pid, with_reaped_children=True) + sum(
            process_cpu_seconds(child) for child in child_pids(pid))

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def process_cpu_seconds(pid: int, with_reaped_children: bool = False) -> float:
    """utime + stime of ``pid`` (and cutime + cstime); 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    ticks = sum(int(value) for value in fields[11:15 if with_reaped_children else 13])
    return ticks / CLK_TCK


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def make_servers(workdir: Path, size: str, ram_max: str, nbdswap_extra: list[str]) -> dict[str, Server]:
    def nbdkit(name: str, *plugin_args: str) -> Server:
        sock = workdir / f"{name}.sock"
        return Server(name, ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                             "memory", size, *plugin_args], sock, workdir / f"{name}.log")

    state = workdir / "nbdswap-state"
    sock = workdir / "nbdswap.sock"
    swap = Server("nbdswap", [*nbdswap_cmd(), "serve", "--listen", f"unix://{sock}", "--size", size,
                              "--state-dir", str(state), "--ram-max", ram_max, "--disk-max", "256M",
                              *nbdswap_extra],
                  sock, workdir / "nbdswap.log", state_dir=state)
    return {"nbdswap": swap, "nbdkit-zstd": nbdkit("nbdkit-zstd", "allocator=zstd"),
            "nbdkit-malloc": nbdkit("nbdkit-malloc")}


def remove_arena(state_dir: Path | None) -> None:
    if state_dir is None:
        return
    try:
        from nbdswap.tiers.ram import arena_path
    except ImportError:  # not run from the venv: nothing of ours to clean
        return
    arena_path(state_dir).unlink(missing_ok=True)


# --------------------------------------------------------------------------- fio


@dataclass(frozen=True)
class Job:
    rw: str  # randwrite | randread
    iodepth: int
    conns: int
    #: ``random``: the job runs right after its own prefill of random data, so every
    #: server starts it from the same state (a write job makes the span compressible).
    prefill: str = "compressible"

    @property
    def label(self) -> str:
        label = f"{self.rw} QD{self.iodepth} x{self.conns}"
        return label if self.prefill == "compressible" else f"{label}, {self.prefill} prefill"


@dataclass
class Result:
    iops: float
    p50_us: float
    p99_us: float
    cpu_us_per_op: float
    ops: int


@dataclass
class Table:
    results: dict[tuple[Job, str], list[Result]] = field(default_factory=dict)

    def add(self, job: Job, server: str, result: Result) -> None:
        self.results.setdefault((job, server), []).append(result)

    def median(self, job: Job, server: str) -> Result | None:
        rs = self.results.get((job, server))
        if not rs:
            return None
        return Result(*(statistics.median(getattr(r, f) for r in rs)
                        for f in ("iops", "p50_us", "p99_us", "cpu_us_per_op", "ops")))


def run_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{SYSTEM_PATH}:{os.environ.get('PATH', '')}"}


def fio(server: Server, extra: list[str], timeout: float) -> dict:
    argv = ["fio", "--ioengine=nbd", f"--uri={server.uri}", "--output-format=json", *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=run_env())
    if out.returncode != 0:
        raise RuntimeError(f"fio against {server.name} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    text = out.stdout
    return json.loads(text[text.index("{"):])  # fio may print notes before the JSON


def prefill(server: Server, span: str, data: str, timeout: float) -> None:
    """Write the working set once: with the jobs' compressible buffers, or with fio's
    default (random, incompressible) buffers.  nbdkit's zstd allocator recompresses the
    whole 32 KiB page around every 4 KiB write, so its write rate depends on what the
    page held before (about 5x slower over random data); nbdswap's does not."""
    fio(server, ["--name=prefill", "--rw=write", "--bs=64k", "--iodepth=8", f"--size={span}",
                 *(DATA_OPTS if data == "compressible" else [])], timeout)


def run_job(server: Server, job: Job, span: str, runtime: float) -> Result:
    args = [f"--name={job.rw}", f"--rw={job.rw}", "--bs=4k", f"--iodepth={job.iodepth}",
            f"--numjobs={job.conns}", "--group_reporting", f"--size={span}", "--time_based",
            f"--runtime={runtime:g}", "--ramp_time=0", "--norandommap", "--randrepeat=0", *DATA_OPTS]
    before = server.cpu_seconds()
    data = fio(server, args, timeout=runtime * 3 + 120)
    cpu = server.cpu_seconds() - before
    side = data["jobs"][0]["write" if job.rw == "randwrite" else "read"]
    percentiles = side.get("clat_ns", {}).get("percentile", {})
    ops = side["total_ios"]
    return Result(iops=side["iops"], p50_us=percentiles.get("50.000000", 0) / 1000,
                  p99_us=percentiles.get("99.000000", 0) / 1000,
                  cpu_us_per_op=cpu * 1e6 / ops if ops else float("nan"), ops=ops)


# --------------------------------------------------------------------------- output


def fmt_table(table: Table, jobs: list[Job]) -> str:
    width = max(20, *(len(job.label) for job in jobs))
    lines = [f"{'job':<{width}} {'server':<14} {'IOPS':>9} {'p50 us':>8} {'p99 us':>8} {'CPU us/op':>10}"]
    for job in jobs:
        for name in SERVERS:
            r = table.median(job, name)
            if r is not None:
                lines.append(f"{job.label:<{width}} {name:<14} {r.iops:>9.0f} {r.p50_us:>8.1f} "
                             f"{r.p99_us:>8.1f} {r.cpu_us_per_op:>10.1f}")
        lines.append("")
    lines.append("ratios nbdswap / reference (IOPS: higher is better; CPU/op: lower is better)")
    lines.append(f"{'job':<{width}} {'IOPS/zstd':>10} {'IOPS/malloc':>12} {'CPU/zstd':>9} {'CPU/malloc':>11}")
    for job in jobs:
        s, z, m = (table.median(job, n) for n in SERVERS)
        if s is None:
            continue

        def ratio(a: float, b: float | None) -> str:
            return f"{a / b:.2f}" if b else "-"

        lines.append(f"{job.label:<{width}} {ratio(s.iops, z and z.iops):>10} {ratio(s.iops, m and m.iops):>12} "
                     f"{ratio(s.cpu_us_per_op, z and z.cpu_us_per_op):>9} "
                     f"{ratio(s.cpu_us_per_op, m and m.cpu_us_per_op):>11}")
    return "\n".join(lines)


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (f"nproc={os.cpu_count()} cpu={model!r} kernel={os.uname().release} "
            f"python={sys.version.split()[0]} loadavg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f}")


# --------------------------------------------------------------------------- VM


def run_vm(workdir: Path, ram_max: str, vm_dir: Path | None, rounds: int = 1) -> None:
    """The VM swap test of tests/vmutil.py against nbdkit memory and nbdswap (a fresh
    state dir each time), ``rounds`` times with the order alternating; with several
    rounds the median ratio decides (one TCG guest's swap traffic varies by about 10 %
    from run to run).  A round in which either guest found a problem does not count."""
    sys.path.insert(0, str(REPO / "tests"))
    import vmutil  # noqa: E402  (tests/vmutil.py)

    ratios = []
    for round_number in range(rounds):
        state_dir = workdir / f"vm-nbdswap-state-{round_number}"
        argvs = {"nbdkit-memory": vmutil.nbdkit_argv(),
                 "nbdswap": vmutil.nbdswap_argv(state_dir, ram_max=ram_max)}
        walls: dict[str, float] = {}
        for name in sorted(argvs, reverse=bool(round_number % 2)):
            try:
                result = vmutil.run_swap_vm(argvs[name], workdir / f"vm-{name}-{round_number}",
                                            vm_dir=vm_dir or vmutil.VM_DIR)
            finally:
                remove_arena(state_dir)
            problems = result.failures()
            if not problems:
                walls[name] = result.wall_s
            print(f"VM swap {name:<14} wall {result.wall_s:7.1f} s  pswpout={result.pswpout} "
                  f"pswpin={result.pswpin}" + (f"  PROBLEMS: {problems}" if problems else ""), flush=True)
        if len(walls) == 2:
            ratios.append(walls["nbdswap"] / walls["nbdkit-memory"])
    if not ratios:
        print("VM swap wall ratio nbdswap/nbdkit-memory: no round without problems")
        return
    each = f" (rounds: {', '.join(f'{ratio:.2f}' for ratio in ratios)})" if rounds > 1 else ""
    print(f"VM swap wall ratio nbdswap/nbdkit-memory: {statistics.median(ratios):.2f}{each} (target <= 1.15)")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio job (default 10)")
    p.add_argument("--quick", action="store_true", help="3 s per fio job")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every job (and the VM pair) this many times, alternating servers; "
                   "the table and the VM ratio show medians")
    p.add_argument("--size", default="1G", help="device size of every server (default 1G)")
    p.add_argument("--span", default="256M", help="working set: the region prefilled and accessed (default 256M)")
    p.add_argument("--prefill", choices=("compressible", "random"), default="compressible",
                   help="data of the prefill: the jobs' compressible buffers (default; like swapped memory) "
                   "or fio's random buffers (then before every job)")
    p.add_argument("--ram-max", default="1G", help="nbdswap --ram-max (must hold the working set)")
    p.add_argument("--nbdswap-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for nbdswap serve (repeatable), e.g. --nbdswap-arg=--log-level=warning")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--rw", default="randwrite,randread")
    p.add_argument("--iodepth", default="1,32")
    p.add_argument("--conns", default="1,2", help="connections (fio numjobs)")
    p.add_argument("--random-prefill-iodepth", default="32", metavar="QD[,QD...]",
                   help="repeat the jobs of these queue depths, each after a fresh prefill of random data "
                   "(the issue's reference condition for nbdkit zstd; default 32, '' for none; "
                   "skipped with --prefill random)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every result here")
    p.add_argument("--vm", action="store_true",
                   help="also run the VM swap test against nbdkit memory and nbdswap (root, QEMU)")
    p.add_argument("--vm-ram-max", default="1G", help="nbdswap --ram-max for the VM run (default 1G)")
    p.add_argument("--vm-dir", type=Path, help="kernel/initramfs directory (default $NBDSWAP_VM_DIR or build/vm; "
                   "deploy/vm/build.sh is run on it and is not safe to run twice at once on one directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.runtime = 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool, path=run_env()["PATH"]) is None:
            print(f"{tool} is not installed (make deps)", file=sys.stderr)
            return 2
    names = [n for n in args.servers.split(",") if n]
    jobs = make_jobs(args)
    workdir = Path(tempfile.mkdtemp(prefix="nbdswap-bench-"))
    servers = make_servers(workdir, args.size, args.ram_max, args.nbdswap_arg)
    table = Table()
    try:
        return _main(args, names, jobs, workdir, servers, table)
    finally:
        if args.keep:
            print(f"# logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def make_jobs(args: argparse.Namespace) -> list[Job]:
    """The job matrix after the common prefill, then the random-prefill repeats."""
    matrix = [(rw, int(qd), int(c)) for rw in args.rw.split(",") for qd in args.iodepth.split(",")
              for c in args.conns.split(",")]
    jobs = [Job(rw, qd, c, args.prefill) for rw, qd, c in matrix]
    if args.prefill == "compressible":
        repeated = {int(qd) for qd in args.random_prefill_iodepth.split(",") if qd}
        jobs += [Job(rw, qd, c, "random") for rw, qd, c in matrix if qd in repeated]
    return jobs


def _main(args, names, jobs, workdir, servers, table) -> int:
    print(f"# {machine()}", flush=True)
    print(f"# runtime {args.runtime:g} s per job, span {args.span}, {args.prefill} prefill, "
          f"rounds {args.rounds}; "
          f"work dir {workdir}", flush=True)
    try:
        for name in names:
            servers[name].start()
        step = 0
        for _ in range(args.rounds):
            # Every round starts from the compressible prefill (the last round's
            # random-prefill jobs left random data behind).
            for name in names if any(job.prefill == "compressible" for job in jobs) else ():
                t0 = time.monotonic()
                prefill(servers[name], args.span, "compressible", timeout=600)
                print(f"# prefilled {name} in {time.monotonic() - t0:.1f} s", flush=True)
            for job in jobs:
                # Rotate the order so no server always runs first (or right after another).
                order = names[step % len(names):] + names[:step % len(names)]
                step += 1
                for name in order:
                    if job.prefill == "random":
                        prefill(servers[name], args.span, "random", timeout=600)
                    r = run_job(servers[name], job, args.span, args.runtime)
                    table.add(job, name, r)
                    print(f"{job.label:<36} {name:<14} {r.iops:>9.0f} IOPS  p50 {r.p50_us:7.1f} us  "
                          f"p99 {r.p99_us:8.1f} us  CPU {r.cpu_us_per_op:6.1f} us/op", flush=True)
        for name in names:
            log = servers[name].log_path.read_text(errors="replace")
            if servers[name].proc is not None and servers[name].proc.poll() is not None:
                print(f"# WARNING: {name} exited during the run:\n{log}", file=sys.stderr)
        print()
        print(fmt_table(table, jobs), flush=True)
        if args.json:
            args.json.write_text(json.dumps({
                "machine": machine(), "runtime": args.runtime, "span": args.span,
                "results": [{"job": j.label, "server": s, **vars(r)}
                            for (j, s), rs in table.results.items() for r in rs]}, indent=1))
    finally:
        for server in servers.values():
            server.stop()
        remove_arena(servers["nbdswap"].state_dir)
    if args.vm:
        print(flush=True)
        run_vm(workdir, args.vm_ram_max, args.vm_dir, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
