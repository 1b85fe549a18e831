"""`edje-search serve`: JSON API, web gallery, micro-batched search (needs the [serve] extra).

FastAPI (on Starlette) and uvicorn are imported only inside this package, so the core library
installs and imports without them.
"""
from __future__ import annotations

from .app import create_app
from .batching import BatchSettings, MicroBatcher, Overloaded
from .limits import ServeLimits
from .hardening import is_loopback
from .server import BackgroundServer, run

__all__ = ["BackgroundServer", "BatchSettings", "MicroBatcher", "Overloaded", "ServeLimits", "create_app",
           "is_loopback", "run"]
