"""Every service's metrics port: Prometheus metrics at /metrics, liveness at /healthz, readiness at /readyz.

    /healthz  200 while the service's loop turns (it beat within LIVENESS_S); 503 once it has stalled: restart it
    /readyz   200 once the service does its job (a worker: joined the group, its partitions' pools loaded; a pool
              builder: its partitions' state restored and caught up); 503 with the reason until then
    /metrics  the Prometheus text format

One service runs per process, so its health is one process-wide object (`HEALTH`) that the service's loop
updates and the HTTP server reads.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

LIVENESS_S = 300.0  # a loop that has not turned for this long is stalled (a decode step, a re-fit or a checkpoint takes less)


class Health:
    """Whether the service is live (its loop turns) and ready (does its job), and why not."""

    def __init__(self, liveness_s: float = LIVENESS_S) -> None:
        self.liveness_s = liveness_s
        self._beat = time.monotonic()
        self._ready, self._reason = False, "starting"
        self._lock = threading.Lock()

    def beat(self) -> None:
        """The service's loop turned."""
        self._beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """`reason`: why not, when not ready."""
        with self._lock:
            self._ready, self._reason = ready, "" if ready else reason or "not ready"

    def live(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._beat
        return (True, "live") if stalled <= self.liveness_s else (False, f"stalled: the loop has not turned for {stalled:.0f} s")

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            return (True, "ready") if self._ready else (False, f"not ready: {self._reason}")


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    health: Health = HEALTH

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, why = (self.health.live if path == "/healthz" else self.health.ready)()
            self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(port: int, health: Health = HEALTH, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `port` from a daemon thread; `.shutdown()` stops it."""
    handler = type("Handler", (_Handler,), {"health": health})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"metrics:{port}", daemon=True).start()
    return server
