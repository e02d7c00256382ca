import pytest

from nbdutil import ServerProcess


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
