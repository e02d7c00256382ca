"""The admin API: newline-delimited JSON over ``STATE_DIR/admin.sock`` (mode 0600).

A request is one JSON object with a ``command``; the answer is one JSON object,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

SOCKET_NAME = "admin.sock"
MAX_REQUEST_BYTES = 64 * 1024

Handler = Callable[[dict], Awaitable[dict] | dict]


class AdminError(Exception):
    """The server could not be reached or refused the command."""


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


class AdminServer:
    """Serves admin commands registered as ``name → handler(request) -> dict``."""

    def __init__(self, state_dir: Path, handlers: dict[str, Handler]) -> None:
        self._path = socket_path(state_dir)
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, str(self._path), limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\n")
            answer = await self._answer(line)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            answer = {"ok": False, "error": "malformed request"}
        try:
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
            handler = self._handlers[request["command"]]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"unknown or malformed command: {line[:100]!r}"}
        try:
            result = handler(request)
            if asyncio.iscoroutine(result):
                result = await result
        except ValueError as error:  # the operator asked for something invalid or impossible
            log.info("admin command %s refused: %s", request.get("command"), error)
            return {"ok": False, "error": str(error)}
        except Exception as error:  # noqa: BLE001 - reported to the admin client
            log.exception("admin command %s failed", request.get("command"))
            return {"ok": False, "error": str(error)}
        return {"ok": True, **result}


def request(state_dir: Path, command: str, timeout: float = 30.0, **arguments) -> dict:
    """Send one command to the server running on ``state_dir`` (blocking)."""
    path = socket_path(state_dir)
    payload = json.dumps({"command": command, **arguments}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(payload)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as error:
        raise AdminError(f"no nbdswap server answers on {path}: {error.strerror or error}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise AdminError(f"unreadable answer from {path}") from None
    if not answer.get("ok"):
        raise AdminError(answer.get("error", "command failed"))
    answer.pop("ok")
    return answer
