"""A read-only HTTP endpoint on a local address: Prometheus text at ``/metrics`` and whatever
pages a service adds (the coordinator's live view).

It answers GET and HEAD only. Because it listens on loopback and has no login, it refuses a
request whose Host header is not the loopback name or address it was reached at (a web page
elsewhere cannot read it through DNS rebinding), sends no cross-origin headers, and asks browsers
to run only its own scripts (Content-Security-Policy) and never to cache. Pages are built per
request by the routes' callables; nothing a client sends reaches them but the path.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from federation.service_metrics import MonitorEndpoint

log = logging.getLogger(__name__)

Route = Callable[[], tuple[str, bytes]]
"""A page: returns (content type, body)."""

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:",
}


class MonitorServer:
    """Serve ``/metrics`` from ``registry`` and the ``routes`` given, at ``endpoint``, in a daemon thread."""

    def __init__(
        self, endpoint: MonitorEndpoint, registry: CollectorRegistry, routes: dict[str, Route] | None = None
    ) -> None:
        pages: dict[str, Route] = {"/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))}
        pages.update(routes or {})
        check_host = not endpoint.allow_remote

        class Handler(BaseHTTPRequestHandler):
            server_version = "condi-monitor"
            sys_version = ""

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
                if check_host and host not in _LOCAL_HOSTS:
                    self._send(403, "text/plain; charset=utf-8", b"forbidden host\n", send_body)
                    return
                route = pages.get(self.path.split("?", 1)[0])
                if route is None:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n", send_body)
                    return
                try:
                    content_type, body = route()
                except Exception:  # a page that fails must not end the monitor thread
                    log.exception("monitor page %s failed", self.path.split("?", 1)[0])
                    self._send(500, "text/plain; charset=utf-8", b"internal error\n", send_body)
                    return
                self._send(200, content_type, body, send_body)

            def _send(self, code: int, content_type: str, body: bytes, send_body: bool) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in _HEADERS.items():
                    self.send_header(name, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("monitor %s", format % args)

        server_class = type(
            "MonitorHTTPServer", (ThreadingHTTPServer,),
            {"address_family": socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET},
        )
        self._server = server_class((endpoint.host, endpoint.port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="monitor-http", daemon=True)

    def start(self) -> int:
        """Start serving; returns the bound port."""
        self._thread.start()
        log.info("monitor serving on port %d (/metrics)", self.port)
        return self.port

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
