"""Print the files a bare Python needs to run nbdswap in the VM image.

Usage: python-closure.py attach | serve

Run with the guest's interpreter (Debian's python3), ``-S`` and PYTHONPATH set to
the repository (for ``serve``: the repository, then the site-packages directory of
the project's venv, which holds the server's compiled dependencies).  Prints
``sys PATH`` for the interpreter and every standard-library module and extension it
loaded, ``pkg RELATIVE_PATH`` for nbdswap's own files and ``site RELATIVE_PATH``
for files of the last PYTHONPATH entry (serve only).

``attach``: the modules ``nbdswap attach`` imports.  ``serve``: those, plus what a
real ``nbdswap serve`` loads while it serves: the server runs here for a moment on a
Unix socket in a temporary directory and is sent writes (RAM and disk tier), reads,
a trim, a flush and a status query, so that modules imported lazily on the I/O path
are in the list too.
"""

import encodings.idna  # noqa: F401  (getaddrinfo encodes host names with it)
import os
import runpy  # noqa: F401  (python -m runs the CLI through it)
import sys

import nbdswap.attach  # noqa: F401  (the modules attach needs at run time)
import nbdswap.cli


def exercise_server() -> None:
    """Run ``nbdswap serve`` in this process and talk NBD and admin to it."""
    import contextlib
    import shutil
    import signal
    import socket
    import struct
    import tempfile
    import threading
    import time
    from pathlib import Path

    from nbdswap import admin, resident
    from nbdswap.nbdclient import negotiate, open_connection
    from nbdswap.protocol.constants import REQUEST_MAGIC, Command
    from nbdswap.tiers.ram import arena_path

    # A build step needs no locked memory, I/O-flusher threads or OOM protection
    # (the code that does it is loaded anyway).
    nbdswap.cli.stay_resident = lambda **_: None
    resident.mark_io_flusher = lambda: True
    tmp = Path(tempfile.mkdtemp(prefix="nbdswap-closure-"))
    state_dir, address = tmp / "state", f"unix://{tmp}/nbd.sock"
    failure: list[BaseException] = []
    server_ended = threading.Event()

    def request(sock: socket.socket, command: int, offset: int, length: int, data: bytes = b"") -> bytes:
        sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, offset, offset, length) + data)
        reply = b""
        want = 16 + (length if command == Command.READ else 0)
        while len(reply) < want:
            chunk = sock.recv(want - len(reply))
            if not chunk:
                raise ConnectionError("server closed the connection")
            reply += chunk
        if struct.unpack_from(">I", reply, 4)[0]:
            raise OSError(f"NBD command {command} failed")
        return reply[16:]

    def client() -> None:
        try:
            deadline = time.monotonic() + 30
            while not (tmp / "nbd.sock").exists():
                if server_ended.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            with open_connection(address, 10) as sock:
                negotiate(sock, "swap")
                pages = [bytes(4096), b"text " * 819 + b"t", *(os.urandom(4096) for _ in range(400))]
                for index, page in enumerate(pages):  # 1.6 MiB: fills the 1M RAM tier, then disk
                    request(sock, Command.WRITE, index * 4096, 4096, page)
                for index, page in enumerate(pages):
                    if request(sock, Command.READ, index * 4096, 4096) != page:
                        raise AssertionError(f"block {index} read back wrong")
                request(sock, Command.TRIM, 0, 8 * 4096)
                request(sock, Command.FLUSH, 0, 0)
                admin.request(state_dir, "status")
                sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0))
        except BaseException as error:  # reported by the main thread
            failure.append(error)
        finally:
            if not server_ended.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # stdout is the list
            status = nbdswap.cli.main(["serve", "--listen", address, "--size", "16M",
                                       "--state-dir", str(state_dir), "--ram-max", "1M",
                                       "--disk-max", "16M", "--log-level", "warning"])
    finally:
        server_ended.set()
        thread.join()
        arena_path(state_dir).unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if failure or status != 0:
        raise SystemExit(f"python-closure.py: the trial server failed (exit {status}): {failure!r}")


mode = sys.argv[1] if len(sys.argv) > 1 else "attach"
if mode == "serve":
    exercise_server()
elif mode != "attach":
    raise SystemExit(f"python-closure.py: unknown mode {mode!r} (attach or serve)")
nbdswap.cli.build_parser()
repository = os.path.dirname(os.path.dirname(os.path.abspath(nbdswap.__file__)))
site = os.path.abspath(os.environ["PYTHONPATH"].split(os.pathsep)[-1]) if mode == "serve" else None
print("sys", os.path.realpath(sys.executable))
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if not path:
        continue
    path = os.path.abspath(path)
    if path.startswith(os.path.join(repository, "nbdswap") + os.sep):
        print("pkg", os.path.relpath(path, repository))
    elif site and path.startswith(site + os.sep):
        print("site", os.path.relpath(path, site))
    elif path.startswith(repository + os.sep):
        continue  # this script
    else:
        print("sys", path)
