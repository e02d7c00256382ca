"""A real Linux kernel swapping to an NBD server: the VM end-to-end runner.

QEMU (TCG) boots Debian's cloud kernel with the initramfs of deploy/vm/build.sh;
its /init connects /dev/nbd0 to the server, swaps on it with discard and runs a
memory hog that verifies every byte (see deploy/vm/init and deploy/vm/hog.c).
The server and QEMU run in a private network namespace; inside the guest, QEMU
user networking maps the namespace's 127.0.0.1 to 10.0.2.2.

Used by tests/test_vm_swap.py; a benchmark can compare servers with
`run_swap_vm(nbdkit_argv(), ...)` against `run_swap_vm(nbdswap_argv(...), ...)`.
Everything here needs root (network namespaces).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VM_DIR = Path(os.environ.get("NBDSWAP_VM_DIR", REPO / "build" / "vm"))
PORT = 10809
EXPORT = "swap"
NETNS_PREFIX = "nbdswap-e2e-"

# Guest console lines that mean the swap device failed or the guest kernel broke.
ERROR_RE = re.compile(
    r"I/O error|Read-error on swap-device|Write-error on swap-device"
    r"|Other side returned error|Receive control failed|Oops|Kernel panic"
    r"|BUG:|Call Trace|Out of memory|blocked for more than|VM-E2E: FAIL"
)


# ----------------------------------------------------------------------------
# Server command lines


def nbdswap_cmd() -> list[str]:
    """The `nbdswap` command of the running interpreter's environment."""
    script = Path(sys.executable).with_name("nbdswap")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nbdswap.cli"]


def nbdswap_argv(
    state_dir: Path | str,
    *,
    port: int = PORT,
    export: str = EXPORT,
    size: str = "1G",
    ram_max: str = "24M",
    disk_max: str = "2G",
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        *nbdswap_cmd(), "serve",
        "--listen", f"tcp://127.0.0.1:{port}",
        "--export", export, "--size", size, "--state-dir", str(state_dir),
        "--ram-max", ram_max, "--disk-max", disk_max, *extra,
    ]


def nbdkit_argv(
    *,
    port: int = PORT,
    export: str = EXPORT,
    size: str = "1G",
    stats_file: Path | str | None = None,
    plugin_args: Sequence[str] = (),
) -> list[str]:
    """nbdkit's memory plugin (supports TRIM), the reference server.

    With stats_file, the stats filter writes per-command counts there at exit
    (read them with nbdkit_stats()). plugin_args e.g. ["allocator=zstd"].
    """
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1",
            "-p", str(port), "-e", export]
    if stats_file is not None:
        argv.append("--filter=stats")
    argv += ["memory", size, *plugin_args]
    if stats_file is not None:
        argv.append(f"statsfile={stats_file}")
    return argv


def nbdkit_stats(path: Path | str) -> dict[str, int]:
    """Request counts from nbdkit's stats file, e.g. {"read": 49038, "trim": 130}."""
    text = Path(path).read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+): (\d+) ops", text, re.M)}


def nbdswap_status(state_dir: Path | str, timeout: float = 30) -> dict[str, Any]:
    """`nbdswap status --json` of the server running on state_dir."""
    out = subprocess.run(
        [*nbdswap_cmd(), "status", "--state-dir", str(state_dir), "--json"],
        capture_output=True, text=True, timeout=timeout, check=True,
    )
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------
# Images, namespace, server


def ensure_images(vm_dir: Path = VM_DIR, variant: str = "") -> tuple[Path, Path]:
    """Build (or find up to date) the guest kernel and initramfs; variant "attach"
    is the image whose guest runs `nbdswap attach` (e2e.client=attach), "local"
    the one whose guest also runs `nbdswap serve` (e2e.client=local)."""
    env = dict(os.environ)
    if sys.prefix != sys.base_prefix:  # the local image takes its dependencies from this venv
        env["NBDSWAP_VENV"] = sys.prefix
    subprocess.run([str(REPO / "deploy" / "vm" / "build.sh"), str(vm_dir)], check=True, env=env)
    name = f"initramfs-{variant}.cpio.gz" if variant else "initramfs.cpio.gz"
    if not (vm_dir / name).exists():
        raise FileNotFoundError(f"deploy/vm/build.sh did not build {vm_dir / name} (see its output)")
    return vm_dir / "vmlinuz", vm_dir / name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class NetNS:
    """A network namespace with only `lo` up; deleted on close()."""

    def __init__(self, name: str | None = None):
        self.name = name or f"{NETNS_PREFIX}{os.getpid()}"

    def __enter__(self) -> NetNS:
        self._remove_stale()
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)

    def _remove_stale(self) -> None:
        """Delete namespaces left by killed runs (named after a pid now dead)."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for name in re.findall(rf"^({re.escape(NETNS_PREFIX)}(\d+))", listing, re.M):
            if name[0] == self.name or not _pid_alive(int(name[1])):
                subprocess.run(["ip", "netns", "del", name[0]], stderr=subprocess.DEVNULL)


def _port_open(ns: NetNS, port: int) -> bool:
    probe = "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()"
    return subprocess.run(ns.argv([sys.executable, "-c", probe, str(port)]),
                          stderr=subprocess.DEVNULL).returncode == 0


class Server:
    """An NBD server process inside a namespace, output to log_path."""

    def __init__(self, ns: NetNS, argv: Sequence[str], log_path: Path):
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ns.argv(self.argv), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.returncode: int | None = None
        self._stopped = False

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, ns: NetNS, port: int = PORT, timeout: float = 60) -> None:
        """Until the port accepts connections; raises if the server exits first."""
        deadline = time.monotonic() + timeout
        while not _port_open(ns, port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not listening on port {port} after {timeout}s:\n{self.log}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as its clients and its state dir can tell."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.returncode = self.proc.returncode
        self._stopped = True

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; SIGKILL its process group if it does not exit.
        Returns the exit code, None if it had to be killed. Idempotent."""
        if self._stopped:
            return self.returncode
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        self.returncode = self.proc.returncode
        return self.returncode


