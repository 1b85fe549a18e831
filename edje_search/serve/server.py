"""Running the app under uvicorn: in the foreground (`edje-search serve`) or in a background
thread (tests, the load benchmark)."""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_config(app, host: str, port: int, log_level: str = "info", access_log: bool = True) -> uvicorn.Config:
    # no proxy headers: the client address and scheme are the socket's unless a proxy is set up on purpose
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          proxy_headers=False, server_header=False, timeout_graceful_shutdown=5,
                          limit_concurrency=1024)


def run(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted."""
    uvicorn.Server(uvicorn_config(app, host, port, log_level)).run()


class BackgroundServer:
    """uvicorn on a loopback port in a daemon thread; ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        if not is_loopback(host):
            raise ValueError("BackgroundServer binds loopback addresses only")
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level, access_log=False))
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
