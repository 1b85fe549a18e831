"""Distributed index builds on Ray (``pip install 'edje-search[ray]'``).

Ray is imported only when a build starts (``build.import_ray``), so this package imports
without it; the single-process build in ``Engine.sync`` never needs it.
"""
from __future__ import annotations

from .build import ray_build_index
from .sources import Source, resolve_source

__all__ = ["Source", "ray_build_index", "resolve_source"]
