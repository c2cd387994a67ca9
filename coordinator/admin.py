"""The operator's door to a long-lived coordinator: JSON over HTTP on a local Unix socket.

Submitting, listing, following and cancelling runs changes what the federation does, so it is
never offered on the silos' port or on a TCP port: the socket lives in a directory only the
service's user may enter (created 0700) and is itself mode 0600, so only that user (and root)
can connect; no other credential is needed. The routes:

| request | answer |
| --- | --- |
| ``GET /runs`` | every run: id, name, state, times, message |
| ``POST /runs`` (body: a run file's YAML) | the queued run, or 400 and why it was refused |
| ``GET /runs/<id>`` | the run and its snapshot (:func:`coordinator.monitor.run_snapshot`) |
| ``GET /runs/<id>/events?after=N`` | the run's event lines from line N on, and the next N |
| ``POST /runs/<id>/cancel`` | the run, cancelled or marked to be stopped |

:class:`AdminClient` is what the ``coordinator`` command uses to call it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

Handler = Callable[[str, str, bytes, dict[str, list[str]]], tuple[int, Any]]
"""(method, path, body, query) -> (HTTP status, JSON-able answer)."""

MAX_BODY = 1 << 24


class AdminServer:
    """Serve ``handle`` on the Unix socket at ``path`` in a daemon thread."""

    def __init__(self, path: str | Path, handle: Handler) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self._remove_stale()

        class RequestHandler(BaseHTTPRequestHandler):
            server_version = "condi-admin"
            sys_version = ""

            def do_GET(self) -> None:
                self._answer(b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 <= length <= MAX_BODY:
                    self._send(413, {"error": f"a request body may have at most {MAX_BODY} bytes"})
                    return
                self._answer(self.rfile.read(length))

            def _answer(self, body: bytes) -> None:
                url = urlsplit(self.path)
                try:
                    code, answer = handle(self.command, url.path, body, parse_qs(url.query))
                except Exception:
                    log.exception("admin request %s %s failed", self.command, url.path)
                    code, answer = 500, {"error": "internal error; the coordinator's log has the details"}
                self._send(code, answer)

            def _send(self, code: int, answer: Any) -> None:
                data = (json.dumps(answer, default=str) + "\n").encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def address_string(self) -> str:
                return "admin-socket"

            def log_message(self, format: str, *args: object) -> None:
                log.debug("admin %s", format % args)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        old = os.umask(0o177)
        try:
            self._server = Server(str(self.path), RequestHandler)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin", daemon=True)

    def _remove_stale(self) -> None:
        """A socket file left by a service that died is removed; one a live service answers on is not."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()
            return
        finally:
            probe.close()
        raise OSError(f"{self.path}: another coordinator service is answering on this admin socket")

    def start(self) -> None:
        """Start answering."""
        self._thread.start()
        log.info("admin socket %s", self.path)

    def stop(self) -> None:
        """Stop answering and remove the socket file."""
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class AdminError(RuntimeError):
    """The service refused a request or could not be reached; the message says which and why."""


class AdminClient:
    """Calls a coordinator service's admin socket."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def request(self, method: str, target: str, body: bytes = b"") -> Any:
        """The JSON answer; AdminError for a refusal (with the service's reason) or no service."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            conn.request(method, target, body=body or None, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read() or b"null")
        except (OSError, http.client.HTTPException) as exc:
            raise AdminError(f"no coordinator service answers on {self.path} ({exc})") from None
        finally:
            conn.close()
        if response.status >= 400:
            raise AdminError(answer.get("error", f"HTTP {response.status}") if isinstance(answer, dict) else answer)
        return answer
