import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nbdutil import ServerProcess, remove_ram_arena

EXTENSIONS = """
[server]
subjectAltName = DNS:localhost, IP:127.0.0.1
extendedKeyUsage = serverAuth
[client]
extendedKeyUsage = clientAuth
"""


def pytest_configure(config):
    """Refuse to test a C extension built from another version of its source (``make
    test`` rebuilds it when the source changes)."""
    import hashlib

    import nbdswap.tiers._slab as extension

    source = Path(extension.__file__).with_name("_slab.c")
    if source.exists() and hashlib.sha256(source.read_bytes()).hexdigest() != extension.SOURCE_SHA256:
        raise pytest.UsageError(f"{extension.__file__} was built from another {source.name}: run make test-venv")


@pytest.fixture
def state_dir(tmp_path):
    """A state directory not yet created; its RAM arena is removed afterwards."""
    path = tmp_path / "state"
    yield path
    remove_ram_arena(path)


@pytest.fixture
def server_factory(tmp_path):
    """Start nbdswap servers in their own directories; all are stopped afterwards."""
    servers: list[ServerProcess] = []

    def start(name: str = "srv", **options) -> ServerProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        server = ServerProcess(workdir, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.cleanup()


@pytest.fixture
def server(server_factory):
    return server_factory()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB filesystem to fill up (mounted for the test; needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        remove_ram_arena(mount / "state")
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _new_key_and_request(name: str, cwd: Path) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN=nbdswap-test-{name}", cwd=cwd)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate, plus
    the directories libnbd and QEMU read: ``client/`` (ca-cert.pem, client-cert.pem,
    client-key.pem) and ``anonymous/`` (ca-cert.pem only)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    root = tmp_path_factory.mktemp("pki")
    (root / "ext.cnf").write_text(EXTENSIONS)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=nbdswap-test-ca",
             cwd=root)
    for name in ("server", "client"):
        _new_key_and_request(name, root)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", "ext.cnf",
                 "-extensions", name, cwd=root)
    for directory, files in (("client", ("ca-cert.pem", "client-cert.pem", "client-key.pem")),
                             ("anonymous", ("ca-cert.pem",))):
        (root / directory).mkdir()
        for name in files:
            shutil.copy(root / name, root / directory / name)
    return root
