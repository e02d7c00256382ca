"""Where a server listens: ``tcp://HOST:PORT`` or ``unix:///PATH``.

Kept apart from server.py so that configuration parsing (and ``nbdswap attach``,
which runs on a bare Python) does not import the server and its dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ListenAddress:
    """``tcp://HOST:PORT`` or ``unix:///PATH``."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, url: str) -> ListenAddress:
        if url.startswith("unix://"):
            path = url[len("unix://"):]
            if not path:
                raise ValueError(f"{url!r}: a unix address needs a path (unix:///run/x.sock)")
            return cls("unix", path=path)
        if url.startswith("tcp://"):
            rest = url[len("tcp://"):]
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"{url!r}: expected tcp://HOST:PORT")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if not 0 < int(port) < 65536:
                raise ValueError(f"{url!r}: port out of range")
            return cls("tcp", host=host, port=int(port))
        raise ValueError(f"{url!r}: expected tcp://HOST:PORT or unix:///PATH")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"
