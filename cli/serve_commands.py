"""serve: the HTTP API and web gallery over one index or several (needs `pip install edje-search[serve]`)."""
from __future__ import annotations

import os
import re

import click

from .common import BACKENDS, DEFAULT_INDEX


def _named_indexes(values: tuple[str, ...]) -> dict[str, str]:
    """``--index DIR`` or ``--index NAME=DIR`` (repeated) -> {name: dir}; a plain DIR is named after
    its folder (other characters than letters, digits, '-' and '_' become '-')."""
    named: dict[str, str] = {}
    for value in values or (DEFAULT_INDEX,):
        name, sep, directory = value.partition("=")
        if not sep:  # named after its folder, in the letters an index name may use
            folder = re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.basename(os.path.normpath(value))).strip("-")
            name, directory = (folder[:64] or "default"), value
        if not name or not directory:
            raise click.BadParameter(f"{value!r}: give DIR or NAME=DIR", param_hint="--index")
        if name in named:
            raise click.BadParameter(f"index name {name!r} given twice", param_hint="--index")
        named[name] = directory
    return named


@click.command("serve")
@click.option("--index", "indexes", multiple=True, metavar="[NAME=]DIR",
              help=f"Index directory (default: {DEFAULT_INDEX}). Repeat as NAME=DIR to serve several: the first "
                   "is the one the gallery and /search use; clip-retrieval's API (/knn-service) picks by "
                   "indice_name, listed at /indices-list.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but a loopback address exposes the index to the network: "
                   "set --token too.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--backend", type=click.Choice(BACKENDS), default="eager", show_default=True,
              help="How the reranker runs (see docs/benchmarks.md, fidelity).")
@click.option("--device", default=None, help="torch device for the model (default: CUDA when present, else CPU).")
@click.option("--token", envvar="EDJE_TOKEN", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer TOKEN' on every request (browsers log in once at /login).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
              help="Queries gathered into one engine call.")
@click.option("--max-wait-ms", default=1.0, show_default=True, type=click.FloatRange(0),
              help="How long an idle engine waits for more queries to join a batch.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="Queued queries beyond which requests get 503 with Retry-After.")
@click.option("--no-batching", is_flag=True, help="One request per engine call (for comparison).")
@click.option("--refresh-interval", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between checks for a newer index generation (e.g. after `edje-search add`).")
@click.option("--max-k", default=100, show_default=True, type=click.IntRange(1), help="Largest k a request may ask.")
@click.option("--max-rerank-k", default=200, show_default=True, type=click.IntRange(0),
              help="Largest rerank_k a request may ask.")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(0.001),
              help="Largest image upload, in MiB.")
@click.option("--allowed-hosts", default=None, metavar="NAMES",
              help="Comma-separated Host header names the server answers (others get 400; '*' for any). "
                   "Default: localhost, 127.0.0.1 and [::1] when bound to loopback (stops DNS rebinding), "
                   "any otherwise.")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(1),
              help="Seconds a request body may take to arrive whole; slower requests get 408 and are closed.")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(1),
              help="Open connections (uvicorn's limit_concurrency); past it, requests get 503.")
@click.option("--max-connections-per-client", "per_client", default=128, show_default=True, type=click.IntRange(1),
              help="Open connections one client address may hold; more are closed at once.")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds a request line and headers may take to arrive; slower connections are closed.")
@click.option("--keep-alive", default=5, show_default=True, type=click.IntRange(1),
              help="Seconds an idle connection is kept open (uvicorn's timeout_keep_alive).")
@click.option("--max-decodes", default=2, show_default=True, type=click.IntRange(1),
              help="Uploads, thumbnails and image files decoded or read at once (bounds their memory).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(indexes, host, port, backend, device, token, max_batch, max_wait_ms, max_queue, no_batching,
          refresh_interval, max_k, max_rerank_k, max_upload_mb, allowed_hosts, body_timeout, max_connections,
          per_client, header_timeout, keep_alive, max_decodes, log_level):
    """Serve INDEX over HTTP: JSON API (docs at /docs), a web gallery at /, and clip-retrieval's
    back-end API (/knn-service, /metadata, /indices-list; clip-front at /clip-front/ when the
    clip-retrieval package is installed)."""
    try:
        from edje_search.serve import BatchSettings, ServeLimits, create_app, is_loopback, run
        from edje_search.serve.hardening import default_allowed_hosts
        from edje_search.serve.server import ConnectionLimits
    except ImportError as e:
        raise click.ClickException(f"serving needs the [serve] extra: pip install 'edje-search[serve]' ({e})") from e
    from edje_search import Engine

    if token is not None and not token.strip():
        raise click.BadParameter("must not be empty", param_hint="--token")
    if not is_loopback(host) and token is None:
        click.echo(f"warning: serving on {host} without --token: anyone who can reach it can search and "
                   f"download the indexed images", err=True)
    batching = BatchSettings.off(max_queue) if no_batching else BatchSettings(max_batch, max_wait_ms, max_queue)
    hosts = default_allowed_hosts(host) if allowed_hosts is None else [
        h.strip().lower() for h in allowed_hosts.split(",") if h.strip()]
    if hosts is not None and not hosts:
        raise click.BadParameter("give at least one host name (or '*')", param_hint="--allowed-hosts")
    if hosts is not None and any("*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*."))
                                 for h in hosts):
        raise click.BadParameter("wildcards only as '*' or '*.example.com'", param_hint="--allowed-hosts")
    limits = ServeLimits(max_k=max_k, max_rerank_k=max_rerank_k, max_upload_bytes=int(max_upload_mb * 2**20),
                         body_timeout_s=body_timeout, max_concurrent_decodes=max_decodes)
    named = _named_indexes(indexes)
    from edje_search.serve.app import INDEX_NAME

    for name in named:  # before any model is loaded: the app's own rule for names
        if not INDEX_NAME.fullmatch(name):
            raise click.BadParameter(f"index name {name!r}: use letters, digits, '-' and '_'", param_hint="--index")
    engines = {name: Engine.from_pretrained(d, device=device, backend=backend) for name, d in named.items()}
    first = next(iter(engines))
    app = create_app(engines[first], limits=limits, batching=batching, token=token,
                     refresh_interval_s=refresh_interval,
                     allowed_hosts=None if hosts is None or "*" in hosts else hosts,
                     index_name=first, more_indexes={n: e for n, e in engines.items() if n != first})
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    served = ", ".join(f"{n}: {named[n]} ({len(e)} images)" for n, e in engines.items())
    click.echo(f"serving {served} on http://{shown}:{port}/ "
               f"(API docs at /docs{'; browsers log in at /login' if token else ''})")
    run(app, host=host, port=port, log_level=log_level, token=token,
        connections=ConnectionLimits(max_connections=max_connections, keep_alive_s=keep_alive,
                                     per_client=per_client, header_timeout_s=header_timeout))


COMMANDS = (serve,)
