"""A server crash or upgrade is invisible to a guest that swaps through `nbdswap attach`.

The guest (deploy/vm, image "attach") connects /dev/nbd0 with `nbdswap attach`,
swaps on it and runs the memory hog. While the hog runs, the host kills nbdswap
(SIGKILL, or SIGTERM for a graceful upgrade) and starts it again on the same state
dir. The hog must pass and the guest must report no I/O error: its requests wait
for the reconnection (NBD_ATTR_DEAD_CONN_TIMEOUT) and are re-sent on the new socket.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from nbdutil import remove_ram_arena

try:
    import vmutil
except ImportError:  # tests/ became a package
    from tests import vmutil

pytestmark = pytest.mark.vm

#: 32 MiB more than tests/test_vm_swap.py: the attach image carries a Python
#: (about 30 MiB of initramfs that cannot be swapped). The hog still needs swap.
GUEST_MEM_MIB = 192
HOG_MIB = 256
VM_TIMEOUT_S = 15 * 60
#: How long after the hog starts the server dies, and how long it stays down.
CRASH_AFTER_S = 12
DOWN_FOR_S = 3
#: Kernel messages that report the dead link being noticed and repaired, not a
#: failed I/O: expected here.
RECONNECT_NOISE = re.compile(r"Receive control failed|Dead connection|Connection timed out|"
                             r"Send control failed|shutting down sockets")


def _restart_during_hog(console: Path, server: vmutil.Server, start, how: str,
                        events: list[str]) -> None:
    """Wait for the hog to start, stop the server, start a new one (on the same state dir)."""
    deadline = time.monotonic() + VM_TIMEOUT_S
    while time.monotonic() < deadline:
        if console.exists() and b"VM-E2E: hog start" in console.read_bytes():
            break
        time.sleep(0.2)
    else:
        events.append("the hog never started")
        return
    time.sleep(CRASH_AFTER_S)
    if how == "kill":
        server.kill()
    else:
        server.stop()
    events.append(f"server stopped ({how}) at {time.monotonic():.1f}")
    time.sleep(DOWN_FOR_S)
    events.append(start())


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_guest_survives_server_restart_mid_swap(tmp_path: Path, how: str, capsys) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    kernel, initrd = vmutil.ensure_images(variant="attach")
    state_dir = tmp_path / "state"
    argv = vmutil.nbdswap_argv(state_dir, size="1G", ram_max="24M", disk_max="2G")
    servers: list[vmutil.Server] = []
    events: list[str] = []
    with vmutil.NetNS() as ns:
        def start() -> str:
            server = vmutil.Server(ns, argv, tmp_path / f"server{len(servers)}.log")
            servers.append(server)
            server.wait_ready(ns)
            return f"server {len(servers)} listening at {time.monotonic():.1f}"

        try:
            start()
            console = tmp_path / "console.log"
            restarter = threading.Thread(
                target=_restart_during_hog, args=(console, servers[0], start, how, events), daemon=True)
            restarter.start()
            result = vmutil.boot_vm(ns, console, kernel=kernel, initrd=initrd, mem_mib=GUEST_MEM_MIB,
                                    hog_mib=HOG_MIB, timeout=VM_TIMEOUT_S, extra_append="e2e.client=attach")
            restarter.join(timeout=120)
        finally:
            for server in servers:
                server.stop()
        remove_ram_arena(state_dir)

    failures = [f for f in result.failures() if not RECONNECT_NOISE.search(f)]
    if len(servers) != 2:
        failures.append(f"the server was not restarted during the hog: {events}")
    if not re.search(r"nbd0: reconnected|reconnected socket", result.console + servers[-1].log):
        failures.append("the guest never reconnected")
    summary = (f"VM attach [{how}]: wall {result.wall_s:.1f}s, pswpout={result.pswpout} "
               f"pswpin={result.pswpin}; {'; '.join(events)}")
    with capsys.disabled():
        print(f"\n{summary}")
    if failures:
        pytest.fail("\n".join([summary, *failures, "---- guest console tail:", result.tail(80)]),
                    pytrace=False)