# ----------------------------------------------------------------------------
# The VM


@dataclass
class VmResult:
    console: str
    wall_s: float
    returncode: int | None  # QEMU's; None when it was killed at the timeout
    console_path: Path
    server_log: str = ""
    server_returncode: int | None = None
    extra: Any = None  # what run_swap_vm's after_vm returned
    notes: list[str] = field(default_factory=list)

    def _int(self, pattern: str) -> int | None:
        m = re.findall(pattern, self.console, re.M)
        return int(m[-1]) if m else None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.console.splitlines() if ERROR_RE.search(line)]

    @property
    def hog_passed(self) -> bool:
        return re.search(r"^HOG PASS ", self.console, re.M) is not None

    @property
    def hog_exit(self) -> int | None:
        return self._int(r"^VM-E2E: hog exit=(\d+)")

    @property
    def pswpout(self) -> int | None:
        """Pages the guest swapped out (after the hog)."""
        return self._int(r"^VM-E2E: ---- after hog: pswpin \d+ pswpout (\d+)")

    @property
    def pswpin(self) -> int | None:
        return self._int(r"^VM-E2E: ---- after hog: pswpin (\d+)")

    @property
    def guest_discards(self) -> int | None:
        """Discard requests the guest's block layer completed on nbd0."""
        return self._int(r"^VM-E2E: nbd0 discards: ios=(\d+)")

    def failures(self) -> list[str]:
        """Every reason this run does not show a correct swap device."""
        out = list(self.notes)
        if self.returncode is None:
            out.append("VM timed out (killed)")
        elif self.returncode != 0:
            out.append(f"QEMU exited with {self.returncode}")
        out += [f"guest console: {line.strip()}" for line in self.error_lines]
        if re.search(r"^HOG FAIL", self.console, re.M):
            out.append("hog found corrupted memory: HOG FAIL")
        elif not self.hog_passed:
            out.append(f"no HOG PASS (hog exit={self.hog_exit})")
        if not self.pswpout:
            out.append(f"the guest did not swap out (pswpout={self.pswpout})")
        if not re.search(r"^VM-E2E: done status=0", self.console, re.M):
            out.append("guest did not finish cleanly (no 'VM-E2E: done status=0')")
        return out

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def boot_vm(
    ns: NetNS | None,
    console_path: Path,
    *,
    kernel: Path,
    initrd: Path,
    mem_mib: int = 160,
    hog_mib: int = 256,
    port: int = PORT,
    export: str = EXPORT,
    timeout: float = 900,
    extra_append: str = "",
    network: bool = True,
    disks: Sequence[Path] = (),
) -> VmResult:
    """Boot the guest in ns (its server must be listening) and wait until it powers off.

    ns None: in this namespace (a guest without network). disks: raw image files,
    the guest's /dev/vda, /dev/vdb, ... (virtio)."""
    append = f"console=ttyS0 panic=-1 e2e.port={port} e2e.export={export} e2e.hog={hog_mib}"
    if extra_append:
        append += f" {extra_append}"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64",  # no KVM on these machines
        "-m", str(mem_mib), "-smp", "1", "-nographic", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
    ]
    if network:
        # romfile= skips the iPXE option ROM: nothing boots from the network.
        argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="]
    else:
        argv += ["-nic", "none"]
    for disk in disks:
        argv += ["-drive", f"file={disk},if=virtio,format=raw"]
    t0 = time.monotonic()
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(argv if ns is None else ns.argv(argv), stdin=subprocess.DEVNULL,
                                stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        returncode: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.monotonic() - t0
    text = console_path.read_bytes().decode(errors="replace").replace("\r", "")
    return VmResult(console=text, wall_s=wall, returncode=returncode, console_path=console_path)


def run_swap_vm(
    server_argv: Sequence[str],
    workdir: Path,
    *,
    port: int = PORT,
    after_vm: Callable[[NetNS], Any] | None = None,
    vm_dir: Path = VM_DIR,
    **vm_kwargs: Any,
) -> VmResult:
    """All in one: namespace, server, guest; after_vm(ns) runs while the server
    still runs (e.g. to query its status); its result lands in result.extra.
    Logs go to workdir/console.log and workdir/server.log."""
    kernel, initrd = ensure_images(vm_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    with NetNS() as ns:
        server = Server(ns, server_argv, workdir / "server.log")
        try:
            server.wait_ready(ns, port)
            result = boot_vm(ns, workdir / "console.log", kernel=kernel, initrd=initrd,
                             port=port, **vm_kwargs)
            if after_vm is not None:
                result.extra = after_vm(ns)
        finally:
            server.stop()
        result.server_log = server.log
        result.server_returncode = server.returncode
    return result
