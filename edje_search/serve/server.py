"""Running the app under uvicorn: in the foreground (`edje-search serve`) or in a background
thread (tests, the load benchmark)."""
from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time

import uvicorn

from .connections import guarded_h11
from .hardening import install_log_redaction, is_loopback

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """uvicorn's own connection settings, as `edje-search serve` sets them.

    ``max_connections`` is uvicorn's ``limit_concurrency`` (open connections and tasks; past it,
    new requests get 503), ``keep_alive_s`` its ``timeout_keep_alive`` (an idle connection is
    closed after it), ``max_header_bytes`` h11's ``max_incomplete_event_size`` (a request line
    and headers larger than this get 400). ``per_client`` (connections one address may hold) and
    ``header_timeout_s`` (time for a request line and headers to arrive) are this package's
    (serve/connections.py). The body timeout is the app's (ServeLimits.body_timeout_s).
    """

    max_connections: int = 1024
    keep_alive_s: int = 5
    max_header_bytes: int = 16 * 1024
    per_client: int = 128
    header_timeout_s: float = 10.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"{name} must be positive")


def uvicorn_config(app, host: str, port: int, log_level: str = "info", access_log: bool = True,
                   connections: ConnectionLimits = ConnectionLimits(), token: str | None = None) -> uvicorn.Config:
    """uvicorn's Config for ``app``, its logs filtered so ``token`` and token parameters never appear."""
    # no proxy headers: the client address and scheme are the socket's unless a proxy is set up on purpose
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            proxy_headers=False, server_header=False, timeout_graceful_shutdown=5,
                            http=guarded_h11(connections.per_client, connections.header_timeout_s),
                            limit_concurrency=connections.max_connections,
                            timeout_keep_alive=connections.keep_alive_s,
                            h11_max_incomplete_event_size=connections.max_header_bytes)

    install_log_redaction(token)
    return config


def run(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
        connections: ConnectionLimits = ConnectionLimits(), token: str | None = None) -> None:
    """Serve ``app`` until interrupted."""
    uvicorn.Server(uvicorn_config(app, host, port, log_level, connections=connections, token=token)).run()


class BackgroundServer:
    """uvicorn on a loopback port in a daemon thread; ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                 connections: ConnectionLimits = ConnectionLimits()):
        if not is_loopback(host):
            raise ValueError("BackgroundServer binds loopback addresses only")
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level, access_log=False,
                                                    connections=connections))
        self._thread = threading.Thread(target=self.server.run, name="edje-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
